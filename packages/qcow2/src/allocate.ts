import { Mutex } from '@blockrep/block';
import { type Qcow2Refcounts, refGet } from './refcount';

/*
 * Cluster allocation (QEMU's qcow2_alloc_clusters): the first run of free clusters from the
 * lowest possibly free one gets refcount 1, in memory, exactly as many as asked for. Nothing is
 * reserved ahead, so a crash leaks no more than the clusters of writes still in flight.
 */
export class Qcow2Allocator {
  /** Where the next compressed cluster's bytes go (offset into rc.packing's cluster). */
  private packedBytes = 0;
  private readonly byteLock = new Mutex();

  constructor(private readonly rc: Qcow2Refcounts) {}

  /**
   * Room for `size` bytes of compressed data (QEMU's qcow2_alloc_bytes): packed after the
   * previous compressed cluster's data, running on into the next cluster when that one is the
   * next free one; every host cluster the bytes touch gains one reference.
   */
  allocateBytes(size: number): Promise<number> {
    const rc = this.rc;
    const cs = rc.cs;
    return this.byteLock.run(async () => {
      let offset = rc.packing >= 0 ? rc.packing * cs + this.packedBytes : 0;
      if (offset && (await rc.get(rc.packing)) >= rc.max) offset = 0;
      const room = offset ? cs - this.packedBytes : 0;
      if (offset && room >= size) {
        await rc.mutex.run(() => rc.update(rc.packing, 1, 1));
      } else {
        // A new cluster (its reference is the one allocateRun gives it).
        const fresh = (await this.allocateRun(1)).offset;
        if (offset && fresh === (rc.packing + 1) * cs) {
          // Adjacent: the data runs on into it from the old cluster, which gains a reference.
          await rc.mutex.run(() => rc.update(rc.packing, 1, 1));
        } else offset = fresh;
      }
      const end = offset + size;
      rc.packing = end % cs ? Math.floor(end / cs) : -1;
      this.packedBytes = end % cs;
      return offset;
    });
  }

  /** Host offset of n contiguous new clusters with refcount 1. */
  async allocate(n: number): Promise<number> {
    return (await this.allocateRun(n)).offset;
  }

  /**
   * Like allocate(); `fresh` says the clusters were never handed out before (past everything the
   * file held or was given: they read as zeroes until written).
   */
  allocateRun(n: number): Promise<{ offset: number; fresh: boolean }> {
    const rc = this.rc;
    return rc.mutex.run(async () => {
      for (;;) {
        const start = await this.findFreeRun(n);
        const missing: number[] = [];
        for (let bi = Math.floor(start / rc.perBlock); bi * rc.perBlock < start + n; bi++) {
          if (!(await rc.block(bi))) missing.push(bi);
        }
        if (missing.length) {
          // New blocks go at the high-water mark, possibly inside the run: search again.
          await rc.addRefblocks(missing);
          continue;
        }
        const fresh = start >= rc.highWater;
        await rc.update(start, n, 1);
        rc.highWater = Math.max(rc.highWater, start + n);
        if (rc.hint >= start) rc.hint = start + n;
        return { offset: start * rc.cs, fresh };
      }
    });
  }

  /** The first run of n free clusters from the hint (clusters without a refcount block are free). */
  private async findFreeRun(n: number): Promise<number> {
    const rc = this.rc;
    let start = rc.hint;
    let len = 0;
    let c = rc.hint;
    let firstFree = -1;
    while (len < n) {
      const bi = Math.floor(c / rc.perBlock);
      const b = await rc.block(bi);
      const blockEnd = (bi + 1) * rc.perBlock;
      if (!b) {
        if (len === 0) start = c;
        if (firstFree < 0) firstFree = c;
        len += blockEnd - c;
        c = blockEnd;
        continue;
      }
      for (; c < blockEnd && len < n; c++) {
        if (refGet(b, c - bi * rc.perBlock, rc.bits) === 0) {
          if (firstFree < 0) firstFree = c;
          if (len === 0) start = c;
          len++;
        } else len = 0;
      }
    }
    rc.hint = firstFree;
    return start;
  }
}
