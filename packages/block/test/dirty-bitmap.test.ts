import { describe, expect, it } from 'vitest';
import { addDirtyBitmap, BlockBackend, DirtyBitmap, Perm } from '../src/index';
import { testGraph } from './helpers';

describe('DirtyBitmap', () => {
  it('sets whole granules and counts dirty bytes', () => {
    const b = new DirtyBitmap(1 << 20, 65536);
    b.set(100, 1);
    expect(b.count()).toBe(65536);
    b.set(65535, 2);
    expect(b.count()).toBe(2 * 65536);
    expect([...b.dirtyExtents()]).toEqual([[0, 131072]]);
    b.reset(0, 65536);
    expect([...b.dirtyExtents()]).toEqual([[65536, 65536]]);
    b.setAll();
    expect(b.count()).toBe(1 << 20);
    b.clear();
    expect(b.count()).toBe(0);
    expect(b.nextDirty(0)).toBe(-1);
  });

  it('handles ranges across word boundaries and a short last granule', () => {
    const b = new DirtyBitmap(100 * 512 + 100, 512);
    b.set(31 * 512, 40 * 512);
    expect(b.count()).toBe(40 * 512);
    expect([...b.dirtyExtents(0, b.length, 10 * 512)]).toEqual([
      [31 * 512, 5120],
      [41 * 512, 5120],
      [51 * 512, 5120],
      [61 * 512, 5120],
    ]);
    b.set(b.length - 1, 1);
    expect(b.count()).toBe(40 * 512 + 100);
    expect(b.nextClean(31 * 512)).toBe(71 * 512);
  });

  it('merges, copies, truncates and validates granularity', () => {
    const a = new DirtyBitmap(1 << 20, 4096);
    const c = new DirtyBitmap(1 << 20, 4096);
    a.set(0, 4096);
    c.set(8192, 4096);
    a.merge(c);
    expect([...a.dirtyExtents()]).toEqual([
      [0, 4096],
      [8192, 4096],
    ]);
    const copy = a.copy();
    a.clear();
    expect(copy.count()).toBe(8192);
    copy.truncate(4096);
    expect(copy.count()).toBe(4096);
    expect(() => new DirtyBitmap(1024, 1000)).toThrow(
      'Granularity must be power of 2 between 512 and 2147483648',
    );
    expect(() => a.merge(new DirtyBitmap(1 << 20, 512))).toThrow(/incompatible/);
  });

  it('is set by every write through its node while enabled', async () => {
    const g = testGraph();
    const n = await g.open({ driver: 'test-mem', discard: 'unmap' });
    const bm = addDirtyBitmap(n, { name: 'b0', granularity: 4096 });
    expect(() => addDirtyBitmap(n, { name: 'b0' })).toThrow('Bitmap already exists: b0');
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(n);
    await blk.write(5000, Buffer.alloc(10));
    await blk.writeZeroes(20480, 4096);
    await blk.discard(40960, 4096);
    await blk.read(81920, 4096);
    expect([...bm.dirtyExtents()]).toEqual([
      [4096, 4096],
      [20480, 4096],
      [40960, 4096],
    ]);
    bm.enabled = false;
    await blk.write(90000, Buffer.alloc(1));
    expect(bm.count()).toBe(3 * 4096);
  });
});

describe('DirtyBitmap bytes (qcow2 persistent bitmaps)', () => {
  it('toBytes and orBytes round-trip, little-endian bit order, nothing past the end', () => {
    // 100 granules of 512 bytes: 100 bits, the last word partly used.
    const b = new DirtyBitmap(100 * 512, 512);
    b.set(0, 512); // bit 0
    b.set(9 * 512, 512); // bit 9
    b.set(99 * 512, 512); // bit 99, the last
    const bytes = b.toBytes(0, 16);
    expect(bytes[0]).toBe(0x01);
    expect(bytes[1]).toBe(0x02);
    expect(bytes[12]).toBe(0x08);
    const c = new DirtyBitmap(100 * 512, 512);
    c.orBytes(0, bytes);
    expect([...c.dirtyExtents()]).toEqual([...b.dirtyExtents()]);
    expect(c.count()).toBe(3 * 512);
    // All ones in: bits past the 100th stay clear, the count is exact.
    const d = new DirtyBitmap(100 * 512, 512);
    d.orBytes(0, Buffer.alloc(16, 0xff));
    expect(d.count()).toBe(100 * 512);
  });
});
