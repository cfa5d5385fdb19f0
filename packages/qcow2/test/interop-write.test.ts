import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { isAllocatedAbove } from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { createQcow2Image, type Qcow2CreateOptions, type Qcow2Image, qcow2ImageInfo } from '../src/index';
import {
  firstDiff,
  openQcow2,
  prng,
  qemuImg,
  qemuImgJson,
  qemuIo,
  randomWorkload,
  readAllOurs,
  readAllQemu,
} from './helpers';

/* Images we create and write pass qemu-img check and compare equal to what we meant to write. */

async function qemuAgrees(path: string, expected: Buffer, dir: { file(n: string): string }): Promise<void> {
  const chk = await qemuImgJson(['check', path]);
  expect(chk['check-errors']).toBe(0);
  expect(chk.corruptions ?? 0).toBe(0);
  expect(chk.leaks ?? 0).toBe(0);
  const raw = dir.file(`expected-${Math.random().toString(36).slice(2)}.raw`);
  writeFileSync(raw, expected);
  await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', 'raw', path, raw]);
}

describe('images we create and write', () => {
  const configs: [string, Qcow2CreateOptions][] = [
    ['v3 64k', { size: 16 << 20 }],
    ['v2 64k', { size: 16 << 20, compat: '0.10' }],
    ['v3 512', { size: 4 << 20, clusterSize: 512 }],
    [
      'v3 512 refcount 64-bit (a refcount block per 64 clusters)',
      { size: 2 << 20, clusterSize: 512, refcountBits: 64 },
    ],
    ['v3 4k refcount 1-bit', { size: 8 << 20, clusterSize: 4096, refcountBits: 1 }],
    ['v3 64k refcount 64-bit, lazy refcounts', { size: 16 << 20, refcountBits: 64, lazyRefcounts: true }],
    ['v3 2M', { size: 8 << 20, clusterSize: 2 << 20 }],
    ['v3 64k metadata preallocation', { size: 16 << 20, preallocation: 'metadata' }],
  ];
  for (const [name, opts] of configs) {
    it(`${name}: random concurrent writes, zeroes and discards`, async () => {
      const d = makeTempDir();
      const f = d.file('img.qcow2');
      await createQcow2Image(f, opts);
      const pre = await qemuImgJson(['check', f]);
      expect(pre['check-errors']).toBe(0);
      expect(pre.leaks ?? 0).toBe(0);
      const size = opts.size!;
      const expected = Buffer.alloc(size);
      const { blk, close } = await openQcow2(f, { discard: 'unmap' });
      await randomWorkload(
        {
          blk,
          expected,
          rand: prng(size + (opts.clusterSize ?? 0)),
          zeroes: true,
          discard: true,
          cs: opts.clusterSize ?? 65536,
        },
        4,
        12,
        Math.min(300_000, size / 8),
      );
      expect(firstDiff(await blk.read(0, size), expected)).toBe(-1);
      await close();
      await qemuAgrees(f, expected, d);
      expect(firstDiff(await readAllOurs(f), expected)).toBe(-1);
    });
  }

  it('qemu-img info agrees on size, cluster size, compat, refcount bits and backing', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    await createQcow2Image(base, { size: 3 << 20, compat: '0.10', clusterSize: 4096 });
    const top = d.file('top.qcow2');
    await createQcow2Image(top, {
      backingFile: 'base.qcow2',
      backingFormat: 'qcow2',
      refcountBits: 8,
      lazyRefcounts: true,
    });
    for (const f of [base, top]) {
      const q = await qemuImgJson(['info', f]);
      const { node, close } = await openQcow2(f, {}, true);
      const img = node.opaque as Qcow2Image;
      expect(node.length).toBe(q['virtual-size']);
      expect(img.cs).toBe(q['cluster-size']);
      const ours = node.driver.info!(node)!;
      for (const k of Object.keys(q['format-specific'].data))
        expect([k, ours[k]]).toEqual([k, q['format-specific'].data[k]]);
      expect(img.header.backingFile).toBe(q['backing-filename']);
      expect(img.header.backingFormat).toBe(q['backing-filename-format']);
      await close();
      // The same without a graph (what the CLI's info prints).
      const standalone = await qcow2ImageInfo(f);
      for (const k of [
        'virtual-size',
        'cluster-size',
        'format-specific',
        'backing-filename',
        'backing-filename-format',
        'dirty-flag',
      ]) {
        expect([k, standalone[k as keyof typeof standalone]]).toEqual([k, q[k]]);
      }
    }
  });

  it('partial-cluster writes over a backing file copy the rest of the cluster from it', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
    await qemuIo([base], ['write -P 0x5a 0 8M']);
    const top = d.file('top.qcow2');
    await createQcow2Image(top, { backingFile: base, backingFormat: 'qcow2', clusterSize: 65536 });
    const expected = readFileSync(
      await (async () => {
        const r = d.file('b.raw');
        await qemuImg(['convert', '-O', 'raw', base, r]);
        return r;
      })(),
    );
    const { blk, node, close } = await openQcow2(top);
    expect(node.backing?.node.driver.name).toBe('qcow2');
    expect(node.backing?.node.readOnly).toBe(true);
    await randomWorkload({ blk, expected, rand: prng(7), zeroes: true }, 5, 12, 100_000);
    // Allocation information through the chain: the top owns written clusters only.
    const st = await isAllocatedAbove(node, null, false, 7 << 20, 4096);
    expect(st.allocated).toBe(true);
    await close();
    await qemuAgrees(top, expected, d);
    expect(firstDiff(await readAllQemu(top, d), expected)).toBe(-1);
  });

  it('writing into an image with internal snapshots leaves the snapshots intact', async () => {
    const d = makeTempDir();
    const f = d.file('snap.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', f, '4M']);
    await qemuIo([f], ['write -P 0x31 0 4M']);
    await qemuImg(['snapshot', '-c', 'one', f]);
    const snapRaw = d.file('one.raw');
    await qemuImg(['convert', '-O', 'raw', '-l', 'snapshot.name=one', f, snapRaw]);
    const expected = readFileSync(snapRaw);
    const { blk, close } = await openQcow2(f);
    await randomWorkload({ blk, expected, rand: prng(11), zeroes: true }, 4, 10, 150_000);
    await close();
    await qemuAgrees(f, expected, d);
    const again = d.file('one-again.raw');
    await qemuImg(['convert', '-O', 'raw', '-l', 'snapshot.name=one', f, again]);
    expect(readFileSync(again).equals(readFileSync(snapRaw))).toBe(true);
  });

  it('writes over compressed, zero and preallocated-zero clusters of a qemu-made image', async () => {
    const d = makeTempDir();
    const src = d.file('src.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '8M']);
    await qemuIo([src], ['write -P 0x21 0 8M']);
    const f = d.file('c.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, f]);
    await qemuIo([f], ['write -P 0x22 2M 1M', 'write -z 2M 256k', 'write -z -u 4M 256k', 'write -z 6M 100k']);
    const expected = await readAllQemu(f, d);
    const { blk, close } = await openQcow2(f, { discard: 'unmap' });
    await randomWorkload({ blk, expected, rand: prng(99), zeroes: true, discard: true }, 5, 12, 120_000);
    await close();
    await qemuAgrees(f, expected, d);
    const chk = await qemuImgJson(['check', f]);
    expect(chk['compressed-clusters'] ?? 0).toBeLessThan(128);
  });

  it('grows the refcount table and L1 table (512-byte clusters, 64-bit refcounts, resize)', async () => {
    const d = makeTempDir();
    const f = d.file('small.qcow2');
    // One refcount table cluster covers 64 blocks of 64 clusters: 2 MiB of file.
    await createQcow2Image(f, { size: 1 << 20, clusterSize: 512, refcountBits: 64 });
    const { blk, node, close } = await openQcow2(f);
    await blk.truncate(4 << 20);
    expect(node.length).toBe(4 << 20);
    const expected = Buffer.alloc(4 << 20);
    const chunk = Buffer.alloc(256 << 10);
    for (let off = 0; off < 4 << 20; off += 256 << 10) {
      chunk.fill((off >> 18) + 1);
      chunk.copy(expected, off);
      await blk.write(off, chunk);
    }
    const img = node.opaque as Qcow2Image;
    expect(img.refcounts.tableClusters).toBeGreaterThan(1);
    expect(img.header.l1Size).toBe(128);
    await close();
    await qemuAgrees(f, expected, d);
    expect((await qemuImgJson(['info', f]))['virtual-size']).toBe(4 << 20);
  });

  it('makeEmpty drops all data (reads through to the backing file) and shrinks the file', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    await createQcow2Image(base, { size: 8 << 20 });
    const b = await openQcow2(base);
    await b.blk.write(0, Buffer.alloc(8 << 20, 0x42));
    await b.close();
    const top = d.file('top.qcow2');
    await createQcow2Image(top, { backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    const emptySize = statSync(top).size;
    const { blk, close } = await openQcow2(top);
    await blk.write(12345, Buffer.alloc(5 << 20, 0x43));
    await blk.flush();
    expect(statSync(top).size).toBeGreaterThan(5 << 20);
    await blk.makeEmpty();
    expect((await blk.read(12345, 100)).every((x) => x === 0x42)).toBe(true);
    expect((await blk.blockStatus(0, 8 << 20)).depth).toBe(1);
    // Still usable afterwards; the freed space is reused and the file is cut on close.
    await blk.write(1 << 20, Buffer.alloc(4096, 0x44));
    await close();
    expect(statSync(top).size).toBeLessThanOrEqual(emptySize + 2 * 65536);
    const expected = Buffer.alloc(8 << 20, 0x42);
    expected.fill(0x44, 1 << 20, (1 << 20) + 4096);
    await qemuAgrees(top, expected, d);
  });

  it('reuses clusters freed by discard', async () => {
    const d = makeTempDir();
    const f = d.file('reuse.qcow2');
    await createQcow2Image(f, { size: 32 << 20 });
    let h = await openQcow2(f, { discard: 'unmap' });
    await h.blk.write(0, Buffer.alloc(8 << 20, 1));
    await h.close();
    const full = statSync(f).size;
    h = await openQcow2(f, { discard: 'unmap' });
    await h.blk.discard(0, 8 << 20);
    await h.close();
    h = await openQcow2(f, { discard: 'unmap' });
    await h.blk.write(16 << 20, Buffer.alloc(8 << 20, 2));
    await h.close();
    expect(statSync(f).size).toBeLessThanOrEqual(full);
    const expected = Buffer.alloc(32 << 20);
    expected.fill(2, 16 << 20, 24 << 20);
    await qemuAgrees(f, expected, d);
  });
});
