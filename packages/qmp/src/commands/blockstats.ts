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

const BlockDeviceTimedStats = t.object('BlockDeviceTimedStats', {
  interval_length: req(t.int),
  min_rd_latency_ns: req(t.int),
  max_rd_latency_ns: req(t.int),
  avg_rd_latency_ns: req(t.int),
  min_wr_latency_ns: req(t.int),
  max_wr_latency_ns: req(t.int),
  avg_wr_latency_ns: req(t.int),
  min_flush_latency_ns: req(t.int),
  max_flush_latency_ns: req(t.int),
  avg_flush_latency_ns: req(t.int),
  avg_rd_queue_depth: req(t.number),
  avg_wr_queue_depth: req(t.number),
});

const BlockDeviceStats = t.object('BlockDeviceStats', {
  ...Object.fromEntries(COUNTERS.map((c) => [c, req(t.int)])),
  idle_time_ns: opt(t.int, 'Time since the last I/O operation (absent: none yet)'),
  account_invalid: req(t.bool),
  account_failed: req(t.bool),
  timed_stats: req(t.array(BlockDeviceTimedStats)),
});

const BlockStats = t.object('BlockStats', {
  device: opt(t.str, 'The block backend name'),
  qdev: opt(t.str, 'The guest device'),
  'node-name': opt(t.str, 'The node'),
  stats: req(BlockDeviceStats),
  'driver-specific': opt(t.any, 'Statistics of the node driver (file: discard counts)'),
});
BlockStats.members.parent = opt(BlockStats, "The node's file child");
BlockStats.members.backing = opt(BlockStats, "The node's backing child");

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
    handler(a: { 'query-nodes'?: boolean }) {
      return a['query-nodes'] ? nodesInCreationOrder(graph).map(nodeStats) : [];
    },
  });
}
