import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg } from './helpers';

/* Hostile images: each case ends in QEMU's verdict and text, never a hang or a JavaScript error. */

describe.runIf(hasPeer('qemu-img'))('backing file loops', () => {
  it('an image naming itself, and a -> b -> a: info says so, opening the chain is an error, nothing hangs', async () => {
    const d = makeTempDir();
    const self = d.file('self.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', d.file('base.qcow2'), '8M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', d.file('base.qcow2'), '-F', 'qcow2', self, '8M']);
    await qemuImg(['rebase', '-u', '-b', self, '-F', 'qcow2', self]);
    const a = d.file('a.qcow2');
    const b = d.file('b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '8M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', a, '-F', 'qcow2', b, '8M']);
    await qemuImg(['rebase', '-u', '-b', b, '-F', 'qcow2', a]);

    // info without the chain does not open the backing file (qemu-img neither).
    const info = await blockrep(['info', self]);
    expect(info.stdout).toContain(`backing file: ${self}`);
    for (const [img, loop] of [
      [self, self],
      [b, b],
    ]) {
      const theirs = await qemuImg(['info', '--backing-chain', img!], { okCodes: [1] });
      const ours = await blockrep(['info', '--backing-chain', img!], [1]);
      expect(theirs.stderr.trim()).toBe(`qemu-img: Backing file '${loop}' creates an infinite loop.`);
      expect(ours.stderr.trim()).toBe(`blockrep: Backing file '${loop}' creates an infinite loop.`);
    }
    // Reading through the chain is an error (qemu-img loops until it runs out of files here).
    const conv = await blockrep(['convert', '-O', 'raw', a, d.file('out.raw')], [1]);
    expect(conv.stderr).toContain('creates an infinite loop');
    expect(conv.stderr).toContain('Could not open backing file: ');
  });
});
