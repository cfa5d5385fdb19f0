import { describe, expect, it } from 'vitest';
import { startStream } from '../src/index';
import { env, qcow2Node, randomData, rawNode, readAll, SIZE, writer } from './backup-commit-helpers';

/** raw base (random data), qcow2 mid over it with a few writes, qcow2 top over mid. */
async function chain3() {
  const e = env();
  const { dir, graph } = e;
  await rawNode(graph, dir.file('base.raw'), 'base', randomData(SIZE, 21));
  await qcow2Node(graph, dir.file('mid.qcow2'), 'mid', {
    path: dir.file('base.raw'),
    node: 'base',
    fmt: 'raw',
  });
  await qcow2Node(graph, dir.file('top.qcow2'), 'top', {
    path: dir.file('mid.qcow2'),
    node: 'mid',
    fmt: 'qcow2',
  });
  const w = writer(graph, 'mid');
  await w.write(0, Buffer.alloc(65536, 0x11));
  await w.write(SIZE - 4096, Buffer.alloc(4096, 0x12));
  await w.detach();
  return e;
}

describe('stream', () => {
  it('top reads as before on its own, while a guest writes into it all along', async () => {
    const e = await chain3();
    const { graph, manager } = e;
    const guest = writer(graph, 'top');
    const before = await readAll(graph, 'top');
    const job = await startStream(manager, { id: 's0', top: graph.findNode('top'), base: null });
    // Guest writes race the copy-on-read of the same ranges: none of them may be overwritten.
    const expected = Buffer.from(before);
    const writes = Array.from({ length: 64 }, (_, i): [number, Buffer] => [
      i * (SIZE / 64) + (i % 7) * 4096 + 512,
      Buffer.alloc(3000, i + 1),
    ]);
    await Promise.all(writes.map(([off, data]) => guest.write(off, data)));
    for (const [off, data] of writes) data.copy(expected, off);
    await job.whenConcluded();
    expect(job.err).toBeNull();
    const top = graph.findNode('top');
    expect(top.backing).toBeNull();
    expect((await readAll(graph, 'top')).equals(expected)).toBe(true);
    await guest.detach();
  });

  it('onto a base node: top backs onto base and the backing-file name is written', async () => {
    const e = await chain3();
    const { graph, manager } = e;
    const before = await readAll(graph, 'top');
    const job = await startStream(manager, {
      id: 's1',
      top: graph.findNode('top'),
      base: graph.findNode('base'),
      backingFile: 'named-base.raw',
    });
    await job.whenConcluded();
    expect(job.err).toBeNull();
    const top = graph.findNode('top');
    expect(top.backing?.node.nodeName).toBe('base');
    expect((await readAll(graph, 'top')).equals(before)).toBe(true);
    expect(top.autoBackingFile).toBe('named-base.raw');
  });

  it('refuses a backing file name when the whole chain is streamed', async () => {
    const e = await chain3();
    await expect(
      startStream(e.manager, { id: 's2', top: e.graph.findNode('top'), base: null, backingFile: 'x' }),
    ).rejects.toThrow('backing file specified, but streaming the entire chain');
  });
});
