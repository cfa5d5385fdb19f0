import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockGraph,
  type BlockNode,
  BlockOp,
  blockAllOps,
  ChildRole,
  type Errno,
  errnoText,
  type IoVec,
  iovSlice,
  isAllocatedAbove,
  opt,
  Perm,
  toBlockError,
  unblockAllOps,
  unblockOp,
} from '@blockrep/block';
import { type BackupJob, type CommitBase, type JobManager, startBackup, startCommit } from '@blockrep/jobs';

/*
 * The replication filter (QEMU's block/replication.c behaviour, see shared/reference/replication.md).
 * Primary: forwards the guest's writes to the secondary (its file child is an NBD client), never
 * reads, and hides forwarding errors from the guest. Secondary: sits above active -> hidden ->
 * secondary disk; a sync=none backup keeps in hidden what the primary's writes overwrite; a
 * checkpoint empties active and hidden; failover commits active (+hidden) into the secondary disk.
 */

export type ReplicationMode = 'primary' | 'secondary';
export type ReplicationStage = 'none' | 'running' | 'failover' | 'failover-failed' | 'done';

/** QEMU's ReplicationMode numbers, used in its mode-mismatch error text. */
const MODE_NUMBER: Record<ReplicationMode, number> = { primary: 0, secondary: 1 };

export interface ReplicationState {
  readonly node: BlockNode;
  readonly mode: ReplicationMode;
  stage: ReplicationStage;
  readonly topId: string | undefined;
  /**
   * The replication node's own edges to the hidden and secondary disks (children "hidden disk"
   * and "secondary disk", as QEMU attaches them on start): a checkpoint empties the hidden disk
   * through its edge, and a write after a failed failover reaches the secondary disk through its
   * edge. Dropped when a failover has collapsed the chain, or when the node closes.
   */
  hiddenDisk: BlockChild | null;
  secondaryDisk: BlockChild | null;
  backupJob: BackupJob | null;
  commitJob: CommitBase | null;
  blocker: Error | null;
  origHiddenReadOnly: boolean;
  origSecondaryReadOnly: boolean;
  /** The recorded error (errno), 0 for none. */
  error: Errno | 0;
  /** The backup job's cleanup, running once the job ended. */
  backupCleanup: Promise<void>;
  /** stop() is cancelling the backup job: its end records EIO, as QEMU's does, but quietly. */
  stopping: boolean;
}

/** What query-replication shows of one node. */
export interface ReplicationInfo {
  'node-name': string;
  mode: ReplicationMode;
  stage: ReplicationStage;
  error?: string;
}

const st = (node: BlockNode) => node.opaque as ReplicationState;
const file = (node: BlockNode) => node.file as BlockChild;

function err(msg: string, errno: Errno = 'EINVAL'): BlockError {
  return new BlockError(msg, { errno });
}

/**
 * The registry of replication nodes of one graph and the operations run on all of them at once
 * (QEMU's replication_start_all, _do_checkpoint_all, _get_error_all, _stop_all). Register its
 * `driver` in the graph; it needs the daemon's JobManager for its internal jobs.
 */
export class ReplicationManager {
  /** Newest first, as QEMU keeps them. */
  private readonly states: ReplicationState[] = [];
  readonly driver: BlockDriver;

  constructor(readonly jobs: JobManager) {
    this.driver = makeDriver(this);
  }

  register(s: ReplicationState): void {
    this.states.unshift(s);
  }

  unregister(s: ReplicationState): void {
    const i = this.states.indexOf(s);
    if (i >= 0) this.states.splice(i, 1);
  }

  all(): ReplicationState[] {
    return [...this.states];
  }

  /** Starts every node; the first error stops the walk and is thrown. */
  async startAll(mode: ReplicationMode): Promise<void> {
    for (const s of this.all()) await this.start(s, mode);
  }

  async checkpointAll(): Promise<void> {
    for (const s of this.all()) await this.checkpoint(s);
  }

  /** Throws the first node's error ("Block replication is not running", "I/O error occurred"). */
  getErrorAll(): void {
    for (const s of this.all()) this.getError(s);
  }

  async stopAll(failover: boolean): Promise<void> {
    for (const s of this.all()) await this.stop(s, failover);
  }

  /** query-replication. */
  query(): ReplicationInfo[] {
    return this.all().map((s) => info(s));
  }

  // ---- one node ----

  private setStage(s: ReplicationState, stage: ReplicationStage): void {
    if (s.stage === stage) return;
    s.stage = stage;
    s.node.graph.emitEvent('REPLICATION_STAGE_CHANGE', { ...info(s) });
  }

  recordError(s: ReplicationState, errno: Errno): void {
    s.error = errno;
    s.node.graph.emitEvent('REPLICATION_ERROR', { ...info(s) });
  }

  async start(s: ReplicationState, mode: ReplicationMode): Promise<void> {
    // A secondary promoted to primary: nothing left to do.
    if (s.stage === 'done' || s.stage === 'failover') return;
    if (s.stage !== 'none') throw err('Block replication is running or done');
    if (s.mode !== mode) {
      throw err(
        `The parameter mode's value is invalid, needs ${MODE_NUMBER[s.mode]}, but got ${MODE_NUMBER[mode]}`,
      );
    }
    if (s.mode === 'secondary') await this.startSecondary(s);
    this.setStage(s, 'running');
    if (s.mode === 'secondary') await this.secondaryCheckpoint(s);
    s.error = 0;
  }

  private async startSecondary(s: ReplicationState): Promise<void> {
    const node = s.node;
    const g = node.graph;
    const active = node.file;
    if (!active?.node.backing) throw err("Active disk doesn't have backing file");
    const hidden = active.node.backing;
    if (!hidden.node.backing) throw err("Hidden disk doesn't have backing file");
    const secondary = hidden.node.backing;
    if (!secondary.node.hasBackend()) throw err("The secondary disk doesn't have block backend");
    const lengths = [active.node.length, hidden.node.length, secondary.node.length];
    if (lengths[0] !== lengths[1] || lengths[1] !== lengths[2]) {
      throw err("Active disk, hidden disk, secondary disk's length are not the same");
    }
    if (!active.node.driver.makeEmpty || !hidden.node.driver.makeEmpty) {
      throw err("Active disk or hidden disk doesn't support make_empty");
    }
    // Writable first: the edges below take WRITE on both disks.
    await this.reopenBackingFiles(s, true);
    try {
      s.hiddenDisk = g.attachChild(node, hidden.node, 'hidden disk', ChildRole.DATA);
      s.secondaryDisk = g.attachChild(node, secondary.node, 'secondary disk', ChildRole.DATA);
    } catch (e) {
      await this.dropDisks(s);
      await this.reopenBackingFiles(s, false).catch(() => {});
      throw e;
    }
    s.blocker = new Error('Block device is in use by internal backup job');
    const top = this.findTop(g, s);
    if (!top) {
      // QEMU keeps the edges here; dropped, a later start can attach them again.
      await this.dropDisks(s);
      await this.reopenBackingFiles(s, false).catch(() => {});
      throw err('No top_bs or it is invalid');
    }
    blockAllOps(top, s.blocker);
    unblockOp(top, BlockOp.DATAPLANE, s.blocker);
    try {
      s.backupJob = (await startBackup(this.jobs, {
        internal: true,
        source: secondary.node,
        target: hidden.node,
        sync: 'none',
        onSourceError: 'report',
        onTargetError: 'report',
        onComplete: () => this.backupCompleted(s),
        // A failed copy fails the primary's write; the HA manager learns of it here too.
        onCopyError: (e) => this.recordError(s, toBlockError(e).errno),
      })) as BackupJob;
    } catch (e) {
      await this.backupCleanup(s);
      await this.dropDisks(s);
      throw e;
    }
  }

  /** Detaches the node's edges to the hidden and secondary disks (QEMU's bdrv_unref_child). */
  private async dropDisks(s: ReplicationState): Promise<void> {
    const g = s.node.graph;
    const edges = [s.secondaryDisk, s.hiddenDisk].filter((c) => c !== null && c.parent === s.node);
    s.secondaryDisk = null;
    s.hiddenDisk = null;
    // Both at once (a disk nothing else holds is closed after).
    g.update((tx) => {
      for (const c of edges) tx.removeChild(c!);
    });
    await g.collectGarbage();
  }

  /** top-id must name a root node (or a device) that has this replication node below it. */
  private findTop(g: BlockGraph, s: ReplicationState): BlockNode | null {
    let top: BlockNode;
    try {
      top = g.lookup(s.topId!);
    } catch {
      return null;
    }
    if (top.parents.some((p) => p.parent.kind === 'node')) return null;
    const below = (n: BlockNode): boolean => n === s.node || n.children.some((c) => below(c.node));
    return below(top) ? top : null;
  }

  /**
   * Hidden and secondary disks go read-write for the job, and back to what they were after.
   * Found down the chain below the active disk, as the node's own edges may not exist yet.
   */
  private async reopenBackingFiles(s: ReplicationState, writable: boolean): Promise<void> {
    const hidden = s.node.file?.node.backing?.node;
    const secondary = hidden?.backing?.node;
    if (!hidden || !secondary) return;
    if (writable) {
      s.origHiddenReadOnly = hidden.readOnly;
      s.origSecondaryReadOnly = secondary.readOnly;
    }
    const queue: { node: BlockNode; readOnly: boolean }[] = [];
    if (s.origHiddenReadOnly) queue.push({ node: hidden, readOnly: !writable });
    if (s.origSecondaryReadOnly) queue.push({ node: secondary, readOnly: !writable });
    if (queue.length) await s.node.graph.reopenMultiple(queue);
  }

  private backupCompleted(s: ReplicationState): void {
    // The backup job ends only when replication stops it for a failover; otherwise it broke.
    // QEMU records EIO even when its own stop cancels the job first; so do we, but without a
    // REPLICATION_ERROR event: every failover would log an error that the failover then clears.
    if (s.stage !== 'failover') {
      if (s.stopping) s.error = 'EIO';
      else this.recordError(s, 'EIO');
    }
    s.backupCleanup = this.backupCleanup(s);
  }

  private async backupCleanup(s: ReplicationState): Promise<void> {
    s.backupJob = null;
    const g = s.node.graph;
    let top: BlockNode | null = null;
    try {
      top = g.lookup(s.topId!);
    } catch {
      return;
    }
    if (s.blocker) unblockAllOps(top, s.blocker);
    s.blocker = null;
    await this.reopenBackingFiles(s, false).catch(() => {});
  }

  /** Cancels the backup job and waits until it and its cleanup are done (job_cancel_sync). */
  private async cancelBackup(s: ReplicationState): Promise<void> {
    const job = s.backupJob;
    if (!job) return;
    s.stopping = true;
    try {
      await job.cancel(true);
      await job.whenConcluded();
      await s.backupCleanup;
    } finally {
      s.stopping = false;
    }
  }

  private async secondaryCheckpoint(s: ReplicationState): Promise<void> {
    if (!s.backupJob) throw err('Backup job was cancelled unexpectedly');
    s.backupJob.doCheckpoint();
    const active = file(s.node);
    if (active.node.closed) throw err(`Active disk ${active.node.nodeName} is ejected`);
    await active.makeEmpty();
    const hidden = s.hiddenDisk!;
    if (hidden.node.closed) throw err(`Hidden disk ${hidden.node.nodeName} is ejected`);
    await hidden.makeEmpty();
  }

  async checkpoint(s: ReplicationState): Promise<void> {
    if (s.stage === 'done' || s.stage === 'failover') return;
    if (s.mode === 'secondary') await this.secondaryCheckpoint(s);
  }

  getError(s: ReplicationState): void {
    if (s.stage === 'none') throw err('Block replication is not running');
    if (s.error) throw err('I/O error occurred', 'EIO');
  }

  async stop(s: ReplicationState, failover: boolean): Promise<void> {
    if (s.stage === 'done' || s.stage === 'failover') return;
    if (s.stage !== 'running') throw err('Block replication is not running');
    if (s.mode === 'primary') {
      this.setStage(s, 'done');
      s.error = 0;
      return;
    }
    // The job must end before this node can go: its completion touches hidden and secondary.
    await this.cancelBackup(s);
    if (!failover) {
      try {
        await this.secondaryCheckpoint(s);
      } finally {
        this.setStage(s, 'done');
      }
      return;
    }
    this.setStage(s, 'failover');
    s.commitJob = await startCommit(this.jobs, {
      internal: true,
      top: file(s.node).node,
      base: s.secondaryDisk!.node,
      active: true,
      autoComplete: true,
      onError: 'report',
      onComplete: (e) => {
        void this.failoverDone(s, e).catch((x: unknown) => this.recordError(s, toBlockError(x).errno));
      },
    });
  }

  private async failoverDone(s: ReplicationState, e: Error | null): Promise<void> {
    s.commitJob = null;
    if (!e) {
      // The backup job's cancel recorded an error; the finished failover clears it.
      s.error = 0;
      this.setStage(s, 'done');
      // The chain is collapsed into the secondary disk, which is the node's file now.
      await this.dropDisks(s);
    } else {
      this.setStage(s, 'failover-failed');
      this.recordError(s, 'EIO');
    }
  }

  /** Waits for a failover in progress to end (tests, and quit). */
  async waitFailover(s: ReplicationState): Promise<void> {
    const job = s.commitJob;
    if (job) await job.whenConcluded();
  }

  async close(s: ReplicationState): Promise<void> {
    if (s.stage === 'running') await this.stop(s, false).catch(() => {});
    if (s.stage === 'failover' && s.commitJob) {
      const job = s.commitJob;
      await job.cancel(true);
      await job.whenConcluded();
    }
    this.unregister(s);
  }
}

function info(s: ReplicationState): ReplicationInfo {
  const i: ReplicationInfo = { 'node-name': s.node.nodeName, mode: s.mode, stage: s.stage };
  if (s.error) i.error = errnoText(s.error);
  return i;
}

/** 0: go ahead; 1: the failover-failed write path; an errno: fail the request with it. */
function ioStatus(s: ReplicationState): 0 | 1 | Errno {
  switch (s.stage) {
    case 'none':
      return 'EIO';
    case 'running':
      return 0;
    case 'failover':
    case 'done':
      return s.mode === 'primary' ? 'EIO' : 0;
    case 'failover-failed':
      return s.mode === 'primary' ? 'EIO' : 1;
  }
}

function ioError(errno: Errno): BlockError {
  return new BlockError(errnoText(errno), { errno });
}

function makeDriver(mgr: ReplicationManager): BlockDriver {
  /** Primary mode records a failed forward and tells the guest it worked. */
  async function returnValue(s: ReplicationState, op: () => Promise<void>): Promise<void> {
    if (s.mode === 'secondary') return op();
    try {
      await op();
    } catch (e) {
      mgr.recordError(s, toBlockError(e).errno);
    }
  }

  /** After a failed failover: blocks active or hidden hold go to active, others to the secondary disk. */
  async function failoverFailedWrite(
    s: ReplicationState,
    offset: number,
    bytes: number,
    iov: IoVec,
  ): Promise<void> {
    const top = file(s.node);
    const base = s.secondaryDisk!;
    let done = 0;
    while (done < bytes) {
      const a = await isAllocatedAbove(top.node, base.node, false, offset + done, bytes - done);
      const part = iovSlice(iov, done, a.bytes);
      await (a.allocated ? top : base).write(offset + done, part);
      done += a.bytes;
    }
  }

  return {
    name: 'replication',
    isFilter: true,
    options: {
      file: opt.child('The protected node (primary: an NBD client; secondary: the active disk)', {
        required: true,
      }),
      mode: opt.enum(['primary', 'secondary'], 'Which side of the pair this node is', { required: true }),
      'top-id': opt.string('Secondary: the root node (or device) above this node'),
    },
    supportedWriteFlags: 0,

    async open(node, opts, ctx) {
      await ctx.openChild('file', opts.file, ChildRole.FILTERED | ChildRole.PRIMARY);
      // The schema has checked mode (required, primary or secondary) before open.
      const mode = opts.mode as ReplicationMode;
      const topId = opts['top-id'] as string | undefined;
      if (mode === 'primary') {
        if (topId !== undefined) throw err('The primary side does not support option top-id');
      } else if (topId === undefined) throw err('Missing the option top-id');
      const s: ReplicationState = {
        node,
        mode,
        stage: 'none',
        topId: mode === 'secondary' ? topId : undefined,
        hiddenDisk: null,
        secondaryDisk: null,
        backupJob: null,
        commitJob: null,
        blocker: null,
        origHiddenReadOnly: false,
        origSecondaryReadOnly: false,
        error: 0,
        backupCleanup: Promise.resolve(),
        stopping: false,
      };
      node.opaque = s;
      mgr.register(s);
    },

    async close(node) {
      await mgr.close(st(node));
    },

    childPerm(node, child) {
      // The file child is read through; the hidden and secondary disks are only written.
      let perm: number = child.role & ChildRole.PRIMARY ? Perm.CONSISTENT_READ : 0;
      if (!node.readOnly) perm |= Perm.WRITE;
      return [perm, Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED];
    },

    getLength: (node) => file(node).node.length,

    async read(node, offset, bytes, iov) {
      const s = st(node);
      // The primary only forwards writes.
      if (s.mode === 'primary') throw ioError('EIO');
      const status = ioStatus(s);
      if (typeof status === 'string') throw ioError(status);
      await returnValue(s, () => file(node).readv(offset, bytes, iov));
    },

    async write(node, offset, bytes, iov) {
      const s = st(node);
      const status = ioStatus(s);
      if (typeof status === 'string') throw ioError(status);
      if (status === 0) return returnValue(s, () => file(node).write(offset, iov));
      return failoverFailedWrite(s, offset, bytes, iov);
    },

    info(node) {
      return { ...info(st(node)) };
    },
  };
}

export { info as replicationInfo };
