import type { BlockGraph, BlockNode } from '@blockrep/block';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import { nodesInCreationOrder } from './node-info';

/*
 * query-blockstats as QEMU 7.2 answers it. QEMU keeps its I/O accounting in block backends with
 * a name or a guest device, which a storage daemon has none of: without query-nodes the list is
 * empty; with it every node reports its highest written offset, the file driver its discard
 * counts, and each node its file child as `parent`. (Per-node and per-export I/O counters are
 * blockrep's metrics' business.)
 */

const COUNTERS = [
  'rd_bytes',
  'wr_bytes',
  'unmap_bytes',
  'rd_operations',
  'wr_operations',
  'flush_operations',
  'unmap_operations',
  'rd_total_time_ns',
  'wr_total_time_ns',
  'flush_total_time_ns',
  'unmap_total_time_ns',
  'wr_highest_offset',
  'rd_merged',
  'wr_merged',
  'unmap_merged',
  'failed_rd_operations',
  'failed_wr_operations',
  'failed_flush_operations',
  'failed_unmap_operations',
  'invalid_rd_operations',
  'invalid_wr_operations',
  'invalid_flush_operations',
  'invalid_unmap_operations',
] as const;

/** What each counter counts (blockrepd reports 0 but for wr_highest_offset). */
const COUNTER_DOCS: Record<(typeof COUNTERS)[number], string> = {
  rd_bytes: 'Bytes read',
  wr_bytes: 'Bytes written',
  unmap_bytes: 'Bytes discarded',
  rd_operations: 'Read requests',
  wr_operations: 'Write requests',
  flush_operations: 'Flush requests',
  unmap_operations: 'Discard requests',
  rd_total_time_ns: 'Time spent in reads, nanoseconds',
  wr_total_time_ns: 'Time spent in writes, nanoseconds',
  flush_total_time_ns: 'Time spent in flushes, nanoseconds',
  unmap_total_time_ns: 'Time spent in discards, nanoseconds',
  wr_highest_offset: 'The end of the furthest write or discard so far, bytes (with query-nodes)',
  rd_merged: 'Reads merged into other requests',
  wr_merged: 'Writes merged into other requests',
  unmap_merged: 'Discards merged into other requests',
  failed_rd_operations: 'Reads that failed',
  failed_wr_operations: 'Writes that failed',
  failed_flush_operations: 'Flushes that failed',
  failed_unmap_operations: 'Discards that failed',
  invalid_rd_operations: 'Reads refused as invalid (e.g. beyond the end)',
  invalid_wr_operations: 'Writes refused as invalid',
  invalid_flush_operations: 'Flushes refused as invalid',
  invalid_unmap_operations: 'Discards refused as invalid',
};

const BlockDeviceTimedStats = t.object('BlockDeviceTimedStats', {
  interval_length: req(t.int, 'Length of the interval the figures cover, seconds'),
  min_rd_latency_ns: req(t.int, 'Shortest read latency in the interval, nanoseconds'),
  max_rd_latency_ns: req(t.int, 'Longest read latency in the interval, nanoseconds'),
  avg_rd_latency_ns: req(t.int, 'Mean read latency in the interval, nanoseconds'),
  min_wr_latency_ns: req(t.int, 'Shortest write latency in the interval, nanoseconds'),
  max_wr_latency_ns: req(t.int, 'Longest write latency in the interval, nanoseconds'),
  avg_wr_latency_ns: req(t.int, 'Mean write latency in the interval, nanoseconds'),
  min_flush_latency_ns: req(t.int, 'Shortest flush latency in the interval, nanoseconds'),
  max_flush_latency_ns: req(t.int, 'Longest flush latency in the interval, nanoseconds'),
  avg_flush_latency_ns: req(t.int, 'Mean flush latency in the interval, nanoseconds'),
  avg_rd_queue_depth: req(t.number, 'Mean number of reads in flight in the interval'),
  avg_wr_queue_depth: req(t.number, 'Mean number of writes in flight in the interval'),
});

const BlockDeviceStats = t.object('BlockDeviceStats', {
  ...Object.fromEntries(COUNTERS.map((c) => [c, req(t.int, COUNTER_DOCS[c])])),
  idle_time_ns: opt(t.int, 'Time since the last I/O operation (absent: none yet)'),
  account_invalid: req(t.bool, 'Whether invalid requests count in the latency figures (false)'),
  account_failed: req(t.bool, 'Whether failed requests count in the latency figures (false)'),
  timed_stats: req(
    t.array(BlockDeviceTimedStats),
    'Latency and queue depth per configured interval (none are configured: empty)',
  ),
});

const BlockStats = t.object('BlockStats', {
  device: opt(t.str, 'The block backend name'),
  qdev: opt(t.str, 'The guest device'),
  'node-name': opt(t.str, 'The node'),
  stats: req(BlockDeviceStats, 'The counters of the backend or node'),
  'driver-specific': opt(t.any, 'Statistics of the node driver (file: discard counts)'),
});
BlockStats.members.parent = opt(BlockStats, "The node's file child");
BlockStats.members.backing = opt(BlockStats, "The node's backing child");

/** Every counter at 0, for the examples of the command reference. */
const EXAMPLE_COUNTERS = {
  ...Object.fromEntries(COUNTERS.map((c) => [c, 0])),
  account_invalid: false,
  account_failed: false,
  timed_stats: [],
};

/** One node's entry, its file child's as `parent`. */
function nodeStats(node: BlockNode): Record<string, unknown> {
  const stats: Record<string, unknown> = Object.fromEntries(COUNTERS.map((c) => [c, 0]));
  stats.wr_highest_offset = node.wrHighestOffset;
  stats.account_invalid = false;
  stats.account_failed = false;
  stats.timed_stats = [];
  const out: Record<string, unknown> = { 'node-name': node.nodeName, stats };
  const specific = node.driver.statsSpecific?.(node);
  if (specific) out['driver-specific'] = specific;
  if (node.file) out.parent = nodeStats(node.file.node);
  return out;
}

export function registerBlockstatsCommand(r: CommandRegistry, graph: BlockGraph): void {
  r.registerCommand({
    name: 'query-blockstats',
    args: t.object('q_obj_query-blockstats-arg', {
      'query-nodes': opt(t.bool, 'List every node instead of the named block backends (default false)'),
    }),
    returns: t.array(BlockStats),
    doc: "I/O statistics as QEMU reports them: per node (query-nodes) the highest written offset and the file driver's discard counts.",
    examples: [
      {
        args: { 'query-nodes': true },
        returns: [
          {
            'node-name': 'disk0-file',
            stats: { ...EXAMPLE_COUNTERS, wr_highest_offset: 327680 },
            'driver-specific': {
              driver: 'file',
              'discard-nb-ok': 0,
              'discard-nb-failed': 0,
              'discard-bytes-ok': 0,
            },
          },
        ],
      },
    ],
    handler(a: { 'query-nodes'?: boolean }) {
      return a['query-nodes'] ? nodesInCreationOrder(graph).map(nodeStats) : [];
    },
  });
}
