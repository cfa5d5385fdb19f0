import { writeFileSync } from 'node:fs';
import { BlockBackend, type BlockError, createGraph, Perm } from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { filterDrivers } from '../src/index';

async function open(rules: Record<string, unknown>) {
  const f = makeTempDir().file('d.img');
  writeFileSync(f, Buffer.alloc(1 << 20));
  const g = createGraph(filterDrivers);
  const n = await g.open({ driver: 'blkdebug', image: { driver: 'file', filename: f }, ...rules });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(n);
  return blk;
}

const fails = async (p: Promise<unknown>) => {
  try {
    await p;
    return null;
  } catch (e) {
    return (e as BlockError).errno;
  }
};

describe('blkdebug', () => {
  it('fails requests by event, iotype and sector with the given errno', async () => {
    const blk = await open({ 'inject-error': [{ event: 'write_aio', errno: 28, sector: 8 }] });
    expect(await fails(blk.write(0, Buffer.alloc(512)))).toBeNull();
    expect(await fails(blk.write(4096, Buffer.alloc(512)))).toBe('ENOSPC');
    // The armed rule has no iotype: it hits any request on its sector until another event re-arms.
    expect(await fails(blk.read(4096, 512))).toBe('ENOSPC');
    expect(await fails(blk.read(0, 512))).toBeNull();
  });

  it('keeps a rule armed until once removes it', async () => {
    const blk = await open({ 'inject-error': [{ event: 'read_aio', once: true }] });
    expect(await fails(blk.read(0, 512))).toBe('EIO');
    expect(await fails(blk.read(0, 512))).toBeNull();
    const always = await open({ 'inject-error': [{ event: 'read_aio', iotype: 'read' }] });
    expect(await fails(always.read(0, 512))).toBe('EIO');
    expect(await fails(always.read(512, 512))).toBe('EIO');
    expect(await fails(always.write(0, Buffer.alloc(512)))).toBeNull();
  });

  it('follows its state machine', async () => {
    const blk = await open({
      'inject-error': [{ event: 'write_aio', state: 2 }],
      'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
    });
    expect(await fails(blk.write(0, Buffer.alloc(512)))).toBeNull();
    await blk.flush();
    expect(await fails(blk.write(0, Buffer.alloc(512)))).toBe('EIO');
  });

  it('imposes its alignment on the nodes above', async () => {
    const blk = await open({ align: 4096 });
    expect(blk.node!.limits.requestAlignment).toBe(4096);
    await blk.write(10, Buffer.from('abc'));
    expect((await blk.read(10, 3)).toString()).toBe('abc');
  });
});
