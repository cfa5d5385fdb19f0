import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuImgJson, qemuIo, run, sameAsQemuImg } from './helpers';

/*
 * Differential: the same rebase on two copies of one chain, one by qemu-img and one by blockrep;
 * the images must then read the same, allocate the same ranges, record the same backing file,
 * and pass qemu-img check. Refusals must print qemu-img's text with its exit code.
 */

const qemu = hasPeer('qemu-img', 'qemu-io');

/** base (4M) <- top (6M, larger than its backing), and an unrelated new.qcow2 (3M), in dir. */
async function chain(dir: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const f = (n: string) => join(dir, n);
  await qemuImg(['create', '-q', '-f', 'qcow2', f('base.qcow2'), '4M']);
  await qemuIo([f('base.qcow2')], ['write -P 1 0 1M', 'write -P 2 2M 64k', 'write -P 9 3M 1000']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('top.qcow2'), '6M']);
  await qemuIo([f('top.qcow2')], ['write -P 3 512k 64k', 'write -z 2M 4k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', f('new.qcow2'), '3M']);
  await qemuIo([f('new.qcow2')], ['write -P 1 0 256k', 'write -P 7 1M 1M', 'write -P 2 2M 100k']);
}

/** The image without its backing file (which may be missing after an unsafe rebase). */
const alone = (path: string) =>
  `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: path } })}`;

/** What an image shows of itself: its own allocation (without host offsets) and backing file. */
async function shape(path: string) {
  const map = await qemuImgJson<Record<string, unknown>[]>(['map', alone(path)]);
  const info = await qemuImgJson(['info', path]);
  return {
    map: map.map(({ offset: _o, ...rest }) => rest),
    backing: info['backing-filename'],
    backingFormat: info['backing-filename-format'],
  };
}

describe.runIf(qemu)('rebase, against qemu-img rebase', () => {
  it('safe, flattening and unsafe rebases leave what qemu-img leaves', async () => {
    const root = makeTempDir();
    const cases: string[][] = [
      ['-b', 'new.qcow2', '-F', 'qcow2'],
      ['-b', ''],
      ['-p', '-b', 'base.qcow2', '-F', 'qcow2'],
      ['-u', '-b', 'new.qcow2', '-F', 'qcow2'],
      ['-u', '-b', 'missing.qcow2', '-F', 'qcow2'],
      ['-u'],
    ];
    for (const [i, args] of cases.entries()) {
      const q = root.file(`q${i}`);
      const b = root.file(`b${i}`);
      await chain(q);
      await chain(b);
      const before = join(q, 'before.raw');
      await qemuImg(['convert', '-O', 'raw', join(q, 'top.qcow2'), before]);
      await sameAsQemuImg(
        ['rebase', ...args, join(q, 'top.qcow2')],
        ['rebase', ...args, join(b, 'top.qcow2')],
        {
          swap: [[q, b]],
          stdout: false, // (-p: qemu-img draws its progress line even into a pipe; blockrep on terminals only)
        },
      );
      const what = `rebase ${args.join(' ')}`;
      expect({ what, shape: await shape(join(b, 'top.qcow2')) }).toEqual({
        what,
        shape: await shape(join(q, 'top.qcow2')),
      });
      await qemuImg(['check', alone(join(b, 'top.qcow2'))]);
      if (!args.includes('-u')) {
        // Safe mode: the image reads exactly as it did before.
        await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', before, join(b, 'top.qcow2')]);
        await qemuImg(['compare', join(q, 'top.qcow2'), join(b, 'top.qcow2')]);
      }
    }
  });

  it('refuses what qemu-img refuses, with its text and exit code, and leaves the image alone', async () => {
    const dir = makeTempDir();
    await chain(dir.path);
    const top = dir.file('top.qcow2');
    const raw = dir.file('r.raw');
    await qemuImg(['create', '-q', '-f', 'raw', raw, '1M']);
    const lines: string[][] = [
      ['rebase', top],
      ['rebase', '-b', 'new.qcow2', top],
      ['rebase', '-u', '-b', 'new.qcow2', top],
      ['rebase', '-b', 'nonexist.qcow2', '-F', 'qcow2', top],
      ['rebase', '-b', 'new.qcow2', '-F', 'vmdkx', top],
      ['rebase', '-t', 'bad', '-b', 'new.qcow2', '-F', 'qcow2', top],
      ['rebase', '-f', 'raw', '-u', '-b', 'x', '-F', 'qcow2', raw],
      ['rebase', '-b', 'new.qcow2', '-F', 'qcow2', dir.file('nonexist.qcow2')],
      ['rebase', '-b', 'new.qcow2', '-F', 'qcow2', top, top],
      ['rebase', '--bogus', top],
    ];
    for (const args of lines) {
      const line = args.join(' ');
      const before = await shape(top);
      const b = await blockrep(args, [0, 1, 2]);
      // blockrep refuses before it writes (qemu-img without -F copies first, then fails).
      expect({ line, shape: await shape(top) }).toEqual({ line, shape: before });
      const q = await run('qemu-img', args, { okCodes: [0, 1, 2] });
      expect({ line, code: b.code, stderr: b.stderr }).toEqual({
        line,
        code: q.code,
        stderr: q.stderr.replaceAll('qemu-img', 'blockrep'),
      });
    }
  });
});
