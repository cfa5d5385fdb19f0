/*
 * Receive memory for one server connection: the socket reads into large slabs, the chunks handed
 * on are views of a slab, and a slab is used again once nothing refers to it: every view the
 * byte queue holds and every write payload in flight counts as a reference, given back when the
 * queue drops the chunk or the write has completed. A slab is reused only after it is full
 * ("retired") and its count is back to zero, so no live view can see new data. Reads take all the
 * client has sent at once (not Node's 64 KiB) and allocate nothing in the steady state.
 */

interface Slab {
  buf: Buffer;
  refs: number;
  retired: boolean;
}

/** Bytes of a slab, and the least room a read is given before the next slab is taken. */
const SLAB = 2 << 20;
const MIN_READ = 256 << 10;
/** Free slabs kept for reuse (more are left to the garbage collector). */
const KEEP = 32;

export class RecvBuffers {
  private readonly slabs = new WeakMap<ArrayBufferLike, Slab>();
  private readonly free: Slab[] = [];
  /** Retired slabs whose count reached zero, reused at the next read (never sooner: a caller may take references again before it returns). */
  private readonly candidates = new Set<Slab>();
  private cur: Slab;
  private pos = 0;
  /** Off during the handshake, whose parsers keep views across awaits without references. */
  recycling = false;

  constructor() {
    this.cur = this.make();
  }

  private make(): Slab {
    const s: Slab = { buf: Buffer.allocUnsafeSlow(SLAB), refs: 0, retired: false };
    this.slabs.set(s.buf.buffer, s);
    return s;
  }

  /** Where the next read goes. */
  next(): Buffer {
    for (const s of this.candidates) this.recycle(s);
    this.candidates.clear();
    if (this.cur.buf.length - this.pos < MIN_READ) {
      const old = this.cur;
      old.retired = true;
      this.recycle(old);
      const s = this.free.pop();
      if (s) s.retired = false;
      this.cur = s ?? this.make();
      this.pos = 0;
    }
    return this.cur.buf.subarray(this.pos);
  }

  /** A retired slab nothing views goes back to the free list (when there is room). */
  private recycle(s: Slab): void {
    if (s.refs === 0 && this.recycling && this.free.length < KEEP) this.free.push(s);
  }

  /** The n bytes just read into the region `next()` gave, as a chunk the queue holds (one reference). */
  received(n: number): Buffer {
    const chunk = this.cur.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.cur.refs++;
    return chunk;
  }

  /** One more reference to the slab of each piece (a write payload on its way to the disk). */
  hold(pieces: Buffer[]): void {
    for (const p of pieces) {
      const s = this.slabs.get(p.buffer);
      if (s) s.refs++;
    }
  }

  /** Gives back the references hold() or received() took. */
  release(pieces: Buffer[]): void {
    for (const p of pieces) {
      const s = this.slabs.get(p.buffer);
      if (!s) continue;
      s.refs--;
      this.maybeFree(s);
    }
  }

  private maybeFree(s: Slab): void {
    if (s.retired && s.refs === 0) this.candidates.add(s);
  }
}
