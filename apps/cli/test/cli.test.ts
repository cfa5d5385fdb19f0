import { writeFileSync } from 'node:fs';
import { hasPeer, makeTempDir, qemuImgJson, runPeer } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';

const bin = new URL('../bin/blockrep.mjs', import.meta.url).pathname;
const blockrep = (args: string[], okCodes = [0]) => runPeer('node', [bin, ...args], { okCodes });

describe('blockrep CLI', () => {
  it('create makes a raw image of the given size', async () => {
    const f = makeTempDir().file('a.raw');
    const r = await blockrep(['create', '-f', 'raw', f, '3M']);
    expect(r.stdout).toContain(`Formatting '${f}', fmt=raw size=3145728`);
    const info = JSON.parse((await blockrep(['info', '--output=json', f])).stdout);
    expect(info['virtual-size']).toBe(3 << 20);
  });

  it.runIf(hasPeer('qemu-img'))('info --output=json agrees with qemu-img on raw images', async () => {
    const f = makeTempDir().file('odd.raw');
    writeFileSync(f, Buffer.alloc(1000, 1));
    const ours = JSON.parse((await blockrep(['info', '--output=json', f])).stdout);
    const theirs = await qemuImgJson(['info', '-f', 'raw', f]);
    expect(ours).toEqual({ ...theirs, filename: f });
  });

  it('reports bad input with a clear message and exit code 1', async () => {
    const r = await blockrep(['create', '-f', 'raw', makeTempDir().file('x'), '12Q'], [1]);
    expect(r.stderr).toMatch(/Invalid image size specified/);
    const u = await blockrep(['frobnicate'], [1]);
    expect(u.stderr).toContain('Command not found: frobnicate');
    const m = await blockrep(['info', '/nonexistent.img'], [1]);
    expect(m.stderr).toContain("Could not open '/nonexistent.img': No such file or directory");
  });
});
