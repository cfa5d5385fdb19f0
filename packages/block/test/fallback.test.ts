import { readFileSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

// Without the sparse addon the file driver must still be correct: zero writes write zeroes, and
// block status reports data (never a false hole).
describe('file driver without the sparse addon', () => {
  beforeAll(() => {
    process.env.BLOCKREP_NO_SPARSE_ADDON = '1';
    vi.resetModules();
  });
  afterAll(() => {
    delete process.env.BLOCKREP_NO_SPARSE_ADDON;
  });

  it('falls back to writing zeroes and conservative status', async () => {
    const m = await import('../src/index');
    const { sparse } = await import('../src/drivers/file/sparse');
    expect(sparse.available).toBe(false);
    const f = makeTempDir().file('d.img');
    writeFileSync(f, Buffer.alloc(65536, 5));
    const g = m.createGraph();
    const n = await g.open({ driver: 'file', filename: f, discard: 'unmap' });
    const blk = new m.BlockBackend(g, { perm: m.Perm.CONSISTENT_READ | m.Perm.WRITE });
    blk.attach(n);
    await blk.writeZeroes(4096, 8192, m.ReqFlags.MAY_UNMAP);
    await blk.discard(0, 4096);
    await blk.flush();
    const disk = readFileSync(f);
    expect(disk.subarray(4096, 12288).every((x) => x === 0)).toBe(true);
    expect(disk[0]).toBe(5);
    expect(disk[12288]).toBe(5);
    expect(await m.blockStatus(n, 0, 65536)).toMatchObject({ data: true, bytes: 65536 });
  });
});
