import { BlockError } from './errors';
import type { BlockNode } from './node';

function popcount(v: number): number {
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/**
 * A dirty bitmap: one bit per `granularity` bytes of a node, set by every write through the node
 * while enabled. Word-at-a-time operations; no per-byte loops.
 */
export class DirtyBitmap {
  private words: Uint32Array;
  private bitCount = 0;
  private nbits: number;
  enabled = true;
  /** In use by an operation (a job, an export): cannot be changed or removed. */
  busy = false;
  persistent = false;
  inconsistent = false;

  constructor(
    public length: number,
    readonly granularity: number,
    readonly name?: string,
  ) {
    if (
      !Number.isInteger(granularity) ||
      granularity < 512 ||
      granularity > 2 ** 31 ||
      granularity & (granularity - 1)
    ) {
      throw new BlockError('Granularity must be power of 2 between 512 and 2147483648');
    }
    this.nbits = Math.ceil(length / granularity);
    this.words = new Uint32Array(Math.ceil(this.nbits / 32));
  }

  /** Dirty bytes (set bits times granularity, capped at the length). */
  count(): number {
    if (this.bitCount === 0) return 0;
    const lastBitSet = this.isBitSet(this.nbits - 1);
    const tailShort = this.nbits * this.granularity - this.length;
    return this.bitCount * this.granularity - (lastBitSet ? tailShort : 0);
  }

  private isBitSet(bit: number): boolean {
    return bit >= 0 && bit < this.nbits && (this.words[bit >>> 5]! & (1 << (bit & 31))) !== 0;
  }

  isDirty(offset: number): boolean {
    return this.isBitSet(Math.floor(offset / this.granularity));
  }

  private bitRange(offset: number, bytes: number): [number, number] {
    const start = Math.floor(Math.max(0, offset) / this.granularity);
    const end = Math.min(this.nbits, Math.ceil(Math.min(offset + bytes, this.length) / this.granularity));
    return [start, end];
  }

  private apply(startBit: number, endBit: number, set: boolean): void {
    let b = startBit;
    while (b < endBit) {
      const w = b >>> 5;
      const lo = b & 31;
      const hi = Math.min(32, lo + (endBit - b));
      const mask = hi - lo === 32 ? 0xffffffff : (((1 << (hi - lo)) - 1) << lo) >>> 0;
      const old = this.words[w]!;
      const nv = set ? (old | mask) >>> 0 : (old & ~mask) >>> 0;
      this.bitCount += popcount(nv) - popcount(old);
      this.words[w] = nv;
      b += hi - lo;
    }
  }

  /** Marks [offset, offset+bytes) dirty (every granule it touches). */
  set(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const [s, e] = this.bitRange(offset, bytes);
    this.apply(s, e, true);
  }

  /** Marks [offset, offset+bytes) clean (every granule it touches). */
  reset(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const [s, e] = this.bitRange(offset, bytes);
    this.apply(s, e, false);
  }

  clear(): void {
    this.words.fill(0);
    this.bitCount = 0;
  }

  setAll(): void {
    this.apply(0, this.nbits, true);
  }

  /** ORs another bitmap of the same granularity into this one. */
  merge(other: DirtyBitmap): void {
    if (other.granularity !== this.granularity) {
      throw new BlockError("Bitmaps are incompatible and can't be merged");
    }
    const n = Math.min(this.words.length, other.words.length);
    for (let i = 0; i < n; i++) {
      const old = this.words[i]!;
      const nv = (old | other.words[i]!) >>> 0;
      if (nv !== old) {
        this.bitCount += popcount(nv) - popcount(old);
        this.words[i] = nv;
      }
    }
  }

  /** Resizes to a new node length (bits past the end are dropped). */
  truncate(length: number): void {
    const nbits = Math.ceil(length / this.granularity);
    if (nbits < this.nbits) this.apply(nbits, this.nbits, false);
    const words = new Uint32Array(Math.ceil(nbits / 32));
    words.set(this.words.subarray(0, Math.min(words.length, this.words.length)));
    this.words = words;
    this.nbits = nbits;
    this.length = length;
  }

  /** First dirty bit at or after `bit` below `end`, or -1. */
  private nextBit(bit: number, end: number, dirty: boolean): number {
    while (bit < end) {
      const w = bit >>> 5;
      let word = this.words[w]!;
      if (!dirty) word = ~word >>> 0;
      word = (word & (0xffffffff << (bit & 31))) >>> 0;
      if (word !== 0) {
        const found = (w << 5) + (31 - Math.clz32(word & -word));
        return found < end ? found : -1;
      }
      bit = (w + 1) << 5;
    }
    return -1;
  }

  /** Offset of the first dirty byte at or after offset (before offset+bytes), or -1. */
  nextDirty(offset: number, bytes = Number.MAX_SAFE_INTEGER): number {
    const [s, e] = this.bitRange(offset, bytes);
    const b = this.nextBit(s, e, true);
    return b < 0 ? -1 : Math.max(offset, b * this.granularity);
  }

  /** Offset of the first clean byte at or after offset, or -1. */
  nextClean(offset: number, bytes = Number.MAX_SAFE_INTEGER): number {
    const [s, e] = this.bitRange(offset, bytes);
    const b = this.nextBit(s, e, false);
    return b < 0 ? -1 : Math.max(offset, b * this.granularity);
  }

  /** The dirty extents [offset, length] within [offset, offset+bytes), merged and clipped. */
  *dirtyExtents(
    offset = 0,
    bytes = this.length - offset,
    maxExtent = Number.MAX_SAFE_INTEGER,
  ): Generator<[number, number]> {
    const end = Math.min(this.length, offset + bytes);
    let pos = offset;
    while (pos < end) {
      const d = this.nextDirty(pos, end - pos);
      if (d < 0) return;
      const c = this.nextClean(d, end - d);
      const stop = c < 0 ? end : Math.min(c, end);
      for (let s = d; s < stop; s += maxExtent) yield [s, Math.min(maxExtent, stop - s)];
      pos = stop;
    }
  }

  /** Bits in the bitmap (granules of the node). */
  get size(): number {
    return this.nbits;
  }

  /**
   * `bytes` bytes of the bitmap from bit `firstBit` (a multiple of 32), bit i of the run in bit
   * i%8 of byte i/8 (the little-endian order qcow2 stores bitmaps in); bits past the end are 0.
   */
  toBytes(firstBit: number, bytes: number): Buffer {
    const out = Buffer.alloc(bytes);
    const w0 = firstBit >>> 5;
    const n = Math.min(Math.ceil(bytes / 4), Math.max(0, this.words.length - w0));
    for (let i = 0; i < n; i++) {
      const w = this.words[w0 + i]!;
      if (w && i * 4 + 4 <= bytes) out.writeUInt32LE(w, i * 4);
      else if (w) for (let b = 0; b < bytes - i * 4; b++) out[i * 4 + b] = (w >>> (8 * b)) & 0xff;
    }
    return out;
  }

  /** Sets the bits of a run read as toBytes writes it (bits already set stay set). */
  orBytes(firstBit: number, data: Buffer): void {
    const w0 = firstBit >>> 5;
    const n = Math.min(Math.ceil(data.length / 4), Math.max(0, this.words.length - w0));
    for (let i = 0; i < n; i++) {
      let v = 0;
      for (let b = 0; b < 4 && i * 4 + b < data.length; b++) v |= data[i * 4 + b]! << (8 * b);
      if (!v) continue;
      const old = this.words[w0 + i]!;
      let nv = (old | v) >>> 0;
      // Bits past the node's end are never set.
      if (w0 + i === this.words.length - 1 && this.nbits % 32) nv &= (2 ** (this.nbits % 32) - 1) >>> 0;
      this.bitCount += popcount(nv) - popcount(old);
      this.words[w0 + i] = nv;
    }
  }

  /** A copy (for snapshotting a bitmap, e.g. an incremental backup's frozen view). */
  copy(name?: string): DirtyBitmap {
    const b = new DirtyBitmap(this.length, this.granularity, name);
    b.words.set(this.words);
    b.bitCount = this.bitCount;
    return b;
  }
}

/** Creates a bitmap on a node; writes through the node mark it dirty from then on. */
export function addDirtyBitmap(
  node: BlockNode,
  opts: { name?: string; granularity?: number } = {},
): DirtyBitmap {
  if (opts.name !== undefined) {
    if (opts.name === '') throw new BlockError('Bitmap name cannot be empty');
    if (opts.name.length > 1023) throw new BlockError('Bitmap name too long');
    if (node.dirtyBitmaps.some((b) => b.name === opts.name)) {
      throw new BlockError(`Bitmap already exists: ${opts.name}`);
    }
  }
  const bm = new DirtyBitmap(node.length, opts.granularity ?? 65536, opts.name);
  node.dirtyBitmaps.push(bm);
  return bm;
}

export function removeDirtyBitmap(node: BlockNode, bm: DirtyBitmap): void {
  const i = node.dirtyBitmaps.indexOf(bm);
  if (i >= 0) node.dirtyBitmaps.splice(i, 1);
}

export function findDirtyBitmap(node: BlockNode, name: string): DirtyBitmap | undefined {
  return node.dirtyBitmaps.find((b) => b.name === name);
}
