import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { qemuImg, qemuIo, sameAsQemuImg } from './helpers';

/* Differential: the same amend command lines on two copies, by qemu-img and by blockrep. */

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('amend, against qemu-img amend', () => {
  it('same messages and exit codes, and the images end up alike (info, content, check)', async () => {
    const dir = makeTempDir();
    for (const who of ['q', 'b']) {
      await qemuImg(['create', '-q', '-f', 'qcow2', dir.file(`${who}.qcow2`), '4M']);
      await qemuIo([dir.file(`${who}.qcow2`)], ['write -P 1 0 3M']);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', dir.file(`${who}-v2.qcow2`), '1M']);
    }
    const lines: string[][] = [
      ['-o', 'lazy_refcounts=on', 'IMG'],
      ['-o', 'size=8M', 'IMG'],
      ['-o', 'backing_file=base.qcow2,backing_fmt=qcow2', 'IMG'],
      ['-o', 'cluster_size=4k', 'IMG'],
      ['-o', 'foo=1', 'IMG'],
      ['IMG'],
      ['-o', 'compat=1.1', 'IMG'],
      ['-o', 'refcount_bits=16', 'IMG'],
      ['-f', 'raw', '-o', 'size=1M', 'IMG'],
      ['-o', 'preallocation=full', 'IMG'],
      ['-o', 'size=2M', 'IMG'],
      ['-o', 'size=9M', '-o', 'lazy_refcounts=off', 'IMG'],
      ['-o', 'compression_type=zlib', 'IMG'],
      ['-o', 'data_file=x', 'IMG'],
      ['-o', 'lazy_refcounts=on', 'V2'],
      ['-o', 'lazy_refcounts=maybe', 'IMG'],
      ['-o', 'size=abc', 'IMG'],
      ['-o', 'refcount_bits=3', 'IMG'],
      ['-o', 'compat=2', 'IMG'],
      ['-o', 'size=1M', 'IMG', 'IMG'],
    ];
    const fill = (args: string[], who: string) =>
      args.map((a) =>
        a === 'IMG' ? dir.file(`${who}.qcow2`) : a === 'V2' ? dir.file(`${who}-v2.qcow2`) : a,
      );
    for (const args of lines)
      await sameAsQemuImg(['amend', ...fill(args, 'q')], ['amend', ...fill(args, 'b')], {
        stdout: false,
        swap: [[dir.file('q'), dir.file('b')]],
      });
    await qemuImg(['compare', dir.file('q.qcow2'), dir.file('b.qcow2')]);
    await qemuImg(['check', dir.file('b.qcow2')]);
    const info = async (who: string) =>
      (await qemuImg(['info', dir.file(`${who}.qcow2`)])).stdout.replace(/^(image|disk size):.*\n/gm, '');
    expect(await info('b')).toBe(await info('q'));
  });
});
