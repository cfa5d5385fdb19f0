import { promisify } from 'node:util';
import * as zlib from 'node:zlib';
import { BlockError } from '@blockrep/block';
import { compressedExtent } from './cluster';
import type { Qcow2Image } from './image';
import { readBuf } from './storage';

/* Compressed clusters: raw deflate streams (zlib compression type), inflated on node's thread pool. */

const inflateRaw = promisify(zlib.inflateRaw);

const lastInflated = new WeakMap<Qcow2Image, { hi: number; lo: number; data: Buffer }>();

/** The guest content of one compressed cluster. */
export async function inflateCluster(img: Qcow2Image, hi: number, lo: number): Promise<Buffer> {
  const last = lastInflated.get(img);
  if (last && last.hi === hi && last.lo === lo) return last.data;
  const { offset, bytes } = compressedExtent(hi, lo, img.clusterBits);
  if (offset >= img.fileEnd || bytes > 2 * img.cs + 512) {
    img.corruptEvent(`Compressed cluster at ${offset.toString(16)} has an invalid size or offset`);
  }
  const src = await readBuf(img.storage, offset, bytes);
  let data: Buffer;
  try {
    data = await inflateRaw(src, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  } catch (e) {
    throw new BlockError(
      `qcow2: Cannot decompress cluster at host offset ${offset}: ${(e as Error).message}`,
      { errno: 'EIO' },
    );
  }
  if (data.length < img.cs) {
    throw new BlockError(`qcow2: Compressed cluster at host offset ${offset} is truncated`, { errno: 'EIO' });
  }
  lastInflated.set(img, { hi, lo, data });
  return data;
}

const deflateRaw = promisify(zlib.deflateRaw);

/**
 * Raw deflate of one cluster, as QEMU compresses (zlib type: default level, a 4 KiB window so
 * any inflater reads it back), on node's thread pool.
 */
export function deflateCluster(data: Buffer): Promise<Buffer> {
  return deflateRaw(data, { level: 6, windowBits: 12, memLevel: 9 });
}
