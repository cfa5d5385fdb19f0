import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as util from 'node:util';
import { ReqFlags } from '../../driver';
import { BlockError } from '../../errors';

interface SparseAddon {
  fallocate(fd: number, mode: number, offset: number, len: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  preadv2(fd: number, bufs: Buffer | Buffer[], offset: number, flags: number): number;
  writerOpen?(): object | null;
  writerPwritev?(handle: object, fd: number, bufs: Buffer | Buffer[], offset: number): Promise<number>;
  writerClose?(handle: object): void;
  sndbuf?(fd: number, bytes: number): number;
  RWF_NOWAIT: number;
  ofdLock(fd: number, start: number, len: number, shared: number): number;
  ofdHeld(fd: number, start: number, len: number): number;
  FALLOC_FL_KEEP_SIZE: number;
  FALLOC_FL_PUNCH_HOLE: number;
  FALLOC_FL_ZERO_RANGE: number;
  SEEK_DATA: number;
  SEEK_HOLE: number;
  ENXIO: number;
}

/** Why the addon is not there (null when it is). */
export let addonMissing: string | null = null;

/**
 * The addon native/build.mjs makes (prebuilds/<platform>-<arch>/node.napi.node, shipped in the
 * package for linux x64 and arm64), found by node-gyp-build from src/ (tests) or dist/ (the built
 * package).
 */
function loadAddon(): SparseAddon | null {
  if (process.env.BLOCKREP_NO_SPARSE_ADDON) {
    addonMissing = 'disabled by BLOCKREP_NO_SPARSE_ADDON';
    return null;
  }
  const req = createRequire(import.meta.url);
  let gypBuild: (dir: string) => unknown;
  try {
    gypBuild = req('node-gyp-build') as (dir: string) => unknown;
  } catch (e) {
    addonMissing = `node-gyp-build is missing: ${(e as Error).message}`;
    return null;
  }
  let why = '';
  for (const rel of ['../../../', '../']) {
    const dir = new URL(rel, import.meta.url).pathname;
    try {
      return gypBuild(dir) as SparseAddon;
    } catch (e) {
      why ||= (e as Error).message.split('\n')[0]!;
    }
  }
  addonMissing = why || 'not found';
  return null;
}

const addon = loadAddon();

function notSupported(what: string): BlockError {
  return new BlockError(`${what} is not supported here`, { errno: 'ENOTSUP' });
}

function check(r: number, what: string): void {
  if (r >= 0) return;
  const code = -r;
  // EOPNOTSUPP (95) / ENOSYS (38): the file system cannot; the caller falls back.
  if (code === 95 || code === 38) throw notSupported(what);
  throw new BlockError(`${what} failed: errno ${code}`, { errno: code === 28 ? 'ENOSPC' : 'EIO' });
}

const fstatSize = (fd: number) =>
  new Promise<fs.Stats>((res, rej) => fs.fstat(fd, (e, st) => (e ? rej(e) : res(st))));

/**
 * A thread of its own that makes one file's large writes one after another (native/writer.c says
 * why). write() resolves with the whole length or throws the write's errno, as fs.write would.
 */
export interface FileWriter {
  write(fd: number, bufs: Buffer | Buffer[], offset: number): Promise<void>;
  /** Stops the thread once the writes queued so far are done (later writes fail with EBADF). */
  close(): void;
}

/** A Node-style error for a write's -errno r (as fs.write rejects), which toBlockError maps. */
function writeError(r: number): NodeJS.ErrnoException {
  const [code, text] = util.getSystemErrorMap().get(r) ?? ['EIO', 'i/o error'];
  const e: NodeJS.ErrnoException = new Error(`${code}: ${text}, write`);
  e.code = code;
  e.errno = r;
  e.syscall = 'write';
  return e;
}

/**
 * A writer thread for one file, or null without the addon (or when BLOCKREP_WRITER_THREAD=0 in
 * the environment, for comparisons): the caller then writes through the thread pool.
 */
export function openWriter(): FileWriter | null {
  if (!addon?.writerOpen || process.env.BLOCKREP_WRITER_THREAD === '0') return null;
  const handle = addon.writerOpen();
  if (!handle) return null;
  const a = addon as Required<SparseAddon>;
  return {
    async write(fd, bufs, offset) {
      // (The thread keeps the array it is given alive: a copy, which no caller can change.)
      const r = await a.writerPwritev(handle, fd, Array.isArray(bufs) ? bufs.slice() : bufs, offset);
      if (r < 0) throw writeError(r);
    },
    close: () => a.writerClose(handle),
  };
}

/**
 * Sets a socket's send buffer (SO_SNDBUF) to `bytes`, or only reads it with 0. Returns the size in
 * effect (the kernel caps the request at net.core.wmem_max and doubles it for its own accounting),
 * or null without the addon or when the descriptor is not a socket.
 */
export function socketSendBuffer(fd: number, bytes: number): number | null {
  if (!addon?.sndbuf) return null;
  const r = addon.sndbuf(fd, bytes);
  return r < 0 ? null : r;
}

/**
 * Sparse-file operations: hole punching and zero ranges through fallocate(2), extents through
 * lseek(SEEK_DATA/SEEK_HOLE). Without the addon each throws ENOTSUP (the generic layer then
 * writes zeroes) or reports conservatively (everything is data, unless the file has no blocks).
 */
export const sparse = {
  available: addon !== null,

  /** Whether OFD byte locks are available (image locking). */
  locking: addon !== null && typeof addon.ofdLock === 'function',

  /** A shared OFD lock on one byte (on) or none (off): 0 or -errno. */
  ofdLock(fd: number, offset: number, on: boolean): number {
    return addon ? addon.ofdLock(fd, offset, 1, on ? 1 : 0) : 0;
  },

  /** Whether another open file description locks the byte (false when it cannot tell). */
  ofdHeld(fd: number, offset: number): boolean {
    return addon ? addon.ofdHeld(fd, offset, 1) === 1 : false;
  },

  /**
   * Reads what the page cache holds of [offset, offset + length of bufs) without waiting for the
   * disk (preadv2 with RWF_NOWAIT): the bytes read (maybe fewer, 0 at the end of the file), or -1
   * when nothing could be read that way (not cached, no addon, unsupported) and the caller must
   * read through the thread pool.
   */
  readCached(fd: number, bufs: Buffer | Buffer[], offset: number): number {
    if (!addon) return -1;
    const r = addon.preadv2(fd, bufs, offset, addon.RWF_NOWAIT);
    return r < 0 ? -1 : r;
  },

  /**
   * Reserves [offset, offset+bytes) on disk (fallocate mode 0: reads as zeroes, grows the file);
   * without the addon, or where the file system cannot, zeroes are written instead (as
   * posix_fallocate does).
   */
  async allocate(fd: number, offset: number, bytes: number): Promise<void> {
    if (bytes <= 0) return;
    if (addon && addon.fallocate(fd, 0, offset, bytes) === 0) return;
    const chunk = Buffer.alloc(Math.min(1 << 20, bytes));
    for (let pos = offset; pos < offset + bytes; pos += chunk.length) {
      const n = Math.min(chunk.length, offset + bytes - pos);
      await new Promise<void>((res, rej) => fs.write(fd, chunk, 0, n, pos, (e) => (e ? rej(e) : res())));
    }
  },

  async punchHole(fd: number, offset: number, bytes: number): Promise<void> {
    if (!addon) throw notSupported('Hole punching');
    check(
      addon.fallocate(fd, addon.FALLOC_FL_PUNCH_HOLE | addon.FALLOC_FL_KEEP_SIZE, offset, bytes),
      'Hole punching',
    );
  },

  async zeroRange(fd: number, offset: number, bytes: number, flags: number): Promise<void> {
    if (!addon) throw notSupported('Zeroing');
    const size = (await fstatSize(fd)).size;
    if (flags & ReqFlags.MAY_UNMAP) {
      const holeEnd = Math.min(offset + bytes, size);
      if (holeEnd > offset) {
        check(
          addon.fallocate(
            fd,
            addon.FALLOC_FL_PUNCH_HOLE | addon.FALLOC_FL_KEEP_SIZE,
            offset,
            holeEnd - offset,
          ),
          'Hole punching',
        );
      }
      if (offset + bytes > size) {
        await new Promise<void>((res, rej) => fs.ftruncate(fd, offset + bytes, (e) => (e ? rej(e) : res())));
      }
      return;
    }
    check(addon.fallocate(fd, addon.FALLOC_FL_ZERO_RANGE, offset, bytes), 'Zeroing');
  },

  /** Whether [offset, ...) is data or a hole, and for how many bytes (at most `bytes`). */
  async extent(fd: number, offset: number, bytes: number): Promise<{ data: boolean; bytes: number }> {
    if (!addon) {
      const st = await fstatSize(fd);
      if (offset >= st.size || st.blocks === 0) return { data: false, bytes };
      return { data: true, bytes };
    }
    const d = addon.lseek(fd, offset, addon.SEEK_DATA);
    if (d === -addon.ENXIO) return { data: false, bytes }; // only a hole up to the end of the file
    if (d < 0) return { data: true, bytes };
    if (d > offset) return { data: false, bytes: Math.min(bytes, d - offset) };
    const h = addon.lseek(fd, offset, addon.SEEK_HOLE);
    if (h < 0) return { data: true, bytes };
    return { data: true, bytes: Math.max(1, Math.min(bytes, h - offset)) };
  },
};
