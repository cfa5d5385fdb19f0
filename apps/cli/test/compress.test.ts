import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuImgJson, qemuIo, run } from './helpers';

/* convert -c: compressed clusters QEMU reads, checks and maps as it maps its own. */

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('convert -c, against qemu-img convert -c', () => {
  it('writes compressed clusters qemu-img reads back identical, checks clean and maps alike', async () => {
    const dir = makeTempDir();
    const src = dir.file('src.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '8388608']);
    // Compressible data, data that does not compress (stored plainly), zeroes, an unaligned tail.
    await qemuIo(
      [src],
      [
        'write -P 1 0 1M',
        'write -P 7 2M 100k',
        'write -z 4M 1M',
        'write -P 0 6M 64k',
        'write -P 9 8323072 65536',
      ],
    );
    const rnd = dir.file('rnd.raw');
    await run('dd', ['if=/dev/urandom', `of=${rnd}`, 'bs=64k', 'count=4', 'status=none']);
    await qemuIo([src], [`write -P 3 7M 4k`]);
    const q = dir.file('q.qcow2');
    const b = dir.file('b.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, q]);
    await blockrep(['convert', '-c', '-O', 'qcow2', src, b]);
    await qemuImg(['compare', src, b]);
    await qemuImg(['compare', q, b]);
    const check = await qemuImgJson(['check', b]);
    const qcheck = await qemuImgJson(['check', q]);
    expect(check['compressed-clusters']).toBe(qcheck['compressed-clusters']);
    expect(check['allocated-clusters']).toBe(qcheck['allocated-clusters']);
    const map = async (f: string) => await qemuImgJson<Record<string, unknown>[]>(['map', f]);
    expect(await map(b)).toEqual(await map(q));

    // Random data does not compress: qemu-img and blockrep both store it plainly.
    const rq = dir.file('rq.qcow2');
    const rb = dir.file('rb.qcow2');
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', rnd, rq]);
    await blockrep(['convert', '-c', '-f', 'raw', '-O', 'qcow2', rnd, rb]);
    await qemuImg(['compare', '-f', 'raw', rnd, rb]);
    expect((await qemuImgJson(['check', rb]))['compressed-clusters']).toBe(
      (await qemuImgJson(['check', rq]))['compressed-clusters'] ?? undefined,
    );

    const refused = await blockrep(['convert', '-c', '-O', 'raw', src, dir.file('x.raw')], [1]);
    const qrefused = await run('qemu-img', ['convert', '-c', '-O', 'raw', src, dir.file('y.raw')], {
      okCodes: [1],
    });
    expect(refused.stderr).toBe(qrefused.stderr.replaceAll('qemu-img', 'blockrep'));
  });
});
