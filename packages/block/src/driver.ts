import type { BlockGraph } from './graph';
import type { IoVec } from './iov';
import type { BlockChild, BlockNode } from './node';
import type { OptionSchema, Options } from './options';
import type { PermPair } from './perm';

/** Request flags (QEMU's BdrvRequestFlags, the ones we use). */
export const ReqFlags = {
  /** Force unit access: the data is on stable storage when the request completes. */
  FUA: 0x1,
  /** writeZeroes may deallocate (punch holes) instead of writing zeroes. */
  MAY_UNMAP: 0x2,
  /** writeZeroes must fail with ENOTSUP rather than fall back to writing zero buffers. */
  NO_FALLBACK: 0x4,
  /** The write does not change the data (copy-on-read, backup copying into the target). */
  WRITE_UNCHANGED: 0x8,
  /** Fail with ENOTSUP unless zeroing is fast (NBD's FAST_ZERO). */
  FAST_ZERO: 0x10,
  /** Serialise this request against every overlapping one (copy-before-write, copy-on-read). */
  SERIALISING: 0x20,
  /** Store the data compressed (whole clusters; qcow2): refused by drivers that cannot. */
  WRITE_COMPRESSED: 0x40,
} as const;

/** The allocation status of an extent (QEMU's BDRV_BLOCK_* flags, as fields). */
export interface BlockStatus {
  /** Length of the extent that has this status (> 0 unless at end of file). */
  bytes: number;
  /** The data is stored here (reads go to `file`). */
  data: boolean;
  /** The extent reads as zeroes. */
  zero: boolean;
  /** This node provides the content (as opposed to its backing chain). */
  allocated: boolean;
  /** Where the data is in `file`, when known. */
  offset?: number;
  file?: BlockNode;
  /** Ask `file` at `offset` for the precise data/zero status (formats that map 1:1, raw). */
  recurse?: boolean;
  /**
   * Data that may sit in a hole of `file` (QEMU's BDRV_BLOCK_RECURSE: metadata-preallocated
   * qcow2): `file` is asked whether it reads as zeroes there; it stays data either way.
   */
  recurseZero?: boolean;
  /** The extent reaches the end of the node. */
  eof?: boolean;
}

export interface BlockLimits {
  /** Requests are aligned to this (read-modify-write below it). */
  requestAlignment: number;
  /** Larger requests are split into pieces of at most this many bytes. */
  maxTransfer: number;
  /** Preferred transfer size (NBD advertises it). */
  optimalTransfer: number;
  /** Largest single writeZeroes/discard. */
  maxPwriteZeroes: number;
  maxPdiscard: number;
  pdiscardAlignment: number;
}

export interface OpenChildOptions {
  /** A missing reference is allowed (returns null) instead of an error. */
  optional?: boolean;
}

/** What a driver's open() gets besides its options: the graph, and a way to open children. */
export interface OpenContext {
  readonly graph: BlockGraph;
  /** The nodes being opened, outermost first, this one last (a driver can refuse a loop). */
  readonly opening: readonly BlockNode[];
  /** Opens a child (nested options, or a reference to an existing node by name) and attaches it. */
  openChild(name: string, ref: unknown, role: number, opts?: OpenChildOptions): Promise<BlockChild | null>;
}

export interface TruncateOptions {
  exact: boolean;
  prealloc: 'off' | 'metadata' | 'falloc' | 'full';
}

/** A reopen of one node: the new flags it will have once committed. */
export interface ReopenState {
  node: BlockNode;
  readOnly: boolean;
  /** Driver scratch space between prepare and commit/abort. */
  opaque?: unknown;
}

/**
 * A block driver: a table of operations. A capability the driver lacks is simply absent, and the
 * generic layer does alignment, splitting, tracking, permissions and fallbacks once for all.
 */
export interface BlockDriver {
  readonly name: string;
  /** A protocol driver talks to storage itself (file, nbd, null-co); errors say "Block protocol". */
  readonly protocol?: boolean;
  /** A filter passes I/O to one filtered child (quorum is not one; raw passes through but is a format). */
  readonly isFilter?: boolean;
  readonly supportsBacking?: boolean;
  /** Driver-specific options (the common ones are the graph's). */
  readonly options: OptionSchema;
  /** Write flags the driver handles natively; others are emulated (FUA = write + flush). */
  readonly supportedWriteFlags?: number;

  open(node: BlockNode, opts: Options, ctx: OpenContext): Promise<void>;
  close?(node: BlockNode): Promise<void>;
  /** Permissions the node takes/shares on a child given its parents' cumulative ones. */
  childPerm?(node: BlockNode, child: BlockChild, perm: number, shared: number): PermPair;
  /**
   * The node's cumulative permissions (its parents' union; what they share, intersected) after a
   * graph change, for drivers that publish them outside the process (the file driver's image
   * locks). May refuse with a BlockError, its own state unchanged; the change is then undone.
   */
  applyPerm?(node: BlockNode, perm: number, shared: number): void;
  /** Limits after open (defaults: alignment 1, unlimited transfers). */
  limits?(node: BlockNode): Partial<BlockLimits>;
  getLength(node: BlockNode): number | Promise<number>;
  /** query-blockstats' driver-specific member (the file driver: its discard counts). */
  statsSpecific?(node: BlockNode): Record<string, unknown>;
  /** Bytes the node takes on its storage (a file's allocated blocks); absent when unknown. */
  allocatedSize?(node: BlockNode): Promise<number>;

  read?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number): Promise<void>;
  write?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number): Promise<void>;
  /** Throw ENOTSUP to make the generic layer write zero buffers instead. */
  writeZeroes?(node: BlockNode, offset: number, bytes: number, flags: number): Promise<void>;
  discard?(node: BlockNode, offset: number, bytes: number): Promise<void>;
  /** Write out what the driver caches (metadata) to its children. */
  flushToOs?(node: BlockNode): Promise<void>;
  /** Make written data durable (fdatasync); skipped with cache.no-flush. */
  flushToDisk?(node: BlockNode): Promise<void>;
  /** Replaces the generic flush of the node and its children (quorum votes on the result). */
  flush?(node: BlockNode): Promise<void>;
  blockStatus?(node: BlockNode, offset: number, bytes: number): Promise<BlockStatus>;
  truncate?(node: BlockNode, length: number, opts: TruncateOptions): Promise<void>;
  /** Drop all data so the node reads as empty (through to its backing file). */
  makeEmpty?(node: BlockNode): Promise<void>;
  /** Record a new backing file name and format in the image (commit dropping layers). */
  changeBackingFile?(
    node: BlockNode,
    filename: string | undefined,
    format: string | undefined,
  ): Promise<void>;

  reopenPrepare?(state: ReopenState): Promise<void>;
  reopenCommit?(state: ReopenState): void;
  reopenAbort?(state: ReopenState): Promise<void> | void;

  /** x-blockdev-change: attach an existing node as a new child (quorum). */
  addChild?(node: BlockNode, child: BlockNode): void;
  /** x-blockdev-change: detach one child (quorum). */
  delChild?(node: BlockNode, child: BlockChild): void;

  /** A persistent bitmap may be added (block-dirty-bitmap-add persistent); throws why not. Absent: none can. */
  canStoreBitmap?(node: BlockNode, name: string, granularity: number): void;
  /** A persistent bitmap was removed from the node: drop it from the image too. */
  removePersistentBitmap?(node: BlockNode, name: string): Promise<void>;

  /** Format-specific information for query-named-block-nodes / info. */
  info?(node: BlockNode): Record<string, unknown> | undefined;
  /** The file name QEMU reports for the node (protocols: the path; formats: their file's). */
  filename?(node: BlockNode): string;
}
