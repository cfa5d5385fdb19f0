import { BlockError } from '@blockrep/block';
import { ClusterType, entryOffset, entryType } from './cluster';
import {
  Ext,
  featureNameTable,
  Incompat,
  type Qcow2Header,
  V2_HEADER_LENGTH,
  withBackingFile,
} from './header';
import type { Qcow2Image } from './image';
import { readSnapshots } from './snapshot';
import { readBuf } from './storage';

/*
 * qemu-img amend -o compat=1.1|0.10: an image changes version in place. Upgrading writes a version 3
 * header (no features, 16-bit refcounts, the feature name table). Downgrading first turns every zero
 * cluster into something version 2 can say (unallocated without a backing file, else a cluster of
 * zeroes; a preallocated zero cluster gets its zeroes written), in the active L1 table and every
 * snapshot's, then writes a version 2 header (the fixed 72 bytes, the extensions but the feature
 * table, the backing file name).
 */

const COPIED = 0x80000000;

/** The header cluster for another version, its other fields and extensions kept. */
async function rewriteHeader(img: Qcow2Image, version: 2 | 3): Promise<void> {
  const h = img.header;
  const fixed = Buffer.alloc(img.cs);
  const cur = await readBuf(img.storage, 0, V2_HEADER_LENGTH);
  cur.copy(fixed, 0, 0, V2_HEADER_LENGTH);
  fixed.writeUInt32BE(version, 4);
  let extensions = h.extensions.filter((e) => e.type !== Ext.FEATURE_NAMES && e.type !== Ext.BACKING_FORMAT);
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    // No features, 16-bit refcounts, zlib: what a new v3 image says (as QEMU writes it, 112 bytes).
    fixed.writeUInt32BE(4, 96);
    fixed.writeUInt32BE(112, 100);
    headerLength = 112;
    extensions = [{ type: Ext.FEATURE_NAMES, data: featureNameTable() }, ...extensions];
  }
  const next: Qcow2Header = { ...h, version, headerLength, extensions };
  const cluster = withBackingFile(fixed, next, h.backingFile, h.backingFormat);
  await img.storage.write(0, cluster);
  await img.storage.flush();
  Object.assign(h, {
    version,
    headerLength,
    extensions,
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    compressionType: 0,
    backingFileOffset: cluster.readUInt32BE(12),
  });
  img.v3 = version === 3;
}

/** compat=1.1 on a version 2 image. */
export async function upgradeToV3(img: Qcow2Image): Promise<void> {
  img.checkWritable();
  if (img.v3) return;
  await img.flushMetadata();
  await img.storage.flush();
  await rewriteHeader(img, 3);
}

/** compat=0.10 on a version 3 image, with QEMU's refusals (and one of ours: persistent bitmaps). */
export async function downgradeToV2(img: Qcow2Image): Promise<void> {
  img.checkWritable();
  if (!img.v3) return;
  if (img.refcounts.bits !== 16)
    throw new BlockError('compat=0.10 requires refcount_bits=16', { errno: 'ENOTSUP' });
  const incompatible = img.header.incompatible & ~Incompat.DIRTY;
  if (incompatible) {
    throw new BlockError(
      `Cannot downgrade an image with incompatible features 0x${incompatible.toString(16)} set`,
      {
        errno: 'ENOTSUP',
      },
    );
  }
  // qemu-img 7.2 downgrades them too, leaving the bitmaps' clusters leaked and a bitmaps
  // extension a version 2 image cannot carry: refused here instead.
  if (img.bitmapDir.length) {
    throw new BlockError('Cannot downgrade an image with persistent bitmaps (remove them first)', {
      errno: 'ENOTSUP',
    });
  }
  await img.flushMetadata();
  await img.storage.flush();
  img.cache.clear();
  await expandZeroClusters(img);
  await rewriteHeader(img, 2);
}

/** Every zero cluster of every L1 table (active and snapshots') made plain, each L2 table once. */
async function expandZeroClusters(img: Qcow2Image): Promise<void> {
  const cs = img.cs;
  const rc = img.refcounts;
  const tables: { l1: Buffer; size: number }[] = [{ l1: img.l1, size: img.header.l1Size }];
  for (const s of await readSnapshots(img))
    tables.push({ l1: await readBuf(img.storage, s.l1Offset, s.l1Size * 8), size: s.l1Size });
  const hasBacking = img.header.backingFile !== undefined;
  const zeros = Buffer.alloc(cs);
  const seen = new Set<number>();
  /** A new cluster of zeroes with the refcount of the L2 table that will point at it. */
  const zeroCluster = async (refs: number): Promise<number> => {
    const off = await img.allocator.allocate(1);
    if (refs > 1) await rc.mutex.run(() => rc.update(off / cs, 1, refs - 1));
    await img.storage.write(off, zeros);
    return off;
  };
  for (const t of tables) {
    for (let i = 0; i < t.size; i++) {
      const l2Off = entryOffset(t.l1.readUInt32BE(i * 8), t.l1.readUInt32BE(i * 8 + 4));
      if (!l2Off || seen.has(l2Off)) continue;
      seen.add(l2Off);
      const l2 = await readBuf(img.storage, l2Off, cs);
      const refs = await rc.get(l2Off / cs);
      let dirty = false;
      const set = (k: number, off: number) => {
        const hi = off ? Math.floor(off / 0x100000000) | (refs === 1 ? COPIED : 0) : 0;
        l2.writeUInt32BE(hi >>> 0, k * 8);
        l2.writeUInt32BE(off % 0x100000000, k * 8 + 4);
        dirty = true;
      };
      for (let k = 0; k < img.l2Entries; k++) {
        const hi = l2.readUInt32BE(k * 8);
        const lo = l2.readUInt32BE(k * 8 + 4);
        const type = entryType(hi, lo);
        if (type === ClusterType.ZERO_PLAIN) {
          // Without a backing file an unallocated cluster reads as zeroes already.
          set(k, hasBacking ? await zeroCluster(refs) : 0);
        } else if (type === ClusterType.ZERO_ALLOC) {
          const off = entryOffset(hi, lo);
          if ((await rc.get(off / cs)) > refs) {
            // Its data is someone else's too (a snapshot's): zeroes go to a cluster of its own.
            set(k, await zeroCluster(refs));
            await rc.mutex.run(() => rc.update(off / cs, 1, -refs));
          } else {
            await img.storage.write(off, zeros);
            l2.writeUInt32BE((lo & ~1) >>> 0, k * 8 + 4);
            dirty = true;
          }
        }
      }
      if (dirty) await img.storage.write(l2Off, l2);
    }
  }
  await img.flushMetadata();
  await img.storage.flush();
}
