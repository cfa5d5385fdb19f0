import type * as net from 'node:net';
import { socketSendBuffer } from '@blockrep/block';

/**
 * The send buffer asked for on Unix-socket connections, both ends: 4 MiB, or the bytes in
 * BLOCKREP_NBD_SNDBUF (0 keeps the system's default, for comparisons).
 *
 * A Unix stream socket takes no more than its sender's send buffer in flight, by default
 * net.core.wmem_default (208 KiB), so a 1 MiB reply or write goes out in several parts, each
 * waiting for the peer to read the last. Measured with fio reading 1 MiB at depth 8 from
 * blockrepd: about 1.6 GiB/s with the default, 2.1-2.5 with 4 MiB (the kernel caps the request at
 * net.core.wmem_max). TCP sizes its buffers itself, and a fixed size would turn that off.
 */
const UNIX_SNDBUF = (() => {
  const v = process.env.BLOCKREP_NBD_SNDBUF;
  const n = v === undefined || v === '' ? Number.NaN : Number(v);
  return Number.isInteger(n) && n >= 0 ? n : 4 << 20;
})();

/** Widens a connected Unix socket's send buffer (see UNIX_SNDBUF); does nothing otherwise. */
export function widenUnixSendBuffer(socket: net.Socket): void {
  if (UNIX_SNDBUF === 0) return;
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd === 'number' && fd >= 0) socketSendBuffer(fd, UNIX_SNDBUF);
}
