import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, it } from 'vitest';
import { qemuImg, qemuIo, sameAsQemuImg } from './helpers';

/* Differential: qemu-img measure and blockrep measure on the same arguments print the same. */

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('measure, against qemu-img measure', () => {
  it('sizes for --size and for images (chains, zeroes, bitmaps), refusals: same output, same exit code', async () => {
    const dir = makeTempDir();
    const base = dir.file('base.qcow2');
    const top = dir.file('top.qcow2');
    const raw = dir.file('r.raw');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
    await qemuIo([base], ['write -P 1 0 1M', 'write -P 2 2M 64k', 'write -P 9 3M 1000', 'write -z 1M 512k']);
    await qemuImg(['bitmap', '--add', base, 'b1']);
    await qemuImg(['bitmap', '--add', '-g', '4096', base, 'a-longer-bitmap-name']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '6M']);
    await qemuIo([top], ['write -P 3 512k 64k', 'write -P 4 5M 4k']);
    await qemuImg(['create', '-q', '-f', 'raw', raw, '1000000']);
    await qemuIo(['-f', 'raw', raw], ['write -P 5 4096 8192']);
    const lines: string[][] = [
      ['--size', '1G', '-O', 'qcow2'],
      ['--size', '1000000', '-O', 'qcow2'],
      ['--size', '1G'],
      ['-O', 'qcow2', base],
      ['--output=json', '-O', 'qcow2', base],
      ['--output=json', '-O', 'qcow2', '-o', 'cluster_size=4k,preallocation=metadata', base],
      ['-O', 'qcow2', '-o', 'compat=0.10', base],
      ['-O', 'qcow2', top],
      ['-O', 'qcow2', '-o', 'cluster_size=2M', top],
      ['-O', 'qcow2', '-o', 'preallocation=falloc', top],
      ['-O', 'qcow2', '-f', 'raw', raw],
      ['-f', 'raw', raw],
      ['-O', 'qcow2', '-o', 'preallocation=full', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'refcount_bits=1,cluster_size=2M', '--size', '100G'],
      ['-O', 'qcow2', '-o', 'extended_l2=on', '--size', '1G'],
      [],
      ['--size', '1G', top],
      ['-O', 'qcow2', '--size', '1x'],
      ['-O', 'qcow2', '-o', 'foo=bar', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'cluster_size=3k', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'preallocation=bad', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'refcount_bits=3', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=512', '--size', '7G'],
      ['-O', 'raw', '-o', 'foo=1', '--size', '1G'],
      ['-O', 'qcow2', dir.file('nonexist')],
      ['--output=xml', '--size', '1G'],
    ];
    for (const args of lines) await sameAsQemuImg(['measure', ...args]);
  });
});
