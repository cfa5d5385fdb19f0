import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuIo } from './helpers';

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
