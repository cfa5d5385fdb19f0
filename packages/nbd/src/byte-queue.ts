import { BlockError } from '@blockrep/block';

/**
 * The bytes received on a socket, kept as the list of chunks the socket delivered. Taking bytes
 * returns views into those chunks; only a piece that spans chunks is joined (once). A reader
 * that needs more than is there can wait for it (the handshake) or come back on the next chunk
 * (the transmission parsers, which run synchronously in the 'data' handler).
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private head = 0;
  length = 0;
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;

  /** Told of each chunk once it is consumed or dropped (the memory it views may be reused). */
  constructor(private readonly onDrop?: (chunk: Buffer) => void) {}

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
    const w = this.waiter;
    if (w && this.length >= w.n) {
      this.waiter = null;
      w.resolve();
    }
  }

  /** The next n bytes as one buffer: a view when they lie in one chunk, else joined once. */
  take(n: number): Buffer {
    if (n > this.length) throw new RangeError(`ByteQueue: ${n} bytes wanted, ${this.length} queued`);
    const first = this.chunks[0];
    if (n === 0 || first === undefined) return Buffer.alloc(0);
    if (first.length - this.head >= n) {
      const v = first.subarray(this.head, this.head + n);
      this.advance(n);
      return v;
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, n - done);
      c.copy(out, done, this.head, this.head + k);
      done += k;
      this.advance(k);
    }
    return out;
  }

  /** The next n bytes as a vector of views into the received chunks (no copy). */
  takeIov(n: number): Buffer[] {
    if (n > this.length) throw new RangeError(`ByteQueue: ${n} bytes wanted, ${this.length} queued`);
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, left);
      out.push(k === c.length ? c : c.subarray(this.head, this.head + k));
      left -= k;
      this.advance(k);
    }
    return out;
  }

  /** The big-endian u32 at the front, without consuming it (4 bytes must be queued). */
  peekUInt32BE(): number {
    const c = this.chunks[0]!;
    if (c.length - this.head >= 4) return c.readUInt32BE(this.head);
    let v = 0;
    let i = 0;
    for (let ci = 0, off = this.head; i < 4; ci++, off = 0) {
      const b = this.chunks[ci]!;
      for (; off < b.length && i < 4; off++, i++) v = v * 256 + b[off]!;
    }
    return v;
  }

  /** Copies the next n bytes into dst at dstOffset and drops them. */
  copyTo(dst: Buffer, dstOffset: number, n: number): void {
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, n - done);
      c.copy(dst, dstOffset + done, this.head, this.head + k);
      done += k;
      this.advance(k);
    }
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.length);
    let left = k;
    while (left > 0) {
      const c = this.chunks[0]!;
      const m = Math.min(c.length - this.head, left);
      left -= m;
      this.advance(m);
    }
    return k;
  }

  private advance(k: number): void {
    this.head += k;
    this.length -= k;
    if (this.head === this.chunks[0]!.length) {
      const gone = this.chunks.shift()!;
      this.head = 0;
      this.onDrop?.(gone);
    }
  }

  /** Waits until n bytes are queued, then takes them (handshake use: one reader at a time). */
  async read(n: number): Promise<Buffer> {
    if (this.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { n, resolve, reject };
      });
    }
    return this.take(n);
  }

  /** Fails the pending and any later read() (the connection ended). */
  fail(err: Error = new BlockError('Connection closed', { errno: 'EIO' })): void {
    this.failure ??= err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.failure);
  }

  /** Copies what is still queued into memory of its own (the chunks' memory is about to be reused). */
  own(): void {
    if (this.length === 0) {
      this.chunks = [];
      this.head = 0;
      return;
    }
    const copy = Buffer.allocUnsafe(this.length);
    this.copyTo(copy, 0, this.length);
    this.chunks = [copy];
    this.head = 0;
    this.length = copy.length;
  }

  clear(): void {
    if (this.onDrop) for (const c of this.chunks) this.onDrop(c);
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }
}
