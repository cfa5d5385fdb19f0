import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, run } from './helpers';

/*
 * Differential: the same command line to qemu-img and to blockrep; the exit code and stderr must
 * agree (with the program's name swapped), and a refused command prints nothing on stdout.
 */

const qemu = hasPeer('qemu-img');

describe.runIf(qemu)('command lines qemu-img refuses, blockrep refuses alike', () => {
  it('unknown options, missing values, bad --output, wrong file counts: same text, same exit code', async () => {
    const dir = makeTempDir();
    const img = dir.file('a.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    const fresh = dir.file('never.qcow2');
    const lines: string[][] = [
      [],
      ['bogus'],
      ['--bogus'],
      ['info', '--bogus', img],
      ['info', '-z', img],
      ['info', '-qU', img],
      ['info', '--backing-chain=1', img],
      ['info', '--f=raw', img],
      ['info', img, '-f'],
      ['info', '--output', img],
      ['info', '--output=xml', img],
      ['info', img, img],
      ['info'],
      ['map', '--output=xml', img],
      ['map', '--bogus', img],
      ['check', '--output=bad', img],
      ['check', '-r', 'bad', img],
      ['check', '-r'],
      ['check'],
      ['compare', img],
      ['compare', img, img, img],
      ['convert', img],
      ['create'],
      ['create', '-f', 'qcow2', fresh, '1M', 'extra'],
      ['create', '-f', 'qcow2', '--bogus', fresh, '1M'],
      ['create', '-f', 'qcow2', '-o', 'foo=bar'],
      ['create', '-f', 'raw', fresh, '12Q'],
      ['resize', img],
      ['resize', img, '1M', 'extra'],
      ['commit'],
      ['commit', img, img],
      ['bench', '--bogus', img],
    ];
    for (const args of lines) {
      const q = await run('qemu-img', args, { okCodes: [0, 1, 2, 3] });
      const b = await blockrep(args, [0, 1, 2, 3]);
      const line = `blockrep ${args.join(' ')}`;
      expect({ line, code: b.code, stderr: b.stderr }).toEqual({
        line,
        code: q.code,
        stderr: q.stderr.replaceAll('qemu-img', 'blockrep'),
      });
      expect(b.stdout).toBe('');
    }
  });

  it('--help on every command and at the top prints the usage on stdout and exits 0; --version and -V too', async () => {
    for (const args of [['--help'], ['-h'], ['info', '--help'], ['check', '-h'], ['convert', '--help']]) {
      const b = await blockrep(args);
      expect(b.stdout).toMatch(/^usage: blockrep /);
      expect(b.stderr).toBe('');
    }
    for (const args of [['--version'], ['-V']]) {
      const b = await blockrep(args);
      expect(b.stdout).toMatch(/^blockrep version \d+\.\d+\.\d+ \(qemu-img 7\.2 command line\)\n$/);
    }
  });

  it('options qemu-img knows and blockrep does not implement are refused by name, not ignored', async () => {
    const dir = makeTempDir();
    const img = dir.file('a.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    const b = await blockrep(['info', '--object', 'secret,id=s,data=x', img], [1]);
    expect(b.stderr).toBe("blockrep: Option '--object' is not supported by blockrep yet\n");
    const c = await blockrep(['commit', '-r', '1M', img], [1]);
    expect(c.stderr).toBe("blockrep: Option '-r' is not supported by blockrep yet\n");
  });

  it('json: filenames and --image-opts name images as qemu-img reads them: same output, same errors', async () => {
    const dir = makeTempDir();
    const img = dir.file('a.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    const json = (o: unknown) => `json:${JSON.stringify(o)}`;
    const lines: string[][] = [
      ['info', json({ driver: 'qcow2', file: { driver: 'file', filename: img } })],
      ['info', json({ 'file.driver': 'file', 'file.filename': img })],
      ['info', json({ file: { filename: img } })],
      // -f wins over the driver; the file is 192.5 KiB, "192 KiB" as printf's %g rounds ties to even.
      ['info', '-f', 'raw', json({ driver: 'qcow2', file: { driver: 'file', filename: img } })],
      ['info', '--image-opts', `driver=qcow2,file.filename=${img}`],
      ['info', '--image-opts', `file.filename=${img}`],
      ['info', '--image-opts', '--output=json', `driver=qcow2,file.driver=file,file.filename=${img}`],
      ['info', '--image-opts', `driver=qcow2,file.filename=${dir.file('nope.qcow2')}`],
      ['info', '--image-opts', 'driver=qcow2'],
      ['info', '--image-opts', `driver=qcow2,file.filename=${img},bogus=1`],
      ['info', '--image-opts', '-f', 'qcow2', img],
      ['check', '--image-opts', `driver=qcow2,file.filename=${img}`],
      ['map', '--image-opts', '--output=json', `driver=qcow2,file.filename=${img}`],
      ['compare', '--image-opts', `driver=qcow2,file.filename=${img}`, `file.filename=${img}`],
    ];
    for (const args of lines) {
      const q = await run('qemu-img', args, { okCodes: [0, 1, 2, 3] });
      const b = await blockrep(args, [0, 1, 2, 3]);
      const line = `blockrep ${args.join(' ')}`;
      const norm = (t: string) =>
        t
          .replaceAll('qemu-img', 'blockrep')
          .replace(/disk size: .*\n/, '')
          .replace(/"actual-size": \d+/, '');
      expect({ line, code: b.code, stdout: norm(b.stdout), stderr: norm(b.stderr) }).toEqual({
        line,
        code: q.code,
        stdout: norm(q.stdout),
        stderr: norm(q.stderr),
      });
    }
  });
});
