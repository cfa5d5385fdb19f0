import { createGraph, Perm } from '@blockrep/block';
import { BlockJob, JobManager, type JobOptions } from '@blockrep/jobs';
import { makeTempDir } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { createBlockQmpServer, QmpClient, type QmpServer } from '../src/index';

/** A block job that copies nothing: it sleeps per step, optionally waits READY for complete. */
class SleepyJob extends BlockJob {
  readonly type = 'mirror';
  private completeAsked = false;

  constructor(
    m: JobManager,
    opts: JobOptions,
    private readonly steps: number,
    private readonly waitReady: boolean,
  ) {
    super(m, opts);
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(this.steps);
    for (let i = 0; i < this.steps && !this.isCancelled; i++) {
      await this.sleep(20);
      this.progressUpdate(1);
    }
    if (this.waitReady && !this.isCancelled) {
      this.transitionToReady();
      while (!this.completeAsked && !this.cancelRequested) await this.yieldUntilEntered();
    }
  }

  protected override complete(): void {
    this.completeAsked = true;
    this.enter();
  }

  protected override cancelRequest(force: boolean): boolean {
    return force || !this.isReady;
  }
}

let server: QmpServer | undefined;
let qmp: QmpClient | undefined;
afterEach(async () => {
  await qmp?.close();
  await server?.close();
});

async function setup() {
  const dir = makeTempDir('blockrep-qmp-jobs-');
  const graph = createGraph();
  const jobs = new JobManager();
  server = createBlockQmpServer({ graph, jobs }).server;
  await server.listenUnix(dir.file('qmp.sock'));
  qmp = await QmpClient.connect({ path: dir.file('qmp.sock') });
  return { graph, jobs, qmp };
}

describe('job commands on a block job', () => {
  it('pause, resume, set-speed, complete a READY job, with events on the wire', async () => {
    const { graph, jobs, qmp } = await setup();
    const node = await graph.blockdevAdd({ driver: 'null-co', 'node-name': 'n0' });
    const job = new SleepyJob(jobs, { id: 'm0' }, 2, true);
    job.useNode(node, { perm: Perm.CONSISTENT_READ });
    job.start();
    await qmp.execute('job-pause', { id: 'm0' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.status === 'paused');
    expect((await qmp.execute('query-block-jobs'))[0]).toMatchObject({
      device: 'm0',
      type: 'mirror',
      paused: true,
    });
    expect(await qmp.execute('block-job-cancel', { device: 'm0' }).catch((e) => e.desc)).toBe(
      "The block job for device 'm0' is currently paused",
    );
    expect(await qmp.execute('block-job-set-speed', { device: 'm0', speed: -1 }).catch((e) => e.desc)).toBe(
      "Parameter 'speed' expects a non-negative value",
    );
    expect(await qmp.execute('job-pause', { id: 'm0' }).catch((e) => e.desc)).toBe('Job is already paused');
    expect(await qmp.execute('job-complete', { id: 'm0' }).catch((e) => e.desc)).toBe(
      "Job 'm0' in state 'paused' cannot accept command verb 'complete'",
    );
    await qmp.execute('block-job-set-speed', { device: 'm0', speed: 1 << 20 });
    await qmp.execute('job-resume', { id: 'm0' });
    const ready = await qmp.waitEvent('BLOCK_JOB_READY');
    expect(ready.data).toEqual({ type: 'mirror', device: 'm0', len: 2, offset: 2, speed: 1 << 20 });
    const graphDump = await qmp.execute('x-debug-query-block-graph');
    expect(graphDump.nodes).toEqual(
      expect.arrayContaining([expect.objectContaining({ type: 'block-job', name: 'm0' })]),
    );
    await qmp.execute('job-complete', { id: 'm0' });
    const done = await qmp.waitEvent('BLOCK_JOB_COMPLETED');
    expect(done.data).toEqual({ type: 'mirror', device: 'm0', len: 2, offset: 2, speed: 1 << 20 });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.status === 'null');
    expect(await qmp.execute('query-jobs')).toEqual([]);
    expect(node.hasBackend()).toBe(false);
    await graph.closeAll();
  });

  it('manual finalize and dismiss; job-cancel is a hard cancel', async () => {
    const { jobs, qmp } = await setup();
    const a = new SleepyJob(jobs, { id: 'a', autoFinalize: false, autoDismiss: false }, 1, false);
    a.start();
    const pending = await qmp.waitEvent('BLOCK_JOB_PENDING');
    expect(pending.data).toEqual({ type: 'mirror', id: 'a' });
    expect((await qmp.execute('query-jobs'))[0]).toMatchObject({ id: 'a', status: 'pending' });
    await qmp.execute('job-finalize', { id: 'a' });
    expect((await qmp.execute('query-jobs'))[0]).toMatchObject({ id: 'a', status: 'concluded' });
    await qmp.execute('job-dismiss', { id: 'a' });

    const b = new SleepyJob(jobs, { id: 'b' }, 1, true);
    b.start();
    await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'b');
    await qmp.execute('job-cancel', { id: 'b' });
    const cancelled = await qmp.waitEvent('BLOCK_JOB_CANCELLED');
    expect(cancelled.data.device).toBe('b');

    // block-job-cancel without force on a READY mirror-like job completes it instead.
    const c = new SleepyJob(jobs, { id: 'c' }, 1, true);
    c.start();
    await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'c');
    await qmp.execute('block-job-cancel', { device: 'c' });
    expect((await qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data.device === 'c')).data).toMatchObject({
      len: 1,
    });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.id === 'c' && e.data.status === 'null');
    expect(await qmp.execute('query-jobs')).toEqual([]);
  });

  it('the block-job-* forms: pause, resume, complete, finalize, dismiss', async () => {
    const { jobs, qmp } = await setup();
    const j = new SleepyJob(jobs, { id: 'bj', autoFinalize: false, autoDismiss: false }, 2, true);
    j.start();
    await qmp.execute('block-job-pause', { device: 'bj' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.status === 'paused');
    expect((await qmp.execute('query-block-jobs'))[0]).toMatchObject({ device: 'bj', paused: true });
    expect(await qmp.execute('block-job-pause', { device: 'bj' }).catch((e) => e.desc)).toBe(
      'Job is already paused',
    );
    await qmp.execute('block-job-resume', { device: 'bj' });
    await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data.device === 'bj');
    await qmp.execute('block-job-complete', { device: 'bj' });
    await qmp.waitEvent('BLOCK_JOB_PENDING', (e) => e.data.id === 'bj');
    expect(await qmp.execute('block-job-dismiss', { id: 'bj' }).catch((e) => e.desc)).toBe(
      "Job 'bj' in state 'pending' cannot accept command verb 'dismiss'",
    );
    await qmp.execute('block-job-finalize', { id: 'bj' });
    expect((await qmp.execute('query-jobs'))[0]).toMatchObject({ id: 'bj', status: 'concluded' });
    await qmp.execute('block-job-dismiss', { id: 'bj' });
    expect(await qmp.execute('query-jobs')).toEqual([]);
    const missing = await qmp.execute('block-job-resume', { device: 'bj' }).catch((e) => e);
    expect([missing.class, missing.desc]).toEqual(['DeviceNotActive', "Block job 'bj' not found"]);
  });
});
