import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuImgJson, qemuIo, sameAsQemuImg } from './helpers';

/*
 * Internal snapshots both ways: qemu-img lists, applies, checks and deletes the snapshots
 * blockrep takes, and blockrep those qemu-img takes; the image reads what each snapshot held.
 */

const qemu = hasPeer('qemu-img', 'qemu-io');

describe.runIf(qemu)('snapshot, with qemu-img snapshot', () => {
  it('create, list, apply and delete interoperate; every step checks clean', async () => {
    const dir = makeTempDir();
    const img = dir.file('s.qcow2');
    const saved = (n: string) => dir.file(`${n}.raw`);
    const save = (n: string) => qemuImg(['convert', '-O', 'raw', img, saved(n)]);
    const same = (n: string) => qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', saved(n), img]);
    const check = () => qemuImg(['check', img]);
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
    await qemuIo([img], ['write -P 1 0 1M', 'write -z 2M 64k', 'write -P 5 3M 4k']);
    await save('a');
    await blockrep(['snapshot', '-c', 'ours', img]);
    await check();
    await qemuIo([img], ['write -P 2 0 512k', 'discard 3M 64k']);
    await save('b');
    await qemuImg(['snapshot', '-c', 'theirs', img]);
    await qemuIo([img], ['write -P 3 256k 64k', 'write -P 4 1M 1M']);
    await check();
    // The same list (ids, names, dates, sizes) from both.
    const list = (await qemuImg(['snapshot', '-l', img])).stdout;
    expect(list).toContain('ours');
    expect((await blockrep(['snapshot', '-l', img])).stdout).toBe(list);
    expect((await blockrep(['info', '--output=json', img])).stdout).toBe(
      (await qemuImg(['info', '--output=json', img])).stdout,
    );

    await blockrep(['snapshot', '-a', 'ours', img]);
    await check();
    await same('a');
    await blockrep(['snapshot', '-a', '2', img]); // by id: qemu-img's snapshot
    await check();
    await same('b');
    await qemuImg(['snapshot', '-a', 'ours', img]);
    await same('a');
    await blockrep(['snapshot', '-d', 'theirs', img]);
    await check();
    await same('a');
    await qemuImg(['snapshot', '-d', 'ours', img]);
    await check();
    await same('a');
    expect((await qemuImgJson(['info', img])).snapshots).toBeUndefined();
    // No snapshot left to keep clusters shared: writes go in place again, leaving no leaks.
    await qemuIo([img], ['write -P 6 0 2M']);
    const r = await qemuImgJson(['check', img]);
    expect(r.leaks ?? 0).toBe(0);
  });

  it('refuses what qemu-img refuses, with its text and exit code', async () => {
    const dir = makeTempDir();
    const img = dir.file('s.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
    await qemuImg(['snapshot', '-c', 'one', img]);
    for (const args of [
      ['-l', '-c', 'x', img],
      ['-d', 'nope', img],
      ['-a', 'nope', img],
      ['-c', 'x'],
      [img, img],
    ])
      await sameAsQemuImg(['snapshot', ...args]);
    await qemuImg(['bitmap', '--add', img, 'bm']);
    const { b } = await sameAsQemuImg(['snapshot', '-a', 'one', img]);
    expect(b.code).toBe(1);
  });
});
