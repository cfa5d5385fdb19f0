import { isDeepStrictEqual } from 'node:util';
import {
  BlockBackend,
  type BlockChild,
  BlockError,
  type BlockGraph,
  type BlockNode,
  BlockOp,
  type Options,
  opBlocked,
  PERM_ALL,
  Perm,
  permQapiNames,
} from '@blockrep/block';
import { BlockJob, type JobManager } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { blockdevTypes } from './blockdev-types';
import { BlockDeviceInfo, blockDeviceInfo, nodesInCreationOrder } from './node-info';

const BlockInfo = t.object('BlockInfo', {
  device: req(t.str, 'The name of the block backend'),
  qdev: opt(t.str, 'The guest device it is attached to (never, in a storage daemon)'),
  type: req(t.str, "The device type: always 'unknown' (deprecated in QEMU)"),
  removable: req(t.bool, 'Whether the medium can be removed (always false)'),
  locked: req(t.bool, 'Whether the guest locked the medium in (always false)'),
  inserted: opt(BlockDeviceInfo, 'The root node of the backend, absent when it has none'),
});

const XDbgBlockGraphNode = t.object('XDbgBlockGraphNode', {
  id: req(t.uint64, 'Number of the node in this answer (edges refer to it)'),
  type: req(
    t.enum('XDbgBlockGraphNodeType', ['block-backend', 'block-job', 'block-driver']),
    'What the node is: a block backend, a block job or a block node',
  ),
  name: req(t.str, "The backend's name, the job's id or the node name ('' for none)"),
});

const BlockPermission = t.enum('BlockPermission', ['consistent-read', 'write', 'write-unchanged', 'resize']);

const XDbgBlockGraphEdge = t.object('XDbgBlockGraphEdge', {
  parent: req(t.uint64, 'The id of the parent node'),
  child: req(t.uint64, 'The id of the child node'),
  name: req(t.str, "The child's role in the parent, e.g. file, backing, root"),
  perm: req(t.array(BlockPermission), 'The permissions the parent holds on the child'),
  'shared-perm': req(t.array(BlockPermission), 'The permissions the parent lets other users hold'),
});

const XDbgBlockGraph = t.object('XDbgBlockGraph', {
  nodes: req(t.array(XDbgBlockGraphNode), 'Backends, jobs and block nodes'),
  edges: req(t.array(XDbgBlockGraphEdge), 'The parent-child links between them'),
});

/** The graph commands: blockdev-add/del/reopen and the node queries. */
export function registerBlockCommands(r: CommandRegistry, graph: BlockGraph, jobs?: JobManager): void {
  const types = blockdevTypes(graph);

  r.registerCommand({
    name: 'blockdev-add',
    args: types.options,
    doc: 'Creates a block node (and any nested children) from BlockdevOptions; the root must have a node-name.',
    examples: [
      {
        args: {
          driver: 'qcow2',
          'node-name': 'disk0',
          file: { driver: 'file', filename: '/var/lib/images/disk0.qcow2' },
        },
      },
      {
        title: 'A quorum of three children already open',
        args: {
          driver: 'quorum',
          'node-name': 'quorum0',
          'vote-threshold': 2,
          children: ['child0', 'child1', 'child2'],
        },
      },
    ],
    async handler(args: Options) {
      await graph.blockdevAdd(args);
    },
  });

  r.registerCommand({
    name: 'blockdev-del',
    args: t.object('q_obj_blockdev-del-arg', { 'node-name': req(t.str, 'The node to delete') }),
    doc: 'Deletes a node added with blockdev-add, if nothing uses it any more.',
    examples: [{ args: { 'node-name': 'disk0' } }],
    async handler(args: { 'node-name': string }) {
      await graph.blockdevDel(args['node-name']);
    },
  });

  r.registerCommand({
    name: 'block_resize',
    args: t.object('q_obj_block_resize-arg', {
      device: opt(t.str, 'A named block backend whose node to resize'),
      'node-name': opt(t.str, 'The node to resize'),
      size: req(t.int, 'The new size in bytes'),
    }),
    doc: 'Grows or shrinks a node (a format driver resizes its image, the file protocol its file).',
    examples: [{ args: { 'node-name': 'disk0', size: 21474836480 } }],
    async handler(a: { device?: string; 'node-name'?: string; size: number }) {
      const node = graph.lookupBs(a.device, a['node-name']);
      if (a.size < 0) throw new BlockError("Parameter 'size' expects a >0 size");
      if (opBlocked(node, BlockOp.RESIZE)) throw new BlockError(`Device '${a.device ?? '(null)'}' is in use`);
      // Drained, as QEMU does: no request of another user is between its checks and the node.
      const blk = new BlockBackend(graph, { perm: Perm.RESIZE, shared: PERM_ALL, allowDrainedIo: true });
      blk.attach(node);
      try {
        await graph.drained(node, () => blk.truncate(a.size, { exact: false, prealloc: 'off' }));
      } finally {
        await blk.detach();
      }
    },
  });

  r.registerCommand({
    name: 'blockdev-reopen',
    args: t.object('BlockReopenQueue', {
      options: req(t.array(types.options), 'The full new options of each node to reopen'),
    }),
    doc:
      'Reopens nodes with new options, all or none. Every option must be given again; read-only may ' +
      'change, and a child given by node name replaces the current one (QEMU rejects an option left ' +
      'out as "cannot be reset to its default value").',
    examples: [
      {
        args: {
          options: [{ driver: 'qcow2', 'node-name': 'base0', file: 'base0-file', 'read-only': false }],
        },
      },
    ],
    async handler(args: { options: Options[] }) {
      const entries = new Map<BlockNode, boolean>();
      const swaps: ChildSwap[] = [];
      for (const o of args.options) planReopen(graph, o, entries, undefined, swaps);
      // Children named anew are swapped in first (one permission transaction), and back on failure.
      const swap = (back: boolean) =>
        graph.update((tx) => {
          for (const s of back ? [...swaps].reverse() : swaps) tx.setChildNode(s.child, back ? s.from : s.to);
        });
      if (swaps.length) swap(false);
      try {
        await graph.reopenMultiple([...entries].map(([node, readOnly]) => ({ node, readOnly })));
      } catch (e) {
        if (swaps.length) swap(true);
        throw e;
      }
      for (const s of swaps) {
        const parent = s.child.parent as BlockNode;
        parent.length = await parent.driver.getLength(parent);
      }
      await graph.collectGarbage();
    },
  });

  r.registerCommand({
    name: 'query-named-block-nodes',
    args: t.object('q_obj_query-named-block-nodes-arg', {
      flat: opt(t.bool, 'Omit the backing chain of each image (default false)'),
    }),
    returns: t.array(BlockDeviceInfo),
    doc: 'Information about every node of the graph, newest first.',
    examples: [
      {
        args: { flat: true },
        returns: [
          {
            file: '/var/lib/images/disk0.qcow2',
            'node-name': 'disk0',
            ro: false,
            drv: 'qcow2',
            backing_file_depth: 0,
            encrypted: false,
            detect_zeroes: 'off',
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            image: {
              filename: '/var/lib/images/disk0.qcow2',
              format: 'qcow2',
              'dirty-flag': false,
              'actual-size': 262144,
              'virtual-size': 10737418240,
              'format-specific': {
                type: 'qcow2',
                data: {
                  compat: '1.1',
                  'compression-type': 'zlib',
                  'lazy-refcounts': false,
                  'refcount-bits': 16,
                  corrupt: false,
                  'extended-l2': false,
                },
              },
            },
            cache: { writeback: true, direct: false, 'no-flush': false },
            write_threshold: 0,
            'dirty-bitmaps': [
              {
                name: 'bitmap0',
                count: 0,
                granularity: 65536,
                recording: true,
                busy: false,
                persistent: false,
              },
            ],
          },
        ],
      },
    ],
    handler(args: { flat?: boolean }) {
      return nodesInCreationOrder(graph)
        .reverse()
        .map((n) => blockDeviceInfo(n, args.flat ?? false));
    },
  });

  r.registerCommand({
    name: 'query-block',
    returns: t.array(BlockInfo),
    doc: 'The named BlockBackends (devices); a storage daemon without devices has none.',
    examples: [{ returns: [] }],
    handler() {
      const out: Record<string, unknown>[] = [];
      for (const b of graph.backends) {
        if (!b.name) continue;
        const info: Record<string, unknown> = {
          device: b.name,
          locked: false,
          removable: false,
          type: 'unknown',
        };
        if (b.node) info.inserted = blockDeviceInfo(b.node, false);
        out.push(info);
      }
      return out;
    },
  });

  r.registerCommand({
    name: 'x-debug-query-block-graph',
    returns: XDbgBlockGraph,
    features: ['unstable'],
    doc: 'The graph as nodes (backends, jobs, block nodes) and edges with the permissions they take and share.',
    examples: [
      {
        returns: {
          nodes: [
            { id: 2, type: 'block-driver', name: 'disk0' },
            { id: 1, type: 'block-driver', name: 'disk0-file' },
          ],
          edges: [
            {
              parent: 2,
              child: 1,
              name: 'file',
              perm: ['resize', 'write', 'consistent-read'],
              'shared-perm': ['write-unchanged', 'consistent-read'],
            },
          ],
        },
      },
    ],
    handler() {
      return blockGraphDump(graph, jobs);
    },
  });
}

/**
 * Adds one reopen entry (and the implicitly created children that inherit read-only from it),
 * refusing changes of any option but read-only, as QEMU does for the options it cannot change.
 */
interface ChildSwap {
  child: BlockChild;
  from: BlockNode;
  to: BlockNode;
}

/** Whether `from` is `target` or has it below (a new child there would make a cycle). */
function reaches(from: BlockNode, target: BlockNode): boolean {
  return from === target || from.children.some((c) => reaches(c.node, target));
}

function planReopen(
  graph: BlockGraph,
  o: Options,
  out: Map<BlockNode, boolean>,
  inheritedRo: boolean | undefined,
  swaps: ChildSwap[],
): void {
  const name = o['node-name'];
  if (typeof name !== 'string') throw new BlockError('node-name not specified');
  const node = graph.getNode(name);
  if (!node) throw new BlockError(`Failed to find node with node-name='${name}'`);
  if (o.driver !== node.driver.name) throw new BlockError("Cannot change the option 'driver'");
  for (const [key, spec] of Object.entries(node.driver.options)) {
    const child = node.child(key);
    const want = o[key];
    if (child) {
      if (want === undefined) throw new BlockError(`Option '${key}' cannot be reset to its default value`);
      if (typeof want === 'string') {
        let target = child.node;
        if (want !== child.node.nodeName) {
          const to = graph.getNode(want);
          if (!to) throw new BlockError(`Cannot find device='' nor node-name='${want}'`);
          if (reaches(to, node)) {
            throw new BlockError(
              `Making '${want}' a ${key} child of '${node.nodeName}' would create a cycle`,
            );
          }
          swaps.push({ child, from: child.node, to });
          target = to;
        }
        // A child referenced by name keeps its own flags (QEMU); queueing it unchanged stops the
        // block layer from making it inherit the parent's.
        if (!out.has(target)) out.set(target, target.readOnly);
        continue;
      }
      // Nested options describe the current child (an implicit one has no name to repeat).
      const nested = { ...(want as Options) };
      if (nested['node-name'] === undefined && child.node.autoNamed)
        nested['node-name'] = child.node.nodeName;
      if (nested['node-name'] !== child.node.nodeName)
        throw new BlockError(`Cannot change the option '${key}'`);
      planReopen(graph, nested, out, (o['read-only'] as boolean | undefined) ?? false, swaps);
      continue;
    }
    const have = node.options[key];
    if (want === undefined) {
      if (have !== undefined && !isDeepStrictEqual(have, spec.default)) {
        throw new BlockError(`Option '${key}' cannot be reset to its default value`);
      }
    } else if (!isDeepStrictEqual(want, have)) {
      throw new BlockError(`Cannot change the option '${key}'`);
    }
  }
  const readOnly = (o['read-only'] as boolean | undefined) ?? inheritedRo ?? false;
  out.set(node, readOnly);
  // Children created with the node (not referenced by name) follow its read-only flag.
  for (const c of node.children) {
    if (swaps.some((s) => s.child === c)) continue;
    if (c.node.autoNamed && c.node.options['read-only'] === undefined && !out.has(c.node)) {
      out.set(c.node, readOnly);
    }
  }
}

/** Permission names as QEMU 7.2 lists them: highest bit first, no graph-mod (7.2 has none). */
function qapiPerms(mask: number): string[] {
  return permQapiNames(mask)
    .filter((p) => p !== 'graph-mod')
    .reverse();
}

/** x-debug-query-block-graph's answer. */
function blockGraphDump(graph: BlockGraph, jobs?: JobManager): Record<string, unknown> {
  const ids = new Map<unknown, number>();
  const nodes: Record<string, unknown>[] = [];
  const edges: Record<string, unknown>[] = [];
  // Ids go by first mention (a child can be numbered as an edge's end before it is listed).
  const num = (x: unknown) => {
    let n = ids.get(x);
    if (n === undefined) {
      n = ids.size + 1;
      ids.set(x, n);
    }
    return n;
  };
  const id = (x: unknown, type: string, name: string) => {
    const n = num(x);
    nodes.push({ name, type, id: n });
    return n;
  };
  const jobOfBackend = new Map<BlockBackend, BlockJob>();
  for (const j of jobs?.all() ?? []) {
    if (j instanceof BlockJob) for (const b of j.backends) jobOfBackend.set(b, j);
  }
  const edge = (parent: number, c: { node: BlockNode; name: string; perm: number; shared: number }) => {
    edges.push({
      parent,
      child: num(c.node),
      name: c.name,
      perm: qapiPerms(c.perm),
      'shared-perm': qapiPerms(c.shared),
    });
  };
  for (const b of graph.backends) {
    if (jobOfBackend.has(b)) continue;
    const p = id(b, 'block-backend', b.name ?? '');
    if (b.root) edge(p, b.root);
  }
  for (const [b, j] of jobOfBackend) {
    const p = id(j, 'block-job', j.id ?? '');
    if (b.root) edge(p, b.root);
  }
  for (const n of nodesInCreationOrder(graph)) {
    const p = id(n, 'block-driver', n.nodeName);
    // QEMU keeps a node's children newest first.
    for (const c of [...n.children].reverse()) edge(p, c);
  }
  // QEMU builds both lists by prepending.
  return { edges: edges.reverse(), nodes: nodes.reverse() };
}
