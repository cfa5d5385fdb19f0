import { writeFileSync } from 'node:fs';
import { BlockBackend, PERM_ALL, Perm } from '@blockrep/block';
import { createQcow2Image } from '@blockrep/qcow2';
import { qemuImg, qemuImgJson } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { startCommit } from '../src/index';
import {
  chain3,
  env,
  overlays,
  randomData,
  randomWrites,
  rawNode,
  readAll,
  SIZE,
  writer,
} from './backup-commit-helpers';
import { countFlushes, waitStatus } from './helpers';

describe('commit', () => {
  it('intermediate: base reads as mid did, and top now backs onto base', async () => {
    const e = await chain3();
    const { graph, manager, events } = e;
    const guest = writer(graph, 'top');
    await guest.write(8192, Buffer.alloc(4096, 0x33));
    const before = await readAll(graph, 'top');
    const midView = await readAll(graph, 'mid');
    const job = await startCommit(manager, {
      id: 'c0',
      top: graph.findNode('mid'),
      base: graph.findNode('base'),
      active: false,
    });
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect((await readAll(graph, 'base')).equals(midView)).toBe(true);
    expect(graph.findNode('top').backing!.node.nodeName).toBe('base');
    expect((await readAll(graph, 'top')).equals(before)).toBe(true);
    // The overlay's header names the new backing file: QEMU opens the shorter chain (once we
    // have closed it: QEMU's image locks keep it from opening an image we are writing).
    await graph.closeAll();
    const info = await qemuImgJson(['info', e.dir.file('top.qcow2')]);
    expect(info['backing-filename']).toBe(e.dir.file('base.raw'));
    expect(info['backing-filename-format']).toBe('raw');
    expect((await qemuImg(['check', e.dir.file('top.qcow2')])).stdout).toContain('No errors were found');
    writeFileSync(e.dir.file('view.raw'), before);
    const cmp = await qemuImg([
      'compare',
      '-f',
      'qcow2',
      '-F',
      'raw',
      e.dir.file('top.qcow2'),
      e.dir.file('view.raw'),
    ]);
    expect(cmp.stdout.trim()).toBe('Images are identical.');
    expect(events.filter((e) => e.event === 'JOB_STATUS_CHANGE').map((e) => e.data.status)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'concluded',
      'null',
    ]);
  });

  it('active: READY once converged under writes, complete pivots the users onto base', async () => {
    const { graph, manager, events } = await chain3();
    const guest = writer(graph, 'top');
    await randomWrites(guest, 50, 5);
    const job = await startCommit(manager, {
      id: 'a0',
      top: graph.findNode('top'),
      base: graph.findNode('base'),
      active: true,
    });
    const writing = randomWrites(guest, 200, 9);
    await waitStatus(job, 'ready');
    expect(job.status).toBe('ready');
    await writing;
    await guest.write(4096, Buffer.alloc(4096, 0x77));
    const view = await readAll(graph, 'top');
    job.userComplete();
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(guest.node!.nodeName).toBe('base');
    expect((await readAll(graph, 'base')).equals(view)).toBe(true);
    expect(events.map((e) => e.event)).toContain('BLOCK_JOB_READY');
    expect(events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data).toMatchObject({
      type: 'commit',
      device: 'a0',
    });
  });

  it('write-behind: base is flushed in the background while the data is committed (0: only the final flush)', async () => {
    /** Flushes of base while SIZE bytes of data are committed from `top` (to READY for an active commit). */
    const flushes = async (active: boolean, writeBehind: number) => {
      const { graph, manager } = await chain3();
      const top = active ? 'top' : 'mid';
      const guest = writer(graph, top);
      await guest.write(0, randomData(SIZE, 21));
      if (!active) await guest.detach();
      const count = countFlushes(graph.findNode('base'));
      try {
        const job = await startCommit(manager, {
          id: 'wb',
          top: graph.findNode(top),
          base: graph.findNode('base'),
          active,
          writeBehind,
        });
        if (active) await waitStatus(job, 'ready');
        else await job.whenConcluded();
        const n = count.count();
        if (active) {
          job.userComplete();
          await job.whenConcluded();
        }
        expect(job.err).toBeNull();
        expect((await readAll(graph, 'base')).equals(randomData(SIZE, 21))).toBe(true);
        return n;
      } finally {
        count.restore();
      }
    };
    // Intermediate: the final flush alone, or background ones before it.
    expect(await flushes(false, 0)).toBe(1);
    expect(await flushes(false, 1 << 20)).toBeGreaterThanOrEqual(2);
    // Active, at READY: none yet (the flush comes at completion), or background ones.
    expect(await flushes(true, 0)).toBe(0);
    expect(await flushes(true, 1 << 20)).toBeGreaterThanOrEqual(1);
  });

  it('active: a cancel after READY leaves the chain as it was', async () => {
    const { graph, manager, events } = await chain3();
    const guest = writer(graph, 'top');
    await guest.write(0, Buffer.alloc(4096, 5));
    const job = await startCommit(manager, {
      id: 'a1',
      top: graph.findNode('top'),
      base: graph.findNode('base'),
      active: true,
    });
    await waitStatus(job, 'ready');
    await job.userCancel(false);
    await job.whenConcluded();
    expect(guest.node!.nodeName).toBe('top');
    expect(graph.findNode('top').backing!.node.nodeName).toBe('mid');
    expect(events.some((e) => e.event === 'BLOCK_JOB_COMPLETED')).toBe(true);
    expect(manager.query()).toEqual([]);
  });

  it('internal auto-completing active commit reports to its callback', async () => {
    const { graph, manager, events } = await chain3();
    let result: Error | null | undefined;
    const job = await startCommit(manager, {
      internal: true,
      top: graph.findNode('top'),
      base: graph.findNode('mid'),
      active: true,
      autoComplete: true,
      onComplete: (err) => {
        result = err;
      },
    });
    const guest = writer(graph, 'mid');
    await job.whenConcluded();
    expect(result).toBeNull();
    expect(events).toEqual([]);
    expect(manager.query()).toEqual([]);
    await guest.detach();
  });

  it('refuses nodes outside the chain, self-commit, and busy nodes', async () => {
    const { graph, manager, dir } = await chain3();
    await createQcow2Image(dir.file('other.qcow2'), { size: SIZE });
    const other = await graph.blockdevAdd({
      driver: 'qcow2',
      'node-name': 'other',
      file: { driver: 'file', filename: dir.file('other.qcow2') },
    });
    await expect(
      startCommit(manager, { id: 'x', top: graph.findNode('top'), base: other, active: true }),
    ).rejects.toThrow("'other' is not in the backing chain of 'top'");
    await expect(startCommit(manager, { id: 'y', top: other, base: other, active: true })).rejects.toThrow(
      'cannot commit an image into itself',
    );
    const j = await startCommit(manager, {
      id: 'z',
      top: graph.findNode('top'),
      base: graph.findNode('base'),
      active: true,
    });
    await expect(
      startCommit(manager, {
        id: 'w',
        top: graph.findNode('mid'),
        base: graph.findNode('base'),
        active: false,
      }),
    ).rejects.toThrow("Node 'mid' is busy: block device is in use by block job: commit");
    await j.cancel(true);
    await j.whenConcluded();
  });
});

describe('commit permissions on the base', () => {
  it('a user of the base that does not share resize is fine unless the base must grow', async () => {
    const { graph, manager } = await chain3();
    // Writes to the base, shares everything but resize (as the replication node's edge does).
    const holder = new BlockBackend(graph, { perm: Perm.WRITE, shared: PERM_ALL & ~Perm.RESIZE });
    holder.attach(graph.findNode('base'));
    const job = await startCommit(manager, {
      id: 'c',
      top: graph.findNode('top'),
      base: graph.findNode('base'),
      active: true,
      autoComplete: true,
    });
    await job.whenConcluded();
    expect(job.err).toBeNull();
    await holder.detach();
  });

  it('a base shorter than the top needs resize: a user not sharing it makes the commit fail', async () => {
    const e = env();
    const { dir, graph, manager } = e;
    await rawNode(graph, dir.file('base.raw'), 'base', randomData(SIZE / 2, 3));
    await overlays(e);
    const holder = new BlockBackend(graph, { perm: Perm.WRITE, shared: PERM_ALL & ~Perm.RESIZE });
    holder.attach(graph.findNode('base'));
    await expect(
      startCommit(manager, {
        id: 'c',
        top: graph.findNode('top'),
        base: graph.findNode('base'),
        active: true,
      }),
    ).rejects.toThrow(/Permission conflict on node 'base': permissions 'resize'/);
    expect(manager.query()).toEqual([]);
    await holder.detach();
  });
});

describe('commit errors (blkdebug on the base)', () => {
  async function failing(policy: 'report' | 'ignore' | 'stop') {
    const e = env();
    const { dir, graph, manager, events } = e;
    await rawNode(graph, dir.file('base.raw'), 'b0', randomData(SIZE, 21));
    await graph.blockdevAdd({
      driver: 'blkdebug',
      'node-name': 'base',
      image: 'b0',
      'inject-error': [{ event: 'write_aio', iotype: 'write', once: true }],
    });
    await overlays(e);
    const w = writer(graph, 'mid');
    await w.write(0, Buffer.alloc(2 << 20, 0x51));
    await w.detach();
    const job = await startCommit(manager, {
      id: 'ce',
      top: graph.findNode('mid'),
      base: graph.findNode('base'),
      active: false,
      onError: policy,
    });
    return { job, events, graph };
  }

  it('on-error=report fails the job and leaves the chain', async () => {
    const { job, events, graph } = await failing('report');
    await job.whenConcluded();
    expect(job.err).not.toBeNull();
    expect(events.find((e) => e.event === 'BLOCK_JOB_ERROR')?.data).toEqual({
      device: 'ce',
      operation: 'write',
      action: 'report',
    });
    expect(graph.findNode('top').backing!.node.nodeName).toBe('mid');
  });

  it('on-error=ignore completes without the failed extent', async () => {
    const { job, events, graph } = await failing('ignore');
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect(events.some((e) => e.event === 'BLOCK_JOB_ERROR' && e.data.action === 'ignore')).toBe(true);
    expect(graph.findNode('top').backing!.node.nodeName).toBe('base');
  });

  it('on-error=stop pauses until resumed, then retries and completes', async () => {
    const { job, events, graph } = await failing('stop');
    await waitStatus(job, 'paused');
    expect(job.status).toBe('paused');
    expect(events.some((e) => e.event === 'BLOCK_JOB_ERROR' && e.data.action === 'stop')).toBe(true);
    job.userResume();
    await job.whenConcluded();
    expect(job.err).toBeNull();
    expect((await readAll(graph, 'base')).subarray(0, 2 << 20).every((b) => b === 0x51)).toBe(true);
  });
});
