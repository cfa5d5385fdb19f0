import { statSync } from 'node:fs';
import { type BlockGraph, type BlockNode, ChildRole } from '@blockrep/block';
import { toQmpJson } from '../json';
import { opt, type QMembers, req, t } from '../schema';

/** QAPI's BlockdevCacheInfo, ImageInfo, BlockDirtyInfo and BlockDeviceInfo (the parts we fill). */
const BlockdevCacheInfo = t.object('BlockdevCacheInfo', {
  writeback: req(t.bool, 'Writes complete once in the host cache, before they are stable (always true)'),
  direct: req(t.bool, 'The host page cache is bypassed (O_DIRECT; always false)'),
  'no-flush': req(t.bool, 'Flush requests are ignored (the cache.no-flush option)'),
});

const ImageInfoMembers: QMembers = {
  filename: req(t.str, 'The image file name'),
  format: req(t.str, 'The driver of the node'),
  'dirty-flag': opt(t.bool, 'The image was not closed cleanly'),
  'actual-size': opt(t.int, 'Bytes the image occupies on the host'),
  'virtual-size': req(t.int, 'Size as seen by the guest, in bytes'),
  'cluster-size': opt(t.int, 'Cluster size of the image format, bytes (not reported)'),
  encrypted: opt(t.bool, 'The image is encrypted (not reported: blockrep has no encrypted images)'),
  compressed: opt(t.bool, 'The image is compressed (not reported)'),
  'backing-filename': opt(t.str, 'The file name of the backing node (json: form when it has options)'),
  'full-backing-filename': opt(t.str, 'The backing file name made absolute (not reported)'),
  'backing-filename-format': opt(t.str, "The backing file's format as the image names it (not reported)"),
  snapshots: opt(t.array(t.any), 'The internal snapshots of the image (not reported)'),
};
/** QAPI's ImageInfo; backing-image is an ImageInfo itself. */
export const ImageInfo = t.object('ImageInfo', ImageInfoMembers);
ImageInfoMembers['backing-image'] = opt(ImageInfo, 'ImageInfo of the backing image (not with flat)');
ImageInfoMembers['format-specific'] = opt(t.any, 'Driver-specific information');

export const BlockDirtyInfo = t.object('BlockDirtyInfo', {
  name: opt(t.str, 'The bitmap name'),
  count: req(t.int, 'Dirty bytes'),
  granularity: req(t.uint32, 'Bytes per bit'),
  recording: req(t.bool, 'Whether writes mark the bitmap (false once disabled)'),
  busy: req(t.bool, 'Whether an operation (a job, an export) uses the bitmap, so that it cannot be changed'),
  persistent: req(t.bool, 'Whether the bitmap is stored in the image when the node closes'),
  inconsistent: opt(
    t.bool,
    'Present (true) when a stored bitmap was not saved cleanly: it can only be removed',
  ),
});

export const BlockDeviceInfo = t.object('BlockDeviceInfo', {
  file: req(t.str, 'The file name of the node'),
  'node-name': opt(t.str, 'The node name'),
  ro: req(t.bool, 'Whether the node is read-only'),
  drv: req(t.str, 'The block driver of the node'),
  backing_file: opt(t.str, 'The file name of the backing node, if there is one'),
  backing_file_depth: req(t.int, 'How many backing images are below the node'),
  encrypted: req(t.bool, 'Whether the image is encrypted (always false)'),
  detect_zeroes: req(
    t.enum('BlockdevDetectZeroesOptions', ['off', 'on', 'unmap']),
    'Whether writes of zeroes become zero writes (on) or discards (unmap)',
  ),
  bps: req(t.int, 'Throughput limit, total bytes per second (always 0: blockrepd does not throttle nodes)'),
  bps_rd: req(t.int, 'Read throughput limit, bytes per second (always 0)'),
  bps_wr: req(t.int, 'Write throughput limit, bytes per second (always 0)'),
  iops: req(t.int, 'Request rate limit, total operations per second (always 0)'),
  iops_rd: req(t.int, 'Read request rate limit, operations per second (always 0)'),
  iops_wr: req(t.int, 'Write request rate limit, operations per second (always 0)'),
  image: req(ImageInfo, 'The image of the node, with its backing images unless flat'),
  bps_max: opt(t.int, 'Burst limit of total throughput, bytes per second (never reported)'),
  bps_rd_max: opt(t.int, 'Burst limit of read throughput, bytes per second (never reported)'),
  bps_wr_max: opt(t.int, 'Burst limit of write throughput, bytes per second (never reported)'),
  iops_max: opt(t.int, 'Burst limit of total operations per second (never reported)'),
  iops_rd_max: opt(t.int, 'Burst limit of read operations per second (never reported)'),
  iops_wr_max: opt(t.int, 'Burst limit of write operations per second (never reported)'),
  bps_max_length: opt(t.int, 'Seconds bps_max may last (never reported)'),
  bps_rd_max_length: opt(t.int, 'Seconds bps_rd_max may last (never reported)'),
  bps_wr_max_length: opt(t.int, 'Seconds bps_wr_max may last (never reported)'),
  iops_max_length: opt(t.int, 'Seconds iops_max may last (never reported)'),
  iops_rd_max_length: opt(t.int, 'Seconds iops_rd_max may last (never reported)'),
  iops_wr_max_length: opt(t.int, 'Seconds iops_wr_max may last (never reported)'),
  iops_size: opt(t.int, 'Bytes one operation counts as for the iops limits (never reported)'),
  group: opt(t.str, 'The throttle group of the node (never reported)'),
  cache: req(BlockdevCacheInfo, 'The cache mode of the node'),
  write_threshold: req(t.int, 'The offset set with block-set-write-threshold (0: none)'),
  'dirty-bitmaps': opt(t.array(BlockDirtyInfo), 'The dirty bitmaps of the node, if it has any'),
});

/** The node at the bottom of a node's file / filtered chain (where its data is). */
function storageLeaf(node: BlockNode): BlockNode {
  let n = node;
  for (;;) {
    const next = n.file ?? n.filtered;
    if (!next) return n;
    n = next.node;
  }
}

/** QEMU's bdrv_backing_overridden: the backing node is not the file the image names. */
function backingOverridden(node: BlockNode): boolean {
  const b = node.backing;
  return !!b && node.autoBackingFile !== null && node.autoBackingFile !== displayFilename(b.node);
}

/** Options that differ from the driver's defaults, children as nested objects (json: names). */
function explicitOptions(node: BlockNode): Record<string, unknown> {
  const out: Record<string, unknown> = { driver: node.driver.name };
  for (const [key, spec] of Object.entries(node.driver.options)) {
    const child = node.child(key);
    // The backing file is part of a node's options only where it is not the one its image names.
    if (child && child.role & ChildRole.COW && !backingOverridden(node)) continue;
    if (child) {
      out[key] = explicitOptions(child.node);
      continue;
    }
    const v = node.options[key];
    if (
      v !== undefined &&
      v !== spec.default &&
      spec.type.kind !== 'child' &&
      spec.type.kind !== 'children'
    ) {
      out[key] = v;
    }
  }
  return out;
}

/**
 * The file name QEMU shows: the path when the node's data sits in a plain file, otherwise a
 * `json:{...}` pseudo-filename of its options.
 */
export function displayFilename(node: BlockNode): string {
  const opts = explicitOptions(node);
  // Nothing set but what the plain name already says (a file's path, "null-co://"): use it.
  if (!hasSettings(opts) && !backingOverridden(node) && node.filename) return node.filename;
  return `json:${toQmpJson(opts)}`;
}

function hasSettings(opts: Record<string, unknown>): boolean {
  return Object.entries(opts).some(([k, v]) => {
    if (k === 'driver' || (k === 'filename' && opts.driver === 'file')) return false;
    return typeof v !== 'object' || v === null || hasSettings(v as Record<string, unknown>);
  });
}

function actualSize(node: BlockNode): number | undefined {
  const leaf = storageLeaf(node);
  if (leaf.driver.name !== 'file') return leaf.driver.protocol ? 0 : undefined;
  try {
    return statSync(leaf.filename).blocks * 512;
  } catch {
    return undefined;
  }
}

export function imageInfo(node: BlockNode, withBacking: boolean): Record<string, unknown> {
  const info: Record<string, unknown> = { filename: displayFilename(node), format: node.driver.name };
  // QEMU reports dirty-flag when bdrv_get_info answers: raw asks its file, null-co cannot.
  if (storageLeaf(node).driver.name !== 'null-co') info['dirty-flag'] = false;
  const actual = actualSize(node);
  if (actual !== undefined) info['actual-size'] = actual;
  info['virtual-size'] = node.length;
  // A driver's info() is its format-specific data (ImageInfoSpecific's `data`).
  const specific = node.driver.info?.(node);
  if (specific) info['format-specific'] = { type: node.driver.name, data: specific };
  const backing = node.backing?.node;
  if (backing) {
    info['backing-filename'] = displayFilename(backing);
    if (withBacking) info['backing-image'] = imageInfo(backing, true);
  }
  return info;
}

export function dirtyBitmapInfo(node: BlockNode): Record<string, unknown>[] {
  return [...node.dirtyBitmaps].reverse().map((b) => {
    const i: Record<string, unknown> = {
      name: b.name,
      recording: b.enabled,
      persistent: b.persistent,
      busy: b.busy,
      granularity: b.granularity,
      count: b.count(),
    };
    if (b.inconsistent) i.inconsistent = true;
    return i;
  });
}

/** BlockDeviceInfo of one node. */
export function blockDeviceInfo(node: BlockNode, flat: boolean): Record<string, unknown> {
  let depth = 0;
  for (let b = node.backing?.node; b; b = b.backing?.node) depth++;
  // Keys in QAPI's member order: QEMU's output order follows from it (see qdictOrder).
  const info: Record<string, unknown> = {
    file: displayFilename(node),
    'node-name': node.nodeName,
    ro: node.readOnly,
    drv: node.driver.name,
  };
  const backing = node.backing?.node;
  if (backing) info.backing_file = displayFilename(backing);
  Object.assign(info, {
    backing_file_depth: depth,
    encrypted: false,
    detect_zeroes: node.detectZeroes,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: imageInfo(node, !flat),
    cache: { writeback: true, direct: false, 'no-flush': node.noFlush },
    write_threshold: node.writeThreshold,
  });
  if (node.dirtyBitmaps.length) info['dirty-bitmaps'] = dirtyBitmapInfo(node);
  return info;
}

/**
 * Nodes in the order QEMU registers them: implicitly created children come before their parent
 * (QEMU names a node once its file is open), except backing files, which QEMU opens after.
 */
export function nodesInCreationOrder(graph: BlockGraph): BlockNode[] {
  const all = graph.allNodes();
  const index = new Map(all.map((n, i) => [n, i]));
  const out: BlockNode[] = [];
  const seen = new Set<BlockNode>();
  const visit = (n: BlockNode) => {
    if (seen.has(n)) return;
    seen.add(n);
    const implicit = n.children.filter(
      (c) => c.node.autoNamed && (index.get(c.node) ?? -1) > (index.get(n) ?? -1),
    );
    for (const c of implicit) if (!(c.role & ChildRole.COW)) visit(c.node);
    out.push(n);
    for (const c of implicit) if (c.role & ChildRole.COW) visit(c.node);
  };
  for (const n of all) visit(n);
  return out;
}
