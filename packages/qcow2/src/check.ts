import {
  BlockError,
  ChildRole,
  errnoText,
  ImageLocks,
  PERM_ALL,
  Perm,
  storageChildPerm,
  toBlockError,
} from '@blockrep/block';
import { dropStaleBitmaps, openBitmaps } from './bitmaps';
import { ClusterType, compressedExtent, entryOffset, entryType } from './cluster';
import { Ext, HeaderField, Incompat, parseHeader, type Qcow2Header, writeU64 } from './header';
import { entryAligned, refGet, refMax, refSet, reftableEntryOffset } from './refcount';
import { FileStorage, type Qcow2Storage, readBuf } from './storage';

/*
 * Consistency check and repair (qemu-img check), in QEMU 7.2's steps and words
 * (qcow2_check_refcounts): count every reference the metadata makes (header, L1/L2 of the active
 * image and of each snapshot, the snapshot table, the refcount structures, bitmaps), compare with
 * the stored refcounts (stored > counted: a leak; stored < counted: a corruption; stored 0 for a
 * cluster in use: the refcount structure must be rebuilt), then check the COPIED flags. A
 * reference reaching a cluster or more past the end of the file is reported and not counted, so
 * memory and time stay bounded by the file, whatever the metadata claims.
 */

export interface Qcow2CheckOptions {
  /** Fix leaks ('leaks') or also refcounts that are too low ('all'). */
  repair?: 'leaks' | 'all';
  /** Check an image another process may be writing (no image locks, as qemu-img check -U). */
  forceShare?: boolean;
}

/** Shaped like `qemu-img check --output=json` (fields that are zero are left out as QEMU does). */
export interface Qcow2CheckResult {
  'image-end-offset'?: number;
  'total-clusters': number;
  'check-errors': number;
  leaks?: number;
  'leaks-fixed'?: number;
  corruptions?: number;
  'corruptions-fixed'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  filename: string;
  format: 'qcow2';
  /** What was found, one line each, as qemu-img check prints them (on stderr). */
  messages: string[];
  /** Indices of the messages QEMU prints as errors of the program ("qemu-img: ERROR ..."). */
  reported?: number[];
  /** The check could not finish ("Check failed: <this>"): the errno's text. */
  failed?: string;
}

const COPIED = 0x80000000;
/** Bits of an L1 entry that must be zero (QEMU's L1E_RESERVED_MASK), on the high word. */
const L1E_RESERVED_HI = 0x7f000000;
const L1E_RESERVED_LO = 0x1ff;
const L2E_RESERVED_HI = 0x3f000000;
const L2E_RESERVED_LO = 0x1fe;
const REFT_RESERVED_LO = 0x1ff;

/** A 64-bit entry in hex as QEMU prints PRIx64: exact, whatever its size. */
function hex64(buf: Buffer, at: number): string {
  return buf.readBigUInt64BE(at).toString(16);
}

/** References per host cluster (QEMU's in-memory refcount table), growing as references come. */
class Counts {
  a: Uint32Array;

  constructor(clusters: number) {
    this.a = new Uint32Array(Math.max(16, clusters));
  }

  get(c: number): number {
    return c < this.a.length ? this.a[c]! : 0;
  }

  set(c: number, v: number): void {
    this.grow(c + 1);
    this.a[c] = v;
  }

  grow(n: number): void {
    if (n <= this.a.length) return;
    const g = new Uint32Array(Math.max(n, this.a.length * 2));
    g.set(this.a);
    this.a = g;
  }
}

interface Fix {
  leaks: boolean;
  errors: boolean;
}

interface Res {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  leaksFixed: number;
  corruptionsFixed: number;
  allocated: number;
  fragmented: number;
  compressed: number;
}

const noFix: Fix = { leaks: false, errors: false };

class FailedCheck extends Error {
  constructor(readonly errno: BlockError['errno']) {
    super(errnoText(errno));
  }
}

/** One check run over an open file: the header, the stored refcounts, and what was found. */
class Checker {
  readonly cs: number;
  bits: number;
  perBlock: number;
  max: number;
  nbClusters: number;
  refs: Counts;
  res: Res = emptyRes();
  readonly messages: string[] = [];
  readonly reported: number[] = [];
  /** Stored refcount blocks by offset (read once; repairs change them here and write them). */
  private readonly blocks = new Map<number, Buffer>();
  reftable: Buffer;
  l1: Buffer;
  snapshots: SnapshotEntry[] = [];
  snapshotsSize = 0;
  /** Snapshot table entries found incomplete (a repair rewrites the table). */
  snapshotCorruptions = 0;

  constructor(
    readonly s: Qcow2Storage,
    readonly h: Qcow2Header,
    public fileLength: number,
    reftable: Buffer,
    l1: Buffer,
  ) {
    this.cs = 2 ** h.clusterBits;
    this.bits = 2 ** h.refcountOrder;
    this.perBlock = (this.cs * 8) / this.bits;
    this.max = refMax(this.bits);
    this.nbClusters = Math.ceil(fileLength / this.cs);
    this.refs = new Counts(this.nbClusters);
    this.reftable = reftable;
    this.l1 = l1;
  }

  say(line: string): void {
    this.messages.push(line);
  }

  /** A line QEMU prints through error_report (the program's name in front). */
  report(line: string): void {
    this.reported.push(this.messages.length);
    this.messages.push(line);
  }

  /** QEMU's qcow2_inc_refcounts_imrt. */
  inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.fileLength >= this.cs) {
      this.say(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`,
      );
      this.res.corruptions++;
      return;
    }
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let c = Math.floor(offset / this.cs); c <= last; c++) {
      if (c >= this.nbClusters) {
        this.refs.grow(c + 1);
        this.nbClusters = c + 1;
      }
      const v = this.refs.get(c);
      if (v >= this.max) {
        this.say(`ERROR: overflow cluster offset=0x${(c * this.cs).toString(16)}`);
        this.say(
          'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
        );
        this.res.corruptions++;
        continue;
      }
      this.refs.set(c, v + 1);
    }
  }

  private async read(offset: number, bytes: number): Promise<Buffer> {
    return readBuf(this.s, offset, bytes);
  }

  /** The stored refcount of a cluster (QEMU's qcow2_get_refcount); null when it cannot be read. */
  async stored(c: number): Promise<number | null> {
    const bi = Math.floor(c / this.perBlock);
    if (bi >= this.reftable.length / 8) return 0;
    const off = reftableEntryOffset(this.reftable, bi);
    if (!off) return 0;
    if (!entryAligned(this.reftable, bi, this.cs)) return null;
    const b = await this.block(off);
    return b ? refGet(b, c % this.perBlock, this.bits) : null;
  }

  private async block(off: number): Promise<Buffer | null> {
    let b = this.blocks.get(off);
    if (!b) {
      try {
        b = await this.read(off, this.cs);
      } catch {
        return null;
      }
      this.blocks.set(off, b);
    }
    return b;
  }

  /** Adds delta to a stored refcount and writes its sector (a repair). */
  async adjust(c: number, delta: number): Promise<boolean> {
    const bi = Math.floor(c / this.perBlock);
    if (bi >= this.reftable.length / 8) return false;
    const off = reftableEntryOffset(this.reftable, bi);
    if (!off || !entryAligned(this.reftable, bi, this.cs)) return false;
    const b = await this.block(off);
    if (!b) return false;
    const i = c % this.perBlock;
    const v = refGet(b, i, this.bits) + delta;
    if (v < 0 || v > this.max) return false;
    refSet(b, i, this.bits, v);
    const start = Math.floor((i * this.bits) / 8 / 512) * 512;
    await this.s.write(off + start, b.subarray(start, Math.min(this.cs, start + 512)));
    return true;
  }

  // ---- counting (QEMU's calculate_refcounts) ----

  async calculate(fix: Fix): Promise<{ rebuild: boolean }> {
    const h = this.h;
    this.inc(0, this.cs);
    await this.checkL1(h.l1TableOffset, h.l1Size, true, fix);
    for (const sn of this.snapshots) {
      if (sn.l1Offset % BigInt(this.cs)) {
        this.say(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1Offset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > (32 << 20) / 8) {
        this.say(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(Number(sn.l1Offset), sn.l1Size, false, fix);
    }
    this.inc(h.snapshotsOffset, this.snapshotsSize);
    this.inc(h.refcountTableOffset, h.refcountTableClusters * this.cs);
    await this.countBitmaps();
    return this.checkRefblocks(fix);
  }

  private async checkL1(offset: number, size: number, active: boolean, fix: Fix): Promise<void> {
    if (!size) return;
    this.inc(offset, size * 8);
    let l1: Buffer;
    try {
      // Entries past the end of the file are zero: only those in it are read.
      l1 = active
        ? this.l1
        : await this.read(offset, Math.max(0, Math.min(size * 8, this.fileLength - offset)));
    } catch {
      this.say('ERROR: I/O error in check_refcounts_l1');
      this.res.checkErrors++;
      throw new FailedCheck('EIO');
    }
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (!hi && !lo) continue;
      if (hi & L1E_RESERVED_HI || lo & L1E_RESERVED_LO) {
        this.say(`ERROR found L1 entry with reserved bits set: ${hex64(l1, i * 8)}`);
        this.res.corruptions++;
      }
      const l2 = entryOffset(hi, lo);
      this.inc(l2, this.cs);
      if (!entryAligned(l1, i, this.cs)) {
        this.say(`ERROR l2_offset=${l2.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2, active, fix);
    }
  }

  /** An L2 table's entries; one wholly past the end of the file reads as zeroes (nothing in it). */
  private async checkL2(l2off: number, active: boolean, fix: Fix): Promise<void> {
    if (l2off >= this.fileLength) return;
    let t: Buffer;
    try {
      t = await this.read(l2off, this.cs);
    } catch {
      this.say('ERROR: I/O error in check_refcounts_l2');
      this.res.checkErrors++;
      throw new FailedCheck('EIO');
    }
    let nextContiguous = 0;
    let dirty = false;
    for (let k = 0; k < this.cs / 8; k++) {
      const hi = t.readUInt32BE(k * 8);
      const lo = t.readUInt32BE(k * 8 + 4);
      const type = entryType(hi, lo);
      if (type !== ClusterType.COMPRESSED && (hi & L2E_RESERVED_HI || lo & L2E_RESERVED_LO)) {
        this.say(`ERROR found l2 entry with reserved bits set: ${hex64(t, k * 8)}`);
        this.res.corruptions++;
      }
      if (type === ClusterType.COMPRESSED) {
        if (hi & COPIED) {
          const { offset } = compressedExtent(hi & ~COPIED, lo, this.h.clusterBits);
          this.say(
            `ERROR: coffset=0x${offset.toString(16)}: copied flag must never be set for compressed clusters`,
          );
          this.res.corruptions++;
        }
        const { offset, bytes } = compressedExtent(hi & ~COPIED, lo, this.h.clusterBits);
        this.inc(offset, bytes);
        if (active) {
          this.res.allocated++;
          this.res.compressed++;
          this.res.fragmented++;
        }
      } else if (type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC) {
        const off = entryOffset(hi, lo);
        if (!entryAligned(t, k, this.cs)) {
          this.res.corruptions++;
          if (type === ClusterType.ZERO_ALLOC) {
            this.say(
              `${fix.errors ? 'Repairing' : 'ERROR'} offset=${off.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
            );
            if (fix.errors) {
              // A plain zero cluster now: nothing to count.
              t.writeUInt32BE(0, k * 8);
              t.writeUInt32BE(1, k * 8 + 4);
              dirty = true;
              this.res.corruptions--;
              this.res.corruptionsFixed++;
              continue;
            }
          } else {
            this.say(
              `ERROR offset=${off.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`,
            );
          }
        }
        if (active) {
          this.res.allocated++;
          if (nextContiguous && off !== nextContiguous) this.res.fragmented++;
          nextContiguous = off + this.cs;
        }
        this.inc(off, this.cs);
      }
    }
    if (dirty) await this.s.write(l2off, t);
  }

  /** Bitmaps (when the autoclear bit says the extension is valid): directory, tables and data. */
  private async countBitmaps(): Promise<void> {
    const h = this.h;
    if (!(h.autoclear & 1n)) return;
    const ext = h.extensions.find((e) => e.type === Ext.BITMAPS);
    if (!ext || ext.data.length < 24) return;
    const nb = ext.data.readUInt32BE(0);
    const dirSize = Number(ext.data.readBigUInt64BE(8));
    const dirOff = Number(ext.data.readBigUInt64BE(16));
    this.inc(dirOff, dirSize);
    if (dirOff >= this.fileLength) return;
    const dir = await this.read(dirOff, Math.min(dirSize, this.fileLength - dirOff));
    let p = 0;
    for (let i = 0; i < nb && p + 24 <= dir.length; i++) {
      const tOff = Number(dir.readBigUInt64BE(p) & 0x00fffffffffffe00n);
      const tSize = dir.readUInt32BE(p + 8);
      const nameLen = dir.readUInt16BE(p + 18);
      const extra = dir.readUInt32BE(p + 20);
      if (tOff && tSize) {
        this.inc(tOff, tSize * 8);
        if (tOff < this.fileLength) {
          const t = await this.read(tOff, Math.min(tSize * 8, this.fileLength - tOff));
          for (let k = 0; k + 8 <= t.length; k += 8) {
            const off = Number(t.readBigUInt64BE(k) & 0x00fffffffffffe00n);
            if (off) this.inc(off, this.cs);
          }
        }
      }
      p = Math.ceil((p + 24 + extra + nameLen) / 8) * 8;
    }
  }

  /** QEMU's check_refblocks: every refcount table entry sane, each block counted once. */
  private async checkRefblocks(fix: Fix): Promise<{ rebuild: boolean }> {
    let rebuild = false;
    for (let i = 0; i < this.reftable.length / 8; i++) {
      const lo = this.reftable.readUInt32BE(i * 8 + 4);
      const off = reftableEntryOffset(this.reftable, i);
      if (lo & REFT_RESERVED_LO) {
        this.say(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        rebuild = true;
        continue;
      }
      if (!entryAligned(this.reftable, i, this.cs)) {
        this.say(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        rebuild = true;
        continue;
      }
      const c = off / this.cs;
      if (c >= this.nbClusters) {
        this.res.corruptions++;
        this.say(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (fix.errors) {
          // Make the file long enough for the block (it reads as zeroes), if it can be.
          try {
            if (off > 2 ** 63 - 1 - this.cs || off + this.cs > Number.MAX_SAFE_INTEGER) {
              throw new FailedCheck('EINVAL');
            }
            await this.s.truncate(off + this.cs);
          } catch (e) {
            const errno = e instanceof FailedCheck ? e.errno : toBlockError(e).errno;
            rebuild = true;
            this.say(`ERROR could not resize image: ${errnoText(errno)}`);
            continue;
          }
          this.fileLength = off + this.cs;
          this.nbClusters = c + 1;
          this.refs.grow(this.nbClusters);
          this.res.corruptions--;
          this.res.corruptionsFixed++;
          this.inc(off, this.cs);
        }
        continue;
      }
      if (off) {
        this.inc(off, this.cs);
        if (this.refs.get(c) !== 1) {
          this.say(`ERROR refcount block ${i} refcount=${this.refs.get(c)}`);
          this.res.corruptions++;
          rebuild = true;
        }
      }
    }
    return { rebuild };
  }

  // ---- comparing (QEMU's compare_refcounts) ----

  async compare(fix: Fix): Promise<{ rebuild: boolean; highest: number }> {
    let rebuild = false;
    let highest = 0;
    for (let i = 0; i < this.nbClusters; i++) {
      const stored = await this.stored(i);
      if (stored === null) {
        this.say(`Can't get refcount for cluster ${i}: Input/output error`);
        this.res.checkErrors++;
        continue;
      }
      const want = this.refs.get(i);
      if (stored > 0 || want > 0) highest = i;
      if (stored === want) continue;
      let fixed: 'leaks' | 'corruptions' | null = null;
      if (stored === 0) rebuild = true;
      else if (stored > want && fix.leaks) fixed = 'leaks';
      else if (stored < want && fix.errors) fixed = 'corruptions';
      this.say(
        `${fixed ? 'Repairing' : stored < want ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${stored} reference=${want}`,
      );
      if (fixed && (await this.adjust(i, want - stored))) {
        if (fixed === 'leaks') this.res.leaksFixed++;
        else this.res.corruptionsFixed++;
        continue;
      }
      if (stored < want) this.res.corruptions++;
      else this.res.leaks++;
    }
    return { rebuild, highest };
  }

  // ---- OFLAG_COPIED (QEMU's check_oflag_copied) ----

  async checkOflagCopied(fix: Fix): Promise<void> {
    const repair =
      fix.errors || (fix.leaks && !this.res.checkErrors && !this.res.corruptions && !this.res.leaks);
    const l1 = this.l1;
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const l2off = entryOffset(hi, lo);
      if (!l2off) continue;
      const rc = await this.stored(Math.floor(l2off / this.cs));
      if (rc === null) continue;
      if ((rc === 1) !== ((hi & COPIED) !== 0)) {
        this.res.corruptions++;
        this.say(
          `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(l1, i * 8)} refcount=${rc}`,
        );
        if (repair) {
          l1.writeUInt32BE(rc === 1 ? (hi | COPIED) >>> 0 : hi & ~COPIED, i * 8);
          await this.s.write(this.h.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      if (l2off >= this.fileLength) continue;
      const t = await this.read(l2off, this.cs);
      let dirty = 0;
      for (let k = 0; k < this.cs / 8; k++) {
        const ehi = t.readUInt32BE(k * 8);
        const elo = t.readUInt32BE(k * 8 + 4);
        const type = entryType(ehi, elo);
        if (type !== ClusterType.NORMAL && type !== ClusterType.ZERO_ALLOC) continue;
        const drc = await this.stored(Math.floor(entryOffset(ehi, elo) / this.cs));
        if (drc === null) continue;
        if ((drc === 1) !== ((ehi & COPIED) !== 0)) {
          this.res.corruptions++;
          this.say(
            `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(t, k * 8)} refcount=${drc}`,
          );
          if (repair) {
            t.writeUInt32BE(drc === 1 ? (ehi | COPIED) >>> 0 : ehi & ~COPIED, k * 8);
            dirty++;
          }
        }
      }
      if (dirty) {
        await this.s.write(l2off, t);
        this.res.corruptions -= dirty;
        this.res.corruptionsFixed += dirty;
      }
    }
  }

  // ---- rebuilding (QEMU's rebuild_refcount_structure) ----

  /**
   * Writes new refcount blocks and a new refcount table for the references counted (placed in
   * clusters no reference uses, first fit from the start), then points the header at them.
   */
  async rebuild(): Promise<void> {
    const cs = this.cs;
    let firstFree = 0;
    const alloc = (n: number): number => {
      let c = firstFree;
      let run = 0;
      let first = true;
      for (; c < this.nbClusters && run < n; c++) {
        if (!this.refs.get(c)) {
          run++;
          if (first) {
            firstFree = c;
            first = false;
          }
        } else run = 0;
      }
      if (run < n) {
        this.refs.grow(c + n - run);
        this.nbClusters = Math.max(this.nbClusters, c + n - run);
      }
      const start = c - run;
      for (let k = 0; k < n; k++) this.refs.set(start + k, 1);
      this.nbClusters = Math.max(this.nbClusters, start + n);
      return start;
    };
    // Refcount blocks for every range that counts something; then the table, which may need more.
    const blocks = new Map<number, number>();
    let tableClusters = 0;
    let tableAt = -1;
    for (;;) {
      const nBlocks = Math.ceil(this.nbClusters / this.perBlock);
      let added = false;
      for (let bi = 0; bi < nBlocks; bi++) {
        if (blocks.has(bi)) continue;
        let used = false;
        for (let c = bi * this.perBlock; c < Math.min(this.nbClusters, (bi + 1) * this.perBlock); c++) {
          if (this.refs.get(c)) {
            used = true;
            break;
          }
        }
        if (!used) continue;
        blocks.set(bi, alloc(1));
        added = true;
      }
      const entries = Math.max(...blocks.keys(), 0) + 1;
      const need = Math.ceil((entries * 8) / cs);
      if (need !== tableClusters) {
        tableClusters = need;
        tableAt = alloc(need);
        added = true;
      }
      if (!added) break;
    }
    for (const [bi, c] of blocks) {
      const b = Buffer.alloc(cs);
      for (let k = 0; k < this.perBlock; k++) {
        const v = this.refs.get(bi * this.perBlock + k);
        if (v) refSet(b, k, this.bits, Math.min(v, this.max));
      }
      await this.s.write(c * cs, b);
    }
    const table = Buffer.alloc(tableClusters * cs);
    for (const [bi, c] of blocks) writeU64(table, bi * 8, c * cs);
    await this.s.write(tableAt * cs, table);
    await this.s.flush();
    const hdr = Buffer.alloc(12);
    writeU64(hdr, 0, tableAt * cs);
    hdr.writeUInt32BE(tableClusters, 8);
    await this.s.write(HeaderField.REFTABLE_OFFSET, hdr);
    await this.s.flush();
    this.h.refcountTableOffset = tableAt * cs;
    this.h.refcountTableClusters = tableClusters;
    this.reftable = table;
    this.blocks.clear();
    // The new structures may have grown the file.
    this.fileLength = await this.s.length();
    this.nbClusters = Math.max(this.nbClusters, Math.ceil(this.fileLength / cs));
  }

  /** From now on refcounts are `bits` wide (the next rebuild writes them so). */
  setWidth(bits: number): void {
    this.bits = bits;
    this.perBlock = (this.cs * 8) / bits;
    this.max = refMax(bits);
    this.blocks.clear();
  }

  /** Counts again from scratch (after a rebuild moved the refcount structures). */
  resetCounts(): void {
    this.refs = new Counts(this.nbClusters);
  }
}

function emptyRes(): Res {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    leaksFixed: 0,
    corruptionsFixed: 0,
    allocated: 0,
    fragmented: 0,
    compressed: 0,
  };
}

/** Checks (and optionally repairs) the qcow2 image at path. */
export async function checkQcow2Image(path: string, opts: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const s = await FileStorage.open(path, opts.repair ? 'r+' : 'r');
  try {
    if (!opts.forceShare) {
      // The image locks of the file under a qcow2 reader (or repairer, which writes metadata).
      const role = ChildRole.DATA | ChildRole.METADATA;
      const [perm, shared] = storageChildPerm(role, Perm.CONSISTENT_READ, PERM_ALL, !opts.repair);
      new ImageLocks(s.fd, path).apply(perm, shared);
    }
    return await checkStorage(s, opts);
  } finally {
    await s.close();
  }
}

/** One snapshot table entry, with what a rewrite of the table needs. */
interface SnapshotEntry {
  l1Offset: bigint;
  l1Size: number;
  id: string;
  name: string;
  /** The fixed part of the entry, as read (dates, clock, 32-bit VM state size). */
  fixed: Buffer;
  /** The extra data, as read. */
  extra: Buffer;
}

/** The snapshot table, read as QEMU's check does (qcow2_check_read_snapshot_table). */
async function readSnapshots(c: Checker, fix: Fix): Promise<void> {
  const h = c.h;
  if (!h.nbSnapshots) return;
  let count = h.nbSnapshots;
  if (count > 65536) {
    if (!fix.errors) {
      c.report('ERROR snapshot table too large');
      c.say(`You can force-remove all ${count - 65536} overhanging snapshots with qemu-img check -r all`);
      c.res.checkErrors++;
      throw new FailedCheck('EFBIG');
    }
    c.say(`Discarding ${count - 65536} overhanging snapshots`);
    count = 65536;
    c.snapshotCorruptions++;
  }
  if (2 ** 63 - 1 - count * 40 < h.snapshotsOffset || h.snapshotsOffset % c.cs) {
    c.report('ERROR snapshot table offset invalid');
    c.res.checkErrors++;
    throw new FailedCheck('EINVAL');
  }
  let pos = h.snapshotsOffset;
  for (let i = 0; i < count; i++) {
    let fixed: Buffer;
    try {
      fixed = await readBuf(c.s, pos, 40);
    } catch (e) {
      const text = errnoText(toBlockError(e).errno);
      c.report(`ERROR failed to read the snapshot table: Failed to read snapshot table: ${text}`);
      c.res.checkErrors++;
      throw new FailedCheck(toBlockError(e).errno);
    }
    const idLen = fixed.readUInt16BE(12);
    const nameLen = fixed.readUInt16BE(14);
    const extraLen = fixed.readUInt32BE(36);
    const extra = await readBuf(c.s, pos + 40, extraLen);
    const strings = await readBuf(c.s, pos + 40 + extraLen, idLen + nameLen);
    c.snapshots.push({
      l1Offset: fixed.readBigUInt64BE(0),
      l1Size: fixed.readUInt32BE(8),
      id: strings.toString('utf8', 0, idLen),
      name: strings.toString('utf8', idLen),
      fixed,
      extra,
    });
    pos = Math.ceil((pos + 40 + extraLen + idLen + nameLen) / 8) * 8;
  }
  c.snapshotsSize = pos - h.snapshotsOffset;
  // An entry without the 64-bit VM state size and the disk size is incomplete.
  for (const [i, sn] of c.snapshots.entries()) {
    if (sn.extra.length < 16) {
      c.snapshotCorruptions++;
      c.say(`${fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    }
  }
}

/** The snapshot table as QEMU writes it (qcow2_write_snapshots): every entry complete. */
function snapshotTable(c: Checker): Buffer {
  const parts: Buffer[] = [];
  for (const sn of c.snapshots) {
    const extra = Buffer.alloc(Math.max(24, sn.extra.length));
    sn.extra.copy(extra);
    if (sn.extra.length < 8) extra.writeBigUInt64BE(BigInt(sn.fixed.readUInt32BE(32)), 0);
    if (sn.extra.length < 16) extra.writeBigUInt64BE(BigInt(c.h.size), 8);
    if (sn.extra.length < 24) extra.writeBigInt64BE(-1n, 16);
    const id = Buffer.from(sn.id);
    const name = Buffer.from(sn.name);
    const fixed = Buffer.from(sn.fixed);
    fixed.writeUInt16BE(id.length, 12);
    fixed.writeUInt16BE(name.length, 14);
    fixed.writeUInt32BE(extra.length, 36);
    const len = 40 + extra.length + id.length + name.length;
    parts.push(fixed, extra, id, name, Buffer.alloc(Math.ceil(len / 8) * 8 - len));
  }
  return Buffer.concat(parts);
}

/**
 * Rewrites the snapshot table in free clusters (first fit), points the header at it and gives
 * the old table's clusters back (QEMU's qcow2_check_fix_snapshot_table).
 */
async function fixSnapshotTable(c: Checker): Promise<void> {
  const table = snapshotTable(c);
  const n = Math.max(1, Math.ceil(table.length / c.cs));
  let start = 0;
  for (let run = 0; run < n; start++) {
    const rc = await c.stored(start + run);
    if (rc === 0) run++;
    else {
      start += run;
      run = 0;
    }
    if (run === n) break;
  }
  for (let k = 0; k < n; k++) await c.adjust(start + k, 1);
  await c.s.write(start * c.cs, table);
  await c.s.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(c.snapshots.length, 0);
  writeU64(hdr, 4, start * c.cs);
  await c.s.write(60, hdr);
  await c.s.flush();
  const old = c.h.snapshotsOffset;
  if (c.snapshotsSize > 0) {
    const first = Math.floor(old / c.cs);
    const last = Math.floor((old + c.snapshotsSize - 1) / c.cs);
    // An old table past the end of the file holds no counted cluster: QEMU's free fails so.
    if (last >= c.nbClusters) c.say('qcow2_free_clusters failed: Invalid argument');
    else for (let k = first; k <= last; k++) await c.adjust(k, -1);
  }
  c.h.snapshotsOffset = start * c.cs;
  c.h.nbSnapshots = c.snapshots.length;
}

/** A checker over the image in the storage: its header, refcount table and L1 table read. */
async function openChecker(s: Qcow2Storage): Promise<Checker> {
  const fileLength = await s.length();
  let h = parseHeader(await readBuf(s, 0, Math.min(fileLength, 65536)), fileLength, { check: true });
  const cs = 2 ** h.clusterBits;
  if (cs > 65536) h = parseHeader(await readBuf(s, 0, Math.min(fileLength, cs)), fileLength, { check: true });
  await openBitmaps(s, h);
  // Tables past the end of the file read as zeroes: only what the file holds is read.
  const inFile = (offset: number, bytes: number) => Math.max(0, Math.min(bytes, fileLength - offset));
  const reftable = await readBuf(
    s,
    h.refcountTableOffset,
    inFile(h.refcountTableOffset, h.refcountTableClusters * cs),
  );
  const l1 = await readBuf(s, h.l1TableOffset, inFile(h.l1TableOffset, h.l1Size * 8));
  return new Checker(s, h, fileLength, reftable, l1);
}

/**
 * qemu-img amend -o refcount_bits=N (a version 3 image, not open elsewhere): the references are
 * counted from the metadata, refcount structures of the new width written where nothing is, the
 * header pointed at them, and the old structures freed. A refcount the new width cannot hold is
 * refused first, with QEMU's text.
 */
export async function changeRefcountWidth(s: Qcow2Storage, bits: number): Promise<void> {
  const c = await openChecker(s);
  if (c.bits === bits) return;
  await readSnapshots(c, noFix);
  await c.calculate(noFix);
  const max = refMax(bits);
  for (let cl = 0; cl < c.nbClusters; cl++) {
    const v = c.refs.get(cl);
    if (v > max) {
      throw new BlockError(
        `Cannot decrease refcount entry width to ${bits} bits: Cluster at offset 0x${(cl * c.cs).toString(16)} has a refcount of ${v}`,
        { errno: 'EINVAL' },
      );
    }
  }
  c.setWidth(bits);
  await c.rebuild();
  const order = Buffer.alloc(4);
  order.writeUInt32BE(Math.log2(bits));
  await s.write(96, order);
  await s.flush();
  c.h.refcountOrder = Math.log2(bits);
  // Count again without the old structures: what they held is leaked now, and freed.
  c.resetCounts();
  await c.calculate(noFix);
  c.res = emptyRes();
  await c.compare({ leaks: true, errors: false });
  await s.flush();
}

/** changeRefcountWidth on the image file at path, holding QEMU's image locks of a writer meanwhile. */
export async function changeRefcountWidthAt(path: string, bits: number): Promise<void> {
  const s = await FileStorage.open(path, 'r+');
  try {
    const role = ChildRole.DATA | ChildRole.METADATA;
    const [perm, shared] = storageChildPerm(
      role,
      Perm.CONSISTENT_READ | Perm.WRITE,
      Perm.CONSISTENT_READ,
      false,
    );
    new ImageLocks(s.fd, path).apply(perm, shared);
    await changeRefcountWidth(s, bits);
  } finally {
    await s.close();
  }
}

/** The check itself, on an open file (also the repair run at open for a dirty image). */
export async function checkStorage(s: Qcow2Storage, opts: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const fix: Fix = { leaks: !!opts.repair, errors: opts.repair === 'all' };
  const c = await openChecker(s);
  const h = c.h;
  const cs = c.cs;
  for (const [i, w] of h.warnings.entries()) i === 0 ? c.report(`warning: ${w}`) : c.say(w);
  let highest = 0;
  let failed: string | undefined;
  try {
    await readSnapshots(c, fix);
    let { rebuild } = await c.calculate(fix);
    const pre = { ...c.res };
    const first = await c.compare(noFix);
    rebuild ||= first.rebuild;
    highest = first.highest;
    if (rebuild && fix.errors) {
      const old = { ...c.res };
      c.say('Rebuilding refcount structure');
      await c.rebuild();
      c.res.corruptions = 0;
      c.res.leaks = 0;
      c.resetCounts();
      await c.calculate(noFix);
      // The old structures are leaked now: freed, and what the rebuild leaked itself is counted.
      const saved = c.res;
      c.res = emptyRes();
      const again = await c.compare({ leaks: true, errors: false });
      highest = again.highest;
      if (again.rebuild) c.say('ERROR rebuilt refcount structure is still broken');
      const freshLeaks = c.res.leaks;
      c.res = saved;
      if (c.res.corruptions < old.corruptions) c.res.corruptionsFixed += old.corruptions - c.res.corruptions;
      if (c.res.leaks < old.leaks) c.res.leaksFixed += old.leaks - c.res.leaks;
      c.res.leaks += freshLeaks;
    } else if (fix.leaks) {
      if (rebuild) {
        c.say('ERROR need to rebuild refcount structures');
        c.res.checkErrors++;
        throw new FailedCheck('EIO');
      }
      if (c.res.leaks || c.res.corruptions) {
        c.res = pre;
        ({ highest } = await c.compare(fix));
      }
    }
    await c.checkOflagCopied(fix);
    if (c.snapshotCorruptions && fix.errors) {
      await fixSnapshotTable(c);
      c.res.corruptionsFixed += c.snapshotCorruptions;
    } else c.res.corruptions += c.snapshotCorruptions;
    if (fix.leaks) await s.flush();
  } catch (e) {
    if (!(e instanceof FailedCheck)) throw e;
    failed = e.message;
  }
  if (fix.leaks) await markClean(s, h, !failed && !c.res.checkErrors && !c.res.corruptions);
  const r = c.res;
  const res: Qcow2CheckResult = {
    'total-clusters': Math.ceil(h.size / cs),
    'check-errors': r.checkErrors,
    filename: s.filename,
    format: 'qcow2',
    messages: c.messages,
  };
  if (!failed) res['image-end-offset'] = (highest + 1) * cs;
  if (r.leaks) res.leaks = r.leaks;
  if (r.leaksFixed) res['leaks-fixed'] = r.leaksFixed;
  if (r.corruptions) res.corruptions = r.corruptions;
  if (r.corruptionsFixed) res['corruptions-fixed'] = r.corruptionsFixed;
  if (r.allocated) res['allocated-clusters'] = r.allocated;
  if (r.fragmented) res['fragmented-clusters'] = r.fragmented;
  if (r.compressed) res['compressed-clusters'] = r.compressed;
  if (failed) res.failed = failed;
  if (c.reported.length) res.reported = c.reported;
  return res;
}

/**
 * After a repair run (the image was open for writing): the dirty bit goes (QEMU clears it when it
 * closes the image, whatever the check found), the corrupt bit only when nothing is left to fix,
 * and unknown autoclear bits are cleared as by any writer.
 */
async function markClean(s: Qcow2Storage, h: Qcow2Header, consistent: boolean): Promise<void> {
  await dropStaleBitmaps(s, h);
  if (h.version !== 3) return;
  let incompat = h.incompatible & ~Incompat.DIRTY;
  if (consistent) incompat &= ~Incompat.CORRUPT;
  if (incompat !== h.incompatible) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(incompat);
    await s.write(HeaderField.INCOMPAT, b);
  }
  // Bitmaps (bit 0) and raw external data (bit 1) are known; the rest is cleared.
  const autoclear = h.autoclear & 3n;
  if (autoclear !== h.autoclear) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(autoclear);
    await s.write(HeaderField.AUTOCLEAR, b);
  }
  await s.flush();
}
