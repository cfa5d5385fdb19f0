/**
 * Reply buffers for reads, reused once the socket has written them: a read reply is header and
 * data in one buffer, and allocating (and later collecting) one per request is what a busy server
 * would otherwise spend its time on. Buffers are kept per exact size, up to a byte budget.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;

  constructor(
    private readonly maxBytes = 64 << 20,
    private readonly maxPerSize = 64,
  ) {}

  get(size: number): Buffer {
    const list = this.free.get(size);
    const b = list?.pop();
    if (b) {
      this.pooled -= size;
      return b;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  /** Gives a buffer back (the caller no longer references it, nor does any pending write). */
  release(b: Buffer): void {
    const size = b.length;
    if (this.pooled + size > this.maxBytes) return;
    let list = this.free.get(size);
    if (!list) {
      list = [];
      this.free.set(size, list);
    }
    if (list.length >= this.maxPerSize) return;
    list.push(b);
    this.pooled += size;
  }
}

/** The pool all server connections of the process share. */
export const replyBuffers = new BufferPool();
