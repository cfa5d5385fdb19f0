import {
  BlockError,
  type BlockGraph,
  type BlockNode,
  BlockOp,
  type BlockOpType,
  opBlocked,
} from '@blockrep/block';
import {
  createSnapshot,
  deleteSnapshot,
  type Qcow2Image,
  type Qcow2Snapshot,
  readSnapshots,
} from '@blockrep/qcow2';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { rootNode } from './block-jobs';
import { type PreparedAction, runAlone } from './chain';

/* Internal snapshots over QMP: blockdev-snapshot-internal-sync and its delete. */

const SnapshotInfo = t.object('SnapshotInfo', {
  id: req(t.str, 'Unique identifier of the snapshot'),
  name: req(t.str, 'Name of the snapshot'),
  'vm-state-size': req(t.int, 'Size of the VM state saved with it'),
  'date-sec': req(t.int, 'UTC date of the snapshot, seconds'),
  'date-nsec': req(t.int, 'Fractional part of the date, nanoseconds'),
  'vm-clock-sec': req(t.int, 'VM clock at the snapshot, seconds'),
  'vm-clock-nsec': req(t.int, 'Fractional part of the VM clock, nanoseconds'),
  icount: opt(t.int, 'Instruction count at the snapshot (absent when not recorded)'),
});

/** The qcow2 image of a device that can take internal snapshots, after QEMU's checks. */
function snapshotImage(
  graph: BlockGraph,
  device: string,
  op: BlockOpType,
): { node: BlockNode; img: Qcow2Image } {
  // Taking one needs a root node (QEMU's qmp_get_root_bs); deleting finds any node.
  const node = op === BlockOp.INTERNAL_SNAPSHOT ? rootNode(graph, device) : graph.lookupBs(device, device);
  const blocked = opBlocked(node, op);
  if (blocked) throw blocked;
  if (node.driver.name !== 'qcow2') {
    throw new BlockError(
      `Block format '${node.driver.name}' used by device '${device}' does not support internal snapshots`,
    );
  }
  return { node, img: node.opaque as Qcow2Image };
}

function info(s: Qcow2Snapshot) {
  const icount = s.extra.length >= 24 ? s.extra.readBigInt64BE(16) : -1n;
  return {
    id: s.id,
    name: s.name,
    'vm-state-size': s.extra.length >= 8 ? Number(s.extra.readBigUInt64BE(0)) : s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Number(s.vmClockNs / 1_000_000_000n),
    'vm-clock-nsec': Number(s.vmClockNs % 1_000_000_000n),
    ...(icount === -1n ? {} : { icount: Number(icount) }),
  };
}

export const BlockdevSnapshotInternal = t.object('BlockdevSnapshotInternal', {
  device: req(t.str, 'The node (or block backend) to snapshot'),
  name: req(t.str, 'Name of the new snapshot'),
});

/** Takes the snapshot; abort deletes it again (a transaction action). */
export async function prepareInternalSnapshot(
  graph: BlockGraph,
  a: { device: string; name: string },
): Promise<PreparedAction> {
  const { node, img } = snapshotImage(graph, a.device, BlockOp.INTERNAL_SNAPSHOT);
  if (node.readOnly) throw new BlockError(`Device '${a.device}' is read only`);
  if (!a.name) throw new BlockError('Name is empty');
  if ((await readSnapshots(img)).some((s) => s.name === a.name))
    throw new BlockError(`Snapshot with name '${a.name}' already exists on device '${a.device}'`);
  // As qemu-storage-daemon records it: no instruction count, and a VM clock that (without a
  // VM) runs with the host's real-time clock.
  const now = Date.now();
  await graph.drained(node, () =>
    createSnapshot(img, a.name, { now, vmClockNs: BigInt(now) * 1_000_000n, icount: -1n }),
  );
  return { abort: () => graph.drained(node, () => deleteSnapshot(img, a.name)) };
}

export function registerSnapshotCommands(r: CommandRegistry, graph: BlockGraph): void {
  r.registerCommand({
    name: 'blockdev-snapshot-internal-sync',
    args: BlockdevSnapshotInternal,
    doc: 'Takes an internal snapshot of a qcow2 node with its users quiesced.',
    examples: [{ args: { device: 'disk0', name: 'snap0' } }],
    async handler(a: { device: string; name: string }) {
      await runAlone(await prepareInternalSnapshot(graph, a));
    },
  });

  r.registerCommand({
    name: 'blockdev-snapshot-delete-internal-sync',
    args: t.object('q_obj_blockdev-snapshot-delete-internal-sync-arg', {
      device: req(t.str, 'The node (or block backend) holding the snapshot'),
      id: opt(t.str, 'The snapshot id'),
      name: opt(t.str, 'The snapshot name'),
    }),
    returns: SnapshotInfo,
    doc: 'Deletes an internal snapshot found by id and/or name (both must match when both are given).',
    examples: [
      {
        args: { device: 'disk0', name: 'snap0' },
        returns: {
          id: '1',
          name: 'snap0',
          'vm-state-size': 0,
          'date-sec': 1700000000,
          'date-nsec': 172000000,
          'vm-clock-sec': 1700000000,
          'vm-clock-nsec': 172000000,
        },
      },
    ],
    async handler(a: { device: string; id?: string; name?: string }) {
      const { node, img } = snapshotImage(graph, a.device, BlockOp.INTERNAL_SNAPSHOT_DELETE);
      if (a.id === undefined && a.name === undefined) throw new BlockError('Name or id must be provided');
      const sn = (await readSnapshots(img)).find(
        (s) => (a.id === undefined || s.id === a.id) && (a.name === undefined || s.name === a.name),
      );
      if (!sn) {
        throw new BlockError(
          `Snapshot with id '${a.id ?? 'null'}' and name '${a.name ?? 'null'}' does not exist on device '${a.device}'`,
        );
      }
      await graph.drained(node, () => deleteSnapshot(img, sn.id));
      return info(sn);
    },
  });
}
