import { EventEmitter } from 'node:events';
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer, type Server, type Socket } from 'node:net';
import { registerCoreCommands } from './commands/core';
import { QmpError } from './errors';
import { JsonStreamer, type StreamItem, toQmpJson } from './json';
import { CommandRegistry } from './registry';
import { validateArgs } from './schema';

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

export interface QmpServerOptions {
  /** Commands to serve (default: a new registry with the core commands). */
  registry?: CommandRegistry;
  /** Reported in the greeting and by query-version (default: QEMU 7.2.0, package "blockrep"). */
  version?: QmpVersion;
  /** Called after `quit` has been answered. */
  onQuit?: () => void;
}

/** Requests a monitor queues before it stops reading from its client (QEMU's limit is 8). */
const QUEUE_MAX = 8;

/** This package's version, from its package.json (one level above src/ and dist/ alike). */
const PACKAGE_VERSION = (createRequire(import.meta.url)('../package.json') as { version: string }).version;

/** QEMU 7.2's protocol; the package string names blockrep and its version ("blockrep 0.1.0"). */
export const DEFAULT_VERSION: QmpVersion = {
  major: 7,
  minor: 2,
  micro: 0,
  package: `blockrep ${PACKAGE_VERSION}`,
};

const INPUT_KEYS = new Set(['execute', 'arguments', 'id']);

/** One client connection: greeting, capabilities negotiation, then commands in order. */
export class QmpMonitor {
  mode: 'negotiation' | 'command' = 'negotiation';
  private readonly streamer: JsonStreamer;
  private readonly queue: StreamItem[] = [];
  private running = false;
  private closed = false;

  constructor(
    readonly server: QmpServer,
    readonly socket: Socket,
  ) {
    this.streamer = new JsonStreamer((item) => this.enqueue(item));
    socket.on('data', (d: Buffer) => this.streamer.feed(d));
    socket.on('error', () => this.close());
    socket.on('close', () => this.close());
    socket.on('end', () => socket.end());
    const v = server.version;
    this.send({
      QMP: {
        version: { qemu: { major: v.major, minor: v.minor, micro: v.micro }, package: v.package },
        capabilities: [],
      },
    });
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.length = 0;
    this.streamer.reset();
    this.socket.destroy();
    this.server.monitorGone(this);
  }

  send(msg: unknown): void {
    if (this.closed || this.socket.destroyed || !this.socket.writable) return;
    this.socket.write(`${toQmpJson(msg)}\r\n`);
  }

  private enqueue(item: StreamItem): void {
    if (this.closed) return;
    this.queue.push(item);
    if (this.queue.length >= QUEUE_MAX) this.socket.pause();
    if (!this.running) void this.drainQueue();
  }

  private async drainQueue(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length && !this.closed) {
        const item = this.queue.shift()!;
        const reply = await this.handle(item);
        this.send(reply);
        if (this.queue.length < QUEUE_MAX && this.socket.isPaused()) this.socket.resume();
      }
    } finally {
      this.running = false;
    }
  }

  /** One request in, one response out (QEMU's monitor_qmp_dispatch + qmp_dispatch). */
  private async handle(item: StreamItem): Promise<unknown> {
    if ('error' in item) return errorReply(QmpError.generic(item.error));
    const req = item.value;
    if (typeof req !== 'object' || req === null || Array.isArray(req)) {
      return errorReply(QmpError.generic('QMP input must be a JSON object'));
    }
    const r = req as Record<string, unknown>;
    const hasId = Object.hasOwn(r, 'id');
    const reply = (x: Record<string, unknown>) => (hasId ? withId(x, r.id) : x);
    try {
      for (const key of Object.keys(r)) {
        if (!INPUT_KEYS.has(key)) throw QmpError.generic(`QMP input member '${key}' is unexpected`);
        if (key === 'execute' && typeof r.execute !== 'string') {
          throw QmpError.generic("QMP input member 'execute' must be a string");
        }
        const a = r.arguments;
        if (key === 'arguments' && (typeof a !== 'object' || a === null || Array.isArray(a))) {
          throw QmpError.generic("QMP input member 'arguments' must be an object");
        }
      }
      if (!Object.hasOwn(r, 'execute')) throw QmpError.generic("QMP input lacks member 'execute'");
      const name = r.execute as string;
      if (this.mode === 'negotiation' && name !== 'qmp_capabilities') {
        throw new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      }
      if (this.mode === 'command' && name === 'qmp_capabilities') {
        throw new QmpError(
          'CommandNotFound',
          'Capabilities negotiation is already complete, command ignored',
        );
      }
      const cmd = this.server.registry.require(name);
      const args = (r.arguments ?? {}) as Record<string, unknown>;
      const t0 = performance.now();
      try {
        if (cmd.args) validateArgs(cmd.args, args);
        else if (Object.keys(args).length) {
          throw QmpError.generic(`Parameter '${Object.keys(args)[0]}' is unexpected`);
        }
        const ret = await cmd.handler(args, { server: this.server, monitor: this });
        this.server.emit('command', { name, ms: performance.now() - t0 });
        return reply({ return: ret ?? {} });
      } catch (e) {
        const err = QmpError.from(e);
        this.server.emit('command', { name, ms: performance.now() - t0, error: err.toJSON() });
        throw err;
      }
    } catch (e) {
      return reply(errorReply(QmpError.from(e)));
    }
  }
}

function errorReply(e: QmpError): Record<string, unknown> {
  return { error: e.toJSON() };
}

function withId(x: Record<string, unknown>, id: unknown): Record<string, unknown> {
  return { ...x, id };
}

/**
 * A QMP server: any number of monitors on Unix sockets and TCP ports, one command registry, and
 * events broadcast to every monitor past capabilities negotiation.
 */
/**
 * QEMU's monitor rate limits (ms) for events that can come in floods, per event and, where QEMU
 * keys them, per value of one data member.
 */
const EVENT_RATE_LIMITS: Record<string, { ms: number; key?: string }> = {
  QUORUM_REPORT_BAD: { ms: 1000, key: 'node-name' },
  QUORUM_FAILURE: { ms: 1000 },
  RTC_CHANGE: { ms: 1000 },
  WATCHDOG: { ms: 1000 },
  BALLOON_CHANGE: { ms: 1000 },
  VSERPORT_CHANGE: { ms: 1000, key: 'id' },
  MEMORY_DEVICE_SIZE_CHANGE: { ms: 1000, key: 'qom-path' },
};

interface Throttled {
  pending: Record<string, unknown> | null;
  timer: NodeJS.Timeout;
}

/**
 * Events besides the monitors': `'qmp-event'` (every event emitted, unthrottled),
 * `'qmp-event-delivered'` (what the monitors get: rate-limited as QEMU's monitor limits floods,
 * which the daemon's log follows) and `'command'` ({ name, ms, error? }) after each command
 * (arguments are not included, as they may carry secrets).
 */
export class QmpServer extends EventEmitter {
  readonly registry: CommandRegistry;
  readonly version: QmpVersion;
  readonly monitors = new Set<QmpMonitor>();
  private readonly servers = new Set<Server>();
  private readonly onQuit: (() => void) | undefined;
  /** Rate-limited events by kind (and key member): the latest one held back in the window. */
  private readonly throttled = new Map<string, Throttled>();

  constructor(opts: QmpServerOptions = {}) {
    super();
    this.registry = opts.registry ?? new CommandRegistry();
    this.version = opts.version ?? DEFAULT_VERSION;
    this.onQuit = opts.onQuit;
    if (!this.registry.command('qmp_capabilities')) registerCoreCommands(this.registry);
  }

  /** Serves a connected stream (sockets of our own listeners, or any the caller accepted). */
  attach(socket: Socket): QmpMonitor {
    const m = new QmpMonitor(this, socket);
    this.monitors.add(m);
    return m;
  }

  monitorGone(m: QmpMonitor): void {
    this.monitors.delete(m);
  }

  /** Listens on a Unix socket (replacing a stale one), mode 0600 unless told otherwise. */
  async listenUnix(path: string, opts: { mode?: number } = {}): Promise<void> {
    try {
      if (lstatSync(path).isSocket()) unlinkSync(path);
    } catch {
      // nothing there
    }
    const srv = this.newListener();
    const mode = opts.mode ?? 0o600;
    const old = process.umask(0o777 & ~mode);
    try {
      await new Promise<void>((resolve, reject) => {
        srv.once('error', reject);
        srv.listen(path, () => {
          srv.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(old);
    }
    chmodSync(path, mode);
  }

  /** Listens on TCP (loopback by default); resolves with the port (useful with port 0). */
  async listenTcp(port: number, host = '127.0.0.1'): Promise<number> {
    const srv = this.newListener();
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(port, host, () => {
        srv.off('error', reject);
        resolve();
      });
    });
    const addr = srv.address();
    return typeof addr === 'object' && addr ? addr.port : port;
  }

  private newListener(): Server {
    const srv = createServer((sock) => this.attach(sock));
    srv.on('error', () => {});
    this.servers.add(srv);
    return srv;
  }

  /** Sends an event to every negotiated monitor, stamped with the time as QEMU does. */
  emitEvent(event: string, data?: Record<string, unknown>): void {
    const now = Date.now() * 1000 + Math.floor((performance.now() % 1) * 1000);
    const msg: Record<string, unknown> = {
      timestamp: { seconds: Math.floor(now / 1e6), microseconds: now % 1e6 },
      event,
    };
    if (data !== undefined) msg.data = data;
    const limit = EVENT_RATE_LIMITS[event];
    if (!limit) this.deliver(msg);
    else this.throttle(`${event}\0${limit.key ? String(data?.[limit.key]) : ''}`, limit.ms, msg);
    this.emit('qmp-event', msg);
  }

  private deliver(msg: Record<string, unknown>): void {
    for (const m of this.monitors) if (m.mode === 'command') m.send(msg);
    this.emit('qmp-event-delivered', msg);
  }

  /**
   * QEMU's event rate limit: the first event of a kind goes out at once and opens a window;
   * within it only the latest one is kept, sent (with its own timestamp) when the window ends,
   * which opens the next.
   */
  private throttle(key: string, ms: number, msg: Record<string, unknown>): void {
    const state = this.throttled.get(key);
    if (state) {
      state.pending = msg;
      return;
    }
    this.deliver(msg);
    const s: Throttled = { pending: null, timer: undefined as unknown as NodeJS.Timeout };
    const tick = () => {
      if (!s.pending) {
        this.throttled.delete(key);
        return;
      }
      this.deliver(s.pending);
      s.pending = null;
      s.timer = setTimeout(tick, ms).unref();
    };
    s.timer = setTimeout(tick, ms).unref();
    this.throttled.set(key, s);
  }

  /** quit: answer first, then tell the owner. */
  requestQuit(): void {
    setImmediate(() => this.onQuit?.());
  }

  /** Stops listening and closes every monitor. */
  async close(): Promise<void> {
    for (const t of this.throttled.values()) clearTimeout(t.timer);
    this.throttled.clear();
    for (const m of [...this.monitors]) m.close();
    await Promise.all(
      [...this.servers].map((l) => new Promise<void>((r) => (l.listening ? l.close(() => r()) : r()))),
    );
    this.servers.clear();
    this.emit('close');
  }
}
