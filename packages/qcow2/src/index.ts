export { type BitmapDirEntry, openBitmaps } from './bitmaps';
export {
  changeRefcountWidth,
  changeRefcountWidthAt,
  checkQcow2Image,
  type Qcow2CheckOptions,
  type Qcow2CheckResult,
} from './check';
export { downgradeToV2, upgradeToV3 } from './compat';
export { createQcow2Image, type Qcow2CreateOptions } from './create';
export { qcow2Driver, qcow2FormatSpecific } from './driver';
export type { Qcow2Image } from './image';
export { type Qcow2Info, qcow2ImageInfo } from './info';
export {
  bitmapsSize,
  fullyAllocatedSize,
  type MeasuredBitmap,
  type Qcow2MeasureOptions,
  refcountMetadataSize,
} from './measure';
export {
  applySnapshot,
  type CreateSnapshotOptions,
  createSnapshot,
  deleteSnapshot,
  loadSnapshotReadOnly,
  type Qcow2Snapshot,
  readSnapshots,
} from './snapshot';
