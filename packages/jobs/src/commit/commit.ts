import {
  addDirtyBitmap,
  type BlockBackend,
  BlockError,
  type BlockNode,
  BlockOp,
  BufferPool,
  blockAllOps,
  type DirtyBitmap,
  isAllocatedAbove,
  opBlocked,
  Perm,
  removeDirtyBitmap,
  unblockAllOps,
  unblockOp,
} from '@blockrep/block';
import type { OnError } from '../block-error-policy';
import { BlockJob, type BlockJobOptions, setUpJob } from '../block-job';
import { Inflight } from '../inflight';
import type { JobManager } from '../manager';
import { WriteBehind } from '../write-behind';

export interface CommitOptions extends BlockJobOptions {
  /** The device (root of the chain) block-commit was given; op blockers are checked on it. */
  device?: BlockNode;
  /** The top of the committed range (for an active commit: the active layer). */
  top: BlockNode;
  /** The node the data is committed into (below top in its backing chain). */
  base: BlockNode;
  onError?: OnError;
  /** Intermediate commit: the backing file name written into top's overlay (default: base's file name). */
  backingFile?: string;
  /** Active commit: complete as soon as READY (replication's failover). */
  autoComplete?: boolean;
  /** Called once when the job ends, with its error or null. */
  onComplete?: (err: Error | null) => void;
  /** Bytes committed (before READY) between two flushes of base started in the background (default 64 MiB, 0: none; write-behind.ts). */
  writeBehind?: number;
}

const CHUNK = 1 << 20;
/** Extents copied at once (QEMU's mirror keeps up to 16 MiB in flight). */
const INFLIGHT = 8;

interface CopyResult {
  offset: number;
  bytes: number;
  error: unknown;
  isRead: boolean;
}
const GRANULARITY = 65536;

/** The nodes of the chain from top down to (not including) base; throws if base is not below. */
export function chainBetween(top: BlockNode, base: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | null = top; n; n = n.filteredOrCow?.node ?? null) {
    if (n === base) return out;
    out.push(n);
  }
  throw new BlockError(`'${base.nodeName}' is not in the backing chain of '${top.nodeName}'`);
}

/** The node whose backing (or filtered) child is `node`, if any. */
function overlayOf(node: BlockNode): BlockNode | null {
  for (const p of node.parents) {
    if (p.parent.kind === 'node' && p.parent.filteredOrCow === p) return p.parent;
  }
  return null;
}

/**
 * Shared by both commit kinds: the nodes, the blockers, base reopened writable for the job, and
 * copying one extent of top's view into base with the error policy applied.
 */
abstract class CommitBase extends BlockJob {
  readonly type = 'commit';
  readonly top: BlockNode;
  readonly base: BlockNode;
  protected readonly opts: CommitOptions;
  protected topBlk!: BlockBackend;
  protected baseBlk!: BlockBackend;
  private readonly blocker: Error;
  private readonly buffers = new BufferPool(CHUNK);
  private baseWasReadOnly = false;
  private blockedNodes: BlockNode[] = [];
  /** Background flushes of base while the bulk of the data is copied (write-behind.ts). */
  protected readonly behind: WriteBehind;

  constructor(manager: JobManager, opts: CommitOptions) {
    super(manager, opts);
    this.opts = opts;
    this.top = opts.top;
    this.base = opts.base;
    this.blocker = new Error(`block device is in use by block job: ${this.type}`);
    this.behind = new WriteBehind(() => this.baseBlk.flush(), opts.writeBehind);
  }

  async setup(): Promise<void> {
    const g = this.top.graph;
    const chain = chainBetween(this.top, this.base);
    if (this.base.readOnly) {
      await g.reopenMultiple([{ node: this.base, readOnly: false }]);
      this.baseWasReadOnly = true;
    }
    try {
      this.topBlk = this.useNode(this.top, { perm: Perm.CONSISTENT_READ, allowDrainedIo: true });
      this.baseBlk = this.useNode(this.base, {
        // Resizing only when the base must grow to the top's length (as QEMU asks for it).
        perm: Perm.CONSISTENT_READ | Perm.WRITE | (this.base.length < this.top.length ? Perm.RESIZE : 0),
        allowDrainedIo: true,
        allowBeyondEof: true,
      });
    } catch (e) {
      await this.restoreBase();
      await this.releaseNodes();
      throw e;
    }
    this.blockedNodes = [...chain, this.base];
    for (const n of this.blockedNodes) {
      blockAllOps(n, this.blocker);
      unblockOp(n, BlockOp.DATAPLANE, this.blocker);
    }
  }

  private async restoreBase(): Promise<void> {
    if (!this.baseWasReadOnly || this.base.closed) return;
    this.baseWasReadOnly = false;
    // Still used for writing (an active commit pivoted onto it)? Then it stays writable.
    await this.base.graph.reopenMultiple([{ node: this.base, readOnly: true }]).catch(() => {});
  }

  /** Copies top's view of [offset, offset+bytes) into base; says which side failed, if one did. */
  protected async copy(offset: number, bytes: number): Promise<CopyResult> {
    let isRead = true;
    const whole = this.buffers.get();
    try {
      const buf = whole.subarray(0, bytes);
      await this.topBlk.readv(offset, [buf]);
      isRead = false;
      await this.baseBlk.write(offset, buf);
      if (!this.isReady) this.behind.wrote(bytes);
      return { offset, bytes, error: null, isRead };
    } catch (e) {
      return { offset, bytes, error: e, isRead };
    } finally {
      this.buffers.put(whole);
    }
  }

  /**
   * A failed copy under on-error: report fails the job, ignore drops the extent, stop pauses the
   * job until the user resumes it. Returns whether the extent should be copied again.
   */
  protected async copyFailed(r: CopyResult, inflight: Inflight<CopyResult>): Promise<boolean> {
    const action = this.ioErrorAction(this.opts.onError ?? 'report', r.error, r.isRead ? 'read' : 'write');
    if (action === 'report') {
      await inflight.drain();
      throw r.error;
    }
    if (action === 'ignore') return false;
    await inflight.drain();
    await this.pausePoint();
    return !this.isCancelled;
  }

  /** Grows base to top's length if it is shorter (QEMU resizes the base too). */
  protected async growBase(): Promise<void> {
    if (this.base.length < this.top.length) await this.baseBlk.truncate(this.top.length);
  }

  protected override async clean(): Promise<void> {
    for (const n of this.blockedNodes) unblockAllOps(n, this.blocker);
    this.blockedNodes = [];
    await this.behind.idle();
    await this.releaseNodes();
    await this.restoreBase();
    this.opts.onComplete?.(this.err);
  }
}

/** Intermediate commit: copy what top..(above base) hold into base, then drop those layers. */
export class CommitJob extends CommitBase {
  protected async run(): Promise<void> {
    await this.growBase();
    const len = this.top.length;
    this.progressSetRemaining(len);
    const inflight = new Inflight<CopyResult>(INFLIGHT);
    const retry: [number, number][] = [];
    const settle = async () => {
      for (const r of inflight.take()) {
        if (!r.error) continue;
        if (await this.copyFailed(r, inflight)) retry.push([r.offset, r.bytes]);
      }
    };
    for (let off = 0; off < len || retry.length; ) {
      await settle();
      if (this.shouldPause) await inflight.drain();
      await this.pausePoint();
      if (this.isCancelled) break;
      let start: number;
      let n: number;
      let allocated: boolean;
      const again = retry.shift();
      if (again) [start, n, allocated] = [again[0], again[1], true];
      else {
        start = off;
        const a = await isAllocatedAbove(this.top, this.base, false, off, Math.min(CHUNK, len - off));
        n = a.bytes;
        allocated = a.allocated;
        off += n;
        this.progressUpdate(n);
      }
      if (allocated) {
        await inflight.room();
        inflight.add(() => this.copy(start, n));
        await this.rateLimit(n);
      }
      if (off >= len && !retry.length) {
        await inflight.drain();
        await settle();
      }
    }
    await inflight.drain();
    await this.behind.settle();
    await this.baseBlk.flush();
  }

  /** The layers above base go out of the chain: top's overlay now backs onto base. */
  protected override async prepare(): Promise<void> {
    const overlay = overlayOf(this.top);
    if (!overlay) return;
    // The overlay's image names its new backing file, so QEMU (and we) open the shorter chain
    // even once the committed layers' files are gone.
    if (overlay.driver.changeBackingFile && !overlay.readOnly) {
      const format = this.base.driver.protocol ? undefined : this.base.driver.name;
      await overlay.driver.changeBackingFile(overlay, this.opts.backingFile ?? this.base.filename, format);
    }
    const edge = overlay.filteredOrCow!;
    const g = this.top.graph;
    g.update((tx) => tx.setChildNode(edge, this.base));
    await g.collectGarbage();
  }
}

/**
 * Active commit (mirror-style): copy everything above base, then keep copying what the guest
 * writes (a dirty bitmap on top) until converged: READY. job-complete pivots the parents of top
 * onto base; a cancel after READY leaves the chain as it was.
 */
export class ActiveCommitJob extends CommitBase {
  private dirty: DirtyBitmap | null = null;
  private shouldComplete = false;

  override async setup(): Promise<void> {
    await super.setup();
    this.dirty = addDirtyBitmap(this.top, { granularity: GRANULARITY });
  }

  protected override cancelRequest(force: boolean): boolean {
    return force || !this.isReady;
  }

  protected override complete(): void {
    this.shouldComplete = true;
    this.enter();
  }

  protected async run(): Promise<void> {
    const dirty = this.dirty!;
    await this.growBase();
    const len = this.top.length;
    // Everything above base counts as dirty at the start.
    for (let off = 0; off < len; ) {
      const a = await isAllocatedAbove(this.top, this.base, false, off, len - off);
      if (a.allocated) dirty.set(off, a.bytes);
      off += a.bytes;
    }
    this.progressSetRemaining(dirty.count());
    const inflight = new Inflight<CopyResult>(INFLIGHT);
    for (;;) {
      for (const r of inflight.take()) {
        if (!r.error) this.progressUpdate(r.bytes);
        else if (await this.copyFailed(r, inflight)) dirty.set(r.offset, r.bytes);
      }
      if (this.cancelRequested) break; // a hard cancel, or a soft one after READY
      if (this.shouldPause) await inflight.drain();
      await this.pausePoint();
      const next = dirty.nextDirty(0);
      if (next >= 0) {
        const end = dirty.nextClean(next);
        const n = Math.min(CHUNK, (end < 0 ? len : end) - next, len - next);
        // Clear first: a write that lands while we copy marks the range again.
        dirty.reset(next, n);
        await inflight.room();
        inflight.add(() => this.copy(next, n));
        await this.rateLimit(n);
        continue;
      }
      if (inflight.size) {
        await inflight.drain();
        continue;
      }
      this.progressSetRemaining(0);
      if (!this.isReady) {
        this.transitionToReady();
        if (this.opts.autoComplete) this.shouldComplete = true;
      }
      if (this.shouldComplete) break;
      await this.sleep(10);
      this.progressSetRemaining(dirty.count());
    }
    await inflight.drain();
  }

  /** With the guest quiesced: copy what is left, then move top's users onto base. */
  protected override async prepare(): Promise<void> {
    if (!this.shouldComplete) return;
    const g = this.top.graph;
    const dirty = this.dirty!;
    await g.drained(this.top, async () => {
      for (const [off, n] of [...dirty.dirtyExtents(0, this.top.length, CHUNK)]) {
        dirty.reset(off, n);
        const r = await this.copy(off, n);
        if (r.error) throw r.error;
      }
      await this.behind.settle();
      await this.baseBlk.flush();
      removeDirtyBitmap(this.top, dirty);
      this.dirty = null;
      await this.releaseNodes();
      await g.replaceNode(this.top, this.base);
    });
  }

  protected override async clean(): Promise<void> {
    if (this.dirty) removeDirtyBitmap(this.top, this.dirty);
    this.dirty = null;
    await super.clean();
  }
}

/** block-commit's checks, then a started commit job: active when top is the active layer. */
export async function startCommit(
  manager: JobManager,
  opts: CommitOptions & { active: boolean },
): Promise<CommitBase> {
  const { top, base } = opts;
  // Without a device (a caller inside the graph), an intermediate commit's overlay is top's parent.
  const device = opts.device ?? (opts.active ? top : undefined);
  // QEMU's checks: the device may be a commit source, every node from top down to base a commit
  // target (a backing file's blocker allows that), and for an intermediate commit top's overlay too.
  const b1 = device && opBlocked(device, BlockOp.COMMIT_SOURCE);
  if (b1) throw b1;
  if (top === base) throw new BlockError('cannot commit an image into itself');
  chainBetween(top, base);
  for (let n: BlockNode | null = top; n; n = n === base ? null : (n.filteredOrCow?.node ?? null)) {
    const b = opBlocked(n, BlockOp.COMMIT_TARGET);
    if (b) throw b;
  }
  if (!opts.active) {
    let overlay: BlockNode | null = device ?? null;
    while (overlay && overlay.filteredOrCow?.node !== top) overlay = overlay.filteredOrCow?.node ?? null;
    if (!device) {
      const p = top.parents.find((c) => c.parent.kind === 'node' && c.parent.filteredOrCow === c);
      overlay = p ? (p.parent as BlockNode) : null;
    }
    const b = overlay && opBlocked(overlay, BlockOp.COMMIT_TARGET);
    if (b) throw b;
  }
  const job = opts.active ? new ActiveCommitJob(manager, opts) : new CommitJob(manager, opts);
  await setUpJob(job, () => job.setup());
  job.start();
  return job;
}

export type { CommitBase };
