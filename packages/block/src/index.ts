import type { BlockDriver } from './driver';
import { fileDriver } from './drivers/file/file';
import { nullDriver } from './drivers/null/null';
import { rawDriver } from './drivers/raw/raw';
import { BlockGraph } from './graph';

export { IO_OPS, IoLatency, type IoOp, IoStats, LATENCY_BUCKETS, setIoTiming } from './accounting';
export { type BackendDevOps, type BackendOptions, BlockBackend } from './backend';
export {
  BlockOp,
  type BlockOpType,
  blockAllOps,
  blockOp,
  opBlocked,
  unblockAllOps,
  unblockOp,
} from './blockers';
export { BufferPool } from './buffer-pool';
export { addDirtyBitmap, DirtyBitmap, findDirtyBitmap, removeDirtyBitmap } from './dirty-bitmap';
export {
  type BlockDriver,
  type BlockLimits,
  type BlockStatus,
  type OpenChildOptions,
  type OpenContext,
  type ReopenState,
  ReqFlags,
  type TruncateOptions,
} from './driver';
export { ImageLocks } from './drivers/file/locks';

import { addonMissing, sparse } from './drivers/file/sparse';

export { socketSendBuffer } from './drivers/file/sparse';
/**
 * Whether the native addon (image locking, sparse files) loaded, and why not: without it the
 * file driver refuses to open images with locking on (see BLOCKREP_LOCKING in the README).
 */
export const nativeAddon = (): { loaded: boolean; reason?: string } =>
  sparse.available ? { loaded: true } : { loaded: false, reason: addonMissing ?? 'not found' };
/** Reserves [offset, offset+bytes) of an open file on disk (fallocate; zeroes written where it cannot). */
export const allocateFileRange = (fd: number, offset: number, bytes: number): Promise<void> =>
  sparse.allocate(fd, offset, bytes);
export { BlockError, type Errno, type ErrorClass, errnoText, ioError, toBlockError } from './errors';
export { BlockGraph, COMMON_OPTIONS, GraphTransaction } from './graph';
export { blockStatus, blockStatusAbove, flush as flushNode, isAllocatedAbove } from './io';
export {
  type IoVec,
  iovCopyFrom,
  iovIsZero,
  iovLength,
  iovMemset,
  iovSlice,
  iovToBuffer,
  zeroBuffer,
} from './iov';
export { BlockChild, BlockNode, type BlockParent } from './node';
export {
  coerceValue,
  type OptionSchema,
  type OptionSpec,
  type Options,
  type OptionType,
  opt,
  parseKeyVal,
  parseOptionArg,
  parseSize,
  validateOptions,
} from './options';
export {
  ChildRole,
  cowChildPerm,
  defaultChildPerm,
  filterChildPerm,
  PERM_ALL,
  PERM_PASSTHROUGH,
  Perm,
  type PermPair,
  permNames,
  permQapiNames,
  storageChildPerm,
} from './perm';
export { Mutex, RangeLock } from './tracking';
export { fileDriver, nullDriver, rawDriver };

/** The drivers this package provides. */
export const builtinDrivers: BlockDriver[] = [fileDriver, nullDriver, rawDriver];

/** A graph with the built-in drivers plus any given ones. */
export function createGraph(extra: BlockDriver[] = []): BlockGraph {
  return new BlockGraph([...builtinDrivers, ...extra]);
}
