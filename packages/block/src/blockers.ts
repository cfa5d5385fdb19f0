import { BlockError } from './errors';
import type { BlockNode } from './node';

/** Operations that can be blocked on a node (QEMU's BlockOpType). */
export const BlockOp = {
  BACKUP_SOURCE: 'backup-source',
  BACKUP_TARGET: 'backup-target',
  CHANGE: 'change',
  COMMIT_SOURCE: 'commit-source',
  COMMIT_TARGET: 'commit-target',
  DATAPLANE: 'dataplane',
  DRIVE_DEL: 'drive-del',
  EJECT: 'eject',
  EXTERNAL_SNAPSHOT: 'external-snapshot',
  INTERNAL_SNAPSHOT: 'internal-snapshot',
  INTERNAL_SNAPSHOT_DELETE: 'internal-snapshot-delete',
  MIRROR_SOURCE: 'mirror-source',
  MIRROR_TARGET: 'mirror-target',
  RESIZE: 'resize',
  STREAM: 'stream',
  REPLACE: 'replace',
} as const;

export type BlockOpType = (typeof BlockOp)[keyof typeof BlockOp];
const ALL_OPS = Object.values(BlockOp);

/** Blocks one operation on the node for the given reason (several reasons may stack). */
export function blockOp(node: BlockNode, op: BlockOpType, reason: Error): void {
  let set = node.opBlockers.get(op);
  if (!set) {
    set = new Set();
    node.opBlockers.set(op, set);
  }
  set.add(reason);
}

export function unblockOp(node: BlockNode, op: BlockOpType, reason: Error): void {
  node.opBlockers.get(op)?.delete(reason);
}

/** Blocks every operation type with one reason. */
export function blockAllOps(node: BlockNode, reason: Error): void {
  for (const op of ALL_OPS) blockOp(node, op, reason);
}

export function unblockAllOps(node: BlockNode, reason: Error): void {
  for (const op of ALL_OPS) unblockOp(node, op, reason);
}

/** The error for a blocked operation ("Node 'x' is busy: <newest reason>"), or null when allowed. */
export function opBlocked(node: BlockNode, op: BlockOpType): BlockError | null {
  const reasons = node.opBlockers.get(op);
  if (!reasons || reasons.size === 0) return null;
  // The newest reason is the one reported (QEMU keeps blockers newest first).
  let newest: Error | undefined;
  for (const r of reasons) newest = r;
  return new BlockError(`Node '${node.nodeName}' is busy: ${newest!.message}`, { errno: 'EBUSY' });
}
