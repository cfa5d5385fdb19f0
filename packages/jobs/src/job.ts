import { BlockError } from '@blockrep/block';
import type { JobManager } from './manager';
import {
  isCompletedStatus,
  isReadyStatus,
  type JobStatus,
  type JobType,
  type JobVerb,
  transitionAllowed,
  verbAllowed,
} from './states';

export interface JobOptions {
  /** The job's id (required unless internal; letter first, then letters, digits, '-', '.', '_'). */
  id?: string;
  /** Hidden from query-jobs and emits no events; has no id. */
  internal?: boolean;
  /** Finalize as soon as the job's work is done (default true); else wait in 'pending'. */
  autoFinalize?: boolean;
  /** Disappear once concluded (default true); else wait in 'concluded' for job-dismiss. */
  autoDismiss?: boolean;
  /** Jobs that end together: a transaction with completion-mode=grouped. */
  txn?: JobTxn;
}

/**
 * Jobs that end together (QEMU's JobTxn): each waits in 'waiting' until all are done, then all
 * become pending and finalize together; if one fails or is cancelled, the others are cancelled.
 */
export class JobTxn {
  readonly jobs: Job[] = [];
  aborting = false;
}

/** query-jobs' JobInfo. */
export interface JobInfo {
  id: string;
  type: string;
  status: JobStatus;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

const ID_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

function jobError(msg: string): BlockError {
  return new BlockError(msg, { errno: 'EPERM' });
}

/**
 * A long-running operation with QEMU's job life cycle. A subclass writes `run()`, calling
 * `pausePoint()` / `sleep()` between units of work and returning early once `isCancelled`;
 * optional hooks (prepare, commit, abort, clean, complete, cancelRequest) shape the ending.
 *
 * JavaScript has no coroutines to re-enter, so a job waiting in `sleep()` / `pausePoint()` /
 * `yieldUntilEntered()` awaits a promise that `enter()` resolves.
 */
export abstract class Job {
  abstract readonly type: JobType | string;
  readonly id: string | undefined;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  #status: JobStatus = 'undefined';
  /** Pause requests outstanding (users' and internal ones, e.g. drains); 1 until start. */
  #pauseCount = 1;
  #paused = true;
  /** Running (not waiting in a pause point, sleep or yield). */
  #busy = false;
  #userPaused = false;
  /** A cancel was requested (QEMU's job_cancel_requested). */
  #cancelRequested = false;
  /** The cancel is a real one, not a READY job's soft cancel (QEMU's job_is_cancelled). */
  #forceCancel = false;
  /** run() has returned; the ending is scheduled. */
  #deferred = false;
  #started = false;
  /** The job's error, once it failed or was cancelled. */
  #err: Error | null = null;
  progressCurrent = 0;
  progressTotal = 0;

  private wake: (() => void) | null = null;
  private sleepTimer: { clear(): void } | null = null;
  /** The ending (prepare, commit/abort, clean) has begun; it runs once. */
  private ending = false;
  private readonly doneWaiters: (() => void)[] = [];
  /** Woken on every status change (a transaction waits for its jobs to complete). */
  private statusWaiters: (() => void)[] = [];
  /** The transaction the job ends with, if any (until the job is finalized). */
  txn: JobTxn | null = null;
  private readonly readyWaiters: { resolve(): void; reject(e: Error): void }[] = [];

  constructor(
    readonly manager: JobManager,
    opts: JobOptions = {},
  ) {
    if (opts.id !== undefined) {
      if (opts.internal) throw jobError('Cannot specify job ID for internal job');
      if (!ID_RE.test(opts.id)) throw jobError(`Invalid job ID '${opts.id}'`);
      if (manager.find(opts.id)) throw jobError(`Job ID '${opts.id}' already in use`);
    } else if (!opts.internal) {
      throw jobError('An explicit job ID is required');
    }
    this.id = opts.id;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    manager.register(this);
    if (opts.txn) {
      // Newest first, as QEMU lists a transaction's jobs (the order they go pending and end in).
      this.txn = opts.txn;
      opts.txn.jobs.unshift(this);
    }
    this.transition('created');
  }

  get internal(): boolean {
    return this.id === undefined;
  }

  /** The job's work. Throwing fails the job with that error. */
  protected abstract run(): Promise<void>;

  // ---- hooks for subclasses (all optional) ----

  /** Last step that may still fail the job (QEMU's .prepare), before commit/abort. */
  protected prepare(): Promise<void> | void {}
  /** The job succeeded: make its result visible. */
  protected commit(): Promise<void> | void {}
  /** The job failed or was cancelled: undo. */
  protected abort(): Promise<void> | void {}
  /** Either way: release resources. */
  protected clean(): Promise<void> | void {}
  /** job-complete on a READY job; absent means "cannot be completed". */
  protected complete?(): void;
  /** Decides whether a cancel is a hard one (default: always, as for jobs without .cancel). */
  protected cancelRequest(_force: boolean): boolean {
    return true;
  }
  /** Called when the job is about to pause / has resumed in a pause point. */
  protected onPause(): void {}
  protected onResume(): void {}
  /** A user resume (also from a cancel of a user-paused job). */
  protected onUserResume(): void {}
  /** Event hooks (block jobs emit BLOCK_JOB_* from these). */
  protected eventReady(): void {}
  protected eventPending(): void {}
  protected eventCompleted(): void {}
  protected eventCancelled(): void {}

  // ---- state ----

  /** Moves to a new state; a move QEMU's table forbids is a bug and throws. */
  protected transition(to: JobStatus): void {
    const from = this.#status;
    if (!transitionAllowed(from, to)) {
      throw new Error(`BUG: job '${this.id ?? '<internal>'}' cannot go from '${from}' to '${to}'`);
    }
    this.#status = to;
    if (this.statusWaiters.length) for (const w of this.statusWaiters.splice(0)) w();
    if (!this.internal && from !== to) {
      this.manager.emitEvent('JOB_STATUS_CHANGE', { id: this.id, status: to });
    }
    if (to === 'ready') for (const w of this.readyWaiters.splice(0)) w.resolve();
    if (to === 'null' || to === 'concluded') {
      for (const w of this.doneWaiters.splice(0)) w();
      const why = this.#err ?? new Error(`job '${this.id ?? '<internal>'}' ended before it was ready`);
      for (const w of this.readyWaiters.splice(0)) w.reject(why);
    }
  }

  /** Throws QEMU's error unless the verb is allowed in the current state. */
  applyVerb(verb: JobVerb): void {
    if (!verbAllowed(verb, this.#status)) {
      throw jobError(`Job '${this.id}' in state '${this.#status}' cannot accept command verb '${verb}'`);
    }
  }

  // ---- predicates (QEMU's job_is_cancelled, job_cancel_requested, job_user_paused, ...) ----

  get status(): JobStatus {
    return this.#status;
  }

  /** The job's error, once it failed or was cancelled. */
  get err(): Error | null {
    return this.#err;
  }

  /** A real cancel: the job is to end without its result (QEMU's job_is_cancelled). */
  get isCancelled(): boolean {
    return this.#forceCancel;
  }

  /** Any cancel, including a READY job's soft one (QEMU's job_cancel_requested). */
  get cancelRequested(): boolean {
    return this.#cancelRequested;
  }

  get userPaused(): boolean {
    return this.#userPaused;
  }

  /** Pause requests outstanding (users' and internal ones); what query-block-jobs calls paused. */
  get pauseCount(): number {
    return this.#pauseCount;
  }

  /** Running, not waiting in a pause point, sleep or yield. */
  get busy(): boolean {
    return this.#busy;
  }

  get started(): boolean {
    return this.#started;
  }

  get isReady(): boolean {
    return isReadyStatus(this.#status);
  }

  get isCompleted(): boolean {
    return isCompletedStatus(this.#status);
  }

  get shouldPause(): boolean {
    return this.#pauseCount > 0;
  }

  // ---- progress ----

  progressUpdate(done: number): void {
    this.progressCurrent += done;
  }

  progressSetRemaining(remaining: number): void {
    this.progressTotal = this.progressCurrent + remaining;
  }

  progressIncreaseRemaining(delta: number): void {
    this.progressTotal += delta;
  }

  // ---- running ----

  /** Starts the job: it leaves 'created' and runs (after a first pause point). */
  start(): void {
    if (this.#started || !this.#paused) throw new Error('BUG: job started twice');
    this.#started = true;
    this.#pauseCount--;
    this.#busy = true;
    this.#paused = false;
    this.transition('running');
    void this.entry();
  }

  private async entry(): Promise<void> {
    let err: Error | null = null;
    try {
      await this.pausePointInner();
      await this.run();
    } catch (e) {
      err = e instanceof Error ? e : new Error(String(e));
    }
    if (err && !this.#err) this.#err = err;
    this.#deferred = true;
    this.#busy = true;
    // The ending runs from the event loop, as QEMU's job_exit runs from a bottom half.
    setImmediate(() => {
      this.#busy = false;
      if (!this.isCompleted) void this.completed();
    });
  }

  /** Re-enters a job waiting in sleep/yield/pause (QEMU's job_enter). */
  enter(): void {
    if (!this.#started || this.#deferred || this.#busy) return;
    this.clearTimer();
    this.#busy = true;
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private clearTimer(): void {
    if (this.sleepTimer) {
      this.sleepTimer.clear();
      this.sleepTimer = null;
    }
  }

  private doYield(ms?: number): Promise<void> {
    this.#busy = false;
    return new Promise<void>((resolve) => {
      this.wake = resolve;
      if (ms === undefined) return;
      const fire = () => {
        this.sleepTimer = null;
        this.enter();
      };
      // A zero sleep only yields (QEMU's timer set to now): setTimeout(0) would wait at least
      // 1 ms, which a copy loop pays once per chunk (measured: half of an active commit's time).
      if (ms <= 0) {
        const h = setImmediate(fire);
        this.sleepTimer = { clear: () => clearImmediate(h) };
      } else {
        const h = setTimeout(fire, ms);
        this.sleepTimer = { clear: () => clearTimeout(h) };
      }
    });
  }

  private async pausePointInner(): Promise<void> {
    if (!this.shouldPause || this.isCancelled) return;
    this.onPause();
    if (this.shouldPause && !this.isCancelled) {
      const status = this.#status;
      this.transition(status === 'ready' ? 'standby' : 'paused');
      this.#paused = true;
      await this.doYield();
      this.#paused = false;
      this.transition(status);
    }
    this.onResume();
  }

  /** Where the run loop lets itself be paused: waits here while a pause is requested. */
  protected pausePoint(): Promise<void> {
    return this.pausePointInner();
  }

  /** Sleeps for ms, woken early by a cancel; pauses at the end if a pause was requested. */
  protected async sleep(ms: number): Promise<void> {
    if (this.isCancelled) return;
    if (!this.shouldPause) await this.doYield(Math.max(0, ms));
    await this.pausePointInner();
  }

  /** Waits until something enters the job (a complete, a cancel, a resume). */
  protected async yieldUntilEntered(): Promise<void> {
    if (this.isCancelled) return;
    if (!this.shouldPause) await this.doYield();
    await this.pausePointInner();
  }

  /** Enters READY (the job's work is in sync and it waits for job-complete). */
  protected transitionToReady(): void {
    this.transition('ready');
    this.eventReady();
  }

  // ---- pausing ----

  /** An internal pause (drains, replication); nests with other pauses. */
  pause(): void {
    this.#pauseCount++;
    if (!this.#paused) this.enter();
  }

  resume(): void {
    if (this.#pauseCount <= 0) throw new Error('BUG: resume without pause');
    this.#pauseCount--;
    if (this.#pauseCount) return;
    // A sleeping job wakes up from its timer; only kick one that waits for nothing else.
    if (!this.sleepTimer) this.enter();
  }

  userPause(): void {
    this.applyVerb('pause');
    if (this.#userPaused) throw jobError('Job is already paused');
    this.#userPaused = true;
    this.pause();
  }

  /**
   * An I/O error under a 'stop' policy: the job pauses as if the user had paused it, so that
   * job-resume (or a cancel) is what goes on (QEMU's block_job_error_action).
   */
  protected pauseAsUser(): void {
    if (this.#userPaused) return;
    this.pause();
    this.#userPaused = true;
  }

  userResume(): void {
    if (!this.#userPaused || this.#pauseCount <= 0) throw jobError("Can't resume a job that was not paused");
    this.applyVerb('resume');
    this.onUserResume();
    this.#userPaused = false;
    this.resume();
  }

  // ---- ending ----

  /** job-complete: asks a READY job to finish. */
  userComplete(): void {
    this.applyVerb('complete');
    if (this.#cancelRequested || !this.complete) {
      throw jobError(`The active block job '${this.id}' cannot be completed`);
    }
    this.complete();
  }

  /** job-cancel / block-job-cancel. */
  async userCancel(force: boolean): Promise<void> {
    this.applyVerb('cancel');
    await this.cancel(force);
  }

  /** Cancels (internal callers skip the verb check, as QEMU's job_cancel). */
  async cancel(force: boolean): Promise<void> {
    if (this.#status === 'null') return;
    if (this.#status === 'concluded') {
      this.doDismiss();
      return;
    }
    this.cancelAsync(force);
    if (!this.#started) {
      await this.completed();
    } else if (this.#deferred) {
      // A soft cancel of a job that is already done is ignored.
      if (this.isCancelled && !this.ending) await this.txnAbort();
    } else {
      this.enter();
    }
  }

  private cancelAsync(force: boolean): void {
    force = this.cancelRequest(force);
    if (this.#userPaused) {
      this.onUserResume();
      this.#userPaused = false;
      this.#pauseCount--;
    }
    if (force || !this.#deferred) {
      this.#cancelRequested = true;
      this.#forceCancel ||= force;
    }
  }

  /** job-finalize: a job waiting in 'pending' runs its prepare and commit/abort. */
  async userFinalize(): Promise<void> {
    this.applyVerb('finalize');
    await this.doFinalize();
  }

  /** job-dismiss: a concluded job disappears. */
  userDismiss(): void {
    this.applyVerb('dismiss');
    this.doDismiss();
  }

  /** Drops a job that could not be set up after creation (QEMU's job_early_fail). */
  earlyFail(): void {
    if (this.#status !== 'created' || this.#started) throw new Error('BUG: early fail of a started job');
    this.doDismiss();
  }

  private updateRc(): void {
    if (!this.#err && this.isCancelled) {
      this.#err = new BlockError('Operation canceled', { errno: 'ECANCELED' });
    }
    if (this.#err) this.transition('aborting');
  }

  private async completed(): Promise<void> {
    this.updateRc();
    if (this.#err) await this.txnAbort();
    else await this.txnSuccess();
  }

  /** The jobs that end together with this one (itself alone outside a transaction). */
  private group(): Job[] {
    return this.txn ? [...this.txn.jobs] : [this];
  }

  private async untilCompleted(): Promise<void> {
    while (!this.isCompleted) await new Promise<void>((r) => this.statusWaiters.push(r));
  }

  private leaveTxn(): void {
    const txn = this.txn;
    if (!txn) return;
    this.txn = null;
    const i = txn.jobs.indexOf(this);
    if (i >= 0) txn.jobs.splice(i, 1);
  }

  /** Done without error: wait for the others of the transaction, then all go pending together. */
  private async txnSuccess(): Promise<void> {
    this.transition('waiting');
    const group = this.group();
    if (group.some((j) => !j.isCompleted)) return;
    for (const j of group) {
      if (j.#status !== 'waiting') continue;
      j.transition('pending');
      if (!j.autoFinalize) j.eventPending();
    }
    if (group.every((j) => j.autoFinalize)) await this.doFinalize();
  }

  /** Failed or cancelled: the other jobs of the transaction are cancelled, then all end. */
  private async txnAbort(): Promise<void> {
    const txn = this.txn;
    if (!txn) {
      if (this.ending) return;
      this.ending = true;
      await this.finalizeSingle();
      return;
    }
    if (txn.aborting) return;
    txn.aborting = true;
    for (const o of txn.jobs) {
      if (o === this) continue;
      o.cancelAsync(true);
      o.enter();
    }
    while (txn.jobs.length) {
      const o = txn.jobs[0]!;
      if (!o.isCompleted) await o.untilCompleted();
      o.ending = true;
      await o.finalizeSingle();
    }
  }

  /** Prepare every job of the group, then commit them all, or abort them all if one failed. */
  private async doFinalize(): Promise<void> {
    const group = this.group();
    if (group.some((j) => j.ending)) return;
    for (const j of group) j.ending = true;
    let failed: Job | null = null;
    for (const j of group) {
      if (!j.#err) {
        try {
          await j.prepare();
        } catch (e) {
          j.#err = e instanceof Error ? e : new Error(String(e));
        }
        j.updateRc();
      }
      if (j.#err) {
        failed = j;
        break;
      }
    }
    if (failed && this.txn) {
      for (const j of group) j.ending = false;
      await failed.txnAbort();
      return;
    }
    for (const j of group) await j.finalizeSingle();
  }

  /** Commit or abort, clean, report, conclude. A cancel that came during prepare is seen here. */
  private async finalizeSingle(): Promise<void> {
    this.leaveTxn();
    this.updateRc();
    const failed = this.#err !== null;
    // These hooks must not fail in QEMU; here a throw is kept as the job's error, never lost in
    // an unhandled rejection that would take the daemon down.
    const keep = (e: unknown) => {
      this.#err ??= e instanceof Error ? e : new Error(String(e));
    };
    try {
      if (!failed) await this.commit();
      else await this.abort();
    } catch (e) {
      keep(e);
    }
    try {
      await this.clean();
    } catch (e) {
      keep(e);
    }
    if (this.#started) {
      if (this.isCancelled) this.eventCancelled();
      else this.eventCompleted();
    }
    this.transition('concluded');
    if (this.autoDismiss || !this.#started) this.doDismiss();
  }

  private doDismiss(): void {
    this.leaveTxn();
    this.#busy = false;
    this.#paused = false;
    this.#deferred = true;
    this.clearTimer();
    this.transition('null');
    this.manager.unregister(this);
  }

  /** Resolves once the job is ready (in sync); rejects with its error if it ends first. */
  whenReady(): Promise<void> {
    if (this.#status === 'ready' || this.#status === 'standby') return Promise.resolve();
    if (this.#status === 'concluded' || this.#status === 'null') {
      return Promise.reject(
        this.#err ?? new Error(`job '${this.id ?? '<internal>'}' ended before it was ready`),
      );
    }
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  /** Resolves once the job has concluded (or is gone). */
  whenConcluded(): Promise<void> {
    if (this.#status === 'concluded' || this.#status === 'null') return Promise.resolve();
    return new Promise((r) => this.doneWaiters.push(r));
  }

  /** query-jobs' view of the job. */
  info(): JobInfo {
    const i: JobInfo = {
      id: this.id ?? '',
      type: this.type,
      status: this.#status,
      'current-progress': this.progressCurrent,
      'total-progress': this.progressTotal,
    };
    if (this.#err) i.error = this.#err.message;
    return i;
  }
}
