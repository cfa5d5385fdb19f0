/*
 * Receive memory for the server's connections: each socket reads into large slabs, the chunks handed
 * on are views of a slab, and a slab is used again once nothing refers to it: every view the
 * byte queue holds and every write payload in flight counts as a reference, given back when the
 * queue drops the chunk or the write has completed. A slab is reused only after it is full
 * ("retired") and its count is back to zero, so no live view can see new data. Reads take all the
 * client has sent at once (not Node's 64 KiB) and allocate nothing in the steady state. Free slabs
 * go to one pool for the whole process, so memory is bounded by what is in flight plus the pool,
 * not by the number of connections.
 */

interface Slab {
  buf: Buffer;
  refs: number;
  retired: boolean;
}

/**
 * Slab sizes: a connection starts with small slabs and doubles them while its reads are large
 * (a stream of 1 MiB writes ends at 2 MiB slabs, 4 KiB traffic stays at 256-512 KiB). A slab is
 * retired once less than an eighth of it is left for the next read.
 */
const SLAB_MIN = 256 << 10;
const SLAB_MAX = 2 << 20;
/** Bytes of free slabs kept for reuse by any connection (more are left to the garbage collector). */
export const RECV_POOL_BYTES = 32 << 20;

/** Every slab by its memory (a slab moves between connections through the pool). */
const slabOf = new WeakMap<ArrayBufferLike, Slab>();
const pool = new Map<number, Slab[]>();
let pooledBytes = 0;

/** Bytes of free slabs in the process-wide pool (for tests). */
export function recvPoolBytes(): number {
  return pooledBytes;
}

function fromPool(size: number): Slab | null {
  const s = pool.get(size)?.pop();
  if (!s) return null;
  pooledBytes -= size;
  s.retired = false;
  return s;
}

function toPool(s: Slab): void {
  const size = s.buf.length;
  if (pooledBytes + size > RECV_POOL_BYTES) return;
  let list = pool.get(size);
  if (!list) {
    list = [];
    pool.set(size, list);
  }
  list.push(s);
  pooledBytes += size;
}

function makeSlab(size: number): Slab {
  const s: Slab = { buf: Buffer.allocUnsafeSlow(size), refs: 0, retired: false };
  slabOf.set(s.buf.buffer, s);
  return s;
}

export class RecvBuffers {
  /** Retired slabs whose count reached zero, reused at the next read (never sooner: a caller may take references again before it returns). */
  private readonly candidates = new Set<Slab>();
  /** The size of this connection's next slab. */
  private size = SLAB_MIN;
  private cur: Slab;
  private pos = 0;
  /** Off during the handshake, whose parsers keep views across awaits without references. */
  recycling = false;

  constructor() {
    this.cur = fromPool(this.size) ?? makeSlab(this.size);
  }

  /** Where the next read goes. */
  next(): Buffer {
    for (const s of this.candidates) this.recycle(s);
    this.candidates.clear();
    const len = this.cur.buf.length;
    if (len - this.pos < len / 8) {
      const old = this.cur;
      old.retired = true;
      this.recycle(old);
      this.cur = fromPool(this.size) ?? makeSlab(this.size);
      this.pos = 0;
    }
    return this.cur.buf.subarray(this.pos);
  }

  /** A retired slab nothing views goes back to the pool (when there is room). */
  private recycle(s: Slab): void {
    if (s.refs === 0 && this.recycling) toPool(s);
  }

  /** The n bytes just read into the region `next()` gave, as a chunk the queue holds (one reference). */
  received(n: number): Buffer {
    const chunk = this.cur.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.cur.refs++;
    // A read of a quarter slab or more: the client sends more than small slabs serve well.
    if (n >= this.cur.buf.length / 4 && this.size < SLAB_MAX) this.size *= 2;
    return chunk;
  }

  /** One more reference to the slab of each piece (a write payload on its way to the disk). */
  hold(pieces: Buffer[]): void {
    for (const p of pieces) {
      const s = slabOf.get(p.buffer);
      if (s) s.refs++;
    }
  }

  /** Gives back the references hold() or received() took. */
  release(pieces: Buffer[]): void {
    for (const p of pieces) {
      const s = slabOf.get(p.buffer);
      if (!s) continue;
      s.refs--;
      this.maybeFree(s);
    }
  }

  private maybeFree(s: Slab): void {
    if (s.retired && s.refs === 0) this.candidates.add(s);
  }
}
