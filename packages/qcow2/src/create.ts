import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { allocateFileRange, BlockError } from '@blockrep/block';
import {
  buildHeader,
  Compat,
  l1EntriesFor,
  MAX_CLUSTER_BITS,
  MAX_VIRTUAL_SIZE,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  readU64,
  writeU64,
} from './header';
import { refSet } from './refcount';
import { FileStorage } from './storage';

/* Image creation (qemu-img create -f qcow2, blockdev-create): a consistent image in one pass. */

export interface Qcow2CreateOptions {
  /** Virtual size in bytes (default: the backing file's size). */
  size?: number;
  /** Bytes per cluster, a power of two from 512 to 2 MiB (default 64 KiB). */
  clusterSize?: number;
  /** '1.1' (v3, default) or '0.10' (v2); 'v3'/'v2' are accepted too. */
  compat?: '0.10' | '1.1' | 'v2' | 'v3';
  /** Backing file name as stored in the header (relative names resolve against the image's directory). */
  backingFile?: string;
  backingFormat?: string;
  /**
   * 'metadata' allocates every L2 table and data cluster up front (data stays sparse); 'falloc'
   * also reserves the data clusters on disk; 'full' writes them out as zeroes.
   */
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  lazyRefcounts?: boolean;
  /** Refcount width in bits, a power of two from 1 to 64 (default 16). */
  refcountBits?: number;
}

function createError(msg: string): BlockError {
  return new BlockError(msg, { errno: 'EINVAL' });
}

/** The virtual size of an existing image file (qcow2 header, else the file's size). */
function imageSize(path: string): number {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(32);
    const n = readSync(fd, b, 0, 32, 0);
    if (n >= 32 && b.readUInt32BE(0) === QCOW2_MAGIC) return readU64(b, 24);
    return statSync(path).size;
  } finally {
    closeSync(fd);
  }
}

/** Creates (or overwrites) a qcow2 image file. */
export async function createQcow2Image(path: string, opts: Qcow2CreateOptions): Promise<void> {
  const cs = opts.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw createError('Cluster size must be a power of two between 512 and 2048k');
  }
  const compat = opts.compat ?? '1.1';
  const version = compat === '0.10' || compat === 'v2' ? 2 : 3;
  const refcountBits = opts.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw createError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version === 2 && refcountBits !== 16) {
    throw createError(
      'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
    );
  }
  if (version === 2 && opts.lazyRefcounts) {
    throw createError(
      'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
    );
  }
  if (opts.backingFormat && !opts.backingFile)
    throw createError('Backing format cannot be used without backing file');
  const prealloc = opts.preallocation !== undefined && opts.preallocation !== 'off';
  if (opts.backingFile && prealloc) {
    throw createError(
      'Backing file and preallocation can only be used at the same time if extended_l2 is on',
    );
  }
  let size = opts.size;
  if (size === undefined) {
    if (!opts.backingFile) throw createError("Parameter 'size' is required");
    const bpath = isAbsolute(opts.backingFile) ? opts.backingFile : join(dirname(path), opts.backingFile);
    try {
      size = imageSize(bpath);
    } catch (e) {
      throw createError(`Could not open backing file '${bpath}': ${(e as Error).message}`);
    }
  }
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_VIRTUAL_SIZE)
    throw createError('Image size is out of range');
  if (size % 512 !== 0) throw createError('Image size must be a multiple of 512 bytes');

  const l1Size = l1EntriesFor(size, clusterBits);
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const l2Tables = prealloc ? l1Size : 0;
  const dataClusters = prealloc ? Math.ceil(size / cs) : 0;
  const perBlock = (cs * 8) / refcountBits;
  let blocks = 1;
  let tableClusters = 1;
  let total = 0;
  for (;;) {
    total = 1 + tableClusters + blocks + l1Clusters + l2Tables + dataClusters;
    const nb = Math.ceil(total / perBlock);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb === blocks && nt === tableClusters) break;
    blocks = nb;
    tableClusters = nt;
  }
  const tableOff = cs;
  const blocksOff = tableOff + tableClusters * cs;
  const l1Off = blocksOff + blocks * cs;
  const l2Off = l1Off + l1Clusters * cs;
  const dataOff = l2Off + l2Tables * cs;

  const header = buildHeader({
    version,
    clusterBits,
    size,
    l1Size,
    l1TableOffset: l1Off,
    refcountTableOffset: tableOff,
    refcountTableClusters: tableClusters,
    refcountOrder,
    compatible: opts.lazyRefcounts ? Compat.LAZY_REFCOUNTS : 0n,
    backingFile: opts.backingFile,
    backingFormat: opts.backingFormat,
  });
  const table = Buffer.alloc(tableClusters * cs);
  for (let i = 0; i < blocks; i++) writeU64(table, i * 8, blocksOff + i * cs);
  const refblocks = Buffer.alloc(blocks * cs);
  for (let c = 0; c < total; c++)
    refSet(refblocks.subarray(Math.floor(c / perBlock) * cs), c % perBlock, refcountBits, 1);
  const l1 = Buffer.alloc(l1Clusters * cs);
  const copied = 0x80000000;
  for (let i = 0; i < l2Tables; i++) {
    writeU64(l1, i * 8, l2Off + i * cs);
    l1.writeUInt32BE((l1.readUInt32BE(i * 8) | copied) >>> 0, i * 8);
  }

  const s = await FileStorage.open(path, 'w+');
  try {
    await s.write(0, [header, table, refblocks, l1]);
    if (prealloc) {
      const l2 = Buffer.alloc(cs);
      for (let t = 0; t < l2Tables; t++) {
        l2.fill(0);
        for (let k = 0; k < cs / 8; k++) {
          const c = t * (cs / 8) + k;
          if (c >= dataClusters) break;
          writeU64(l2, k * 8, dataOff + c * cs);
          l2.writeUInt32BE((l2.readUInt32BE(k * 8) | copied) >>> 0, k * 8);
        }
        await s.write(l2Off + t * cs, l2);
      }
    }
    if (opts.preallocation === 'falloc') {
      await s.truncate(dataOff);
      await allocateFileRange(s.fd, dataOff, total * cs - dataOff);
    } else if (opts.preallocation === 'full') {
      await s.truncate(dataOff);
      const zeroes = Buffer.alloc(Math.min(1 << 20, total * cs - dataOff));
      for (let pos = dataOff; pos < total * cs; pos += zeroes.length)
        await s.write(pos, zeroes.subarray(0, Math.min(zeroes.length, total * cs - pos)));
    }
    await s.truncate(total * cs);
    await s.flush();
  } finally {
    await s.close();
  }
}
