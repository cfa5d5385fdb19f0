import { closeSync, copyFileSync, openSync, readSync, writeSync } from 'node:fs';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { bitmapExtents, blockrep, qemuImg, qemuImgJson, qemuIo, sameAsQemuImg } from './helpers';

/*
 * convert's options beyond the basics (--target-image-opts, --target-is-zero, --bitmaps,
 * --skip-broken-bitmaps, --salvage, -l, -C, -W, -r, -m, -S), each run by qemu-img and blockrep on
 * copies of the same images: same messages, exit codes and resulting images.
 */

const qemu = hasPeer('qemu-img', 'qemu-io');

/** The map of an image without host offsets (where each program put a cluster is its own affair). */
async function layout(file: string, fmt = 'qcow2') {
  const map = await qemuImgJson<Record<string, unknown>[]>(['map', '-f', fmt, file]);
  return map.map(({ offset: _o, ...e }) => e);
}

/** Each side's own copy of the images: returns the paths for qemu-img's side and ours. */
function twoCopies(dir: ReturnType<typeof makeTempDir>, files: string[]) {
  const q: Record<string, string> = {};
  const b: Record<string, string> = {};
  for (const f of files) {
    q[f] = dir.file(`q-${f}`);
    b[f] = dir.file(`b-${f}`);
    copyFileSync(dir.file(f), q[f]);
    copyFileSync(dir.file(f), b[f]);
  }
  const swap = files.map((f): [string, string] => [q[f]!, b[f]!]);
  return { q, b, swap };
}

/** A qcow2 source with two internal snapshots, data, zero clusters and holes. */
async function snapshotSource(dir: ReturnType<typeof makeTempDir>) {
  const src = dir.file('sn.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', src, '4M']);
  await qemuIo([src], ['write -P 1 0 64k', 'write -P 2 1M 64k', 'write -P 0 2M 512k']);
  await qemuImg(['snapshot', '-c', 'first', src]);
  await qemuIo([src], ['write -P 3 0 32k', 'write -z 1M 64k', 'write -P 4 3M 64k']);
  await qemuImg(['snapshot', '-c', '7', src]);
  await qemuIo([src], ['write -P 6 3M 4k']);
  return src;
}

describe.runIf(qemu)('convert options, against qemu-img convert', () => {
  it("refuses bad values and combinations with qemu-img's texts, in its order", async () => {
    const dir = makeTempDir();
    const src = await snapshotSource(dir);
    const raw = dir.file('r.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '4M']);
    const q = dir.file('q.img');
    const b = dir.file('b.img');
    const cases: string[][] = [
      ['-m', '0'],
      ['-m', '019'],
      ['-m', '1.0'],
      ['-m', '3x'],
      ['-r', '-1'],
      ['-r', '1.5b'],
      ['-r', '1e3'],
      ['-r', '8E'],
      ['-S', '100'],
      ['-S', '1x'],
      ['-S', '32M'],
      ['-r', 'x', '-m', '0'],
      ['-m', '0', '-r', 'x'],
      ['--skip-broken-bitmaps', '-C', '-c'],
      ['-C', '-c', '-O', 'qcow2'],
      ['-C', '-S', '4k'],
      ['-C', '--salvage'],
      ['--target-image-opts'],
      ['-n', '-o', 'cluster_size=4k'],
      ['--target-is-zero'],
      ['-l', 'snapshot.foo=1'],
      ['-l', 'snapshot.id=1,foo'],
      ['-l', 'snapshot.id=1,nofoo'],
      ['-l', 'nope'],
      ['-l', 'snapshot.id=1,snapshot.name=7'],
      ['-l', 'snapshot.name='],
      ['-l', 'first', src],
      ['-l', 'first', '-O', 'bogus'],
      ['-s', 'first'],
      ['--bitmaps', src],
      ['--bitmaps', '-O', 'qcow2'],
      ['-B', raw, '-O', 'qcow2', src],
      ['-n', '--target-image-opts', '-O', 'qcow2'],
    ];
    for (const extra of cases) {
      await sameAsQemuImg(['convert', ...extra, src, q], ['convert', ...extra, src, b], { swap: [[q, b]] });
    }
    await sameAsQemuImg(
      ['convert', '-l', 'first', '-f', 'raw', raw, q],
      ['convert', '-l', 'first', '-f', 'raw', raw, b],
      { swap: [[q, b]] },
    );
  });

  it('converts from an internal snapshot (-l, by id or name, snapshot.id/snapshot.name)', async () => {
    const dir = makeTempDir();
    const src = await snapshotSource(dir);
    for (const [i, param] of [
      'first',
      '7',
      '2',
      'snapshot.id=1',
      'snapshot.name=7',
      'snapshot.id=2,snapshot.name=7',
    ].entries()) {
      const q = dir.file(`q${i}.qcow2`);
      const b = dir.file(`b${i}.qcow2`);
      await sameAsQemuImg(
        ['convert', '-O', 'qcow2', '-l', param, src, q],
        ['convert', '-O', 'qcow2', '-l', param, src, b],
      );
      await qemuImg(['compare', q, b]);
      expect(await layout(b)).toEqual(await layout(q));
    }
    // snapshot.id=... reads the snapshot from the first source only; the source is unchanged.
    const q = dir.file('qcat.raw');
    const b = dir.file('bcat.raw');
    await sameAsQemuImg(
      ['convert', '-l', 'snapshot.id=1', src, src, q],
      ['convert', '-l', 'snapshot.id=1', src, src, b],
    );
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', q, b]);
    expect((await qemuImg(['check', src])).stdout).toContain('No errors were found');
  });

  it('--target-image-opts, --target-is-zero and -n write into an existing image as qemu-img does', async () => {
    const dir = makeTempDir();
    const src = await snapshotSource(dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', dir.file('t.qcow2'), '4M']);
    await qemuIo([dir.file('t.qcow2')], ['write -P 5 512k 1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', dir.file('small.qcow2'), '1M']);
    const cases = (t: string): string[][] => [
      ['-n', '--target-image-opts', src, `driver=qcow2,file.filename=${t}`],
      ['-n', '--target-image-opts', src, `file.filename=${t}`],
      ['-n', '--target-image-opts', '-c', src, `driver=qcow2,file.filename=${t}`],
      ['-n', '-O', 'qcow2', src, t],
      ['-n', '-O', 'qcow2', '--target-is-zero', src, t],
      ['-n', '-O', 'qcow2', '--target-is-zero', '-S', '0', src, t],
    ];
    for (const [i] of cases('').entries()) {
      const { q, b, swap } = twoCopies(dir, ['t.qcow2']);
      const r = await sameAsQemuImg(
        ['convert', ...cases(q['t.qcow2']!)[i]!],
        ['convert', ...cases(b['t.qcow2']!)[i]!],
        {
          swap,
        },
      );
      expect(r.b.code).toBe(0);
      await qemuImg(['compare', q['t.qcow2']!, b['t.qcow2']!]);
      expect(await layout(b['t.qcow2']!)).toEqual(await layout(q['t.qcow2']!));
    }
    const { q, b, swap } = twoCopies(dir, ['small.qcow2']);
    await sameAsQemuImg(
      ['convert', '-n', '--target-image-opts', src, `driver=qcow2,file.filename=${q['small.qcow2']}`],
      ['convert', '-n', '--target-image-opts', src, `driver=qcow2,file.filename=${b['small.qcow2']}`],
      { swap },
    );
  });

  it('-C, -W and -S 0 make the images qemu-img makes', async () => {
    const dir = makeTempDir();
    const src = await snapshotSource(dir);
    for (const [i, extra] of [
      ['-C'],
      ['-W'],
      ['-S', '0'],
      ['-W', '-m', '1', '-S', '0'],
      ['-C', '-B', src, '-F', 'qcow2'],
    ].entries()) {
      const q = dir.file(`q${i}.qcow2`);
      const b = dir.file(`b${i}.qcow2`);
      await sameAsQemuImg(
        ['convert', '-O', 'qcow2', ...extra, src, q],
        ['convert', '-O', 'qcow2', ...extra, src, b],
      );
      await qemuImg(['compare', q, b]);
      expect([extra, await layout(b)]).toEqual([extra, await layout(q)]);
    }
  });

  it('--bitmaps copies persistent bitmaps (bits, granularity, enabled or not); broken ones refused or skipped', async () => {
    const dir = makeTempDir();
    const bm = dir.file('bm.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', bm, '4M']);
    await qemuImg(['bitmap', '--add', '-g', '128k', bm, 'b1']);
    await qemuImg(['bitmap', '--add', bm, 'b2']);
    await qemuImg(['bitmap', '--disable', bm, 'b2']);
    await qemuIo([bm], ['write -P 1 0 64k', 'write -P 1 2M 64k']);
    // A copy whose first bitmap is marked in use (a writer that never stored it): inconsistent.
    const broken = dir.file('broken.qcow2');
    copyFileSync(bm, broken);
    markFirstBitmapInUse(broken);
    const other = dir.file('other.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', other, '4M']);
    await qemuImg(['bitmap', '--add', other, 'b2']);
    const v2 = dir.file('v2.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '4M']);
    const raw = dir.file('r.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '4M']);

    const bits = bitmapExtents;
    const fmt = async (f: string) => (await qemuImgJson(['info', f]))['format-specific'];
    for (const [i, [extra, source]] of (
      [
        [[], bm],
        [['-c'], bm],
        [['--skip-broken-bitmaps'], broken],
        [[], broken],
        [['-O', 'raw'], bm],
        [['-o', 'compat=0.10'], bm],
        [[], v2],
        [['-f', 'raw'], raw],
      ] as [string[], string][]
    ).entries()) {
      const q = dir.file(`q${i}.img`);
      const b = dir.file(`b${i}.img`);
      const args = (t: string) => ['convert', '--bitmaps', '-O', 'qcow2', ...extra, source, t];
      const r = await sameAsQemuImg(args(q), args(b), { swap: [[q, b]] });
      if (r.q.code) continue;
      expect(await fmt(b)).toEqual(await fmt(q));
      for (const name of ['b1', 'b2']) {
        if (source === broken && name === 'b1') continue;
        expect(await bits(b, name)).toEqual(await bits(q, name));
      }
      await qemuImg(['check', b]);
    }
    await sameAsQemuImg(['convert', '--bitmaps', '-O', 'qcow2', bm, other, dir.file('x.qcow2')]);
    // Into an image that already has a bitmap of that name: the data is copied, then it fails.
    const { q, b, swap } = twoCopies(dir, ['other.qcow2']);
    await sameAsQemuImg(
      ['convert', '--bitmaps', '-n', '-O', 'qcow2', bm, q['other.qcow2']!],
      ['convert', '--bitmaps', '-n', '-O', 'qcow2', bm, b['other.qcow2']!],
      { swap },
    );
    await qemuImg(['compare', q['other.qcow2']!, b['other.qcow2']!]);
  });

  it('--salvage copies unreadable sectors as zeroes, warning about each; without it the read error fails', async () => {
    const dir = makeTempDir();
    const src = dir.file('src.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
    await qemuIo([src], ['write -P 1 0 64k', 'write -P 2 64k 64k', 'write -P 3 256k 64k']);
    const bad = dir.file('bad.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, bad]);
    corruptSecondCompressedCluster(bad);
    const cases: [string, string[]][] = [
      ['qcow2', []],
      ['qcow2', ['--salvage']],
      ['qcow2', ['--salvage', '-q']],
      ['qcow2', ['--salvage', '-c']],
      ['raw', ['--salvage']],
    ];
    for (const [i, [fmt, extra]] of cases.entries()) {
      const q = dir.file(`q${i}.img`);
      const b = dir.file(`b${i}.img`);
      const args = (t: string) => ['convert', '-O', fmt, ...extra, bad, t];
      const r = await sameAsQemuImg(args(q), args(b));
      if (r.q.code) continue;
      await qemuImg(['compare', '-f', fmt, '-F', fmt, q, b]);
      expect(await layout(b, fmt)).toEqual(await layout(q, fmt));
    }
  });

  it('-r limits the write rate as qemu-img does (bursts of a tenth of a second)', async () => {
    const dir = makeTempDir();
    const src = dir.file('big.raw');
    await qemuImg(['create', '-q', '-f', 'raw', src, '8M']);
    await qemuIo(['-f', 'raw', src], ['write -P 3 0 4M']);
    const timed = async (cmd: () => Promise<unknown>) => {
      const t = performance.now();
      await cmd();
      return performance.now() - t;
    };
    const q = dir.file('q.raw');
    const b = dir.file('b.raw');
    // Two 2 MiB writes at 4 MiB/s: the second waits (2 MiB - 0.4 MiB) / 4 MiB/s = 0.4 s.
    const theirs = await timed(() => qemuImg(['convert', '-f', 'raw', '-r', '4M', src, q]));
    const ours = await timed(() => blockrep(['convert', '-f', 'raw', '-r', '4M', src, b]));
    expect(theirs).toBeGreaterThan(350);
    expect(ours).toBeGreaterThan(350);
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', q, b]);
  });
});

describe.runIf(qemu)('dd output options, against qemu-img dd', () => {
  it('refuses an unknown output format once the input is open, with its text', async () => {
    const dir = makeTempDir();
    const src = dir.file('s.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
    for (const extra of [
      ['-O', 'bogus', `if=${src}`, `of=${dir.file('x')}`],
      ['-O', 'bogus', `if=${dir.file('missing')}`, `of=${dir.file('x')}`],
    ]) {
      await sameAsQemuImg(['dd', ...extra]);
    }
    const q = dir.file('q.raw');
    const b = dir.file('b.raw');
    await sameAsQemuImg(
      ['dd', '--image-opts', `if=driver=qcow2,file.filename=${src}`, `of=${q}`],
      ['dd', '--image-opts', `if=driver=qcow2,file.filename=${src}`, `of=${b}`],
    );
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', q, b]);
  });
});

/** Sets the "in use" flag of the first entry of a qcow2 image's bitmap directory. */
function markFirstBitmapInUse(file: string): void {
  const fd = openSync(file, 'r+');
  try {
    const h = Buffer.alloc(4096);
    readSync(fd, h, 0, h.length, 0);
    for (let p = h.readUInt32BE(100); p + 8 <= h.length; ) {
      const type = h.readUInt32BE(p);
      const len = h.readUInt32BE(p + 4);
      if (type === 0) break;
      if (type === 0x23852875) {
        const dir = Number(h.readBigUInt64BE(p + 24));
        const flags = Buffer.alloc(4);
        readSync(fd, flags, 0, 4, dir + 12);
        flags.writeUInt32BE(flags.readUInt32BE(0) | 1);
        writeSync(fd, flags, 0, 4, dir + 12);
        return;
      }
      p += 8 + Math.ceil(len / 8) * 8;
    }
    throw new Error('no bitmaps extension');
  } finally {
    closeSync(fd);
  }
}

/** Overwrites the start of the compressed data of guest cluster 1: reading it fails (EIO). */
function corruptSecondCompressedCluster(file: string): void {
  const fd = openSync(file, 'r+');
  try {
    const h = Buffer.alloc(104);
    readSync(fd, h, 0, h.length, 0);
    const clusterBits = h.readUInt32BE(20);
    const l1 = Number(h.readBigUInt64BE(40));
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, l1);
    const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    readSync(fd, e, 0, 8, l2 + 8);
    const host = Number(e.readBigUInt64BE(0) & ((1n << BigInt(62 - (clusterBits - 8))) - 1n));
    writeSync(fd, Buffer.alloc(32, 0xff), 0, 32, host);
  } finally {
    closeSync(fd);
  }
}
