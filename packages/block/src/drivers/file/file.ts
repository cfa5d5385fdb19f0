import * as fs from 'node:fs';
import { type BlockDriver, type BlockStatus, type ReopenState, ReqFlags } from '../../driver';
import { BlockError, toBlockError } from '../../errors';
import type { IoVec } from '../../iov';
import type { BlockNode } from '../../node';
import { opt } from '../../options';
import { ImageLocks } from './locks';
import { addonMissing, type FileWriter, openWriter, sparse } from './sparse';

/** The file protocol: a regular file (or block device) through one file descriptor. */
interface FileState {
  fd: number;
  /**
   * The last data extent lseek found, [start, end): block status inside it answers without two
   * lseeks per request (the NBD server asks on every read). Cleared by whatever can make a hole
   * (discard, zero writes, truncation); writes only turn holes into data.
   */
  dataExtent?: [number, number] | null;
  /** Discards that punched holes, failed, and the bytes punched (query-blockstats). */
  discards: { ok: number; failed: number; bytes: number };
  filename: string;
  /** Small reads may run on the event loop thread (aio not set to 'threads'). */
  inline: boolean;
  /** Small writes too (unless BLOCKREP_INLINE_WRITES=0 in the environment, for diagnostics). */
  inlineWrites: boolean;
  /**
   * Large writes in the thread pool or the writer thread now: an inline write would wait for the
   * inode lock they hold (small ones in the pool hold it for microseconds and do not count, or a
   * burst sent to the pool during a back-off would keep every later write there).
   */
  bigPoolWrites: number;
  /**
   * The file's writer thread for large writes (made at the first one; null without the addon,
   * which leaves them to the thread pool).
   */
  writer?: FileWriter | null;
  /**
   * The writes, zero writes and discards issued and not landed yet, waiting or running (all but
   * inline writes, which land at once): a later overlapping request waits for them.
   */
  pending: PendingWrite[];
  /** Writes done inline, through the thread pool and in the writer thread (tests, diagnostics). */
  counts: { inline: number; pool: number; thread: number };
  /** QEMU's image locks on the file (null with locking=off or without the addon). */
  locks: ImageLocks | null;
  /**
   * A second descriptor of the file opened with O_DSYNC, for FUA writes (opened at the first);
   * null inside when it cannot be opened (no /proc): FUA is then a write and an fdatasync.
   */
  dsync: Promise<number | null> | null;
}

/*
 * Inline I/O. A request through the thread pool costs two thread switches and a wake-up of the
 * event loop; on a virtual machine those cost more than copying 4 KiB in or out of the page cache
 * (measured: 4 KiB random writes over NBD doubled inline). So small requests run on the event
 * loop thread when that cannot stall it:
 * - reads with preadv2(RWF_NOWAIT), which takes only what the page cache holds and never waits
 *   for the disk; what it leaves goes to the thread pool;
 * - writes with pwrite while they are quick and no large write of ours to the file is in the
 *   thread pool (it holds the inode lock: measured, a 1 KiB write waited up to 12 ms behind
 *   1 MiB writes). Buffered writes have no non-blocking flag, so a write that takes longer than
 *   1 ms (the kernel throttling dirty pages, a busy file system) sends writes to the thread pool
 *   for 200 ms (InlineWriteGate).
 * Larger requests run off the event loop thread, where copies overlap with its work: reads in the
 * thread pool, and non-FUA writes in the file's writer thread, which makes them one after another
 * (a buffered write holds the inode lock while it copies, so pool threads would only queue on it,
 * and hand it over with a sleep and a wake-up each time: measured, 1 MiB writes at depth 8 took
 * 154 ms per 512 MiB in a writer thread against 186 ms through the pool).
 */
const INLINE_MAX = 64 * 1024;

/** Whether writes may run inline now: not while backing off after a slow one. */
export class InlineWriteGate {
  private from = 0;
  constructor(
    readonly stallMs = 1,
    readonly backoffMs = 200,
  ) {}
  open(now: number): boolean {
    return now >= this.from;
  }
  /** Records an inline write that ran from t0 to t1 (ms). */
  took(t0: number, t1: number): void {
    if (t1 - t0 > this.stallMs) this.from = t1 + this.backoffMs;
  }
}

/** The process's gate (one back-off for all files: a stalled kernel stalls them alike). */
export const writeGate = new InlineWriteGate();

interface PendingWrite {
  start: number;
  end: number;
  done: Promise<void>;
}

/** The pending writes overlapping [start, end). */
function pendingOver(s: FileState, start: number, end: number): PendingWrite[] {
  const out: PendingWrite[] = [];
  for (const p of s.pending) if (p.start < end && start < p.end) out.push(p);
  return out;
}

/**
 * Registers a write to [start, end) from the moment it is issued (while it waits for those before
 * it, too: a later overlapping request must wait for it even then); call the returned function
 * when it has landed.
 */
function registerPending(s: FileState, start: number, end: number): () => void {
  let finished!: () => void;
  const entry = { start, end, done: new Promise<void>((r) => (finished = r)) };
  s.pending.push(entry);
  return () => {
    s.pending.splice(s.pending.indexOf(entry), 1);
    finished();
  };
}

/** Runs fn (a zero write, a discard) after the pending writes it overlaps and before later ones. */
async function inIssueOrder(
  s: FileState,
  start: number,
  end: number,
  fn: () => Promise<void>,
): Promise<void> {
  const before = pendingOver(s, start, end);
  const finished = registerPending(s, start, end);
  try {
    for (const w of before) await w.done;
    await fn();
  } finally {
    finished();
  }
}

/** The file's writer thread, made at its first large write. */
function writerOf(s: FileState): FileWriter | null {
  if (s.writer === undefined) s.writer = openWriter();
  return s.writer;
}

/** How many writes of a file node ran inline, through the thread pool and in its writer thread. */
export function fileWriteCounts(node: BlockNode): { inline: number; pool: number; thread: number } {
  return { ...st(node).counts };
}

function writeInline(fd: number, iov: IoVec, pos: number): number {
  const t0 = performance.now();
  try {
    return iov.length === 1 ? fs.writeSync(fd, iov[0]!, 0, iov[0]!.length, pos) : fs.writevSync(fd, iov, pos);
  } finally {
    writeGate.took(t0, performance.now());
  }
}

const fsRead = (fd: number, buf: Buffer, pos: number) =>
  new Promise<number>((res, rej) => fs.read(fd, buf, 0, buf.length, pos, (e, n) => (e ? rej(e) : res(n))));
const fsReadv = (fd: number, bufs: Buffer[], pos: number) =>
  new Promise<number>((res, rej) => fs.readv(fd, bufs, pos, (e, n) => (e ? rej(e) : res(n))));
const fsWrite = (fd: number, buf: Buffer, pos: number) =>
  new Promise<number>((res, rej) => fs.write(fd, buf, 0, buf.length, pos, (e, n) => (e ? rej(e) : res(n))));
const fsWritev = (fd: number, bufs: Buffer[], pos: number) =>
  new Promise<number>((res, rej) => fs.writev(fd, bufs, pos, (e, n) => (e ? rej(e) : res(n))));
const fsFdatasync = (fd: number) =>
  new Promise<void>((res, rej) => fs.fdatasync(fd, (e) => (e ? rej(e) : res())));
const fsOpen = (path: string, flags: number) =>
  new Promise<number>((res, rej) => fs.open(path, flags, (e, fd) => (e ? rej(e) : res(fd))));
const fsClose = (fd: number) => new Promise<void>((res, rej) => fs.close(fd, (e) => (e ? rej(e) : res())));
const fsStat = (fd: number) =>
  new Promise<fs.Stats>((res, rej) => fs.fstat(fd, (e, st) => (e ? rej(e) : res(st))));

/**
 * The file's O_DSYNC descriptor, opened at the first FUA write through /proc/self/fd (the same
 * file even if it was renamed or unlinked since), with the access mode of the main descriptor.
 * Only the open file description differs: image locks (OFD locks) stay with the main one.
 */
function dsyncFd(s: FileState): Promise<number | null> {
  s.dsync ??= fsOpen(`/proc/self/fd/${s.fd}`, fs.constants.O_RDWR | fs.constants.O_DSYNC).catch(() => null);
  return s.dsync;
}

async function closeDsync(s: FileState): Promise<void> {
  const p = s.dsync;
  s.dsync = null;
  if (!p) return;
  const fd = await p;
  if (fd !== null) await fsClose(fd).catch(() => {});
}

/** Drops the first n bytes of a vector (after a short read or write). */
function advance(iov: IoVec, n: number): IoVec {
  let i = 0;
  while (i < iov.length && n >= iov[i]!.length) n -= iov[i++]!.length;
  const rest = iov.slice(i);
  if (n > 0 && rest.length) rest[0] = rest[0]!.subarray(n);
  return rest;
}

async function openFd(filename: string, readOnly: boolean): Promise<number> {
  try {
    return await fsOpen(filename, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
  } catch (e) {
    const be = toBlockError(e);
    const reason = (e as NodeJS.ErrnoException).code ?? be.errno;
    const text =
      reason === 'ENOENT'
        ? 'No such file or directory'
        : reason === 'EACCES'
          ? 'Permission denied'
          : be.message;
    throw new BlockError(`Could not open '${filename}': ${text}`, { errno: be.errno, cause: e });
  }
}

const st = (node: BlockNode) => node.opaque as FileState;

/**
 * Whether image locks can be taken. Without the native addon there are none, and opening an
 * image without locks is refused (QEMU's tools could write to it under us) unless the node says
 * locking=off or BLOCKREP_LOCKING=warn makes it a warning (printed once).
 */
let warnedNoLocking = false;
function imageLockingOrRefusal(): boolean {
  if (sparse.locking) return true;
  if (process.env.BLOCKREP_LOCKING === 'warn') {
    if (!warnedNoLocking) {
      warnedNoLocking = true;
      process.emitWarning(`image locking is off: ${noAddonText()}`, { code: 'BLOCKREP_NO_LOCKING' });
    }
    return false;
  }
  throw new BlockError(`Image locking is not available: ${noAddonText()}`, {
    errno: 'ENOTSUP',
    hint: 'Open the image with locking=off, or set BLOCKREP_LOCKING=warn, to use it without image locks',
  });
}

function noAddonText(): string {
  return `the native addon of @blockrep/block did not load (${addonMissing ?? 'OFD locks unsupported'})`;
}

export const fileDriver: BlockDriver = {
  name: 'file',
  protocol: true,
  options: {
    filename: opt.string('Path of the image file', { required: true }),
    aio: opt.enum(
      ['threads', 'native', 'io_uring'],
      "AIO backend: 'threads' sends every request to the thread pool; unset, native or io_uring let small requests that cannot block run inline",
    ),
    'aio-max-batch': opt.int('Maximum AIO batch (accepted for compatibility)', { min: 0 }),
    locking: opt.enum(
      ['auto', 'on', 'off'],
      "Image locking with QEMU's lock bytes (default auto: on where OFD locks exist)",
    ),
    'pr-manager': opt.string('Persistent reservation manager (not supported)'),
    'drop-cache': opt.bool('Drop the page cache on reopen (accepted for compatibility)'),
    'x-check-cache-dropped': opt.bool('Debug option (accepted for compatibility)'),
  },
  supportedWriteFlags: ReqFlags.FUA,

  async open(node, opts) {
    const filename = opts.filename as string;
    if (opts['pr-manager'] !== undefined) throw new BlockError('pr-manager is not supported by blockrep');
    const locking = opts.locking !== 'off' && imageLockingOrRefusal();
    let fd: number;
    try {
      fd = await openFd(filename, node.readOnly);
    } catch (e) {
      if (
        !node.readOnly &&
        node.autoReadOnly &&
        ['EACCES', 'EPERM', 'EROFS'].includes((e as BlockError).errno)
      ) {
        fd = await openFd(filename, true);
        node.readOnly = true;
      } else throw e;
    }
    const locks = locking ? new ImageLocks(fd, filename) : null;
    const inline = opts.aio !== 'threads';
    node.opaque = {
      fd,
      filename,
      inline,
      inlineWrites: inline && process.env.BLOCKREP_INLINE_WRITES !== '0',
      bigPoolWrites: 0,
      discards: { ok: 0, failed: 0, bytes: 0 },
      pending: [],
      counts: { inline: 0, pool: 0, thread: 0 },
      locks,
      dsync: null,
    } satisfies FileState;
  },

  async close(node) {
    const s = st(node);
    if (s && s.fd >= 0) {
      // Nodes close drained; still, a write queued for the writer thread or the pool must not
      // find its descriptor number closed (or reused by another file).
      while (s.pending.length) await s.pending[0]!.done;
      const fd = s.fd;
      s.fd = -1;
      s.writer?.close();
      s.writer = null;
      await closeDsync(s);
      await fsClose(fd);
    }
  },

  limits: () => ({ requestAlignment: 1, maxTransfer: 1 << 30, optimalTransfer: 0 }),

  applyPerm(node, perm, shared) {
    st(node)?.locks?.apply(perm, shared);
  },

  async getLength(node) {
    const stat = await fsStat(st(node).fd);
    // QEMU counts lengths in 512-byte sectors, rounding up.
    return Math.ceil(stat.size / 512) * 512;
  },

  filename: (node) => st(node).filename,

  async read(node, offset, bytes, iov) {
    const s = st(node);
    const fd = s.fd;
    let pos = offset;
    let rest = iov;
    let left = bytes;
    if (s.inline && bytes <= INLINE_MAX) {
      const n = sparse.readCached(fd, rest.length === 1 ? rest[0]! : rest, pos);
      if (n === bytes) return;
      if (n > 0) {
        pos += n;
        left -= n;
        rest = advance(rest, n);
      }
    }
    while (left > 0) {
      const n = rest.length === 1 ? await fsRead(fd, rest[0]!, pos) : await fsReadv(fd, rest, pos);
      if (n === 0) {
        // Past the end of the file: zeroes.
        for (const b of rest) b.fill(0);
        return;
      }
      pos += n;
      left -= n;
      if (left > 0) rest = advance(rest, n);
    }
  },

  async write(node, offset, bytes, iov, flags) {
    const s = st(node);
    // FUA: through the O_DSYNC descriptor, which makes this range durable when the write returns
    // (the kernel writes back this range alone and flushes the disk's cache), where QEMU's
    // emulation (write, then fdatasync) writes out every dirty page of the file first.
    const fua = (flags & ReqFlags.FUA) !== 0;
    let pos = offset;
    let rest = iov;
    let left = bytes;
    const end = offset + bytes;
    // A write lands after the overlapping requests issued before it (an inline write would
    // overtake one in the thread pool, and two pool threads may run them out of order): it waits
    // for those pending now, and is itself pending from now on for the ones issued after it.
    const before = pendingOver(s, offset, end);
    const small = bytes <= INLINE_MAX;
    if (
      !fua &&
      before.length === 0 &&
      s.inlineWrites &&
      small &&
      s.bigPoolWrites === 0 &&
      writeGate.open(performance.now())
    ) {
      s.counts.inline++;
      const n = writeInline(s.fd, rest, pos);
      if (n === left) return;
      pos += n;
      left -= n;
      rest = advance(rest, n);
    }
    const finished = registerPending(s, offset, end);
    try {
      const dsync = fua ? await dsyncFd(s) : null;
      const fd = dsync ?? s.fd;
      for (const w of before) await w.done;
      // (At most 64 buffers a request: larger vectors, which no layer of ours makes, take the pool.)
      const writer = small || fua || rest.length > 64 ? null : writerOf(s);
      if (writer) s.counts.thread++;
      else s.counts.pool++;
      if (!small) s.bigPoolWrites++;
      try {
        if (writer) {
          await writer.write(fd, rest.length === 1 ? rest[0]! : rest, pos);
          left = 0;
        }
        while (left > 0) {
          const n = rest.length === 1 ? await fsWrite(fd, rest[0]!, pos) : await fsWritev(fd, rest, pos);
          pos += n;
          left -= n;
          if (left > 0) rest = advance(rest, n);
        }
      } finally {
        if (!small) s.bigPoolWrites--;
      }
      if (fua && dsync === null) await fsFdatasync(fd);
    } finally {
      finished();
    }
  },

  async writeZeroes(node, offset, bytes, flags) {
    const s = st(node);
    // Cleared before and after: a status answer that raced the hole must not stay remembered.
    s.dataExtent = null;
    try {
      await inIssueOrder(s, offset, offset + bytes, () => sparse.zeroRange(s.fd, offset, bytes, flags));
    } finally {
      s.dataExtent = null;
    }
  },

  async discard(node, offset, bytes) {
    const s = st(node);
    s.dataExtent = null;
    try {
      await inIssueOrder(s, offset, offset + bytes, () => sparse.punchHole(s.fd, offset, bytes));
    } catch (e) {
      s.discards.failed++;
      throw e;
    } finally {
      s.dataExtent = null;
    }
    s.discards.ok++;
    s.discards.bytes += bytes;
  },

  statsSpecific(node) {
    const d = st(node).discards;
    return {
      driver: 'file',
      'discard-nb-ok': d.ok,
      'discard-nb-failed': d.failed,
      'discard-bytes-ok': d.bytes,
    };
  },

  async allocatedSize(node) {
    return (await fsStat(st(node).fd)).blocks * 512;
  },

  async flushToDisk(node) {
    await fsFdatasync(st(node).fd);
  },

  async blockStatus(node, offset, bytes): Promise<BlockStatus> {
    const s = st(node);
    const fd = s.fd;
    const known = s.dataExtent;
    if (known && offset >= known[0] && offset + bytes <= known[1])
      return { bytes, data: true, zero: false, allocated: true, offset, file: node };
    // The whole extent from offset (to the next hole or the end), remembered when it is data.
    const whole = await sparse.extent(fd, offset, Number.MAX_SAFE_INTEGER - offset);
    if (whole.data) s.dataExtent = [offset, offset + whole.bytes];
    const ext = { data: whole.data, bytes: Math.min(bytes, whole.bytes) };
    return {
      bytes: ext.bytes,
      data: ext.data,
      zero: !ext.data,
      allocated: true,
      offset,
      file: node,
    };
  },

  async truncate(node, length, opts) {
    st(node).dataExtent = null;
    const fd = st(node).fd;
    const stat = await fsStat(fd);
    if (opts.prealloc !== 'off' && opts.prealloc !== 'full' && opts.prealloc !== 'falloc') {
      throw new BlockError(`Unsupported preallocation mode: ${opts.prealloc}`, { errno: 'ENOTSUP' });
    }
    if (length < stat.size && opts.prealloc !== 'off') {
      throw new BlockError('Cannot use preallocation for shrinking files', { errno: 'ENOTSUP' });
    }
    if (opts.prealloc === 'falloc' && length > stat.size) {
      await sparse.allocate(fd, stat.size, length - stat.size);
      return;
    }
    await new Promise<void>((res, rej) => fs.ftruncate(fd, length, (e) => (e ? rej(e) : res())));
    st(node).dataExtent = null;
    if (opts.prealloc === 'full' && length > stat.size) {
      const chunk = Buffer.alloc(Math.min(1 << 20, length - stat.size));
      for (let pos = stat.size; pos < length; pos += chunk.length) {
        await fsWrite(fd, chunk.subarray(0, Math.min(chunk.length, length - pos)), pos);
      }
    }
  },

  async reopenPrepare(state: ReopenState) {
    if (state.readOnly === state.node.readOnly) return;
    state.opaque = await openFd(st(state.node).filename, state.readOnly);
  },

  reopenCommit(state: ReopenState) {
    if (state.opaque === undefined) return;
    const s = st(state.node);
    const old = s.fd;
    s.fd = state.opaque as number;
    s.locks?.moveTo(s.fd);
    fs.close(old, () => {});
    // Opened again from the new descriptor at the next FUA write (with its access mode).
    void closeDsync(s);
  },

  async reopenAbort(state: ReopenState) {
    if (state.opaque !== undefined) await fsClose(state.opaque as number);
  },
};
