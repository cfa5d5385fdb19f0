import { BlockError } from '@blockrep/block';
import { HeaderField, writeU64 } from './header';
import { type Qcow2Storage, readBuf } from './storage';

/*
 * Reference counts and cluster allocation (QEMU's qcow2-refcount.c). Every refcount change is
 * written through at once, before the cluster is used (allocation) or after its last user is gone
 * from disk (free), so a crash can only leak clusters. Allocation reserves runs of clusters in one
 * refcount write and hands them out without further I/O; the unused rest is returned on close.
 */

/** Reserved clusters [start, end); those from freshFrom on lay past the file's end when reserved. */
interface PoolRun {
  start: number;
  end: number;
  freshFrom: number;
}

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

/** Mutual exclusion for the few operations that change the refcount structure. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/** Reads entry i of a refcount block of the given width. */
export function refGet(block: Buffer, i: number, bits: number): number {
  switch (bits) {
    case 16:
      return block.readUInt16BE(i * 2);
    case 8:
      return block[i]!;
    case 32:
      return block.readUInt32BE(i * 4);
    case 64: {
      const hi = block.readUInt32BE(i * 8);
      return hi * 0x100000000 + block.readUInt32BE(i * 8 + 4);
    }
    default: {
      const perByte = 8 / bits;
      const shift = (i % perByte) * bits;
      return (block[Math.floor(i / perByte)]! >> shift) & ((1 << bits) - 1);
    }
  }
}

export function refSet(block: Buffer, i: number, bits: number, v: number): void {
  switch (bits) {
    case 16:
      block.writeUInt16BE(v, i * 2);
      return;
    case 8:
      block[i] = v;
      return;
    case 32:
      block.writeUInt32BE(v, i * 4);
      return;
    case 64:
      writeU64(block, i * 8, v);
      return;
    default: {
      const perByte = 8 / bits;
      const shift = (i % perByte) * bits;
      const j = Math.floor(i / perByte);
      const mask = ((1 << bits) - 1) << shift;
      block[j] = (block[j]! & ~mask) | (v << shift);
    }
  }
}

export function refMax(bits: number): number {
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

/** Host offset in a refcount table / L1 entry (bits 9-55 for L1, 9-63 for the reftable). */
export function tableEntryOffset(buf: Buffer, i: number): number {
  const hi = buf.readUInt32BE(i * 8) & 0x00ffffff;
  const lo = buf.readUInt32BE(i * 8 + 4);
  return hi * 0x100000000 + (lo - (lo & 0x1ff));
}

export class Qcow2Refcounts {
  readonly cs: number;
  readonly bits: number;
  /** Refcount entries per refcount block. */
  readonly perBlock: number;
  readonly max: number;
  table: Buffer;
  tableOffset: number;
  tableClusters: number;
  /** Loaded refcount blocks by index (all are kept: one block maps cs*8/bits clusters). */
  private readonly blocks = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer | null>>();
  /** Host offsets of refcount blocks, for the metadata overlap check. */
  readonly blockOffsets = new Set<number>();
  /** No free cluster below this index. */
  private hint = 0;
  /** One past the last cluster in use or reserved: where new metadata can go. */
  highWater: number;
  /** Clusters reserved (refcount 1) and not yet handed out: [start, end). */
  private pool: PoolRun = { start: 0, end: 0, freshFrom: 0 };
  /** A run reserved ahead that does not follow the pool. */
  private next: PoolRun | null = null;
  /** A background reservation is queued or running. */
  private ahead = false;
  private target = 0;
  private lastReserve = Number.NEGATIVE_INFINITY;
  /** Bumped by reset(): background work queued before it must not touch the rewritten tables. */
  private epoch = 0;
  readonly mutex = new Mutex();
  /** Bumped after each refcount increase is written (L2 writes wait for a flush covering it). */
  gen = 0;

  constructor(
    private readonly storage: Qcow2Storage,
    layout: RefcountLayout,
    table: Buffer,
    fileLength: number,
  ) {
    this.cs = 2 ** layout.clusterBits;
    this.bits = 2 ** layout.refcountOrder;
    this.perBlock = (this.cs * 8) / this.bits;
    this.max = refMax(this.bits);
    this.table = table;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.highWater = Math.ceil(fileLength / this.cs);
    for (let i = 0; i < this.tableEntries; i++) {
      const off = tableEntryOffset(table, i);
      if (off) this.blockOffsets.add(off);
    }
  }

  static async load(
    storage: Qcow2Storage,
    layout: RefcountLayout,
    fileLength: number,
  ): Promise<Qcow2Refcounts> {
    const cs = 2 ** layout.clusterBits;
    const table = await readBuf(storage, layout.tableOffset, layout.tableClusters * cs);
    return new Qcow2Refcounts(storage, layout, table, fileLength);
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  private corrupt(msg: string): BlockError {
    return new BlockError(`qcow2: ${msg}`, { errno: 'EIO' });
  }

  /** The refcount block with the given index, or null when the table has none. */
  async block(i: number): Promise<Buffer | null> {
    const b = this.blocks.get(i);
    if (b) return b;
    if (i >= this.tableEntries) return null;
    const off = tableEntryOffset(this.table, i);
    if (!off) return null;
    let p = this.loading.get(i);
    if (!p) {
      if (off % this.cs !== 0 || off + this.cs > this.highWater * this.cs) {
        throw this.corrupt(`Refblock offset ${off.toString(16)} is invalid (reftable index ${i})`);
      }
      p = readBuf(this.storage, off, this.cs).then((buf) => {
        this.blocks.set(i, buf);
        this.loading.delete(i);
        return buf;
      });
      this.loading.set(i, p);
    }
    return p;
  }

  async get(cluster: number): Promise<number> {
    const b = await this.block(Math.floor(cluster / this.perBlock));
    return b ? refGet(b, cluster % this.perBlock, this.bits) : 0;
  }

  /**
   * Adds delta to the refcount of each cluster in [first, first+count) and writes the changed
   * blocks through. Caller holds the mutex.
   */
  async update(first: number, count: number, delta: number): Promise<void> {
    const end = first + count;
    for (let c = first; c < end; ) {
      const bi = Math.floor(c / this.perBlock);
      let b = await this.block(bi);
      if (!b) {
        if (delta < 0) throw this.corrupt(`Freeing cluster ${c} which has no refcount block`);
        await this.addRefblocks([bi]);
        b = (await this.block(bi))!;
      }
      const base = bi * this.perBlock;
      const stop = Math.min(end, base + this.perBlock);
      for (let k = c; k < stop; k++) {
        const v = refGet(b, k - base, this.bits) + delta;
        if (v < 0 || v > this.max) {
          throw this.corrupt(`Refcount of cluster ${k} would ${v < 0 ? 'drop below zero' : 'overflow'}`);
        }
        refSet(b, k - base, this.bits, v);
        if (v === 0 && k < this.hint) this.hint = k;
      }
      await this.writeBlockRange(bi, b, c - base, stop - base);
      c = stop;
    }
    if (delta > 0) this.gen++;
  }

  /** Writes entries [from, to) of block bi (rounded out to 512-byte sectors). */
  private async writeBlockRange(bi: number, b: Buffer, from: number, to: number): Promise<void> {
    const start = Math.floor((from * this.bits) / 8 / 512) * 512;
    const end = Math.min(this.cs, Math.ceil((to * this.bits) / 8 / 512) * 512);
    await this.storage.write(tableEntryOffset(this.table, bi) + start, b.subarray(start, end));
  }

  /**
   * Host offset of n contiguous new clusters with refcount 1. Comes from the reserved run when it
   * is long enough (no I/O); otherwise reserves a new run.
   */
  async allocate(n: number): Promise<number> {
    return (await this.allocateRun(n)).offset;
  }

  /** Like allocate(); `fresh` says the clusters lie past the file's end (they read as zeroes). */
  async allocateRun(n: number): Promise<{ offset: number; fresh: boolean }> {
    for (;;) {
      if (this.pool.end - this.pool.start < n && this.next && this.next.end - this.next.start >= n) {
        this.switchToNext();
      }
      if (this.pool.end - this.pool.start >= n) {
        const s = this.pool.start;
        this.pool.start += n;
        this.maybeReserveAhead();
        return { offset: s * this.cs, fresh: s >= this.pool.freshFrom };
      }
      await this.mutex.run(() => this.reserve(n));
    }
  }

  /** Clusters reserved at a time when allocation is not streaming (8 MiB, 16 to 256 clusters). */
  private baseTarget(): number {
    return Math.max(16, Math.min(256, Math.floor((8 << 20) / this.cs)));
  }

  /**
   * The size of the next reservation: doubles while reservations follow each other within 100 ms
   * (a sequential write filling the image), up to 64 MiB or 4096 clusters; back to the base
   * otherwise. Reserved clusters not yet used are what a crash can leak.
   */
  private nextTarget(): number {
    const now = performance.now();
    const base = this.baseTarget();
    const max = Math.max(base, Math.min(4096, Math.floor((64 << 20) / this.cs)));
    this.target = now - this.lastReserve < 100 ? Math.min(max, Math.max(base, this.target * 2)) : base;
    this.lastReserve = now;
    return this.target;
  }

  /**
   * Starts reserving the next run in the background once the pool is half used, so that
   * allocating writes do not wait for the refcount write (it queues behind their data writes).
   */
  private maybeReserveAhead(): void {
    const left = this.pool.end - this.pool.start;
    if (this.ahead || this.next || left === 0 || left * 2 >= this.target) return;
    this.ahead = true;
    const epoch = this.epoch;
    this.mutex
      .run(async () => {
        if (epoch === this.epoch) await this.reserveAhead();
      })
      // A failure here (ENOSPC, EIO) reaches the writer that next needs clusters.
      .catch(() => {})
      .finally(() => {
        this.ahead = false;
      });
  }

  private async reserveAhead(): Promise<void> {
    const left = this.pool.end - this.pool.start;
    // Released (close, makeEmpty) or refilled meanwhile: nothing to do.
    if (this.next || left === 0 || left * 2 >= this.target) return;
    const run = await this.reserveRun(1, this.nextTarget());
    if (run.start === this.pool.end) {
      // Right after the pool (the image growing at its end): one longer run. Clusters past the
      // file's end in either part stay fresh when the new part is fresh throughout.
      const freshFrom =
        run.freshFrom === run.start ? Math.min(this.pool.freshFrom, run.start) : run.freshFrom;
      this.pool = { start: this.pool.start, end: run.end, freshFrom };
    } else this.next = run;
  }

  /** Takes the reserved-ahead run as the pool; the old pool's few clusters are released. */
  private switchToNext(): void {
    const old = this.pool;
    this.pool = this.next!;
    this.next = null;
    if (old.end > old.start) {
      // Not after a reset (makeEmpty): those clusters may be in use again by then.
      const epoch = this.epoch;
      this.mutex
        .run(async () => {
          if (epoch === this.epoch) await this.update(old.start, old.end - old.start, -1);
        })
        .catch(() => {});
    }
  }

  private async reserve(n: number): Promise<void> {
    if (this.pool.end - this.pool.start >= n) return;
    if (this.next && this.next.end - this.next.start >= n) return;
    await this.releasePoolLocked();
    this.pool = await this.reserveRun(n, Math.max(n, this.nextTarget()));
  }

  /**
   * Finds at least n (up to `want`) free clusters, sets their refcounts to 1 and returns them as
   * a run. Caller holds the mutex.
   */
  private async reserveRun(n: number, want: number): Promise<PoolRun> {
    for (;;) {
      const run = await this.findFreeRun(n, want);
      const missing: number[] = [];
      for (let bi = Math.floor(run.start / this.perBlock); bi * this.perBlock < run.start + run.len; bi++) {
        if (!(await this.block(bi))) missing.push(bi);
      }
      if (missing.length) {
        // New blocks go at the high-water mark, possibly inside the run: search again.
        await this.addRefblocks(missing);
        continue;
      }
      await this.update(run.start, run.len, 1);
      const eof = Math.ceil((await this.storage.length()) / this.cs);
      const end = run.start + run.len;
      this.highWater = Math.max(this.highWater, end);
      if (this.hint >= run.start) this.hint = end;
      return { start: run.start, end, freshFrom: Math.max(run.start, eof) };
    }
  }

  /** The first run of at least n free clusters from the hint, extended up to `want`. */
  private async findFreeRun(n: number, want: number): Promise<{ start: number; len: number }> {
    let start = this.hint;
    let len = 0;
    let c = this.hint;
    let firstFree = -1;
    for (;;) {
      const bi = Math.floor(c / this.perBlock);
      const b = await this.block(bi);
      const blockEnd = (bi + 1) * this.perBlock;
      if (!b) {
        if (len === 0) start = c;
        if (firstFree < 0) firstFree = c;
        len += blockEnd - c;
        c = blockEnd;
      } else {
        for (; c < blockEnd; c++) {
          if (refGet(b, c - bi * this.perBlock, this.bits) === 0) {
            if (firstFree < 0) firstFree = c;
            if (len === 0) start = c;
            len++;
            if (len >= want) break;
          } else {
            if (len >= n) break;
            len = 0;
          }
        }
      }
      if (len >= want || (len >= n && c < blockEnd)) break;
    }
    this.hint = firstFree;
    return { start, len: Math.min(len, want) };
  }

  /**
   * Creates refcount blocks with the given indices, placed at the high-water mark and covering
   * themselves; grows the refcount table (new table next to them) when it is too small.
   * Caller holds the mutex.
   */
  async addRefblocks(indices: number[]): Promise<void> {
    const cs = this.cs;
    const needed = new Set(indices.filter((i) => i >= this.tableEntries || !tableEntryOffset(this.table, i)));
    if (!needed.size) return;
    const hw = this.highWater;
    let tableClusters = 0;
    let newEntries = this.tableEntries;
    for (;;) {
      const maxIdx = Math.max(...needed);
      if (maxIdx >= this.tableEntries) {
        newEntries = Math.max(this.tableEntries * 2, maxIdx + 1);
        tableClusters = Math.ceil((newEntries * 8) / cs);
        newEntries = (tableClusters * cs) / 8;
      }
      const end = hw + needed.size + tableClusters;
      let grew = false;
      for (let bi = Math.floor(hw / this.perBlock); bi * this.perBlock < end; bi++) {
        const have = bi < this.tableEntries && tableEntryOffset(this.table, bi) !== 0;
        if (!have && !needed.has(bi)) {
          needed.add(bi);
          grew = true;
        }
      }
      if (!grew && !(Math.max(...needed) >= newEntries)) break;
    }
    const order = [...needed].sort((a, b) => a - b);
    const newBlocks = new Map<number, Buffer>();
    for (const bi of order) newBlocks.set(bi, Buffer.alloc(cs));
    const used = order.length + tableClusters;
    const touched = new Set<number>();
    for (let c = hw; c < hw + used; c++) {
      const bi = Math.floor(c / this.perBlock);
      const b = newBlocks.get(bi) ?? (await this.block(bi))!;
      refSet(b, c % this.perBlock, this.bits, refGet(b, c % this.perBlock, this.bits) + 1);
      if (!newBlocks.has(bi)) touched.add(bi);
    }
    // Refcounts first (new blocks, then existing ones), the table pointing to them last.
    await Promise.all(order.map((bi, k) => this.storage.write((hw + k) * cs, newBlocks.get(bi)!)));
    for (const bi of touched) {
      await this.storage.write(tableEntryOffset(this.table, bi), this.blocks.get(bi)!);
    }
    // The blocks must be on disk before a table entry points to them.
    await this.storage.flush();
    if (!tableClusters) {
      for (const [k, bi] of order.entries()) {
        writeU64(this.table, bi * 8, (hw + k) * cs);
        await this.storage.write(this.tableOffset + bi * 8, this.table.subarray(bi * 8, bi * 8 + 8));
      }
    } else {
      const table = Buffer.alloc(tableClusters * cs);
      this.table.copy(table);
      for (const [k, bi] of order.entries()) writeU64(table, bi * 8, (hw + k) * cs);
      const tableOffset = (hw + order.length) * cs;
      await this.storage.write(tableOffset, table);
      await this.storage.flush();
      const hdr = Buffer.alloc(12);
      writeU64(hdr, 0, tableOffset);
      hdr.writeUInt32BE(tableClusters, 8);
      await this.storage.write(HeaderField.REFTABLE_OFFSET, hdr);
      await this.storage.flush();
      const oldOffset = this.tableOffset;
      const oldClusters = this.tableClusters;
      this.table = table;
      this.tableOffset = tableOffset;
      this.tableClusters = tableClusters;
      this.highWater = hw + used;
      order.forEach((bi, k) => {
        this.blocks.set(bi, newBlocks.get(bi)!);
        this.blockOffsets.add((hw + k) * cs);
      });
      await this.update(oldOffset / cs, oldClusters, -1);
    }
    order.forEach((bi, k) => {
      this.blocks.set(bi, newBlocks.get(bi)!);
      this.blockOffsets.add((hw + k) * cs);
    });
    this.highWater = Math.max(this.highWater, hw + used);
    this.gen++;
  }

  /** The highest cluster with a non-zero refcount (-1: none). */
  async lastUsedCluster(): Promise<number> {
    for (let i = this.tableEntries - 1; i >= 0; i--) {
      const b = await this.block(i);
      if (!b) continue;
      for (let k = this.perBlock - 1; k >= 0; k--)
        if (refGet(b, k, this.bits) !== 0) return i * this.perBlock + k;
    }
    return -1;
  }

  /** Frees host clusters (their last reference is gone from disk). */
  free(hostOffset: number, clusters: number): Promise<void> {
    return this.mutex.run(() => this.update(Math.floor(hostOffset / this.cs), clusters, -1));
  }

  private async releasePoolLocked(): Promise<void> {
    const runs = [this.pool, this.next];
    this.pool = { start: 0, end: 0, freshFrom: 0 };
    this.next = null;
    for (const r of runs) if (r && r.end > r.start) await this.update(r.start, r.end - r.start, -1);
  }

  /** Returns the reserved but unused clusters (on close, so that check finds no leaks). */
  releasePool(): Promise<void> {
    return this.mutex.run(() => this.releasePoolLocked());
  }

  /** Forgets every cached block and the reservation (after makeEmpty rewrote them on disk). */
  reset(table: Buffer, fileLength: number): void {
    this.table = table;
    this.blocks.clear();
    this.blockOffsets.clear();
    for (let i = 0; i < this.tableEntries; i++) {
      const off = tableEntryOffset(table, i);
      if (off) this.blockOffsets.add(off);
    }
    this.pool = { start: 0, end: 0, freshFrom: 0 };
    this.next = null;
    this.epoch++;
    this.hint = 0;
    this.highWater = Math.ceil(fileLength / this.cs);
  }

  /** Whether a host range overlaps the refcount table or a refcount block. */
  overlapsMetadata(offset: number, bytes: number): boolean {
    const tEnd = this.tableOffset + this.tableClusters * this.cs;
    if (offset < tEnd && this.tableOffset < offset + bytes) return true;
    for (let c = offset - (offset % this.cs); c < offset + bytes; c += this.cs)
      if (this.blockOffsets.has(c)) return true;
    return false;
  }
}
