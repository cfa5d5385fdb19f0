import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { bitmapExtents, blockrep, qemuImg, qemuImgJson, qemuIo, run } from './helpers';

describe.runIf(hasPeer('qemu-img', 'qemu-io'))('info of an image with persistent bitmaps', () => {
  it('lists them as qemu-img does, human and JSON', async () => {
    const img = makeTempDir().file('bm.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
    await qemuImg(['bitmap', '--add', img, 'b0']);
    await qemuImg(['bitmap', '--add', '-g', '4096', '--disable', img, 'b1']);
    await qemuIo(['-f', 'qcow2', img], ['write 0 64k']);
    for (const args of [
      ['info', img],
      ['info', '--output=json', img],
    ]) {
      const theirs = (await qemuImg(args)).stdout;
      const ours = (await blockrep(args)).stdout;
      expect(ours).toBe(theirs);
    }
  });
});

describe.runIf(hasPeer('qemu-img', 'qemu-io'))('bitmap, against qemu-img bitmap', () => {
  it('the same actions on two copies: same messages and exit codes, same bitmaps and bits', async () => {
    const dir = makeTempDir();
    const setup = async (f: string, src: string) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
      await qemuImg(['create', '-q', '-f', 'qcow2', src, '16M']);
      await qemuImg(['bitmap', '--add', '-g', '32k', src, 'b1']);
      await qemuIo(['-f', 'qcow2', src], ['write 1M 64k', 'write 5M 4k']);
    };
    const q = dir.file('q.qcow2');
    const b = dir.file('b.qcow2');
    await setup(q, dir.file('qsrc.qcow2'));
    await setup(b, dir.file('bsrc.qcow2'));
    const steps = (img: string, src: string): string[][] => [
      [img, 'b0'],
      ['--add', img],
      ['--add', img, 'b0'],
      ['--add', img, 'b0'],
      ['--remove', img, 'nope'],
      ['-g', '4096', '--clear', img, 'b0'],
      ['-b', src, '--clear', img, 'b0'],
      ['-F', 'qcow2', '--merge', 'b1', img, 'b0'],
      ['--merge', 'b1', img, 'b0'],
      ['--add', '-g', '1000', img, 'bx'],
      ['--add', '-g', '4k', img, 'bx'],
      ['--add', '--disable', img, 'by'],
      ['--merge', 'b1', '-b', src, '-F', 'qcow2', img, 'b0'],
      ['--add', '--enable', '--remove', img, 'bz'],
      ['--add', '--merge', 'b0', '--disable', img, 'bw'],
      ['--clear', '--enable', img, 'by'],
      ['--remove', img, 'bx'],
    ];
    const qs = steps(q, dir.file('qsrc.qcow2'));
    const bs = steps(b, dir.file('bsrc.qcow2'));
    for (let i = 0; i < qs.length; i++) {
      const qr = await run('qemu-img', ['bitmap', ...qs[i]!], { okCodes: [0, 1] });
      const br = await blockrep(['bitmap', ...bs[i]!], [0, 1]);
      const line = bs[i]!.join(' ');
      expect({ line, code: br.code, stderr: br.stderr.replaceAll(b, 'IMG') }).toEqual({
        line,
        code: qr.code,
        stderr: qr.stderr.replaceAll('qemu-img', 'blockrep').replaceAll(q, 'IMG'),
      });
    }
    const fmt = async (f: string) => (await qemuImgJson(['info', f]))['format-specific'];
    expect(await fmt(b)).toEqual(await fmt(q));
    await qemuImg(['check', b]);
    // The bits: blockrep reads both images' bitmaps back (the qcow2 bitmap format is checked
    // against QEMU elsewhere).
    for (const name of ['b0', 'bw']) {
      const bits = (f: string) => bitmapExtents(f, name);
      const ours = await bits(b);
      expect(ours.length).toBeGreaterThan(0);
      expect(ours).toEqual(await bits(q));
    }
  });
});
