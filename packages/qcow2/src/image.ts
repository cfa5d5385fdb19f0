import { BlockError, errnoText, Mutex, RangeLock, toBlockError } from '@blockrep/block';
import { Qcow2Allocator } from './allocate';
import {
  type BitmapDirEntry,
  bitmapsExtension,
  dropStaleBitmaps,
  entryClusters,
  openBitmaps,
} from './bitmaps';
import { type Qcow2CacheEntry, Qcow2L2Cache } from './cache';
import { checkStorage } from './check';
import {
  Compat,
  Ext,
  HeaderField,
  Incompat,
  l1EntriesFor,
  parseHeader,
  type Qcow2Header,
  u64Buffer,
  withBackingFile,
  writeU64,
} from './header';
import { entryAligned, Qcow2Refcounts, refSet, reftableEntryOffset, tableEntryOffset } from './refcount';
import { type Qcow2Storage, readBuf } from './storage';

/*
 * One open qcow2 image: header, L1 table, L2 cache and refcounts over a storage, with the
 * metadata write ordering that keeps it consistent at every instant (see README "Crash safety").
 */

export interface Qcow2OpenOptions {
  readOnly: boolean;
  /** Bytes of L2 tables to cache (default: enough for the whole image, at most 32 MiB). */
  l2CacheSize?: number;
}

export interface BackingReader {
  readv(offset: number, bytes: number, iov: Buffer[]): Promise<void>;
  length(): number;
}

export class Qcow2Image {
  readonly cs: number;
  readonly clusterBits: number;
  /** L2 entries per table. */
  readonly l2Entries: number;
  /** Version 3 (changes only with amend's compat; see compat.ts). */
  v3: boolean;
  l1: Buffer;
  l1Offset: number;
  readonly cache: Qcow2L2Cache;
  /** Serialises allocation of the same guest clusters (byte ranges of the virtual disk). */
  readonly allocLock = new RangeLock();
  /** L2 allocations in flight by L1 index. */
  readonly l2Allocs = new Map<number, Promise<void>>();
  /** In-place data writes in flight. */
  readonly dataWrites = new Set<Promise<void>>();
  /** Host clusters whose last on-disk reference goes away with the next L2 write-back. */
  pendingFree: [offset: number, clusters: number, punch?: boolean][] = [];
  /**
   * Guest discards (and unmapping zero writes) reach the file: the clusters they free are punched
   * out before they go back (QEMU's pass-discard-request, on with discard=unmap).
   */
  passDiscards = false;
  corrupt: boolean;
  /** A corruption was reported (later ones of the same weight are not). */
  private signaledCorruption = false;
  /** A fatal corruption: no request is served any more. */
  private dead = false;
  /** The persistent bitmaps' directory as it is on disk (empty: none). */
  bitmapDir: BitmapDirEntry[] = [];
  /** Told the text of each corruption reported (the driver emits BLOCK_IMAGE_CORRUPTED). */
  onCorruption: ((text: string) => void) | null = null;
  /** makeEmpty left free clusters at the end of the file: cut them off on close. */
  trimOnClose = false;
  /** Finds the backing file now (the graph may attach, replace or drop it while the image is open). */
  backingSource: (() => BackingReader | null) | null = null;

  get backing(): BackingReader | null {
    return this.backingSource?.() ?? null;
  }
  /** Keeps L1 entry updates and the move to a larger L1 table apart. */
  readonly l1Lock = new Mutex();
  /** Keeps flushes and makeEmpty apart (a flush racing makeEmpty could write stale tables). */
  readonly metadataLock = new Mutex();
  /** Refcount write generation already made durable by a flush. */
  private syncedGen = 0;
  /** One refcount write-back and flush at a time: a second waits for the first to be durable. */
  private readonly syncLock = new Mutex();
  readonly allocator: Qcow2Allocator;

  private constructor(
    readonly storage: Qcow2Storage,
    readonly header: Qcow2Header,
    readonly refcounts: Qcow2Refcounts,
    l1: Buffer,
    public readOnly: boolean,
    cacheTables: number,
  ) {
    this.clusterBits = header.clusterBits;
    this.cs = 2 ** header.clusterBits;
    this.l2Entries = this.cs / 8;
    this.v3 = header.version === 3;
    this.l1 = l1;
    this.l1Offset = header.l1TableOffset;
    this.corrupt = (header.incompatible & Incompat.CORRUPT) !== 0n;
    this.allocator = new Qcow2Allocator(refcounts);
    this.cache = new Qcow2L2Cache(
      cacheTables,
      (off) => readBuf(storage, off, this.cs),
      (e) => this.writeL2(e),
    );
  }

  static async open(storage: Qcow2Storage, opts: Qcow2OpenOptions): Promise<Qcow2Image> {
    const fileLength = await storage.length();
    const first = await readBuf(storage, 0, Math.min(Math.max(fileLength, 0), 65536));
    let header = parseHeader(first, fileLength);
    if (2 ** header.clusterBits > first.length && fileLength > first.length) {
      header = parseHeader(
        await readBuf(storage, 0, Math.min(fileLength, 2 ** header.clusterBits)),
        fileLength,
      );
    }
    if (header.incompatible & Incompat.CORRUPT && !opts.readOnly) {
      throw new BlockError('qcow2: Image is corrupt; cannot be opened read/write', { errno: 'EACCES' });
    }
    const bitmapDir = await openBitmaps(storage, header);
    if (header.incompatible & Incompat.DIRTY && !opts.readOnly) {
      // Refcounts may be stale (lazy refcounts): recount them (a repair may rebuild the refcount
      // structure, so the header is read again), then the image is clean again.
      await checkStorage(storage, { repair: 'all' });
      header = parseHeader(
        await readBuf(storage, 0, Math.min(fileLength, 2 ** header.clusterBits)),
        fileLength,
      );
      header.incompatible &= ~Incompat.DIRTY;
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(header.incompatible);
      await storage.write(HeaderField.INCOMPAT, b);
      await storage.flush();
    }
    const cs = 2 ** header.clusterBits;
    // Tables may lie (partly) past the end of the file: what is not there reads as zeroes.
    const l1 = await readBuf(storage, header.l1TableOffset, header.l1Size * 8).catch((e) => {
      throw new BlockError(`Could not read L1 table: ${errnoText(toBlockError(e).errno)}`, { errno: 'EIO' });
    });
    const refcounts = await Qcow2Refcounts.load(
      storage,
      {
        clusterBits: header.clusterBits,
        refcountOrder: header.refcountOrder,
        tableOffset: header.refcountTableOffset,
        tableClusters: header.refcountTableClusters,
      },
      fileLength,
    ).catch((e) => {
      throw new BlockError(`Could not initialize refcount handling: ${errnoText(toBlockError(e).errno)}`, {
        errno: 'EIO',
      });
    });
    const wanted = Math.ceil(header.size / ((cs * cs) / 8)) * cs;
    const cacheBytes = opts.l2CacheSize ?? Math.min(32 << 20, Math.max(wanted, 4 * cs));
    const img = new Qcow2Image(
      storage,
      header,
      refcounts,
      l1,
      opts.readOnly,
      Math.max(2, Math.floor(cacheBytes / cs)),
    );
    img.bitmapDir = bitmapDir ?? [];
    if (!opts.readOnly) {
      await dropStaleBitmaps(storage, header);
      // Autoclear bits name features we do not maintain: clearing them tells others so. Bit 0
      // (bitmaps) stays while the image has bitmaps: they are kept.
      const keep = img.bitmapDir.length ? header.autoclear & 1n : 0n;
      if (header.autoclear !== keep) {
        await storage.write(HeaderField.AUTOCLEAR, u64Buffer(Number(keep)));
        header.autoclear = keep;
      }
    }
    return img;
  }

  get size(): number {
    return this.header.size;
  }

  get fileEnd(): number {
    return this.refcounts.highWater * this.cs;
  }

  /**
   * Records an inconsistency (QEMU's qcow2_signal_corruption) and throws EIO for the request
   * that found it (unless `throwIt` is false). On a writable image it is fatal: the image is
   * marked corrupt on disk (v3) and unusable from now on (requests fail with ENOMEDIUM, as QEMU
   * drops the driver). The first event of each kind says so; later ones are suppressed.
   */
  corruptEvent(msg: string, throwIt = true): void {
    const fatal = !this.readOnly;
    let text = 'Input/output error';
    if (!this.signaledCorruption || (fatal && !(this.header.incompatible & Incompat.CORRUPT))) {
      text = fatal
        ? `qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`;
      this.signaledCorruption = true;
      this.onCorruption?.(text);
    }
    if (fatal) {
      if (this.v3 && !(this.header.incompatible & Incompat.CORRUPT)) {
        this.header.incompatible |= Incompat.CORRUPT;
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(this.header.incompatible);
        this.storage.write(HeaderField.INCOMPAT, b).catch(() => {});
      }
      this.corrupt = true;
      this.dead = true;
    }
    if (throwIt) throw new BlockError(text, { errno: 'EIO' });
  }

  /** Throws once a fatal corruption made the image unusable. */
  checkUsable(): void {
    if (this.dead) throw new BlockError('No medium found', { errno: 'ENOMEDIUM' });
  }

  checkWritable(): void {
    this.checkUsable();
    if (this.corrupt) throw new BlockError('qcow2: Image is corrupt; writes are refused', { errno: 'EIO' });
    if (this.readOnly) throw new BlockError('qcow2: Image is read-only', { errno: 'EPERM' });
  }

  /** Whether a host range overlaps metadata (header, L1, refcount structures, cached L2 tables). */
  overlapsMetadata(offset: number, bytes: number): boolean {
    if (offset < this.cs) return true;
    const l1End = this.l1Offset + this.header.l1Size * 8;
    if (offset < l1End && this.l1Offset < offset + bytes) return true;
    if (this.refcounts.overlapsMetadata(offset, bytes)) return true;
    for (let c = offset - (offset % this.cs); c < offset + bytes; c += this.cs)
      if (this.cache.has(c)) return true;
    return false;
  }

  /** The host offset of the L2 table for L1 index i (0: none), validated. */
  l2Offset(i: number): number {
    if (i >= this.header.l1Size) return 0;
    const off = tableEntryOffset(this.l1, i);
    if (!off) return 0;
    if (!entryAligned(this.l1, i, this.cs)) {
      this.corruptEvent(`L2 table offset ${hex(off)} unaligned (L1 index: ${hex(i)})`);
    }
    if (off < this.cs || this.refcounts.overlapsMetadata(off, this.cs)) {
      this.corruptEvent(`L2 table at ${hex(off)} overlaps other metadata (L1 index: ${hex(i)})`);
    }
    return off;
  }

  l1Copied(i: number): boolean {
    return i < this.header.l1Size && (this.l1.readUInt32BE(i * 8) & 0x80000000) !== 0;
  }

  /** Writes L1 entry i through to disk. */
  async setL1(i: number, value: Buffer): Promise<void> {
    await this.l1Lock.run(async () => {
      value.copy(this.l1, i * 8);
      await this.storage.write(this.l1Offset + i * 8, this.l1.subarray(i * 8, i * 8 + 8));
    });
  }

  /**
   * Makes the refcount increases made so far durable before metadata that relies on them is
   * written: the dirty blocks written with FUA, and the file flushed only when blocks written
   * back earlier without it may not be on disk yet. A flush would also write out all the data
   * written so far (measured: a mirror into a fresh 1 GiB image ran at 750 MiB/s with a flush at
   * its second L2 table, 1170-1320 without any).
   */
  syncRefcounts(): Promise<void> {
    return this.syncLock.run(async () => {
      const g = this.refcounts.gen;
      if (g === this.syncedGen) return;
      const unsynced = this.refcounts.unsynced;
      await this.refcounts.writeBack(true);
      if (unsynced) {
        await this.storage.flush();
        this.refcounts.unsynced -= unsynced;
      }
      if (g > this.syncedGen) this.syncedGen = g;
    });
  }

  private async writeL2(e: Qcow2CacheEntry): Promise<void> {
    // The table as it is now: every cluster it references was counted before the sync below
    // begins, so the sync makes all of them durable. Entries set meanwhile wait for the next
    // write-back (the entry stays dirty).
    const table = Buffer.from(e.table);
    await this.syncRefcounts();
    await this.storage.write(e.offset, table);
  }

  /** Writes cached metadata in dependency order, then releases clusters freed by it. */
  async flushMetadata(): Promise<void> {
    if (this.readOnly) return;
    await this.metadataLock.run(async () => {
      const frees = this.pendingFree;
      this.pendingFree = [];
      const writing = frees.length ? [...this.dataWrites] : [];
      await this.cache.flush();
      if (frees.length) {
        // A write that found a freed cluster before it was unmapped must land before it is reused.
        await Promise.allSettled(writing);
        await this.storage.flush();
        // Punched while still counted (nothing can be given the clusters meanwhile), only where
        // this is the last reference (a snapshot's or another compressed cluster's stay), and
        // neighbouring ranges as one request (as QEMU merges its discard queue).
        const punches: [number, number][] = [];
        for (const [off, n, punch] of frees) {
          if (!punch || !this.storage.discard || (await this.refcounts.get(off / this.cs)) !== 1) continue;
          const last = punches[punches.length - 1];
          if (last && last[0] + last[1] === off) last[1] += n * this.cs;
          else punches.push([off, n * this.cs]);
        }
        for (const [off, bytes] of punches) await this.storage.discard!(off, bytes).catch(() => {});
        for (const [off, n] of frees) await this.refcounts.free(off, n);
      }
      // Decreases too (frees, failed allocations): the flush to disk that follows covers them.
      await this.refcounts.writeBack();
    });
  }

  async close(): Promise<void> {
    if (this.readOnly || this.corrupt) return;
    await this.flushMetadata();
    if (this.trimOnClose) {
      const end = (await this.refcounts.lastUsedCluster()) + 1;
      if ((await this.storage.length()) > end * this.cs) await this.storage.truncate(end * this.cs);
    }
    await this.storage.flush();
  }

  /**
   * Writes a new backing file name and format into the header (block-commit dropping layers
   * from a chain). One write of the header cluster, with the L1 lock held so no field patch races it.
   */
  async changeBackingFile(backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
    this.checkWritable();
    await this.l1Lock.run(async () => {
      const cluster = await readBuf(this.storage, 0, this.cs);
      const updated = withBackingFile(cluster, this.header, backingFile, backingFormat);
      await this.storage.write(0, updated);
      await this.storage.flush();
      this.header.backingFile = backingFile;
      this.header.backingFormat = backingFile ? backingFormat : undefined;
      this.header.backingFileOffset = updated.readUInt32BE(12);
      this.header.backingFileSize = updated.readUInt32BE(16);
      if (!backingFile || !backingFormat)
        this.header.extensions = this.header.extensions.filter((e) => e.type !== Ext.BACKING_FORMAT);
      else {
        this.header.extensions = [
          { type: Ext.BACKING_FORMAT, data: Buffer.from(backingFormat) },
          ...this.header.extensions.filter((e) => e.type !== Ext.BACKING_FORMAT),
        ];
      }
    });
  }

  /**
   * Shrinks the virtual size (qemu-img resize --shrink): the clusters past the new end are
   * unmapped and freed (a snapshot's references stay), L2 tables past it are dropped from the L1
   * table (its size field stays, as QEMU keeps it), the size field is written, and the file is cut
   * after its last cluster in use. The part of the last cluster past an unaligned end is zeroed
   * first (QEMU leaves it, and a later growth shows the old bytes again).
   */
  async shrink(
    length: number,
    zeroTail: (offset: number, bytes: number) => Promise<void>,
    unmap: (offset: number, bytes: number) => Promise<void>,
  ): Promise<void> {
    this.checkWritable();
    const cs = this.cs;
    const aligned = Math.ceil(length / cs) * cs;
    if (aligned > length) await zeroTail(length, Math.min(aligned, this.header.size) - length);
    if (aligned < this.header.size) await unmap(aligned, this.header.size - aligned);
    await this.flushMetadata();
    await this.storage.flush();
    const keep = l1EntriesFor(length, this.clusterBits);
    const dropped: number[] = [];
    await this.l1Lock.run(async () => {
      for (let i = keep; i < this.header.l1Size; i++) {
        const off = this.l2Offset(i);
        if (off) dropped.push(off);
      }
      if (keep < this.header.l1Size) {
        this.l1.fill(0, keep * 8, this.header.l1Size * 8);
        await this.storage.write(
          this.l1Offset + keep * 8,
          this.l1.subarray(keep * 8, this.header.l1Size * 8),
        );
        await this.storage.flush();
      }
    });
    for (const off of dropped) {
      this.cache.drop(off);
      await this.refcounts.free(off, 1);
    }
    await this.storage.write(HeaderField.SIZE, u64Buffer(length));
    await this.refcounts.writeBack();
    await this.storage.flush();
    this.header.size = length;
    const last = await this.refcounts.lastUsedCluster();
    if ((last + 1) * cs < (await this.storage.length())) await this.storage.truncate((last + 1) * cs);
    this.refcounts.highWater = Math.min(this.refcounts.highWater, last + 1);
  }

  /** Sets or clears the lazy-refcounts compatible feature bit (qemu-img amend lazy_refcounts). */
  async setLazyRefcounts(on: boolean): Promise<void> {
    this.checkWritable();
    if (on && !this.v3)
      throw new BlockError(
        'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
        { errno: 'EINVAL' },
      );
    if (!this.v3) return;
    // Refcounts are always kept up to date here: they are durable before the bit changes.
    await this.flushMetadata();
    await this.storage.flush();
    const bits = on
      ? this.header.compatible | Compat.LAZY_REFCOUNTS
      : this.header.compatible & ~Compat.LAZY_REFCOUNTS;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(bits);
    await this.storage.write(HeaderField.COMPAT, b);
    await this.storage.flush();
    this.header.compatible = bits;
  }

  /** Makes the L1 table hold at least `entries` entries (a larger table elsewhere when needed). */
  async ensureL1(entries: number): Promise<void> {
    this.checkWritable();
    if (entries > this.header.l1Size) await this.l1Lock.run(() => this.growL1(entries));
  }

  /** Writes a new virtual size (a snapshot's, when it is applied); the L1 table grows if needed. */
  async setSize(length: number): Promise<void> {
    await this.ensureL1(l1EntriesFor(length, this.clusterBits));
    await this.storage.write(HeaderField.SIZE, u64Buffer(length));
    await this.storage.flush();
    this.header.size = length;
  }

  /** Grows the virtual size (a larger L1 table first when needed, then the size field). */
  async grow(length: number): Promise<void> {
    this.checkWritable();
    const need = l1EntriesFor(length, this.clusterBits);
    if (need > this.header.l1Size) await this.l1Lock.run(() => this.growL1(need));
    await this.storage.write(HeaderField.SIZE, u64Buffer(length));
    await this.storage.flush();
    this.header.size = length;
  }

  /** A larger L1 table: written, made durable, switched to in one header write, old one freed. */
  private async growL1(need: number): Promise<void> {
    const clusters = Math.ceil((need * 8) / this.cs);
    const off = await this.allocator.allocate(clusters);
    const l1 = Buffer.alloc(clusters * this.cs);
    this.l1.copy(l1);
    await this.storage.write(off, l1);
    await this.syncRefcounts();
    await this.storage.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(need, 0);
    writeU64(hdr, 4, off);
    await this.storage.write(HeaderField.L1_SIZE, hdr);
    await this.storage.flush();
    const oldOff = this.l1Offset;
    const oldClusters = Math.ceil((this.header.l1Size * 8) / this.cs);
    this.l1 = l1.subarray(0, need * 8);
    this.l1Offset = off;
    this.header.l1Size = need;
    this.header.l1TableOffset = off;
    if (oldClusters) await this.refcounts.free(oldOff, oldClusters);
  }
}

/** A number as C's %#x prints it (QEMU's messages): 0x-prefixed, but plain "0" for zero. */
export function hex(v: number): string {
  return v ? `0x${v.toString(16)}` : '0';
}

/**
 * Drops every mapping so the image reads as empty (through to its backing file), in time that
 * depends on the file's size in refcount blocks, not on the data: zero the L1 table (durable at
 * once), then count only the metadata left in every refcount block, in memory (written back
 * like any refcount change). A crash at any point leaves a consistent image: empty once the L1
 * write returned, with the dropped clusters at worst leaked.
 */
export async function makeImageEmpty(img: Qcow2Image): Promise<void> {
  img.checkWritable();
  if (img.header.nbSnapshots > 0) {
    throw new BlockError('qcow2: Cannot empty an image with internal snapshots', { errno: 'ENOTSUP' });
  }
  // Requests are drained by the generic layer; flushes and table write-backs are waited for here.
  await img.metadataLock.run(() => emptyLocked(img));
}

async function emptyLocked(img: Qcow2Image): Promise<void> {
  await img.cache.drainWrites();
  img.cache.clear();
  img.pendingFree = [];
  // Under the refcount mutex (no allocation interleaves) and with no refcount write in flight
  // (an older copy of a block landing after the rewrite would undo it).
  await img.refcounts.mutex.run(() => img.refcounts.writes.run(() => rewriteTables(img)));
}

async function rewriteTables(img: Qcow2Image): Promise<void> {
  const cs = img.cs;
  const storage = img.storage;
  img.l1.fill(0);
  // FUA, not a flush: the L1 table must be on disk before any lowered refcount is, but the data
  // written before makeEmpty need never be (a flush would write it all out first; measured, the
  // flushes were most of a COLO checkpoint's time).
  await storage.write(img.l1Offset, img.l1, true);
  const rc = img.refcounts;
  const counts = new Map<number, number>();
  const use = (off: number, bytes: number) => {
    for (let c = Math.floor(off / cs); c * cs < off + bytes; c++) counts.set(c, (counts.get(c) ?? 0) + 1);
  };
  use(0, cs);
  if (img.header.l1Size) use(img.l1Offset, img.header.l1Size * 8);
  use(rc.tableOffset, rc.tableClusters * cs);
  // Persistent bitmaps stay: their directory, tables and data are still in use.
  const ext = bitmapsExtension(img.header, cs);
  if (ext) use(ext.directoryOffset, ext.directorySize);
  for (const e of img.bitmapDir) for (const [off, n] of await entryClusters(img, e)) use(off, n * cs);
  const blocks = new Map<number, Buffer>();
  for (let i = 0; i < rc.tableEntries; i++) {
    const off = reftableEntryOffset(rc.table, i);
    if (off) {
      use(off, cs);
      blocks.set(i, Buffer.alloc(cs));
    }
  }
  for (const [c, n] of counts) {
    const b = blocks.get(Math.floor(c / rc.perBlock));
    if (b) refSet(b, c % rc.perBlock, rc.bits, n);
  }
  // Cutting the file costs time in proportion to the data on many filesystems (extent freeing,
  // discard), so the freed clusters are reused in place and the file is trimmed on close.
  rc.replaceAll(blocks, await storage.length());
  img.trimOnClose = true;
}
