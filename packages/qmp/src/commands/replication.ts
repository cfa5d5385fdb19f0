import { BlockError, type BlockGraph } from '@blockrep/block';
import type { ReplicationManager } from '@blockrep/replication';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

const ReplicationMode = t.enum('ReplicationMode', ['primary', 'secondary']);
const ReplicationStage = t.enum('ReplicationStage', [
  'none',
  'running',
  'failover',
  'failover-failed',
  'done',
]);
const ReplicationInfo = t.object('ReplicationInfo', {
  'node-name': req(t.str, 'The replication node'),
  mode: req(ReplicationMode, 'Which side of the pair the node replicates for'),
  stage: req(
    ReplicationStage,
    'none (not started), running, failover (committing the secondary view), failover-failed or done',
  ),
  error: opt(t.str, 'The recorded error, if any'),
});

/** QEMU's xen-set-replication: start with enable, stop (with or without failover) without. */
async function setReplication(
  repl: ReplicationManager,
  enable: boolean,
  primary: boolean,
  failover?: boolean,
) {
  if (failover !== undefined && enable)
    throw new BlockError("Parameter 'failover' is only for stopping replication");
  if (enable) return repl.startAll(primary ? 'primary' : 'secondary');
  // QEMU reports stop errors only when not failing over.
  if (failover) await repl.stopAll(true).catch(() => {});
  else await repl.stopAll(false);
}

/** x-blockdev-change and the replication commands (QEMU's names and neutral ones). */
export function registerReplicationCommands(
  r: CommandRegistry,
  graph: BlockGraph,
  repl: ReplicationManager,
): void {
  r.registerCommand({
    name: 'x-blockdev-change',
    features: ['unstable'],
    args: t.object('q_obj_x-blockdev-change-arg', {
      parent: req(t.str, 'The parent node (or device), e.g. a quorum'),
      child: opt(t.str, 'The child to remove, e.g. children.1'),
      node: opt(t.str, 'The node to add as a new child'),
    }),
    doc: 'Adds a child to a quorum (node) or removes one (child), as the COLO procedure does.',
    examples: [
      { title: 'Removing the second child of a quorum', args: { parent: 'colo-disk0', child: 'children.1' } },
      { title: 'Adding a node as its new child', args: { parent: 'colo-disk0', node: 'nbd-peer' } },
    ],
    async handler(a: { parent: string; child?: string; node?: string }) {
      const parent = graph.lookup(a.parent);
      if ((a.child === undefined) === (a.node === undefined)) {
        throw new BlockError(
          a.child !== undefined
            ? 'The parameters child and node are in conflict'
            : 'Either child or node must be specified',
        );
      }
      if (a.child !== undefined) {
        const c = parent.child(a.child);
        if (!c) throw new BlockError(`Node '${a.parent}' does not have child '${a.child}'`);
        await graph.delDriverChild(parent, c);
      } else {
        const n = graph.getNode(a.node!);
        if (!n) throw new BlockError(`Node '${a.node}' not found`);
        graph.addDriverChild(parent, n);
      }
    },
  });

  r.registerCommand({
    name: 'xen-set-replication',
    args: t.object('q_obj_xen-set-replication-arg', {
      enable: req(t.bool, 'true: start replication; false: stop it'),
      primary: req(t.bool, 'true: this is the primary side'),
      failover: opt(t.bool, 'When stopping: fail over (secondary: commit the secondary VM view)'),
    }),
    doc: 'Starts or stops block replication on every replication node (QEMU name).',
    examples: [
      { args: { enable: true, primary: false } },
      { title: 'Stopping with a failover', args: { enable: false, primary: false, failover: true } },
    ],
    async handler(a: { enable: boolean; primary: boolean; failover?: boolean }) {
      await setReplication(repl, a.enable, a.primary, a.failover);
    },
  });

  r.registerCommand({
    name: 'query-xen-replication-status',
    returns: t.object('ReplicationStatus', {
      error: req(t.bool, 'Whether a replication node has recorded an error'),
      desc: opt(t.str, 'The error of the first such node'),
    }),
    doc: 'Whether replication has an error (the first node that has one).',
    examples: [{ returns: { error: false } }],
    handler() {
      try {
        repl.getErrorAll();
        return { error: false };
      } catch (e) {
        return { error: true, desc: (e as Error).message };
      }
    },
  });

  r.registerCommand({
    name: 'xen-colo-do-checkpoint',
    doc: 'A COLO checkpoint on every replication node (secondary: empties active and hidden disks).',
    examples: [{}],
    async handler() {
      await repl.checkpointAll();
    },
  });

  r.registerCommand({
    name: 'replication-start',
    args: t.object('q_obj_replication-start-arg', {
      mode: req(ReplicationMode, 'Whether this is the primary or the secondary side'),
    }),
    doc: 'Starts replication on every replication node (xen-set-replication enable=true).',
    examples: [{ args: { mode: 'secondary' } }],
    async handler(a: { mode: 'primary' | 'secondary' }) {
      await repl.startAll(a.mode);
    },
  });

  r.registerCommand({
    name: 'replication-stop',
    args: t.object('q_obj_replication-stop-arg', { failover: opt(t.bool, 'Fail over (default false)') }),
    doc: 'Stops replication (xen-set-replication enable=false); errors are reported unless failing over.',
    examples: [{ args: { failover: true } }],
    async handler(a: { failover?: boolean }) {
      await setReplication(repl, false, false, a.failover ?? false);
    },
  });

  r.registerCommand({
    name: 'replication-checkpoint',
    doc: 'A checkpoint on every replication node (xen-colo-do-checkpoint).',
    examples: [{}],
    async handler() {
      await repl.checkpointAll();
    },
  });

  r.registerCommand({
    name: 'query-replication',
    returns: t.array(ReplicationInfo),
    doc: 'Every replication node with its mode, stage and error; poll it to see a failover end.',
    examples: [{ returns: [{ 'node-name': 'replication0', mode: 'secondary', stage: 'running' }] }],
    handler: () => repl.query(),
  });

  for (const name of ['REPLICATION_STAGE_CHANGE', 'REPLICATION_ERROR']) {
    r.registerEvent({
      name,
      data: t.object(`q_obj_${name}-arg`, ReplicationInfo.members),
      doc:
        name === 'REPLICATION_ERROR'
          ? 'Replication recorded an error (not for the cancel of its own backup job when stopped).'
          : 'Replication changed stage.',
      examples: [
        name === 'REPLICATION_ERROR'
          ? {
              data: {
                'node-name': 'replication0',
                mode: 'primary',
                stage: 'running',
                error: 'Input/output error',
              },
            }
          : { data: { 'node-name': 'replication0', mode: 'secondary', stage: 'failover' } },
      ],
    });
  }
  r.registerEvent({
    name: 'QUORUM_FAILURE',
    data: t.object('q_obj_QUORUM_FAILURE-arg', {
      reference: req(t.str, 'The node name of the quorum'),
      'sector-num': req(t.int, 'First sector of the failed request (512-byte sectors)'),
      'sectors-count': req(t.int, 'Length of the failed request, sectors'),
    }),
    doc: 'A quorum request failed as a whole.',
    examples: [{ data: { reference: 'colo-disk0', 'sector-num': 2048, 'sectors-count': 8 } }],
  });
  r.registerEvent({
    name: 'QUORUM_REPORT_BAD',
    data: t.object('q_obj_QUORUM_REPORT_BAD-arg', {
      type: req(t.enum('QuorumOpType', ['read', 'write', 'flush']), 'The kind of request'),
      error: opt(t.str, 'The error of the child (absent when it answered but lost the vote)'),
      'node-name': req(t.str, 'The child node'),
      'sector-num': req(t.int, 'First sector of the request (512-byte sectors)'),
      'sectors-count': req(t.int, 'Length of the request, sectors'),
    }),
    doc: 'A quorum child failed a request or lost a vote.',
    examples: [
      {
        data: {
          type: 'write',
          error: 'Input/output error',
          'node-name': 'nbd-peer',
          'sector-num': 2048,
          'sectors-count': 8,
        },
      },
    ],
  });
}
