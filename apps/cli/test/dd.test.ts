import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuImgJson, qemuIo, run } from './helpers';

/* qemu-img dd and blockrep dd on the same input: the same images, sizes, errors and exit codes. */

describe.runIf(hasPeer('qemu-img', 'qemu-io'))('dd agrees with qemu-img dd', () => {
  it('copies from block skip on, sized as qemu-img sizes it, into raw or qcow2', async () => {
    const dir = makeTempDir();
    const src = dir.file('src.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
    await qemuIo(['-f', 'qcow2', src], ['write -P 1 0 64k', 'write -P 2 64k 64k', 'write -P 3 128k 64k']);
    const cases: string[][] = [
      [],
      ['bs=64k', 'count=3', 'skip=1'],
      ['bs=1000', 'skip=3', '-O', 'qcow2'],
      ['bs=513'],
      ['count=0'],
      ['skip=100000'],
      ['-f', 'qcow2', 'bs=4k', 'count=40', '-O', 'qcow2'],
    ];
    for (const [i, extra] of cases.entries()) {
      const theirs = dir.file(`q${i}.img`);
      const ours = dir.file(`b${i}.img`);
      await qemuImg(['dd', `if=${src}`, `of=${theirs}`, ...extra]);
      await blockrep(['dd', `if=${src}`, `of=${ours}`, ...extra]);
      const fmt = extra.includes('qcow2') ? 'qcow2' : 'raw';
      const [qi, bi] = await Promise.all([qemuImgJson(['info', theirs]), qemuImgJson(['info', ours])]);
      expect([extra.join(' '), bi['virtual-size'], bi.format]).toEqual([
        extra.join(' '),
        qi['virtual-size'],
        fmt,
      ]);
      expect((await qemuImg(['compare', '-f', fmt, '-F', fmt, theirs, ours])).stdout).toBe(
        'Images are identical.\n',
      );
      if (fmt === 'qcow2') expect((await qemuImg(['check', ours])).stdout).toContain('No errors were found');
    }
  });

  it("refuses bad operands with qemu-img's texts and exit codes", async () => {
    const dir = makeTempDir();
    const src = dir.file('src.raw');
    await qemuImg(['create', '-q', '-f', 'raw', src, '1M']);
    const out = dir.file('out.raw');
    for (const extra of [
      [],
      [`if=${src}`],
      [`if=${src}`, `of=${out}`, 'bs=0'],
      [`if=${src}`, `of=${out}`, 'bs=3x'],
      [`if=${src}`, `of=${out}`, 'count=x'],
      [`if=${src}`, `of=${out}`, 'foo=1'],
      [`if=${src}`, `of=${out}`, 'junk'],
      [`if=${dir.file('missing')}`, `of=${out}`],
      [`if=${src}`, `of=${out}`, '--bogus'],
    ]) {
      const q = await run('qemu-img', ['dd', ...extra], { okCodes: [0, 1] });
      const b = await blockrep(['dd', ...extra], [0, 1]);
      expect({ extra, code: b.code, stderr: b.stderr }).toEqual({
        extra,
        code: q.code,
        stderr: q.stderr.replaceAll('qemu-img', 'blockrep'),
      });
    }
  });
});
