import {
  type BlockDriver,
  BlockError,
  type BlockNode,
  type OptionSchema,
  opt,
  ReqFlags,
} from '@blockrep/block';
import {
  Cmd,
  CmdFlag,
  CONTEXT_BASE_ALLOCATION,
  CONTEXT_DIRTY_BITMAP_PREFIX,
  STATE_HOLE,
  STATE_ZERO,
  TxFlag,
} from '../protocol';
import type { NbdSocketAddress } from '../server/server';
import { lookupTlsCreds } from '../tls';
import { NbdClientSession } from './session';

interface NbdNodeState {
  session: NbdClientSession;
  address: NbdSocketAddress;
  exportName: string;
  /** Context whose descriptors answer blockStatus (base:allocation or x-dirty-bitmap's). */
  statusContext: number | undefined;
}

const st = (node: BlockNode) => node.opaque as NbdNodeState;

const SERVER_SCHEMA: OptionSchema = {
  server: {
    type: {
      kind: 'union',
      tag: 'type',
      variants: {
        inet: {
          host: opt.string('Host name or IP address', { required: true }),
          port: {
            type: { kind: 'alternate', of: [{ kind: 'string' }, { kind: 'int', min: 0, max: 65535 }] },
            doc: 'Port (default 10809)',
          },
          numeric: opt.bool('Host and port are numeric (accepted for compatibility)'),
          to: opt.int('Highest port to try (accepted for compatibility)'),
          ipv4: opt.bool('Use IPv4 (accepted for compatibility)'),
          ipv6: opt.bool('Use IPv6 (accepted for compatibility)'),
          'keep-alive': opt.bool('Enable TCP keep-alive (accepted for compatibility)'),
        },
        unix: {
          path: opt.string('Unix socket path', { required: true }),
          abstract: opt.bool('Abstract socket namespace (not supported)'),
          tight: opt.bool('Abstract socket length (not supported)'),
        },
      },
    },
    doc: 'The NBD server: {type: inet, host, port} or {type: unix, path}',
  },
};

/**
 * Parses nbd://host[:port]/export, nbd+unix:///export?socket=path (and nbds:// is refused: TLS
 * needs tls-creds).
 */
export function parseNbdUri(uri: string): { server: NbdSocketAddress; export: string } {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new BlockError(`Invalid NBD URI '${uri}'`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd:' || u.protocol === 'nbd+tcp:') {
    return {
      server: { type: 'inet', host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port || '10809' },
      export: exportName,
    };
  }
  if (u.protocol === 'nbd+unix:') {
    const path = u.searchParams.get('socket');
    if (!path) throw new BlockError(`NBD URI '${uri}' lacks ?socket=`);
    return { server: { type: 'unix', path }, export: exportName };
  }
  throw new BlockError(`Unsupported NBD URI scheme in '${uri}'`);
}

function uriOf(s: NbdNodeState): string {
  const name = encodeURIComponent(s.exportName);
  return s.address.type === 'unix'
    ? `nbd+unix:///${name}?socket=${s.address.path}`
    : `nbd://${s.address.host}:${s.address.port}/${name}`;
}

const ALIGN_DOWN = (v: number, a: number) => v - (v % a);

/**
 * The nbd protocol driver: a remote NBD export as a block node. Options as QEMU's
 * BlockdevOptionsNbd: server, export, tls-creds, tls-hostname, x-dirty-bitmap,
 * reconnect-delay, open-timeout (plus `filename` for an nbd:// URI).
 */
export const nbdDriver: BlockDriver = {
  name: 'nbd',
  protocol: true,
  options: {
    ...SERVER_SCHEMA,
    export: opt.string('Export name (default: the empty name)'),
    filename: opt.string(
      'An NBD URI (nbd://host:port/export, nbd+unix:///export?socket=path) instead of server/export',
    ),
    'tls-creds': opt.string('Id of registered TLS credentials (endpoint client): negotiate TLS'),
    'tls-hostname': opt.string('Name the server certificate must carry (default: the host)'),
    'x-dirty-bitmap': opt.string('Report this server bitmap (qemu:dirty-bitmap:NAME) as block status'),
    'reconnect-delay': opt.int('Seconds requests wait for a reconnection before failing (0: fail at once)', {
      min: 0,
      max: 2 ** 31 - 1,
    }),
    'open-timeout': opt.int('Seconds to keep retrying the first connection', { min: 0, max: 2 ** 31 - 1 }),
  },
  supportedWriteFlags: ReqFlags.FUA,

  async open(node, opts) {
    let server = opts.server as NbdSocketAddress | undefined;
    let exportName = opts.export as string | undefined;
    if (opts.filename !== undefined) {
      if (server) throw new BlockError('No server and filename at once');
      const p = parseNbdUri(opts.filename as string);
      server = p.server;
      exportName ??= p.export;
    }
    if (!server) throw new BlockError("Parameter 'server' is missing");
    // QEMU's default NBD port when none is given.
    if (server.type === 'inet' && (server.port === undefined || server.port === ''))
      server = { ...server, port: '10809' };
    exportName ??= '';
    const bitmap = opts['x-dirty-bitmap'] as string | undefined;
    const statusName = bitmap !== undefined ? CONTEXT_DIRTY_BITMAP_PREFIX + bitmap : CONTEXT_BASE_ALLOCATION;
    const session = new NbdClientSession({
      server,
      export: exportName,
      tlsCreds: opts['tls-creds'] !== undefined ? lookupTlsCreds(opts['tls-creds'] as string) : undefined,
      tlsHostname: opts['tls-hostname'] as string | undefined,
      metaContexts: [statusName],
      reconnectDelay: (opts['reconnect-delay'] as number | undefined) ?? 0,
      openTimeout: (opts['open-timeout'] as number | undefined) ?? 0,
    });
    await session.open();
    const d = session.details;
    if (d.flags & TxFlag.READ_ONLY && !node.readOnly) {
      if (node.autoReadOnly) node.readOnly = true;
      else {
        await session.close();
        throw new BlockError(`NBD export '${exportName}' is read-only`, { errno: 'EACCES' });
      }
    }
    if (bitmap !== undefined && !d.contexts.has(statusName)) {
      await session.close();
      throw new BlockError(`requested x-dirty-bitmap ${bitmap} not found`);
    }
    node.opaque = {
      session,
      address: server,
      exportName,
      statusContext: d.contexts.get(statusName),
    } satisfies NbdNodeState;
  },

  async close(node) {
    await st(node)?.session.close();
  },

  limits(node) {
    const d = st(node).session.details;
    const min = Math.max(1, d.minBlock);
    const max = Math.max(min, ALIGN_DOWN(Math.min(d.maxBlock, 32 << 20), min));
    const bigOp = ALIGN_DOWN(2 ** 31, min);
    return {
      requestAlignment: min,
      maxTransfer: max,
      optimalTransfer: d.preferredBlock,
      maxPwriteZeroes: bigOp,
      maxPdiscard: bigOp,
      pdiscardAlignment: min,
    };
  },

  getLength: (node) => st(node).session.details.size,

  filename: (node) => uriOf(st(node)),

  read(node, offset, bytes, iov) {
    return st(node).session.run((c) => c.read(offset, bytes, iov));
  },

  async write(node, offset, bytes, iov, flags) {
    const s = st(node).session;
    const fua = (flags & ReqFlags.FUA) !== 0;
    const native = (s.details.flags & TxFlag.SEND_FUA) !== 0;
    await s.run((c) => c.write(offset, iov, bytes, fua && native ? CmdFlag.FUA : 0));
    if (fua && !native) await s.run((c) => c.command(Cmd.FLUSH, 0, 0, 0));
  },

  async writeZeroes(node, offset, bytes, flags) {
    const s = st(node).session;
    const f = s.details.flags;
    if (!(f & TxFlag.SEND_WRITE_ZEROES))
      throw new BlockError('NBD server cannot write zeroes', { errno: 'ENOTSUP' });
    let nf = flags & ReqFlags.MAY_UNMAP ? 0 : CmdFlag.NO_HOLE;
    if (flags & ReqFlags.FAST_ZERO) {
      if (!(f & TxFlag.SEND_FAST_ZERO))
        throw new BlockError('NBD server cannot zero fast', { errno: 'ENOTSUP' });
      nf |= CmdFlag.FAST_ZERO;
    }
    if (flags & ReqFlags.FUA && f & TxFlag.SEND_FUA) nf |= CmdFlag.FUA;
    await s.run((c) => c.command(Cmd.WRITE_ZEROES, nf, offset, bytes));
  },

  async discard(node, offset, bytes) {
    const s = st(node).session;
    if (!(s.details.flags & TxFlag.SEND_TRIM)) return;
    await s.run((c) => c.command(Cmd.TRIM, 0, offset, bytes));
  },

  // To the OS, as QEMU's client: sent on every flush, even with nothing written since the last
  // one (the server may hold writes of other clients; a quorum above reports a failing flush).
  async flushToOs(node) {
    const s = st(node).session;
    if (!(s.details.flags & TxFlag.SEND_FLUSH)) return;
    await s.run((c) => c.command(Cmd.FLUSH, 0, 0, 0));
  },

  async blockStatus(node, offset, bytes) {
    const state = st(node);
    const ctx = state.statusContext;
    if (ctx === undefined) return { bytes, data: true, zero: false, allocated: true, offset, file: node };
    const d = state.session.details;
    const min = Math.max(1, d.minBlock);
    // A query is at most 2^32-1 bytes and, but at the end of the export, whole blocks.
    let len = Math.min(bytes, ALIGN_DOWN(2 ** 31, min));
    if (offset + len < d.size) len = Math.max(min, ALIGN_DOWN(len, min));
    const ext = await state.session.run((c) => c.blockStatus(ctx, offset, len, CmdFlag.REQ_ONE));
    const n = Math.min(ext[0]!, bytes);
    if (n <= 0) throw new BlockError('NBD server sent an empty block status extent', { errno: 'EIO' });
    const f = ext[1]!;
    return {
      bytes: n,
      data: !(f & STATE_HOLE),
      zero: (f & STATE_ZERO) !== 0,
      allocated: true,
      offset,
      file: node,
    };
  },

  info(node) {
    const s = st(node);
    return { export: s.exportName, server: s.address };
  },
};

/**
 * Drops an nbd node's connection as a network failure would: requests in flight fail at once
 * instead of waiting for TCP to give up (a COLO primary cutting off a partitioned secondary).
 */
export function nbdBreakConnection(node: BlockNode): void {
  if (node.driver !== nbdDriver) throw new BlockError(`'${node.nodeName}' is not an nbd node`);
  st(node)?.session.breakConnection();
}
