import { IoStats } from './accounting';
import type { BlockBackend } from './backend';
import type { DirtyBitmap } from './dirty-bitmap';
import type { BlockDriver, BlockLimits, BlockStatus } from './driver';
import type { BlockGraph } from './graph';
import * as io from './io';
import { type IoVec, iovLength } from './iov';
import type { Options } from './options';
import { ChildRole, PERM_ALL } from './perm';
import type { TrackedRequest } from './tracking';

export type BlockParent = BlockNode | BlockBackend;

/** An edge parent -> child node, with the permissions the parent takes and shares on it. */
export class BlockChild {
  perm = 0;
  shared = PERM_ALL;
  /** The op blocker a backing edge puts on its node (see GraphTransaction). */
  backingBlocker: Error | undefined;

  constructor(
    readonly parent: BlockParent,
    public node: BlockNode,
    readonly name: string,
    readonly role: number,
  ) {}

  /** "node 'qcow2-0'", "block device 'drive0'": how errors name the parent. */
  parentDesc(): string {
    return this.parent.describe();
  }

  async read(offset: number, bytes: number, flags = 0): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    await io.readv(this, offset, bytes, [buf], flags);
    return buf;
  }

  readv(offset: number, bytes: number, iov: IoVec, flags = 0): Promise<void> {
    return io.readv(this, offset, bytes, iov, flags);
  }

  write(offset: number, data: Buffer | IoVec, flags = 0): Promise<void> {
    const iov = Buffer.isBuffer(data) ? [data] : data;
    return io.writev(this, offset, iovLength(iov), iov, flags);
  }

  writeZeroes(offset: number, bytes: number, flags = 0): Promise<void> {
    return io.writeZeroes(this, offset, bytes, flags);
  }

  discard(offset: number, bytes: number): Promise<void> {
    return io.discard(this, offset, bytes);
  }

  flush(): Promise<void> {
    return io.flush(this.node);
  }

  truncate(length: number, opts?: Partial<import('./driver').TruncateOptions>): Promise<void> {
    return io.truncate(this, length, opts);
  }

  blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return io.blockStatus(this.node, offset, bytes);
  }

  makeEmpty(): Promise<void> {
    return io.makeEmpty(this);
  }

  getLength(): number {
    return this.node.length;
  }
}

/** The open flags every node has, from the common options (or inherited from its parent). */
export interface NodeFlags {
  readOnly: boolean;
  autoReadOnly: boolean;
  /** discard=unmap: discards reach the driver (otherwise they are ignored). */
  discardUnmap: boolean;
  detectZeroes: 'off' | 'on' | 'unmap';
  noFlush: boolean;
  forceShare: boolean;
}

/** A node of the block graph (QEMU's BlockDriverState). */
export class BlockNode {
  readonly kind = 'node' as const;
  readonly children: BlockChild[] = [];
  readonly parents: BlockChild[] = [];
  /** The driver's private state. */
  opaque: any = undefined;
  /** Length in bytes, cached (grown by writes past the end, refreshed by truncate). */
  length = 0;
  limits: BlockLimits = {
    requestAlignment: 1,
    maxTransfer: 1 << 30,
    optimalTransfer: 0,
    maxPwriteZeroes: 1 << 30,
    maxPdiscard: 1 << 30,
    pdiscardAlignment: 1,
  };
  readOnly!: boolean;
  autoReadOnly!: boolean;
  discardUnmap!: boolean;
  detectZeroes!: NodeFlags['detectZeroes'];
  noFlush!: boolean;
  forceShare!: boolean;
  /** Added by blockdev-add (or opened directly): lives until blockdev-del, not only while used. */
  monitorOwned = false;
  /** References besides parents and the monitor (jobs, exports in setup, opens in progress). */
  extraRefs = 0;
  closed = false;

  // request tracking (see io.ts)
  inFlight = 0;
  /** Write-like requests finished (succeeded or not) since the node opened. */
  writeGen = 0;
  /** The end of the highest write-like request that succeeded (QEMU's wr_highest_offset). */
  wrHighestOffset = 0;
  /**
   * QEMU's auto_backing_file: the backing file name the node's image names, when its backing child
   * was not opened from that name (given by reference, attached later) or the name was rewritten;
   * null while the backing child is the one the header named. A backing child whose file name
   * differs from it is "overridden": the node's file name becomes a json: name that includes it.
   */
  autoBackingFile: string | null = null;
  /** Requests finished on the node, per operation (metrics; see accounting.ts). */
  readonly ioStats = new IoStats();
  /** block-set-write-threshold: the offset a write may not pass unannounced (0: none). */
  writeThreshold = 0;
  /** The writeGen at the beginning of the latest-begun flush that succeeded. */
  flushedGen = 0;
  readonly tracked = new Set<TrackedRequest>();
  serialising = 0;
  quiesceCounter = 0;

  readonly dirtyBitmaps: DirtyBitmap[] = [];
  /** Operation type -> the reasons it is blocked. */
  readonly opBlockers = new Map<string, Set<Error>>();

  constructor(
    readonly graph: BlockGraph,
    public driver: BlockDriver,
    public nodeName: string,
    readonly autoNamed: boolean,
    /** The options the node was opened with (validated, children as given). */
    public options: Options,
    flags: NodeFlags,
  ) {
    Object.assign(this, flags);
  }

  describe(): string {
    return `node '${this.nodeName}'`;
  }

  get refcnt(): number {
    return this.parents.length + (this.monitorOwned ? 1 : 0) + this.extraRefs;
  }

  child(name: string): BlockChild | null {
    return this.children.find((c) => c.name === name) ?? null;
  }

  get file(): BlockChild | null {
    return this.child('file');
  }

  get backing(): BlockChild | null {
    return this.children.find((c) => c.role & ChildRole.COW) ?? null;
  }

  /** The child a filter passes its I/O to (null unless the driver is a filter). */
  get filtered(): BlockChild | null {
    if (!this.driver.isFilter) return null;
    return this.children.find((c) => c.role & ChildRole.FILTERED) ?? null;
  }

  /** The next node down a backing chain: a filter's child or a format's backing. */
  get filteredOrCow(): BlockChild | null {
    return this.filtered ?? this.backing;
  }

  /** Cumulative permissions all parents take, and those all of them share. */
  cumulativePerm(): [perm: number, shared: number] {
    let perm = 0;
    let shared = PERM_ALL;
    for (const p of this.parents) {
      perm |= p.perm;
      shared &= p.shared;
    }
    return [perm, shared];
  }

  /** True when a BlockBackend is attached to this node (QEMU's bdrv_has_blk). */
  hasBackend(): boolean {
    return this.parents.some((p) => p.parent.kind === 'backend');
  }

  /** The file name QEMU would show for this node. */
  get filename(): string {
    if (this.driver.filename) return this.driver.filename(this);
    const f = this.file ?? this.filtered;
    return f ? f.node.filename : '';
  }
}
