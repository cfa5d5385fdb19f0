import { BlockError, type BlockGraph } from '@blockrep/block';
import { type JobManager, JobTxn } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, type QObjectType, req, t } from '../schema';
import {
  BlockDirtyBitmap,
  BlockDirtyBitmapAdd,
  BlockDirtyBitmapMerge,
  prepareBitmapAdd,
  prepareBitmapClear,
  prepareBitmapEnable,
  prepareBitmapMerge,
  prepareBitmapRemove,
} from './bitmaps';
import { BlockdevBackup, DriveBackup, prepareBlockdevBackup, prepareDriveBackup } from './block-jobs';
import {
  BlockdevSnapshot,
  BlockdevSnapshotSync,
  type PreparedAction,
  prepareExternalSnapshot,
} from './chain';
import { BlockdevSnapshotInternal, prepareInternalSnapshot } from './snapshots';

/*
 * transaction: several actions all or none. Every action prepares in order (each does its change
 * and knows how to undo it); if one fails, the prepared ones abort in reverse order; otherwise all
 * commit. Then every prepared action cleans up (drained sections end, unused nodes close).
 */

type Prepare = (data: any, txn?: JobTxn) => PreparedAction | Promise<PreparedAction>;

const Abort = t.object('Abort', {});

/** The action kinds, their data types and how each prepares. */
function actionKinds(
  graph: BlockGraph,
  jobs: JobManager,
): Record<string, { type: QObjectType; prepare: Prepare }> {
  return {
    abort: {
      type: Abort,
      prepare: () => {
        throw new BlockError('Transaction aborted using Abort action');
      },
    },
    'block-dirty-bitmap-add': { type: BlockDirtyBitmapAdd, prepare: (a) => prepareBitmapAdd(graph, a) },
    'block-dirty-bitmap-remove': { type: BlockDirtyBitmap, prepare: (a) => prepareBitmapRemove(graph, a) },
    'block-dirty-bitmap-clear': { type: BlockDirtyBitmap, prepare: (a) => prepareBitmapClear(graph, a) },
    'block-dirty-bitmap-enable': {
      type: BlockDirtyBitmap,
      prepare: (a) => prepareBitmapEnable(graph, a, true),
    },
    'block-dirty-bitmap-disable': {
      type: BlockDirtyBitmap,
      prepare: (a) => prepareBitmapEnable(graph, a, false),
    },
    'block-dirty-bitmap-merge': { type: BlockDirtyBitmapMerge, prepare: (a) => prepareBitmapMerge(graph, a) },
    'blockdev-backup': {
      type: BlockdevBackup,
      prepare: (a, txn) => prepareBlockdevBackup(graph, jobs, a, undefined, txn),
    },
    'blockdev-snapshot': {
      type: BlockdevSnapshot,
      prepare: (a) => prepareExternalSnapshot(graph, { kind: 'blockdev-snapshot', args: a }),
    },
    'blockdev-snapshot-internal-sync': {
      type: BlockdevSnapshotInternal,
      prepare: (a) => prepareInternalSnapshot(graph, a),
    },
    'blockdev-snapshot-sync': {
      type: BlockdevSnapshotSync,
      prepare: (a) => prepareExternalSnapshot(graph, { kind: 'sync', args: a }),
    },
    'drive-backup': { type: DriveBackup, prepare: (a, txn) => prepareDriveBackup(graph, jobs, a, txn) },
  };
}

/** The actions QEMU lets into a grouped transaction: the job-starting ones (and abort). */
const GROUPABLE = new Set(['blockdev-backup', 'drive-backup', 'abort']);

export function registerTransactionCommand(r: CommandRegistry, graph: BlockGraph, jobs: JobManager): void {
  const kinds = actionKinds(graph, jobs);
  const names = Object.keys(kinds);
  const TransactionActionKind = t.enum('TransactionActionKind', names);
  const TransactionAction = t.union(
    'TransactionAction',
    { type: req(TransactionActionKind, 'The kind of action') },
    'type',
    () => Object.fromEntries(names.map((k) => [k, { data: req(kinds[k]!.type, 'The arguments') }])),
    'One action of a transaction: its type and its arguments (those of the command of that name) as data',
  );
  const ActionCompletionMode = t.enum('ActionCompletionMode', ['individual', 'grouped']);

  r.registerCommand({
    name: 'transaction',
    args: t.object('q_obj_transaction-arg', {
      actions: req(t.array(TransactionAction), 'The actions, prepared in this order'),
      properties: opt(
        t.object('TransactionProperties', {
          'completion-mode': opt(
            ActionCompletionMode,
            'individual (default): each job ends on its own; grouped: the jobs end together, and one failing cancels the others',
          ),
        }),
        'Properties of the whole transaction',
      ),
    }),
    doc: 'Runs block actions atomically: all of them happen, or (when one fails) none. Bitmap changes, snapshots (internal and external) and backups can be combined; the jobs start once every action succeeded.',
    examples: [
      {
        title: 'A bitmap started with an external snapshot',
        args: {
          actions: [
            { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'bitmap1' } },
            {
              type: 'blockdev-snapshot-sync',
              data: {
                'node-name': 'disk0',
                'snapshot-file': '/var/lib/images/disk0-snap1.qcow2',
                'snapshot-node-name': 'snap1',
              },
            },
          ],
        },
      },
      {
        title: 'Two backups that end together',
        args: {
          actions: [
            {
              type: 'blockdev-backup',
              data: { 'job-id': 'backup0', device: 'disk0', target: 'backup0', sync: 'full' },
            },
            {
              type: 'blockdev-backup',
              data: { 'job-id': 'backup1', device: 'disk1', target: 'backup1', sync: 'full' },
            },
          ],
          properties: { 'completion-mode': 'grouped' },
        },
      },
    ],
    async handler(a: {
      actions: { type: string; data: Record<string, unknown> }[];
      properties?: { 'completion-mode'?: 'individual' | 'grouped' };
    }) {
      const mode = a.properties?.['completion-mode'] ?? 'individual';
      // grouped: the jobs end together (all finalize once all are done; one failing cancels the rest).
      const txn = mode === 'grouped' ? new JobTxn() : undefined;
      const prepared: PreparedAction[] = [];
      try {
        for (const action of a.actions) {
          // Each action checks the mode as it prepares (QEMU's order: earlier actions are undone).
          if (mode !== 'individual' && !GROUPABLE.has(action.type))
            throw new BlockError(
              `Action '${action.type}' does not support Transaction property completion-mode = ${mode}`,
            );
          prepared.push(await kinds[action.type]!.prepare(action.data, txn));
        }
      } catch (e) {
        for (const p of [...prepared].reverse()) await p.abort?.();
        for (const p of prepared) await p.clean?.();
        throw e;
      }
      for (const p of prepared) await p.commit?.();
      for (const p of prepared) await p.clean?.();
    },
  });
}
