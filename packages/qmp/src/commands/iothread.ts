import { BlockError, type BlockGraph } from '@blockrep/block';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import type { QomObjects } from './qom';

const StrOrNull = t.alternate('StrOrNull', [t.str, t.null], 'A string, or null');

/**
 * x-blockdev-set-iothread: QEMU moves a node (and what is connected to it) into an iothread's
 * AioContext. blockrepd runs every node on its one event loop, so after QEMU's checks (the node
 * exists, it is not in use by a BlockBackend unless forced, the iothread exists) nothing moves.
 */
export function registerIothreadCommand(r: CommandRegistry, graph: BlockGraph, objects: QomObjects): void {
  r.registerCommand({
    name: 'x-blockdev-set-iothread',
    args: t.object('q_obj_x-blockdev-set-iothread-arg', {
      'node-name': req(t.str, 'The node to move'),
      iothread: req(StrOrNull, 'The id of an iothread object, or null for the main loop'),
      force: opt(t.bool, 'Move a node a BlockBackend uses too'),
    }),
    features: ['unstable'],
    doc: "Assigns a node to an iothread (accepted after QEMU's checks; blockrepd runs all I/O on one event loop, so the node stays where it is).",
    examples: [{ args: { 'node-name': 'disk0', iothread: 'iothread0' } }],
    handler(a: { 'node-name': string; iothread: string | null; force?: boolean }) {
      const node = graph.getNode(a['node-name']);
      if (!node) throw new BlockError(`Failed to find node with node-name='${a['node-name']}'`);
      if (!a.force && node.hasBackend()) {
        throw new BlockError(
          `Node ${a['node-name']} is associated with a BlockBackend and could be in use (use force=true to override this check)`,
        );
      }
      if (a.iothread !== null) {
        const o = objects.root.children.get('objects')?.children.get(a.iothread);
        if (!o || !objects.isA(o.type.name, 'iothread'))
          throw new BlockError(`Cannot find iothread ${a.iothread}`);
      }
    },
  });
}
