import { BlockError, type BlockGraph, createGraph } from '@blockrep/block';
import { type ColoConfig, ColoService } from '@blockrep/colo';
import { filterDrivers } from '@blockrep/filters';
import { JobManager } from '@blockrep/jobs';
import { nbdDriver, setTlsObjectLookup } from '@blockrep/nbd';
import { qcow2Driver } from '@blockrep/qcow2';
import { ReplicationManager } from '@blockrep/replication';
import { createBlockQmpServer } from './block-server';
import { registerBlockJobCommands } from './commands/block-jobs';
import { ChardevRegistry, registerChardevCommands } from './commands/chardev';
import { type ColoHolder, registerColoCommands } from './commands/colo';
import type { BlockdevCreators } from './commands/create';
import { registerIothreadCommand } from './commands/iothread';
import { registerMirrorCommands } from './commands/mirror';
import { NbdServerHolder, registerNbdCommands } from './commands/nbd';
import { qcow2Creator } from './commands/qcow2-create';
import { type QomObjects, registerQomCommands } from './commands/qom';
import { registerReplicationCommands } from './commands/replication';
import { registerTransactionCommand } from './commands/transaction';
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
  colo: ColoHolder;
  /** The character devices (--chardev and chardev-add); monitors are their frontends. */
  chardevs: ChardevRegistry;
  /** The QOM tree: object-add's objects (also what --object creates). */
  objects: QomObjects;
  /** Runs this daemon as one host of a COLO pair (blockrepd --colo FILE). */
  startColo(
    config: ColoConfig,
    log?: ConstructorParameters<typeof ColoService>[0]['log'],
  ): Promise<ColoService>;
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
  registerTransactionCommand(server.registry, graph, jobs);
  registerReplicationCommands(server.registry, graph, replication);
  const colo: ColoHolder = { service: null };
  registerColoCommands(server.registry, colo);
  const chardevs = new ChardevRegistry();
  registerChardevCommands(server.registry, chardevs);
  const objects = registerQomCommands(server.registry);
  // TLS credential lookups tell an object of another type from none at all, as QEMU does.
  setTlsObjectLookup((id) => objects.root.children.get('objects')?.children.has(id) ?? false);
  registerIothreadCommand(server.registry, graph, objects);
  // Only the events the schema declares reach the monitors (query-qmp-schema stays true).
  const declared = new Set(server.registry.events().map((e) => e.name));
  const unsubscribe = graph.onEvent((name, data) => {
    if (declared.has(name)) server.emitEvent(name, data);
  });
  let down: Promise<void> | null = null;
  const shutdown = () => {
    down ??= (async () => {
      unsubscribe();
      await colo.service?.stop().catch(() => {});
      await server.close().catch(() => {});
      await chardevs.closeAll();
      await jobs.cancelAll().catch(() => {});
      if (nbd.server) await nbd.stop().catch(() => {});
      await graph.closeAll();
    })();
    return down;
  };
  const startColo: BlockrepDaemon['startColo'] = async (config, log) => {
    if (colo.service) throw new BlockError('COLO is already running');
    const svc = new ColoService({
      config,
      graph,
      jobs,
      replication,
      log,
      emitEvent: (name, data) => server.emitEvent(name, data),
    });
    colo.service = svc;
    try {
      await svc.start();
    } catch (e) {
      colo.service = null;
      await svc.stop().catch(() => {});
      throw e;
    }
    return svc;
  };
  return {
    graph,
    jobs,
    replication,
    nbd,
    qmp: server,
    creators,
    colo,
    chardevs,
    objects,
    startColo,
    shutdown,
  };
}

/** The registry of a whole daemon: what docs/qmp-commands.md documents. */
export function referenceRegistry(): CommandRegistry {
  return createBlockrepDaemon().qmp.registry;
}
