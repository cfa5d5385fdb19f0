import { BlockError, type BlockGraph } from '@blockrep/block';
import { lookupTlsCreds, type NbdExportInfo, NbdServer, type NbdSocketAddress } from '@blockrep/nbd';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';
import type { QmpServer } from '../server';

const InetSocketAddress = t.object('InetSocketAddress', {
  host: req(t.str, 'Host name or address to listen on'),
  port: req(t.str, 'Port number or service name'),
  numeric: opt(t.bool, 'Host and port are numeric (accepted, not used)'),
  'keep-alive': opt(t.bool, 'Enable TCP keep-alive (accepted, not used)'),
  to: opt(t.int, 'Highest port to try (accepted, not used)'),
  ipv4: opt(t.bool, 'Use IPv4 (accepted, not used)'),
  ipv6: opt(t.bool, 'Use IPv6 (accepted, not used)'),
});
const UnixSocketAddress = t.object('UnixSocketAddress', {
  path: req(t.str, 'Path of the socket'),
  abstract: opt(t.bool, 'Linux abstract socket namespace (accepted, not used)'),
  tight: opt(t.bool, 'Abstract address length is the name length (accepted, not used)'),
});
const SocketAddressType = t.enum('SocketAddressType', ['inet', 'unix']);

/** QAPI's flat SocketAddress (block-export-add, --nbd-server). */
export const SocketAddress = t.union(
  'SocketAddress',
  { type: req(SocketAddressType, 'The address family: inet (TCP) or unix') },
  'type',
  () => ({
    inet: InetSocketAddress.members,
    unix: UnixSocketAddress.members,
  }),
);

/** QAPI's SocketAddressLegacy (nbd-server-start): the variant's fields under `data`. */
const SocketAddressLegacy = t.union(
  'SocketAddressLegacy',
  { type: req(SocketAddressType, 'The address family: inet (TCP) or unix') },
  'type',
  () => ({
    inet: { data: req(InetSocketAddress, 'The TCP address') },
    unix: { data: req(UnixSocketAddress, 'The Unix socket') },
  }),
);

const BlockExportRemoveMode = t.enum('BlockExportRemoveMode', ['safe', 'hard']);
const BlockExportType = t.enum('BlockExportType', ['nbd']);

const BlockExportOptions = t.union(
  'BlockExportOptions',
  {
    type: req(BlockExportType, 'The export protocol (only nbd)'),
    id: req(t.str, 'The export id'),
    'fixed-iothread': opt(t.bool, 'Accepted for compatibility'),
    iothread: opt(t.str, 'Not supported'),
    'node-name': req(t.str, 'The node to export'),
    writable: opt(t.bool, 'Clients may write (default false)'),
    writethrough: opt(t.bool, 'Flush after every write (default false)'),
  },
  'type',
  () => ({
    nbd: {
      name: opt(t.str, 'The NBD export name (default: the node name)'),
      description: opt(t.str, 'Free-form description shown to clients'),
      bitmaps: opt(t.array(t.str), 'Dirty bitmaps exported as qemu:dirty-bitmap:NAME (at most one)'),
      'allocation-depth': opt(t.bool, 'Not supported'),
    },
  }),
);

interface SocketArgs {
  type: 'inet' | 'unix';
  host?: string;
  port?: string;
  path?: string;
}

/** A QAPI SocketAddress to the NBD server's address type. */
export function toNbdAddress(a: SocketArgs): NbdSocketAddress {
  return a.type === 'unix' ? { type: 'unix', path: a.path! } : { type: 'inet', host: a.host!, port: a.port! };
}

/**
 * The one NBD server of a daemon: nbd-server-start creates it, nbd-server-stop closes it; exports
 * are added by nbd-server-add or block-export-add.
 */
export class NbdServerHolder {
  server: NbdServer | null = null;
  onDeleted: ((info: NbdExportInfo) => void) | null = null;
  /** Told of NBD clients coming, choosing an export and going (the daemon logs them). */
  onClient:
    | ((e: { event: 'connect' | 'export' | 'disconnect'; peer?: string; export?: string }) => void)
    | null = null;

  constructor(readonly graph: BlockGraph) {}

  async start(
    addr: NbdSocketAddress,
    opts: { tlsCreds?: string; maxConnections?: number },
  ): Promise<NbdSocketAddress> {
    if (this.server) throw new BlockError('NBD server already running');
    const tls = opts.tlsCreds === undefined ? undefined : lookupTlsCreds(opts.tlsCreds);
    const server = new NbdServer(this.graph);
    server.on('export-deleted', (info: NbdExportInfo) => this.onDeleted?.(info));
    server.on('client', (e) => this.onClient?.(e));
    try {
      const bound = await server.listen(addr, { tlsCreds: tls, maxConnections: opts.maxConnections });
      this.server = server;
      return bound;
    } catch (e) {
      await server.close().catch(() => {});
      throw e;
    }
  }

  require(): NbdServer {
    if (!this.server) throw new BlockError('NBD server not running');
    return this.server;
  }

  async stop(): Promise<void> {
    const s = this.require();
    this.server = null;
    await s.close();
  }
}

export function registerNbdCommands(r: CommandRegistry, nbd: NbdServerHolder, server: QmpServer): void {
  nbd.onDeleted = (info) => server.emitEvent('BLOCK_EXPORT_DELETED', { id: info.id });

  r.registerCommand({
    name: 'nbd-server-start',
    args: t.object('q_obj_nbd-server-start-arg', {
      addr: req(SocketAddressLegacy, 'Where to listen'),
      'tls-creds': opt(t.str, 'The id of a tls-creds-x509 object: clients must use TLS'),
      'tls-authz': opt(t.str, 'Not supported'),
      'max-connections': opt(t.uint32, 'Most simultaneous clients (0: no limit)'),
    }),
    doc: 'Starts the NBD server.',
    examples: [
      { args: { addr: { type: 'inet', data: { host: '0.0.0.0', port: '10809' } } } },
      {
        title: 'On a Unix socket, clients authenticated with TLS',
        args: { addr: { type: 'unix', data: { path: '/run/blockrepd/nbd.sock' } }, 'tls-creds': 'tls0' },
      },
    ],
    async handler(a: {
      addr: { type: 'inet' | 'unix'; data: SocketArgs };
      'tls-creds'?: string;
      'max-connections'?: number;
    }) {
      await nbd.start(toNbdAddress({ ...a.addr.data, type: a.addr.type }), {
        tlsCreds: a['tls-creds'],
        maxConnections: a['max-connections'],
      });
    },
  });

  r.registerCommand({
    name: 'nbd-server-add',
    args: t.object('NbdServerAddOptions', {
      device: req(t.str, 'The node (or device) to export'),
      name: opt(t.str, 'Export name (default: the device)'),
      description: opt(t.str, 'Free-form description shown to clients'),
      writable: opt(t.bool, 'Clients may write (default false)'),
      bitmap: opt(t.str, 'A dirty bitmap of the node to export'),
    }),
    doc: 'Exports a node over the running NBD server (deprecated in QEMU in favour of block-export-add).',
    examples: [{ args: { device: 'disk0', name: 'disk0', writable: true } }],
    handler(a: { device: string; name?: string; description?: string; writable?: boolean; bitmap?: string }) {
      const s = nbd.require();
      const node = nbd.graph.lookup(a.device);
      s.addExport({
        node,
        name: a.name ?? a.device,
        description: a.description,
        writable: a.writable,
        bitmap: a.bitmap,
      });
    },
  });

  r.registerCommand({
    name: 'nbd-server-remove',
    args: t.object('q_obj_nbd-server-remove-arg', {
      name: req(t.str, 'The export name'),
      mode: opt(BlockExportRemoveMode, 'safe (default): refuse while clients are connected; hard: drop them'),
    }),
    doc: 'Removes an NBD export.',
    examples: [{ args: { name: 'disk0', mode: 'hard' } }],
    async handler(a: { name: string; mode?: 'safe' | 'hard' }) {
      await nbd.require().removeExport(a.name, a.mode ?? 'safe');
    },
  });

  r.registerCommand({
    name: 'nbd-server-stop',
    doc: 'Stops the NBD server and removes its exports.',
    examples: [{}],
    async handler() {
      await nbd.stop();
    },
  });

  r.registerCommand({
    name: 'block-export-add',
    args: BlockExportOptions,
    doc: 'Exports a node (type nbd: over the running NBD server).',
    examples: [{ args: { type: 'nbd', id: 'export0', 'node-name': 'disk0', name: 'disk0', writable: true } }],
    handler(a: {
      id: string;
      'node-name': string;
      writable?: boolean;
      writethrough?: boolean;
      iothread?: string;
      name?: string;
      description?: string;
      bitmaps?: string[];
      'allocation-depth'?: boolean;
    }) {
      if (a.iothread !== undefined) throw new BlockError('iothread is not supported by blockrep');
      if (a['allocation-depth']) throw new BlockError('allocation-depth is not supported by blockrep');
      if ((a.bitmaps?.length ?? 0) > 1) throw new BlockError('Only one bitmap can be exported');
      // QEMU looks the node up (by node name only) before it asks for the server.
      const node = nbd.graph.lookupBs(undefined, a['node-name']);
      const s = nbd.require();
      s.addExport({
        id: a.id,
        node,
        name: a.name ?? a['node-name'],
        description: a.description,
        writable: a.writable,
        bitmap: a.bitmaps?.[0],
      });
    },
  });

  r.registerCommand({
    name: 'block-export-del',
    args: t.object('q_obj_block-export-del-arg', {
      id: req(t.str, 'The export id'),
      mode: opt(BlockExportRemoveMode, 'safe (default): refuse while clients are connected; hard: drop them'),
    }),
    doc: 'Removes an export; BLOCK_EXPORT_DELETED follows once it is gone.',
    examples: [{ args: { id: 'export0' } }],
    async handler(a: { id: string; mode?: 'safe' | 'hard' }) {
      const s = nbd.server;
      if (!s?.exports().some((e) => e.id === a.id)) throw new BlockError(`Export '${a.id}' is not found`);
      await s.removeExport(a.id, a.mode ?? 'safe');
    },
  });

  r.registerCommand({
    name: 'query-block-exports',
    returns: t.array(
      t.object('BlockExportInfo', {
        id: req(t.str, 'The export id'),
        type: req(BlockExportType, 'The export protocol'),
        'node-name': req(t.str, 'The exported node'),
        'shutting-down': req(t.bool, 'Whether the export is being removed (waiting for clients to go)'),
      }),
    ),
    doc: 'The exports.',
    examples: [{ returns: [{ id: 'export0', type: 'nbd', 'node-name': 'disk0', 'shutting-down': false }] }],
    handler: () =>
      (nbd.server?.exports() ?? []).map((e) => ({
        id: e.id,
        type: 'nbd',
        'node-name': e.nodeName,
        'shutting-down': e.shuttingDown,
      })),
  });

  r.registerEvent({
    name: 'BLOCK_EXPORT_DELETED',
    data: t.object('q_obj_BLOCK_EXPORT_DELETED-arg', { id: req(t.str, 'The export id') }),
    doc: 'An export is gone: removed, its node closed, or the server stopped.',
    examples: [{ data: { id: 'export0' } }],
  });
}
