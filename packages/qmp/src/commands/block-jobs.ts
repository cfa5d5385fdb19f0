import { BlockError, type BlockGraph, type BlockNode, ChildRole, findDirtyBitmap } from '@blockrep/block';
import {
  type JobManager,
  type JobTxn,
  ON_ERROR_VALUES,
  prepareBackup,
  startCommit,
  startPreparedBackup,
  startStream,
} from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { chainContains, NewImageMode, type PreparedAction, runAlone } from './chain';
import { createTargetImage, fsError, openByFilename } from './new-image';

export const MirrorSyncMode = t.enum('MirrorSyncMode', ['top', 'full', 'none', 'incremental', 'bitmap']);
const BitmapSyncMode = t.enum('BitmapSyncMode', ['on-success', 'never', 'always']);
export const BlockdevOnError = t.enum('BlockdevOnError', ON_ERROR_VALUES);

/** The descriptions of the members every job-starting command has. */
export const JOB_DOCS = {
  onError:
    'What to do when a request fails: report (default: the job fails), ignore it, stop (pause ' +
    'the job until it is resumed), enospc (stop on ENOSPC, report otherwise), auto (as report)',
  autoFinalize: 'Finalize on its own once done (default true); false: wait in PENDING for job-finalize',
  autoDismiss: 'Go away on its own once concluded (default true); false: stay until job-dismiss',
};

interface BackupArgs {
  'job-id'?: string;
  device: string;
  target: string;
  sync: 'top' | 'full' | 'none' | 'incremental' | 'bitmap';
  speed?: number;
  bitmap?: string;
  'bitmap-mode'?: 'on-success' | 'never' | 'always';
  compress?: boolean;
  'on-source-error'?: (typeof ON_ERROR_VALUES)[number];
  'on-target-error'?: (typeof ON_ERROR_VALUES)[number];
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
  'filter-node-name'?: string;
}

interface CommitArgs {
  'job-id'?: string;
  device: string;
  'base-node'?: string;
  base?: string;
  'top-node'?: string;
  top?: string;
  'backing-file'?: string;
  speed?: number;
  'on-error'?: (typeof ON_ERROR_VALUES)[number];
  'filter-node-name'?: string;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

interface StreamArgs {
  'job-id'?: string;
  device: string;
  base?: string;
  'base-node'?: string;
  bottom?: string;
  'backing-file'?: string;
  speed?: number;
  'on-error'?: (typeof ON_ERROR_VALUES)[number];
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

/** A node of top's chain by file name (block-commit's deprecated top/base). */
function chainNodeByFilename(top: BlockNode, filename: string): BlockNode | null {
  for (let n: BlockNode | null = top; n; n = n.filteredOrCow?.node ?? null)
    if (n.filename === filename) return n;
  return null;
}

/** The bottom of a backing chain. */
function chainBottom(top: BlockNode): BlockNode {
  let n = top;
  while (n.filteredOrCow) n = n.filteredOrCow.node;
  return n;
}

/**
 * A job's id when none is given: the name of the block device the job works on, as in QEMU; a
 * node name is no device name, so such a job gets '' and its creation fails ("Invalid job ID ''").
 */
export function defaultJobId(graph: BlockGraph, device: string): string {
  return graph.backendByName(device) ? device : '';
}

/** QEMU's qmp_get_root_bs: a device or node that no other node uses as a child. */
export function rootNode(graph: BlockGraph, device: string): BlockNode {
  const node = graph.lookupBs(device, device);
  if (node.parents.some((p) => p.parent.kind === 'node')) throw new BlockError('Need a root block node');
  return node;
}

export const BlockdevBackup = t.object('BlockdevBackup', {
  'job-id': opt(t.str, 'Job id (default: the device name when it names a block device)'),
  device: req(t.str, 'The source node (or device)'),
  target: req(t.str, 'The target node'),
  sync: req(MirrorSyncMode, 'What to copy: full, top, none (only what writes overwrite), incremental/bitmap'),
  speed: opt(t.int, 'Bytes per second (0: unlimited)'),
  bitmap: opt(t.str, 'The dirty bitmap for incremental/bitmap sync'),
  'bitmap-mode': opt(
    BitmapSyncMode,
    'What becomes of the bitmap: on-success (default) clears the copied bits if the job succeeds, ' +
      'always clears them even if it fails, never leaves the bitmap as it was',
  ),
  compress: opt(t.bool, 'Not supported'),
  'on-source-error': opt(BlockdevOnError, `Reading the source failed. ${JOB_DOCS.onError}`),
  'on-target-error': opt(BlockdevOnError, `Writing the target failed. ${JOB_DOCS.onError}`),
  'auto-finalize': opt(t.bool, JOB_DOCS.autoFinalize),
  'auto-dismiss': opt(t.bool, JOB_DOCS.autoDismiss),
  'filter-node-name': opt(t.str, 'Name of the copy-before-write filter node'),
  'x-perf': opt(t.any, 'Accepted for compatibility'),
});

export const DriveBackup = t.object('DriveBackup', {
  ...Object.fromEntries(Object.entries(BlockdevBackup.members).filter(([k]) => k !== 'target')),
  target: req(t.str, 'The image file to back up into'),
  format: opt(t.str, "The target's format (default: the source's; with mode existing: probed)"),
  mode: opt(NewImageMode, 'absolute-paths (default): create the target; existing: open it as it is'),
});

interface DriveBackupArgs extends Omit<BackupArgs, 'target'> {
  target: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/** The backup job created and set up; commit starts it, abort cancels it (a transaction action). */
export async function prepareBlockdevBackup(
  graph: BlockGraph,
  jobs: JobManager,
  a: BackupArgs,
  target?: BlockNode,
  txn?: JobTxn,
): Promise<PreparedAction> {
  if (a.compress) throw new BlockError(`Compression is not supported for this drive ${a.target}`);
  const source = graph.lookup(a.device);
  target ??= graph.lookup(a.target);
  let bitmap: ReturnType<typeof findDirtyBitmap>;
  if (a.bitmap !== undefined) {
    bitmap = findDirtyBitmap(source, a.bitmap);
    if (!bitmap) throw new BlockError(`Bitmap '${a.bitmap}' could not be found`);
  }
  const job = await prepareBackup(jobs, {
    id: a['job-id'] ?? defaultJobId(graph, a.device),
    source,
    target,
    sync: a.sync,
    bitmap,
    bitmapMode: a['bitmap-mode'],
    speed: a.speed,
    onSourceError: a['on-source-error'],
    onTargetError: a['on-target-error'],
    autoFinalize: a['auto-finalize'],
    autoDismiss: a['auto-dismiss'],
    filterNodeName: a['filter-node-name'],
    txn,
  });
  let resume: (() => void) | null = null;
  return {
    commit: () => {
      resume = startPreparedBackup(job);
    },
    abort: () => job.cancel(true),
    // The transaction's drained section ends: every started job runs on.
    clean: () => resume?.(),
  };
}

/**
 * drive-backup: the target image is created (as QEMU: before the job's own checks) and opened
 * without its backing file; for sync top it gets the source's backing node, for sync none the
 * source itself. The opened target lives as long as the job holds it.
 */
export async function prepareDriveBackup(
  graph: BlockGraph,
  jobs: JobManager,
  a: DriveBackupArgs,
  txn?: JobTxn,
): Promise<PreparedAction> {
  const source = graph.lookup(a.device);
  const existing = a.mode === 'existing';
  if (a.format !== undefined && (!graph.driver(a.format) || graph.driver(a.format)!.protocol))
    throw new BlockError(`Unknown file format '${a.format}'`);
  const format = a.format ?? (existing ? undefined : source.driver.name);
  const backingNode = a.sync === 'none' ? source : a.sync === 'top' ? (source.backing?.node ?? null) : null;
  if (!existing) await createTargetImage(a.target, format!, source.length, backingNode);
  const target = await openByFilename(graph, a.target, format, { noBacking: true }).catch((e: unknown) => {
    throw fsError('open', a.target, e);
  });
  // The job's references hold it from here; it closes when the job lets it go.
  target.monitorOwned = false;
  try {
    if (backingNode && target.driver.supportsBacking)
      graph.attachChild(target, backingNode, 'backing', ChildRole.COW);
    const prepared = await prepareBlockdevBackup(graph, jobs, { ...a, target: target.nodeName }, target, txn);
    return {
      commit: prepared.commit,
      abort: prepared.abort,
      async clean() {
        await prepared.clean?.();
        graph.noteMaybeOrphan(target);
        await graph.collectGarbage();
      },
    };
  } catch (e) {
    graph.noteMaybeOrphan(target);
    await graph.collectGarbage();
    throw e;
  }
}

/** blockdev-backup, drive-backup and block-commit. */
export function registerBlockJobCommands(r: CommandRegistry, graph: BlockGraph, jobs: JobManager): void {
  r.registerCommand({
    name: 'blockdev-backup',
    args: BlockdevBackup,
    doc: 'Starts a backup job from a node to another, with a copy-before-write filter on the source.',
    examples: [
      { args: { 'job-id': 'backup0', device: 'disk0', target: 'backup0', sync: 'full' } },
      {
        title: 'Only what a dirty bitmap marks',
        args: {
          'job-id': 'backup1',
          device: 'disk0',
          target: 'inc1',
          sync: 'bitmap',
          bitmap: 'bitmap0',
          'bitmap-mode': 'on-success',
        },
      },
    ],
    async handler(a: BackupArgs) {
      await runAlone(await prepareBlockdevBackup(graph, jobs, a));
    },
  });

  r.registerCommand({
    name: 'drive-backup',
    args: DriveBackup,
    doc: 'Starts a backup job from a node into an image file it creates (or opens, with mode existing): qcow2 by default, backed by the source for sync none and by its backing file for sync top.',
    examples: [
      {
        args: {
          'job-id': 'backup0',
          device: 'disk0',
          target: '/var/lib/backups/disk0-full.qcow2',
          sync: 'full',
          format: 'qcow2',
        },
      },
    ],
    async handler(a: DriveBackupArgs) {
      await runAlone(await prepareDriveBackup(graph, jobs, a));
    },
  });

  r.registerCommand({
    name: 'block-commit',
    args: t.object('q_obj_block-commit-arg', {
      'job-id': opt(t.str, 'Job id (default: the device name when it names a block device)'),
      device: req(t.str, 'The device (root node) whose chain is committed'),
      'base-node': opt(t.str, 'The node committed into (default: the bottom of the chain)'),
      base: opt(t.str, 'The same by file name (deprecated)'),
      'top-node': opt(t.str, 'The top of the committed range (default: the active layer)'),
      top: opt(t.str, 'The same by file name (deprecated)'),
      'backing-file': opt(
        t.str,
        "The backing file name written into top's overlay (default: the base's file name)",
      ),
      'backing-mask-protocol': opt(
        t.bool,
        'Accepted, without effect (QEMU: name raw rather than a protocol driver as the backing format)',
      ),
      speed: opt(t.int, 'Bytes per second (0: unlimited)'),
      'on-error': opt(BlockdevOnError, JOB_DOCS.onError),
      'filter-node-name': opt(t.str, 'Accepted; no filter node is inserted'),
      'auto-finalize': opt(t.bool, JOB_DOCS.autoFinalize),
      'auto-dismiss': opt(t.bool, JOB_DOCS.autoDismiss),
    }),
    doc: 'Commits the data of top..(above base) into base; committing the active layer is mirror-style and needs job-complete.',
    examples: [{ args: { 'job-id': 'commit0', device: 'disk0', 'top-node': 'snap1', 'base-node': 'base0' } }],
    async handler(a: CommitArgs) {
      if (a.base !== undefined && a['base-node'] !== undefined) {
        throw new BlockError("'base' and 'base-node' cannot be specified at the same time");
      }
      if (a.top !== undefined && a['top-node'] !== undefined) {
        throw new BlockError("'top' and 'top-node' cannot be specified at the same time");
      }
      const root = graph.lookup(a.device);
      let top = root;
      if (a['top-node'] !== undefined) top = graph.lookup(a['top-node']);
      else if (a.top !== undefined) {
        const n = chainNodeByFilename(root, a.top);
        if (!n) throw new BlockError(`Top image file ${a.top} not found`);
        top = n;
      }
      let base: BlockNode;
      if (a['base-node'] !== undefined) base = graph.lookup(a['base-node']);
      else if (a.base !== undefined) {
        const n = chainNodeByFilename(top, a.base);
        if (!n) throw new BlockError(`Can't find '${a.base}' in the backing chain`);
        base = n;
      } else base = chainBottom(top);
      const active = top === root;
      if (a['backing-file'] !== undefined && active) {
        throw new BlockError("'backing-file' specified, but 'top' is the active layer");
      }
      await startCommit(jobs, {
        id: a['job-id'] ?? defaultJobId(graph, a.device),
        device: root,
        top,
        base,
        active,
        backingFile: a['backing-file'],
        speed: a.speed,
        onError: a['on-error'],
        autoFinalize: a['auto-finalize'],
        autoDismiss: a['auto-dismiss'],
      });
    },
  });

  r.registerCommand({
    name: 'block-stream',
    args: t.object('q_obj_block-stream-arg', {
      'job-id': opt(t.str, 'Job id (default: the device name when it names a block device)'),
      device: req(t.str, 'The node (or device) that receives the data'),
      base: opt(t.str, 'The file name of the node streaming stops at (deprecated form of base-node)'),
      'base-node': opt(
        t.str,
        'The node streaming stops at: it and what is below stay (default: stream the whole chain)',
      ),
      bottom: opt(t.str, 'The lowest node streamed (its backing file becomes the new base)'),
      'backing-file': opt(
        t.str,
        "The backing file name written into device's image (default: base's file name)",
      ),
      'backing-mask-protocol': opt(
        t.bool,
        'Accepted, without effect (QEMU: name raw rather than a protocol driver as the backing format)',
      ),
      speed: opt(t.int, 'Bytes per second (0: unlimited)'),
      'on-error': opt(BlockdevOnError, JOB_DOCS.onError),
      'filter-node-name': opt(t.str, 'Accepted; no copy-on-read filter node is inserted'),
      'auto-finalize': opt(t.bool, JOB_DOCS.autoFinalize),
      'auto-dismiss': opt(t.bool, JOB_DOCS.autoDismiss),
    }),
    doc: "Starts a stream job: what the backing layers above base hold and the device's node does not is copied into it, then the node backs onto base (or onto nothing) and its image header says so.",
    examples: [{ args: { 'job-id': 'stream0', device: 'disk0', 'base-node': 'base0' } }],
    async handler(a: StreamArgs) {
      for (const [x, y] of [
        ['base', 'base-node'],
        ['base', 'bottom'],
        ['bottom', 'base-node'],
      ] as const) {
        if (a[x] !== undefined && a[y] !== undefined)
          throw new BlockError(`'${x}' and '${y}' cannot be specified at the same time`);
      }
      const top = graph.lookupBs(a.device, a.device);
      let base: BlockNode | null = null;
      if (a.base !== undefined) {
        base = chainNodeByFilename(top, a.base);
        if (!base) throw new BlockError(`Can't find '${a.base}' in the backing chain`);
      }
      if (a['base-node'] !== undefined) {
        base = graph.lookupBs(undefined, a['base-node']);
        if (base === top || !chainContains(top, base))
          throw new BlockError(`Node '${a['base-node']}' is not a backing image of '${a.device}'`);
      }
      if (a.bottom !== undefined) {
        const bottom = graph.lookupBs(undefined, a.bottom);
        if (bottom.driver.isFilter)
          throw new BlockError(`Node '${a.bottom}' is a filter, use a non-filter node as 'bottom'`);
        if (!chainContains(top, bottom))
          throw new BlockError(`Node '${a.bottom}' is not in a chain starting from '${a.device}'`);
        base = bottom.filteredOrCow?.node ?? null;
      }
      await startStream(jobs, {
        id: a['job-id'] ?? defaultJobId(graph, a.device),
        top,
        base,
        backingFile: a['backing-file'],
        speed: a.speed,
        onError: a['on-error'],
        autoFinalize: a['auto-finalize'],
        autoDismiss: a['auto-dismiss'],
      });
    },
  });
}
