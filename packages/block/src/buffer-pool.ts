/**
 * Reusable buffers of one size. A fresh large Buffer costs page faults on first touch; jobs that
 * copy chunk after chunk reuse a few instead (as qemu-img and QEMU's jobs do).
 */
export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(
    readonly size: number,
    private readonly keep = 16,
  ) {}

  /** A buffer of `size` bytes (contents undefined). */
  get(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  /** Gives a buffer back once nothing refers to it any more. */
  put(b: Buffer): void {
    if (b.length === this.size && this.free.length < this.keep) this.free.push(b);
  }
}
