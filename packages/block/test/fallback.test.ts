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
    // Without the addon there are no image locks: opening is refused unless locking=off says so.
    await expect(g.open({ driver: 'file', filename: f })).rejects.toThrow(
      /Image locking is not available: the native addon of @blockrep\/block did not load \(disabled by BLOCKREP_NO_SPARSE_ADDON\)/,
    );
    const n = await g.open({ driver: 'file', filename: f, discard: 'unmap', locking: 'off' });
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
    expect(m.nativeAddon()).toEqual({ loaded: false, reason: 'disabled by BLOCKREP_NO_SPARSE_ADDON' });
  });

  it('opens without locks when BLOCKREP_LOCKING=warn, with one warning', async () => {
    const m = await import('../src/index');
    const f = makeTempDir().file('w.img');
    writeFileSync(f, Buffer.alloc(4096));
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    process.env.BLOCKREP_LOCKING = 'warn';
    try {
      const g = m.createGraph();
      await g.open({ driver: 'file', filename: f });
      await g.open({ driver: 'file', filename: f, 'read-only': true });
      await new Promise((r) => setImmediate(r));
      expect(warnings.filter((w) => w.startsWith('image locking is off'))).toHaveLength(1);
    } finally {
      delete process.env.BLOCKREP_LOCKING;
      process.off('warning', onWarning);
    }
  });
});
