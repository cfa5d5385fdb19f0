/*
 * How large a qcow2 image of a given virtual size gets (qemu-img measure): the metadata of a
 * fully allocated image, the data a conversion would write, and the room persistent bitmaps take.
 */

export interface Qcow2MeasureOptions {
  clusterSize?: number;
  refcountBits?: number;
  /** Subclusters: L2 entries of 16 bytes instead of 8. */
  extendedL2?: boolean;
}

/** A persistent bitmap to be carried over: its name, granularity and the length it covers. */
export interface MeasuredBitmap {
  name: string;
  granularity: number;
  length: number;
}

const L1E_SIZE = 8;
const REFTABLE_ENTRY_SIZE = 8;
const BITMAP_TABLE_ENTRY_SIZE = 8;
/** A bitmap directory entry without its name and extra data. */
const BITMAP_DIR_ENTRY_SIZE = 24;

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

/**
 * Refcount table and block clusters needed to count `clusters` clusters and themselves: the
 * fixed point where counting the refcount metadata needs no more of it.
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountBits: number): number {
  const perTableCluster = clusterSize / REFTABLE_ENTRY_SIZE;
  const perBlock = (clusterSize * 8) / refcountBits;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** Bytes of a qcow2 image with every cluster of `virtualSize` allocated: header, tables, data. */
export function fullyAllocatedSize(virtualSize: number, opts: Qcow2MeasureOptions = {}): number {
  const cs = opts.clusterSize ?? 65536;
  const l2e = opts.extendedL2 ? 16 : 8;
  const aligned = roundUp(virtualSize, cs);
  let meta = cs; // the header cluster
  const nl2e = roundUp(aligned / cs, cs / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / cs, cs / L1E_SIZE);
  meta += nl1e * L1E_SIZE;
  meta += refcountMetadataSize((meta + aligned) / cs, cs, opts.refcountBits ?? 16);
  return meta + aligned;
}

/** The clusters persistent bitmaps take in an image of cluster size cs: data, tables, directory. */
export function bitmapsSize(bitmaps: MeasuredBitmap[], clusterSize: number): number {
  let size = 0;
  let dir = 0;
  for (const b of bitmaps) {
    const bits = Math.ceil(b.length / b.granularity);
    const clusters = Math.ceil(Math.ceil(bits / 8) / clusterSize);
    size += clusters * clusterSize + roundUp(clusters * BITMAP_TABLE_ENTRY_SIZE, clusterSize);
    dir += roundUp(BITMAP_DIR_ENTRY_SIZE + Buffer.byteLength(b.name), 8);
  }
  return size + roundUp(dir, clusterSize);
}
