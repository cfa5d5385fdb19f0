import { readFileSync } from 'node:fs';
import { addDirtyBitmap, type BlockError } from '@blockrep/block';
import { describe, expect, it } from 'vitest';
import { type MirrorOptions, startMirror } from '../src/index';
import {
  blkdebugPair,
  env,
  failingPair,
  qcow2Node,
  randomData,
  randomWrites,
  rawNode,
  rawPair,
  readAll,
  SIZE,
  writer,
} from './backup-commit-helpers';
import { countFlushes, timeline, waitStatus } from './helpers';

/** A raw source full of data with a guest writing to it, and an empty raw target. */
async function pair(extra: Partial<MirrorOptions> = {}) {
  const e = env();
  const { graph, manager } = e;
  await rawPair(e, 3);
  const guest = writer(graph, 's0');
  const job = await startMirror(manager, {
    id: 'm0',
    source: graph.findNode('s0'),
    target: graph.findNode('t0'),
    sync: 'full',
    ...extra,
  });
  return { ...e, guest, job };
}

const file = (e: ReturnType<typeof env>, name: string) => readFileSync(e.dir.file(name));

describe('mirror', () => {
  it('sync=full: READY once in sync, job-complete moves the guest onto the target', async () => {
    const e = await pair();
    const { job, guest, graph, events } = e;
    await randomWrites(guest, 64, 5);
    await waitStatus(job, 'ready');
    await randomWrites(guest, 64, 6);
    const seen = await guest.read(0, SIZE);
    job.userComplete();
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(guest.node!.nodeName).toBe('t0');
    expect(file(e, 't.raw').equals(seen)).toBe(true);
    // The guest now writes to the target only.
    await guest.write(0, Buffer.alloc(4096, 0x77));
    expect(
      file(e, 't.raw')
        .subarray(0, 4096)
        .every((b) => b === 0x77),
    ).toBe(true);
    expect(
      file(e, 's.raw')
        .subarray(0, 4096)
        .every((b) => b === 0x77),
    ).toBe(false);
    expect(graph.allNodes().some((n) => n.driver.name === 'mirror_top')).toBe(false);
    expect(timeline(events)).toEqual([
      'created',
      'running',
      'ready',
      'BLOCK_JOB_READY',
      'waiting',
      'pending',
      'BLOCK_JOB_COMPLETED',
      'concluded',
      'null',
    ]);
    const done = events.find((x) => x.event === 'BLOCK_JOB_COMPLETED')!.data;
    expect(done.len).toBe(done.offset);
    expect(done.len as number).toBeGreaterThanOrEqual(SIZE);
  });

  it('a cancel after READY leaves the target a copy of that moment, with no pivot', async () => {
    const e = await pair();
    const { job, guest, events } = e;
    await waitStatus(job, 'ready');
    await randomWrites(guest, 32, 7);
    const atCancel = await guest.read(0, SIZE);
    await job.userCancel(false);
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(guest.node!.nodeName).toBe('s0');
    expect(file(e, 't.raw').equals(atCancel)).toBe(true);
    expect(events.some((x) => x.event === 'BLOCK_JOB_COMPLETED')).toBe(true);
    expect(events.some((x) => x.event === 'BLOCK_JOB_CANCELLED')).toBe(false);
    // The source goes on alone.
    await guest.write(0, Buffer.alloc(4096, 0x55));
    expect(file(e, 't.raw').equals(atCancel)).toBe(true);
  });

  it('a cancel before READY is a cancellation', async () => {
    const e = await pair({ speed: 1 << 20 });
    const { job, guest, events } = e;
    await job.userCancel(false);
    await job.whenConcluded();
    expect(job.err?.message).toBe('Operation canceled');
    expect(guest.node!.nodeName).toBe('s0');
    expect(events.some((x) => x.event === 'BLOCK_JOB_CANCELLED')).toBe(true);
    expect(events.some((x) => x.event === 'BLOCK_JOB_READY')).toBe(false);
  });

  it('sync=top copies only what the top layer holds', async () => {
    const e = env();
    const { dir, graph, manager } = e;
    await rawNode(graph, dir.file('base.raw'), 'base', randomData(SIZE, 8));
    await qcow2Node(graph, dir.file('top.qcow2'), 'top', {
      path: dir.file('base.raw'),
      node: 'base',
      fmt: 'raw',
    });
    await qcow2Node(graph, dir.file('tgt.qcow2'), 'tgt');
    const guest = writer(graph, 'top');
    await guest.write(65536, Buffer.alloc(65536, 0x21));
    const job = await startMirror(manager, {
      id: 'mt',
      source: graph.findNode('top'),
      target: graph.findNode('tgt'),
      sync: 'top',
    });
    await waitStatus(job, 'ready');
    await job.userCancel(false);
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(job.progressTotal).toBe(65536);
    const t = await readAll(graph, 'tgt');
    expect(t.subarray(65536, 131072).every((b) => b === 0x21)).toBe(true);
    expect(t.subarray(0, 65536).every((b) => b === 0)).toBe(true);
  });

  it('sync=none copies only what is written during the job', async () => {
    const e = await pair({ sync: 'none' });
    const { job, guest } = e;
    await waitStatus(job, 'ready');
    await guest.write(3 * 65536, Buffer.alloc(8192, 0x31));
    await job.userCancel(false);
    await job.whenConcluded();
    const t = file(e, 't.raw');
    expect(t.subarray(3 * 65536, 3 * 65536 + 8192).every((b) => b === 0x31)).toBe(true);
    // The rest of the granule came along, nothing else did.
    expect(t.subarray(3 * 65536, 4 * 65536).equals(file(e, 's.raw').subarray(3 * 65536, 4 * 65536))).toBe(
      true,
    );
    expect(t.subarray(0, 3 * 65536).every((b) => b === 0)).toBe(true);
    expect(t.subarray(4 * 65536).every((b) => b === 0)).toBe(true);
  });

  it('write-blocking: once READY, a guest write has reached the target when it completes', async () => {
    const e = await pair({ copyMode: 'write-blocking' });
    const { job, guest } = e;
    await waitStatus(job, 'ready');
    for (let i = 0; i < 16; i++) {
      const off = i * 200_000;
      await guest.write(off, Buffer.alloc(1000, i + 1));
      expect(
        file(e, 't.raw')
          .subarray(off, off + 1000)
          .every((b) => b === i + 1),
      ).toBe(true);
    }
    job.userComplete();
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(file(e, 't.raw').equals(file(e, 's.raw'))).toBe(true);
  });

  it('bitmap: copies the dirty areas of the named bitmap and nothing else', async () => {
    const e = env();
    const { graph, manager } = e;
    await rawPair(e, 4);
    const bm = addDirtyBitmap(graph.findNode('s0'), { name: 'missed', granularity: 65536 });
    const guest = writer(graph, 's0');
    await guest.write(65536 + 100, Buffer.alloc(1000, 0x41));
    await guest.write(SIZE - 65536, Buffer.alloc(65536, 0x42));
    const job = await startMirror(manager, {
      id: 'mb',
      source: graph.findNode('s0'),
      target: graph.findNode('t0'),
      sync: 'full',
      bitmap: bm,
    });
    await waitStatus(job, 'ready');
    expect(bm.busy).toBe(true);
    await job.userCancel(false);
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(job.progressTotal).toBe(2 * 65536);
    // The bitmap was the job's working bitmap: clean now, and free; it records what comes next.
    expect(bm.busy).toBe(false);
    expect(bm.count()).toBe(0);
    await guest.write(0, Buffer.alloc(512, 1));
    expect(bm.count()).toBe(65536);
    const s = file(e, 's.raw');
    const t = file(e, 't.raw');
    for (const off of [65536, SIZE - 65536]) {
      expect(t.subarray(off, off + 65536).equals(s.subarray(off, off + 65536))).toBe(true);
    }
    expect(t.subarray(0, 65536).every((b) => b === 0)).toBe(true);
    expect(t.subarray(2 * 65536, SIZE - 65536).every((b) => b === 0)).toBe(true);
  });

  it('bitmap: a failed resync leaves marked what the target still lacks', async () => {
    const e = env();
    const { graph, manager } = e;
    // The target fails every write from 1 MiB on.
    await blkdebugPair(e, 5, 't0', [
      { event: 'write_aio', sector: 2048 },
      { event: 'write_aio', sector: 4096 },
    ]);
    const bm = addDirtyBitmap(graph.findNode('s0'), { name: 'missed', granularity: 65536 });
    const guest = writer(graph, 's0');
    await guest.write(0, Buffer.alloc(65536, 1));
    await guest.write(1 << 20, Buffer.alloc(65536, 2));
    const job = await startMirror(manager, {
      id: 'mf',
      source: graph.findNode('s0'),
      target: graph.findNode('dbg'),
      sync: 'full',
      bitmap: bm,
    });
    await job.whenConcluded();
    expect(job.err).not.toBeNull();
    expect([...bm.dirtyExtents()]).toEqual([[1 << 20, 65536]]);
    expect(bm.busy).toBe(false);
  });

  it('refuses to mirror a node into itself', async () => {
    const { dir, graph, manager } = env();
    await rawNode(graph, dir.file('s.raw'), 's0');
    const s = graph.findNode('s0');
    await expect(startMirror(manager, { id: 'x', source: s, target: s, sync: 'full' })).rejects.toThrow(
      "Can't mirror node into itself",
    );
    expect(manager.query()).toEqual([]);
  });
});

describe('mirror write-behind', () => {
  /** A mirror of SIZE bytes of data to READY; the flushes of the target by then. */
  async function flushesBeforeReady(writeBehind: number): Promise<number> {
    const e = env();
    const { dir, graph, manager } = e;
    await rawPair(e, 8);
    const flushes = countFlushes(graph.findNode('t0'));
    try {
      const job = await startMirror(manager, {
        id: 'wb',
        source: graph.findNode('s0'),
        target: graph.findNode('t0'),
        sync: 'full',
        writeBehind,
      });
      await waitStatus(job, 'ready');
      const n = flushes.count();
      await job.userCancel(false);
      await job.whenConcluded();
      expect(readFileSync(dir.file('t.raw')).equals(randomData(SIZE, 8))).toBe(true);
      return n;
    } finally {
      flushes.restore();
    }
  }

  it('before READY the target is flushed in the background as the copy goes (0: only the flush before READY, as QEMU)', async () => {
    expect(await flushesBeforeReady(0)).toBe(1);
    expect(await flushesBeforeReady(1 << 20)).toBeGreaterThanOrEqual(2);
  });

  it("a background flush's error is reported by the flush before READY, not lost (the kernel tells one fsync only)", async () => {
    const e = env();
    const { graph, manager, events } = e;
    // The first flush fails: a background one, since each copy of 1 MiB starts one.
    await blkdebugPair(e, 9, 't0', [{ event: 'flush_to_disk', once: true }]);
    const job = await startMirror(manager, {
      id: 'wbe',
      source: graph.findNode('s0'),
      target: graph.findNode('dbg'),
      sync: 'full',
      bufSize: 1 << 20,
      writeBehind: 1 << 20,
    });
    await Promise.race([job.whenConcluded(), waitStatus(job, 'ready')]);
    expect(job.status).not.toBe('ready');
    expect((job.err as BlockError).errno).toBe('EIO');
    expect(events.find((x) => x.event === 'BLOCK_JOB_ERROR')?.data).toEqual({
      device: 'wbe',
      operation: 'write',
      action: 'report',
    });
  });
});

describe('mirror errors (blkdebug)', () => {
  async function failing(policy: 'report' | 'ignore' | 'stop', where: 'source' | 'target') {
    const e = env();
    const job = await startMirror(e.manager, {
      id: 'e',
      ...(await failingPair(e, where)),
      sync: 'full',
      ...(where === 'source' ? { onSourceError: policy } : { onTargetError: policy }),
    });
    return { job, events: e.events, dir: e.dir };
  }

  for (const where of ['source', 'target'] as const) {
    it(`on-${where}-error=report fails the job with the error`, async () => {
      const { job, events } = await failing('report', where);
      await job.whenConcluded();
      expect((job.err as BlockError).errno).toBe('EIO');
      expect(events.find((x) => x.event === 'BLOCK_JOB_ERROR')?.data).toEqual({
        device: 'e',
        operation: where === 'source' ? 'read' : 'write',
        action: 'report',
      });
      expect(events.find((x) => x.event === 'BLOCK_JOB_COMPLETED')?.data.error).toBe('Input/output error');
    });

    it(`on-${where}-error=ignore copies the extent again and gets in sync`, async () => {
      const { job, events, dir } = await failing('ignore', where);
      await waitStatus(job, 'ready');
      await job.userCancel(false);
      await job.whenConcluded();
      expect(job.err).toBeNull();
      expect(events.some((x) => x.event === 'BLOCK_JOB_ERROR' && x.data.action === 'ignore')).toBe(true);
      expect(readFileSync(dir.file('t.raw')).equals(readFileSync(dir.file('s.raw')))).toBe(true);
    });

    it(`on-${where}-error=stop pauses the job with io-status failed until resumed`, async () => {
      const { job, events, dir } = await failing('stop', where);
      await waitStatus(job, 'paused');
      expect(events.some((x) => x.event === 'BLOCK_JOB_ERROR' && x.data.action === 'stop')).toBe(true);
      expect(job.blockInfo()['io-status']).toBe('failed');
      job.userResume();
      expect(job.blockInfo()['io-status']).toBe('ok');
      await waitStatus(job, 'ready');
      await job.userCancel(false);
      await job.whenConcluded();
      expect(job.err).toBeNull();
      expect(readFileSync(dir.file('t.raw')).equals(readFileSync(dir.file('s.raw')))).toBe(true);
    });
  }
});
