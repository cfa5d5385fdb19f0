/**
 * An I/O vector: the buffers of one request, in order. Layers pass slices of it down instead of
 * copying data into new buffers.
 */
export type IoVec = Buffer[];

export function iovLength(iov: IoVec): number {
  let n = 0;
  for (const b of iov) n += b.length;
  return n;
}

/** The bytes [offset, offset+bytes) of iov as a new vector of views (no data copied). */
export function iovSlice(iov: IoVec, offset: number, bytes: number): IoVec {
  if (iov.length === 1) {
    const b = iov[0]!;
    return offset === 0 && bytes === b.length ? iov : [b.subarray(offset, offset + bytes)];
  }
  const out: IoVec = [];
  let pos = 0;
  for (const b of iov) {
    if (bytes <= 0) break;
    const end = pos + b.length;
    if (end > offset) {
      const start = Math.max(0, offset - pos);
      const take = Math.min(b.length - start, bytes);
      out.push(start === 0 && take === b.length ? b : b.subarray(start, start + take));
      bytes -= take;
      offset += take;
    }
    pos = end;
  }
  return out;
}

/** One contiguous buffer holding the vector's bytes (copies only when there is more than one). */
export function iovToBuffer(iov: IoVec): Buffer {
  return iov.length === 1 ? iov[0]! : Buffer.concat(iov);
}

/** Fills the vector's bytes [offset, offset+bytes) with zeroes. */
export function iovMemset(iov: IoVec, offset: number, bytes: number, value = 0): void {
  for (const b of iovSlice(iov, offset, bytes)) b.fill(value);
}

/** Copies from src into the vector starting at offset. */
export function iovCopyFrom(iov: IoVec, offset: number, src: Buffer): void {
  let done = 0;
  for (const b of iovSlice(iov, offset, src.length)) {
    src.copy(b, 0, done, done + b.length);
    done += b.length;
  }
}

const ZERO_CHUNK = Buffer.alloc(1 << 20);

/** A read-only view of zeroes of the given size (up to 1 MiB, shared: never write into it). */
export function zeroBuffer(bytes: number): Buffer {
  return bytes <= ZERO_CHUNK.length ? ZERO_CHUNK.subarray(0, bytes) : Buffer.alloc(bytes);
}

/** True when every byte of the vector is zero (memcmp against a zero page, no per-byte JS). */
export function iovIsZero(iov: IoVec): boolean {
  for (const b of iov) {
    for (let off = 0; off < b.length; off += ZERO_CHUNK.length) {
      const n = Math.min(ZERO_CHUNK.length, b.length - off);
      if (ZERO_CHUNK.compare(b, off, off + n, 0, n) !== 0) return false;
    }
  }
  return true;
}
