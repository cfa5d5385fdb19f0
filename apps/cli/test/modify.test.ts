import { rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { bin, blockrep, blockrepJson, makeChain, qemuImg, qemuImgJson, qemuIo, run } from './helpers';

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('convert, resize, commit, create, bench verified with qemu-img', () => {
  it('convert flattens a chain to raw and qcow2: qemu-img compare identical, check clean', async () => {
    const { dir, top } = await makeChain();
    const raw = dir.file('out.raw');
    const q = dir.file('out.qcow2');
    const r1 = await blockrep(['convert', '-p', '-O', 'raw', top, raw]);
    expect(r1.stdout).toBe(''); // no progress bar when piped
    await blockrep(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=16k', raw, q]);
    await qemuImg(['compare', top, raw]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', raw, q]);
    await qemuImg(['check', q]);
    const info = await qemuImgJson(['info', q]);
    expect(info['cluster-size']).toBe(16384);
    expect(info['backing-filename']).toBeUndefined();
    // Zero and unallocated regions are skipped: the qcow2 holds only the data clusters.
    const map = await qemuImgJson<{ data: boolean; length: number }[]>(['map', q]);
    const dataBytes = map.filter((e) => e.data).reduce((s, e) => s + e.length, 0);
    expect(dataBytes).toBeLessThan(3 << 20);
    const back = dir.file('back.raw');
    await blockrep(['convert', '-O', 'raw', q, back]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', raw, back]);
  });

  it('convert -B: the target refers to a backing file and holds only what the source image holds itself', async () => {
    const { dir, mid, top } = await makeChain();
    const ours = dir.file('ours.qcow2');
    const theirs = dir.file('theirs.qcow2');
    const args = ['-O', 'qcow2', '-B', mid, '-F', 'qcow2', top];
    await blockrep(['convert', ...args, ours]);
    await qemuImg(['convert', ...args, theirs]);
    await qemuImg(['compare', top, ours]);
    await qemuImg(['check', ours]);
    expect((await qemuImgJson(['info', ours]))['backing-filename']).toBe(mid);
    expect((await qemuImg(['map', '--output=json', ours])).stdout).toBe(
      (await qemuImg(['map', '--output=json', theirs])).stdout.replaceAll(theirs, ours),
    );
    const noFmt = await blockrep(['convert', '-O', 'qcow2', '-B', mid, top, dir.file('x.qcow2')], [1]);
    expect(noFmt.stderr).toBe('blockrep: Use of backing file requires explicit backing format\n');
  });

  it('convert leaves zeroes in the data unwritten: as many clusters allocated as qemu-img convert', async () => {
    const dir = makeTempDir();
    const src = dir.file('src.raw');
    await qemuImg(['create', '-q', '-f', 'raw', src, '8M']);
    // Written zeroes are data to the raw file, not holes.
    await qemuIo(['-f', 'raw', src], ['write -P 0 0 8M', 'write -P 1 100k 4k', 'write -P 2 3M 200k']);
    const ours = dir.file('ours.qcow2');
    const theirs = dir.file('theirs.qcow2');
    await blockrep(['convert', '-f', 'raw', '-O', 'qcow2', src, ours]);
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', src, theirs]);
    const [o, t] = await Promise.all([qemuImgJson(['check', ours]), qemuImgJson(['check', theirs])]);
    expect(o['allocated-clusters']).toBe(t['allocated-clusters']);
    expect(o['allocated-clusters']).toBe(5);
    const full = dir.file('full.qcow2');
    await blockrep(['convert', '-S', '0', '-f', 'raw', '-O', 'qcow2', src, full]);
    expect((await qemuImgJson(['check', full]))['allocated-clusters']).toBe(128);
    await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', src, ours]);
  });

  it.runIf(hasPeer('script'))('convert draws a progress bar on a terminal only', async () => {
    const { dir, top } = await makeChain();
    const out = dir.file('tty.qcow2');
    const r = await run('script', ['-qec', `node ${bin} convert -O qcow2 ${top} ${out}`, '/dev/null']);
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r/);
    expect(r.stdout.split('    (100.00/100%)\r')).toHaveLength(2); // drawn once
    await qemuImg(['compare', top, out]);
  });

  it('convert -n writes into an existing image, zeroing what the source has as zeroes; several sources', async () => {
    const dir = makeTempDir();
    const src = dir.file('src.qcow2');
    const dst = dir.file('dst.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '4M']);
    await qemuIo(['-f', 'qcow2', src], ['write -P 1 0 1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', dst, '4M']);
    await qemuIo(['-f', 'qcow2', dst], ['write -P 7 2M 1M']);
    await blockrep(['convert', '-n', '-O', 'qcow2', src, dst]);
    await qemuImg(['compare', src, dst]);
    await qemuImg(['check', dst]);
    // Several sources are concatenated, as qemu-img does.
    const joined = dir.file('joined.raw');
    const expected = dir.file('expected.raw');
    await blockrep(['convert', '-O', 'raw', src, dst, joined]);
    await qemuImg(['convert', '-O', 'raw', src, dst, expected]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', joined, expected]);
    expect((await qemuImgJson(['info', '-f', 'raw', joined]))['virtual-size']).toBe(8 << 20);
    // Compressed, several sources: the clusters where one source ends and the next begins too.
    await blockrep(['convert', '-c', '-O', 'qcow2', src, dst, dir.file('c.qcow2')]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', expected, dir.file('c.qcow2')]);
    await qemuImg(['check', dir.file('c.qcow2')]);
  });

  it('create: qcow2 with options and a backing file is what qemu-img would make', async () => {
    const dir = makeTempDir();
    const base = dir.file('base.qcow2');
    const r = await blockrep([
      'create',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=128k,lazy_refcounts=on',
      base,
      '1G',
    ]);
    expect(r.stdout).toBe(
      `Formatting '${base}', fmt=qcow2 cluster_size=131072 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=on refcount_bits=16\n`,
    );
    // The "Formatting" line names the options in qemu-img's order.
    for (const [fmt, opts, size] of [
      ['qcow2', 'compat=0.10,preallocation=metadata,cluster_size=4k', '2M'],
      ['qcow2', 'lazy_refcounts=on,refcount_bits=64,compat=1.1', '1G'],
      ['raw', 'preallocation=full', '64k'],
    ]) {
      const ours = (await blockrep(['create', '-f', fmt!, '-o', opts!, dir.file('o.img'), size!])).stdout;
      const theirs = (await qemuImg(['create', '-f', fmt!, '-o', opts!, dir.file('t.img'), size!])).stdout;
      expect(ours.replace('o.img', 't.img')).toBe(theirs);
    }
    const ov = dir.file('ov.qcow2');
    await blockrep(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', ov]);
    const ours = await qemuImgJson(['info', ov]);
    expect(ours['virtual-size']).toBe(1 << 30);
    expect(ours['backing-filename']).toBe('base.qcow2');
    expect(ours['backing-filename-format']).toBe('qcow2');
    expect((await qemuImgJson(['info', base]))['format-specific'].data['lazy-refcounts']).toBe(true);
    await qemuImg(['check', base]);
    await qemuImg(['check', ov]);
    const noFmt = await blockrep(['create', '-f', 'qcow2', '-b', base, dir.file('x.qcow2')], [1]);
    const theirs = await qemuImg(['create', '-f', 'qcow2', '-b', base, dir.file('y.qcow2')], {
      okCodes: [1],
    });
    // qemu-img leaves the hint line without its newline.
    expect(noFmt.stderr.replace(/^blockrep: .*?: /, '').trim()).toBe(
      theirs.stderr.replace(/^qemu-img: .*?: /, ''),
    );
  });

  it('resize grows raw and qcow2, and shrinks raw only with --shrink', async () => {
    const dir = makeTempDir();
    const q = dir.file('r.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', q, '1M']);
    await qemuIo(['-f', 'qcow2', q], ['write -P 3 0 64k']);
    expect((await blockrep(['resize', q, '+3M'])).stdout).toBe('Image resized.\n');
    expect((await qemuImgJson(['info', q]))['virtual-size']).toBe(4 << 20);
    await qemuImg(['check', q]);
    await qemuIo(['-f', 'qcow2', q], ['read -P 3 0 64k', 'read -P 0 1M 3M']);
    const raw = dir.file('r.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '8M']);
    const refused = await blockrep(['resize', '-f', 'raw', raw, '-2M'], [1]);
    expect(refused.stderr).toContain('Use the --shrink option to perform a shrink operation.');
    await blockrep(['resize', '-f', 'raw', '--shrink', raw, '-2M']);
    expect((await qemuImgJson(['info', raw]))['virtual-size']).toBe(6 << 20);
    // Growing an overlay over a longer backing file: the new area reads as zeroes, not as the
    // backing file's data (qemu-img gives it zero clusters).
    const base = dir.file('base.qcow2');
    const ov = dir.file('ov.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
    await qemuIo(['-f', 'qcow2', base], ['write -P 5 0 4M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ov, '1M']);
    await blockrep(['resize', ov, '4M']);
    await qemuIo(['-f', 'qcow2', ov], ['read -P 5 0 1M', 'read -P 0 1M 3M']);
    expect((await qemuImgJson(['info', ov]))['backing-filename']).toBe(base);
  });

  it('commit writes the overlay into its backing file and empties the overlay', async () => {
    const dir = makeTempDir();
    const base = dir.file('base.qcow2');
    const ov = dir.file('ov.qcow2');
    const expected = dir.file('expected.raw');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
    await qemuIo(['-f', 'qcow2', base], ['write -P 1 0 2M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ov]);
    await qemuIo(['-f', 'qcow2', ov], ['write -P 2 512k 100k', 'write -z 1M 64k', 'write -P 3 3M 64k']);
    await qemuImg(['convert', '-O', 'raw', ov, expected]);
    const r = await blockrep(['commit', ov]);
    expect(r.stdout).toBe('Image committed.\n');
    await qemuImg(['compare', '-F', 'raw', base, expected]);
    await qemuImg(['check', base]);
    await qemuImg(['check', ov]);
    const map = await qemuImgJson<{ depth: number }[]>(['map', ov]);
    expect(map.every((e) => e.depth === 1)).toBe(true);
    const solo = dir.file('solo.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', solo, '1M']);
    const none = await blockrep(['commit', solo], [1]);
    const theirs = await qemuImg(['commit', solo], { okCodes: [1] });
    expect(none.stderr.replace('blockrep:', '')).toBe(theirs.stderr.replace('qemu-img:', ''));
  });

  it('commit -b: a whole chain into a deeper base, the top left as it was (as qemu-img)', async () => {
    const { dir, base, mid, top } = await makeChain();
    const expected = dir.file('expected.raw');
    await qemuImg(['convert', '-O', 'raw', top, expected]);
    const topMap = (await qemuImg(['map', '--output=json', top])).stdout;
    await blockrep(['commit', '-b', base, top]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'raw', base, expected]);
    await qemuImg(['compare', top, expected]);
    // Nothing emptied: the top's own allocation is unchanged.
    expect((await qemuImg(['map', '--output=json', top])).stdout).toBe(topMap);
    const wrong = await blockrep(['commit', '-b', dir.file('other.qcow2'), mid], [1]);
    expect(wrong.stderr).toBe(
      `blockrep: Did not find '${dir.file('other.qcow2')}' in the backing chain of '${mid}'\n`,
    );
  });

  it('bench prints qemu-img bench lines; -w --pattern writes the pattern', async () => {
    const f = makeTempDir().file('b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    const r = await blockrep(['bench', '-w', '--pattern=0x5a', '-c', '300', '-d', '4', '-s', '4k', f]);
    const lines = r.stdout.split('\n');
    expect(lines[0]).toBe(
      'Sending 300 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)',
    );
    expect(lines[1]).toMatch(/^Run completed in \d+\.\d{3} seconds\.$/);
    await qemuIo(['-f', 'qcow2', f], ['read -P 0x5a 0 1M']);
    for (const args of [
      ['-c', '10', '-o', '4k', '-S', '8k'],
      ['-c', '5', '-d', '2', '-s', '64k', '-t', 'none'],
    ]) {
      const ours = (await blockrep(['bench', ...args, f])).stdout.split('\n')[0];
      const theirs = (await qemuImg(['bench', ...args, f])).stdout.split('\n')[0];
      expect(ours).toBe(theirs);
    }
  });
});

describe.runIf(qemu)('errors as qemu-img reports them', () => {
  it('the same message (blockrep: for qemu-img:) and exit code for common mistakes', async () => {
    const dir = makeTempDir();
    const img = dir.file('img.qcow2');
    const garbage = dir.file('garbage.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    writeFileSync(garbage, 'not an image\n');
    const missing = dir.file('missing.qcow2');
    const cases = [
      ['create', '-f', 'qcow2', dir.file('a.qcow2')],
      ['create', '-f', 'qcow2', '-o', 'compat=2.0', dir.file('b.qcow2'), '1M'],
      ['create', '-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', dir.file('c.qcow2'), '1M'],
      ['create', '-f', 'qcow2', '-o', 'cluster_size=3000', dir.file('d.qcow2'), '1M'],
      ['info', missing],
      ['map', '-f', 'qcow2', garbage],
      ['check', missing],
      ['compare', missing, img],
      ['commit', img],
      ['convert', '-O', 'raw', missing, dir.file('e.raw')],
    ];
    await Promise.all(
      cases.map(async (args) => {
        const o = await blockrep(args, [1, 2]);
        const t = await qemuImg(args, { okCodes: [1, 2] });
        expect([o.code, o.stderr.replace(/^blockrep:/gm, 'X:')]).toEqual([
          t.code,
          t.stderr.replace(/^qemu-img:/gm, 'X:'),
        ]);
      }),
    );
  });

  it('sizes round up to whole sectors, the line printed keeps the size given', async () => {
    const dir = makeTempDir();
    const q = dir.file('odd.qcow2');
    const r = dir.file('odd.raw');
    expect((await blockrep(['create', '-f', 'qcow2', q, '1000'])).stdout).toContain('size=1000 ');
    await blockrep(['create', '-q', '-f', 'raw', r, '1000']);
    expect((await qemuImgJson(['info', q]))['virtual-size']).toBe(1024);
    expect((await qemuImgJson(['info', '-f', 'raw', r]))['virtual-size']).toBe(1024);
  });
});

describe('CLI basics', () => {
  it('create makes a raw image of the given size', async () => {
    const f = makeTempDir().file('a.raw');
    const r = await blockrep(['create', '-f', 'raw', f, '3M']);
    expect(r.stdout).toContain(`Formatting '${f}', fmt=raw size=3145728`);
    const info = await blockrepJson(['info', f]);
    expect(info['virtual-size']).toBe(3 << 20);
  });

  it.runIf(hasPeer('qemu-img'))(
    'info --output=json agrees with qemu-img on odd-sized raw images',
    async () => {
      const f = makeTempDir().file('odd.raw');
      writeFileSync(f, Buffer.alloc(1000, 1));
      expect(await blockrepJson(['info', f])).toEqual(await qemuImgJson(['info', '-f', 'raw', f]));
    },
  );

  it('reports bad input with a clear message and exit code 1', async () => {
    const r = await blockrep(['create', '-f', 'raw', makeTempDir().file('x'), '12Q'], [1]);
    expect(r.stderr).toMatch(/Invalid image size specified/);
    const u = await blockrep(['frobnicate'], [1]);
    expect(u.stderr).toContain('Command not found: frobnicate');
    const f = await blockrep(['info', '-f', 'vmdk', '/nonexistent.img'], [1]);
    expect(f.stderr).toBe("blockrep: Could not open '/nonexistent.img': Unknown driver 'vmdk'\n");
    const m = await blockrep(['info', '/nonexistent.img'], [1]);
    expect(m.stderr).toContain("Could not open '/nonexistent.img': No such file or directory");
  });

  it('demo still runs', async () => {
    const r = await blockrep(['demo']);
    expect(r.stdout).toContain('read back: "hello from blockrep"');
    const left = /demo image left at (.*)\n/.exec(r.stdout)?.[1];
    expect(left).toBeTruthy();
    rmSync(dirname(left!), { recursive: true, force: true });
  });
});
