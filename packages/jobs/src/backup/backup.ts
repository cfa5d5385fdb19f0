import {
  BlockError,
  type BlockNode,
  BlockOp,
  blockAllOps,
  blockStatus,
  blockStatusAbove,
  type DirtyBitmap,
  opBlocked,
  unblockAllOps,
  unblockOp,
} from '@blockrep/block';
import type { OnError } from '../block-error-policy';
import { BlockJob, type BlockJobOptions, setUpJob } from '../block-job';
import { Inflight } from '../inflight';
import type { JobManager } from '../manager';
import { CopyError } from './block-copy';
import { cbwDriver, cbwState } from './cbw';

export type BackupSync = 'none' | 'full' | 'top' | 'incremental' | 'bitmap';

export interface BackupOptions extends BlockJobOptions {
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  /** For sync=incremental/bitmap: the bitmap whose dirty extents are copied. */
  bitmap?: DirtyBitmap;
  /** When the bitmap is cleared: on-success (default), never, always. */
  bitmapMode?: 'on-success' | 'never' | 'always';
  onSourceError?: OnError;
  onTargetError?: OnError;
  /** Node name of the copy-before-write filter (default: automatic). */
  filterNodeName?: string;
  /** Called once when the job ends, with its error or null (internal users: replication). */
  onComplete?: (err: Error | null) => void;
  /** Called when a copy-before-write fails (the guest write fails with it). */
  onCopyError?: (err: Error) => void;
}

const CHUNK = 1 << 20;
/** Chunks copied at once by the background copy. */
const INFLIGHT = 8;

/**
 * The backup job (QEMU's blockdev-backup): a copy-before-write filter goes above the source for
 * the job's life, so the target receives the source's point-in-time contents; sync=full/top/
 * incremental also copy in the background, sync=none only what writes are about to overwrite.
 */
export class BackupJob extends BlockJob {
  readonly type = 'backup';
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly sync: BackupSync;
  filter: BlockNode | null = null;
  private readonly opts: BackupOptions;
  private readonly blocker: Error;
  private bitmapSnapshot: DirtyBitmap | null = null;

  constructor(manager: JobManager, opts: BackupOptions) {
    super(manager, opts);
    this.opts = opts;
    this.source = opts.source;
    this.target = opts.target;
    this.sync = opts.sync;
    this.blocker = new Error(`block device is in use by block job: ${this.type}`);
  }

  /** Inserts the filter and takes the nodes; on failure nothing stays changed. */
  async setup(): Promise<void> {
    const filter = await this.insertFilter(
      this.source,
      cbwDriver,
      { file: this.source.nodeName, target: this.target.nodeName },
      this.opts.filterNodeName,
      (f) => {
        this.useNode(f, { perm: 0, allowDrainedIo: true });
        this.useNode(this.target, { perm: 0, allowDrainedIo: true });
      },
    );
    this.filter = filter;
    for (const n of [filter, this.target]) {
      blockAllOps(n, this.blocker);
      unblockOp(n, BlockOp.DATAPLANE, this.blocker);
    }
    const bcs = cbwState(filter).bcs;
    cbwState(filter).onCopyError = this.opts.onCopyError ?? null;
    this.progressSetRemaining(bcs.length);
    await this.initBitmap();
  }

  /** Which clusters the background copy visits (the copy bitmap starts all set). */
  private async initBitmap(): Promise<void> {
    const bcs = cbwState(this.filter!).bcs;
    if (this.sync === 'top') {
      // Only what the source's own layer holds (any cluster an allocation touches).
      bcs.bitmap.clear();
      for (let off = 0; off < bcs.length; ) {
        const st = await blockStatus(this.source, off, bcs.length - off);
        if (st.bytes <= 0) break;
        if (st.allocated) bcs.bitmap.set(off, st.bytes);
        off += st.bytes;
      }
    } else if (this.sync === 'incremental' || this.sync === 'bitmap') {
      const bm = this.opts.bitmap!;
      // Writes during the job mark the user's bitmap afresh; the frozen copy is what we copy.
      this.bitmapSnapshot = bm.copy();
      if (this.opts.bitmapMode !== 'never') bm.clear();
      bcs.bitmap.clear();
      bcs.bitmap.merge(this.bitmapSnapshot);
    }
    if (this.sync !== 'none') {
      this.progressSetRemaining(bcs.bitmap.count());
      bcs.onCopied = (n) => this.progressUpdate(n);
    }
  }

  /** replication's checkpoint: forget which clusters were copied (sync=none only). */
  doCheckpoint(): void {
    if (this.sync !== 'none') {
      throw new BlockError('The backup job only supports block checkpoint in sync=none mode');
    }
    cbwState(this.filter!).bcs.resetAll();
  }

  protected async run(): Promise<void> {
    if (this.sync === 'none') {
      while (!this.isCancelled) await this.yieldUntilEntered();
      return;
    }
    const bcs = cbwState(this.filter!).bcs;
    const inflight = new Inflight<{ offset: number; len: number; error: unknown }>(INFLIGHT);
    const handleFailures = async () => {
      for (const r of inflight.take()) if (r.error) await this.copyFailed(r.offset, r.len, r.error, inflight);
    };
    let cursor = 0;
    for (;;) {
      // Failed copies come back here, where the error policy (and pausing) can act on them.
      await handleFailures();
      if (this.isCancelled) break;
      const next = bcs.bitmap.nextDirty(cursor);
      if (next < 0) {
        // The end of a pass: done once nothing is in flight and nothing is left to copy.
        await inflight.drain();
        await handleFailures();
        if (this.isCancelled || bcs.bitmap.nextDirty(0) < 0) break;
        cursor = 0;
        continue;
      }
      const len = Math.min(CHUNK, bcs.length - next);
      cursor = next + len;
      if (this.shouldPause) await inflight.drain();
      await this.pausePoint();
      if (this.isCancelled) break;
      await inflight.room();
      inflight.add(async () => {
        try {
          await this.copyChunk(next, len);
          return { offset: next, len, error: null };
        } catch (e) {
          return { offset: next, len, error: e };
        }
      });
      await this.rateLimit(len);
    }
    await inflight.drain();
  }

  /** Copies one chunk: skipped when full backup finds zeroes on both sides. */
  private async copyChunk(offset: number, len: number): Promise<void> {
    const bcs = cbwState(this.filter!).bcs;
    if (this.sync === 'full' && (await this.zeroInSourceAndTarget(offset, len))) {
      const unlock = await bcs.lockRange(offset, len);
      const skipped = bcs.dirtyBytes(offset, len);
      bcs.bitmap.reset(offset, len);
      unlock();
      this.progressUpdate(skipped);
      return;
    }
    await bcs.copy(offset, len);
  }

  /** A failed chunk: report (fail the job), ignore (skip it) or stop (pause, then retry). */
  private async copyFailed(
    offset: number,
    len: number,
    e: unknown,
    inflight: Inflight<unknown>,
  ): Promise<void> {
    if (!(e instanceof CopyError)) throw e;
    const bcs = cbwState(this.filter!).bcs;
    const policy = (e.isRead ? this.opts.onSourceError : this.opts.onTargetError) ?? 'report';
    const action = this.ioErrorAction(policy, e.error, e.isRead ? 'read' : 'write');
    if (action === 'report') {
      await inflight.drain();
      throw e.error;
    }
    if (action === 'ignore') {
      // Skip the extent: it stays uncopied in the target.
      const skipped = bcs.dirtyBytes(offset, len);
      bcs.bitmap.reset(offset, len);
      this.progressUpdate(skipped);
    } else {
      await inflight.drain();
      await this.pausePoint();
    }
  }

  /** Whether an extent reads as zeroes in the source and is already zero in the target. */
  private async zeroInSourceAndTarget(offset: number, bytes: number): Promise<boolean> {
    const s = await blockStatusAbove(this.filter!, null, offset, bytes);
    if (!s.zero || s.data || s.bytes < bytes) return false;
    const t = await blockStatusAbove(this.target, null, offset, bytes);
    return t.zero && !t.data && t.bytes >= bytes;
  }

  protected override async abort(): Promise<void> {
    // A failed incremental backup gives its bits back (bitmap-mode on-success).
    if (this.bitmapSnapshot && this.opts.bitmapMode !== 'always')
      this.opts.bitmap!.merge(this.bitmapSnapshot);
  }

  protected override async clean(): Promise<void> {
    if (this.opts.bitmap) this.opts.bitmap.busy = false;
    if (this.filter) {
      cbwState(this.filter).bcs.onCopied = null;
      cbwState(this.filter).onCopyError = null;
    }
    for (const n of [this.filter, this.target]) if (n) unblockAllOps(n, this.blocker);
    await this.releaseNodes();
    if (this.filter) {
      const filter = this.filter;
      this.filter = null;
      // A write still inside the filter (copying old data first) finishes before the filter
      // loses its parents and, with them, its permissions on the source.
      await this.removeFilter(filter);
    }
    this.opts.onComplete?.(this.err);
  }
}

/** blockdev-backup's checks, then a started backup job (internal jobs too). */
export async function startBackup(manager: JobManager, opts: BackupOptions): Promise<BackupJob> {
  const job = await prepareBackup(manager, opts);
  startPreparedBackup(job)();
  return job;
}

/**
 * A backup job created and set up (the filter in place, the bitmap taken) but not started: a
 * transaction starts it with startPreparedBackup once every action is prepared, or cancels it.
 */
export async function prepareBackup(manager: JobManager, opts: BackupOptions): Promise<BackupJob> {
  const { source, target } = opts;
  if (source === target) throw new BlockError('Source and target cannot be the same');
  const b1 = opBlocked(source, BlockOp.BACKUP_SOURCE);
  if (b1) throw b1;
  const b2 = opBlocked(target, BlockOp.BACKUP_TARGET);
  if (b2) throw b2;
  if ((opts.sync === 'incremental' || opts.sync === 'bitmap') && !opts.bitmap) {
    throw new BlockError(`must provide a valid bitmap name for '${opts.sync}' sync mode`);
  }
  if (opts.bitmap && opts.sync !== 'incremental' && opts.sync !== 'bitmap') {
    throw new BlockError(`a bitmap was given, but sync mode '${opts.sync}' does not use one`);
  }
  if (opts.bitmap?.busy) {
    throw new BlockError(
      opts.bitmapMode === 'never'
        ? 'Cannot create a successor for a bitmap that is in-use by an operation'
        : `Bitmap '${opts.bitmap.name}' is currently in use by another operation and cannot be used`,
    );
  }
  if (source.length !== target.length) throw new BlockError('Source and target image have different sizes');
  const job = new BackupJob(manager, opts);
  // The job owns the bitmap until it ends, as QEMU freezes it with a successor.
  await setUpJob(job, () => job.setup(), opts.bitmap);
  return job;
}

/**
 * Starts a prepared backup paused (running, then paused at once), as QEMU starts it inside the
 * drained section of its transaction; the returned function resumes it when that section ends.
 * The states users see: running, paused, running (for a transaction of several backups, every
 * job starts and pauses before any resumes).
 */
export function startPreparedBackup(job: BackupJob): () => void {
  job.pause();
  job.start();
  return () => job.resume();
}
