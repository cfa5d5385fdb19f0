import {
  type BlockBackend,
  BlockError,
  type BlockNode,
  BlockOp,
  blockAllOps,
  isAllocatedAbove,
  opBlocked,
  Perm,
  unblockAllOps,
  unblockOp,
} from '@blockrep/block';
import type { OnError } from '../block-error-policy';
import { BlockJob, type BlockJobOptions, setUpJob } from '../block-job';
import { Inflight } from '../inflight';
import type { JobManager } from '../manager';

export interface StreamOptions extends BlockJobOptions {
  /** The node that receives the data (it keeps its users; its backing file changes at the end). */
  top: BlockNode;
  /** The node the streamed layers are read down to (excluded); null streams the whole chain. */
  base: BlockNode | null;
  /** The backing file name written into top's header (default: base's file name). */
  backingFile?: string;
  onError?: OnError;
}

/** Bytes examined and copied at once (QEMU streams 512 KiB at a time). */
const CHUNK = 512 * 1024;
/**
 * One copy at a time, as QEMU streams: the clusters top allocates then follow the guest's order
 * (with several in flight they land interleaved, and the image's map and later sequential reads
 * are fragmented; the differential test's map comparison caught it).
 */
const INFLIGHT = 1;

/** The nodes from top's backing file down to (not including) base: the layers that go away. */
function streamedLayers(top: BlockNode, base: BlockNode | null): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n = top.filteredOrCow?.node ?? null; n && n !== base; n = n.filteredOrCow?.node ?? null)
    out.push(n);
  return out;
}

/**
 * block-stream: what top's backing layers above base hold and top does not is copied into top
 * (copy-on-read, in serialising requests so no guest write in between is overwritten); then top
 * backs onto base, its header names base, and the streamed layers are dropped.
 */
export class StreamJob extends BlockJob {
  readonly type = 'stream';
  private topBlk!: BlockBackend;
  private readonly blocker = new Error('block device is in use by block job: stream');
  private blocked: BlockNode[] = [];
  private topWasReadOnly = false;

  constructor(
    manager: JobManager,
    private readonly opts: StreamOptions,
  ) {
    super(manager, opts);
  }

  async setup(): Promise<void> {
    const { top } = this.opts;
    if (top.readOnly) {
      await top.graph.reopenMultiple([{ node: top, readOnly: false }]);
      this.topWasReadOnly = true;
    }
    try {
      this.topBlk = this.useNode(top, {
        perm: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
        allowDrainedIo: true,
      });
    } catch (e) {
      await this.restoreTop();
      throw e;
    }
    // The layers being streamed are the job's until they go away (QEMU blocks them likewise).
    this.blocked = streamedLayers(top, this.opts.base);
    for (const n of this.blocked) {
      blockAllOps(n, this.blocker);
      unblockOp(n, BlockOp.DATAPLANE, this.blocker);
    }
  }

  private async restoreTop(): Promise<void> {
    if (!this.topWasReadOnly || this.opts.top.closed) return;
    this.topWasReadOnly = false;
    await this.opts.top.graph.reopenMultiple([{ node: this.opts.top, readOnly: true }]).catch(() => {});
  }

  protected async run(): Promise<void> {
    const { top, base } = this.opts;
    const backing = top.filteredOrCow?.node ?? null;
    // Nothing between top and base: the job ends at once, with no progress (as QEMU's).
    if (!backing || backing === base) return;
    const len = top.length;
    this.progressSetRemaining(len);
    const inflight = new Inflight<{ offset: number; bytes: number; error: unknown }>(INFLIGHT);
    const settle = async () => {
      for (const r of inflight.take()) {
        if (!r.error) continue;
        const action = this.ioErrorAction(this.opts.onError ?? 'report', r.error, 'read');
        if (action === 'ignore') continue;
        await inflight.drain();
        if (action === 'report') throw r.error;
        await this.pausePoint();
        // Stopped and resumed: the extent is copied again.
        inflight.add(() => this.copy(r.offset, r.bytes));
      }
    };
    for (let off = 0; off < len; ) {
      await settle();
      if (this.shouldPause) await inflight.drain();
      await this.pausePoint();
      if (this.isCancelled) break;
      const want = Math.min(CHUNK, len - off);
      // Held by top itself: nothing to do. Otherwise: does a streamed layer hold it?
      const own = await isAllocatedAbove(top, backing, false, off, want);
      let n = own.bytes;
      let copy = false;
      if (!own.allocated) {
        const above = await isAllocatedAbove(backing, base, false, off, n);
        n = above.bytes;
        copy = above.allocated;
      }
      if (copy) {
        const start = off;
        const bytes = n;
        await inflight.room();
        inflight.add(() => this.copy(start, bytes));
        await this.rateLimit(n);
      }
      off += n;
      this.progressUpdate(n);
    }
    await inflight.drain();
    await settle();
    await inflight.drain();
  }

  private async copy(
    offset: number,
    bytes: number,
  ): Promise<{ offset: number; bytes: number; error: unknown }> {
    try {
      await this.topBlk.copyOnRead(offset, bytes);
      return { offset, bytes, error: null };
    } catch (e) {
      return { offset, bytes, error: e };
    }
  }

  /** top backs onto base now: its header first (so a restart opens the short chain), then the graph. */
  protected override async prepare(): Promise<void> {
    const { top, base } = this.opts;
    const edge = top.backing;
    if (!edge) return;
    if (top.driver.changeBackingFile) {
      const format = base && !base.driver.protocol ? base.driver.name : undefined;
      await top.driver.changeBackingFile(
        top,
        base ? (this.opts.backingFile ?? base.filename) : undefined,
        format,
      );
    }
    const g = top.graph;
    await g.drained(top, async () => {
      if (base) g.update((tx) => tx.setChildNode(edge, base));
      else g.update((tx) => tx.removeChild(edge));
    });
    await g.collectGarbage();
  }

  protected override async clean(): Promise<void> {
    for (const n of this.blocked) unblockAllOps(n, this.blocker);
    this.blocked = [];
    await this.releaseNodes();
    await this.restoreTop();
  }
}

/** block-stream's checks after the arguments are resolved, then a started stream job. */
export async function startStream(manager: JobManager, opts: StreamOptions): Promise<StreamJob> {
  const { top, base } = opts;
  for (let n: BlockNode | null = top; n && n !== base; n = n.filteredOrCow?.node ?? null) {
    const b = opBlocked(n, BlockOp.STREAM);
    if (b) throw b;
  }
  if (!base && opts.backingFile !== undefined)
    throw new BlockError('backing file specified, but streaming the entire chain');
  const job = new StreamJob(manager, opts);
  await setUpJob(job, () => job.setup());
  job.start();
  return job;
}
