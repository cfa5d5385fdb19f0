import { createServer, type Server } from 'node:http';
import { IO_OPS, type IoLatency, type IoStats, LATENCY_BUCKETS, setIoTiming } from '@blockrep/block';
import type { BlockrepDaemon } from '@blockrep/qmp';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

type Labels = Record<string, string>;

/**
 * A histogram whose buckets the block layer fills (IoLatency): registered with prom-client as a
 * metric that reads them when scraped, so that no request pays for prom-client's bookkeeping.
 */
function latencyHistogram(
  registry: Registry,
  name: string,
  help: string,
  series: () => Iterable<[Labels, IoLatency]>,
): void {
  registry.registerMetric({
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    get: async () => {
      const values: { metricName: string; labels: Labels; value: number }[] = [];
      for (const [labels, l] of series()) {
        let total = 0;
        for (let i = 0; i <= LATENCY_BUCKETS.length; i++) {
          total += l.counts[i]!;
          const le = i < LATENCY_BUCKETS.length ? String(LATENCY_BUCKETS[i]) : '+Inf';
          values.push({ metricName: `${name}_bucket`, labels: { le, ...labels }, value: total });
        }
        values.push({ metricName: `${name}_sum`, labels, value: l.sum });
        values.push({ metricName: `${name}_count`, labels, value: total });
      }
      return { name, help, type: 'histogram', aggregator: 'sum', values };
    },
  } as unknown as Parameters<Registry['registerMetric']>[0]);
}

/**
 * blockrepd's Prometheus endpoint (`--metrics ADDR:PORT`, GET /metrics): I/O counters and latency
 * histograms per node and per NBD export, job progress, and the replication figures of a COLO
 * pair. Counters are read from the block layer's own accounting when scraped; latencies are
 * observed as requests end, only while the endpoint exists.
 */

export interface MetricsServer {
  address: { host: string; port: number };
  registry: Registry;
  /** Starts timing the COLO service's checkpoints (call once it runs). */
  watchColo(): void;
  close(): Promise<void>;
}

export async function startMetrics(
  daemon: BlockrepDaemon,
  host: string,
  port: number,
): Promise<MetricsServer> {
  const registry = new Registry();

  const perTarget = (prefix: string, label: string, what: string) => {
    // Counters whose totals the block layer keeps: reset and set from them at each scrape.
    const ops = new Counter({
      name: `${prefix}_io_ops_total`,
      help: `I/O requests finished per ${what} and operation (read, write, zero, discard, flush)`,
      labelNames: [label, 'op'],
      registers: [registry],
    });
    const bytes = new Counter({
      name: `${prefix}_io_bytes_total`,
      help: `Bytes of the finished I/O requests per ${what} and operation`,
      labelNames: [label, 'op'],
      registers: [registry],
    });
    const failed = new Counter({
      name: `${prefix}_io_failed_total`,
      help: `I/O requests that failed per ${what} and operation`,
      labelNames: [label, 'op'],
      registers: [registry],
    });
    const fill = (name: string, s: IoStats) => {
      for (const op of IO_OPS) {
        ops.inc({ [label]: name, op }, s.ops[op]);
        bytes.inc({ [label]: name, op }, s.bytes[op]);
        failed.inc({ [label]: name, op }, s.failed[op]);
      }
    };
    return { ops, bytes, failed, fill };
  };
  const nodes = perTarget('blockrep_node', 'node', 'node');
  const exportsM = perTarget('blockrep_export', 'export', 'NBD export');
  const exportClients = new Gauge({
    name: 'blockrep_export_clients',
    help: 'NBD clients connected per export',
    labelNames: ['export'],
    registers: [registry],
  });
  const jobProgress = new Gauge({
    name: 'blockrep_job_progress',
    help: "A job's progress so far (bytes for block jobs), as query-jobs' current-progress",
    labelNames: ['job', 'type'],
    registers: [registry],
  });
  const jobTotal = new Gauge({
    name: 'blockrep_job_progress_total',
    help: "A job's expected total progress, as query-jobs' total-progress",
    labelNames: ['job', 'type'],
    registers: [registry],
  });
  const jobStatus = new Gauge({
    name: 'blockrep_job_status',
    help: "1 for a job's current status",
    labelNames: ['job', 'type', 'status'],
    registers: [registry],
  });
  const replStage = new Gauge({
    name: 'blockrep_replication_stage',
    help: '1 for the stage of each replication node (none, running, failover, failover-failed, done)',
    labelNames: ['node', 'mode', 'stage'],
    registers: [registry],
  });
  const forwarded = new Counter({
    name: 'blockrep_replication_forwarded_bytes_total',
    help: 'Bytes of guest writes forwarded to the peer (writes through NBD client nodes)',
    labelNames: ['node'],
    registers: [registry],
  });
  const coloStage = new Gauge({
    name: 'blockrep_colo_stage',
    help: '1 for the COLO pair stage and role of this host',
    labelNames: ['pair', 'role', 'stage'],
    registers: [registry],
  });
  const peerMissing = new Gauge({
    name: 'blockrep_colo_peer_missing_bytes',
    help: 'Bytes written since the last checkpoint that the peer may lack (its resync copies them)',
    labelNames: ['pair'],
    registers: [registry],
  });
  const checkpoints = new Counter({
    name: 'blockrep_colo_checkpoints_total',
    help: 'Checkpoints taken by this host of the pair',
    labelNames: ['pair'],
    registers: [registry],
  });
  const checkpointLatency = new Histogram({
    name: 'blockrep_colo_checkpoint_duration_seconds',
    help: 'Duration of each checkpoint (guest writes held, both sides flushed)',
    labelNames: ['pair'],
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  const peerAlive = new Gauge({
    name: 'blockrep_colo_peer_alive',
    help: '1 while the peer answers heartbeats',
    labelNames: ['pair'],
    registers: [registry],
  });

  // Latencies: the block layer times every request while the endpoint exists.
  setIoTiming(true);
  const perOp = function* (label: string, name: string, stats: IoStats): Iterable<[Labels, IoLatency]> {
    for (const op of IO_OPS) {
      const l = stats.latency[op];
      if (l) yield [{ [label]: name, op }, l];
    }
  };
  latencyHistogram(
    registry,
    'blockrep_node_io_duration_seconds',
    'Time from request to completion per node and operation',
    function* () {
      for (const n of daemon.graph.allNodes()) yield* perOp('node', n.nodeName, n.ioStats);
    },
  );
  latencyHistogram(
    registry,
    'blockrep_export_io_duration_seconds',
    'Time from request to completion per NBD export and operation',
    function* () {
      for (const e of daemon.nbd.server?.listExports() ?? [])
        yield* perOp('export', e.name, e.backend.ioStats);
    },
  );
  latencyHistogram(
    registry,
    'blockrep_replication_forward_duration_seconds',
    'Time a forwarded write takes to reach the peer (write requests of NBD client nodes)',
    function* () {
      for (const n of daemon.graph.allNodes()) {
        const l = n.driver.name === 'nbd' ? n.ioStats.latency.write : undefined;
        if (l) yield [{ node: n.nodeName }, l];
      }
    },
  );
  let hooked: unknown = null;
  const watchColo = () => {
    const colo = daemon.colo.service;
    if (!colo || hooked === colo) return;
    hooked = colo;
    const pair = colo.status().pair;
    colo.onCheckpoint = (ms) => checkpointLatency.observe({ pair }, ms / 1000);
  };

  const collect = () => {
    for (const m of [nodes.ops, nodes.bytes, nodes.failed, exportsM.ops, exportsM.bytes, exportsM.failed])
      m.reset();
    for (const n of daemon.graph.allNodes()) {
      nodes.fill(n.nodeName, n.ioStats);
    }
    exportClients.reset();
    for (const e of daemon.nbd.server?.listExports() ?? []) {
      exportsM.fill(e.name, e.backend.ioStats);
      exportClients.set({ export: e.name }, e.clients.size);
    }
    jobProgress.reset();
    jobTotal.reset();
    jobStatus.reset();
    for (const j of daemon.jobs.all()) {
      if (j.internal) continue;
      const l = { job: j.id!, type: String(j.type) };
      jobProgress.set(l, j.progressCurrent);
      jobTotal.set(l, j.progressTotal);
      jobStatus.set({ ...l, status: j.status }, 1);
    }
    replStage.reset();
    forwarded.reset();
    for (const s of daemon.replication.all())
      replStage.set({ node: s.node.nodeName, mode: s.mode, stage: s.stage }, 1);
    for (const n of daemon.graph.allNodes())
      if (n.driver.name === 'nbd') forwarded.inc({ node: n.nodeName }, n.ioStats.bytes.write);
    coloStage.reset();
    const colo = daemon.colo.service;
    if (colo) {
      watchColo();
      const st = colo.status();
      coloStage.set({ pair: st.pair, role: st.role, stage: st.stage }, 1);
      peerMissing.set({ pair: st.pair }, st['peer-missing-bytes']);
      checkpoints.reset();
      checkpoints.inc({ pair: st.pair }, st.checkpoints);
      peerAlive.set({ pair: st.pair }, st.peer.alive ? 1 : 0);
    }
  };

  const server: Server = createServer(async (req, res) => {
    if (req.method !== 'GET' || (req.url !== '/metrics' && req.url !== '/')) {
      res.writeHead(404).end('blockrepd: GET /metrics\n');
      return;
    }
    try {
      collect();
      const body = await registry.metrics();
      res.writeHead(200, { 'Content-Type': registry.contentType }).end(body);
    } catch (e) {
      res.writeHead(500).end(`${(e as Error).message}\n`);
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const bound = server.address();
  const address = typeof bound === 'object' && bound ? { host, port: bound.port } : { host, port };
  return {
    address,
    registry,
    watchColo,
    close: async () => {
      setIoTiming(false);
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
