import { type ChildProcess, spawn } from 'node:child_process';
import { makeTempDir, waitForPidFile } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { blockrep, qemuImg, run } from './helpers';

/* blockrep honours QEMU's image locks as qemu-img does: refused without -U, allowed with it. */

const holders: ChildProcess[] = [];
afterEach(() => {
  for (const h of holders.splice(0)) h.kill('SIGKILL');
});

describe('image locks', () => {
  it('info/map/compare/convert/check on an image QEMU is writing: the same refusal as qemu-img, -U reads', async () => {
    const d = makeTempDir();
    const f = d.file('busy.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    const sock = d.file('nbd.sock');
    const h = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, '--pid-file', d.file('nbd.pid'), f], {
      stdio: 'ignore',
    });
    holders.push(h);
    await waitForPidFile(d.file('nbd.pid'), h);
    const q = await run('qemu-img', ['info', f], { okCodes: [1] });
    const ours = await blockrep(['info', f], [1]);
    expect(ours.stderr).toBe(q.stderr.replace(/^qemu-img:/, 'blockrep:'));
    expect(ours.stderr).toContain('Failed to get shared "write" lock');
    expect(ours.stderr).toContain(`Is another process using the image [${f}]?`);
    for (const args of [
      ['map', f],
      ['compare', f, f],
      ['convert', '-O', 'raw', f, d.file('out.raw')],
    ]) {
      // qemu-img compare exits with 2 on errors, the others with 1.
      const r = await blockrep(args, [args[0] === 'compare' ? 2 : 1]);
      expect(r.stderr).toContain('Failed to get shared "write" lock');
    }
    // check too: qemu-img check's refusal, byte for byte.
    const qc = await run('qemu-img', ['check', f], { okCodes: [1] });
    const oc = await blockrep(['check', f], [1]);
    expect(oc.stderr).toBe(qc.stderr.replace(/^qemu-img:/, 'blockrep:'));
    expect((await blockrep(['check', '-U', f])).stdout).toContain('No errors were found on the image.');
    expect((await blockrep(['info', '-U', f])).stdout).toContain('virtual size: 1 MiB');
    expect((await blockrep(['compare', '-U', f, f])).stdout).toContain('Images are identical.');
    h.kill('SIGTERM');
    await new Promise((r) => h.once('exit', r));
    expect((await blockrep(['info', f])).stdout).toContain('virtual size: 1 MiB');
  });
});
