import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, sameAsQemuImg } from './helpers';

/* qcow2 header feature bits we do not know: refused or cleared as qemu-img 7.2 does. */

function patchU64(path: string, at: number, v: bigint): void {
  const fd = openSync(path, 'r+');
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  writeSync(fd, b, 0, 8, at);
  closeSync(fd);
}

function readU64(path: string, at: number): bigint {
  const fd = openSync(path, 'r');
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, at);
  closeSync(fd);
  return b.readBigUInt64BE(0);
}

describe.runIf(hasPeer('qemu-img'))('unknown header feature bits, against qemu-img', () => {
  it('unknown incompatible bits refuse the open with one combined value; unknown autoclear bits are cleared by a writer', async () => {
    const dir = makeTempDir();
    const img = dir.file('f.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    patchU64(img, 72, (1n << 8n) | (1n << 9n)); // incompatible features
    for (const cmd of ['info', 'check', 'map']) {
      const { b } = await sameAsQemuImg([cmd, img]);
      expect(b.stderr).toContain('Unknown incompatible feature: 300');
    }
    patchU64(img, 72, 0n);
    patchU64(img, 88, 1n << 5n); // an autoclear bit nobody maintains here
    await blockrep(['amend', '-o', 'lazy_refcounts=off', img]);
    expect(readU64(img, 88)).toBe(0n);
    await qemuImg(['check', img]);
  });
});
