import { BlockBackend, type BlockNode, createGraph, Perm } from '@blockrep/block';
import { qcow2Driver } from '../src/index';

export function qcowGraph() {
  return createGraph([qcow2Driver]);
}

/** Opens a qcow2 image file with a BlockBackend on it (read-write unless readOnly). */
export async function openQcow2(
  path: string,
  extra: Record<string, unknown> = {},
  readOnly = false,
): Promise<{ node: BlockNode; blk: BlockBackend; close: () => Promise<void> }> {
  const g = qcowGraph();
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: path }, 'read-only': readOnly, ...extra });
  const blk = new BlockBackend(g, { perm: readOnly ? Perm.CONSISTENT_READ : Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE });
  blk.attach(node);
  return {
    node,
    blk,
    close: async () => {
      await blk.detach();
      if (!node.closed) await g.close(node);
    },
  };
}
