import { readFileSync } from 'node:fs';
import { socketSendBuffer } from '@blockrep/block';
import { describe, expect, it } from 'vitest';
import { NbdClientConnection } from '../src/index';
import { onCleanup, serveImage } from './helpers';

/** The send buffer of a socket held in a private `socket` field (0 reads it without changing it). */
function sendBufferOf(holder: unknown): number | null {
  const s = (holder as { socket: { _handle: { fd: number } } }).socket;
  return socketSendBuffer(s._handle.fd, 0);
}

describe('socket send buffers', () => {
  it('Unix-socket connections widen their send buffer at both ends (to 4 MiB, within wmem_max); TCP ones keep the kernel sizing', async () => {
    const srv = await serveImage({ size: '4M' });
    const path = srv.dir.file('nbd.sock');
    await srv.server.listen({ type: 'unix', path });
    const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    // The kernel reports twice what was set (its bookkeeping share).
    const widened = 2 * Math.min(4 << 20, wmemMax);

    const unix = await NbdClientConnection.connect({ server: { type: 'unix', path }, export: 'disk' });
    onCleanup(() => unix.disconnect());
    expect(sendBufferOf(unix)).toBe(widened);
    const served = [...(srv.server as unknown as { connections: Set<unknown> }).connections];
    expect(served).toHaveLength(1);
    expect(sendBufferOf(served[0])).toBe(widened);

    const tcp = await NbdClientConnection.connect({
      server: { type: 'inet', host: '127.0.0.1', port: String(srv.port) },
      export: 'disk',
    });
    onCleanup(() => tcp.disconnect());
    const tcpDefault = Number(readFileSync('/proc/sys/net/ipv4/tcp_wmem', 'utf8').split(/\s+/)[1]);
    expect(sendBufferOf(tcp)).toBeLessThan(widened);
    expect(sendBufferOf(tcp)).toBeGreaterThanOrEqual(tcpDefault);
  });
});
