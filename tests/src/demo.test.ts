/** The main job (`pnpm demo`) runs to its end: the README's first command must keep working. */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { hasPeer } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..');

describe.runIf(hasPeer('qemu-img', 'qemu-io', 'nbdinfo'))('pnpm demo', () => {
  it('serves a qcow2 image, then replicates, checkpoints and fails over a COLO pair', async () => {
    const { stdout, stderr } = await promisify(execFile)(
      process.execPath,
      [join(root, 'tooling', 'demo', 'demo.mjs')],
      {
        cwd: root,
        timeout: 120_000,
      },
    );
    expect(stdout).toContain('No errors were found on the image.');
    expect(stdout).toContain('[{"stage":"done","node-name":"sec-repl","mode":"secondary"}]');
    // The secondary disk after failover equals the last checkpoint plus the secondary's own write.
    expect(stdout.match(/Images are identical\./g)).toHaveLength(2);
    expect(stdout.trimEnd().split('\n').at(-1)).toMatch(/^demo done: /);
    // A failover is no error: the daemons log none (it once logged its own backup job's cancel).
    expect(stderr).not.toMatch(/"level":"error"/);
  }, 150_000);
});
