import { describe, expect, it } from 'vitest';
import { startStream } from '../src/index';
import { chain3 as chain, readAll, SIZE, writer } from './backup-commit-helpers';

const chain3 = () => chain(21);

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
