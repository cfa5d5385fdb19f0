import * as net from 'node:net';
import * as tls from 'node:tls';
import { BlockError, type IoVec, iovSlice } from '@blockrep/block';
import { ByteQueue } from '../byte-queue';
import {
  Cmd,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  isRepError,
  isReplyTypeError,
  MAX_PAYLOAD,
  NBDMAGIC,
  nbdToErrno,
  OPT_REPLY_MAGIC,
  Opt,
  REPLY_FLAG_DONE,
  REQUEST_MAGIC,
  Rep,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../protocol';
import { widenUnixSendBuffer } from '../send-buffer';
import type { NbdSocketAddress } from '../server/server';
import type { NbdTlsCreds } from '../tls';

/** What to connect to and what to negotiate. */
export interface NbdConnectOptions {
  server: NbdSocketAddress;
  /** Export name ('' is the default export). */
  export: string;
  tlsCreds?: NbdTlsCreds;
  /** Name the server certificate must carry (default: the inet host). */
  tlsHostname?: string;
  /** Metadata contexts to select (default: base:allocation). */
  metaContexts?: string[];
}

/** What the server told us about the export. */
export interface NbdExportDetails {
  size: number;
  /** Transmission flags (TxFlag). */
  flags: number;
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
  structured: boolean;
  /** Selected metadata contexts: name -> id. */
  contexts: Map<string, number>;
}

/** The connection to the server broke (requests may be retried on a new one). */
export class NbdConnectionLost extends BlockError {
  constructor(message = 'Connection to the NBD server closed') {
    super(message, { errno: 'EIO' });
  }
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes. */
  iov: IoVec | null;
  /** BLOCK_STATUS: descriptors per context id, as [length, flags, ...]. */
  extents: Map<number, number[]> | null;
  error: BlockError | null;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** Biggest non-data structured chunk payload accepted (block status, errors). */
const MAX_CHUNK = 4 << 20;
/** Size of the buffer a plain-TCP/Unix connection reads into. */
const READ_BUFFER = 1 << 20;

function describe(addr: NbdSocketAddress): string {
  return addr.type === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
}

/**
 * One client connection: handshake (fixed newstyle, optional STARTTLS, structured replies,
 * metadata contexts, NBD_OPT_GO with block sizes), then pipelined requests matched to replies
 * by handle. Read data is copied once, from the received chunks into the caller's buffers.
 */
export class NbdClientConnection {
  details!: NbdExportDetails;
  private socket: net.Socket;
  private readonly queue = new ByteQueue();
  private readonly pending = new Map<number, Pending>();
  private nextHandle = 1;
  private transmission = false;
  private dead: BlockError | null = null;
  /** Read payload still to arrive for `cur` at position `dataPos` of its vector. */
  private cur: Pending | null = null;
  private curHandle = 0;
  private curDone = false;
  private dataLeft = 0;
  private dataPos = 0;
  /** A structured chunk header waiting for its payload. */
  private chunk: { handle: number; flags: number; type: number; length: number } | null = null;
  private onLost: ((e: BlockError) => void) | null = null;
  private readonly onData = (b: Buffer) => {
    this.queue.push(b);
    if (this.transmission) this.pump();
  };

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.attach(socket);
  }

  /** Bytes read into the socket's reused buffer: parsed now, the rest copied out. */
  private readonly onStaticData = (b: Buffer) => {
    this.onData(b);
    this.queue.own();
  };

  private attach(s: net.Socket): void {
    s.on('data', this.onData);
    s.on('error', (e) => this.lost(new NbdConnectionLost(`NBD connection failed: ${e.message}`)));
    s.on('close', () => this.lost(new NbdConnectionLost()));
  }

  /** Connects and negotiates; throws a BlockError naming the server on failure. */
  static async connect(opts: NbdConnectOptions): Promise<NbdClientConnection> {
    // Without TLS the socket reads into one large reused buffer (fewer, bigger reads); what is
    // left unparsed after each read is copied out before the buffer is reused.
    let sink: ((b: Buffer) => void) | null = null;
    const early: Buffer[] = [];
    const onread = opts.tlsCreds
      ? undefined
      : {
          buffer: Buffer.allocUnsafe(READ_BUFFER),
          callback: (n: number, buf: Buffer) => {
            const b = buf.subarray(0, n);
            if (sink) sink(b);
            else early.push(Buffer.from(b));
            return true;
          },
        };
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s =
        opts.server.type === 'unix'
          ? net.connect({ path: opts.server.path, onread })
          : net.connect({ port: Number(opts.server.port), host: opts.server.host, onread });
      s.once('connect', () => resolve(s));
      s.once('error', (e) =>
        reject(
          new BlockError(`Failed to connect to '${describe(opts.server)}': ${e.message}`, { errno: 'EIO' }),
        ),
      );
    });
    socket.setNoDelay(true);
    if (opts.server.type === 'unix') widenUnixSendBuffer(socket);
    const conn = new NbdClientConnection(socket);
    if (onread) {
      sink = conn.onStaticData;
      for (const b of early) conn.onData(b);
    }
    try {
      await conn.handshake(opts);
    } catch (e) {
      socket.destroy();
      if (e instanceof BlockError) throw e;
      throw new BlockError(`NBD handshake with '${describe(opts.server)}' failed: ${(e as Error).message}`, {
        errno: 'EIO',
      });
    }
    return conn;
  }

  /** Called once when the connection breaks, with the error in-flight requests failed with. */
  set onConnectionLost(f: (e: BlockError) => void) {
    this.onLost = f;
  }

  get alive(): boolean {
    return this.dead === null;
  }

  // ---------------------------------------------------------------- handshake

  private sendOption(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.allocUnsafe(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  private async readOptionReply(opt: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.queue.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC)
      throw new BlockError('Bad option reply magic from the NBD server');
    if (h.readUInt32BE(8) !== opt) throw new BlockError('NBD server replied to the wrong option');
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > MAX_CHUNK) throw new BlockError('NBD option reply too long');
    return { type, data: Buffer.from(await this.queue.read(len)) };
  }

  private static repError(what: string, r: { type: number; data: Buffer }): BlockError {
    const msg = r.data.length ? `: ${r.data.toString()}` : '';
    const kind =
      r.type === Rep.ERR_TLS_REQD
        ? 'server requires TLS'
        : r.type === Rep.ERR_UNKNOWN
          ? 'export not found'
          : r.type === Rep.ERR_POLICY
            ? 'refused by server policy'
            : r.type === Rep.ERR_UNSUP
              ? 'not supported'
              : `error 0x${r.type.toString(16)}`;
    return new BlockError(`${what} failed: ${kind}${msg}`, { errno: 'EIO' });
  }

  private async handshake(opts: NbdConnectOptions): Promise<void> {
    const h = await this.queue.read(18);
    if (h.readBigUInt64BE(0) !== NBDMAGIC) throw new BlockError('Server is not an NBD server (bad magic)');
    if (h.readBigUInt64BE(8) !== IHAVEOPT)
      throw new BlockError('NBD server uses the unsupported oldstyle handshake');
    const hflags = h.readUInt16BE(16);
    const fixed = (hflags & FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (hflags & FLAG_NO_ZEROES) !== 0;
    const cf = Buffer.allocUnsafe(4);
    cf.writeUInt32BE((fixed ? FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? FLAG_C_NO_ZEROES : 0), 0);
    this.socket.write(cf);
    if (opts.tlsCreds) {
      if (!fixed) throw new BlockError('NBD server does not support fixed newstyle: no TLS possible');
      this.sendOption(Opt.STARTTLS);
      const r = await this.readOptionReply(Opt.STARTTLS);
      if (r.type !== Rep.ACK) throw NbdClientConnection.repError('NBD_OPT_STARTTLS', r);
      await this.startTls(opts);
    }
    const exportName = Buffer.from(opts.export);
    let structured = false;
    const contexts = new Map<string, number>();
    if (fixed) {
      this.sendOption(Opt.STRUCTURED_REPLY);
      const r = await this.readOptionReply(Opt.STRUCTURED_REPLY);
      if (r.type === Rep.ERR_TLS_REQD) throw NbdClientConnection.repError('NBD negotiation', r);
      structured = r.type === Rep.ACK;
      const wanted = opts.metaContexts ?? ['base:allocation'];
      if (structured && wanted.length) {
        const qs = wanted.map((q) => Buffer.from(q));
        const d = Buffer.allocUnsafe(8 + exportName.length + qs.reduce((n, q) => n + 4 + q.length, 0));
        d.writeUInt32BE(exportName.length, 0);
        exportName.copy(d, 4);
        d.writeUInt32BE(qs.length, 4 + exportName.length);
        let pos = 8 + exportName.length;
        for (const q of qs) {
          d.writeUInt32BE(q.length, pos);
          q.copy(d, pos + 4);
          pos += 4 + q.length;
        }
        this.sendOption(Opt.SET_META_CONTEXT, d);
        for (;;) {
          const m = await this.readOptionReply(Opt.SET_META_CONTEXT);
          if (m.type === Rep.META_CONTEXT && m.data.length >= 4) {
            contexts.set(m.data.toString('utf8', 4), m.data.readUInt32BE(0));
          } else break;
        }
      }
      const go = Buffer.allocUnsafe(4 + exportName.length + 2 + 2);
      go.writeUInt32BE(exportName.length, 0);
      exportName.copy(go, 4);
      go.writeUInt16BE(1, 4 + exportName.length);
      go.writeUInt16BE(Info.BLOCK_SIZE, 6 + exportName.length);
      this.sendOption(Opt.GO, go);
      const d: NbdExportDetails = {
        size: -1,
        flags: 0,
        minBlock: 1,
        preferredBlock: 4096,
        maxBlock: MAX_PAYLOAD,
        structured,
        contexts,
      };
      for (;;) {
        const r = await this.readOptionReply(Opt.GO);
        if (r.type === Rep.ACK) break;
        if (r.type === Rep.ERR_UNSUP) {
          d.size = -2;
          break;
        }
        if (isRepError(r.type)) throw NbdClientConnection.repError(`Opening export '${opts.export}'`, r);
        if (r.type !== Rep.INFO || r.data.length < 2) continue;
        const it = r.data.readUInt16BE(0);
        if (it === Info.EXPORT && r.data.length >= 12) {
          d.size = Number(r.data.readBigUInt64BE(2));
          d.flags = r.data.readUInt16BE(10);
        } else if (it === Info.BLOCK_SIZE && r.data.length >= 14) {
          d.minBlock = r.data.readUInt32BE(2);
          d.preferredBlock = r.data.readUInt32BE(6);
          d.maxBlock = r.data.readUInt32BE(10);
        }
      }
      if (d.size !== -2) {
        if (d.size < 0) throw new BlockError('NBD server sent no export information');
        this.details = d;
        this.enterTransmission();
        return;
      }
    }
    // Servers without NBD_OPT_GO: the old way, which cannot report errors.
    const h2 = Buffer.allocUnsafe(16);
    h2.writeBigUInt64BE(IHAVEOPT, 0);
    h2.writeUInt32BE(Opt.EXPORT_NAME, 8);
    h2.writeUInt32BE(exportName.length, 12);
    this.socket.write(Buffer.concat([h2, exportName]));
    const r = await this.queue.read(noZeroes ? 10 : 134);
    this.details = {
      size: Number(r.readBigUInt64BE(0)),
      flags: r.readUInt16BE(8),
      minBlock: 1,
      preferredBlock: 4096,
      maxBlock: MAX_PAYLOAD,
      structured,
      contexts: new Map(),
    };
    this.enterTransmission();
  }

  private async startTls(opts: NbdConnectOptions): Promise<void> {
    const raw = this.socket;
    raw.off('data', this.onData);
    raw.removeAllListeners('close');
    raw.removeAllListeners('error');
    const host = opts.tlsHostname ?? (opts.server.type === 'inet' ? opts.server.host : 'localhost');
    const secure = tls.connect({ socket: raw, ...opts.tlsCreds!.clientOptions(host) });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', (e) =>
        reject(new BlockError(`TLS handshake failed: ${e.message}`, { errno: 'EIO' })),
      );
    });
    this.socket = secure;
    this.attach(secure);
  }

  private enterTransmission(): void {
    this.transmission = true;
    if (this.queue.length) this.pump();
  }

  // ---------------------------------------------------------------- requests

  private send(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: IoVec | null,
    iov: IoVec | null = null,
    extents: Map<number, number[]> | null = null,
  ): Promise<void> {
    if (this.dead) return Promise.reject(this.dead);
    const handle = this.nextHandle;
    this.nextHandle = (this.nextHandle + 1) >>> 0 || 1;
    const h = Buffer.allocUnsafe(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(handle, 12);
    h.writeUInt32BE(Math.floor(offset / 0x100000000), 16);
    h.writeUInt32BE(offset >>> 0, 20);
    h.writeUInt32BE(length, 24);
    return new Promise<void>((resolve, reject) => {
      this.pending.set(handle, { type, offset, length, iov, extents, error: null, resolve, reject });
      if (payload) {
        this.socket.cork();
        this.socket.write(h);
        for (const b of payload) this.socket.write(b);
        this.socket.uncork();
      } else this.socket.write(h);
    });
  }

  read(offset: number, length: number, iov: IoVec, flags = 0): Promise<void> {
    return this.send(Cmd.READ, flags, offset, length, null, iov);
  }

  write(offset: number, iov: IoVec, length: number, flags = 0): Promise<void> {
    return this.send(Cmd.WRITE, flags, offset, length, iov);
  }

  /** FLUSH, TRIM, WRITE_ZEROES, CACHE: commands without payload either way. */
  command(type: number, flags: number, offset: number, length: number): Promise<void> {
    return this.send(type, flags, offset, length, null);
  }

  /** BLOCK_STATUS for one context: descriptors as [length, flags, ...]. */
  async blockStatus(contextId: number, offset: number, length: number, flags: number): Promise<number[]> {
    const extents = new Map<number, number[]>();
    await this.send(Cmd.BLOCK_STATUS, flags, offset, length, null, null, extents);
    const ext = extents.get(contextId);
    if (!ext || ext.length === 0)
      throw new BlockError('NBD server sent no block status for the context', { errno: 'EIO' });
    return ext;
  }

  /** Soft disconnect (NBD_CMD_DISC) once nothing is in flight; resolves when the socket is closed. */
  async disconnect(): Promise<void> {
    if (this.dead) return;
    if (this.transmission && this.pending.size === 0) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(REQUEST_MAGIC, 0);
      h.writeUInt16BE(Cmd.DISC, 6);
      this.socket.write(h);
    }
    this.dead = new NbdConnectionLost('NBD client closed');
    await new Promise<void>((r) => {
      if (this.socket.destroyed) return r();
      this.socket.once('close', () => r());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
  }

  /** Drops the connection at once (tests, hard shutdown). */
  destroy(): void {
    this.socket.destroy();
  }

  private lost(e: BlockError): void {
    this.queue.fail(e);
    const first = this.dead === null;
    this.dead ??= e;
    for (const p of this.pending.values()) p.reject(this.dead);
    this.pending.clear();
    this.cur = null;
    this.socket.destroy();
    if (first) this.onLost?.(this.dead);
  }

  private violation(what: string): void {
    this.lost(new NbdConnectionLost(`NBD protocol error from server: ${what}`));
  }

  private complete(handle: number, req: Pending): void {
    this.pending.delete(handle);
    if (req.error) req.reject(req.error);
    else req.resolve();
  }

  /** Parses every complete reply (and streams read payloads into their buffers). */
  private pump(): void {
    const q = this.queue;
    while (!this.dead) {
      if (this.dataLeft > 0) {
        const n = Math.min(this.dataLeft, q.length);
        if (n === 0) return;
        const req = this.cur!;
        for (const b of iovSlice(req.iov!, this.dataPos, n)) q.copyTo(b, 0, b.length);
        this.dataPos += n;
        this.dataLeft -= n;
        if (this.dataLeft > 0) return;
        this.cur = null;
        if (this.curDone) this.complete(this.curHandle, req);
        continue;
      }
      const c = this.chunk;
      if (c) {
        const need = c.type === ReplyType.OFFSET_DATA ? 8 : c.length;
        if (q.length < need) return;
        this.chunk = null;
        this.structuredChunk(c.handle, c.flags, c.type, c.length);
        continue;
      }
      if (q.length < 4) return;
      const magic = q.peekUInt32BE();
      if (magic === SIMPLE_REPLY_MAGIC) {
        if (q.length < 16) return;
        const h = q.take(16);
        const err = h.readUInt32BE(4);
        const handle = h.readUInt32BE(12);
        const req = this.pending.get(handle);
        if (!req || h.readUInt32BE(8) !== 0) {
          this.violation('reply to an unknown request');
          return;
        }
        if (err) {
          req.error = new BlockError(`NBD server error ${err}`, { errno: nbdToErrno(err) });
          this.complete(handle, req);
        } else if (req.type === Cmd.READ && req.length > 0) {
          if (this.details.structured) {
            this.violation('simple reply with data');
            return;
          }
          this.cur = req;
          this.curHandle = handle;
          this.curDone = true;
          this.dataPos = 0;
          this.dataLeft = req.length;
        } else this.complete(handle, req);
      } else if (magic === STRUCTURED_REPLY_MAGIC) {
        if (!this.details.structured) {
          this.violation('structured reply not negotiated');
          return;
        }
        if (q.length < 20) return;
        const h = q.take(20);
        if (h.readUInt32BE(8) !== 0) {
          this.violation('reply to an unknown request');
          return;
        }
        this.chunk = {
          flags: h.readUInt16BE(4),
          type: h.readUInt16BE(6),
          handle: h.readUInt32BE(12),
          length: h.readUInt32BE(16),
        };
        if (this.chunk.type !== ReplyType.OFFSET_DATA && this.chunk.length > MAX_CHUNK) {
          this.violation('reply chunk too long');
          return;
        }
      } else {
        this.violation('bad reply magic');
        return;
      }
    }
  }

  private structuredChunk(handle: number, flags: number, type: number, length: number): void {
    const q = this.queue;
    const req = this.pending.get(handle);
    if (!req) {
      this.violation('reply to an unknown request');
      return;
    }
    const done = (flags & REPLY_FLAG_DONE) !== 0;
    switch (type) {
      case ReplyType.NONE:
        if (length !== 0) {
          this.violation('NONE chunk with payload');
          return;
        }
        break;
      case ReplyType.OFFSET_DATA: {
        const b = q.take(8);
        const off = b.readUInt32BE(0) * 0x100000000 + b.readUInt32BE(4);
        const n = length - 8;
        if (req.type !== Cmd.READ || length < 9 || off < req.offset || off + n > req.offset + req.length) {
          this.violation('data chunk outside the request');
          return;
        }
        this.cur = req;
        this.curHandle = handle;
        this.curDone = done;
        this.dataPos = off - req.offset;
        this.dataLeft = n;
        return;
      }
      case ReplyType.OFFSET_HOLE: {
        const b = q.take(length);
        if (length !== 12 || req.type !== Cmd.READ) {
          this.violation('bad hole chunk');
          return;
        }
        const off = b.readUInt32BE(0) * 0x100000000 + b.readUInt32BE(4);
        const n = b.readUInt32BE(8);
        if (off < req.offset || off + n > req.offset + req.length) {
          this.violation('hole outside the request');
          return;
        }
        for (const v of iovSlice(req.iov!, off - req.offset, n)) v.fill(0);
        break;
      }
      case ReplyType.BLOCK_STATUS: {
        const b = q.take(length);
        if (req.type !== Cmd.BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0) {
          this.violation('bad block status chunk');
          return;
        }
        const ext: number[] = [];
        for (let p = 4; p < length; p += 4) ext.push(b.readUInt32BE(p));
        req.extents?.set(b.readUInt32BE(0), ext);
        break;
      }
      default: {
        const b = q.take(length);
        if (!isReplyTypeError(type)) {
          this.violation(`unknown chunk type ${type}`);
          return;
        }
        if (length < 6) {
          this.violation('error chunk too short');
          return;
        }
        const err = b.readUInt32BE(0);
        const mlen = b.readUInt16BE(4);
        if (mlen > length - 6) {
          this.violation('error message too long');
          return;
        }
        const msg = b.toString('utf8', 6, 6 + mlen);
        req.error ??= new BlockError(msg || `NBD server error ${err}`, { errno: nbdToErrno(err) });
      }
    }
    if (done) this.complete(handle, req);
  }
}
