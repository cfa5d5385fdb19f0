import { copyFileSync } from 'node:fs';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg } from './helpers';
import { baseImages, both, HOSTILE_CASES, patchFile } from './hostile-cases';

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

describe.runIf(hasPeer('qemu-img'))('damaged images: the same verdicts and texts as qemu-img', () => {
  it('info, check, check --output=json, check -r all and a read of each case', {
    timeout: 600_000,
  }, async () => {
    const d = makeTempDir();
    const bases = await baseImages(d.path);
    const mismatches: string[] = [];
    for (const c of HOSTILE_CASES) {
      const theirs = d.file(`${c.base}-q-${HOSTILE_CASES.indexOf(c)}.qcow2`);
      const ours = d.file(`${c.base}-b-${HOSTILE_CASES.indexOf(c)}.qcow2`);
      copyFileSync(bases[c.base]!, theirs);
      patchFile(theirs, c.patches);
      copyFileSync(theirs, ours);
      const steps: [string, (f: string) => string[]][] = [
        ['info', (f) => ['info', f]],
        ['check', (f) => ['check', f]],
        ['check json', (f) => ['check', '--output=json', f]],
        ['check -r all', (f) => ['check', '-r', 'all', f]],
        ['check after repair', (f) => ['check', f]],
      ];
      for (const [step, args] of steps) {
        if (c.qemuRepairBug && (step === 'check -r all' || step === 'check after repair')) {
          if (step === 'check after repair') {
            const clean = await blockrep(['check', ours], [0, 1, 2, 3]);
            if (clean.code !== 0) mismatches.push(`${c.name} / ${step}: ours is not clean:\n${clean.stderr}`);
          } else await blockrep(['check', '-r', 'all', ours], [0, 1, 2, 3]);
          continue;
        }
        const r = await both(args, theirs, ours);
        if (JSON.stringify(r.ours) !== JSON.stringify(r.qemu)) {
          mismatches.push(
            `${c.name} / ${step}:\n  qemu: ${JSON.stringify(r.qemu)}\n  ours: ${JSON.stringify(r.ours)}`,
          );
        }
      }
    }
    expect(mismatches.join('\n')).toBe('');
  });
});
