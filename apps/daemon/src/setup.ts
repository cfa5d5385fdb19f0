import type { Socket } from 'node:net';
import { BlockError, coerceValue } from '@blockrep/block';
import { loadColoConfig } from '@blockrep/colo';
import {
  type BlockrepDaemon,
  createBlockrepDaemon,
  objectOptionsFromKeyval,
  toNbdAddress,
} from '@blockrep/qmp';
import type { DaemonArgs } from './args';
import type { Logger } from './log';
import type { MetricsServer } from './metrics';
import { attachLogging } from './observe';

/** An on/off option of the command line, as the block layer's option parser reads it. */
function bool(v: unknown, name: string): boolean | undefined {
  return v === undefined ? undefined : (coerceValue({ kind: 'bool' }, v, name) as boolean);
}

function str(v: unknown, name: string, required = false): string | undefined {
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string') throw new BlockError(`Parameter '${name}' is missing`);
  return v;
}

/** The listening sockets the daemon created (removed again on shutdown). */
export interface Running {
  daemon: BlockrepDaemon;
  sockets: string[];
  /** The Prometheus endpoint, with --metrics. */
  metrics: MetricsServer | null;
}

/** Carries out a parsed command line in order, as qemu-storage-daemon does. */
export async function setupDaemon(args: DaemonArgs, log: Logger, onQuit: () => void): Promise<Running> {
  // A bad COLO config is refused before anything starts.
  const colo = args.colo !== undefined ? loadColoConfig(args.colo) : null;
  const daemon = createBlockrepDaemon({ onQuit });
  attachLogging(daemon, log);
  const sockets: string[] = [];
  let metrics: MetricsServer | null = null;
  if (args.metrics) {
    try {
      // prom-client is loaded only when asked for (it costs a daemon without --metrics memory).
      const { startMetrics } = await import('./metrics');
      metrics = await startMetrics(daemon, args.metrics.host, args.metrics.port);
    } catch (e) {
      throw new BlockError(`--metrics ${args.metrics.host}:${args.metrics.port}: ${(e as Error).message}`);
    }
    log.info('metrics listening', { url: `http://${metrics.address.host}:${metrics.address.port}/metrics` });
  }
  for (const action of args.actions) {
    try {
      await carryOut(action);
    } catch (e) {
      // Named by the option, as qemu-storage-daemon names it: "--blockdev driver=x: ...".
      throw new BlockError(`${action.text}: ${(e as Error).message}`, { cause: e });
    }
  }
  if (colo) {
    await daemon.startColo(colo, (level, msg, fields) => log.log(level, msg, { colo: colo.pair, ...fields }));
    metrics?.watchColo();
    for (const a of [colo.guest.address, colo.host.channel, colo.host.replication])
      if (a.type === 'unix') sockets.push(a.path);
  }
  return { daemon, sockets, metrics };

  async function carryOut(action: DaemonArgs['actions'][number]): Promise<void> {
    switch (action.kind) {
      case 'blockdev': {
        const node = await daemon.graph.blockdevAdd(action.options);
        log.info('blockdev added', { node: node.nodeName, driver: node.driver.name });
        break;
      }
      case 'object': {
        // The same code as object-add (QAPI checks, texts, the QOM tree).
        daemon.objects.add(objectOptionsFromKeyval(action.options));
        log.info('object added', { id: action.options.id, type: action.options['qom-type'] });
        break;
      }
      case 'nbd-server': {
        const o = action.options;
        const addr = (o.addr ?? {}) as { type?: string; host?: string; port?: string; path?: string };
        // QAPI's checks, in its order and with its texts.
        if (addr.type === undefined) throw new BlockError("Parameter 'addr.type' is missing");
        if (addr.type !== 'inet' && addr.type !== 'unix')
          throw new BlockError(`Parameter 'type' does not accept value '${addr.type}'`);
        for (const k of addr.type === 'inet' ? ['host', 'port'] : ['path']) {
          if (addr[k as 'host'] === undefined) throw new BlockError(`Parameter 'addr.${k}' is missing`);
        }
        const max = o['max-connections'] === undefined ? undefined : Number(o['max-connections']);
        const bound = await daemon.nbd.start(toNbdAddress(addr as { type: 'inet' | 'unix' }), {
          tlsCreds: str(o['tls-creds'], 'tls-creds'),
          maxConnections: max,
        });
        if (bound.type === 'unix') sockets.push(bound.path);
        log.info('NBD server listening', { address: bound });
        break;
      }
      case 'export': {
        const o = action.options;
        if (o.type === undefined) throw new BlockError("Parameter 'type' is missing");
        if (o.type !== 'nbd') throw new BlockError(`Parameter 'type' does not accept value '${o.type}'`);
        const id = str(o.id, 'id', true);
        const nodeName = str(o['node-name'], 'node-name', true)!;
        const node = daemon.graph.lookupBs(undefined, nodeName);
        const bitmaps = Array.isArray(o.bitmaps)
          ? (o.bitmaps as string[])
          : o.bitmap
            ? [o.bitmap as string]
            : undefined;
        const s = daemon.nbd.require();
        s.addExport({
          id,
          node,
          name: str(o.name, 'name') ?? nodeName,
          description: str(o.description, 'description'),
          writable: bool(o.writable, 'writable'),
          bitmap: bitmaps?.[0],
        });
        log.info('export added', { id: o.id, node: nodeName });
        break;
      }
      case 'chardev': {
        const { listenPath } = await daemon.chardevs.addFromOptions(action.options);
        if (listenPath !== undefined) sockets.push(listenPath);
        break;
      }
      case 'monitor': {
        const o = action.options;
        const id = str(o.chardev, 'chardev', true)!;
        if (o.mode !== undefined && o.mode !== 'control')
          throw new BlockError('Only mode=control is supported');
        // Each stream of the chardev (each connection of a listening socket) gets a monitor.
        daemon.chardevs.open(id, (stream) => daemon.qmp.attach(stream as Socket));
        log.info('QMP monitor', { chardev: id });
        break;
      }
      case 'qmp': {
        const a = action.address;
        if (a.type === 'unix') {
          await daemon.qmp.listenUnix(a.path);
          sockets.push(a.path);
          log.info('QMP listening', { path: a.path });
        } else {
          const port = await daemon.qmp.listenTcp(a.port, a.host);
          log.info('QMP listening', { host: a.host, port });
        }
        break;
      }
    }
  }
}
