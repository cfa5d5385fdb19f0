import { BlockError } from '@blockrep/block';
import { waitFor } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { JOB_VERBS, JobManager, type JobStatus, type JobVerb, verbAllowed } from '../src/index';
import {
  recordEvents,
  TestBlockJob,
  TestJob,
  tick,
  timeline,
  untilIdle,
  waitStatus,
  withFrozenTimers,
} from './helpers';

/** Builds a job and drives it into the given state. */
async function jobIn(status: JobStatus): Promise<{ m: JobManager; job: TestBlockJob }> {
  const m = new JobManager();
  const manual = { autoFinalize: false, autoDismiss: false };
  switch (status) {
    case 'created':
      return { m, job: new TestBlockJob(m, { id: 'j', plan: {} }) };
    case 'running': {
      const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, stepMs: 10_000 } });
      job.start();
      return { m, job };
    }
    case 'paused': {
      const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, stepMs: 10_000 } });
      job.start();
      job.userPause();
      await waitStatus(job, 'paused');
      return { m, job };
    }
    case 'ready':
    case 'standby': {
      const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, ready: true } });
      job.start();
      await waitStatus(job, 'ready');
      if (status === 'standby') {
        job.userPause();
        await waitStatus(job, 'standby');
      }
      return { m, job };
    }
    case 'pending': {
      const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 }, ...manual });
      job.start();
      await waitStatus(job, 'pending');
      return { m, job };
    }
    case 'concluded': {
      const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 }, ...manual });
      job.start();
      await waitStatus(job, 'pending');
      await job.userFinalize();
      return { m, job };
    }
    default:
      throw new Error(`no recipe for ${status}`);
  }
}

function applyUserVerb(job: TestBlockJob, verb: JobVerb): unknown {
  switch (verb) {
    case 'cancel':
      return job.userCancel(true);
    case 'pause':
      return job.userPause();
    case 'resume':
      return job.userResume();
    case 'set-speed':
      return job.setSpeed(1000);
    case 'complete':
      return job.userComplete();
    case 'finalize':
      return job.userFinalize();
    case 'dismiss':
      return job.userDismiss();
  }
}

describe('verb refusals', () => {
  const reachable: JobStatus[] = ['created', 'running', 'paused', 'ready', 'standby', 'pending', 'concluded'];
  for (const status of reachable) {
    for (const verb of JOB_VERBS) {
      if (verbAllowed(verb, status)) continue;
      it(`${verb} in ${status} is refused with QEMU's text`, async () => {
        const { m, job } = await jobIn(status);
        expect(job.status).toBe(status);
        let err: unknown;
        try {
          await applyUserVerb(job, verb);
        } catch (e) {
          err = e;
        }
        expect(err).toBeInstanceOf(BlockError);
        // QEMU checks "was it user-paused" before the verb table for resume.
        const want =
          verb === 'resume'
            ? "Can't resume a job that was not paused"
            : `Job 'j' in state '${status}' cannot accept command verb '${verb}'`;
        expect((err as Error).message).toBe(want);
        expect(job.status).toBe(status);
        await m.cancelAll();
      });
    }
  }

  it('pause twice, resume unpaused, complete without support', async () => {
    const { m, job } = await jobIn('running');
    expect(() => job.userResume()).toThrow("Can't resume a job that was not paused");
    job.userPause();
    expect(() => job.userPause()).toThrow('Job is already paused');
    await m.cancelAll();

    const m2 = new JobManager();
    const j2 = new TestBlockJob(m2, { id: 'k', plan: { steps: 1, ready: true, completable: false } });
    j2.start();
    await waitStatus(j2, 'ready');
    expect(() => j2.userComplete()).toThrow("The active block job 'k' cannot be completed");
    await m2.cancelAll();
  });
});

describe('job life cycle', () => {
  it('runs to the end with auto-finalize and auto-dismiss, events in QEMU order', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 3 } });
    job.start();
    await job.whenConcluded();
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'BLOCK_JOB_COMPLETED',
      'concluded',
      'null',
    ]);
    expect(ev.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data).toEqual({
      type: 'backup',
      device: 'j',
      len: 3,
      offset: 3,
      speed: 0,
    });
    expect(job.log).toEqual(['prepare', 'commit', 'clean']);
    expect(m.query()).toEqual([]);
  });

  it('a plain job emits only JOB_STATUS_CHANGE', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestJob(m, { id: 'c' });
    job.start();
    await job.whenConcluded();
    expect(timeline(ev)).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
  });

  it('manual finalize waits in pending, then concluded until dismissed', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 2 }, autoFinalize: false, autoDismiss: false });
    job.start();
    await waitStatus(job, 'pending');
    await tick(20);
    expect(job.status).toBe('pending');
    expect(job.log).toEqual([]);
    expect(ev.at(-1)).toEqual({ event: 'BLOCK_JOB_PENDING', data: { type: 'backup', id: 'j' } });
    expect(m.query()).toEqual([
      { id: 'j', type: 'backup', status: 'pending', 'current-progress': 2, 'total-progress': 2 },
    ]);
    await job.userFinalize();
    expect(job.status).toBe('concluded');
    expect(job.log).toEqual(['prepare', 'commit', 'clean']);
    expect(m.query()[0]!.status).toBe('concluded');
    job.userDismiss();
    expect(job.status).toBe('null');
    expect(m.find('j')).toBeUndefined();
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'BLOCK_JOB_PENDING',
      'BLOCK_JOB_COMPLETED',
      'concluded',
      'null',
    ]);
  });

  it('auto-finalize with manual dismiss stops in concluded', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 }, autoDismiss: false });
    job.start();
    await job.whenConcluded();
    expect(job.status).toBe('concluded');
    expect(m.find('j')).toBe(job);
    // cancel of a concluded job is refused by the verb table...
    await expect(job.userCancel(false)).rejects.toThrow(
      "Job 'j' in state 'concluded' cannot accept command verb 'cancel'",
    );
    // ...but an internal cancel dismisses it, as QEMU's job_cancel does.
    await job.cancel(false);
    expect(job.status).toBe('null');
  });

  it('a failing run aborts, reports the error and calls abort', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, {
      id: 'j',
      plan: { steps: 1, fail: 'disk on fire' },
      autoDismiss: false,
    });
    job.start();
    await job.whenConcluded();
    expect(timeline(ev)).toEqual(['created', 'running', 'aborting', 'BLOCK_JOB_COMPLETED', 'concluded']);
    expect(ev.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data.error).toBe('disk on fire');
    expect(job.log).toEqual(['abort', 'clean']);
    expect(m.query()[0]).toMatchObject({ id: 'j', status: 'concluded', error: 'disk on fire' });
  });

  it('a failing prepare aborts the job', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, failPrepare: 'no' } });
    job.start();
    await job.whenConcluded();
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'aborting',
      'BLOCK_JOB_COMPLETED',
      'concluded',
      'null',
    ]);
    expect(job.log).toEqual(['prepare', 'abort', 'clean']);
  });

  it('cancel during a long sleep ends the job at once', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, stepMs: 60_000 } });
    // Timers frozen: the 60 s sleep cannot run out, so the job ends only if the cancel ends it.
    await withFrozenTimers(async () => {
      job.start();
      await untilIdle(job);
      expect(job.busy).toBe(false);
      await job.userCancel(false);
      await job.whenConcluded();
    });
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'aborting',
      'BLOCK_JOB_CANCELLED',
      'concluded',
      'null',
    ]);
    expect(ev.find((e) => e.event === 'BLOCK_JOB_CANCELLED')!.data).toEqual({
      type: 'backup',
      device: 'j',
      len: 1,
      offset: 0,
      speed: 0,
    });
    expect(job.log).toEqual(['abort', 'clean']);
    expect(job.err?.message).toBe('Operation canceled');
  });

  it('cancel before start concludes without BLOCK_JOB_CANCELLED', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j' });
    await job.userCancel(true);
    expect(timeline(ev)).toEqual(['created', 'aborting', 'concluded', 'null']);
    expect(job.log).toEqual(['abort', 'clean']);
  });

  it('cancel of a user-paused job resumes and cancels it', async () => {
    const { m, job } = await jobIn('paused');
    await job.userCancel(true);
    await job.whenConcluded();
    expect(job.status).toBe('null');
    expect(m.all()).toEqual([]);
  });

  it('pending jobs can be cancelled', async () => {
    const { job } = await jobIn('pending');
    await job.userCancel(true);
    expect(job.status).toBe('concluded');
    expect(job.log).toEqual(['abort', 'clean']);
    expect(job.err?.message).toBe('Operation canceled');
  });

  it('a cancel during a slow prepare is honoured after it: abort, not commit', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, prepareMs: 50 } });
    job.start();
    await waitStatus(job, 'pending');
    await waitFor(() => job.log.includes('prepare'));
    expect(job.log).toEqual(['prepare']);
    await job.userCancel(true);
    await job.whenConcluded();
    expect(job.log).toEqual(['prepare', 'prepared', 'abort', 'clean']);
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'waiting',
      'pending',
      'aborting',
      'BLOCK_JOB_CANCELLED',
      'concluded',
      'null',
    ]);
  });

  it('a throwing clean hook is reported as the job error, not an unhandled rejection', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 }, autoDismiss: false });
    (job as any).clean = async () => {
      throw new Error('clean failed');
    };
    job.start();
    await job.whenConcluded();
    expect(job.status).toBe('concluded');
    expect(m.query()[0]!.error).toBe('clean failed');
  });

  it('a pause interrupts a long sleep', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, stepMs: 60_000 } });
    // Timers frozen: the 60 s sleep cannot run out, so only the pause can wake the job.
    await withFrozenTimers(async () => {
      job.start();
      await untilIdle(job);
      job.userPause();
      await waitStatus(job, 'paused');
    });
    await job.userCancel(true);
    await job.whenConcluded();
  });

  it('early fail drops a created job; cancelling it afterwards does nothing', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j' });
    job.earlyFail();
    expect(timeline(ev)).toEqual(['created', 'null']);
    expect(m.all()).toEqual([]);
    await job.cancel(true);
    expect(timeline(ev)).toEqual(['created', 'null']);
  });
});

describe('ready jobs', () => {
  it('READY, standby on pause, complete finishes', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 2, ready: true } });
    job.start();
    await waitStatus(job, 'ready');
    expect(ev.at(-1)!.event).toBe('BLOCK_JOB_READY');
    expect(ev.at(-1)!.data).toEqual({ type: 'backup', device: 'j', len: 2, offset: 2, speed: 0 });
    expect(job.blockInfo()).toMatchObject({ ready: true, status: 'ready', paused: false, 'io-status': 'ok' });
    job.userPause();
    await waitStatus(job, 'standby');
    job.userResume();
    await waitStatus(job, 'ready');
    job.userComplete();
    await job.whenConcluded();
    expect(timeline(ev)).toEqual([
      'created',
      'running',
      'ready',
      'BLOCK_JOB_READY',
      'standby',
      'ready',
      'waiting',
      'pending',
      'BLOCK_JOB_COMPLETED',
      'concluded',
      'null',
    ]);
  });

  it('a soft cancel of a READY mirror-like job completes it; force cancels it', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const soft = new TestBlockJob(m, { id: 's', plan: { steps: 1, ready: true, softCancel: true } });
    soft.start();
    await waitStatus(soft, 'ready');
    await soft.userCancel(false);
    await soft.whenConcluded();
    expect(ev.some((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data.device === 's')).toBe(true);
    expect(soft.log).toEqual(['prepare', 'commit', 'clean']);
    // A job with a soft cancel pending cannot be completed any more.

    const hard = new TestBlockJob(m, { id: 'h', plan: { steps: 1, ready: true, softCancel: true } });
    hard.start();
    await waitStatus(hard, 'ready');
    await hard.userCancel(true);
    await hard.whenConcluded();
    expect(ev.some((e) => e.event === 'BLOCK_JOB_CANCELLED' && e.data.device === 'h')).toBe(true);
    expect(hard.log).toEqual(['abort', 'clean']);
  });

  it('complete is refused once a soft cancel was requested', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1, ready: true, softCancel: true } });
    job.start();
    await waitStatus(job, 'ready');
    // The cancel's synchronous part runs before the job gets to react to it.
    const cancelling = job.userCancel(false);
    expect(job.cancelRequested).toBe(true);
    expect(job.isCancelled).toBe(false);
    expect(job.status).toBe('ready');
    expect(() => job.userComplete()).toThrow("The active block job 'j' cannot be completed");
    await cancelling;
    await job.whenConcluded();
    expect(job.log).toEqual(['prepare', 'commit', 'clean']);
  });
});

describe('pausing', () => {
  it('user and internal pauses nest', async () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 100, stepMs: 2 } });
    job.start();
    job.userPause();
    await waitStatus(job, 'paused');
    job.pause(); // e.g. a drain
    job.userResume();
    await tick(20);
    expect(job.status).toBe('paused');
    expect(job.pauseCount).toBe(1);
    const before = job.progressCurrent;
    await tick(20);
    expect(job.progressCurrent).toBe(before);
    job.resume();
    await waitStatus(job, 'running');
    await waitFor(() => job.progressCurrent > before, { what: 'progress after the last resume' });
    expect(job.progressCurrent).toBeGreaterThan(before);
    await job.userCancel(true);
    await job.whenConcluded();
  });

  it('a job paused before start stays paused after start', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    const job = new TestBlockJob(m, { id: 'j', plan: { steps: 1 } });
    job.userPause();
    job.start();
    await waitStatus(job, 'paused');
    expect(job.progressCurrent).toBe(0);
    job.userResume();
    await job.whenConcluded();
    expect(timeline(ev).slice(0, 4)).toEqual(['created', 'running', 'paused', 'running']);
  });

  it('an internal resume without pause is a bug', () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j' });
    job.resume(); // the creation pause
    expect(() => job.resume()).toThrow(/BUG/);
  });
});

describe('manager', () => {
  it('ids are unique, well formed, and required unless internal', () => {
    const m = new JobManager();
    new TestBlockJob(m, { id: 'a' });
    expect(() => new TestBlockJob(m, { id: 'a' })).toThrow("Job ID 'a' already in use");
    expect(() => new TestBlockJob(m, { id: '1x' })).toThrow("Invalid job ID '1x'");
    expect(() => new TestBlockJob(m, {})).toThrow('An explicit job ID is required');
    expect(() => new TestBlockJob(m, { id: 'b', internal: true })).toThrow(
      'Cannot specify job ID for internal job',
    );
    expect(() => m.get('zzz')).toThrow('Job not found');
    expect(m.get('a').id).toBe('a');
  });

  it('lists newest first and hides internal jobs, which emit nothing', async () => {
    const m = new JobManager();
    const ev = recordEvents(m);
    new TestBlockJob(m, { id: 'first' });
    new TestBlockJob(m, { id: 'second' });
    const internal = new TestBlockJob(m, { internal: true, plan: { steps: 1 } });
    expect(m.query().map((j) => j.id)).toEqual(['second', 'first']);
    expect(m.all()).toContain(internal);
    const before = ev.length;
    internal.start();
    await internal.whenConcluded();
    expect(ev.length).toBe(before);
    expect(internal.log).toEqual(['prepare', 'commit', 'clean']);
    await m.cancelAll();
    expect(m.all()).toEqual([]);
  });

  it('an illegal transition throws', () => {
    const m = new JobManager();
    const job = new TestBlockJob(m, { id: 'j' });
    expect(() => (job as any).transition('ready')).toThrow(
      "BUG: job 'j' cannot go from 'created' to 'ready'",
    );
  });
});

describe('job sleep', () => {
  it('a zero sleep only yields (no 1 ms timer per call), and can still be cancelled', async () => {
    const m = new JobManager();
    const fast = new TestJob(m, { id: 'fast' }, 2000, 0);
    // Timers frozen: one setTimeout(0) among the 2000 sleeps would never fire.
    await withFrozenTimers(async () => {
      fast.start();
      await waitStatus(fast, 'null');
    });
    expect(fast.progressCurrent).toBe(2000);
    const long = new TestJob(m, { id: 'long' }, 1e9, 0);
    long.start();
    await tick();
    long.cancel(true);
    await waitStatus(long, 'null');
    expect(long.progressCurrent).toBeLessThan(1e9);
  });
});
