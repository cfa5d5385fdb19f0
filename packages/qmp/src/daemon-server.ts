import { type BlockGraph, createGraph } from '@blockrep/block';
import { filterDrivers } from '@blockrep/filters';
import { JobManager } from '@blockrep/jobs';
import { nbdDriver } from '@blockrep/nbd';
import { qcow2Driver } from '@blockrep/qcow2';
import { ReplicationManager } from '@blockrep/replication';
import { createBlockQmpServer } from './block-server';
import { registerBlockJobCommands } from './commands/block-jobs';
import type { BlockdevCreators } from './commands/create';
import { registerMirrorCommands } from './commands/mirror';
import { NbdServerHolder, registerNbdCommands } from './commands/nbd';
import { qcow2Creator } from './commands/qcow2-create';
import { registerReplicationCommands } from './commands/replication';
import type { CommandRegistry } from './registry';
import type { QmpServer, QmpServerOptions } from './server';

/** Everything one blockrepd holds: the graph, jobs, replication registry, NBD server and QMP. */
export interface BlockrepDaemon {
  graph: BlockGraph;
  jobs: JobManager;
  replication: ReplicationManager;
  nbd: NbdServerHolder;
  qmp: QmpServer;
  creators: BlockdevCreators;
  /** Clean shutdown: stop accepting, cancel jobs, drop exports, flush and close every node. */
  shutdown(): Promise<void>;
}

/**
 * Composes a daemon: a graph with every driver (file, null-co, raw, qcow2, nbd, quorum, blkdebug,
 * replication, copy-before-write), and a QMP server with every command and event.
 */
export function createBlockrepDaemon(opts: Omit<QmpServerOptions, 'registry'> = {}): BlockrepDaemon {
  const jobs = new JobManager();
  const replication = new ReplicationManager(jobs);
  const graph = createGraph([qcow2Driver, nbdDriver, ...filterDrivers, replication.driver]);
  const { server, creators } = createBlockQmpServer({ ...opts, graph, jobs });
  creators.register(qcow2Creator);
  const nbd = new NbdServerHolder(graph);
  registerNbdCommands(server.registry, nbd, server);
  registerBlockJobCommands(server.registry, graph, jobs);
  registerMirrorCommands(server.registry, graph, jobs);
  registerReplicationCommands(server.registry, graph, replication);
  // Only the events the schema declares reach the monitors (query-qmp-schema stays true).
  const declared = new Set(server.registry.events().map((e) => e.name));
  const unsubscribe = graph.onEvent((name, data) => {
    if (declared.has(name)) server.emitEvent(name, data);
  });
  let down: Promise<void> | null = null;
  const shutdown = () => {
    down ??= (async () => {
      unsubscribe();
      await server.close().catch(() => {});
      await jobs.cancelAll().catch(() => {});
      if (nbd.server) await nbd.stop().catch(() => {});
      await graph.closeAll();
    })();
    return down;
  };
  return { graph, jobs, replication, nbd, qmp: server, creators, shutdown };
}

/** The registry of a whole daemon: what docs/qmp-commands.md documents. */
export function referenceRegistry(): CommandRegistry {
  return createBlockrepDaemon().qmp.registry;
}
