import { readFileSync } from 'node:fs';
import {
  addDirtyBitmap,
  type BlockDriver,
  type BlockError,
  type BlockNode,
  blockStatus,
  findDirtyBitmap,
} from '@blockrep/block';
import { waitFor } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { type BackupJob, startBackup } from '../src/index';
import {
  env,
  failingPair,
  qcow2Node,
  randomData,
  randomWrites,
  rawNode,
  readAll,
  SIZE,
  writer,
} from './backup-commit-helpers';
import { waitStatus } from './helpers';

/** A backup of node 'src' into node 'tgt' (the setup most tests here share). */
function backupSrcToTgt(
  graph: ReturnType<typeof env>['graph'],
  manager: ReturnType<typeof env>['manager'],
  id: string,
  sync: 'none' | 'full',
) {
  return startBackup(manager, { id, source: graph.findNode('src'), target: graph.findNode('tgt'), sync });
}

describe('backup', () => {
  it('writes inside the filter when the job ends still complete (the filter leaves drained)', async () => {
    const { graph, manager } = env();
    await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'src', size: SIZE, 'read-zeroes': true });
    // A slow target: each copy-before-write holds its guest write inside the filter for 30 ms.
    await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'tgt', size: SIZE, 'latency-ns': 30e6 });
    const guest = writer(graph, 'src');
    const job = await backupSrcToTgt(graph, manager, 'b-drain', 'none');
    // Guest writes keep coming while the job ends: some are inside the filter (waiting for their
    // copy) when it is taken out.
    let stop = false;
    let n = 0;
    const failures: unknown[] = [];
    const guestLoop = async (k: number) => {
      while (!stop) {
        const off = ((n++ * 7 + k) % 64) * 65536;
        await guest.write(off, Buffer.alloc(4096, 1)).catch((e) => failures.push(e));
        // null-co answers without I/O: let timers run between writes.
        await new Promise((r) => setImmediate(r));
      }
    };
    const loops = Array.from({ length: 8 }, (_, k) => guestLoop(k));
    // Each loop counts a write before issuing it: past 8, one has got through the filter (its
    // copy done) while the others wait there for theirs.
    await waitFor(() => n > 8, { what: 'guest writes through the filter' });
    job.cancel(true);
    await job.whenConcluded();
    // ...and they go on once it is gone.
    const atEnd = n;
    await waitFor(() => n > atEnd + 8, { what: 'guest writes after the job' });
    stop = true;
    await Promise.all(loops);
    expect(failures).toEqual([]);
    expect(n).toBeGreaterThan(8);
    expect(guest.node!.nodeName).toBe('src');
  });

  it('copy-before-write holds the cluster lock while copying, not for the guest write itself', async () => {
    const { graph, manager } = env();
    // A source whose write at offset 0 waits until released; every other request answers at once.
    let release: () => void = () => {};
    const held = new Promise<void>((r) => (release = r));
    const gated: BlockDriver = {
      name: 'gated',
      options: {},
      async open(node: BlockNode) {
        node.opaque = null;
      },
      getLength: () => SIZE,
      read: async (_n: BlockNode, _o: number, _b: number, iov: Buffer[]) => {
        for (const b of iov) b.fill(0);
      },
      write: async (_n: BlockNode, offset: number) => {
        if (offset === 0) await held;
      },
    };
    graph.registerDriver(gated);
    await graph.blockdevAdd({ driver: 'gated', 'node-name': 'src' });
    await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'tgt', size: SIZE });
    const guest = writer(graph, 'src');
    const job = await backupSrcToTgt(graph, manager, 'b-lock', 'none');
    let firstDone = false;
    // Its cluster is copied, then it waits in the source.
    const first = guest.write(0, Buffer.alloc(4096, 1)).then(() => (firstDone = true));
    // The same 64 KiB cluster, already copied: it must not wait for the first write.
    await guest.write(4096, Buffer.alloc(4096, 2));
    expect(firstDone).toBe(false);
    release();
    await first;
    await job.cancel(true);
    await job.whenConcluded();
  });

  it('sync=none: the target (backed by the source) keeps the point-in-time image under writes', async () => {
    const { dir, graph, manager } = env();
    const initial = randomData(SIZE, 1);
    await rawNode(graph, dir.file('src.raw'), 'src', initial);
    await qcow2Node(graph, dir.file('tgt.qcow2'), 'tgt', {
      path: dir.file('src.raw'),
      node: 'src',
      fmt: 'raw',
    });
    const guest = writer(graph, 'src');
    const job = (await backupSrcToTgt(graph, manager, 'b0', 'none')) as BackupJob;
    expect(guest.node!.driver.name).toBe('copy-before-write');
    await randomWrites(guest, 300, 7);
    expect((await readAll(graph, 'tgt')).equals(initial)).toBe(true);
    expect((await readAll(graph, 'src')).equals(initial)).toBe(false);
    // A checkpoint forgets what was copied: the next write copies again, keeping the new state.
    const afterWrites = await readAll(graph, 'src');
    job.doCheckpoint();
    const graphBefore = graph.findNode('tgt');
    void graphBefore;
    await job.cancel(true);
    await job.whenConcluded();
    expect(guest.node!.nodeName).toBe('src');
    expect(graph.allNodes().some((n) => n.driver.name === 'copy-before-write')).toBe(false);
    expect((await readAll(graph, 'src')).equals(afterWrites)).toBe(true);
  });

  it('copy-before-write writes what reads as zeroes in the source as zeroes, not as data', async () => {
    const { dir, graph, manager } = env();
    // A sparse source: data in its first 64 KiB only.
    await qcow2Node(graph, dir.file('src.qcow2'), 'src');
    const guest = writer(graph, 'src');
    const old = randomData(65536, 5);
    await guest.write(0, old);
    await qcow2Node(graph, dir.file('tgt.qcow2'), 'tgt', {
      path: dir.file('src.qcow2'),
      node: 'src',
      fmt: 'qcow2',
    });
    const job = await backupSrcToTgt(graph, manager, 'b-zero', 'none');
    await guest.write(0, Buffer.alloc(65536, 1));
    await guest.write(1 << 20, Buffer.alloc(131072, 2));
    const tgt = graph.findNode('tgt');
    // The data cluster was copied as data; the zero area became zero clusters in the target's own
    // layer (allocated there, so the source's new data does not show through).
    const data = await blockStatus(tgt, 0, 65536);
    expect([data.allocated, data.data]).toEqual([true, true]);
    const zero = await blockStatus(tgt, 1 << 20, 131072);
    expect([zero.allocated, zero.data, zero.zero, zero.bytes]).toEqual([true, false, true, 131072]);
    const image = await readAll(graph, 'tgt');
    expect(image.subarray(0, 65536).equals(old)).toBe(true);
    expect(image.subarray(65536).every((b) => b === 0)).toBe(true);
    await job.cancel(true);
    await job.whenConcluded();
  });

  it('a flush through the filter and its removal flush the source only, not the target (as QEMU)', async () => {
    const { dir, graph, manager } = env();
    await rawNode(graph, dir.file('src.raw'), 'src', randomData(SIZE, 4));
    await rawNode(graph, dir.file('tgt.raw'), 'tgt');
    const guest = writer(graph, 'src');
    const job = await backupSrcToTgt(graph, manager, 'b-flush', 'none');
    await guest.write(0, Buffer.alloc(65536, 7));
    await guest.flush();
    const src = graph.findNode('src').children[0].node;
    const tgt = graph.findNode('tgt').children[0].node;
    expect(src.flushedGen).toBe(src.writeGen);
    // The old data went to the target (a write there) and stays unflushed.
    expect(tgt.writeGen).toBeGreaterThan(0);
    expect(tgt.flushedGen).toBeLessThan(tgt.writeGen);
    await job.cancel(true);
    await job.whenConcluded();
    // Taking the filter out closes it, which flushes what it writes through: the source alone.
    expect(tgt.flushedGen).toBeLessThan(tgt.writeGen);
    expect(
      readFileSync(dir.file('tgt.raw')).subarray(0, 65536).equals(randomData(SIZE, 4).subarray(0, 65536)),
    ).toBe(true);
  });

  it('sync=full copies the point-in-time image while the guest writes', async () => {
    const { dir, graph, manager, events } = env();
    const initial = randomData(SIZE, 2);
    await rawNode(graph, dir.file('src.raw'), 'src', initial);
    await rawNode(graph, dir.file('tgt.raw'), 'tgt');
    const guest = writer(graph, 'src');
    const job = await backupSrcToTgt(graph, manager, 'full0', 'full');
    await randomWrites(guest, 200, 3);
    await job.whenConcluded();
    expect(job.err).toBeNull();
    await guest.flush();
    expect(readFileSync(dir.file('tgt.raw')).equals(initial)).toBe(true);
    const statuses = events.filter((e) => e.event === 'JOB_STATUS_CHANGE').map((e) => e.data.status);
    // As QEMU: started inside the drained section of blockdev-backup, so paused once at the start.
    expect(statuses).toEqual([
      'created',
      'running',
      'paused',
      'running',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
    expect(events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data).toMatchObject({
      type: 'backup',
      device: 'full0',
      len: SIZE,
      offset: SIZE,
    });
  });

  it('sync=top copies only what the top layer holds', async () => {
    const { dir, graph, manager } = env();
    await rawNode(graph, dir.file('base.raw'), 'base', randomData(SIZE, 4));
    await qcow2Node(graph, dir.file('top.qcow2'), 'top', {
      path: dir.file('base.raw'),
      node: 'base',
      fmt: 'raw',
    });
    const w = writer(graph, 'top');
    await w.write(65536, Buffer.alloc(65536, 0xaa));
    await w.detach();
    await rawNode(graph, dir.file('tgt.raw'), 'tgt');
    const job = await startBackup(manager, {
      id: 't',
      source: graph.findNode('top'),
      target: graph.findNode('tgt'),
      sync: 'top',
    });
    await job.whenConcluded();
    const t = readFileSync(dir.file('tgt.raw'));
    expect(t.subarray(65536, 131072).every((b) => b === 0xaa)).toBe(true);
    expect(t.subarray(0, 65536).every((b) => b === 0)).toBe(true);
    expect(t.subarray(131072).every((b) => b === 0)).toBe(true);
  });

  it('sync=incremental copies the bitmap extents and clears the bitmap on success', async () => {
    const { dir, graph, manager } = env();
    const src = await rawNode(graph, dir.file('src.raw'), 'src', randomData(SIZE, 5));
    const bm = addDirtyBitmap(src, { name: 'bm0', granularity: 65536 });
    const w = writer(graph, 'src');
    await w.write(3 * 65536, Buffer.alloc(100, 1));
    await rawNode(graph, dir.file('tgt.raw'), 'tgt');
    const job = await startBackup(manager, {
      id: 'i',
      source: src,
      target: graph.findNode('tgt'),
      sync: 'incremental',
      bitmap: bm,
    });
    // The job owns the bitmap while it runs (QEMU freezes it): other operations are refused.
    expect(bm.busy).toBe(true);
    await job.whenConcluded();
    expect(bm.busy).toBe(false);
    const other = addDirtyBitmap(src, { name: 'bm1', granularity: 65536 });
    other.busy = true;
    await expect(
      startBackup(manager, {
        source: src,
        target: graph.findNode('tgt'),
        sync: 'incremental',
        bitmap: other,
      }),
    ).rejects.toThrow("Bitmap 'bm1' is currently in use by another operation and cannot be used");
    const t = readFileSync(dir.file('tgt.raw'));
    const s = readFileSync(dir.file('src.raw'));
    expect(t.subarray(3 * 65536, 4 * 65536).equals(s.subarray(3 * 65536, 4 * 65536))).toBe(true);
    expect(t.subarray(0, 3 * 65536).every((b) => b === 0)).toBe(true);
    expect(findDirtyBitmap(src, 'bm0')!.count()).toBe(0);
  });

  it('refuses a second job on a busy node, the same node twice, and size mismatches', async () => {
    const { dir, graph, manager } = env();
    await rawNode(graph, dir.file('a.raw'), 'a');
    await rawNode(graph, dir.file('b.raw'), 'b');
    await rawNode(graph, dir.file('c.raw'), 'c');
    const job = await startBackup(manager, {
      id: 'j1',
      source: graph.findNode('a'),
      target: graph.findNode('b'),
      sync: 'none',
    });
    await expect(
      startBackup(manager, {
        id: 'j2',
        source: graph.findNode('c'),
        target: graph.findNode('b'),
        sync: 'full',
      }),
    ).rejects.toThrow("Node 'b' is busy: block device is in use by block job: backup");
    await expect(
      startBackup(manager, {
        id: 'j3',
        source: graph.findNode('a'),
        target: graph.findNode('a'),
        sync: 'full',
      }),
    ).rejects.toThrow('Source and target cannot be the same');
    await expect(graph.blockdevDel('b')).rejects.toThrow(/is busy|in use/);
    expect(() => (job as BackupJob).doCheckpoint()).not.toThrow();
    await job.cancel(true);
    await job.whenConcluded();
    const small = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'small', size: 4096 });
    await expect(
      startBackup(manager, { id: 'j4', source: graph.findNode('a'), target: small, sync: 'full' }),
    ).rejects.toThrow('Source and target image have different sizes');
    expect(manager.query()).toEqual([]);
  });
});

describe('backup errors (blkdebug)', () => {
  async function failing(policy: 'report' | 'ignore' | 'stop', where: 'source' | 'target') {
    const e = env();
    const job = await startBackup(e.manager, {
      id: 'e',
      ...(await failingPair(e, where)),
      sync: 'full',
      ...(where === 'source' ? { onSourceError: policy } : { onTargetError: policy }),
    });
    return { job, events: e.events, manager: e.manager, dir: e.dir };
  }

  for (const where of ['source', 'target'] as const) {
    it(`on-${where}-error=report fails the job with the error`, async () => {
      const { job, events } = await failing('report', where);
      await job.whenConcluded();
      expect((job.err as BlockError).errno).toBe('EIO');
      expect(events.find((e) => e.event === 'BLOCK_JOB_ERROR')?.data).toEqual({
        device: 'e',
        operation: where === 'source' ? 'read' : 'write',
        action: 'report',
      });
      expect(events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data.error).toBe('Input/output error');
    });

    it(`on-${where}-error=ignore skips the extent and completes`, async () => {
      const { job, events } = await failing('ignore', where);
      await job.whenConcluded();
      expect(job.err).toBeNull();
      expect(events.some((e) => e.event === 'BLOCK_JOB_ERROR' && e.data.action === 'ignore')).toBe(true);
    });

    it(`on-${where}-error=stop pauses the job until resumed, then retries`, async () => {
      const { job, events, dir } = await failing('stop', where);
      await waitStatus(job, 'paused');
      expect(job.status).toBe('paused');
      expect(events.some((e) => e.event === 'BLOCK_JOB_ERROR' && e.data.action === 'stop')).toBe(true);
      job.userResume();
      await job.whenConcluded();
      expect(job.err).toBeNull();
      expect(readFileSync(dir.file('t.raw')).equals(readFileSync(dir.file('s.raw')))).toBe(true);
    });
  }
});
