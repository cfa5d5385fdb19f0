import type * as net from 'node:net';
import * as tls from 'node:tls';
import { ReqFlags, toBlockError } from '@blockrep/block';
import { replyBuffers } from '../buffer-pool';
import { ByteQueue } from '../byte-queue';
import {
  Cmd,
  CmdFlag,
  errnoToNbd,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  MAX_OPTION_LENGTH,
  NBDMAGIC,
  NbdErr,
  Opt,
  REPLY_FLAG_DONE,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  Rep,
  ReplyType,
} from '../protocol';
import type { NbdTlsCreds } from '../tls';
import type { BlockSizeConstraints, ExportClient, NbdExport } from './export';
import { bitmapExtents, chainExtents, readRuns } from './extents';
import {
  infoOption,
  listOption,
  type MetaContext,
  metaContextOption,
  type OptionReplies,
  optionReply,
} from './options';
import type { RecvBuffers } from './recv-buffers';
import {
  errorChunk,
  OFFSET_DATA_HEADER,
  offsetDataHeader,
  offsetHoleChunk,
  SIMPLE_HEADER,
  STRUCTURED_HEADER,
  simpleReply,
  structuredHeader,
  writeSimpleHeader,
} from './replies';

/** What a connection needs from its server. */
export interface ConnectionContext {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  tlsCreds: NbdTlsCreds | undefined;
  handshakeTimeoutMs: number;
  /** A client entered transmission on an export (the server's 'client' event). */
  onTransmission?(c: NbdServerConnection): void;
}

/** A client broke the protocol: the connection is dropped (the spec's hard disconnect). */
class ProtocolViolation extends Error {}

/** Flags each command accepts (FUA is valid on all of them once SEND_FUA is advertised). */
const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.DISC]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
};

/** Backpressure: stop reading requests while this much is in flight or waiting to be sent. */
const MAX_IN_FLIGHT = 256;
const MAX_IN_FLIGHT_BYTES = 64 << 20;
const MAX_UNSENT_BYTES = 32 << 20;
/** Most descriptors in one block status reply chunk. */
const MAX_EXTENTS = 2048;

/**
 * One client connection: the fixed newstyle handshake (async, small), then the transmission
 * phase, parsed synchronously from the received chunks so that a write's payload is handed to
 * the block layer as views of what the socket delivered. Replies go out as soon as each request
 * completes (out of order), each as one socket write of header and data.
 */
export class NbdServerConnection implements ExportClient {
  private socket: net.Socket;
  private readonly queue: ByteQueue;
  private phase: 'handshake' | 'transmission' | 'disconnecting' | 'closed' = 'handshake';
  private exp: NbdExport | null = null;
  private structured = false;
  private tlsActive = false;
  private noZeroes = false;
  private contexts: MetaContext[] = [];
  private contextExport: string | null = null;
  private blockSizeAcked = false;
  private sizes: BlockSizeConstraints = { min: 1, preferred: 4096, max: 32 << 20 };
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  /** A WRITE whose header was parsed and whose payload is still arriving. */
  private awaiting: { hi: number; lo: number; offset: number; length: number; flags: number } | null = null;
  /** Payload bytes to drop (a rejected WRITE), and the reply to send once they are gone. */
  private discardLeft = 0;
  private afterDiscard: (() => void) | null = null;
  private idleWaiters: (() => void)[] = [];
  private handshakeTimer: NodeJS.Timeout | null = null;
  private readonly onData = (chunk: Buffer) => {
    this.queue.push(chunk);
    if (this.phase === 'transmission') this.pump();
  };
  private readonly onClose = () => this.closed();
  private readonly onDrain = () => this.maybeResume();

  constructor(
    socket: net.Socket,
    private readonly ctx: ConnectionContext,
    private readonly onGone: (c: NbdServerConnection) => void,
    /** The slabs the socket reads into, when it does (see RecvBuffers). */
    private readonly recv: RecvBuffers | null = null,
  ) {
    this.queue = new ByteQueue(recv ? (c) => recv.release([c]) : undefined);
    this.socket = socket;
    socket.setNoDelay(true);
    this.attach(socket);
  }

  private attach(s: net.Socket): void {
    s.on('data', this.onData);
    s.on('close', this.onClose);
    s.on('error', () => s.destroy());
    s.on('drain', this.onDrain);
  }

  private detachListeners(s: net.Socket): void {
    s.off('data', this.onData);
    s.off('close', this.onClose);
    s.off('drain', this.onDrain);
  }

  /** Runs the handshake; the transmission phase then runs from socket events. */
  start(): void {
    this.handshakeTimer = setTimeout(() => {
      if (this.phase === 'handshake') this.socket.destroy();
    }, this.ctx.handshakeTimeoutMs);
    this.negotiate().catch(() => {
      if (this.phase === 'handshake') this.socket.destroy();
    });
  }

  /** The export this client is connected to (after the handshake). */
  get export(): NbdExport | null {
    return this.exp;
  }

  /** Drops the connection now; resolves when requests already running have finished. */
  abort(_reason: string): Promise<void> {
    this.socket.destroy();
    return this.idle();
  }

  /**
   * Server shutdown as the spec asks: read no further requests, let those in flight finish and
   * their replies go out, then close (dropping the connection if that takes over graceMs).
   */
  async shutdown(graceMs = 5000): Promise<void> {
    if (this.phase !== 'transmission') {
      this.socket.destroy();
      return this.idle();
    }
    this.phase = 'disconnecting';
    this.socket.pause();
    const timer = setTimeout(() => this.socket.destroy(), graceMs);
    await this.idle();
    await new Promise<void>((r) => {
      if (this.socket.destroyed) return r();
      this.socket.once('close', () => r());
      this.socket.end();
      // Read on (and drop) until the client closes: a paused socket never sees its end.
      this.socket.resume();
    });
    clearTimeout(timer);
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** The export the client uses, once it chose one. */
  get exportName(): string | undefined {
    return this.exp?.name;
  }

  private closed(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.queue.fail();
    this.queue.clear();
    this.awaiting = null;
    this.exp?.clients.delete(this);
    this.onGone(this);
  }

  // ---------------------------------------------------------------- handshake

  /**
   * Queues bytes for the client. Replies completed in one turn of the event loop leave in one
   * writev: the socket is corked at the first and uncorked once the turn's callbacks have run.
   */
  private send(b: Buffer, written?: () => void): void {
    const s = this.socket;
    if (s.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      s.cork();
      setImmediate(this.uncork);
    }
    s.write(b, written);
  }

  private corked = false;
  private readonly uncork = () => {
    this.corked = false;
    this.socket.uncork();
  };

  private optReply(opt: number, type: number, data?: Buffer): void {
    this.send(optionReply(opt, type, data));
  }

  private optError(opt: number, type: number, message: string): void {
    this.optReply(opt, type, Buffer.from(message));
  }

  private readonly optReplies: OptionReplies = {
    reply: (opt, type, data) => this.optReply(opt, type, data),
    error: (opt, type, message) => this.optError(opt, type, message),
  };

  private async negotiate(): Promise<void> {
    const hello = Buffer.allocUnsafe(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.send(hello);
    const clientFlags = (await this.queue.read(4)).readUInt32BE(0);
    if (clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
      throw new ProtocolViolation('unknown client flags');
    this.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
    const fixed = (clientFlags & FLAG_C_FIXED_NEWSTYLE) !== 0;
    for (;;) {
      const h = await this.queue.read(16);
      if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolViolation('bad option magic');
      const opt = h.readUInt32BE(8);
      const len = h.readUInt32BE(12);
      if (!fixed && opt !== Opt.EXPORT_NAME)
        throw new ProtocolViolation('only NBD_OPT_EXPORT_NAME without fixed newstyle');
      if (len > MAX_OPTION_LENGTH) {
        if (opt === Opt.EXPORT_NAME) throw new ProtocolViolation('export name too long');
        for (let left = len; left > 0; left -= Math.min(left, 65536))
          await this.queue.read(Math.min(left, 65536));
        this.optError(opt, Rep.ERR_TOO_BIG, `Option ${opt} payload of ${len} bytes is too long`);
        continue;
      }
      const data = Buffer.from(await this.queue.read(len));
      if (this.ctx.tlsCreds && !this.tlsActive && opt !== Opt.STARTTLS && opt !== Opt.ABORT) {
        if (opt === Opt.EXPORT_NAME) throw new ProtocolViolation('TLS required');
        this.optError(opt, Rep.ERR_TLS_REQD, 'Option not permitted before TLS');
        continue;
      }
      switch (opt) {
        case Opt.EXPORT_NAME: {
          const exp = this.ctx.findExport(data.toString());
          if (!exp?.acceptsClient()) throw new ProtocolViolation('no such export');
          const flags = exp.transmissionFlags(this.structured);
          const r = Buffer.alloc(this.noZeroes ? 10 : 134);
          r.writeBigUInt64BE(BigInt(exp.size()), 0);
          r.writeUInt16BE(flags, 8);
          this.send(r);
          this.enterTransmission(exp);
          return;
        }
        case Opt.ABORT:
          this.optReply(opt, Rep.ACK);
          this.socket.end();
          return;
        case Opt.LIST:
          listOption(opt, len, this.ctx, this.optReplies);
          break;
        case Opt.STARTTLS:
          if (!this.ctx.tlsCreds) this.optError(opt, Rep.ERR_POLICY, 'TLS not configured');
          else if (len !== 0) this.optError(opt, Rep.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          else if (this.tlsActive) this.optError(opt, Rep.ERR_INVALID, 'TLS already active');
          else {
            this.optReply(opt, Rep.ACK);
            await this.startTls(this.ctx.tlsCreds);
          }
          break;
        case Opt.STRUCTURED_REPLY:
          if (len !== 0) this.optError(opt, Rep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          else if (this.structured)
            this.optError(opt, Rep.ERR_INVALID, 'structured replies already negotiated');
          else {
            this.structured = true;
            this.optReply(opt, Rep.ACK);
          }
          break;
        case Opt.INFO:
        case Opt.GO:
          if (this.handleInfo(opt, data)) return;
          break;
        case Opt.LIST_META_CONTEXT:
        case Opt.SET_META_CONTEXT:
          this.handleMetaContext(opt, data);
          break;
        default:
          this.optError(opt, Rep.ERR_UNSUP, `Unsupported option ${opt}`);
      }
    }
  }

  private async startTls(creds: NbdTlsCreds): Promise<void> {
    if (this.queue.length !== 0) throw new ProtocolViolation('data sent before the TLS handshake');
    const raw = this.socket;
    // The ACK must leave in clear text before the socket is handed to TLS.
    if (this.corked) {
      this.corked = false;
      raw.uncork();
    }
    this.detachListeners(raw);
    const secure = new tls.TLSSocket(raw, creds.serverOptions());
    this.socket = secure;
    this.attach(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secure', resolve);
      secure.once('error', reject);
      secure.once('close', () => reject(new ProtocolViolation('closed during the TLS handshake')));
    });
    this.tlsActive = true;
  }

  /** NBD_OPT_INFO / NBD_OPT_GO; returns true when the client moved to transmission. */
  private handleInfo(opt: number, data: Buffer): boolean {
    const go = infoOption(opt, data, this.structured, this.ctx, this.optReplies);
    if (!go) return false;
    this.blockSizeAcked = go.blockSizeAcked;
    if (this.contextExport !== go.name) this.contexts = [];
    this.enterTransmission(go.exp);
    return true;
  }

  private handleMetaContext(opt: number, data: Buffer): void {
    const set = metaContextOption(opt, data, this.structured, this.ctx, this.optReplies);
    if (set) {
      this.contexts = set.contexts;
      this.contextExport = set.exportName;
    }
  }

  private enterTransmission(exp: NbdExport): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.exp = exp;
    exp.clients.add(this);
    this.sizes = exp.blockSizes();
    this.phase = 'transmission';
    this.ctx.onTransmission?.(this);
    if (this.recv) this.recv.recycling = true;
    // Requests may already have arrived behind the last option.
    setImmediate(() => this.pump());
  }

  // ---------------------------------------------------------------- transmission

  private throttled(): boolean {
    return (
      this.inFlight >= MAX_IN_FLIGHT ||
      this.inFlightBytes >= MAX_IN_FLIGHT_BYTES ||
      this.socket.writableLength >= MAX_UNSENT_BYTES
    );
  }

  private maybeResume(): void {
    if (!this.paused || this.phase !== 'transmission' || this.throttled()) return;
    this.paused = false;
    this.socket.resume();
    this.pump();
  }

  /** Parses and starts every complete request queued (stops when throttled). */
  private pump(): void {
    const q = this.queue;
    while (this.phase === 'transmission') {
      if (this.discardLeft > 0) {
        this.discardLeft -= q.skip(this.discardLeft);
        if (this.discardLeft > 0) return;
        const reply = this.afterDiscard;
        this.afterDiscard = null;
        reply?.();
        continue;
      }
      const w = this.awaiting;
      if (w) {
        if (q.length < w.length) return;
        this.awaiting = null;
        this.startWrite(w.hi, w.lo, w.offset, w.length, w.flags, q.takeIov(w.length));
        continue;
      }
      if (this.throttled()) {
        if (!this.paused) {
          this.paused = true;
          this.socket.pause();
        }
        return;
      }
      if (q.length < REQUEST_SIZE) return;
      const h = q.take(REQUEST_SIZE);
      if (h.readUInt32BE(0) !== REQUEST_MAGIC) {
        this.violation();
        return;
      }
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const hi = h.readUInt32BE(8);
      const lo = h.readUInt32BE(12);
      // Offsets past 2^53 lose precision but stay past any export: they still fail the range check.
      const offset = h.readUInt32BE(16) * 0x100000000 + h.readUInt32BE(20);
      const length = h.readUInt32BE(24);
      this.request(type, flags, hi, lo, offset, length);
    }
  }

  private violation(): void {
    this.phase = 'closed';
    this.socket.destroy();
  }

  /** Validates a request: 0, or the NBD error to answer it with. */
  private check(type: number, flags: number, offset: number, length: number): number {
    const exp = this.exp!;
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) return NbdErr.EINVAL;
    if (flags & ~allowed) return NbdErr.EINVAL;
    if (flags & CmdFlag.DF && !this.structured) return NbdErr.EINVAL;
    const writes = type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES;
    if (writes && !exp.writable) return NbdErr.EPERM;
    if (type === Cmd.FLUSH) return 0;
    if ((type === Cmd.READ || type === Cmd.WRITE) && length > this.sizes.max) return NbdErr.EINVAL;
    if (type === Cmd.BLOCK_STATUS && (!this.structured || this.contexts.length === 0 || length === 0)) {
      return NbdErr.EINVAL;
    }
    let size: number;
    try {
      size = exp.size();
    } catch {
      return NbdErr.ESHUTDOWN;
    }
    if (offset > size || length > size - offset) {
      return type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL;
    }
    const min = this.sizes.min;
    if (this.blockSizeAcked && min > 1 && type !== Cmd.BLOCK_STATUS) {
      if (offset % min !== 0 || (length % min !== 0 && offset + length !== size)) return NbdErr.EINVAL;
    }
    return 0;
  }

  private request(type: number, flags: number, hi: number, lo: number, offset: number, length: number): void {
    if (type === Cmd.DISC) {
      this.phase = 'disconnecting';
      void this.idle().then(() => this.socket.end());
      return;
    }
    const err = this.check(type, flags, offset, length);
    if (type === Cmd.WRITE) {
      if (err) {
        // The payload must be consumed (never written) before the stream is in step again.
        this.discardLeft = length;
        this.afterDiscard = () => this.replyError(hi, lo, err, 'invalid write request');
        return;
      }
      this.inFlightBytes += length;
      this.awaiting = { hi, lo, offset, length, flags };
      return;
    }
    if (err) {
      this.replyError(hi, lo, err, err === NbdErr.EINVAL ? 'invalid request' : 'request refused');
      return;
    }
    this.begin(length);
    let p: Promise<void>;
    switch (type) {
      case Cmd.READ:
        p = this.doRead(hi, lo, offset, length, flags);
        break;
      case Cmd.FLUSH:
        p = this.simpleOp(hi, lo, () => this.exp!.backend.flush());
        break;
      case Cmd.TRIM:
        p = this.simpleOp(hi, lo, async () => {
          await this.exp!.backend.discard(offset, length);
          if (flags & CmdFlag.FUA) await this.exp!.backend.flush();
        });
        break;
      case Cmd.WRITE_ZEROES: {
        let rf = flags & CmdFlag.NO_HOLE ? 0 : ReqFlags.MAY_UNMAP;
        if (flags & CmdFlag.FUA || this.exp!.writethrough) rf |= ReqFlags.FUA;
        if (flags & CmdFlag.FAST_ZERO) rf |= ReqFlags.FAST_ZERO;
        p = this.simpleOp(hi, lo, () => this.exp!.backend.writeZeroes(offset, length, rf));
        break;
      }
      case Cmd.CACHE:
        // Advisory: the data is read by the next READ anyway; there is no cache to fill.
        p = this.simpleOp(hi, lo, async () => {});
        break;
      case Cmd.BLOCK_STATUS:
        p = this.doBlockStatus(hi, lo, offset, length, flags);
        break;
      default:
        p = Promise.resolve();
    }
    p.catch(() => {}).finally(() => this.end(length));
  }

  private begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private end(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.inFlight === 0 && this.idleWaiters.length) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
    if (this.paused) this.maybeResume();
  }

  private startWrite(
    hi: number,
    lo: number,
    offset: number,
    length: number,
    flags: number,
    iov: Buffer[],
  ): void {
    // inFlightBytes already counts the payload since its header arrived.
    this.inFlight++;
    // The payload's receive memory stays ours until the write has completed.
    this.recv?.hold(iov);
    const rf = flags & CmdFlag.FUA || this.exp!.writethrough ? ReqFlags.FUA : 0;
    this.exp!.backend.write(offset, iov, rf).then(
      () => {
        this.recv?.release(iov);
        this.replySimple(hi, lo, 0);
        this.end(length);
      },
      (e) => {
        this.recv?.release(iov);
        this.replyFailure(hi, lo, e);
        this.end(length);
      },
    );
  }

  private async simpleOp(hi: number, lo: number, op: () => Promise<void>): Promise<void> {
    try {
      await op();
      this.replySimple(hi, lo, 0);
    } catch (e) {
      this.replyFailure(hi, lo, e);
    }
  }

  private replySimple(hi: number, lo: number, err: number): void {
    if (this.phase === 'closed') return;
    this.send(simpleReply(hi, lo, err));
  }

  /** An error reply: a structured error chunk (with the message) when negotiated, else simple. */
  private replyError(hi: number, lo: number, err: number, message: string): void {
    if (this.phase === 'closed') return;
    if (!this.structured) {
      this.replySimple(hi, lo, err);
      return;
    }
    this.send(errorChunk(hi, lo, err, message));
  }

  private replyFailure(hi: number, lo: number, e: unknown): void {
    const be = toBlockError(e);
    this.replyError(hi, lo, errnoToNbd(be.errno), be.message);
  }

  private async doRead(hi: number, lo: number, offset: number, length: number, flags: number): Promise<void> {
    const backend = this.exp!.backend;
    // Every structured read asks the block status first, as QEMU's server does: holes go out as
    // OFFSET_HOLE chunks, and a quorum below reports a dead child on each read as in QEMU.
    if (this.structured && length > 0 && !(flags & CmdFlag.DF)) {
      if (await this.sparseRead(hi, lo, offset, length)) return;
    }
    const hdr = this.structured ? OFFSET_DATA_HEADER : SIMPLE_HEADER;
    if (length === 0) {
      if (!this.structured) {
        this.replySimple(hi, lo, 0);
        return;
      }
      const b = Buffer.allocUnsafe(STRUCTURED_HEADER);
      structuredHeader(b, 0, REPLY_FLAG_DONE, ReplyType.NONE, hi, lo, 0);
      this.send(b);
      return;
    }
    // Header and data in one pooled buffer: one socket write, no copy of the data.
    const buf = replyBuffers.get(hdr + length);
    try {
      await backend.readv(offset, [buf.subarray(hdr)]);
    } catch (e) {
      replyBuffers.release(buf);
      this.replyFailure(hi, lo, e);
      return;
    }
    if (this.phase === 'closed') {
      replyBuffers.release(buf);
      return;
    }
    if (this.structured) offsetDataHeader(buf, REPLY_FLAG_DONE, hi, lo, offset, length);
    else writeSimpleHeader(buf, hi, lo, 0);
    this.send(buf, () => replyBuffers.release(buf));
  }

  /**
   * A structured read over holes: zero extents go out as OFFSET_HOLE chunks, the rest as
   * OFFSET_DATA. Returns false (nothing sent) when the range is all data.
   */
  private async sparseRead(hi: number, lo: number, offset: number, length: number): Promise<boolean> {
    const backend = this.exp!.backend;
    const runs = await readRuns(backend, offset, length);
    if (!runs?.some((r) => r.zero)) return false;
    const chunks: Buffer[] = [];
    try {
      await Promise.all(
        runs.map(async (r, i) => {
          const b = Buffer.allocUnsafe(r.zero ? 32 : OFFSET_DATA_HEADER + r.bytes);
          if (!r.zero) await backend.readv(r.offset, [b.subarray(OFFSET_DATA_HEADER)]);
          chunks[i] = b;
        }),
      );
    } catch (e) {
      this.replyFailure(hi, lo, e);
      return true;
    }
    runs.forEach((r, i) => {
      const done = i === runs.length - 1 ? REPLY_FLAG_DONE : 0;
      if (r.zero) offsetHoleChunk(chunks[i]!, done, hi, lo, r.offset, r.bytes);
      else offsetDataHeader(chunks[i]!, done, hi, lo, r.offset, r.bytes);
    });
    if (this.phase === 'closed') return true;
    for (const b of chunks) this.send(b);
    return true;
  }

  private async doBlockStatus(
    hi: number,
    lo: number,
    offset: number,
    length: number,
    flags: number,
  ): Promise<void> {
    const max = flags & CmdFlag.REQ_ONE ? 1 : MAX_EXTENTS;
    const payloads: Buffer[] = [];
    try {
      for (const c of this.contexts) {
        const ext = c.bitmap
          ? bitmapExtents(c.bitmap, offset, length, max)
          : await chainExtents(this.exp!.backend, c.kind === 'depth', offset, length, max);
        const b = Buffer.allocUnsafe(STRUCTURED_HEADER + 4 + 8 * (ext.length / 2));
        b.writeUInt32BE(c.id, 20);
        for (let i = 0; i < ext.length; i++) b.writeUInt32BE(ext[i]!, 24 + 4 * i);
        payloads.push(b);
      }
    } catch (e) {
      this.replyFailure(hi, lo, e);
      return;
    }
    payloads.forEach((b, i) => {
      const done = i === payloads.length - 1 ? REPLY_FLAG_DONE : 0;
      structuredHeader(b, 0, done, ReplyType.BLOCK_STATUS, hi, lo, b.length - STRUCTURED_HEADER);
    });
    if (this.phase === 'closed') return;
    for (const b of payloads) this.send(b);
  }
}
