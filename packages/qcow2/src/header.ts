import { BlockError } from '@blockrep/block';

/*
 * The qcow2 header (docs/interop/qcow2.txt): the fixed fields, the feature bits and the header
 * extensions. Parsing validates everything a later step would trust; writing back only ever
 * patches single fields, so unknown extensions survive untouched.
 */

export const QCOW2_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** QEMU's limits: larger tables are refused as absurd (32 MiB of L1, 8 MiB of refcount table). */
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
export const MAX_BACKING_NAME = 1023;
/** Largest virtual size QEMU accepts (2^61 - 1 rounded to what fits safely in a JS number). */
export const MAX_VIRTUAL_SIZE = 2 ** 53 - 2 ** 21;

export const Incompat = { DIRTY: 1n, CORRUPT: 2n, DATA_FILE: 4n, COMPRESSION: 8n, EXTENDED_L2: 16n } as const;
export const Compat = { LAZY_REFCOUNTS: 1n } as const;

export const Ext = {
  END: 0,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_NAMES: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

/** Byte offsets of the header fields we patch in place. */
export const HeaderField = {
  SIZE: 24,
  L1_SIZE: 36,
  L1_OFFSET: 40,
  REFTABLE_OFFSET: 48,
  REFTABLE_CLUSTERS: 56,
  NB_SNAPSHOTS: 60,
  INCOMPAT: 72,
  COMPAT: 80,
  AUTOCLEAR: 88,
} as const;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  extensions: HeaderExtension[];
  backingFile?: string;
  backingFormat?: string;
  /** Feature names from the feature-name table: "type:bit" -> name. */
  featureNames: Map<string, string>;
  /** What QEMU warns about when it opens the image (lines for stderr, after "warning: "). */
  warnings: string[];
}

export function readU64(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  const lo = buf.readUInt32BE(off + 4);
  if (hi >= 0x200000) throw corrupt(`64-bit field at header offset ${off} is too large`);
  return hi * 0x100000000 + lo;
}

/**
 * A 64-bit field as a number; values past 2^53 (which only a broken or hostile image holds)
 * come back as at least 2^53, which every bound below treats as out of reach.
 */
function readOffset(buf: Buffer, off: number): number {
  return Number(buf.readBigUInt64BE(off));
}

export function writeU64(buf: Buffer, off: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 0x100000000), off);
  buf.writeUInt32BE(v % 0x100000000, off + 4);
}

export function u64Buffer(v: number): Buffer {
  const b = Buffer.alloc(8);
  writeU64(b, 0, v);
  return b;
}

function corrupt(msg: string): BlockError {
  return new BlockError(msg, { errno: 'EINVAL' });
}

const isAligned = (v: number, cs: number) => v % cs === 0;
const INT64_MAX = 2 ** 63 - 1;

/** Number of L1 entries needed to map `size` bytes. */
export function l1EntriesFor(size: number, clusterBits: number): number {
  const l2Bytes = 2 ** (clusterBits * 2 - 3);
  return Math.ceil(size / l2Bytes);
}

/**
 * QEMU's qcow2_validate_table: a table of `entries` entries of `entryLen` bytes at `offset` is at
 * most `maxBytes` long, cluster aligned, and ends before 2^63. It may lie past the end of the
 * file: what is missing there reads as zeroes.
 */
function validateTable(
  offset: number,
  entries: number,
  entryLen: number,
  maxBytes: number,
  name: string,
  cs: number,
) {
  if (entries > Math.floor(maxBytes / entryLen)) {
    throw new BlockError(`${name} too large`, { errno: 'EFBIG' });
  }
  if (INT64_MAX - entries * entryLen < offset || !isAligned(offset, cs)) {
    throw corrupt(`${name} offset invalid`);
  }
}

/** The names QEMU's error gives unsupported incompatible features: the table's, then one hex for the rest. */
function unsupportedFeatures(h: Qcow2Header, mask: bigint): string {
  const names: string[] = [];
  for (const [key, name] of h.featureNames) {
    const [type, bit] = key.split(':').map(Number) as [number, number];
    if (type !== 0 || bit > 63) continue;
    const b = 1n << BigInt(bit);
    if (mask & b) {
      names.push(name.slice(0, 46));
      mask &= ~b;
    }
  }
  if (mask) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${names.join(', ')}`;
}

export interface ParseHeaderOptions {
  /**
   * Opened for `check` (QEMU's BDRV_O_CHECK): an image without a refcount table and a broken
   * snapshot table header are left for the check to report.
   */
  check?: boolean;
}

/**
 * Parses and validates the header at the start of `buf` (the first cluster, or at least the
 * first 64 KiB / the whole file when shorter), with QEMU's checks in QEMU's order and its texts.
 */
export function parseHeader(buf: Buffer, _fileLength: number, opts: ParseHeaderOptions = {}): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) {
    if (buf.length >= 4 && buf.readUInt32BE(0) === QCOW2_MAGIC) {
      throw corrupt(`qcow2 header is truncated (${buf.length} bytes, at least ${V2_HEADER_LENGTH} needed)`);
    }
    throw corrupt('Image is not in qcow2 format');
  }
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw corrupt('Image is not in qcow2 format');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new BlockError(`Unsupported qcow2 version ${version}`, { errno: 'ENOTSUP' });
  }
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const cs = 2 ** clusterBits;
  const rawSize = buf.readBigUInt64BE(24);
  const h: Qcow2Header = {
    version,
    backingFileOffset: readOffset(buf, 8),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    // QEMU counts whole 512-byte sectors: a size that is not a multiple of 512 is rounded down.
    size: Number(rawSize - (rawSize % 512n)),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: readOffset(buf, 40),
    refcountTableOffset: readOffset(buf, 48),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: readOffset(buf, 64),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    extensions: [],
    featureNames: new Map(),
    warnings: [],
  };
  if (version === 3) {
    if (buf.length < V3_HEADER_LENGTH) throw corrupt('qcow2 header is truncated');
    h.incompatible = buf.readBigUInt64BE(72);
    h.compatible = buf.readBigUInt64BE(80);
    h.autoclear = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < V3_HEADER_LENGTH) throw corrupt('qcow2 header too short');
  }
  if (h.headerLength > cs) throw corrupt('qcow2 header exceeds cluster size');
  if (h.headerLength > buf.length) throw corrupt('qcow2 header is truncated');
  if (h.backingFileOffset > cs) throw corrupt('Invalid backing file offset');
  if (h.headerLength > 104) h.compressionType = buf.readUInt8(104);
  if (h.compressionType === 0) {
    if (h.incompatible & Incompat.COMPRESSION) {
      throw corrupt('qcow2: Compression type incompatible feature bit must not be set');
    }
  } else if (h.compressionType === 1) {
    // zstd: QEMU reads it; Node's zlib has no zstd.
    throw new BlockError('Unsupported compression type 1 (zstd; only zlib is supported)', {
      errno: 'ENOTSUP',
    });
  } else {
    throw new BlockError(`qcow2: unknown compression type: ${h.compressionType}`, { errno: 'ENOTSUP' });
  }
  const extEnd = h.backingFileOffset ? h.backingFileOffset : cs;
  // Extended L2 entries (subclusters) are known to QEMU but not supported here: named like the rest.
  const unsupported = h.incompatible & ~(QEMU_INCOMPAT_MASK & ~Incompat.EXTENDED_L2);
  if (unsupported) {
    // The feature names come from the extensions, read for this alone (errors in them do not count).
    try {
      parseExtensions(buf, h, extEnd);
    } catch {
      // Names as far as they could be read.
    }
    throw new BlockError(unsupportedFeatures(h, unsupported), { errno: 'ENOTSUP' });
  }
  if (h.refcountOrder > 6) throw corrupt('Reference count entry width too large; may not exceed 64 bits');
  if (h.cryptMethod === 1 || h.cryptMethod === 2) {
    // We hold no keys: QEMU asks for one the same way when none is given.
    throw new BlockError("Parameter 'encrypt.key-secret' is required for cipher", { errno: 'EINVAL' });
  } else if (h.cryptMethod !== 0) {
    throw corrupt(`Unsupported encryption method ${h.cryptMethod}`);
  }
  if (h.refcountTableClusters === 0 && !opts.check) {
    throw corrupt('Image does not contain a reference count table');
  }
  validateTable(
    h.refcountTableOffset,
    h.refcountTableClusters,
    cs,
    MAX_REFTABLE_BYTES,
    'Reference count table',
    cs,
  );
  if (!opts.check) {
    validateTable(h.snapshotsOffset, h.nbSnapshots, 40, 40 * 65536, 'Snapshot table', cs);
  }
  validateTable(h.l1TableOffset, h.l1Size, 8, MAX_L1_BYTES, 'Active L1 table', cs);
  const l1Needed = l1EntriesFor(h.size, clusterBits);
  if (l1Needed > 0x7fffffff) throw new BlockError('Image is too big', { errno: 'EFBIG' });
  if (h.l1Size < l1Needed) throw corrupt('L1 table is too small');
  if (h.size > MAX_VIRTUAL_SIZE) throw new BlockError('Image too large', { errno: 'EINVAL' });

  parseExtensions(buf, h, extEnd);
  if (h.incompatible & Incompat.DATA_FILE) {
    throw new BlockError("'data-file' is required for this image", { errno: 'EINVAL' });
  }
  if (h.autoclear & 2n) throw corrupt('data-file-raw requires a data file');

  if (h.backingFileOffset) {
    if (h.backingFileSize > Math.min(MAX_BACKING_NAME, cs - h.backingFileOffset)) {
      throw corrupt('Backing file name too long');
    }
    if (h.backingFileOffset + h.backingFileSize > buf.length) throw corrupt('qcow2 header is truncated');
    h.backingFile = buf.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }
  return h;
}

/** Incompatible features QEMU 7.2 knows (dirty, corrupt, external data file, compression type, extended L2). */
const QEMU_INCOMPAT_MASK = 0x1fn;

/** QEMU's qcow2_read_extensions: from the header's end to `end` (the backing name or the cluster's end). */
function parseExtensions(buf: Buffer, h: Qcow2Header, end: number): void {
  h.extensions = [];
  let off = h.headerLength;
  while (off < end) {
    if (off + 8 > buf.length) throw corrupt('Header extension too large');
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    off += 8;
    if (off > end || len > end - off) throw corrupt('Header extension too large');
    if (type === Ext.END) return;
    if (off + len > buf.length) throw corrupt('Header extension too large');
    const data = Buffer.from(buf.subarray(off, off + len));
    h.extensions.push({ type, data });
    if (type === Ext.BACKING_FORMAT) {
      if (len >= 16) throw corrupt(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
      h.backingFormat = data.toString('utf8');
    } else if (type === Ext.FEATURE_NAMES) {
      for (let p = 0; p + 48 <= data.length; p += 48) {
        const name = data.toString('utf8', p + 2, p + 48).replace(/\0.*$/s, '');
        if (!name) break;
        h.featureNames.set(`${data[p]}:${data[p + 1]}`, name);
      }
    } else if (type === Ext.CRYPTO) {
      if (h.cryptMethod !== 2) {
        throw corrupt('CRYPTO header extension only expected with LUKS encryption method');
      }
    } else if (type === Ext.BITMAPS) {
      if (len !== 24) throw corrupt('bitmaps_ext: Invalid extension length');
    }
    off += (len + 7) & ~7;
  }
}

/** The feature-name table QEMU writes into v3 images. */
export function featureNameTable(): Buffer {
  const entries: [number, number, string][] = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const b = Buffer.alloc(entries.length * 48);
  entries.forEach(([t, bit, name], i) => {
    b[i * 48] = t;
    b[i * 48 + 1] = bit;
    b.write(name, i * 48 + 2, 46, 'utf8');
  });
  return b;
}

export interface HeaderBuildOptions {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  compatible: bigint;
  backingFile?: string;
  backingFormat?: string;
}

/** A whole header cluster for a new image (header, extensions, backing file name). */
export function buildHeader(o: HeaderBuildOptions): Buffer {
  const cs = 2 ** o.clusterBits;
  const buf = Buffer.alloc(cs);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(o.version, 4);
  buf.writeUInt32BE(o.clusterBits, 20);
  writeU64(buf, 24, o.size);
  buf.writeUInt32BE(o.l1Size, 36);
  writeU64(buf, 40, o.l1TableOffset);
  writeU64(buf, 48, o.refcountTableOffset);
  buf.writeUInt32BE(o.refcountTableClusters, 56);
  let off = V2_HEADER_LENGTH;
  if (o.version === 3) {
    buf.writeBigUInt64BE(o.compatible, 80);
    buf.writeUInt32BE(o.refcountOrder, 96);
    buf.writeUInt32BE(112, 100);
    off = 112;
  }
  const ext = (type: number, data: Buffer) => {
    buf.writeUInt32BE(type, off);
    buf.writeUInt32BE(data.length, off + 4);
    data.copy(buf, off + 8);
    off += 8 + ((data.length + 7) & ~7);
  };
  if (o.backingFormat) ext(Ext.BACKING_FORMAT, Buffer.from(o.backingFormat));
  if (o.version === 3) ext(Ext.FEATURE_NAMES, featureNameTable());
  if (o.version === 3 || o.backingFormat) off += 8; // end-of-extensions marker (zeroes)
  if (o.backingFile) {
    const name = Buffer.from(o.backingFile);
    if (name.length > MAX_BACKING_NAME || off + name.length > cs)
      throw new BlockError('Backing file name too long');
    writeU64(buf, 8, off);
    buf.writeUInt32BE(name.length, 16);
    name.copy(buf, off);
    off += name.length;
  }
  return buf;
}

/**
 * The header cluster with a new backing file name and format: the fixed fields are kept, the
 * extensions are rewritten in their order (backing format first, as QEMU writes it; unknown ones
 * kept), and the name follows the end marker. Throws if it no longer fits in the cluster.
 */
export function withBackingFile(
  cluster: Buffer,
  h: Qcow2Header,
  backingFile?: string,
  backingFormat?: string,
): Buffer {
  const cs = cluster.length;
  const buf = Buffer.alloc(cs);
  cluster.copy(buf, 0, 0, h.headerLength);
  let off = h.headerLength;
  const ext = (type: number, data: Buffer) => {
    if (off + 8 + data.length > cs) throw new BlockError('Cannot update the backing file: header too large');
    buf.writeUInt32BE(type, off);
    buf.writeUInt32BE(data.length, off + 4);
    data.copy(buf, off + 8);
    off += 8 + ((data.length + 7) & ~7);
  };
  if (backingFile && backingFormat) ext(Ext.BACKING_FORMAT, Buffer.from(backingFormat));
  for (const e of h.extensions) if (e.type !== Ext.BACKING_FORMAT) ext(e.type, e.data);
  if (off > h.headerLength || h.version === 3) off += 8; // end-of-extensions marker (zeroes)
  if (backingFile) {
    const name = Buffer.from(backingFile);
    if (name.length > MAX_BACKING_NAME || off + name.length > cs)
      throw new BlockError('Backing file name too long');
    writeU64(buf, 8, off);
    buf.writeUInt32BE(name.length, 16);
    name.copy(buf, off);
  } else {
    writeU64(buf, 8, 0);
    buf.writeUInt32BE(0, 16);
  }
  return buf;
}
