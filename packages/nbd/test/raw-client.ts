import * as net from 'node:net';
import { ByteQueue } from '../src/byte-queue';
import { IHAVEOPT, Info, Opt, REQUEST_MAGIC, Rep } from '../src/protocol';

/** A hand-driven NBD client speaking raw bytes, for sending what real clients never would. */
export class RawNbd {
  readonly q = new ByteQueue();
  readonly closed: Promise<void>;
  isClosed = false;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (b) => this.q.push(b));
    sock.on('error', () => {});
    this.closed = new Promise((r) =>
      sock.on('close', () => {
        this.isClosed = true;
        this.q.fail();
        r();
      }),
    );
  }

  /** Connects and reads the server's greeting (returns its handshake flags). */
  static async connect(port: number): Promise<{ c: RawNbd; flags: number }> {
    const sock = net.connect(port, '127.0.0.1');
    await new Promise<void>((res, rej) => {
      sock.once('connect', res);
      sock.once('error', rej);
    });
    const c = new RawNbd(sock);
    const g = await c.q.read(18);
    return { c, flags: g.readUInt16BE(16) };
  }

  send(b: Buffer): void {
    this.sock.write(b);
  }

  clientFlags(f: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(f);
    this.send(b);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.send(Buffer.concat([h, data]));
  }

  async reply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.q.read(20);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(await this.q.read(len)) };
  }

  /** Replies to one option up to and including its ACK or error. */
  async replies(): Promise<{ type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.reply();
      out.push(r);
      if (r.type === Rep.ACK || r.type >= 0x80000000) return out;
    }
  }

  static goData(name: string, infos: number[] = [Info.BLOCK_SIZE]): Buffer {
    const n = Buffer.from(name);
    const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    b.writeUInt16BE(infos.length, 4 + n.length);
    for (const [i, t] of infos.entries()) b.writeUInt16BE(t, 6 + n.length + 2 * i);
    return b;
  }

  static metaData(name: string, queries: string[]): Buffer {
    const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
    parts[0]!.writeUInt32BE(parts[1]!.length);
    parts[2]!.writeUInt32BE(queries.length);
    for (const q of queries) {
      const l = Buffer.alloc(4);
      l.writeUInt32BE(Buffer.byteLength(q));
      parts.push(l, Buffer.from(q));
    }
    return Buffer.concat(parts);
  }

  /** Fixed newstyle, optional structured replies and contexts, then GO. Returns size and flags. */
  async open(
    name: string,
    opts: { structured?: boolean; contexts?: string[] } = {},
  ): Promise<{ size: number; flags: number }> {
    this.clientFlags(3);
    if (opts.structured) {
      this.option(Opt.STRUCTURED_REPLY);
      await this.replies();
      if (opts.contexts) {
        this.option(Opt.SET_META_CONTEXT, RawNbd.metaData(name, opts.contexts));
        await this.replies();
      }
    }
    this.option(Opt.GO, RawNbd.goData(name));
    let size = -1;
    let flags = 0;
    for (const r of await this.replies()) {
      if (r.type >= 0x80000000) throw new Error(`GO failed: ${r.type.toString(16)} ${r.data}`);
      if (r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT) {
        size = Number(r.data.readBigUInt64BE(2));
        flags = r.data.readUInt16BE(10);
      }
    }
    return { size, flags };
  }

  request(
    type: number,
    flags: number,
    handle: number,
    offset: number,
    length: number,
    payload?: Buffer,
  ): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(handle), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.send(payload ? Buffer.concat([h, payload]) : h);
  }

  async simple(): Promise<{ magic: number; err: number; handle: number }> {
    const r = await this.q.read(16);
    return { magic: r.readUInt32BE(0), err: r.readUInt32BE(4), handle: Number(r.readBigUInt64BE(8)) };
  }

  async chunk(): Promise<{ magic: number; flags: number; type: number; handle: number; payload: Buffer }> {
    const h = await this.q.read(20);
    const len = h.readUInt32BE(16);
    return {
      magic: h.readUInt32BE(0),
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      handle: Number(h.readBigUInt64BE(8)),
      payload: Buffer.from(await this.q.read(len)),
    };
  }

  end(): void {
    this.sock.destroy();
  }
}
