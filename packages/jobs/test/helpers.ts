import { setTimeout as realDelay } from 'node:timers/promises';
import { BlockBackend, type BlockNode } from '@blockrep/block';
import { waitFor } from '@blockrep/test-kit';
import { vi } from 'vitest';
import { BlockJob, Job, type JobEvent, type JobManager, type JobOptions, type JobStatus } from '../src/index';

export interface StepPlan {
  /** Units of work (each one a sleep of stepMs, then progress +1). */
  steps?: number;
  stepMs?: number;
  /** Enter READY after the steps and wait for job-complete. */
  ready?: boolean;
  /** run() throws this after the steps. */
  fail?: string;
  /** prepare() throws this. */
  failPrepare?: string;
  /** prepare() takes this long. */
  prepareMs?: number;
  /** The job has a complete() hook (default: when ready). */
  completable?: boolean;
  /** A READY job treats a soft cancel as "finish now" (mirror). */
  softCancel?: boolean;
}

/** A block job driven by a plan: a loop of sleeps, with hooks that log what ran. */
export class TestBlockJob extends BlockJob {
  readonly type: string = 'backup';
  readonly log: string[] = [];
  readonly plan: StepPlan;
  private completeRequested = false;

  constructor(manager: JobManager, opts: JobOptions & { plan?: StepPlan; speed?: number } = { id: 'job0' }) {
    super(manager, opts);
    this.plan = opts.plan ?? {};
    if (this.plan.completable === false) (this as any).complete = undefined;
  }

  protected async run(): Promise<void> {
    const p = this.plan;
    const steps = p.steps ?? 3;
    this.progressSetRemaining(steps);
    for (let i = 0; i < steps; i++) {
      if (this.isCancelled) return;
      await this.sleep(p.stepMs ?? 5);
      if (this.isCancelled) return;
      this.progressUpdate(1);
    }
    if (p.fail) throw new Error(p.fail);
    if (p.ready) {
      this.transitionToReady();
      while (!this.completeRequested && !this.cancelRequested) await this.yieldUntilEntered();
    }
  }

  protected override cancelRequest(force: boolean): boolean {
    if (this.plan.softCancel) return force || !this.isReady;
    return true;
  }

  protected override complete(): void {
    this.log.push('complete');
    this.completeRequested = true;
    this.enter();
  }

  protected override async prepare(): Promise<void> {
    this.log.push('prepare');
    if (this.plan.prepareMs) {
      await new Promise((r) => setTimeout(r, this.plan.prepareMs));
      this.log.push('prepared');
    }
    if (this.plan.failPrepare) throw new Error(this.plan.failPrepare);
  }
  protected override async commit(): Promise<void> {
    this.log.push('commit');
  }
  protected override async abort(): Promise<void> {
    this.log.push('abort');
  }
  protected override async clean(): Promise<void> {
    await super.clean();
    this.log.push('clean');
  }

  /** Exposes the protected helpers the tests drive. */
  io(bytes: number): Promise<void> {
    return this.rateLimit(bytes);
  }
  ioError(): void {
    this.ioErrorAction('report', new Error('injected'), 'write');
  }
}

/** A plain (non-block) job: sleeps `steps` times. */
export class TestJob extends Job {
  readonly type: string = 'create';

  constructor(
    manager: JobManager,
    opts: JobOptions = { id: 'job0' },
    readonly steps = 3,
    readonly stepMs = 5,
  ) {
    super(manager, opts);
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(this.steps);
    for (let i = 0; i < this.steps && !this.isCancelled; i++) {
      await this.sleep(this.stepMs);
      this.progressUpdate(1);
    }
  }
}

/** Every event the manager emits, in order. */
export function recordEvents(m: JobManager): JobEvent[] {
  const out: JobEvent[] = [];
  m.on('event', (e: JobEvent) => out.push(e));
  return out;
}

/** The statuses of JOB_STATUS_CHANGE events and the names of the others, in order. */
export function timeline(events: JobEvent[]): string[] {
  return events.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? (e.data.status as string) : e.event));
}

/** Resolves when the job reaches a status (rejects after timeoutMs, sized for a loaded CI machine). */
export async function waitStatus(job: Job, status: JobStatus, timeoutMs = 30_000): Promise<void> {
  await waitFor(() => job.status === status, {
    on: [job.manager, 'event'],
    timeoutMs,
    what: () => `job ${job.id} ${status} (it stayed in ${job.status})`,
  });
}

export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/**
 * Runs fn with setTimeout frozen (faked, never advanced): no timer set meanwhile runs out, so a
 * job that gets past a sleep inside fn was woken by something else, whatever the machine's pace.
 * Real time still bounds fn: a job waiting for its timer fails the test instead of hanging it.
 */
export async function withFrozenTimers<T>(fn: () => Promise<T>, timeoutMs = 30_000): Promise<T> {
  vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
  const deadline = new AbortController();
  try {
    return await Promise.race([
      fn(),
      realDelay(timeoutMs, undefined, { signal: deadline.signal }).then(() => {
        throw new Error(`still waiting after ${timeoutMs} ms with timers frozen: a timer had to run out`);
      }),
    ]);
  } finally {
    deadline.abort();
    vi.useRealTimers();
  }
}

/** Resolves once a started job waits in a sleep, yield or pause (without timers: see above). */
export async function untilIdle(job: Job): Promise<void> {
  while (!job.started || job.busy) await new Promise((r) => setImmediate(r));
}

/**
 * Counts the flushes requested through any BlockBackend attached to `node` (a job's own backend
 * included) from now until `restore()`.
 */
export function countFlushes(node: BlockNode): { count(): number; restore(): void } {
  const flush = BlockBackend.prototype.flush;
  let n = 0;
  // Counted at the call: a job's backend is detached by the time it has ended.
  const spy = vi.spyOn(BlockBackend.prototype, 'flush').mockImplementation(function (this: BlockBackend) {
    if (this.node === node) n++;
    return flush.call(this);
  });
  return { count: () => n, restore: () => spy.mockRestore() };
}
