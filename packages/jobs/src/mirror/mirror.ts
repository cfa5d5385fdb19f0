import {
  type BlockBackend,
  BlockError,
  type BlockGraph,
  type BlockNode,
  BufferPool,
  blockStatusAbove,
  DirtyBitmap,
  type IoVec,
  isAllocatedAbove,
  PERM_ALL,
  Perm,
  ReqFlags,
} from '@blockrep/block';
import type { OnError } from '../block-error-policy';
import { BlockJob, type BlockJobOptions, setUpJob } from '../block-job';
import { Inflight } from '../inflight';
import type { JobManager } from '../manager';
import { WriteBehind } from '../write-behind';
import { type MirrorTopJob, mirrorTopDriver, setMirrorTopJob } from './mirror-top';

export type MirrorSync = 'full' | 'top' | 'none';
export type MirrorCopyMode = 'background' | 'write-blocking';

export interface MirrorOptions extends BlockJobOptions {
  /** The node whose users move onto the target on completion. */
  source: BlockNode;
  target: BlockNode;
  /** full: the whole image; top: what source's own layer holds; none: only what is written. */
  sync: MirrorSync;
  /** Bytes per dirty bit (a power of 2, 512 B .. 64 MiB; default from the target's cluster size). */
  granularity?: number;
  /** Bytes of copies in flight at once (default 16 MiB). */
  bufSize?: number;
  onSourceError?: OnError;
  onTargetError?: OnError;
  /** Zeroes in the source may become holes in the target (default true). */
  unmap?: boolean;
  copyMode?: MirrorCopyMode;
  /** Node name of the mirror_top filter (default: automatic). */
  filterNodeName?: string;
  /** The node the target takes the place of on completion (default: source). */
  replaces?: BlockNode;
  /** sync=full: zero the target first, then copy only what the source holds (default true). */
  zeroTarget?: boolean;
  /**
   * The job's working bitmap: only what it marks is copied, and each granule is cleared as it
   * reaches the target (a resync of what a peer missed). Its granularity is the job's. When the
   * job fails or is cancelled, what is still marked is what the target lacks.
   */
  bitmap?: DirtyBitmap;
  /** Complete as soon as READY. */
  autoComplete?: boolean;
  /** Bytes copied before READY between two flushes started in the background (default 64 MiB, 0: none; write-behind.ts). */
  writeBehind?: number;
  /** Called once when the job ends, with its error or null. */
  onComplete?: (err: Error | null) => void;
}

/** Copies at once (QEMU's MAX_IN_FLIGHT). */
const MAX_IN_FLIGHT = 16;
/** The largest single copy, unless buf-size / MAX_IN_FLIGHT is larger. */
const MAX_IO_BYTES = 1 << 20;
export const MIRROR_DEFAULT_BUF_SIZE = 16 << 20;
/** How often a busy job comes up for air, and how often a READY job looks for new dirt. */
const SLICE_MS = 100;

const alignDown = (v: number, a: number) => v - (v % a);
const alignUp = (v: number, a: number) => alignDown(v + a - 1, a);

/** The default granularity: the target's cluster size within 4 KiB .. 64 KiB (64 KiB without one). */
export function mirrorDefaultGranularity(target: BlockNode): number {
  const cluster = target.limits.optimalTransfer;
  if (!cluster || cluster & (cluster - 1)) return 65536;
  return Math.min(65536, Math.max(4096, cluster));
}

/**
 * Ranges claimed by copies in flight, so that a guest write in write-blocking mode and the job's
 * own copies never work on the same granule at once (QEMU's in_flight_bitmap and its waiters).
 */
class Claims {
  private readonly bits: DirtyBitmap;
  private waiters: (() => void)[] = [];

  constructor(length: number, granularity: number) {
    this.bits = new DirtyBitmap(Math.max(length, 1), granularity);
  }

  isClaimed(offset: number, bytes: number): boolean {
    return this.bits.nextDirty(offset, bytes) >= 0;
  }

  claim(offset: number, bytes: number): void {
    this.bits.set(offset, bytes);
  }

  release(offset: number, bytes: number): void {
    this.bits.reset(offset, bytes);
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  async waitFree(offset: number, bytes: number): Promise<void> {
    while (this.isClaimed(offset, bytes)) await new Promise<void>((r) => this.waiters.push(r));
  }
}

/**
 * The mirror job (QEMU's block/mirror.c): a mirror_top filter above the source records guest
 * writes in a dirty bitmap; the job copies dirty granules to the target with bounded bytes in
 * flight until both sides agree (READY), and keeps them agreeing until job-complete moves the
 * source's users onto the target, or a cancel after READY leaves the target a consistent copy.
 */
export class MirrorJob extends BlockJob implements MirrorTopJob {
  readonly type = 'mirror';
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly sync: MirrorSync;
  readonly granularity: number;
  readonly bufSize: number;
  filter: BlockNode | null = null;
  private readonly opts: MirrorOptions;
  private readonly maxIo: number;
  private readonly buffers: BufferPool;
  /** Granules the source and target may disagree on. */
  private readonly dirty: DirtyBitmap;
  private readonly claims: Claims;
  private readonly inflight = new Inflight<void>(MAX_IN_FLIGHT);
  private sourceBlk!: BlockBackend;
  private targetBlk!: BlockBackend;
  private bufFree: number;
  private bytesInFlight = 0;
  /** Where the next pass over the bitmap goes on from. */
  private cursor = 0;
  /** The first error a 'report' policy turned into the job's failure (QEMU's s->ret). */
  private failure: Error | null = null;
  private shouldComplete = false;
  /** Background flushes of the target before READY (write-behind.ts). */
  private readonly behind: WriteBehind;

  constructor(manager: JobManager, opts: MirrorOptions) {
    super(manager, opts);
    this.opts = opts;
    this.source = opts.source;
    this.target = opts.target;
    this.sync = opts.sync;
    this.granularity = opts.bitmap?.granularity ?? opts.granularity ?? mirrorDefaultGranularity(opts.target);
    this.bufSize = Math.max(opts.bufSize ?? MIRROR_DEFAULT_BUF_SIZE, this.granularity);
    this.maxIo = Math.max(Math.floor(this.bufSize / MAX_IN_FLIGHT), MAX_IO_BYTES);
    this.bufFree = this.bufSize;
    this.buffers = new BufferPool(this.maxIo, MAX_IN_FLIGHT);
    this.dirty = opts.bitmap ?? new DirtyBitmap(Math.max(this.source.length, 1), this.granularity);
    if (!opts.bitmap) this.dirty.clear();
    this.claims = new Claims(this.source.length, this.granularity);
    this.behind = new WriteBehind(() => this.targetBlk.flush(), opts.writeBehind);
  }

  private get graph(): BlockGraph {
    return this.source.graph;
  }

  get writeBlocking(): boolean {
    return this.opts.copyMode === 'write-blocking' && !this.failure && !this.isCancelled;
  }

  /** Inserts the filter and takes the nodes; on failure nothing stays changed. */
  async setup(): Promise<void> {
    const filter = await this.insertFilter(
      this.source,
      mirrorTopDriver,
      { backing: this.source.nodeName, 'read-only': this.source.readOnly },
      this.opts.filterNodeName,
      (f) => {
        this.sourceBlk = this.useNode(f, {
          perm: Perm.CONSISTENT_READ,
          shared: PERM_ALL & ~Perm.RESIZE,
          allowDrainedIo: true,
          blockOperations: true,
        });
        // Nobody else may read the target while it is being filled: it is consistent with nothing.
        this.targetBlk = this.useNode(this.target, {
          perm: Perm.WRITE,
          shared: Perm.WRITE_UNCHANGED,
          allowDrainedIo: true,
          blockOperations: true,
        });
      },
    );
    this.filter = filter;
    setMirrorTopJob(filter, this);
  }

  // ---- the filter's side (guest writes) ----

  markDirty(offset: number, bytes: number): void {
    this.dirty.set(offset, bytes);
  }

  async activeWrite(
    offset: number,
    bytes: number,
    write: () => Promise<void>,
    toTarget: () => Promise<void>,
  ): Promise<void> {
    const start = alignDown(offset, this.granularity);
    const end = alignUp(offset + bytes, this.granularity);
    await this.claims.waitFree(start, end - start);
    this.claims.claim(start, end - start);
    try {
      await write();
      if (!this.writeBlocking) {
        this.dirty.set(offset, bytes);
        return;
      }
      // Granules the write covers whole are now the same on both sides once it lands there;
      // partly covered ones keep whatever state they had.
      const a = alignUp(offset, this.granularity);
      const b = alignDown(offset + bytes, this.granularity);
      if (b > a) this.dirty.reset(a, b - a);
      this.progressIncreaseRemaining(bytes);
      try {
        await toTarget();
        this.progressUpdate(bytes);
      } catch (e) {
        this.dirty.set(offset, bytes);
        this.copyFailed(e, false);
      }
    } finally {
      this.claims.release(start, end - start);
    }
  }

  targetWrite(offset: number, iov: IoVec, flags: number): Promise<void> {
    return this.targetBlk.write(offset, iov, flags & ReqFlags.FUA);
  }

  targetZeroes(offset: number, bytes: number, flags: number): Promise<void> {
    return this.targetBlk.writeZeroes(offset, bytes, flags & (ReqFlags.FUA | ReqFlags.MAY_UNMAP));
  }

  targetDiscard(offset: number, bytes: number): Promise<void> {
    return this.targetBlk.discard(offset, bytes);
  }

  // ---- the job's side ----

  /** A failed copy under its side's policy: 'report' fails the job, 'stop' pauses it. */
  private copyFailed(e: unknown, isRead: boolean): void {
    const policy = (isRead ? this.opts.onSourceError : this.opts.onTargetError) ?? 'report';
    const action = this.ioErrorAction(policy, e, isRead ? 'read' : 'write');
    if (action === 'report' && !this.failure) this.failure = e instanceof Error ? e : new Error(String(e));
  }

  /** Whether zeroing the target is cheap (it may unmap): then zeroes are not copied. */
  private get targetZeroesCheaply(): boolean {
    const t = this.target;
    return t.discardUnmap && !t.readOnly && !!t.driver.writeZeroes;
  }

  /** Which granules start dirty (QEMU's mirror_dirty_init). */
  private async initDirty(len: number): Promise<void> {
    if (this.opts.bitmap || this.sync === 'none') return;
    let base: BlockNode | null = null;
    if (this.sync === 'full' && (this.opts.zeroTarget ?? true)) {
      if (!this.targetZeroesCheaply) {
        this.dirty.setAll();
        return;
      }
      for (let off = 0; off < len; off += this.maxIo) {
        const n = Math.min(this.maxIo, len - off);
        await this.inflight.room();
        this.inflight.add(() => this.zeroOp(off, n, false));
        await this.pausePoint();
      }
      await this.inflight.drain();
      if (this.failure) throw this.failure;
    } else if (this.sync === 'top') {
      base = this.source.filteredOrCow?.node ?? null;
    }
    for (let off = 0; off < len; ) {
      const a = await isAllocatedAbove(this.source, base, false, off, len - off);
      if (a.allocated) this.dirty.set(off, a.bytes);
      off += a.bytes;
      if (this.isCancelled) return;
    }
  }

  /** A copy of [offset, offset+bytes) from source to target; the range was claimed for it. */
  private async copyOp(offset: number, bytes: number): Promise<void> {
    const whole = this.buffers.get();
    const buf = whole.subarray(0, bytes);
    let isRead = true;
    try {
      await this.sourceBlk.readv(offset, [buf]);
      isRead = false;
      await this.targetBlk.write(offset, buf);
      this.progressUpdate(bytes);
      if (!this.isReady) this.behind.wrote(bytes);
    } catch (e) {
      this.dirty.set(offset, bytes);
      this.copyFailed(e, isRead);
    } finally {
      this.buffers.put(whole);
      this.bufFree += bytes;
      this.opDone(offset, bytes);
    }
  }

  /** Zeroes (or discards) [offset, offset+bytes) of the target; progress only for a copy's work. */
  private async zeroOp(offset: number, bytes: number, copying: boolean): Promise<void> {
    try {
      await this.targetBlk.writeZeroes(offset, bytes, this.opts.unmap === false ? 0 : ReqFlags.MAY_UNMAP);
      if (copying) this.progressUpdate(bytes);
    } catch (e) {
      if (copying) this.dirty.set(offset, bytes);
      this.copyFailed(e, false);
    } finally {
      if (copying) this.opDone(offset, bytes);
    }
  }

  private opDone(offset: number, bytes: number): void {
    this.bytesInFlight -= bytes;
    this.claims.release(offset, bytes);
  }

  /**
   * One pass step (QEMU's mirror_iteration): the next dirty granule and the dirty, unclaimed ones
   * after it, up to buf-size, are cleared and copied in pieces: data as copies, zeroes as zero
   * writes.
   */
  private async iteration(len: number): Promise<void> {
    let offset = this.dirty.nextDirty(this.cursor);
    if (offset < 0) offset = this.dirty.nextDirty(0);
    if (offset < 0) return;
    offset = alignDown(offset, this.granularity);
    // Someone (a write-blocking guest write) works on this granule: wait for it, then look again.
    if (this.claims.isClaimed(offset, 1)) {
      await this.claims.waitFree(offset, 1);
      return;
    }
    let chunks = 1;
    while (chunks * this.granularity < this.bufSize) {
      const next = offset + chunks * this.granularity;
      if (next >= len || !this.dirty.isDirty(next) || this.claims.isClaimed(next, 1)) break;
      chunks++;
    }
    const end = Math.min(len, offset + chunks * this.granularity);
    // Claimed and cleared at once: a guest write from here on marks the range again.
    this.claims.claim(offset, end - offset);
    this.dirty.reset(offset, end - offset);
    this.bytesInFlight += end - offset;
    this.cursor = end;
    while (offset < end) {
      const { bytes, method } = await this.pieceAt(offset, end);
      while (this.inflight.size >= MAX_IN_FLIGHT || (method === 'copy' && this.bufFree < bytes)) {
        await this.inflight.any();
      }
      if (this.failure || this.isCancelled) break;
      const o = offset;
      if (method === 'copy') {
        this.bufFree -= bytes;
        this.inflight.add(() => this.copyOp(o, bytes));
      } else {
        this.inflight.add(() => this.zeroOp(o, bytes, true));
      }
      offset += bytes;
      await this.rateLimit(method === 'copy' || !this.targetZeroesCheaply ? bytes : 0);
    }
    // What was claimed but not dispatched stays to be copied.
    if (offset < end) {
      this.dirty.set(offset, end - offset);
      this.opDone(offset, end - offset);
    }
  }

  /**
   * The next piece of [offset, end) and how to bring it over: data is copied (at most maxIo at
   * once), whole granules of zeroes become zero writes. A failed status query copies.
   */
  private async pieceAt(offset: number, end: number): Promise<{ bytes: number; method: 'copy' | 'zero' }> {
    let st: Awaited<ReturnType<typeof blockStatusAbove>> | null = null;
    try {
      st = await blockStatusAbove(this.source, null, offset, end - offset);
    } catch {
      // Copied as data: the read reports the error if there is one.
    }
    let bytes = !st
      ? Math.min(end - offset, this.maxIo)
      : st.data
        ? Math.min(st.bytes, this.maxIo)
        : st.bytes;
    bytes = alignDown(bytes, this.granularity);
    let method: 'copy' | 'zero' = 'copy';
    if (bytes < this.granularity) bytes = this.granularity;
    else if (st && !st.data && st.zero) method = 'zero';
    return { bytes: Math.min(bytes, end - offset), method };
  }

  protected override cancelRequest(force: boolean): boolean {
    return force || !this.isReady;
  }

  protected override complete(): void {
    this.shouldComplete = true;
    this.enter();
  }

  protected async run(): Promise<void> {
    const len = this.source.length;
    if (len === 0) {
      this.transitionToReady();
      while (!this.cancelRequested && !this.shouldComplete) await this.yieldUntilEntered();
      return;
    }
    await this.initDirty(len);
    let lastPause = performance.now();
    for (;;) {
      if (this.failure) break;
      if (this.shouldPause) await this.inflight.drain();
      await this.pausePoint();
      if (this.isCancelled || this.failure) break;
      let cnt = this.dirty.count();
      this.progressSetRemaining(this.bytesInFlight + cnt);
      // Come up for air at least once a slice, or when the source is clean.
      if (performance.now() - lastPause < SLICE_MS && this.ioStatus === 'ok') {
        if (
          this.inflight.size >= MAX_IN_FLIGHT ||
          this.bufFree === 0 ||
          (cnt === 0 && this.inflight.size > 0)
        ) {
          await this.inflight.any();
          continue;
        }
        if (cnt !== 0) {
          await this.iteration(len);
          continue;
        }
      }
      let complete = false;
      if (this.inflight.size === 0 && cnt === 0) {
        if (!this.isReady) {
          if (!(await this.flushTarget())) continue;
          // From here on a cancel leaves the target a consistent copy (a soft cancel).
          this.transitionToReady();
          if (this.opts.autoComplete) this.shouldComplete = true;
        }
        complete = this.shouldComplete || this.cancelRequested;
        cnt = this.dirty.count();
      }
      if (cnt === 0 && complete) break;
      const delay = this.isReady && !complete && this.inflight.size === 0 && cnt === 0 ? SLICE_MS : 0;
      await this.sleep(delay);
      lastPause = performance.now();
    }
    await this.inflight.drain();
    await this.behind.idle();
    if (this.failure) throw this.failure;
  }

  /**
   * Flushes the target; a failure (or a write-behind flush's since the last one) goes through the
   * target's error policy.
   */
  private async flushTarget(): Promise<boolean> {
    try {
      await this.behind.settle();
      await this.targetBlk.flush();
      return true;
    } catch (e) {
      this.copyFailed(e, false);
      return false;
    }
  }

  /**
   * With the source's users quiesced: copy what they wrote since the last pass, flush, and on
   * job-complete put the target in the place of the source (or of `replaces`). A cancel after
   * READY ends here too, without the pivot: the target is a copy of this moment.
   */
  protected override async prepare(): Promise<void> {
    const g = this.graph;
    const filter = this.filter!;
    await g.drained(filter, async () => {
      for (const [off, n] of [...this.dirty.dirtyExtents(0, this.source.length, this.maxIo)]) {
        this.dirty.reset(off, n);
        const whole = this.buffers.get();
        try {
          const buf = whole.subarray(0, n);
          await this.sourceBlk.readv(off, [buf]);
          await this.targetBlk.write(off, buf);
        } finally {
          this.buffers.put(whole);
        }
      }
      await this.targetBlk.flush();
      if (!this.shouldComplete) return;
      const toReplace = this.opts.replaces ?? this.source;
      if (toReplace.readOnly !== this.target.readOnly) {
        await g.reopenMultiple([{ node: this.target, readOnly: toReplace.readOnly }]);
      }
      // The job lets go of the target first: its users will take what the job did not share.
      setMirrorTopJob(filter, null);
      await this.releaseNodes();
      await g.replaceNode(toReplace, this.target);
    });
  }

  protected override async clean(): Promise<void> {
    if (this.opts.bitmap) this.opts.bitmap.busy = false;
    await this.behind.idle();
    await this.releaseNodes();
    const filter = this.filter;
    if (filter) {
      this.filter = null;
      setMirrorTopJob(filter, null);
      // The filter's users go back to what it filters: the source, or the target after a pivot.
      await this.removeFilter(filter);
    }
    this.opts.onComplete?.(this.err);
  }
}

/** The checks the job itself makes; QMP's checks of the arguments come before. */
export async function startMirror(manager: JobManager, opts: MirrorOptions): Promise<MirrorJob> {
  if (opts.source === opts.target) throw new BlockError("Can't mirror node into itself");
  if (opts.bitmap?.busy) {
    throw new BlockError(
      `Bitmap '${opts.bitmap.name}' is currently in use by another operation and cannot be used`,
    );
  }
  const job = new MirrorJob(manager, opts);
  await setUpJob(job, () => job.setup(), opts.bitmap);
  job.start();
  return job;
}
