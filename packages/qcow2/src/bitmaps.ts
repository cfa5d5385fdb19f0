import { BlockError, errnoText, toBlockError } from '@blockrep/block';
import { Ext, type Qcow2Header, withBackingFile } from './header';
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
