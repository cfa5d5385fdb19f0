import { writeFileSync } from 'node:fs';
import { BlockBackend, blockStatus, blockStatusAbove, PERM_ALL, Perm, ReqFlags } from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { applySnapshot, createQcow2Image, createSnapshot, type Qcow2Image } from '../src/index';
import {
  firstDiff,
  openQcow2,
  patch,
  peek,
  prng,
  qcowGraph,
  qemu,
  qemuImg,
  qemuImgJson,
  qemuIo,
  randomWorkload,
} from './helpers';

/* Driver behaviour: concurrency on one cluster, cache pressure, allocation maps, reopen. */

/** A new image written full of one byte through our driver. */
async function filledImage(path: string, size: number, byte: number): Promise<void> {
  await createQcow2Image(path, { size });
  const o = await openQcow2(path);
  await o.blk.write(0, Buffer.alloc(size, byte));
  await o.close();
}

async function clean(path: string): Promise<void> {
  const r = JSON.parse((await qemu(['check', '--output=json', path], [0, 2, 3])).stdout);
  expect([r.corruptions ?? 0, r.leaks ?? 0, r['check-errors']]).toEqual([0, 0, 0]);
}

describe('qcow2 driver', () => {
  it('concurrent writes into one new cluster all land (allocation of the same cluster is serialised)', async () => {
    const d = makeTempDir();
    const f = d.file('c.qcow2');
    await createQcow2Image(f, { size: 4 << 20 });
    const { blk, close } = await openQcow2(f);
    const writes = Array.from({ length: 16 }, (_, i) =>
      blk.write(65536 + i * 4096, Buffer.alloc(4096, i + 1)),
    );
    await Promise.all(writes);
    const got = await blk.read(65536, 65536);
    for (let i = 0; i < 16; i++) expect(got[i * 4096 + 100]).toBe(i + 1);
    await close();
    await clean(f);
  });

  it('keeps working with an L2 cache of two tables (eviction and write-back under load)', async () => {
    const d = makeTempDir();
    const f = d.file('tiny-cache.qcow2');
    await createQcow2Image(f, { size: 8 << 20, clusterSize: 512 });
    const expected = Buffer.alloc(8 << 20);
    const { blk, node, close } = await openQcow2(f, { 'l2-cache-size': 1024 });
    await randomWorkload({ blk, expected, rand: prng(5), zeroes: true }, 6, 16, 60_000);
    expect((node.opaque as Qcow2Image).cache.size).toBeLessThanOrEqual(8);
    expect(firstDiff(await blk.read(0, 8 << 20), expected)).toBe(-1);
    await close();
    await clean(f);
    const { blk: b2, close: c2 } = await openQcow2(f, { 'l2-cache-size': 1024 }, true);
    expect(firstDiff(await b2.read(0, 8 << 20), expected)).toBe(-1);
    await c2();
  });

  it('block status through a chain agrees with qemu-img map', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    const top = d.file('top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
    await qemuIo([base], ['write -P 1 0 1M', 'write -P 2 3M 512k']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await qemuIo([top], ['write -P 3 512k 1M', 'write -z 3M 128k', 'write -P 4 2M 64k']);
    const map: { start: number; length: number; depth: number; zero: boolean; data: boolean }[] =
      await qemuImgJson(['map', top]);
    const { node, close } = await openQcow2(top, {}, true);
    for (const e of map) {
      for (let off = e.start; off < e.start + e.length; ) {
        const st = await blockStatusAbove(node, null, off, e.start + e.length - off);
        expect([off, st.depth, st.data, st.zero]).toEqual([off, e.depth, e.data, e.zero]);
        off += st.bytes;
      }
    }
    await close();
  });

  it('reopens read-only and back to read-write', async () => {
    const d = makeTempDir();
    const f = d.file('r.qcow2');
    await createQcow2Image(f, { size: 4 << 20 });
    const { blk, node, close } = await openQcow2(f);
    await blk.write(0, Buffer.alloc(70000, 9));
    blk.setPerm(Perm.CONSISTENT_READ, PERM_ALL);
    await node.graph.reopenMultiple([{ node, readOnly: true }]);
    // Going read-only wrote everything out: the image is clean while still open.
    await clean(f);
    await expect(blk.write(0, Buffer.alloc(512))).rejects.toThrow();
    await node.graph.reopenMultiple([{ node, readOnly: false }]);
    blk.setPerm(Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL);
    await blk.write(1 << 20, Buffer.alloc(512, 8));
    expect((await blk.read(1 << 20, 1))[0]).toBe(8);
    await close();
    await clean(f);
  });

  it('shrinks (the data before the new end kept); v2 write-zeroes fall back to writing zeroes', async () => {
    const d = makeTempDir();
    const f = d.file('v2.qcow2');
    await createQcow2Image(f, { size: 4 << 20, compat: '0.10' });
    const { blk, close } = await openQcow2(f);
    await blk.write(0, Buffer.alloc(4 << 20, 3));
    await blk.truncate(1 << 20);
    expect(blk.getLength()).toBe(1 << 20);
    expect((await blk.read(0, 1 << 20)).every((b) => b === 3)).toBe(true);
    await blk.write(0, Buffer.alloc(256 << 10, 5));
    await blk.writeZeroes(0, 128 << 10);
    const got = await blk.read(0, 256 << 10);
    expect(got.subarray(0, 128 << 10).every((b) => b === 0)).toBe(true);
    expect(got[200 << 10]).toBe(5);
    await close();
    await clean(f);
  });

  it('compressed writes: packed clusters read back; allocated clusters and raw nodes refuse them', async () => {
    const d = makeTempDir();
    const f = d.file('c.qcow2');
    await createQcow2Image(f, { size: 1 << 20, clusterSize: 4096 });
    const { blk, close } = await openQcow2(f);
    // Several compressed clusters share host clusters; one that does not compress is stored plainly.
    const clusters = [0, 1, 2, 3].map((k) => Buffer.alloc(4096, 0x41 + k));
    const next = prng(7);
    const noise = Buffer.alloc(4096);
    for (let i = 0; i < noise.length; i += 4) noise.writeUInt32LE(Math.floor(next() * 2 ** 32), i);
    for (const [k, c] of clusters.entries()) await blk.write(k * 4096, c, ReqFlags.WRITE_COMPRESSED);
    await blk.write(8 * 4096, noise, ReqFlags.WRITE_COMPRESSED);
    for (const [k, c] of clusters.entries()) expect((await blk.read(k * 4096, 4096)).equals(c)).toBe(true);
    expect((await blk.read(8 * 4096, 4096)).equals(noise)).toBe(true);
    await expect(blk.write(0, clusters[1]!, ReqFlags.WRITE_COMPRESSED)).rejects.toMatchObject({
      errno: 'EIO',
    });
    await expect(blk.write(100, clusters[1]!, ReqFlags.WRITE_COMPRESSED)).rejects.toMatchObject({
      errno: 'EINVAL',
    });
    await close();
    await qemuImg(['check', f]);
    const io = await qemuIo(['-f', 'qcow2', f], ['read -P 0x41 0 4k', 'read -P 0x44 12k 4k']);
    expect(io.stdout).not.toContain('verification failed');
    const g = qcowGraph();
    writeFileSync(d.file('r.raw'), Buffer.alloc(65536));
    const raw = await g.open({ driver: 'raw', file: { driver: 'file', filename: d.file('r.raw') } });
    const rblk = new BlockBackend(g, { perm: Perm.WRITE | Perm.CONSISTENT_READ, shared: PERM_ALL });
    rblk.attach(raw);
    await expect(rblk.write(0, Buffer.alloc(4096, 1), ReqFlags.WRITE_COMPRESSED)).rejects.toMatchObject({
      errno: 'ENOTSUP',
    });
    await g.closeAll();
  });

  it('a compressed write after makeEmpty never packs into the cluster the last one used (it may hold other data now)', async () => {
    const d = makeTempDir();
    const f = d.file('p.qcow2');
    await createQcow2Image(f, { size: 1 << 20 });
    const { blk, close } = await openQcow2(f);
    // A compressed cluster leaves room in its host cluster for the next one.
    await blk.write(0, Buffer.alloc(65536, 0x41), ReqFlags.WRITE_COMPRESSED);
    await blk.makeEmpty();
    // An L2 table and a data cluster: the two lowest free clusters, the packed one among them.
    const plain = Buffer.alloc(65536, 0x42);
    await blk.write(65536, plain);
    await blk.write(2 * 65536, Buffer.alloc(65536, 0x43), ReqFlags.WRITE_COMPRESSED);
    expect((await blk.read(65536, 65536)).equals(plain)).toBe(true);
    await close();
    await clean(f);
    const io = await qemuIo(['-f', 'qcow2', f], ['read -P 0x42 64k 64k', 'read -P 0x43 128k 64k']);
    expect(io.stdout).not.toContain('verification failed');
  });

  it('discard=unmap punches freed clusters out of the file, never ones a snapshot still uses', async () => {
    const d = makeTempDir();
    const f = d.file('p.qcow2');
    await createQcow2Image(f, { size: 4 << 20 });
    let { blk, node, close } = await openQcow2(f, {
      discard: 'unmap',
      file: { driver: 'file', filename: f, discard: 'unmap' },
    });
    // Where each guest range's clusters sit in the file, and whether the file holds data there.
    // (st_blocks would not do: ext4 may add an extent-tree block when a punch splits an extent.)
    const hostRanges = async (offset: number, bytes: number) => {
      const out: { host: number; bytes: number }[] = [];
      for (let at = offset; at < offset + bytes; ) {
        const st = await blockStatus(node, at, offset + bytes - at);
        expect(st.data && st.offset !== undefined).toBe(true);
        out.push({ host: st.offset!, bytes: st.bytes });
        at += st.bytes;
      }
      return out;
    };
    const fileData = async (ranges: { host: number; bytes: number }[]) => {
      const seen = new Set<boolean>();
      for (const r of ranges)
        for (let at = r.host; at < r.host + r.bytes; ) {
          const st = await blockStatus(node.file!.node, at, r.host + r.bytes - at);
          seen.add(st.data);
          at += st.bytes;
        }
      return [...seen];
    };
    await blk.write(0, Buffer.alloc(2 << 20, 7));
    await blk.flush();
    const first = await hostRanges(0, 1 << 20);
    const second = await hostRanges(1 << 20, 1 << 20);
    expect(await fileData(first)).toEqual([true]);
    await blk.discard(0, 1 << 20);
    await blk.flush();
    expect(await fileData(first)).toEqual([false]); // every freed cluster is a hole in the file
    // A snapshot shares the rest: discarding it in the active layer leaves the file's data.
    await createSnapshot(node.opaque as Qcow2Image, 'keep');
    await blk.discard(1 << 20, 1 << 20);
    await blk.flush();
    expect(await fileData(second)).toEqual([true]);
    await close();
    ({ blk, node, close } = await openQcow2(f));
    await applySnapshot(node.opaque as Qcow2Image, 'keep');
    expect((await blk.read(1 << 20, 1 << 20)).every((b) => b === 7)).toBe(true);
    await close();
    await qemuImg(['check', f]);
  });

  it('takes its backing node by reference, or none with backing: null', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    const top = d.file('top.qcow2');
    await filledImage(base, 1 << 20, 0x33);
    // The header names a file that does not exist: only the given backing node is used.
    await createQcow2Image(top, { size: 1 << 20, backingFile: 'missing.qcow2', backingFormat: 'qcow2' });
    const g = qcowGraph();
    await g.open({
      driver: 'qcow2',
      'node-name': 'base0',
      'read-only': true,
      file: { driver: 'file', filename: base },
    });
    const node = await g.open({ driver: 'qcow2', backing: 'base0', file: { driver: 'file', filename: top } });
    expect(node.backing?.node.nodeName).toBe('base0');
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    blk.attach(node);
    expect((await blk.read(1000, 1))[0]).toBe(0x33);
    await blk.detach();
    await g.closeAll();
    await expect(openQcow2(top)).rejects.toThrow(/missing\.qcow2/);
    const alone = await openQcow2(top, { backing: null }, true);
    expect((await alone.blk.read(1000, 1))[0]).toBe(0);
    await alone.close();
  });

  it('grows while writes allocate L2 tables (no L1 update is lost)', async () => {
    const d = makeTempDir();
    const f = d.file('grow.qcow2');
    await createQcow2Image(f, { size: 1 << 20, clusterSize: 512 });
    const { blk, close } = await openQcow2(f);
    const expected = Buffer.alloc(4 << 20);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) {
      const off = i * 32768 + 1000;
      expected.fill(i + 1, off, off + 3000);
      writes.push(blk.write(off, Buffer.alloc(3000, i + 1)));
      if (i === 8) writes.push(blk.truncate(4 << 20));
    }
    await Promise.all(writes);
    expect(firstDiff(await blk.read(0, 4 << 20), expected)).toBe(-1);
    await close();
    await clean(f);
    const { blk: b2, close: c2 } = await openQcow2(f, {}, true);
    expect(firstDiff(await b2.read(0, 4 << 20), expected)).toBe(-1);
    await c2();
  });

  it('keeps header extensions it does not know', async () => {
    const d = makeTempDir();
    const f = d.file('ext.qcow2');
    await qemu(['create', '-q', '-f', 'qcow2', f, '4M']);
    // Walk the extensions to the end marker and put an unknown one there.
    const hdr = peek(f, 0, 65536);
    let off = hdr.readUInt32BE(100);
    while (hdr.readUInt32BE(off) !== 0) off += 8 + ((hdr.readUInt32BE(off + 4) + 7) & ~7);
    const ext = Buffer.alloc(24);
    ext.writeUInt32BE(0x12345678, 0);
    ext.writeUInt32BE(8, 4);
    ext.write('blockrep', 8);
    patch(f, off, ext);
    const { blk, node, close } = await openQcow2(f);
    expect((node.opaque as Qcow2Image).header.extensions.some((e) => e.type === 0x12345678)).toBe(true);
    await blk.write(0, Buffer.alloc(100_000, 4));
    await blk.truncate(8 << 20);
    await close();
    expect(peek(f, off, 24).equals(ext)).toBe(true);
    await clean(f);
  });

  it('allocates the L2 table before the data of the first write into it', async () => {
    const d = makeTempDir();
    const f = d.file('order.qcow2');
    await createQcow2Image(f, { size: 64 << 20 });
    const { blk, node, close } = await openQcow2(f);
    await blk.write(0, Buffer.alloc(1 << 20, 7));
    const img = node.opaque as Qcow2Image;
    const l2 = img.l2Offset(0);
    await close();
    const map = await qemuImgJson<{ start: number; offset?: number; data: boolean }[]>([
      'map',
      '--output=json',
      f,
    ]);
    const data = map.find((m) => m.data)!;
    expect(l2).toBeGreaterThan(0);
    expect(l2).toBeLessThan(data.offset!);
    await clean(f);
  });

  it('reserves clusters ahead while writes stream, and returns the unused ones on close', async () => {
    const d = makeTempDir();
    const f = d.file('stream.qcow2');
    await createQcow2Image(f, { size: 128 << 20 });
    const { blk, close } = await openQcow2(f);
    const expected = Buffer.alloc(64 << 20);
    // 64 MiB in 1 MiB writes, 8 in flight: the reservation grows (8, 16, 32 MiB...) and is made
    // ahead while the pool drains.
    let next = 0;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < 64) {
          const i = next++;
          const b = Buffer.alloc(1 << 20, (i % 250) + 1);
          b.copy(expected, i << 20);
          await blk.write(i << 20, b);
        }
      }),
    );
    expect(firstDiff(await blk.read(0, 64 << 20), expected)).toBe(-1);
    await close();
    await clean(f);
    // The file holds the data and its metadata, not the reservation (it was returned and cut).
    const info = await qemuImgJson<{ 'actual-size': number }>(['info', '--output=json', f]);
    expect(info['actual-size']).toBeLessThan((64 << 20) + (2 << 20));
    const q = await qemuIo(['-f', 'qcow2', f], ['read -P 1 0 1M', 'read -P 64 63M 1M', 'read -P 0 64M 64M']);
    expect(q.stdout).not.toMatch(/fail|mismatch/i);
    // Moves over 100 MiB: slow when CI runs every package at once.
  }, 60_000);

  it('takes a reservation made ahead that does not follow the pool (freed clusters reused)', async () => {
    const d = makeTempDir();
    const f = d.file('holes.qcow2');
    await createQcow2Image(f, { size: 128 << 20 });
    // Fill 48 MiB, close (the file ends there), free a 16 MiB run in the middle by discarding.
    let o = await openQcow2(f, { discard: 'unmap' });
    for (let i = 0; i < 48; i++) await o.blk.write(i << 20, Buffer.alloc(1 << 20, 1));
    await o.blk.discard(16 << 20, 16 << 20);
    await o.close();
    await clean(f);
    // New writes reuse the hole first, then need clusters past the end: a run that does not
    // follow the pool's, reserved ahead while the hole is used up.
    o = await openQcow2(f);
    const expected = Buffer.alloc(128 << 20);
    expected.fill(1, 0, 48 << 20);
    expected.fill(0, 16 << 20, 32 << 20);
    let next = 48;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < 112) {
          const i = next++;
          const b = Buffer.alloc(1 << 20, (i % 200) + 2);
          b.copy(expected, i << 20);
          await o.blk.write(i << 20, b);
        }
      }),
    );
    expect(firstDiff(await o.blk.read(0, 128 << 20), expected)).toBe(-1);
    await o.close();
    await clean(f);
    const q = await qemuIo(
      ['-f', 'qcow2', f],
      [
        'read -P 1 0 16M',
        'read -P 0 16M 16M',
        'read -P 1 32M 16M',
        'read -P 50 48M 1M',
        'read -P 113 111M 1M',
      ],
    );
    expect(q.stdout).not.toMatch(/fail|mismatch/i);
    // Moves over 100 MiB: slow when CI runs every package at once.
  }, 60_000);

  it.each(['1.1', '0.10'] as const)(
    'growing an overlay (compat %s) over a longer backing file: the new area reads as zeroes',
    async (compat) => {
      const d = makeTempDir();
      const base = d.file('base.qcow2');
      const top = d.file('top.qcow2');
      await filledImage(base, 4 << 20, 0x44);
      await createQcow2Image(top, { size: 1 << 20, backingFile: base, backingFormat: 'qcow2', compat });
      const { blk, close } = await openQcow2(top);
      const size = (3 << 20) + 4608; // not a whole number of clusters
      await blk.truncate(size, { exact: false, prealloc: 'off' });
      const got = await blk.read(0, size);
      expect(got.length).toBe(size);
      expect(got.subarray(0, 1 << 20).every((x) => x === 0x44)).toBe(true);
      expect(got.subarray(1 << 20).every((x) => x === 0)).toBe(true);
      await close();
      await clean(top);
      // QEMU sees the same: the old part from the backing file, zeroes after it.
      const q = await qemuIo(['-f', 'qcow2', top], ['read -P 0x44 0 1M', `read -P 0 1M ${size - (1 << 20)}`]);
      expect(q.stdout).not.toMatch(/fail|mismatch/i);
    },
  );
});
