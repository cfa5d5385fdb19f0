import {
  type BlockChild,
  BlockError,
  type BlockGraph,
  type BlockNode,
  BlockOp,
  ChildRole,
  type Errno,
  errnoText,
  flushNode,
  opBlocked,
} from '@blockrep/block';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { createTargetImage, openByFilename } from './new-image';

/*
 * Backing chains over QMP: external snapshots (blockdev-snapshot, blockdev-snapshot-sync),
 * change-backing-file and block-set-write-threshold.
 */

/** One action of a transaction after its prepare: what finishing or undoing it takes. */
export interface PreparedAction {
  commit?(): Promise<void> | void;
  abort?(): Promise<void> | void;
  /** After commit or abort (a drained section ends here). */
  clean?(): Promise<void> | void;
}

export const NewImageMode = t.enum('NewImageMode', ['existing', 'absolute-paths']);

export const BlockdevSnapshot = t.object('BlockdevSnapshot', {
  node: req(t.str, 'The node (or device) that becomes the backing file of the overlay'),
  overlay: req(t.str, 'An existing node with no backing file and no users: the new active layer'),
});

export const BlockdevSnapshotSync = t.object('BlockdevSnapshotSync', {
  device: opt(t.str, 'The device whose active layer gets the overlay'),
  'node-name': opt(t.str, 'The node that gets the overlay (needs snapshot-node-name)'),
  'snapshot-file': req(t.str, 'The file of the new overlay'),
  'snapshot-node-name': opt(t.str, 'The node name of the new overlay (default: generated)'),
  format: opt(t.str, 'The overlay image format (default qcow2)'),
  mode: opt(
    NewImageMode,
    'absolute-paths (default): create the file, its backing file named by the absolute path of the node; existing: open the file as it is',
  ),
});

export interface BlockdevSnapshotArgs {
  node: string;
  overlay: string;
}

export interface BlockdevSnapshotSyncArgs {
  device?: string;
  'node-name'?: string;
  'snapshot-file': string;
  'snapshot-node-name'?: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/**
 * The prepare of an external snapshot (QEMU's order of checks): the node is flushed and stays
 * drained until clean; the overlay (opened from snapshot-file, or an existing node) gets it as
 * its backing file and takes its place under every parent. Commit reopens the old node read-only;
 * abort puts everything back and closes an overlay this action opened.
 */
export async function prepareExternalSnapshot(
  graph: BlockGraph,
  a:
    | { kind: 'blockdev-snapshot'; args: BlockdevSnapshotArgs }
    | { kind: 'sync'; args: BlockdevSnapshotSyncArgs },
): Promise<PreparedAction> {
  const old =
    a.kind === 'sync'
      ? graph.lookupBs(a.args.device, a.args['node-name'])
      : graph.lookupBs(a.args.node, a.args.node);
  const blocked = opBlocked(old, BlockOp.EXTERNAL_SNAPSHOT);
  if (blocked) throw blocked;
  await graph.drainBegin(old);
  let opened: BlockNode | null = null;
  let backing: BlockChild | null = null;
  const undo = async () => {
    if (backing) {
      const overlay = backing.parent as BlockNode;
      await graph.replaceNode(overlay, old, []);
      if (!opened) await graph.detachChild(backing);
    }
    if (opened) await graph.close(opened).catch(() => {});
    opened = null;
    backing = null;
  };
  try {
    if (!old.readOnly) {
      await flushNode(old).catch((e: unknown) => {
        throw new BlockError('An IO error has occurred', { cause: e });
      });
    }
    let overlay: BlockNode;
    if (a.kind === 'sync') {
      const s = a.args;
      const format = s.format ?? 'qcow2';
      if (s['node-name'] !== undefined && s['snapshot-node-name'] === undefined)
        throw new BlockError('New overlay node-name missing');
      const name = s['snapshot-node-name'];
      if (name !== undefined && (graph.getNode(name) || graph.backendByName(name)))
        throw new BlockError('New overlay node-name already in use');
      const file = s['snapshot-file'];
      if ((s.mode ?? 'absolute-paths') !== 'existing') {
        if (format !== 'qcow2')
          throw new BlockError(`Backing file not supported for file format '${format}'`);
        await createTargetImage(file, format, old.length, old);
      }
      opened = await openByFilename(graph, file, format, { nodeName: name, noBacking: true });
      // Its parents hold it, as QEMU's implicitly opened overlays: blockdev-del does not take it.
      opened.monitorOwned = false;
      overlay = opened;
    } else {
      overlay = graph.lookupBs(a.args.overlay, a.args.overlay);
    }
    if (overlay.parents.length > 0) throw new BlockError('The overlay is already in use');
    const overlayBlocked = opBlocked(overlay, BlockOp.EXTERNAL_SNAPSHOT);
    if (overlayBlocked) throw overlayBlocked;
    if (overlay.backing) throw new BlockError('The overlay already has a backing image');
    if (!overlay.driver.supportsBacking) throw new BlockError('The overlay does not support backing images');
    backing = graph.attachChild(overlay, old, 'backing', ChildRole.COW);
    await graph.replaceNode(old, overlay, [backing]);
  } catch (e) {
    await undo();
    graph.drainEnd(old);
    throw e;
  }
  return {
    async commit() {
      // The old active layer is only read from now on (QEMU does not fail the snapshot over it).
      if (!old.readOnly) await graph.reopenMultiple([{ node: old, readOnly: true }]).catch(() => {});
    },
    abort: undo,
    async clean() {
      graph.drainEnd(old);
      // An overlay this action opened lives only as long as something uses it (QEMU drops its
      // own reference here: a snapshot of a node nothing uses is closed again at once).
      if (opened) {
        graph.noteMaybeOrphan(opened);
        await graph.collectGarbage();
      }
    },
  };
}

/** Whether node is top or below it in its backing chain (QEMU's bdrv_chain_contains). */
export function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | null = top; n; n = n.filteredOrCow?.node ?? null) if (n === node) return true;
  return false;
}

/** Runs one prepared action to its end (a command outside a transaction). */
export async function runAlone(p: PreparedAction): Promise<void> {
  try {
    await p.commit?.();
  } finally {
    await p.clean?.();
  }
}

export function registerChainCommands(r: CommandRegistry, graph: BlockGraph): void {
  r.registerCommand({
    name: 'blockdev-snapshot',
    args: BlockdevSnapshot,
    doc: 'Puts an existing overlay node on top of a node: the overlay takes the node as its backing file and its place under every user.',
    examples: [{ args: { node: 'disk0', overlay: 'snap1' } }],
    async handler(a: BlockdevSnapshotArgs) {
      await runAlone(await prepareExternalSnapshot(graph, { kind: 'blockdev-snapshot', args: a }));
    },
  });

  r.registerCommand({
    name: 'blockdev-snapshot-sync',
    args: BlockdevSnapshotSync,
    doc: 'Creates (or opens) an image file and puts it on top of a node as blockdev-snapshot does.',
    examples: [
      {
        args: {
          'node-name': 'disk0',
          'snapshot-file': '/var/lib/images/disk0-snap1.qcow2',
          'snapshot-node-name': 'snap1',
          format: 'qcow2',
        },
      },
    ],
    async handler(a: BlockdevSnapshotSyncArgs) {
      await runAlone(await prepareExternalSnapshot(graph, { kind: 'sync', args: a }));
    },
  });

  r.registerCommand({
    name: 'change-backing-file',
    args: t.object('q_obj_change-backing-file-arg', {
      device: req(t.str, 'The device (or node) at the top of the chain'),
      'image-node-name': req(t.str, 'The node in that chain whose image header is changed'),
      'backing-file': req(t.str, 'The backing file name written into the header'),
    }),
    doc: "Writes a new backing file name into the header of an image in a device's chain; the graph stays as it is.",
    examples: [
      {
        args: { device: 'disk0', 'image-node-name': 'snap1', 'backing-file': '/var/lib/images/base0.qcow2' },
      },
    ],
    async handler(a: { device: string; 'image-node-name': string; 'backing-file': string }) {
      const top = graph.lookupBs(a.device, a.device);
      const image = graph.lookupBs(undefined, a['image-node-name']);
      if (!image.backing)
        throw new BlockError('not allowing backing file change on an image without a backing file');
      const blocked = opBlocked(top, BlockOp.CHANGE);
      if (blocked) throw blocked;
      if (!chainContains(top, image))
        throw new BlockError(`'${a.device}' and image file are not in the same chain`);
      const change = image.driver.changeBackingFile;
      if (!change) {
        throw new BlockError(
          `Could not change backing file to '${a['backing-file']}': ${errnoText('ENOTSUP')}`,
        );
      }
      // A read-only image is made writable for the header write, as QEMU reopens it.
      const wasReadOnly = image.readOnly;
      if (wasReadOnly) await graph.reopenMultiple([{ node: image, readOnly: false }]);
      try {
        await change(image, a['backing-file'], image.driver.name);
      } catch (e) {
        const errno = (e as { errno?: Errno }).errno ?? 'EIO';
        throw new BlockError(`Could not change backing file to '${a['backing-file']}': ${errnoText(errno)}`, {
          cause: e,
        });
      } finally {
        if (wasReadOnly) await graph.reopenMultiple([{ node: image, readOnly: true }]);
      }
    },
  });

  r.registerCommand({
    name: 'block-set-write-threshold',
    args: t.object('q_obj_block-set-write-threshold-arg', {
      'node-name': req(t.str, 'The node to watch'),
      'write-threshold': req(
        t.uint64,
        'The offset past which the first write raises BLOCK_WRITE_THRESHOLD (0: none)',
      ),
    }),
    doc: "Sets a node's write threshold: the first write or discard that reaches past it raises BLOCK_WRITE_THRESHOLD, and the threshold is cleared. Thin provisioning watches it to grow storage in time.",
    examples: [{ args: { 'node-name': 'disk0', 'write-threshold': 17179869184 } }],
    handler(a: { 'node-name': string; 'write-threshold': number }) {
      const node = graph.getNode(a['node-name']);
      if (!node) throw new BlockError(`Device '${a['node-name']}' not found`);
      node.writeThreshold = a['write-threshold'];
    },
  });

  r.registerEvent({
    name: 'BLOCK_WRITE_THRESHOLD',
    data: t.object('q_obj_BLOCK_WRITE_THRESHOLD-arg', {
      'node-name': req(t.str, 'The node whose threshold was passed'),
      'amount-exceeded': req(t.uint64, 'How far the write reached past the threshold, bytes'),
      'write-threshold': req(t.uint64, 'The threshold that was set'),
    }),
    doc: 'A write or discard reached past the write threshold of a node (the threshold is cleared).',
    examples: [{ data: { 'node-name': 'disk0', 'amount-exceeded': 65536, 'write-threshold': 17179869184 } }],
  });
}
