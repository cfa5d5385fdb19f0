import {
  BlockError,
  type BlockGraph,
  type BlockNode,
  BlockOp,
  type DirtyBitmap,
  findDirtyBitmap,
  opBlocked,
} from '@blockrep/block';
import { type JobManager, type MirrorOptions, type OnError, startMirror } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, type QMembers, req, t } from '../schema';
import { BlockdevOnError, defaultJobId, JOB_DOCS, MirrorSyncMode, rootNode } from './block-jobs';
import { NewImageMode } from './chain';
import { createTargetImage, NBD_URL, openByFilename } from './new-image';

const MirrorCopyMode = t.enum('MirrorCopyMode', ['background', 'write-blocking']);

interface MirrorArgs {
  'job-id'?: string;
  device: string;
  target: string;
  replaces?: string;
  sync: 'top' | 'full' | 'none' | 'incremental' | 'bitmap';
  speed?: number;
  granularity?: number;
  'buf-size'?: number;
  'on-source-error'?: OnError;
  'on-target-error'?: OnError;
  'copy-mode'?: 'background' | 'write-blocking';
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
  bitmap?: string;
}

interface BlockdevMirrorArgs extends MirrorArgs {
  'filter-node-name'?: string;
}

interface DriveMirrorArgs extends MirrorArgs {
  format?: string;
  'node-name'?: string;
  mode?: 'existing' | 'absolute-paths';
  unmap?: boolean;
}

/** The members both commands take (QEMU's blockdev-mirror and DriveMirror share them). */
const COMMON: QMembers = {
  'job-id': opt(t.str, 'Job id (default: the device name when it names a block device)'),
  device: req(t.str, 'The root node (or device) whose writes are mirrored'),
  target: req(t.str, 'Where to mirror to'),
  replaces: opt(t.str, 'The node the target replaces on completion (default: device)'),
  sync: req(MirrorSyncMode, 'What to copy: full, top (the top layer), none (only new writes)'),
  speed: opt(t.int, 'Bytes per second (0: unlimited)'),
  granularity: opt(
    t.uint32,
    'Bytes per dirty bit: a power of 2 from 512 B to 64 MiB (default from the target)',
  ),
  'buf-size': opt(t.int, 'Bytes of copies in flight at once (default 16 MiB)'),
  'on-source-error': opt(BlockdevOnError, `Reading the source failed. ${JOB_DOCS.onError}`),
  'on-target-error': opt(BlockdevOnError, `Writing the target failed. ${JOB_DOCS.onError}`),
  'copy-mode': opt(MirrorCopyMode, 'background (default) or write-blocking (guest writes reach both sides)'),
  'auto-finalize': opt(t.bool, JOB_DOCS.autoFinalize),
  'auto-dismiss': opt(t.bool, JOB_DOCS.autoDismiss),
  bitmap: opt(
    t.str,
    "Beyond QEMU 7.2: copy only what this dirty bitmap of the device marks (sync=full); it is the job's working bitmap",
  ),
};

/** What drive-mirror adds to blockdev-mirror's checks. */
interface MirrorCommon {
  filterNodeName?: string;
  zeroTarget: boolean;
  unmap: boolean;
}

/** The checks both commands make before the job is created (QEMU's blockdev_mirror_common). */
function mirrorOptions(
  graph: BlockGraph,
  source: BlockNode,
  target: BlockNode,
  a: MirrorArgs,
  c: MirrorCommon,
): MirrorOptions {
  const g = a.granularity ?? 0;
  if (g !== 0 && (g < 512 || g > 64 << 20)) {
    throw new BlockError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (g & (g - 1)) throw new BlockError("Parameter 'granularity' expects a power of 2");
  const b1 = opBlocked(source, BlockOp.MIRROR_SOURCE);
  if (b1) throw b1;
  const b2 = opBlocked(target, BlockOp.MIRROR_TARGET);
  if (b2) throw b2;
  let sync = a.sync;
  if (sync === 'top' && !source.filteredOrCow) sync = 'full';
  let replaces: BlockNode | undefined;
  if (a.replaces !== undefined) {
    replaces = graph.getNode(a.replaces);
    if (!replaces) throw new BlockError(`Failed to find node with node-name='${a.replaces}'`);
    const blocked = opBlocked(replaces, BlockOp.REPLACE);
    if (blocked) throw blocked;
    if (!canReplace(source, replaces)) {
      throw new BlockError(
        `Cannot replace '${replaces.nodeName}' by a node mirrored from '${source.nodeName}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data`,
      );
    }
    if (replaces.length !== target.length) {
      throw new BlockError('cannot replace image with a mirror image of different size');
    }
  }
  if (sync === 'incremental' || sync === 'bitmap') throw new BlockError(`Sync mode '${sync}' not supported`);
  if ((a['buf-size'] ?? 0) < 0) throw new BlockError("Invalid parameter 'buf-size'");
  let bitmap: DirtyBitmap | undefined;
  if (a.bitmap !== undefined) {
    if (sync !== 'full') throw new BlockError(`sync mode '${sync}' is not compatible with bitmaps`);
    if (g !== 0) throw new BlockError('Granularity and bitmap cannot both be set');
    bitmap = findDirtyBitmap(source, a.bitmap);
    if (!bitmap) throw new BlockError(`Dirty bitmap '${a.bitmap}' not found`);
    if (bitmap.busy) {
      throw new BlockError(
        `Bitmap '${a.bitmap}' is currently in use by another operation and cannot be used`,
      );
    }
  }
  return {
    id: a['job-id'] ?? defaultJobId(graph, a.device),
    source,
    target,
    sync,
    replaces,
    speed: a.speed,
    granularity: g || undefined,
    bufSize: a['buf-size'] || undefined,
    onSourceError: a['on-source-error'],
    onTargetError: a['on-target-error'],
    copyMode: a['copy-mode'],
    autoFinalize: a['auto-finalize'],
    autoDismiss: a['auto-dismiss'],
    filterNodeName: c.filterNodeName,
    zeroTarget: c.zeroTarget,
    unmap: c.unmap,
    bitmap,
  };
}

/**
 * Whether the target may take `replaces`' place: the source itself, or a child of a quorum
 * source (QEMU's use: repairing a broken quorum child from the quorum's voted contents).
 */
function canReplace(source: BlockNode, replaces: BlockNode): boolean {
  if (replaces === source) return true;
  return source.driver.name === 'quorum' && source.children.some((c) => c.node === replaces);
}

/** blockdev-mirror and drive-mirror. */
export function registerMirrorCommands(r: CommandRegistry, graph: BlockGraph, jobs: JobManager): void {
  r.registerCommand({
    name: 'blockdev-mirror',
    args: t.object('q_obj_blockdev-mirror-arg', {
      ...COMMON,
      target: req(t.str, 'The node to mirror to (not attached to a guest)'),
      'filter-node-name': opt(t.str, 'Node name of the mirror_top filter (default: automatic)'),
    }),
    doc: 'Starts a mirror job from a root node to another node: READY once in sync, then job-complete switches the users of the source to the target, or block-job-cancel leaves the target a consistent copy.',
    examples: [{ args: { 'job-id': 'mirror0', device: 'disk0', target: 'target0', sync: 'full' } }],
    async handler(a: BlockdevMirrorArgs) {
      const source = rootNode(graph, a.device);
      const target = graph.lookupBs(a.target, a.target);
      await startMirror(
        jobs,
        mirrorOptions(graph, source, target, a, {
          filterNodeName: a['filter-node-name'],
          zeroTarget: a.sync === 'full',
          unmap: true,
        }),
      );
    },
  });

  r.registerCommand({
    name: 'drive-mirror',
    args: t.object('DriveMirror', {
      ...COMMON,
      target: req(
        t.str,
        'The image to mirror to: a file name or an NBD URL (nbd://host:port/export, nbd+unix:///export?socket=path)',
      ),
      format: opt(t.str, "The target's format (default: probed when mode is existing, else the source's)"),
      'node-name': opt(t.str, 'Node name of the target node'),
      mode: opt(NewImageMode, 'absolute-paths (default: create the image) or existing'),
      unmap: opt(t.bool, 'Zeroes in the source may become holes in the target (default true)'),
    }),
    doc: "Starts a mirror job to an image given by name: created first (mode absolute-paths, with the source's backing file for sync=top, the source itself for sync=none) or opened as it is (mode existing).",
    examples: [
      {
        args: {
          'job-id': 'mirror0',
          device: 'disk0',
          target: 'nbd+unix:///disk0?socket=/run/peer/nbd.sock',
          format: 'raw',
          mode: 'existing',
          sync: 'full',
        },
      },
    ],
    async handler(a: DriveMirrorArgs) {
      const source = rootNode(graph, a.device);
      const blocked = opBlocked(source, BlockOp.MIRROR_SOURCE);
      if (blocked) throw blocked;
      const mode = a.mode ?? 'absolute-paths';
      const format = a.format ?? (mode === 'existing' ? undefined : source.driver.name);
      let sync = a.sync;
      let targetBacking = source.filteredOrCow?.node ?? null;
      if (!targetBacking && sync === 'top') sync = 'full';
      if (sync === 'none') targetBacking = source;
      if (a.replaces !== undefined && a['node-name'] === undefined) {
        throw new BlockError('a node-name must be provided when replacing a named node of the graph');
      }
      if (mode !== 'existing') {
        await createTargetImage(a.target, format!, source.length, sync === 'full' ? null : targetBacking);
      }
      const target = await openByFilename(graph, a.target, format, { nodeName: a['node-name'] });
      try {
        const nbd = NBD_URL.test(a.target);
        await startMirror(
          jobs,
          mirrorOptions(
            graph,
            source,
            target,
            { ...a, sync },
            {
              zeroTarget: sync === 'full' && (mode === 'existing' || nbd),
              unmap: a.unmap ?? true,
            },
          ),
        );
      } finally {
        // Only the job keeps the target: it goes away with the job unless it took the source's place.
        await graph.close(target);
      }
    },
  });
}
