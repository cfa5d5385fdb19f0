import { describe, expect, it } from 'vitest';
import { Qcow2Refcounts, refGet } from '../src/refcount';
import type { Qcow2Storage } from '../src/storage';

/* The refcount cache on its own, over a storage whose reads wait until the test lets them go. */

function slowStorage(image: Buffer) {
  const waiting: (() => void)[] = [];
  const storage: Qcow2Storage = {
    filename: 'slow',
    readv: async (offset, bytes, iov) => {
      await new Promise<void>((r) => waiting.push(r));
      image.copy(iov[0]!, 0, offset, offset + bytes);
    },
    write: async () => {},
    flush: async () => {},
    length: async () => image.length,
    truncate: async () => {},
  };
  const release = () => {
    for (const r of waiting.splice(0)) r();
  };
  return { storage, release };
}

describe('qcow2 refcount cache', () => {
  it('a block load still in flight when makeEmpty replaces the blocks does not bring the old block back', async () => {
    const cs = 512;
    // Reftable at cluster 1 pointing to a refcount block at cluster 2, which counts cluster 5 once.
    const image = Buffer.alloc(8 * cs);
    image.writeBigUInt64BE(2n * BigInt(cs), cs);
    image.writeUInt16BE(1, 2 * cs + 5 * 2);
    const { storage, release } = slowStorage(image);
    const rc = new Qcow2Refcounts(
      storage,
      { clusterBits: 9, refcountOrder: 4, tableOffset: cs, tableClusters: 1 },
      image.subarray(cs, 2 * cs),
      image.length,
    );
    const loading = rc.get(5);
    rc.replaceAll(new Map([[0, Buffer.alloc(cs)]]), image.length);
    release();
    // The reader that raced makeEmpty, and every later one, see the new block.
    expect(await loading).toBe(0);
    expect(await rc.get(5)).toBe(0);
    const b = await rc.block(0);
    expect(b && refGet(b, 5, 16)).toBe(0);
  });
});
