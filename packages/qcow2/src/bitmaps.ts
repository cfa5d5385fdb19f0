import { BlockError, DirtyBitmap, errnoText, iovIsZero, toBlockError } from '@blockrep/block';
import { Ext, type Qcow2Header, withBackingFile } from './header';
import type { Qcow2Image } from './image';
import { type Qcow2Storage, readBuf } from './storage';

/*
 * Persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps extension"): the header extension
 * and the bitmap directory, validated as QEMU 7.2 does when it opens an image, with its texts.
 */

export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
const DIR_ENTRY = 24;
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_FLAG_IN_USE = 1;
const BME_RESERVED_FLAGS = ~3 >>> 0;

/** The bitmaps extension's fields. */
export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

/** One bitmap of the directory. */
export interface BitmapDirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  name: string;
  /** Written by this store (not kept as it was): internal to storeBitmaps. */
  fresh?: boolean;
}

function invalid(msg: string): BlockError {
  return new BlockError(msg, { errno: 'EINVAL' });
}

/**
 * The bitmaps extension, checked as qcow2_read_extensions does; null when there is none or the
 * autoclear bit says a program without bitmap support changed the image (then a warning, as
 * QEMU prints, goes to `h.warnings`: the bitmaps are inconsistent and ignored).
 */
export function bitmapsExtension(h: Qcow2Header, cs: number): BitmapsExtension | null {
  const ext = h.extensions.find((e) => e.type === Ext.BITMAPS);
  if (!ext) return null;
  if (!(h.autoclear & 1n)) {
    h.warnings.push(
      h.version < 3
        ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
        : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent',
      "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
    );
    return null;
  }
  const d = ext.data;
  if (d.readUInt32BE(4) !== 0) throw invalid('bitmaps_ext: Reserved field is not zero');
  const nbBitmaps = d.readUInt32BE(0);
  const directorySize = d.readBigUInt64BE(8);
  const directoryOffset = d.readBigUInt64BE(16);
  if (nbBitmaps > MAX_BITMAPS) {
    throw invalid(
      `bitmaps_ext: Image has ${nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`,
    );
  }
  if (nbBitmaps === 0) throw invalid('found bitmaps extension with zero bitmaps');
  if (directoryOffset % BigInt(cs)) throw invalid('bitmaps_ext: invalid bitmap directory offset');
  if (directorySize > BigInt(MAX_BITMAP_DIRECTORY_SIZE)) {
    throw invalid(
      `bitmaps_ext: bitmap directory size (${directorySize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`,
    );
  }
  return { nbBitmaps, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) };
}

/** QEMU's check_dir_entry: a bitmap that can be what it claims. */
function entryValid(
  e: BitmapDirEntry,
  type: number,
  nameSize: number,
  cs: number,
  virtualSize: number,
): boolean {
  if (
    e.tableSize === 0 ||
    e.tableOffset === 0 ||
    e.tableOffset % cs ||
    e.tableSize > BME_MAX_TABLE_SIZE ||
    e.granularityBits > 31 ||
    e.granularityBits < 9 ||
    (e.flags & BME_RESERVED_FLAGS) !== 0 ||
    nameSize > 1023 ||
    type !== 1
  ) {
    return false;
  }
  const phys = e.tableSize * cs;
  if (phys > BME_MAX_PHYS_SIZE) return false;
  return (e.flags & BME_FLAG_IN_USE) !== 0 || virtualSize <= phys * 8 * 2 ** e.granularityBits;
}

/** The bitmap directory (QEMU's bitmap_list_load), every entry checked. */
export async function loadBitmapDirectory(
  s: Qcow2Storage,
  ext: BitmapsExtension,
  cs: number,
  virtualSize: number,
): Promise<BitmapDirEntry[]> {
  if (ext.directorySize === 0) throw invalid('Requested bitmap directory size is zero');
  let dir: Buffer;
  try {
    dir = await readBuf(s, ext.directoryOffset, ext.directorySize);
  } catch (e) {
    throw new BlockError(`Failed to read bitmap directory: ${errnoText(toBlockError(e).errno)}`, {
      errno: 'EIO',
    });
  }
  const out: BitmapDirEntry[] = [];
  let p = 0;
  const broken = () => invalid('Broken bitmap directory');
  while (p < dir.length) {
    if (p + DIR_ENTRY > dir.length) throw broken();
    if (out.length + 1 > ext.nbBitmaps)
      throw invalid('More bitmaps found than specified in header extension');
    const nameSize = dir.readUInt16BE(p + 18);
    const extra = dir.readUInt32BE(p + 20);
    const next = p + Math.ceil((DIR_ENTRY + nameSize + extra) / 8) * 8;
    if (next > dir.length) throw broken();
    if (extra !== 0) throw invalid('Bitmap extra data is not supported');
    const e: BitmapDirEntry = {
      tableOffset: Number(dir.readBigUInt64BE(p)),
      tableSize: dir.readUInt32BE(p + 8),
      flags: dir.readUInt32BE(p + 12),
      granularityBits: dir.readUInt8(p + 17),
      name: dir.toString('utf8', p + DIR_ENTRY, p + DIR_ENTRY + nameSize),
    };
    if (!entryValid(e, dir.readUInt8(p + 16), nameSize, cs, virtualSize)) {
      throw invalid(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    }
    out.push(e);
    p = next;
  }
  if (out.length !== ext.nbBitmaps) throw invalid('Less bitmaps found than specified in header extension');
  return out;
}

/** Both steps, as opening an image does them; the directory is null when there are no bitmaps. */
export async function openBitmaps(s: Qcow2Storage, h: Qcow2Header): Promise<BitmapDirEntry[] | null> {
  const cs = 2 ** h.clusterBits;
  const ext = bitmapsExtension(h, cs);
  return ext ? loadBitmapDirectory(s, ext, cs, h.size) : null;
}

/**
 * A writer drops a bitmaps extension the autoclear bit declares stale (QEMU rewrites the header
 * without it), so that nobody warns about it again.
 */
export async function dropStaleBitmaps(s: Qcow2Storage, h: Qcow2Header): Promise<void> {
  if (h.autoclear & 1n || !h.extensions.some((e) => e.type === Ext.BITMAPS)) return;
  h.extensions = h.extensions.filter((e) => e.type !== Ext.BITMAPS);
  const cs = 2 ** h.clusterBits;
  const cluster = await readBuf(s, 0, cs);
  await s.write(0, withBackingFile(cluster, h, h.backingFile, h.backingFormat));
  await s.flush();
}

// ---- persistent bitmaps of an open image ----

const BME_FLAG_AUTO = 2;

/** The host clusters an entry's table and data take (to free them once replaced). */
export async function entryClusters(img: Qcow2Image, e: BitmapDirEntry): Promise<[number, number][]> {
  const out: [number, number][] = [[e.tableOffset, Math.ceil((e.tableSize * 8) / img.cs)]];
  const t = await readBuf(img.storage, e.tableOffset, e.tableSize * 8);
  for (let i = 0; i < e.tableSize; i++) {
    const off = Number(t.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
    if (off) out.push([off, 1]);
  }
  return out;
}

/**
 * The image's bitmaps as DirtyBitmaps for its node: data read from the bitmap tables; recording
 * when the "auto" flag says so; one found "in use" (its writer never stored it: it may have
 * missed writes) is inconsistent, as in QEMU.
 */
export async function loadBitmaps(img: Qcow2Image): Promise<DirtyBitmap[]> {
  const out: DirtyBitmap[] = [];
  const bitsPerCluster = img.cs * 8;
  for (const e of img.bitmapDir) {
    const bm = new DirtyBitmap(img.size, 2 ** e.granularityBits, e.name);
    bm.persistent = true;
    bm.enabled = (e.flags & BME_FLAG_AUTO) !== 0;
    if (e.flags & BME_FLAG_IN_USE) {
      bm.inconsistent = true;
      bm.enabled = false;
    } else {
      const t = await readBuf(img.storage, e.tableOffset, e.tableSize * 8);
      for (let i = 0; i < e.tableSize; i++) {
        const hi = t.readUInt32BE(i * 8);
        const lo = t.readUInt32BE(i * 8 + 4);
        const off = Number(t.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
        if (off) bm.orBytes(i * bitsPerCluster, await readBuf(img.storage, off, img.cs));
        else if (lo & 1 && !hi) bm.orBytes(i * bitsPerCluster, Buffer.alloc(img.cs, 0xff));
      }
    }
    out.push(bm);
  }
  return out;
}

/** Serialises a directory (entries in order, each padded to 8 bytes). */
function directoryBytes(entries: BitmapDirEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = Buffer.from(e.name);
    const len = Math.ceil((DIR_ENTRY + name.length) / 8) * 8;
    const b = Buffer.alloc(len);
    b.writeBigUInt64BE(BigInt(e.tableOffset), 0);
    b.writeUInt32BE(e.tableSize, 8);
    b.writeUInt32BE(e.flags, 12);
    b.writeUInt8(1, 16);
    b.writeUInt8(e.granularityBits, 17);
    b.writeUInt16BE(name.length, 18);
    name.copy(b, DIR_ENTRY);
    parts.push(b);
  }
  return Buffer.concat(parts);
}

/**
 * A writer marks the bitmaps it loaded "in use" on disk (the directory rewritten in place), so
 * that a crash before they are stored leaves them inconsistent rather than silently stale.
 */
export async function markBitmapsInUse(img: Qcow2Image): Promise<void> {
  if (!img.bitmapDir.length || img.bitmapDir.every((e) => e.flags & BME_FLAG_IN_USE)) return;
  for (const e of img.bitmapDir) e.flags |= BME_FLAG_IN_USE;
  const ext = bitmapsExtension(img.header, img.cs)!;
  await img.storage.write(ext.directoryOffset, directoryBytes(img.bitmapDir));
  await img.storage.flush();
}

/**
 * Stores a node's persistent bitmaps in the image (QEMU's qcow2_store_persistent_dirty_bitmaps):
 * the data of each (clusters that are all zeroes are left out), its table and a new directory go
 * into new clusters, made durable before the header points at them; then the old ones are
 * freed. Inconsistent bitmaps are stored as they were found (in use). With none left, the
 * extension goes.
 */
export async function storeBitmaps(img: Qcow2Image, bitmaps: DirtyBitmap[]): Promise<void> {
  const old = img.bitmapDir;
  const entries: BitmapDirEntry[] = [];
  const cs = img.cs;
  const bitsPerCluster = cs * 8;
  for (const bm of bitmaps) {
    const kept = bm.inconsistent ? old.find((e) => e.name === bm.name) : undefined;
    if (kept) {
      entries.push({ ...kept, flags: kept.flags | BME_FLAG_IN_USE, fresh: false });
      continue;
    }
    const tableSize = Math.max(1, Math.ceil(bm.size / bitsPerCluster));
    const table = Buffer.alloc(Math.ceil((tableSize * 8) / cs) * cs);
    for (let i = 0; i < tableSize; i++) {
      const data = bm.toBytes(i * bitsPerCluster, cs);
      if (iovIsZero([data])) continue;
      const off = await img.allocator.allocate(1);
      await img.storage.write(off, data);
      table.writeBigUInt64BE(BigInt(off), i * 8);
    }
    const tableOffset = await img.allocator.allocate(table.length / cs);
    await img.storage.write(tableOffset, table);
    entries.push({
      tableOffset,
      tableSize,
      flags: bm.enabled ? BME_FLAG_AUTO : 0,
      granularityBits: Math.log2(bm.granularity),
      name: bm.name ?? '',
      fresh: true,
    });
  }
  let ext: Buffer | null = null;
  if (entries.length) {
    const dir = directoryBytes(entries);
    const dirOffset = await img.allocator.allocate(Math.ceil(dir.length / cs));
    await img.storage.write(dirOffset, dir);
    ext = Buffer.alloc(24);
    ext.writeUInt32BE(entries.length, 0);
    ext.writeBigUInt64BE(BigInt(dir.length), 8);
    ext.writeBigUInt64BE(BigInt(dirOffset), 16);
  }
  // Everything the new header will point at, and its refcounts, on disk before the header.
  await img.syncRefcounts();
  await img.storage.flush();
  const oldExt = bitmapsExtension(img.header, cs);
  await writeBitmapsExtension(img, ext);
  // The old directory, tables and data (what is not kept as it was) go.
  const frees: [number, number][] = [];
  if (oldExt) frees.push([oldExt.directoryOffset, Math.ceil(oldExt.directorySize / cs)]);
  for (const e of old) {
    if (entries.some((n) => !n.fresh && n.tableOffset === e.tableOffset)) continue;
    frees.push(...(await entryClusters(img, e)));
  }
  for (const [off, n] of frees) await img.refcounts.free(off, n);
  // The frees made durable too: a store happens rarely (close, a removal), and a crash after a
  // removal would otherwise leak what the bitmap held.
  await img.refcounts.writeBack();
  await img.storage.flush();
  img.bitmapDir = entries.map(({ fresh: _f, ...e }) => e);
}

/** Writes the header with the given bitmaps extension (null: none) and autoclear bit 0 to match. */
async function writeBitmapsExtension(img: Qcow2Image, ext: Buffer | null): Promise<void> {
  const h = img.header;
  const others = h.extensions.filter((e) => e.type !== Ext.BITMAPS);
  h.extensions = ext ? [...others, { type: Ext.BITMAPS, data: ext }] : others;
  h.autoclear = ext ? h.autoclear | 1n : h.autoclear & ~1n;
  const cluster = await readBuf(img.storage, 0, img.cs);
  const updated = withBackingFile(cluster, h, h.backingFile, h.backingFormat);
  updated.writeBigUInt64BE(h.autoclear, 88);
  await img.storage.write(0, updated);
  await img.storage.flush();
}
