import type { Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { BlockError, coerceValue, type Options } from '@blockrep/block';
import { loadColoConfig } from '@blockrep/colo';
import {
  type BlockrepDaemon,
  createBlockrepDaemon,
  objectOptionsFromKeyval,
  toNbdAddress,
} from '@blockrep/qmp';
import type { DaemonArgs } from './args';
import type { Logger } from './log';

/** An on/off option of the command line, as the block layer's option parser reads it. */
function bool(v: unknown, name: string): boolean | undefined {
  return v === undefined ? undefined : (coerceValue({ kind: 'bool' }, v, name) as boolean);
}

function str(v: unknown, name: string, required = false): string | undefined {
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string') throw new BlockError(`Parameter '${name}' is missing`);
  return v;
}

/** The chardev backends QEMU knows (blockrepd has socket and stdio). */
const QEMU_CHARDEVS = [
  'null',
  'socket',
  'udp',
  'pipe',
  'file',
  'stdio',
  'ringbuf',
  'memory',
  'pty',
  'serial',
  'parallel',
];

/** The listening sockets the daemon created (removed again on shutdown). */
export interface Running {
  daemon: BlockrepDaemon;
  sockets: string[];
}

/** Carries out a parsed command line in order, as qemu-storage-daemon does. */
export async function setupDaemon(args: DaemonArgs, log: Logger, onQuit: () => void): Promise<Running> {
  // A bad COLO config is refused before anything starts.
  const colo = args.colo !== undefined ? loadColoConfig(args.colo) : null;
  const daemon = createBlockrepDaemon({ onQuit });
  const sockets: string[] = [];
  const chardevs = new Map<string, Options>();
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
    for (const a of [colo.guest.address, colo.host.channel, colo.host.replication])
      if (a.type === 'unix') sockets.push(a.path);
  }
  return { daemon, sockets };

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
        const o = action.options;
        if (o.backend === 'stdio') {
          // A monitor on the daemon's stdin and stdout (how QEMU's own tests drive it).
          for (const k of Object.keys(o)) {
            if (!['backend', 'id', 'signal'].includes(k)) throw new BlockError(`Invalid parameter '${k}'`);
          }
          if ([...chardevs.values()].some((c) => c.backend === 'stdio'))
            throw new BlockError('cannot use stdio by multiple character devices');
          bool(o.signal, 'signal');
        } else if (o.backend !== 'socket') {
          throw new BlockError(
            QEMU_CHARDEVS.includes(String(o.backend))
              ? `chardev backend '${o.backend}' is not supported by blockrepd (socket and stdio are)`
              : `'${o.backend}' is not a valid char driver name`,
          );
        }
        chardevs.set(str(o.id, 'id', true)!, o);
        break;
      }
      case 'monitor': {
        const o = action.options;
        const id = str(o.chardev, 'chardev', true)!;
        const c = chardevs.get(id);
        if (!c) throw new BlockError(`chardev "${id}" not found`);
        if (o.mode !== undefined && o.mode !== 'control')
          throw new BlockError('Only mode=control is supported');
        if (c.backend === 'stdio') {
          const stdio = Duplex.from({ readable: process.stdin, writable: process.stdout });
          daemon.qmp.attach(stdio as unknown as Socket);
          log.info('QMP on stdio', {});
          break;
        }
        if (bool(c.server, 'server') === false) throw new BlockError('Only server=on chardevs are supported');
        if (typeof c.path === 'string') {
          await daemon.qmp.listenUnix(c.path);
          sockets.push(c.path);
          log.info('QMP listening', { path: c.path });
        } else {
          const port = await daemon.qmp.listenTcp(Number(c.port), str(c.host, 'host') ?? '127.0.0.1');
          log.info('QMP listening', { host: c.host, port });
        }
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
