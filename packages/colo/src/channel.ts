import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { BlockError } from '@blockrep/block';
import type { ColoAddress } from './config';
import { withDeadline } from './deadline';
import type { PeerState } from './pair';

/*
 * The peer channel: JSON lines over TCP or a Unix socket, with mutual x509 TLS when the pair has
 * credentials (both sides' certificates must be signed by the pair's CA; anything else is refused
 * in the handshake). Each side listens, and connects to the peer's listener; it sends its
 * heartbeats and its requests on the connection it made, and answers the peer's requests on the
 * connection the peer made. The first line on a connection names the pair and the sender; a
 * stranger is dropped.
 */

/** What a side says of itself each heartbeat (PeerState), plus what it may hold that the peer lacks. */
export interface Heartbeat extends PeerState {
  /** A side waiting to be resynced: extents it wrote that the peer may lack ('all': unknown). */
  missing?: 'all' | Array<[number, number]>;
  /**
   * Grows with each heartbeat a side sends (set by the channel): an answer to a request carries
   * the sender's next number, so that the asker can drop heartbeats sent before the change.
   */
  seq?: number;
  /** Random per process: numbering starts again when the peer restarts. */
  boot?: string;
}

type Line =
  | { type: 'hello'; pair: string; name: string }
  | { type: 'heartbeat'; state: Heartbeat }
  | { type: 'request'; id: number; op: string; args?: unknown }
  | { type: 'reply'; id: number; ok: boolean; result?: unknown; error?: string };

export interface PeerChannelOptions {
  pair: string;
  name: string;
  peerName: string;
  listen: ColoAddress;
  peer: ColoAddress;
  /** A tls-creds-x509 directory (ca-cert, server-cert/key, client-cert/key); absent: plain. */
  tlsDir?: string;
  interval: number;
  /** This side's heartbeat, asked for at each interval. */
  heartbeat(): Heartbeat;
  onHeartbeat(h: Heartbeat): void;
  onRequest(op: string, args: unknown): Promise<unknown>;
  /** Something worth a log line (a refused connection, a lost link). */
  onNotice?(what: string): void;
}

const MAX_LINE = 64 << 20;

/** Splits a stream into JSON lines. */
function readLines(sock: net.Socket, onLine: (l: Line) => void, onBad: (why: string) => void): void {
  let buf = '';
  sock.setEncoding('utf8');
  sock.on('data', (chunk: string) => {
    buf += chunk;
    if (buf.length > MAX_LINE) {
      onBad('line too long');
      sock.destroy();
      return;
    }
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const text = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let l: Line;
      try {
        l = JSON.parse(text) as Line;
      } catch {
        onBad('not JSON');
        sock.destroy();
        return;
      }
      onLine(l);
    }
  });
}

const send = (sock: net.Socket, l: Line) => sock.write(`${JSON.stringify(l)}\n`);

function connectOptions(a: ColoAddress): net.NetConnectOpts {
  return a.type === 'unix' ? { path: a.path } : { host: a.host, port: a.port };
}

export class PeerChannel {
  private server: net.Server | null = null;
  private out: net.Socket | null = null;
  private outReady = false;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private nextId = 1;
  private nextSeq = 1;
  /** Random per channel (per process): the heartbeat numbering's generation. */
  readonly boot = randomBytes(6).toString('hex');
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private readonly incoming = new Set<net.Socket>();
  private readonly creds: { ca: Buffer; server: [Buffer, Buffer]; client: [Buffer, Buffer] } | null;

  constructor(private readonly opts: PeerChannelOptions) {
    if (opts.tlsDir) {
      const f = (n: string) => readFileSync(join(opts.tlsDir!, n));
      this.creds = {
        ca: f('ca-cert.pem'),
        server: [f('server-cert.pem'), f('server-key.pem')],
        client: [f('client-cert.pem'), f('client-key.pem')],
      };
    } else this.creds = null;
  }

  /** Whether the connection to the peer's listener is up (its hello was sent). */
  get connected(): boolean {
    return this.outReady;
  }

  async start(): Promise<void> {
    const onConn = (sock: net.Socket) => this.accept(sock);
    const c = this.creds;
    this.server = c
      ? tls.createServer(
          {
            ca: c.ca,
            cert: c.server[0],
            key: c.server[1],
            requestCert: true,
            rejectUnauthorized: true,
            minVersion: 'TLSv1.2',
          },
          onConn,
        )
      : net.createServer(onConn);
    this.server.on('tlsClientError', (e: Error) =>
      this.opts.onNotice?.(`refused a peer channel connection: ${e.message}`),
    );
    const a = this.opts.listen;
    if (a.type === 'unix') rmSync(a.path, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', (e) => reject(new BlockError(`peer channel: cannot listen: ${e.message}`)));
      if (a.type === 'unix') this.server!.listen(a.path, resolve);
      else this.server!.listen(a.port, a.host, resolve);
    });
    this.tick();
    this.timer = setInterval(() => this.tick(), this.opts.interval);
  }

  /** Each interval: (re)connect if needed, and send the heartbeat. */
  private tick(): void {
    if (this.closed) return;
    if (!this.out) {
      this.connect();
      return;
    }
    if (this.outReady) this.sendHeartbeat(this.out);
  }

  private sendHeartbeat(sock: net.Socket): void {
    send(sock, {
      type: 'heartbeat',
      state: { ...this.opts.heartbeat(), seq: this.nextSeq++, boot: this.boot },
    });
  }

  /** The number the next heartbeat will carry: heartbeats from it on say what is true now. */
  get heartbeatSeq(): number {
    return this.nextSeq;
  }

  private connect(): void {
    const c = this.creds;
    const base = connectOptions(this.opts.peer);
    const sock = c
      ? tls.connect({
          ...base,
          ca: c.ca,
          cert: c.client[0],
          key: c.client[1],
          minVersion: 'TLSv1.2',
          // The pair's CA is the identity: any certificate it signed is the peer.
          checkServerIdentity: () => undefined,
        })
      : net.connect(base);
    this.out = sock;
    sock.setNoDelay?.(true);
    const up = () => {
      if (this.out !== sock) return;
      this.outReady = true;
      send(sock, { type: 'hello', pair: this.opts.pair, name: this.opts.name });
      this.sendHeartbeat(sock);
    };
    sock.once(c ? 'secureConnect' : 'connect', up);
    readLines(
      sock,
      (l) => {
        if (l.type !== 'reply') return;
        const p = this.pending.get(l.id);
        if (!p) return;
        this.pending.delete(l.id);
        if (l.ok) p.resolve(l.result);
        else p.reject(new BlockError(l.error ?? 'the peer refused'));
      },
      (why) => this.opts.onNotice?.(`peer channel: bad reply (${why})`),
    );
    sock.on('error', (e) => {
      if (this.outReady) this.opts.onNotice?.(`peer channel to ${this.opts.peerName} lost: ${e.message}`);
    });
    sock.once('close', () => {
      if (this.out === sock) {
        this.out = null;
        this.outReady = false;
      }
      for (const [id, p] of this.pending) {
        this.pending.delete(id);
        p.reject(new BlockError(`peer channel to ${this.opts.peerName} closed`));
      }
    });
  }

  private accept(sock: net.Socket): void {
    if (this.closed) {
      sock.destroy();
      return;
    }
    this.incoming.add(sock);
    sock.on('error', () => {});
    let hello = false;
    // A connection that does not say who it is soon is dropped (it holds nothing of ours).
    const helloTimer = setTimeout(() => {
      if (!hello) sock.destroy();
    }, 10 * this.opts.interval);
    sock.once('close', () => {
      clearTimeout(helloTimer);
      this.incoming.delete(sock);
    });
    readLines(
      sock,
      (l) => {
        if (!hello) {
          if (l.type !== 'hello' || l.pair !== this.opts.pair || l.name !== this.opts.peerName) {
            const who = l.type === 'hello' ? `'${l.name}' of pair '${l.pair}'` : 'a peer without hello';
            this.opts.onNotice?.(`refused ${who} on the peer channel (expecting '${this.opts.peerName}')`);
            sock.destroy();
            return;
          }
          hello = true;
          return;
        }
        if (l.type === 'heartbeat') this.opts.onHeartbeat(l.state);
        else if (l.type === 'request') {
          this.opts.onRequest(l.op, l.args).then(
            (result) => send(sock, { type: 'reply', id: l.id, ok: true, result: result ?? null }),
            (e: Error) => send(sock, { type: 'reply', id: l.id, ok: false, error: e.message }),
          );
        }
      },
      (why) => this.opts.onNotice?.(`peer channel: dropped a connection (${why})`),
    );
  }

  /** Asks the peer to do something; rejects when the channel is down or the peer refuses. */
  request(op: string, args?: unknown, timeoutMs = 60_000): Promise<unknown> {
    const sock = this.out;
    if (!sock || !this.outReady) {
      return Promise.reject(new BlockError(`peer channel to ${this.opts.peerName} is not connected`));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new BlockError(`${this.opts.peerName} did not answer '${op}' in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, withDeadline(timer, resolve, reject));
      send(sock, { type: 'request', id, op, args });
    });
  }

  /** Sends a heartbeat now (after a role change, so the peer need not wait for the interval). */
  beat(): void {
    if (this.out && this.outReady) this.sendHeartbeat(this.out);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.out?.destroy();
    for (const s of this.incoming) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
