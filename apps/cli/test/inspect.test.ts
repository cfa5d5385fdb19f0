import { copyFileSync, writeFileSync } from 'node:fs';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, blockrepJson, damageQcow2, makeChain, qemuImg, qemuImgJson, qemuIo } from './helpers';

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('info, map, check, compare agree with qemu-img', () => {
  it('info --output=json, with and without --backing-chain, field by field', async () => {
    const { base, mid, top } = await makeChain();
    await Promise.all(
      [base, mid, top].map(async (f) => {
        expect(await blockrepJson(['info', f])).toEqual(await qemuImgJson(['info', f]));
      }),
    );
    const ours = await blockrepJson(['info', '--backing-chain', top]);
    expect(ours).toHaveLength(3);
    expect(ours).toEqual(await qemuImgJson(['info', '--backing-chain', top]));
  });

  it('info on qcow2 v2 and option-made images; human output as qemu-img prints it', async () => {
    const dir = makeTempDir();
    const v2 = dir.file('v2.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', v2, '1G']);
    expect(await blockrepJson(['info', v2])).toEqual(await qemuImgJson(['info', v2]));
    const lazy = dir.file('lazy.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=64', lazy, '3G']);
    expect(await blockrepJson(['info', lazy])).toEqual(await qemuImgJson(['info', lazy]));
    const human = (await blockrep(['info', lazy])).stdout;
    expect(human).toBe((await qemuImg(['info', lazy])).stdout);
    // Internal snapshots: the "snapshots" list and the human "Snapshot list:" table.
    await qemuIo(['-f', 'qcow2', lazy], ['write -P 1 0 64k']);
    await qemuImg(['snapshot', '-c', 'first', lazy]);
    await qemuImg(['snapshot', '-c', 'a longer snapshot name', lazy]);
    const withSnapshots = await blockrepJson(['info', lazy]);
    expect(withSnapshots.snapshots.map((x: { name: string }) => x.name)).toEqual([
      'first',
      'a longer snapshot name',
    ]);
    expect(withSnapshots).toEqual(await qemuImgJson(['info', lazy]));
    expect((await blockrep(['info', lazy])).stdout).toBe((await qemuImg(['info', lazy])).stdout);
  });

  it('map --output=json: the same merged extents, byte for byte; human output too', async () => {
    const { base, mid, top } = await makeChain();
    expect((await blockrep(['map', top])).stdout).toBe((await qemuImg(['map', top])).stdout);
    const window = ['--output=json', '-s', '1M', '--max-length=100000', top];
    expect((await blockrep(['map', ...window])).stdout).toBe((await qemuImg(['map', ...window])).stdout);
    await Promise.all(
      [base, mid, top].map(async (f) => {
        const ours = (await blockrep(['map', '--output=json', f])).stdout;
        const theirs = (await qemuImg(['map', '--output=json', f])).stdout;
        expect(JSON.parse(ours)).toEqual(JSON.parse(theirs));
        expect(ours).toBe(theirs);
      }),
    );
    // Zero clusters without a backing file, preallocated zero clusters (zero flag on an allocated
    // cluster: QEMU gives their offset), metadata preallocation (data in file holes), v2,
    // compressed clusters.
    const dir = makeTempDir();
    const alone = dir.file('alone.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', alone, '4M']);
    await qemuIo(
      ['-f', 'qcow2', alone],
      ['write -P 9 1M 64k', 'write -z 2M 128k', 'write -P 9 3M 128k', 'write -z 3M 128k'],
    );
    // A short write into a fresh cluster leaves most of it a hole of the file: still one data
    // extent (QEMU asks the file only in images it finds preallocated).
    const short = dir.file('short.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', short, '4M']);
    await qemuIo(['-f', 'qcow2', short], ['write -P 9 3M 1000', 'write -P 1 0 64k']);
    const prealloc = dir.file('prealloc.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', prealloc, '2M']);
    await qemuIo(['-f', 'qcow2', prealloc], ['write -P 1 64k 64k']);
    const v2 = dir.file('v2.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '4M']);
    await qemuIo(['-f', 'qcow2', v2], ['write -P 1 0 64k', 'write -z 1M 64k']);
    const compressed = dir.file('compressed.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', top, compressed]);
    await Promise.all(
      [alone, short, prealloc, v2, compressed].map(async (f) => {
        expect((await blockrep(['map', '--output=json', f])).stdout).toBe(
          (await qemuImg(['map', '--output=json', f])).stdout,
        );
      }),
    );
  });

  it('check: clean, leaking and corrupt images give qemu-img check JSON and exit codes 0, 3, 2', async () => {
    const dir = makeTempDir();
    const cases: [string, 'leak' | 'corrupt' | null, number][] = [
      ['clean', null, 0],
      ['leak', 'leak', 3],
      ['corrupt', 'corrupt', 2],
    ];
    await Promise.all(
      cases.map(async ([name, damage, code]) => {
        const f = dir.file(`${name}.qcow2`);
        await qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
        await qemuIo(['-f', 'qcow2', f], ['write -P 1 0 64k', 'write -P 2 1M 128k']);
        if (damage) damageQcow2(f, damage);
        const ours = await blockrep(['check', '--output=json', f], [code]);
        const theirs = await qemuImg(['check', '--output=json', f], { okCodes: [code] });
        expect(ours.code).toBe(theirs.code);
        expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
      }),
    );
  });

  it('check human output and -r repair: the same text as qemu-img; repaired images are clean', async () => {
    const dir = makeTempDir();
    await Promise.all(
      (['leak', 'corrupt'] as const).map(async (damage) => {
        const ours = dir.file(`ours-${damage}.qcow2`);
        const theirs = dir.file(`theirs-${damage}.qcow2`);
        await qemuImg(['create', '-q', '-f', 'qcow2', ours, '16M']);
        await qemuIo(['-f', 'qcow2', ours], ['write -P 1 0 64k', 'write -P 2 4M 64k']);
        damageQcow2(ours, damage);
        copyFileSync(ours, theirs);
        const code = damage === 'leak' ? 3 : 2;
        const o = await blockrep(['check', ours], [code]);
        const t = await qemuImg(['check', theirs], { okCodes: [code] });
        expect(o.stdout).toBe(t.stdout);
        // The findings (stderr): the same lines; qcow2's checker lists a corrupt image's in another
        // order and shows OFLAG_COPIED's l1_entry without the flag bit, so there only the refcount line.
        if (damage === 'leak') expect(o.stderr).toBe(t.stderr);
        else expect(o.stderr).toContain(t.stderr.split('\n').find((l) => l.startsWith('ERROR cluster')));
        const mode = damage === 'leak' ? 'leaks' : 'all';
        const or = await blockrep(['check', '-r', mode, ours]);
        const tr = await qemuImg(['check', '-r', mode, theirs]);
        // Repairing a refcount, qemu-img and qcow2 place the rewritten refcount structures apart.
        const noEnd = (text: string) =>
          damage === 'leak' ? text : text.replace(/Image end offset: \d+/, '');
        expect(noEnd(or.stdout)).toBe(noEnd(tr.stdout));
        expect(or.stdout).toContain('The following inconsistencies were found and repaired:');
        expect((await qemuImg(['check', ours])).code).toBe(0);
      }),
    );
    const leaky = dir.file('leaky.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', leaky, '16M']);
    await qemuIo(['-f', 'qcow2', leaky], ['write -P 1 0 64k']);
    damageQcow2(leaky, 'leak');
    copyFileSync(leaky, dir.file('leaky2.qcow2'));
    expect(await blockrepJson(['check', '-r', 'leaks', leaky])).toEqual(
      await qemuImgJson(['check', '-r', 'leaks', dir.file('leaky2.qcow2')]).then((j) => ({
        ...j,
        filename: leaky,
      })),
    );
  });

  it('check on raw: no checks for that format (exit 63), as qemu-img says', async () => {
    const raw = makeTempDir().file('r.raw');
    writeFileSync(raw, Buffer.alloc(4096));
    const ours = await blockrep(['check', raw], [63]);
    const theirs = await qemuImg(['check', raw], { okCodes: [63] });
    expect(ours.stderr.replace('blockrep:', '')).toBe(theirs.stderr.replace('qemu-img:', ''));
  });

  it('compare: identical, differing, resized and strict, with qemu-img exit codes and messages', async () => {
    const { dir, top } = await makeChain();
    const flat = dir.file('flat.raw');
    await qemuImg(['convert', '-O', 'raw', top, flat]);
    const same = await blockrep(['compare', top, flat]);
    expect(same.stdout).toBe('Images are identical.\n');
    await qemuIo(['-f', 'raw', flat], ['write -P 0x55 4097k 1']);
    const ours = await blockrep(['compare', top, flat], [1]);
    const theirs = await qemuImg(['compare', top, flat], { okCodes: [1] });
    expect(ours.stdout).toBe(theirs.stdout);
    expect(ours.stdout).toMatch(/^Content mismatch at offset \d+!\n$/);
    // A larger image equal up to the smaller one's end, zeroes beyond: identical with a warning.
    const big = dir.file('big.raw');
    await qemuImg(['convert', '-O', 'raw', top, big]);
    await qemuImg(['resize', '-q', '-f', 'raw', big, '9M']);
    for (const args of [
      [top, big],
      ['-s', top, big],
    ]) {
      const o = await blockrep(['compare', ...args], [0, 1]);
      const t = await qemuImg(['compare', ...args], { okCodes: [0, 1] });
      expect([o.code, o.stdout]).toEqual([t.code, t.stdout]);
    }
    // Strict mode compares the block status: zero clusters against unallocated ones, compressed
    // against plain data, raw data against a chain.
    const zeroed = dir.file('zeroed.qcow2');
    const empty = dir.file('empty.qcow2');
    const compressed = dir.file('compressed.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', zeroed, '8M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', empty, '8M']);
    await qemuIo(['-f', 'qcow2', zeroed], ['write -z 1M 64k']);
    await qemuImg(['convert', '-c', '-O', 'qcow2', top, compressed]);
    const strictCases = [
      [zeroed, empty],
      [top, compressed],
      [top, flat],
      [empty, flat],
      [top, top],
    ];
    await Promise.all(
      strictCases.map(async ([x, y]) => {
        const o = await blockrep(['compare', '-s', x!, y!], [0, 1]);
        const t = await qemuImg(['compare', '-s', x!, y!], { okCodes: [0, 1] });
        expect([o.code, o.stdout]).toEqual([t.code, t.stdout]);
      }),
    );
    const missing = await blockrep(['compare', top, dir.file('nope.raw')], [2]);
    expect(missing.stderr).toContain("Could not open '");
  });
});
