import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { sparse } from '../src/drivers/file/sparse';
import {
  BlockBackend,
  blockStatus,
  blockStatusAbove,
  createGraph,
  isAllocatedAbove,
  PERM_ALL,
  Perm,
} from '../src/index';
import { testGraph } from './helpers';

describe('file block status', () => {
  it.runIf(sparse.available)('reports holes and data of a sparse file', async () => {
    const f = makeTempDir().file('sparse.img');
    const fd = openSync(f, 'w');
    ftruncateSync(fd, 4 << 20);
    writeSync(fd, Buffer.alloc(65536, 1), 0, 65536, 1 << 20);
    closeSync(fd);
    const g = createGraph();
    const n = await g.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    const first = await blockStatus(n, 0, 4 << 20);
    expect(first).toMatchObject({ data: false, zero: true, allocated: true, bytes: 1 << 20 });
    const data = await blockStatus(n, 1 << 20, 3 << 20);
    expect(data.data).toBe(true);
    expect(data.bytes).toBeGreaterThanOrEqual(65536);
    expect(data.bytes).toBeLessThan(3 << 20);
  });

  it.runIf(sparse.available)('punches holes for zero writes with may-unmap and discards', async () => {
    const f = makeTempDir().file('d.img');
    const fd = openSync(f, 'w');
    writeSync(fd, Buffer.alloc(1 << 20, 7));
    closeSync(fd);
    const g = createGraph();
    const n = await g.open({ driver: 'file', filename: f, discard: 'unmap' });
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(n);
    // Data before: remembered as one data extent, which the holes made below must clear.
    expect(await blockStatus(n, 0, 1 << 20)).toMatchObject({ data: true, bytes: 1 << 20 });
    await blk.writeZeroes(0, 256 << 10, 0x2 /* MAY_UNMAP */);
    expect((await blockStatus(n, 0, 1 << 20)).data).toBe(false);
    expect((await blk.read(0, 256 << 10)).every((x) => x === 0)).toBe(true);
    expect((await blockStatus(n, 512 << 10, 4096)).data).toBe(true);
    await blk.discard(512 << 10, 256 << 10);
    expect((await blockStatus(n, 512 << 10, 256 << 10)).data).toBe(false);
    expect((await blk.read(256 << 10, 4)).every((x) => x === 7)).toBe(true);
  });
});

describe('chains', () => {
  async function chain() {
    const g = testGraph();
    const base = await g.open({ driver: 'test-cow', 'node-name': 'base' });
    const mid = await g.open({ driver: 'test-cow', 'node-name': 'mid', backing: 'base' });
    const top = await g.open({ driver: 'test-cow', 'node-name': 'top', backing: 'mid' });
    const wr = (n: typeof base) => {
      const b = new BlockBackend(g, { perm: Perm.WRITE | Perm.CONSISTENT_READ, shared: PERM_ALL });
      b.attach(n);
      return b;
    };
    await wr(base).write(0, Buffer.alloc(4096, 1));
    await wr(mid).write(8192, Buffer.alloc(4096, 2));
    const tb = wr(top);
    await tb.write(16384, Buffer.alloc(4096, 3));
    return { g, base, mid, top, tb };
  }

  it('reads fall through the chain', async () => {
    const { tb } = await chain();
    const b = await tb.read(0, 5 * 4096);
    expect([b[0], b[4096], b[8192], b[12288], b[16384]]).toEqual([1, 0, 2, 0, 3]);
  });

  it('isAllocatedAbove looks at the layers above base only', async () => {
    const { top, mid, base } = await chain();
    expect(await isAllocatedAbove(top, null, false, 0, 4096)).toMatchObject({ allocated: true, depth: 2 });
    expect(await isAllocatedAbove(top, base, false, 0, 4096)).toMatchObject({ allocated: false });
    expect(await isAllocatedAbove(top, base, true, 0, 4096)).toMatchObject({ allocated: true });
    expect(await isAllocatedAbove(top, base, false, 8192, 4096)).toMatchObject({ allocated: true, depth: 1 });
    expect(await isAllocatedAbove(top, mid, false, 8192, 4096)).toMatchObject({ allocated: false });
    const r = await isAllocatedAbove(top, null, false, 4096, 4 * 4096);
    expect(r).toEqual({ allocated: false, bytes: 4096, depth: 3 });
  });

  it('content status says where data and holes are', async () => {
    const { tb } = await chain();
    expect(await tb.blockStatus(0, 4096)).toMatchObject({ data: true, depth: 2 });
    expect(await tb.blockStatus(4096, 4096)).toMatchObject({ data: false, zero: true });
    expect(await tb.blockStatus(16384, 8192)).toMatchObject({ data: true, depth: 0, bytes: 4096 });
  });
});

describe('status at the end of a file', () => {
  it('the last extent of a fully written raw image is data, not zero', async () => {
    const f = makeTempDir().file('full.img');
    const fd = openSync(f, 'w');
    writeSync(fd, Buffer.alloc(1 << 20, 1));
    closeSync(fd);
    const g = createGraph();
    const n = await g.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    expect(await blockStatus(n, 512 << 10, 512 << 10)).toMatchObject({ data: true, zero: false, eof: true });
  });
});

describe('block status answers', () => {
  // The NBD server asks for the status of every read: an answer in V8's dictionary mode (made by
  // deleting properties) slowed each later use of it (measured, 4 KiB reads over NBD 0.85 -> 1.41
  // of qemu-storage-daemon once it was not). This worker may use V8's natives syntax to check.
  setFlagsFromString('--allow-natives-syntax');
  const fastProperties = new Function('o', 'return %HasFastProperties(o)') as (o: object) => boolean;

  it('are plain objects with fast properties and no driver hints, through raw to the file', async () => {
    const f = makeTempDir().file('fast.img');
    const fd = openSync(f, 'w');
    writeSync(fd, Buffer.alloc(65536, 1), 0, 65536, 0);
    ftruncateSync(fd, 1 << 20);
    closeSync(fd);
    const g = createGraph();
    const n = await g.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    for (const st of [await blockStatus(n, 0, 4096), await blockStatusAbove(n, null, 0, 4096)]) {
      expect(st).toMatchObject({ data: true, allocated: true });
      expect(st).not.toHaveProperty('recurse');
      expect(st).not.toHaveProperty('recurseZero');
      expect(fastProperties(st)).toBe(true);
    }
    await g.closeAll();
  });
});
