import {
  type BlockChild,
  BufferPool,
  blockStatusAbove,
  DirtyBitmap,
  RangeLock,
  toBlockError,
} from '@blockrep/block';

/** Which side of a copy failed (for the job's on-source-error / on-target-error). */
export class CopyError extends Error {
  constructor(
    readonly isRead: boolean,
    readonly error: Error,
  ) {
    super(error.message);
  }
}

/**
 * The copying state shared by a copy-before-write filter and its backup job: a bitmap of the
 * clusters that still need copying (set = not copied yet) and a lock per cluster range, so that a
 * cluster is copied once, before the first write that would change it, and never copied from
 * data a guest write has already replaced.
 */
export class BlockCopy {
  readonly bitmap: DirtyBitmap;
  private readonly lock = new RangeLock();
  private readonly buffers = new BufferPool(1 << 20);
  /** Told of every extent copied, by the filter or the job (the job's progress). */
  onCopied: ((bytes: number) => void) | null = null;

  constructor(
    private readonly source: BlockChild,
    private readonly target: BlockChild,
    readonly length: number,
    readonly clusterSize: number,
  ) {
    this.bitmap = new DirtyBitmap(length, clusterSize);
    this.bitmap.setAll();
  }

  private clusterRange(offset: number, bytes: number): [number, number] {
    const start = offset - (offset % this.clusterSize);
    const end = Math.min(this.length, Math.ceil((offset + bytes) / this.clusterSize) * this.clusterSize);
    return [start, Math.max(start, end)];
  }

  /** Takes the lock on the clusters touching [offset, offset+bytes). */
  lockRange(offset: number, bytes: number): Promise<() => void> {
    const [s, e] = this.clusterRange(offset, bytes);
    return this.lock.lock(s, Math.max(e - s, 1));
  }

  /**
   * Copies every cluster of [offset, offset+bytes) that still needs it. The caller holds the lock
   * on the range. Returns the bytes copied; on failure the clusters stay marked and it throws a
   * CopyError saying whether the read or the write failed.
   */
  async copyLocked(offset: number, bytes: number): Promise<number> {
    const [start, end] = this.clusterRange(offset, bytes);
    let copied = 0;
    for (const [ext, extLen] of [...this.bitmap.dirtyExtents(start, end - start, this.buffers.size)]) {
      this.bitmap.reset(ext, extLen);
      for (let off = ext; off < ext + extLen; ) {
        const { bytes: len, zero } = await this.sourceStatus(off, ext + extLen - off);
        try {
          if (zero) await this.copyZeroes(off, len);
          else await this.copyData(off, len);
        } catch (e) {
          this.bitmap.set(off, ext + extLen - off);
          throw e;
        }
        copied += len;
        this.onCopied?.(len);
        off += len;
      }
    }
    return copied;
  }

  /**
   * Whether the source reads as zeroes from `offset` on, and for how many whole clusters (at
   * least one cluster, taken as data when the answer is shorter or fails), as QEMU's block-copy
   * asks block status so that zeroes are written as zeroes, not copied.
   */
  private async sourceStatus(offset: number, bytes: number): Promise<{ bytes: number; zero: boolean }> {
    const cluster = Math.min(this.clusterSize, bytes);
    try {
      const st = await blockStatusAbove(this.source.node, null, offset, bytes);
      const whole = Math.min(bytes, st.bytes - (st.bytes % this.clusterSize));
      if (whole >= cluster) return { bytes: whole, zero: st.zero && !st.data };
      // The last, partial cluster of the image.
      if (st.bytes >= bytes) return { bytes, zero: st.zero && !st.data };
    } catch {
      // Copied as data: the read reports the error if there is one.
    }
    return { bytes: cluster, zero: false };
  }

  private async copyZeroes(offset: number, bytes: number): Promise<void> {
    try {
      await this.target.writeZeroes(offset, bytes);
    } catch (e) {
      throw new CopyError(false, toBlockError(e));
    }
  }

  private async copyData(offset: number, bytes: number): Promise<void> {
    const whole = this.buffers.get();
    const buf = whole.subarray(0, bytes);
    try {
      try {
        await this.source.readv(offset, bytes, [buf]);
      } catch (e) {
        throw new CopyError(true, toBlockError(e));
      }
      try {
        await this.target.write(offset, buf);
      } catch (e) {
        throw new CopyError(false, toBlockError(e));
      }
    } finally {
      this.buffers.put(whole);
    }
  }

  /** Locks, copies and unlocks (the job's background copying). */
  async copy(offset: number, bytes: number): Promise<number> {
    const unlock = await this.lockRange(offset, bytes);
    try {
      return await this.copyLocked(offset, bytes);
    } finally {
      unlock();
    }
  }

  /** How many bytes of [offset, offset+bytes) still need copying. */
  dirtyBytes(offset: number, bytes: number): number {
    let n = 0;
    for (const [, len] of this.bitmap.dirtyExtents(offset, bytes)) n += len;
    return n;
  }

  /** A checkpoint: every cluster needs copying again before it is next overwritten. */
  resetAll(): void {
    this.bitmap.setAll();
  }
}
