import { connect, type Socket } from 'node:net';
import { makeTempDir } from '@blockrep/test-kit';
import { QmpClient, QmpServer, type QmpServerOptions } from '../src/index';

/** A raw connection: what was sent back, line by line, for byte-exact protocol tests. */
export class RawConn {
  readonly lines: string[] = [];
  private buf = '';
  private waiters: (() => void)[] = [];
  closed = false;

  constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      let i = this.buf.indexOf('\r\n');
      while (i >= 0) {
        this.lines.push(this.buf.slice(0, i));
        this.buf = this.buf.slice(i + 2);
        i = this.buf.indexOf('\r\n');
      }
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
  }

  static open(path: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = connect(path, () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  send(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Waits until n lines have arrived in total; returns them parsed. */
  async waitLines(n: number, timeoutMs = 30_000): Promise<any[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.lines.length < n) {
      if (this.closed) throw new Error(`connection closed after ${this.lines.length} lines`);
      if (Date.now() > deadline) throw new Error(`only ${this.lines.length} of ${n} lines arrived`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
    return this.lines.slice(0, n).map((l) => JSON.parse(l));
  }

  /** Sends requests and waits for as many more lines. */
  async exchange(...reqs: string[]): Promise<any[]> {
    const before = this.lines.length;
    for (const r of reqs) this.send(r);
    const all = await this.waitLines(before + reqs.length);
    return all.slice(before);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A server listening on a fresh Unix socket. */
export async function startServer(opts: QmpServerOptions = {}): Promise<{ server: QmpServer; path: string }> {
  const dir = makeTempDir('blockrep-qmp-');
  const path = dir.file('qmp.sock');
  const server = new QmpServer(opts);
  await server.listenUnix(path);
  return { server, path };
}

export async function negotiatedRaw(path: string): Promise<RawConn> {
  const c = await RawConn.open(path);
  await c.waitLines(1);
  await c.exchange('{"execute":"qmp_capabilities"}\n');
  return c;
}

export { QmpClient };
