import { BlockError, Mutex } from '@blockrep/block';
import { HeaderField, writeU64 } from './header';
import { type Qcow2Storage, readBuf } from './storage';

/*
 * Reference counts (QEMU's qcow2-refcount.c): the refcount table and its blocks, cached in memory
 * and written back. A refcount change only marks its block dirty; dirty blocks reach the disk
 * before any L2 table that may reference a newly counted cluster (`Qcow2Image.syncRefcounts`),
 * and on flush and close. So a crash can only leak clusters counted but not yet referenced, and a
 * cluster allocated and given back before the next write-back leaves no trace on disk.
 */

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
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

/** Host offset in an L1 (or L2) table entry: bits 9-55 (refcount tables: `reftableEntryOffset`). */
export function tableEntryOffset(buf: Buffer, i: number): number {
  const hi = buf.readUInt32BE(i * 8) & 0x00ffffff;
  const lo = buf.readUInt32BE(i * 8 + 4);
  return hi * 0x100000000 + (lo - (lo & 0x1ff));
}

/** Host offset in a refcount table entry: bits 9-63 (QEMU's REFT_OFFSET_MASK). */
export function reftableEntryOffset(buf: Buffer, i: number): number {
  const lo = buf.readUInt32BE(i * 8 + 4);
  return buf.readUInt32BE(i * 8) * 0x100000000 + (lo - (lo & 0x1ff));
}

/**
 * Whether the offset in entry i of a table is aligned to cs (a power of two below 2^32): read
 * from the low word, exact whatever the offset's size.
 */
export function entryAligned(buf: Buffer, i: number, cs: number): boolean {
  return (buf.readUInt32BE(i * 8 + 4) & ~0x1ff & (cs - 1)) === 0;
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
  /** Entries [from, to) of a block changed in memory and not written yet. */
  private readonly dirty = new Map<number, [number, number]>();
  /** Host offsets of refcount blocks, for the metadata overlap check. */
  readonly blockOffsets = new Set<number>();
  /** No free cluster below this index. */
  hint = 0;
  /** One past the last cluster in use or ever allocated: where new metadata can go. */
  highWater: number;
  readonly mutex = new Mutex();
  /**
   * Writes of refcount blocks go one after another: two in flight over the same sectors could
   * land in either order, an older copy last.
   */
  readonly writes = new Mutex();
  /** Bumped by each refcount increase (an L2 write waits until a flush covers it). */
  gen = 0;
  /**
   * The cluster compressed data is being packed into (-1: none): forgotten once its refcount
   * drops to zero, so a freed and reused cluster is never packed into again.
   */
  packing = -1;

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
      const off = reftableEntryOffset(table, i);
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
    const off = reftableEntryOffset(this.table, i);
    if (!off) return null;
    let p = this.loading.get(i);
    if (!p) {
      if (!entryAligned(this.table, i, this.cs)) {
        throw this.corrupt(
          `Refblock offset 0x${off.toString(16)} unaligned (reftable index: 0x${i.toString(16)})`,
        );
      }
      const load: Promise<Buffer | null> = readBuf(this.storage, off, this.cs).then((buf) => {
        // Superseded meanwhile (makeEmpty's replaceAll): the block in memory is the current one.
        if (this.loading.get(i) !== load) return this.blocks.get(i) ?? null;
        this.blocks.set(i, buf);
        this.loading.delete(i);
        return buf;
      });
      p = load;
      this.loading.set(i, p);
    }
    return p;
  }

  /** How many of clusters [0, n) are in use, counting no further than one past `stopAbove`. */
  async countInUse(n: number, stopAbove: number): Promise<number> {
    let used = 0;
    for (let bi = 0; bi * this.perBlock < n; bi++) {
      const b = await this.block(bi);
      if (!b) continue;
      const end = Math.min(this.perBlock, n - bi * this.perBlock);
      for (let i = 0; i < end; i++) {
        if (refGet(b, i, this.bits) > 0 && ++used > stopAbove) return used;
      }
    }
    return used;
  }

  async get(cluster: number): Promise<number> {
    const b = await this.block(Math.floor(cluster / this.perBlock));
    return b ? refGet(b, cluster % this.perBlock, this.bits) : 0;
  }

  /**
   * Adds delta to the refcount of each cluster in [first, first+count), in memory (the blocks
   * are written back later). Caller holds the mutex. A change that would take a refcount below
   * zero or past its maximum changes nothing and throws.
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
          // Undo this call's changes so far: the caller sees nothing happened.
          if (k > first) await this.update(first, k - first, -delta);
          throw this.corrupt(`Refcount of cluster ${k} would ${v < 0 ? 'drop below zero' : 'overflow'}`);
        }
        refSet(b, k - base, this.bits, v);
        if (v === 0 && k < this.hint) this.hint = k;
        if (v === 0 && k === this.packing) this.packing = -1;
      }
      this.markDirty(bi, c - base, stop - base);
      c = stop;
    }
    if (delta > 0) this.gen++;
  }

  private markDirty(bi: number, from: number, to: number): void {
    const d = this.dirty.get(bi);
    if (d) {
      d[0] = Math.min(d[0], from);
      d[1] = Math.max(d[1], to);
    } else this.dirty.set(bi, [from, to]);
  }

  /** Whether refcount changes wait to be written. */
  get isDirty(): boolean {
    return this.dirty.size > 0;
  }

  /**
   * Writes every changed part of the refcount blocks (rounded out to 512-byte sectors), from a
   * copy taken now: changes made while the writes run wait for the next write-back. `fua`: each
   * durable when this resolves; otherwise they count in `unsynced` until a sync covers them
   * (`Qcow2Image.syncRefcounts`).
   */
  writeBack(fua = false): Promise<void> {
    return this.writes.run(() => this.writeBackLocked(fua));
  }

  /** Blocks written back without FUA since the last sync (a sync must flush the file for them). */
  unsynced = 0;

  private async writeBackLocked(fua: boolean): Promise<void> {
    if (!this.dirty.size) return;
    if (!fua) this.unsynced += this.dirty.size;
    const work: { bi: number; range: [number, number]; off: number; data: Buffer }[] = [];
    for (const [bi, range] of this.dirty) {
      const b = this.blocks.get(bi)!;
      const start = Math.floor((range[0] * this.bits) / 8 / 512) * 512;
      const end = Math.min(this.cs, Math.ceil((range[1] * this.bits) / 8 / 512) * 512);
      const off = reftableEntryOffset(this.table, bi) + start;
      work.push({ bi, range, off, data: Buffer.from(b.subarray(start, end)) });
    }
    this.dirty.clear();
    const results = await Promise.allSettled(work.map((w) => this.storage.write(w.off, w.data, fua)));
    const failed = results.findIndex((r) => r.status === 'rejected');
    if (failed < 0) return;
    // Still to be written: the next write-back tries again.
    for (const [k, r] of results.entries())
      if (r.status === 'rejected') this.markDirty(work[k]!.bi, ...work[k]!.range);
    throw (results[failed] as PromiseRejectedResult).reason;
  }

  /**
   * Creates refcount blocks with the given indices, placed at the high-water mark and covering
   * themselves; grows the refcount table (new table next to them) when it is too small. Written
   * through at once. Caller holds the mutex.
   */
  async addRefblocks(indices: number[]): Promise<void> {
    const cs = this.cs;
    const needed = new Set(
      indices.filter((i) => i >= this.tableEntries || !reftableEntryOffset(this.table, i)),
    );
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
        const have = bi < this.tableEntries && reftableEntryOffset(this.table, bi) !== 0;
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
    // Refcounts first (new blocks, then the changes to existing ones), the table pointing to them last.
    await Promise.all(order.map((bi, k) => this.storage.write((hw + k) * cs, newBlocks.get(bi)!)));
    for (const bi of touched) this.markDirty(bi, 0, this.perBlock);
    await this.writeBack();
    // The blocks must be on disk before a table entry points to them.
    await this.storage.flush();
    // The new blocks are known in memory only once the table on disk points to them: a dirty
    // block without a table entry would be written back over the header.
    const adopt = () => {
      order.forEach((bi, k) => {
        this.blocks.set(bi, newBlocks.get(bi)!);
        this.blockOffsets.add((hw + k) * cs);
      });
      this.highWater = Math.max(this.highWater, hw + used);
    };
    if (!tableClusters) {
      for (const [k, bi] of order.entries()) {
        writeU64(this.table, bi * 8, (hw + k) * cs);
        await this.storage.write(this.tableOffset + bi * 8, this.table.subarray(bi * 8, bi * 8 + 8));
      }
      adopt();
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
      adopt();
      await this.update(oldOffset / cs, oldClusters, -1);
    }
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

  /** Frees host clusters (their last reference is gone from disk, or was never written). */
  free(hostOffset: number, clusters: number): Promise<void> {
    return this.mutex.run(() => this.update(Math.floor(hostOffset / this.cs), clusters, -1));
  }

  /**
   * Takes makeEmpty's new contents of every refcount block, in memory: each block is dirty and
   * reaches the disk with the next write-back, before any L2 table that references a cluster
   * counted since (as any other change). The counts only fall (until then the disk counts the
   * dropped clusters too: a crash leaks them, nothing worse). The cluster compressed data was
   * packed into is forgotten (its count may now be zero, and it may be handed out whole).
   */
  replaceAll(blocks: Map<number, Buffer>, fileLength: number): void {
    this.blocks.clear();
    this.loading.clear();
    this.dirty.clear();
    for (const [bi, b] of blocks) {
      this.blocks.set(bi, b);
      this.markDirty(bi, 0, this.perBlock);
    }
    this.hint = 0;
    this.highWater = Math.ceil(fileLength / this.cs);
    this.packing = -1;
    this.gen++;
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
