import { BlockBackend, BlockOp, createGraph, opBlocked, Perm } from '@blockrep/block';
import { describe, expect, it } from 'vitest';
import { JobManager, RateLimit } from '../src/index';
import { recordEvents, TestBlockJob, tick, timeline, waitStatus } from './helpers';

describe('BlockJob', () => {
  it('holds its nodes through backends and releases them when it ends', async () => {
    const graph = createGraph();
    const node = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'n0', size: 1 << 20 });
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 2 } });
    const blk = job.useNode(node, { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.CONSISTENT_READ });
    expect(node.hasBackend()).toBe(true);
    expect(blk.getLength()).toBe(1 << 20);
    // Another writer conflicts with the job, and the error names the job.
    const other = new BlockBackend(graph, { perm: Perm.WRITE, description: 'test writer' });
    expect(() => other.attach(node)).toThrow(/backup job 'j'/);
    await other.detach();
    job.start();
    await job.whenConcluded();
    expect(job.backends).toEqual([]);
    expect(node.hasBackend()).toBe(false);
    expect(graph.getNode('n0')).toBe(node);
    await graph.closeAll();
  });

  it('blocks operations on its main node while it runs', async () => {
    const graph = createGraph();
    const node = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'n0' });
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 } });
    job.useNode(node, { perm: Perm.CONSISTENT_READ, blockOperations: true });
    expect(opBlocked(node, BlockOp.RESIZE)?.message).toBe(
      "Node 'n0' is busy: block device is in use by block job: backup",
    );
    expect(opBlocked(node, BlockOp.DATAPLANE)).toBeNull();
    job.start();
    await job.whenConcluded();
    expect(opBlocked(node, BlockOp.RESIZE)).toBeNull();
    await graph.closeAll();
  });

  it('a permission conflict leaves nothing attached', async () => {
    const graph = createGraph();
    const node = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'n0' });
    const holder = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    holder.attach(node);
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j' });
    expect(() => job.useNode(node, { perm: Perm.WRITE })).toThrow(/Permission conflict/);
    expect(job.backends).toEqual([]);
    expect(graph.backends.size).toBe(1);
    job.earlyFail();
    await holder.detach();
    await graph.closeAll();
  });

  it('pauses while its node is drained and resumes after', async () => {
    const graph = createGraph();
    const node = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'n0' });
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1000, stepMs: 1 } });
    job.useNode(node, { perm: Perm.CONSISTENT_READ });
    job.start();
    await tick(5);
    let progressInDrain = -1;
    await graph.drained(node, async () => {
      await waitStatus(job, 'paused');
      const p = job.progressCurrent;
      await tick(20);
      progressInDrain = job.progressCurrent - p;
      expect(job.blockInfo().paused).toBe(true);
    });
    expect(progressInDrain).toBe(0);
    await waitStatus(job, 'running');
    expect(ev.map((e) => e.data.status)).toContain('paused');
    await job.userCancel(true);
    await job.whenConcluded();
    await graph.closeAll();
  });

  it('a negative speed at creation: the job is created, then gone, and the error is thrown', () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    expect(() => new TestBlockJob(m, { id: 'neg', speed: -1 })).toThrow(
      "Parameter 'speed' expects a non-negative value",
    );
    expect(m.find('neg')).toBeUndefined();
    expect(timeline(ev)).toEqual(['created', 'null']);
  });

  it('set-speed: verb check, the QEMU 7.2 text for a negative speed, rate shown in info', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 }, autoFinalize: false, speed: 4096 });
    expect(job.blockInfo().speed).toBe(4096);
    expect(() => job.setSpeed(-1)).toThrow("Parameter 'speed' expects a non-negative value");
    job.setSpeed(1 << 20);
    expect(job.blockInfo()).toMatchObject({
      type: 'backup',
      device: 'j',
      speed: 1 << 20,
      status: 'created',
      'auto-finalize': false,
      'auto-dismiss': true,
      ready: false,
    });
    job.start();
    await waitStatus(job, 'pending');
    expect(() => job.setSpeed(1)).toThrow(
      "Job 'j' in state 'pending' cannot accept command verb 'set-speed'",
    );
    await job.userFinalize();
  });

  it('BLOCK_JOB_ERROR carries device, operation and action', () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j' });
    job.ioError();
    expect(ev.at(-1)).toEqual({
      event: 'BLOCK_JOB_ERROR',
      data: { device: 'j', operation: 'write', action: 'report' },
    });
    job.earlyFail();
  });
});

describe('RateLimit', () => {
  it('accounts at dispatch and pushes the slice end out by the excess', () => {
    let now = 1000;
    const rl = new RateLimit(1000, 100, () => now); // 100 bytes per 100 ms slice
    expect(rl.calculateDelay(0)).toBe(0);
    expect(rl.calculateDelay(50)).toBe(0);
    expect(rl.calculateDelay(250)).toBe(300); // 300 bytes in this slice: three slices' worth
    now += 150;
    expect(rl.calculateDelay(0)).toBe(150);
    now += 200; // past the pushed-out slice end: a new slice begins, the old bytes are paid for
    expect(rl.calculateDelay(99)).toBe(0);
    expect(rl.calculateDelay(1)).toBe(100);
  });

  it('keeps bytes accounted at the end of a slice (none are lost to the slice reset)', () => {
    let now = 0;
    const rl = new RateLimit(1000, 100, () => now);
    // 10 units of 60 bytes, each dispatched once the previous delay is slept: the last one may
    // go once the 540 bytes before it, less one free slice of 100, are paid for at 1000 B/s.
    let lastDispatch = 0;
    for (let i = 0; i < 10; i++) {
      lastDispatch = now;
      now += rl.calculateDelay(60) + 1;
    }
    expect(lastDispatch).toBeGreaterThanOrEqual(440);
    expect(lastDispatch).toBeLessThan(540);
  });

  it('speed 0 is unlimited', () => {
    const rl = new RateLimit(0);
    expect(rl.calculateDelay(1e12)).toBe(0);
  });

  it('limits a running job', async () => {
    const m = new JobManager();
    const job = new RateLimitedJob(m, 'r', 20_000); // 2000 bytes per 100 ms slice
    const t0 = Date.now();
    job.start();
    await job.whenConcluded();
    // 10 chunks of 1000 bytes = 10000 bytes at 20000 B/s: at least ~400 ms.
    expect(Date.now() - t0).toBeGreaterThanOrEqual(350);
    expect(job.progressCurrent).toBe(10_000);
  });
});

class RateLimitedJob extends TestBlockJob {
  constructor(m: JobManager, id: string, speed: number) {
    super(m, { id, speed });
  }
  protected override async run(): Promise<void> {
    this.progressSetRemaining(10_000);
    for (let i = 0; i < 10 && !this.isCancelled; i++) {
      await this.rateLimit(1000);
      this.progressUpdate(1000);
    }
  }
}
