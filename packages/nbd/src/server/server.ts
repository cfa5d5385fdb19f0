import { EventEmitter } from 'node:events';
import { chmodSync, unlinkSync } from 'node:fs';
import * as net from 'node:net';
import { BlockError, type BlockGraph } from '@blockrep/block';
import { widenUnixSendBuffer } from '../send-buffer';
import type { NbdTlsCreds } from '../tls';
import { NbdServerConnection } from './connection';
import { NbdExport, type NbdExportInfo, type NbdExportOptions } from './export';
import { RecvBuffers } from './recv-buffers';

/** Where a server listens (QAPI's SocketAddress, the inet and unix variants). */
export type NbdSocketAddress =
  | { type: 'inet'; host: string; port: number | string }
  | { type: 'unix'; path: string };

export interface NbdListenOptions {
  /** Require TLS on this listener (clients must NBD_OPT_STARTTLS first). */
  tlsCreds?: NbdTlsCreds;
  /** Most simultaneous connections on this listener; more are refused (0: no limit). */
  maxConnections?: number;
}

export interface NbdServerOptions {
  /** A client that has not finished the handshake by then is dropped (QEMU: 10 s). */
  handshakeTimeoutMs?: number;
}

interface Listener {
  server: net.Server;
  address: NbdSocketAddress;
}

/** How removeExport treats connected clients (QAPI's BlockExportRemoveMode). */
export type NbdRemoveMode = 'safe' | 'hard';

/**
 * An NBD server: listeners (TCP and Unix, each optionally TLS-only) and the exports they serve.
 * Events: `'export-deleted' (info: NbdExportInfo)` once an export is gone for good — removed,
 * its node closed, or the server closed (QEMU's BLOCK_EXPORT_DELETED); `'client' ({event:
 * 'connect' | 'export' | 'disconnect', peer, export?})` as clients come, choose an export and go.
 */
export class NbdServer extends EventEmitter {
  private readonly sockets: Listener[] = [];
  private readonly exportMap = new Map<string, NbdExport>();
  private readonly connections = new Set<NbdServerConnection>();
  private readonly handshakeTimeoutMs: number;

  constructor(
    readonly graph: BlockGraph,
    opts: NbdServerOptions = {},
  ) {
    super();
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 10_000;
  }

  /**
   * Starts listening; resolves with the bound address (port 0 picks a free port). A Unix socket
   * path that exists is replaced.
   */
  async listen(addr: NbdSocketAddress, opts: NbdListenOptions = {}): Promise<NbdSocketAddress> {
    if (opts.tlsCreds && opts.tlsCreds.endpoint !== 'server') {
      throw new BlockError('Expected TLS credentials for a server endpoint');
    }
    const ctx = {
      findExport: (name: string) => this.findExport(name),
      listExports: () => [...this.exportMap.values()].filter((e) => !e.shuttingDown),
      tlsCreds: opts.tlsCreds,
      handshakeTimeoutMs: this.handshakeTimeoutMs,
      onTransmission: (c: NbdServerConnection) =>
        this.emit('client', { event: 'export', peer: peers.get(c), export: c.exportName }),
    };
    const peers = new WeakMap<NbdServerConnection, string>();
    // Without TLS, each connection reads into recycled slabs (see withSlabReads).
    const slabs = !opts.tlsCreds;
    const server = net.createServer({ pauseOnConnect: slabs }, (accepted) => {
      if (addr.type === 'unix') widenUnixSendBuffer(accepted);
      const recv = slabs ? new RecvBuffers() : null;
      const socket = recv ? withSlabReads(accepted, recv) : accepted;
      const peer =
        addr.type === 'unix' ? `unix:${addr.path}` : `${accepted.remoteAddress}:${accepted.remotePort}`;
      const conn = new NbdServerConnection(
        socket,
        ctx,
        (c) => {
          this.connections.delete(c);
          this.emit('client', { event: 'disconnect', peer, export: c.exportName });
        },
        socket === accepted ? null : recv,
      );
      peers.set(conn, peer);
      this.connections.add(conn);
      this.emit('client', { event: 'connect', peer });
      conn.start();
    });
    if (opts.maxConnections) server.maxConnections = opts.maxConnections;
    server.on('error', () => {});
    await new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => reject(new BlockError(`Failed to listen: ${e.message}`, { cause: e }));
      server.once('error', fail);
      if (addr.type === 'unix') {
        try {
          unlinkSync(addr.path);
        } catch {
          // nothing to replace
        }
        // Only the daemon's user may connect (mode 0600), as the QMP sockets.
        server.listen(addr.path, () => {
          chmodSync(addr.path, 0o600);
          resolve();
        });
      } else {
        const port = typeof addr.port === 'string' ? Number.parseInt(addr.port, 10) : addr.port;
        if (!Number.isInteger(port) || port < 0 || port > 65535) {
          reject(new BlockError(`Invalid port '${addr.port}'`));
          return;
        }
        server.listen(port, addr.host, () => resolve());
      }
      server.once('listening', () => server.off('error', fail));
    });
    const bound = server.address();
    const address: NbdSocketAddress =
      addr.type === 'unix' || typeof bound !== 'object' || bound === null
        ? addr
        : { type: 'inet', host: addr.host, port: bound.port };
    this.sockets.push({ server, address });
    return address;
  }

  /** The addresses the server listens on. */
  addresses(): NbdSocketAddress[] {
    return this.sockets.map((l) => l.address);
  }

  private findExport(name: string): NbdExport | undefined {
    const e = this.exportMap.get(name);
    return e && !e.shuttingDown ? e : undefined;
  }

  /** Exports a node (nbd-server-add / block-export-add type=nbd). */
  addExport(opts: NbdExportOptions): NbdExportInfo {
    const name = opts.name ?? (typeof opts.node === 'string' ? opts.node : opts.node.nodeName);
    if (this.exportMap.has(name)) throw new BlockError(`NBD server already has export named '${name}'`);
    const id = opts.id ?? name;
    for (const e of this.exportMap.values()) {
      if (e.id === id) throw new BlockError(`Block export id '${id}' is already in use`);
    }
    const exp = new NbdExport(this.graph, { ...opts, name, id }, (x) => {
      this.deleteExport(x).catch(() => {});
    });
    this.exportMap.set(name, exp);
    return exp.info();
  }

  private lookupExport(idOrName: string): NbdExport {
    for (const e of this.exportMap.values()) if (e.id === idOrName) return e;
    const e = this.exportMap.get(idOrName);
    if (!e) throw new BlockError(`Export '${idOrName}' is not found`);
    return e;
  }

  /**
   * Removes an export. 'safe' refuses while clients are connected; 'hard' drops them first.
   * Resolves once the export is gone and 'export-deleted' has been emitted.
   */
  async removeExport(idOrName: string, mode: NbdRemoveMode = 'safe'): Promise<void> {
    const exp = this.lookupExport(idOrName);
    if (exp.shuttingDown) throw new BlockError(`Export '${exp.id}' is already shutting down`);
    if (mode === 'safe' && exp.clients.size > 0) {
      throw new BlockError(`export '${exp.id}' still in use (use mode='hard' to force client disconnect)`);
    }
    await this.deleteExport(exp);
  }

  private async deleteExport(exp: NbdExport): Promise<void> {
    if (exp.shuttingDown) return;
    const info = exp.info();
    await exp.shutdown();
    this.exportMap.delete(exp.name);
    this.emit('export-deleted', { ...info, clients: 0, shuttingDown: true });
  }

  /** Calls fn with each export deleted from now on (BLOCK_EXPORT_DELETED); returns an unsubscribe. */
  onExportDeleted(fn: (info: NbdExportInfo) => void): () => void {
    this.on('export-deleted', fn);
    return () => this.off('export-deleted', fn);
  }

  /** The export objects (their backends' I/O figures, their clients). */
  listExports(): NbdExport[] {
    return [...this.exportMap.values()];
  }

  /** The exports (query-block-exports). */
  exports(): NbdExportInfo[] {
    return [...this.exportMap.values()].map((e) => e.info());
  }

  /** Number of client connections (in any phase). */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Stops listening, lets each client's requests in flight finish and be answered, closes the
   * connections and removes every export.
   */
  async close(): Promise<void> {
    const listeners = this.sockets.splice(0);
    // close() resolves only once every connection is gone: stop accepting, then drop them.
    const stopped = listeners.map((l) => new Promise<void>((r) => l.server.close(() => r())));
    await Promise.all([...this.connections].map((c) => c.shutdown()));
    await Promise.all(stopped);
    for (const e of [...this.exportMap.values()]) await this.deleteExport(e);
  }
}

/**
 * Moves the accepted socket's handle to a socket that reads into `recv`'s slabs (Node's `onread`
 * with a buffer function): one read takes all the client has sent, not Node's 64 KiB, and no
 * ArrayBuffer is allocated per read. Falls back to the accepted socket where its handle is not
 * reachable (then it reads as usual).
 */
function withSlabReads(accepted: net.Socket, recv: RecvBuffers): net.Socket {
  const holder = accepted as unknown as { _handle: unknown };
  const handle = holder._handle;
  if (!handle) {
    accepted.resume();
    return accepted;
  }
  const socket: net.Socket = new net.Socket({
    handle,
    onread: {
      buffer: () => recv.next(),
      callback: (n: number) => {
        socket.emit('data', recv.received(n));
        return true;
      },
    },
  } as net.SocketConstructorOpts);
  // The accepted socket no longer owns the handle; destroying it once the new one has closed
  // only tells the server that the connection is gone (its count, maxConnections, close()).
  holder._handle = null;
  socket.once('close', () => accepted.destroy());
  return socket;
}
