import {
  BlockBackend,
  type BlockDriver,
  BlockError,
  type BlockNode,
  BlockOp,
  blockAllOps,
  type DirtyBitmap,
  PERM_ALL,
  toBlockError,
  unblockAllOps,
  unblockOp,
} from '@blockrep/block';
import { errorAction, type OnError } from './block-error-policy';
import { Job, type JobOptions } from './job';
import type { JobManager } from './manager';
import { RateLimit } from './rate-limit';

export interface BlockJobOptions extends JobOptions {
  /** Bytes per second (0: unlimited). */
  speed?: number;
}

/** query-block-jobs' BlockJobInfo. */
export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  'io-status': 'ok' | 'failed' | 'nospace';
  ready: boolean;
  status: string;
  'auto-finalize': boolean;
  'auto-dismiss': boolean;
  error?: string;
}

export interface BlockJobNodeUse {
  /** Permissions the job takes on the node (Perm flags). */
  perm: number;
  /** Permissions it lets others take (default: all). */
  shared?: number;
  /** Requests go on while the node is drained (the job drains its own nodes). */
  allowDrainedIo?: boolean;
  allowBeyondEof?: boolean;
  /** Block every operation on the node while the job runs (QEMU does so for a job's main node). */
  blockOperations?: boolean;
}

/**
 * A job that works on block nodes. It holds a BlockBackend on each node it uses, pauses while any
 * of them is drained, limits its rate by `speed`, and reports BLOCK_JOB_* events.
 */
export abstract class BlockJob extends Job {
  speed = 0;
  /** The backends the job holds, the first one being its main node's. */
  readonly backends: BlockBackend[] = [];
  protected readonly limit = new RateLimit();
  /** The reason other operations on the job's blocked nodes are refused. */
  #opBlocker: Error | null = null;
  readonly #opBlockedNodes: BlockNode[] = [];
  #ioStatus: BlockJobInfo['io-status'] = 'ok';

  constructor(manager: JobManager, opts: BlockJobOptions = {}) {
    super(manager, opts);
    if (opts.speed !== undefined) {
      try {
        this.setSpeedValue(opts.speed);
      } catch (e) {
        // As QEMU: the job existed for a moment (created, then null) before the error.
        this.earlyFail();
        throw e;
      }
    }
  }

  /** How permission errors name the job, e.g. "backup job 'job0'". */
  describe(): string {
    return `${this.type} job '${this.id ?? ''}'`;
  }

  /**
   * Takes a node into the job's use: a BlockBackend with the given permissions (throws on a
   * permission conflict, taking nothing).
   */
  useNode(node: BlockNode, use: BlockJobNodeUse): BlockBackend {
    const blk = new BlockBackend(node.graph, {
      perm: use.perm,
      shared: use.shared ?? PERM_ALL,
      description: this.describe(),
      allowDrainedIo: use.allowDrainedIo,
      allowBeyondEof: use.allowBeyondEof,
    });
    blk.dev = {
      drainedBegin: () => this.pause(),
      drainedEnd: () => this.resume(),
    };
    try {
      blk.attach(node);
    } catch (e) {
      node.graph.backends.delete(blk);
      throw e;
    }
    this.backends.push(blk);
    if (use.blockOperations) {
      this.#opBlocker ??= new Error(`block device is in use by block job: ${this.type}`);
      blockAllOps(node, this.#opBlocker);
      unblockOp(node, BlockOp.DATAPLANE, this.#opBlocker);
      this.#opBlockedNodes.push(node);
    }
    return blk;
  }

  /**
   * Puts a filter node (opened from `options`, with `filterNodeName` as its name when given)
   * above `source` for the job's life: drained, so no write in flight slips past it; `take`
   * then takes the job's nodes. On any failure the graph is as it was and nothing is held.
   */
  protected async insertFilter(
    source: BlockNode,
    driver: BlockDriver,
    options: Record<string, unknown>,
    filterNodeName: string | undefined,
    take: (filter: BlockNode) => void,
  ): Promise<BlockNode> {
    const g = source.graph;
    if (!g.driver(driver.name)) g.registerDriver(driver);
    const filter = await g.open({
      driver: driver.name,
      ...options,
      ...(filterNodeName !== undefined ? { 'node-name': filterNodeName } : {}),
    });
    try {
      await g.drained(source, () => g.replaceNode(source, filter));
      take(filter);
    } catch (e) {
      await g.replaceNode(filter, source).catch(() => {});
      await this.releaseNodes();
      await g.close(filter);
      throw e;
    }
    return filter;
  }

  /**
   * Takes a filter out again: its users go back to what it filters, drained (a write still
   * inside it finishes first), and it is closed.
   */
  protected async removeFilter(filter: BlockNode): Promise<void> {
    const g = filter.graph;
    await g.drained(filter, () => g.replaceNode(filter, filter.filtered!.node));
    await g.close(filter);
  }

  /** Releases every node the job holds (called from clean). */
  protected async releaseNodes(): Promise<void> {
    for (const n of this.#opBlockedNodes.splice(0)) unblockAllOps(n, this.#opBlocker!);
    for (const blk of this.backends.splice(0).reverse()) {
      blk.dev = {};
      await blk.detach();
    }
  }

  protected override async clean(): Promise<void> {
    await this.releaseNodes();
  }

  private setSpeedValue(speed: number): void {
    if (!Number.isSafeInteger(speed) || speed < 0)
      throw new BlockError("Parameter 'speed' expects a non-negative value");
    this.limit.setSpeed(speed);
    this.speed = speed;
  }

  /** block-job-set-speed. */
  setSpeed(speed: number): void {
    this.applyVerb('set-speed');
    const old = this.speed;
    this.setSpeedValue(speed);
    // A job sleeping for the old rate wakes up to recompute its delay when the limit went up.
    if (speed && speed <= old) return;
    this.enter();
  }

  /**
   * Accounts bytes the job is about to dispatch against `speed` and sleeps as long as the limit
   * asks (QEMU's block_job_ratelimit_get_delay + job_sleep_ns), at least through a pause point.
   * A set-speed wakes the sleep; the next dispatch then sees the new rate.
   */
  protected async rateLimit(bytes: number): Promise<void> {
    await this.sleep(this.limit.calculateDelay(bytes));
  }

  private eventBase(): Record<string, unknown> {
    return {
      type: this.type,
      device: this.id,
      len: this.progressTotal,
      offset: this.progressCurrent,
      speed: this.speed,
    };
  }

  protected override eventReady(): void {
    if (!this.internal) this.manager.emitEvent('BLOCK_JOB_READY', this.eventBase());
  }

  protected override eventPending(): void {
    if (!this.internal) this.manager.emitEvent('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
  }

  protected override eventCompleted(): void {
    if (this.internal) return;
    const data = this.eventBase();
    if (this.err) data.error = this.err.message;
    this.manager.emitEvent('BLOCK_JOB_COMPLETED', data);
  }

  protected override eventCancelled(): void {
    if (!this.internal) this.manager.emitEvent('BLOCK_JOB_CANCELLED', this.eventBase());
  }

  /**
   * A failed request under an on-error policy (QEMU's block_job_error_action): BLOCK_JOB_ERROR
   * says what the job does; 'stop' pauses it as a user pause and records the I/O status until
   * job-resume. Returns the action: 'report' fails the job, 'ignore' goes on.
   */
  protected ioErrorAction(
    policy: OnError,
    err: unknown,
    operation: 'read' | 'write',
  ): 'report' | 'ignore' | 'stop' {
    const action = errorAction(policy, err);
    if (!this.internal) {
      this.manager.emitEvent('BLOCK_JOB_ERROR', { device: this.id, operation, action });
    }
    if (action === 'stop') {
      this.pauseAsUser();
      if (this.#ioStatus === 'ok')
        this.#ioStatus = toBlockError(err).errno === 'ENOSPC' ? 'nospace' : 'failed';
    }
    return action;
  }

  /** query-block-jobs' io-status: not 'ok' while a 'stop' policy holds the job after an error. */
  get ioStatus(): BlockJobInfo['io-status'] {
    return this.#ioStatus;
  }

  protected override onUserResume(): void {
    this.#ioStatus = 'ok';
  }

  /** query-block-jobs' view of the job. */
  blockInfo(): BlockJobInfo {
    const i: BlockJobInfo = {
      type: this.type,
      device: this.id ?? '',
      len: this.progressTotal,
      offset: this.progressCurrent,
      busy: this.busy,
      paused: this.pauseCount > 0,
      speed: this.speed,
      'io-status': this.#ioStatus,
      ready: this.isReady,
      status: this.status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
    };
    if (this.err) i.error = this.err.message;
    return i;
  }
}

/**
 * Runs a new job's setup; if it fails, the job goes as if it never was (QEMU's job_early_fail).
 * A bitmap the job works from is busy from here until the job ends (its clean() frees it), so no
 * other operation may clear, remove, disable or merge into it meanwhile.
 */
export async function setUpJob(job: Job, setup: () => Promise<void>, bitmap?: DirtyBitmap): Promise<void> {
  if (bitmap) bitmap.busy = true;
  try {
    await setup();
  } catch (e) {
    if (bitmap) bitmap.busy = false;
    job.earlyFail();
    throw e;
  }
}
