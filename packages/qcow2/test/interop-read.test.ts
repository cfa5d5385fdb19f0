import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { firstDiff, qemuImg, qemuIo, readAllOurs, readAllQemu } from './helpers';

/* Images made by qemu-img / qemu-io read byte for byte as qemu-img convert reads them. */

async function patterned(path: string, compat: string, clusterSize: number, size = '8M'): Promise<void> {
  await qemuImg([
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    `compat=${compat},cluster_size=${clusterSize}`,
    path,
    size,
  ]);
  await qemuIo(
    [path],
    [
      'write -P 0x11 0 64k',
      'write -P 0x22 1000 3000',
      'write -P 0x33 3M 1M',
      'write -P 0x44 5000k 13k',
      `write -P 0x55 ${8 * 1024 * 1024 - 4096} 4096`,
    ],
  );
}

describe('reading qemu-made images', () => {
  for (const compat of ['0.10', '1.1']) {
    // 2 MiB clusters on v3 only: the layout does not depend on the version.
    for (const cs of compat === '1.1' ? [512, 4096, 65536, 2 * 1024 * 1024] : [512, 4096, 65536]) {
      it(`compat=${compat} cluster_size=${cs}`, async () => {
        const d = makeTempDir();
        const f = d.file('img.qcow2');
        await patterned(f, compat, cs);
        const ours = await readAllOurs(f);
        const qemu = await readAllQemu(f, d);
        expect(firstDiff(ours, qemu)).toBe(-1);
        expect(ours[3 << 20]).toBe(0x33);
      });
    }
  }

  it('compressed clusters (convert -c), v2 and v3, several cluster sizes', async () => {
    const d = makeTempDir();
    const src = d.file('src.qcow2');
    await patterned(src, '1.1', 65536);
    // Patterned data compresses well; unwritten clusters stay unallocated in the converted image.
    await qemuIo([src], ['write -P 0xab 6M 200k']);
    for (const [compat, cs] of [
      ['1.1', 65536],
      ['0.10', 4096],
      ['1.1', 2048],
      ['1.1', 1 << 21],
    ] as const) {
      const f = d.file(`c-${compat}-${cs}.qcow2`);
      await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `compat=${compat},cluster_size=${cs}`, src, f]);
      const ours = await readAllOurs(f);
      expect(firstDiff(ours, await readAllQemu(f, d))).toBe(-1);
      expect(ours[6 << 20]).toBe(0xab);
    }
  });

  it('zero clusters written with write -z (with and without unmap) over data and over a backing file', async () => {
    const d = makeTempDir();
    const base = d.file('base.qcow2');
    const top = d.file('top.qcow2');
    await patterned(base, '1.1', 65536);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await qemuIo(
      [top],
      [
        'write -P 0x66 0 1M',
        'write -z 0 128k',
        'write -z -u 256k 128k',
        'write -z 3M 512k',
        'write -z 100 1000',
      ],
    );
    const ours = await readAllOurs(top);
    expect(firstDiff(ours, await readAllQemu(top, d))).toBe(-1);
    expect(ours.subarray(3 << 20, (3 << 20) + (512 << 10)).every((b) => b === 0)).toBe(true);
    expect(ours[(3 << 20) + (512 << 10)]).toBe(0x33);
  });

  it('a backing chain of three (relative names, formats from the header)', async () => {
    const d = makeTempDir();
    const raw = d.file('base.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '8M']);
    await qemuIo(['-f', 'raw', raw], ['write -P 0x01 0 8M']);
    const mid = d.file('mid.qcow2');
    const top = d.file('top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid]);
    await qemuIo([mid], ['write -P 0x02 1M 1M', 'write -P 0x03 100k 10k']);
    await qemuImg([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=4096',
      '-b',
      'mid.qcow2',
      '-F',
      'qcow2',
      top,
    ]);
    await qemuIo([top], ['write -P 0x04 1536k 4k', 'write -P 0x05 7M 123']);
    const ours = await readAllOurs(top);
    expect(firstDiff(ours, await readAllQemu(top, d))).toBe(-1);
    expect([ours[0], ours[(1 << 20) + 1], ours[1536 << 10], ours[7 << 20]]).toEqual([1, 2, 4, 5]);
    // Without the backing file, unallocated ranges read as zeroes.
    const alone = await readAllOurs(top, { backing: null });
    expect(alone[0]).toBe(0);
    expect(alone[1536 << 10]).toBe(4);
  });

  it('an image with internal snapshots reads its active layer', async () => {
    const d = makeTempDir();
    const f = d.file('snap.qcow2');
    await patterned(f, '1.1', 65536);
    await qemuImg(['snapshot', '-c', 'one', f]);
    await qemuIo([f], ['write -P 0x77 0 100k', 'write -P 0x78 4M 64k']);
    await qemuImg(['snapshot', '-c', 'two', f]);
    await qemuIo([f], ['write -P 0x79 32k 64k']);
    const ours = await readAllOurs(f);
    expect(firstDiff(ours, await readAllQemu(f, d))).toBe(-1);
    expect(ours[40 << 10]).toBe(0x79);
  });
});
