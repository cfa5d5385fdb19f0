import { createHash } from 'node:crypto';
import {
  addDirtyBitmap,
  BlockError,
  type BlockGraph,
  type BlockNode,
  type DirtyBitmap,
  findDirtyBitmap,
  removeDirtyBitmap,
} from '@blockrep/block';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { type PreparedAction, runAlone } from './chain';

export const BlockDirtyBitmap = t.object('BlockDirtyBitmap', {
  node: req(t.str, 'Name of the node (or device) the bitmap is on'),
  name: req(t.str, 'Name of the bitmap'),
});

const BlockDirtyBitmapOrStr = t.alternate(
  'BlockDirtyBitmapOrStr',
  [t.str, BlockDirtyBitmap],
  'A bitmap on the target node by name, or a bitmap on any node',
);

export const BlockDirtyBitmapAdd = t.object('BlockDirtyBitmapAdd', {
  node: req(t.str, 'Name of the node (or device)'),
  name: req(t.str, 'Name of the new bitmap'),
  granularity: opt(t.uint32, 'Bytes per bit: a power of 2, at least 512 (default 65536)'),
  persistent: opt(
    t.bool,
    'Store the bitmap in the image (qcow2 v3): it survives a restart and QEMU reads it',
  ),
  disabled: opt(t.bool, 'Create the bitmap not recording (default false)'),
});

export const BlockDirtyBitmapMerge = t.object('BlockDirtyBitmapMerge', {
  node: req(t.str, 'Name of the node of the target bitmap'),
  target: req(t.str, 'The bitmap the others are merged into'),
  bitmaps: req(t.array(BlockDirtyBitmapOrStr), 'The bitmaps to merge in'),
});

/** QEMU's block_dirty_bitmap_lookup. */
function lookupBitmap(
  graph: BlockGraph,
  node: string,
  name: string,
): { node: BlockNode; bitmap: DirtyBitmap } {
  let n: BlockNode;
  try {
    n = graph.lookup(node);
  } catch {
    throw new BlockError(`Node '${node}' not found`);
  }
  const bitmap = findDirtyBitmap(n, name);
  if (!bitmap) throw new BlockError(`Dirty bitmap '${name}' not found`);
  return { node: n, bitmap };
}

/** QEMU's bdrv_dirty_bitmap_check with the default flags. */
function checkUsable(b: DirtyBitmap): void {
  if (b.busy)
    throw new BlockError(`Bitmap '${b.name}' is currently in use by another operation and cannot be used`);
  if (b.inconsistent) throw new BlockError(`Bitmap '${b.name}' is inconsistent and cannot be used`);
}

/** ORs source into target; bitmaps of different granularities merge extent by extent. */
function mergeInto(target: DirtyBitmap, source: DirtyBitmap): void {
  if (source.length !== target.length) {
    throw new BlockError(
      `Bitmaps are of different sizes (destination size is ${target.length}, source size is ${source.length}) and can't be merged`,
    );
  }
  if (source.granularity === target.granularity) {
    target.merge(source);
    return;
  }
  for (const [offset, bytes] of source.dirtyExtents()) target.set(offset, bytes);
}

export interface BitmapAddArgs {
  node: string;
  name: string;
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
}

export interface BitmapMergeArgs {
  node: string;
  target: string;
  bitmaps: (string | { node: string; name: string })[];
}

/*
 * Each bitmap command as a transaction action: the prepare does the change, abort undoes it (a
 * command alone is prepare + commit).
 */

export function prepareBitmapAdd(graph: BlockGraph, a: BitmapAddArgs): PreparedAction {
  const node = graph.lookup(a.node);
  if (a.name === '') throw new BlockError('Bitmap name cannot be empty');
  const g = a.granularity ?? 65536;
  if (g < 512 || (g & (g - 1)) !== 0) throw new BlockError('Granularity must be power of 2 and at least 512');
  if (a.persistent) {
    // The format says whether it can keep the bitmap (qcow2 v3 can), as QEMU asks it first.
    if (!node.driver.canStoreBitmap) {
      throw new BlockError(`Can't store persistent bitmaps to ${node.nodeName}: Operation not supported`);
    }
    node.driver.canStoreBitmap(node, a.name, g);
  }
  if (a.name.length > 1023) throw new BlockError(`Bitmap name too long: ${a.name}`);
  const b = addDirtyBitmap(node, { name: a.name, granularity: g });
  if (a.disabled) b.enabled = false;
  b.persistent = !!a.persistent;
  return { abort: () => removeDirtyBitmap(node, b) };
}

export function prepareBitmapRemove(graph: BlockGraph, a: { node: string; name: string }): PreparedAction {
  const { node, bitmap } = lookupBitmap(graph, a.node, a.name);
  if (bitmap.busy) {
    throw new BlockError(`Bitmap '${a.name}' is currently in use by another operation and cannot be used`);
  }
  const at = node.dirtyBitmaps.indexOf(bitmap);
  removeDirtyBitmap(node, bitmap);
  return {
    async commit() {
      if (bitmap.persistent) await node.driver.removePersistentBitmap?.(node, a.name);
    },
    abort: () => {
      node.dirtyBitmaps.splice(at, 0, bitmap);
    },
  };
}

export function prepareBitmapEnable(
  graph: BlockGraph,
  a: { node: string; name: string },
  enabled: boolean,
): PreparedAction {
  const { bitmap } = lookupBitmap(graph, a.node, a.name);
  checkUsable(bitmap);
  const was = bitmap.enabled;
  bitmap.enabled = enabled;
  return {
    abort: () => {
      bitmap.enabled = was;
    },
  };
}

/** Puts a bitmap's bits back as they were in `saved`. */
function restoreBits(bitmap: DirtyBitmap, saved: DirtyBitmap): void {
  bitmap.clear();
  bitmap.merge(saved);
}

export function prepareBitmapClear(graph: BlockGraph, a: { node: string; name: string }): PreparedAction {
  const { bitmap } = lookupBitmap(graph, a.node, a.name);
  checkUsable(bitmap);
  const saved = bitmap.copy();
  bitmap.clear();
  return { abort: () => restoreBits(bitmap, saved) };
}

export function prepareBitmapMerge(graph: BlockGraph, a: BitmapMergeArgs): PreparedAction {
  const { bitmap: target } = lookupBitmap(graph, a.node, a.target);
  checkUsable(target);
  const sources = a.bitmaps.map((s) =>
    typeof s === 'string'
      ? lookupBitmap(graph, a.node, s).bitmap
      : lookupBitmap(graph, s.node, s.name).bitmap,
  );
  // Merge into a copy first so that a failing source leaves the target untouched.
  const saved = target.copy();
  const scratch = target.copy();
  for (const s of sources) mergeInto(scratch, s);
  restoreBits(target, scratch);
  return { abort: () => restoreBits(target, saved) };
}

export function registerBitmapCommands(r: CommandRegistry, graph: BlockGraph): void {
  r.registerCommand({
    name: 'block-dirty-bitmap-add',
    args: BlockDirtyBitmapAdd,
    doc: 'Creates a dirty bitmap on a node: from then on every write through the node marks it.',
    examples: [{ args: { node: 'disk0', name: 'bitmap0', persistent: true } }],
    async handler(a: BitmapAddArgs) {
      await runAlone(prepareBitmapAdd(graph, a));
    },
  });

  r.registerCommand({
    name: 'block-dirty-bitmap-remove',
    args: BlockDirtyBitmap,
    doc: 'Deletes a dirty bitmap that no operation is using (a persistent one from the image too).',
    examples: [{ args: { node: 'disk0', name: 'bitmap0' } }],
    async handler(a: { node: string; name: string }) {
      await runAlone(prepareBitmapRemove(graph, a));
    },
  });

  for (const [name, enabled] of [
    ['block-dirty-bitmap-enable', true],
    ['block-dirty-bitmap-disable', false],
  ] as const) {
    r.registerCommand({
      name,
      args: BlockDirtyBitmap,
      doc: enabled
        ? 'Makes a dirty bitmap record writes again.'
        : 'Stops a dirty bitmap recording writes (its bits stay as they are).',
      examples: [{ args: { node: 'disk0', name: 'bitmap0' } }],
      async handler(a: { node: string; name: string }) {
        await runAlone(prepareBitmapEnable(graph, a, enabled));
      },
    });
  }

  r.registerCommand({
    name: 'block-dirty-bitmap-clear',
    args: BlockDirtyBitmap,
    doc: 'Marks every bit of a dirty bitmap clean.',
    examples: [{ args: { node: 'disk0', name: 'bitmap0' } }],
    async handler(a: { node: string; name: string }) {
      await runAlone(prepareBitmapClear(graph, a));
    },
  });

  r.registerCommand({
    name: 'block-dirty-bitmap-merge',
    args: BlockDirtyBitmapMerge,
    doc: 'ORs bitmaps into a target bitmap, all or nothing.',
    examples: [
      {
        args: { node: 'disk0', target: 'bitmap0', bitmaps: ['bitmap1', { node: 'disk1', name: 'bitmap2' }] },
      },
    ],
    async handler(a: BitmapMergeArgs) {
      await runAlone(prepareBitmapMerge(graph, a));
    },
  });

  r.registerCommand({
    name: 'x-debug-block-dirty-bitmap-sha256',
    args: BlockDirtyBitmap,
    returns: t.object('BlockDirtyBitmapSha256', {
      sha256: req(t.str, 'SHA-256 of the bitmap, hexadecimal'),
    }),
    features: ['unstable'],
    doc: "SHA-256 of a dirty bitmap's bits as QEMU hashes them: one bit per granule in 64-bit little-endian words (tests compare bitmaps with it).",
    examples: [
      {
        args: { node: 'disk0', name: 'bitmap0' },
        returns: { sha256: 'e5a00aa9991ac8a5ee3109844d84a55583bd20572ad3ffcd42792f3c36b183ad' },
      },
    ],
    handler(a: { node: string; name: string }) {
      const { bitmap } = lookupBitmap(graph, a.node, a.name);
      const bytes = Math.ceil(bitmap.size / 64) * 8;
      return { sha256: createHash('sha256').update(bitmap.toBytes(0, bytes)).digest('hex') };
    },
  });
}
