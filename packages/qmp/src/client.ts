import { EventEmitter } from 'node:events';
import { connect, type Socket } from 'node:net';
import { QmpError, type QmpErrorClass } from './errors';
import { JsonStreamer, toQmpJson } from './json';

export type QmpAddress = { path: string } | { host?: string; port: number };

/** An event as received: name, data and the server's timestamp. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpClientOptions {
  /** Skip qmp_capabilities (to test negotiation itself). */
  negotiate?: boolean;
  /** Milliseconds to wait for the connection and greeting (default 10 s). */
  timeoutMs?: number;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** How many received events `waitEvent` can still find after the fact. */
const BACKLOG_MAX = 1000;

/**
 * A QMP client: connects, negotiates, and matches responses to requests by id. Events come as
 * 'event' emissions, through `events()` (an async iterator), or `waitEvent()`.
 */
export class QmpClient extends EventEmitter {
  greeting: Record<string, unknown> | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly backlog: QmpEvent[] = [];
  private closedError: Error | null = null;

  private constructor(private readonly socket: Socket) {
    super();
    const streamer = new JsonStreamer((item) => {
      if ('error' in item) return;
      this.onMessage(item.value as Record<string, unknown>);
    });
    socket.on('data', (d: Buffer) => streamer.feed(d));
    socket.on('error', (e) => this.fail(e));
    socket.on('close', () => this.fail(new Error('QMP connection closed')));
  }

  /** Connects to a server (Unix path or TCP port), reads the greeting and negotiates. */
  static async connect(addr: QmpAddress, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const socket = 'path' in addr ? connect(addr.path) : connect(addr.port, addr.host ?? '127.0.0.1');
    const client = new QmpClient(socket);
    const timeoutMs = opts.timeoutMs ?? 10_000;
    await withTimeout(
      new Promise<void>((resolve, reject) => {
        client.once('greeting', () => resolve());
        socket.once('error', reject);
        socket.once('close', () => reject(new Error('QMP connection closed before the greeting')));
      }),
      timeoutMs,
      'QMP greeting',
    );
    if (opts.negotiate !== false) await client.execute('qmp_capabilities');
    return client;
  }

  private onMessage(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      this.greeting = msg;
      this.emit('greeting', msg);
      return;
    }
    if ('event' in msg) {
      const ev = { data: {}, ...msg } as unknown as QmpEvent;
      this.backlog.push(ev);
      if (this.backlog.length > BACKLOG_MAX) this.backlog.shift();
      this.emit('event', ev);
      return;
    }
    const id = msg.id;
    const p = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!p) {
      this.emit('unmatched', msg);
      return;
    }
    this.pending.delete(id as number);
    if ('error' in msg) {
      const e = msg.error as { class: QmpErrorClass; desc: string };
      p.reject(new QmpError(e.class, e.desc));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(e: Error): void {
    if (this.closedError) return;
    this.closedError = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.emit('close', e);
  }

  /** Runs a command; resolves with its `return`, rejects with a QmpError. */
  execute<T = any>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const msg: Record<string, unknown> = { execute: command };
    if (args !== undefined) msg.arguments = args;
    msg.id = id;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${toQmpJson(msg)}\n`);
    });
  }

  /** Sends raw bytes (for tests of malformed input); responses arrive as 'unmatched'. */
  sendRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  /**
   * Resolves with the first event of that name (and matching the predicate) — one already
   * received and not yet taken counts — or rejects after timeoutMs.
   */
  waitEvent(
    name: string,
    predicate: (e: QmpEvent) => boolean = () => true,
    timeoutMs = 10_000,
  ): Promise<QmpEvent> {
    const match = (e: QmpEvent) => e.event === name && predicate(e);
    const i = this.backlog.findIndex(match);
    if (i >= 0) return Promise.resolve(this.backlog.splice(i, 1)[0]!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('event', onEvent);
        reject(new Error(`timed out waiting for QMP event ${name}`));
      }, timeoutMs);
      const onEvent = (e: QmpEvent) => {
        if (!match(e)) return;
        clearTimeout(timer);
        this.off('event', onEvent);
        const j = this.backlog.indexOf(e);
        if (j >= 0) this.backlog.splice(j, 1);
        resolve(e);
      };
      this.on('event', onEvent);
    });
  }

  /** Events received so far and not yet taken by waitEvent; clears the backlog. */
  takeEvents(): QmpEvent[] {
    return this.backlog.splice(0);
  }

  /** Every event from now on, until the connection closes. */
  async *events(): AsyncGenerator<QmpEvent> {
    const queue: QmpEvent[] = [];
    let wake: (() => void) | null = null;
    const onEvent = (e: QmpEvent) => {
      queue.push(e);
      wake?.();
    };
    const onClose = () => wake?.();
    this.on('event', onEvent);
    this.on('close', onClose);
    try {
      for (;;) {
        while (queue.length) yield queue.shift()!;
        if (this.closedError) return;
        await new Promise<void>((r) => (wake = r));
        wake = null;
      }
    } finally {
      this.off('event', onEvent);
      this.off('close', onClose);
    }
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Closes the connection. */
  async close(): Promise<void> {
    if (this.socket.destroyed) return;
    await new Promise<void>((r) => {
      this.socket.once('close', () => r());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}
