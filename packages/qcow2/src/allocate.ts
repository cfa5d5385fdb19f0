import { type Qcow2Refcounts, refGet } from './refcount';

/*
 * Cluster allocation (QEMU's qcow2_alloc_clusters): the first run of free clusters from the
 * lowest possibly free one gets refcount 1, in memory, exactly as many as asked for. Nothing is
 * reserved ahead, so a crash leaks no more than the clusters of writes still in flight.
 */
export class Qcow2Allocator {
  constructor(private readonly rc: Qcow2Refcounts) {}

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
