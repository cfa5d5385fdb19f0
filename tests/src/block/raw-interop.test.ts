import { readFileSync } from 'node:fs';
import { BlockBackend, createGraph, Perm, ReqFlags } from '@blockrep/block';
import { hasPeer, makeTempDir, qemuImg, qemuIo } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';

/** A deterministic mix of aligned and unaligned writes, zero writes and FUA writes. */
function ops(seed: number, size: number) {
  let x = seed;
  const rnd = (n: number) => {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    return x % n;
  };
  const list: { kind: 'write' | 'zero'; offset: number; bytes: number; pattern: number; fua: boolean }[] = [];
  for (let i = 0; i < 60; i++) {
    const unaligned = rnd(3) === 0;
    const bytes = unaligned ? 1 + rnd(20000) : 512 * (1 + rnd(256));
    const offset = unaligned ? rnd(size - bytes) : 512 * rnd((size - bytes) / 512);
    list.push({
      kind: rnd(5) === 0 ? 'zero' : 'write',
      offset,
      bytes,
      pattern: 1 + rnd(254),
      fua: rnd(4) === 0,
    });
  }
  return list;
}

describe.runIf(hasPeer('qemu-io'))('raw images: our stack vs qemu-io', () => {
  it('the same writes give byte-identical images (qemu-img compare)', async () => {
    const dir = makeTempDir();
    const size = 16 << 20;
    const ours = dir.file('ours.raw');
    const theirs = dir.file('theirs.raw');
    await qemuImg(['create', '-f', 'raw', ours, String(size)]);
    await qemuImg(['create', '-f', 'raw', theirs, String(size)]);
    const list = ops(42, size);

    const g = createGraph();
    const node = await g.open({ driver: 'raw', file: { driver: 'file', filename: ours } });
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(node);
    // One after the other, as qemu-io applies its -c commands.
    for (const op of list) {
      if (op.kind === 'write') {
        await blk.write(op.offset, Buffer.alloc(op.bytes, op.pattern), op.fua ? ReqFlags.FUA : 0);
      } else await blk.writeZeroes(op.offset, op.bytes);
    }
    await blk.flush();
    await blk.detach();

    const cmds = list.map((op) =>
      op.kind === 'write'
        ? `write ${op.fua ? '-f ' : ''}-P ${op.pattern} ${op.offset} ${op.bytes}`
        : `write -z ${op.offset} ${op.bytes}`,
    );
    const r = await qemuIo(['-f', 'raw', theirs], cmds);
    expect(r.stdout).not.toMatch(/failed|error/i);

    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', ours, theirs], { okCodes: [0, 1] });
    expect(cmp.stdout.trim()).toBe('Images are identical.');
    expect(cmp.code).toBe(0);
    // And not trivially equal: both hold exactly what the operations wrote.
    const model = Buffer.alloc(size);
    for (const op of list) model.fill(op.kind === 'write' ? op.pattern : 0, op.offset, op.offset + op.bytes);
    expect(readFileSync(ours).equals(model)).toBe(true);
    const info = JSON.parse((await qemuImg(['info', '--output=json', '-f', 'raw', ours])).stdout);
    expect(info['virtual-size']).toBe(size);
  });

  it('an image QEMU wrote reads back the same through our stack', async () => {
    const dir = makeTempDir();
    const f = dir.file('q.raw');
    await qemuImg(['create', '-f', 'raw', f, '4M']);
    await qemuIo(['-f', 'raw', f], ['write -P 0x5a 1000 70000', 'write -P 0x11 3M 4096']);
    const g = createGraph();
    const node = await g.open(`driver=raw,read-only=on,file.driver=file,file.filename=${f}`);
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    blk.attach(node);
    const a = await blk.read(999, 70002);
    expect(a[0]).toBe(0);
    expect(a.subarray(1, 70001).every((b) => b === 0x5a)).toBe(true);
    expect(a[70001]).toBe(0);
    expect((await blk.read(3 << 20, 4096)).every((b) => b === 0x11)).toBe(true);
  });
});
