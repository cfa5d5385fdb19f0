import { closeSync, createReadStream, lstatSync, openSync, unlinkSync, writeSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { getSystemErrorMap } from 'node:util';
import { BlockError, parseSize } from '@blockrep/block';
import type { CommandRegistry } from '../registry';
import { opt, type QMembers, type QType, req, t } from '../schema';

/*
 * Character devices (qapi/char.json): a registry shared by the command line (--chardev) and QMP
 * (chardev-add & co.), with the backends ringbuf/memory, null, file, socket and stdio (command
 * line only). Their only frontend in a storage daemon is a QMP monitor.
 */

// ---- schema ----

const common: QMembers = {
  logfile: opt(t.str, 'A file that gets a copy of everything written to the chardev'),
  logappend: opt(t.bool, 'Append to the logfile instead of truncating it (default false)'),
};

const SocketAddressLegacy = t.union(
  'SocketAddressLegacy',
  {
    type: req(
      t.enum('SocketAddressType', ['inet', 'unix', 'vsock', 'fd']),
      'The address family: inet (TCP), unix, vsock or fd (blockrepd opens inet and unix)',
    ),
  },
  'type',
  () => ({
    inet: {
      data: req(
        t.object('InetSocketAddress', {
          host: req(t.str, 'Host name or address'),
          port: req(t.str, 'Port number or service name'),
          numeric: opt(t.bool, 'Host and port are numeric'),
          to: opt(t.int, 'Highest port to try when listening'),
          ipv4: opt(t.bool, 'Use IPv4'),
          ipv6: opt(t.bool, 'Use IPv6'),
          'keep-alive': opt(t.bool, 'Enable TCP keep-alive'),
          mptcp: opt(t.bool, 'Use multipath TCP'),
        }),
        'The TCP address',
      ),
    },
    unix: {
      data: req(
        t.object('UnixSocketAddress', {
          path: req(t.str, 'Path of the socket'),
          abstract: opt(t.bool, 'Linux abstract socket namespace'),
          tight: opt(t.bool, 'Abstract address length is the name length'),
        }),
        'The Unix socket',
      ),
    },
    vsock: {
      data: req(
        t.object('VsockSocketAddress', {
          cid: req(t.str, 'Context id of the peer'),
          port: req(t.str, 'Port number'),
        }),
        'The VSOCK address',
      ),
    },
    fd: {
      data: req(
        t.object('String', { str: req(t.str, 'Name or number of a file descriptor') }),
        'A file descriptor passed to the process',
      ),
    },
  }),
);

/** Member descriptions of the backends QEMU has and blockrepd does not open. */
const NO = ' (a backend blockrepd does not open)';

const wrapped = (name: string, members: QMembers): QMembers => ({
  data: req(t.object(name, { ...common, ...members }), 'The options of the backend'),
});

const commonOnly = wrapped('ChardevCommon', {});
const hostdev = wrapped('ChardevHostdev', { device: req(t.str, 'The special file of the device') });

/** The backend kinds of qemu-storage-daemon 7.2's schema (blockrepd opens a subset). */
const BACKEND_KINDS = [
  'file',
  'serial',
  'parallel',
  'pipe',
  'socket',
  'udp',
  'pty',
  'null',
  'mux',
  'msmouse',
  'wctablet',
  'braille',
  'testdev',
  'stdio',
  'console',
  'spicevmc',
  'spiceport',
  'qemu-vdagent',
  'dbus',
  'vc',
  'ringbuf',
  'memory',
] as const;

const ChardevBackendType = t.union(
  'ChardevBackend',
  { type: req(t.enum('ChardevBackendKind', BACKEND_KINDS), 'Backend type') },
  'type',
  () => {
    const ringbuf = wrapped('ChardevRingbuf', { size: opt(t.int, 'Power of two, default 65536') });
    return {
      file: wrapped('ChardevFile', {
        in: opt(t.str, 'Input file'),
        out: req(t.str, 'Output file'),
        append: opt(t.bool, 'Append instead of truncating (default false)'),
      }),
      serial: hostdev,
      parallel: hostdev,
      pipe: hostdev,
      socket: wrapped('ChardevSocket', {
        addr: req(SocketAddressLegacy, 'Address to listen on (server) or connect to'),
        'tls-creds': opt(t.str, 'Id of TLS credentials to secure the connection (not supported)'),
        'tls-authz': opt(t.str, 'Id of an authorization object checking TLS clients (not supported)'),
        server: opt(t.bool, 'Listen (default true)'),
        wait: opt(t.bool, 'Wait for a client before going on (default false)'),
        nodelay: opt(t.bool, 'Set TCP_NODELAY'),
        telnet: opt(t.bool, 'Speak the telnet protocol (not supported)'),
        tn3270: opt(t.bool, 'Speak TN3270 (not supported)'),
        websocket: opt(t.bool, 'Speak WebSocket (not supported)'),
        reconnect: opt(t.int, 'Client: seconds between reconnection attempts (not supported)'),
      }),
      udp: wrapped('ChardevUdp', {
        remote: req(SocketAddressLegacy, `Where datagrams are sent${NO}`),
        local: opt(SocketAddressLegacy, `Where datagrams are received${NO}`),
      }),
      pty: commonOnly,
      null: commonOnly,
      mux: wrapped('ChardevMux', { chardev: req(t.str, `The chardev to multiplex${NO}`) }),
      msmouse: commonOnly,
      wctablet: commonOnly,
      braille: commonOnly,
      testdev: commonOnly,
      stdio: wrapped('ChardevStdio', {
        signal: opt(t.bool, 'Ctrl-C on the terminal stops the process (command line only)'),
      }),
      console: commonOnly,
      spicevmc: wrapped('ChardevSpiceChannel', { type: req(t.str, `The SPICE channel name${NO}`) }),
      spiceport: wrapped('ChardevSpicePort', { fqdn: req(t.str, `The SPICE port name${NO}`) }),
      'qemu-vdagent': wrapped('ChardevQemuVDAgent', {
        mouse: opt(t.bool, `Pass mouse events${NO}`),
        clipboard: opt(t.bool, `Share the clipboard${NO}`),
      }),
      dbus: wrapped('ChardevDBus', { name: req(t.str, `The D-Bus channel name${NO}`) }),
      vc: wrapped('ChardevVC', {
        width: opt(t.int, `Width of the console, pixels${NO}`),
        height: opt(t.int, `Height of the console, pixels${NO}`),
        cols: opt(t.int, `Width of the console, characters${NO}`),
        rows: opt(t.int, `Height of the console, characters${NO}`),
      }),
      ringbuf,
      memory: ringbuf,
    };
  },
);

const ChardevReturn = t.object('ChardevReturn', { pty: opt(t.str, 'The pty a pty chardev created') });
const DataFormat = t.enum('DataFormat', ['utf8', 'base64']);

// ---- backends ----

type SocketAddr =
  | { type: 'inet'; data: { host: string; port: string } & Record<string, unknown> }
  | { type: 'unix'; data: { path: string; abstract?: boolean; tight?: boolean } }
  | { type: 'vsock' | 'fd'; data: Record<string, string> };

interface Common {
  logfile?: string;
  logappend?: boolean;
}

/** ChardevBackend, the union chardev-add takes. */
export type ChardevBackend =
  | { type: 'ringbuf' | 'memory'; data: Common & { size?: number } }
  | { type: 'null'; data: Common }
  | { type: 'file'; data: Common & { in?: string; out: string; append?: boolean } }
  | { type: 'stdio'; data: Common & { signal?: boolean } }
  | {
      type: 'socket';
      data: Common & {
        addr: SocketAddr;
        server?: boolean;
        wait?: boolean;
        nodelay?: boolean;
        reconnect?: number;
      } & Record<string, unknown>;
    }
  | {
      type: Exclude<
        (typeof BACKEND_KINDS)[number],
        'ringbuf' | 'memory' | 'null' | 'file' | 'stdio' | 'socket'
      >;
      data: Common;
    };

/** The backends blockrepd opens, in the order qemu-storage-daemon 7.2 lists them. */
const OPENED = ['null', 'ringbuf', 'stdio', 'socket', 'file', 'memory'];

/** strerror() as QEMU prints it (libuv's text, capitalised as glibc's is). */
function strerror(e: unknown): string {
  const errno = (e as NodeJS.ErrnoException).errno;
  const text = errno === undefined ? undefined : getSystemErrorMap().get(errno)?.[1];
  if (!text) return (e as Error).message;
  return text[0]!.toUpperCase() + text.slice(1);
}

/** Where a frontend's streams come from: each connection (socket) or one stream (the rest). */
type Frontend = (stream: Duplex) => void;

/** A character device backend: what it is called in query-chardev, and bytes out of QEMU. */
abstract class Chardev {
  /** The frontend using the chardev (a monitor); a used chardev cannot be removed or changed. */
  frontend: Frontend | null = null;
  private logFd: number | null = null;

  constructor(
    readonly kind: string,
    common: Common,
  ) {
    if (common.logfile !== undefined) {
      try {
        this.logFd = openSync(common.logfile, common.logappend ? 'a' : 'w', 0o666);
      } catch (e) {
        throw new BlockError(`Could not open '${common.logfile}': ${strerror(e)}`);
      }
    }
  }

  /** query-chardev's filename: the chardev in QEMU's command-line encoding. */
  abstract get filename(): string;

  /** Output: what a frontend writes (to the file, ring or peer), copied to the logfile. */
  write(data: Buffer): void {
    if (this.logFd !== null) writeSync(this.logFd, data);
    this.output(data);
  }

  protected abstract output(data: Buffer): void;

  /** Hands the chardev to its frontend. */
  open(frontend: Frontend): void {
    this.frontend = frontend;
    frontend(this.stream());
  }

  /** The frontend's stream: writes go out through the chardev; input, where there is any, in. */
  protected stream(): Duplex {
    return new Duplex({
      read() {},
      write: (chunk: Buffer, _enc, cb) => {
        this.write(chunk);
        cb();
      },
    });
  }

  async close(): Promise<void> {
    if (this.logFd !== null) closeSync(this.logFd);
    this.logFd = null;
  }
}

class NullChardev extends Chardev {
  get filename(): string {
    return 'null';
  }

  protected output(): void {}
}

export class RingbufChardev extends Chardev {
  private readonly ring: Buffer;
  /** Bytes ever written and ever consumed; the ring holds the last `size` of the difference. */
  private prod = 0;
  private cons = 0;

  constructor(kind: string, opts: Common & { size?: number }) {
    const size = opts.size ?? 65536;
    // QEMU's test lets 0 through; that ring then holds nothing.
    if (size !== 0 && !(size > 0 && Number.isInteger(Math.log2(size))))
      throw new BlockError('size of ringbuf chardev must be power of two');
    super(kind, opts);
    this.ring = Buffer.alloc(size);
  }

  get filename(): string {
    return this.kind;
  }

  protected output(data: Buffer): void {
    const size = this.ring.length;
    if (size === 0) return;
    for (const b of data) this.ring[this.prod++ % size] = b;
    // A full ring drops its oldest bytes.
    if (this.prod - this.cons > size) this.cons = this.prod - size;
  }

  /** Takes up to `max` of the oldest bytes. */
  read(max: number): Buffer {
    const size = this.ring.length;
    const n = Math.min(max, this.prod - this.cons);
    const out = Buffer.alloc(n);
    for (let i = 0; i < n; i++) out[i] = this.ring[(this.cons + i) % size]!;
    this.cons += n;
    return out;
  }
}

function openOrThrow(path: string, flags: string): number {
  try {
    return openSync(path, flags, 0o666);
  } catch (e) {
    throw new BlockError(`Could not open '${path}': ${strerror(e)}`);
  }
}

class FileChardev extends Chardev {
  private readonly out: number;
  private readonly inFd: number | null;

  constructor(opts: Common & { in?: string; out: string; append?: boolean }) {
    super('file', opts);
    this.out = openOrThrow(opts.out, opts.append ? 'a' : 'w');
    try {
      this.inFd = opts.in === undefined ? null : openOrThrow(opts.in, 'r');
    } catch (e) {
      closeSync(this.out);
      throw e;
    }
  }

  get filename(): string {
    return 'file';
  }

  protected output(data: Buffer): void {
    writeSync(this.out, data);
  }

  protected override stream(): Duplex {
    const s = super.stream();
    // The input file feeds the frontend (a monitor reads its commands from it).
    if (this.inFd !== null)
      createReadStream('', { fd: this.inFd, autoClose: false }).on('data', (d) => s.push(d));
    return s;
  }

  override async close(): Promise<void> {
    closeSync(this.out);
    if (this.inFd !== null) closeSync(this.inFd);
    await super.close();
  }
}

/** The daemon's stdin and stdout (command line only: one per process). */
class StdioChardev extends Chardev {
  get filename(): string {
    return 'stdio';
  }

  protected output(data: Buffer): void {
    process.stdout.write(data);
  }

  protected override stream(): Duplex {
    return Duplex.from({ readable: process.stdin, writable: process.stdout });
  }
}

/** host:port of one end, bracketed for IPv6 as QEMU prints it. */
function hostPort(addr: string | undefined, port: number | undefined, family: string | undefined): string {
  return family === 'IPv6' ? `[${addr}]:${port}` : `${addr}:${port}`;
}

/**
 * A stream socket: a listener (server, one new monitor per connection) or a client connection.
 * Unix listeners are created mode 0600, as the daemon's QMP sockets are.
 */
class SocketChardev extends Chardev {
  private listener: Server | null = null;
  private readonly conns = new Set<Socket>();
  private boundPort = 0;

  private constructor(
    readonly addr: SocketAddr,
    readonly server: boolean,
    private readonly nodelay: boolean,
    opts: Common,
  ) {
    super('socket', opts);
  }

  static async create(o: Extract<ChardevBackend, { type: 'socket' }>['data']): Promise<SocketChardev> {
    for (const k of ['telnet', 'tn3270', 'websocket', 'tls-creds', 'tls-authz'] as const)
      if (o[k] !== undefined && o[k] !== false)
        throw new BlockError(`blockrepd does not support '${k}' on sockets`);
    if (o.reconnect) throw new BlockError("blockrepd does not support 'reconnect' on sockets");
    if (o.logfile !== undefined) throw new BlockError("blockrepd does not support 'logfile' on sockets");
    if (o.addr.type !== 'inet' && o.addr.type !== 'unix')
      throw new BlockError(`blockrepd does not support socket addresses of type '${o.addr.type}'`);
    const server = o.server ?? true;
    if (server && o.wait) throw new BlockError("blockrepd does not support 'wait' on server sockets");
    const c = new SocketChardev(o.addr, server, o.nodelay ?? false, o);
    if (server) await c.listen();
    else await c.connect();
    return c;
  }

  /** The unix socket path a listener created (the daemon removes it on exit). */
  get listenPath(): string | undefined {
    return this.server && this.addr.type === 'unix' ? this.addr.data.path : undefined;
  }

  private address(): string {
    const a = this.addr;
    if (a.type === 'unix') return `unix:${a.data.path}`;
    const port = this.server ? this.boundPort : a.data.port;
    return `tcp:${a.data.host}:${port}`;
  }

  get filename(): string {
    const [c] = this.conns;
    const listen = this.server ? ',server=on' : '';
    if (!c) return `disconnected:${this.address()}${listen}`;
    // A connection names its local end (a client's unix socket has no name) and its peer.
    if (this.addr.type === 'unix') return `unix:${this.listenPath ?? ''}${listen}`;
    const local = hostPort(c.localAddress, c.localPort, c.localFamily);
    return `tcp:${local}${listen} <-> ${hostPort(c.remoteAddress, c.remotePort, c.remoteFamily)}`;
  }

  private async listen(): Promise<void> {
    const srv = createServer((sock) => this.connected(sock));
    const a = this.addr;
    const onListening = (resolve: () => void, reject: (e: Error) => void) => {
      srv.once('error', reject);
      const done = () => {
        srv.off('error', reject);
        resolve();
      };
      if (a.type === 'unix') srv.listen(a.data.path, done);
      else srv.listen(Number(a.data.port), a.data.host, done);
    };
    const what = a.type === 'unix' ? a.data.path : `${a.data.host}:${a.data.port}`;
    try {
      if (a.type === 'unix') {
        // A stale socket of an earlier run is replaced, as QEMU does.
        try {
          if (lstatSync(a.data.path).isSocket()) unlinkSync(a.data.path);
        } catch {
          // nothing there
        }
        const old = process.umask(0o177);
        try {
          await new Promise<void>(onListening);
        } finally {
          process.umask(old);
        }
      } else {
        await new Promise<void>(onListening);
        this.boundPort = (srv.address() as { port: number }).port;
      }
    } catch (e) {
      throw new BlockError(`Failed to bind socket to ${what}: ${strerror(e)}`);
    }
    srv.on('error', () => {});
    this.listener = srv;
  }

  private async connect(): Promise<void> {
    const a = this.addr;
    const sock =
      a.type === 'unix'
        ? connect(a.data.path)
        : connect(Number(a.data.port), (a as { data: { host: string } }).data.host);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once('error', reject);
        sock.once('connect', () => {
          sock.off('error', reject);
          resolve();
        });
      });
    } catch (e) {
      const what = a.type === 'unix' ? a.data.path : `${(a.data as { host: string }).host}:${a.data.port}`;
      throw new BlockError(`Failed to connect to '${what}': ${strerror(e)}`);
    }
    this.connected(sock);
  }

  private connected(sock: Socket): void {
    if (this.nodelay) sock.setNoDelay(true);
    this.conns.add(sock);
    sock.on('error', () => {});
    sock.once('close', () => this.conns.delete(sock));
    if (this.frontend) this.frontend(sock);
    else sock.resume(); // nobody reads: the peer's bytes are dropped
  }

  protected output(data: Buffer): void {
    for (const c of this.conns) c.write(data);
  }

  override open(frontend: Frontend): void {
    this.frontend = frontend;
    for (const c of this.conns) {
      c.pause();
      frontend(c);
    }
  }

  override async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    const l = this.listener;
    this.listener = null;
    if (l) await new Promise<void>((r) => l.close(() => r()));
    await super.close();
  }
}

// ---- ringbuf data ----

const MUTF8_NUL = Buffer.from([0xc0, 0x80]);

/** QMP strings as QEMU stores them: UTF-8, with U+0000 as the two bytes C0 80 (modified UTF-8). */
function qemuUtf8(s: string): Buffer {
  const parts = s.split('\0').map((p) => Buffer.from(p, 'utf8'));
  return Buffer.concat(parts.flatMap((p, i) => (i ? [MUTF8_NUL, p] : [p])));
}
const BASE64_CHARS = /^[A-Za-z0-9+/=\n]*$/;
const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/**
 * Base64 as QEMU decodes it (glib's decoder): characters outside the alphabet but allowed (a
 * newline) are skipped, '=' counts as a zero digit, every full group of four gives three bytes
 * less one per '=' in its last two places, and a partial group at the end gives nothing.
 */
function qemuBase64Decode(text: string): Buffer {
  if (!BASE64_CHARS.test(text)) throw new BlockError('Base64 data contains invalid characters');
  const out: number[] = [];
  let v = 0;
  let n = 0;
  let prev = '';
  let last = '';
  for (const c of text) {
    if (c === '\n') continue;
    prev = last;
    last = c;
    v = ((v << 6) | (c === '=' ? 0 : B64.indexOf(c))) & 0xffffff;
    if (++n === 4) {
      out.push(v >> 16);
      if (prev !== '=') out.push((v >> 8) & 0xff);
      if (last !== '=') out.push(v & 0xff);
      n = 0;
    }
  }
  return Buffer.from(out);
}

/**
 * Bytes as QEMU returns them for format utf8: a C string (it ends at the first NUL byte), each
 * invalid or cut sequence one U+FFFD, C0 80 read as U+0000.
 */
function qemuUtf8Text(data: Buffer): string {
  const end = data.indexOf(0);
  const b = end < 0 ? data : data.subarray(0, end);
  let out = '';
  let i = 0;
  while (i < b.length) {
    const c = b[i]!;
    if (c < 0x80) {
      out += String.fromCharCode(c);
      i++;
      continue;
    }
    // The sequence length the lead byte announces (up to 6, as in the original UTF-8).
    const len =
      c >= 0xfc && c <= 0xfd ? 6 : c >= 0xf8 ? 5 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
    if (len === 0 || c >= 0xfe) {
      out += '\ufffd';
      i++;
      continue;
    }
    let cp = c & (0x7f >> len);
    let j = 1;
    for (; j < len && i + j < b.length && (b[i + j]! & 0xc0) === 0x80; j++) cp = cp * 64 + (b[i + j]! & 0x3f);
    i += j;
    const min = [0, 0, 0x80, 0x800, 0x10000, 0x200000, 0x4000000][len]!;
    if (
      j < len ||
      cp > 0x10ffff ||
      (cp >= 0xd800 && cp <= 0xdfff) ||
      (cp < min && !(len === 2 && cp === 0))
    ) {
      out += '\ufffd';
      continue;
    }
    // Noncharacters are not passed on either.
    out += (cp & 0xfffe) === 0xfffe || (cp >= 0xfdd0 && cp <= 0xfdef) ? '\ufffd' : String.fromCodePoint(cp);
  }
  return out;
}

// ---- the registry ----

export interface ChardevInfo {
  label: string;
  filename: string;
  'frontend-open': boolean;
}

/** QemuOpts keys of -chardev (every backend's: unknown keys are refused, others ignored). */
const CHARDEV_KEYS = new Set([
  'backend',
  'id',
  'path',
  'host',
  'port',
  'fd',
  'local',
  'localaddr',
  'localport',
  'to',
  'ipv4',
  'ipv6',
  'wait',
  'server',
  'delay',
  'nodelay',
  'reconnect',
  'telnet',
  'tn3270',
  'tls-creds',
  'tls-authz',
  'websocket',
  'width',
  'height',
  'cols',
  'rows',
  'mux',
  'signal',
  'name',
  'debug',
  'size',
  'chardev',
  'append',
  'logfile',
  'logappend',
  'mouse',
  'clipboard',
  'abstract',
  'tight',
  'input-path',
]);

const SIZE_HINT =
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';

function onOff(v: unknown, name: string): boolean | undefined {
  if (v === undefined || typeof v === 'boolean') return v;
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  throw new BlockError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** Every chardev of a daemon, by id: the command line's and chardev-add's. */
export class ChardevRegistry {
  private readonly devs = new Map<string, Chardev>();

  get(id: string): Chardev | undefined {
    return this.devs.get(id);
  }

  /** query-chardev, in creation order. */
  list(): ChardevInfo[] {
    return [...this.devs].map(([label, c]) => ({
      label,
      filename: c.filename,
      'frontend-open': c.frontend !== null,
    }));
  }

  /** Opens a backend (errors carry QEMU's text without the chardev's name). */
  private async create(b: ChardevBackend, cmdline: boolean): Promise<Chardev> {
    switch (b.type) {
      case 'null':
        return new NullChardev('null', b.data);
      case 'ringbuf':
      case 'memory':
        return new RingbufChardev(b.type, b.data);
      case 'file':
        return new FileChardev(b.data);
      case 'socket':
        return SocketChardev.create(b.data);
      case 'stdio':
        if (!cmdline) throw new BlockError('blockrepd has stdio on the command line only');
        if ([...this.devs.values()].some((c) => c instanceof StdioChardev))
          throw new BlockError('cannot use stdio by multiple character devices');
        return new StdioChardev('stdio', b.data);
      default:
        throw new BlockError(`'${b.type}' is not a valid char driver name`);
    }
  }

  /** chardev-add. */
  async add(id: string, backend: ChardevBackend): Promise<Record<string, never>> {
    if (this.devs.has(id)) throw new BlockError(`Chardev with id '${id}' already exists`);
    const c = await this.create(backend, false).catch((e: Error) => {
      throw new BlockError(`Failed to add chardev '${id}': ${e.message}`, { cause: e });
    });
    if (this.devs.has(id)) {
      await c.close();
      throw new BlockError(`Chardev with id '${id}' already exists`);
    }
    this.devs.set(id, c);
    return {};
  }

  /**
   * chardev-change. Where the new backend fails the old one stays (QEMU 7.2 loses the chardev
   * there; README says so).
   */
  async change(id: string, backend: ChardevBackend): Promise<Record<string, never>> {
    const old = this.devs.get(id);
    if (!old) throw new BlockError(`Chardev '${id}' does not exist`);
    if (old.frontend) throw new BlockError('Chardev user does not support chardev hotswap');
    const c = await this.create(backend, false).catch((e: Error) => {
      throw new BlockError(`Failed to add chardev '${id}': ${e.message}`, { cause: e });
    });
    if (this.devs.get(id) !== old) {
      await c.close();
      throw new BlockError(`Chardev '${id}' does not exist`);
    }
    this.devs.set(id, c);
    await old.close();
    return {};
  }

  /** chardev-remove. */
  async remove(id: string): Promise<void> {
    const c = this.devs.get(id);
    if (!c) throw new BlockError(`Chardev '${id}' not found`);
    if (c.frontend) throw new BlockError(`Chardev '${id}' is busy`);
    this.devs.delete(id);
    await c.close();
  }

  /**
   * --chardev BACKEND,id=ID,...: QemuOpts as qemu-storage-daemon reads them, with its texts.
   * Returns the unix socket path a listener created, if any.
   */
  async addFromOptions(o: Record<string, unknown>): Promise<{ listenPath?: string }> {
    for (const k of Object.keys(o))
      if (!CHARDEV_KEYS.has(k)) throw new BlockError(`Invalid parameter '${k}'`);
    const id = o.id;
    if (id !== undefined && !/^[A-Za-z][A-Za-z0-9._-]*$/.test(String(id))) {
      throw new BlockError(
        "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
      );
    }
    const str = (k: string) => (o[k] === undefined ? undefined : String(o[k]));
    const common: Common = { logfile: str('logfile'), logappend: onOff(o.logappend, 'logappend') };
    const kind = String(o.backend);
    let backend: ChardevBackend;
    switch (kind) {
      case 'null':
        backend = { type: 'null', data: common };
        break;
      case 'ringbuf':
      case 'memory': {
        let size: number | undefined;
        if (o.size !== undefined) {
          size = parseSize(String(o.size));
          if (size === undefined)
            throw new BlockError(`Parameter 'size' expects a non-negative number below 2^64\n${SIZE_HINT}`);
        }
        backend = { type: kind, data: { ...common, size } };
        break;
      }
      case 'file': {
        const out = str('path');
        if (out === undefined) throw new BlockError('chardev: file: no filename given');
        backend = { type: 'file', data: { ...common, out, append: onOff(o.append, 'append') } };
        break;
      }
      case 'stdio':
        backend = { type: 'stdio', data: { ...common, signal: onOff(o.signal, 'signal') } };
        break;
      case 'socket': {
        const path = str('path');
        const host = str('host');
        let addr: SocketAddr;
        if (path !== undefined) addr = { type: 'unix', data: { path } };
        else if (host !== undefined) addr = { type: 'inet', data: { host, port: str('port') ?? '' } };
        else throw new BlockError(`Unable to parse FD number ${str('fd') ?? ''}`);
        // The command line's default is a client; as before, blockrepd does not block on wait=on.
        backend = {
          type: 'socket',
          data: {
            ...common,
            addr,
            server: onOff(o.server, 'server') ?? false,
            nodelay: onOff(o.nodelay, 'nodelay') ?? onOff(o.delay, 'delay') === false,
            telnet: onOff(o.telnet, 'telnet'),
            tn3270: onOff(o.tn3270, 'tn3270'),
            websocket: onOff(o.websocket, 'websocket'),
            'tls-creds': str('tls-creds'),
            'tls-authz': str('tls-authz'),
            reconnect: o.reconnect === undefined ? undefined : Number(o.reconnect),
          },
        };
        break;
      }
      default:
        throw new BlockError(
          (BACKEND_KINDS as readonly string[]).includes(kind)
            ? `chardev backend '${kind}' is not supported by blockrepd (${OPENED.join(', ')} are)`
            : `'${kind}' is not a valid char driver name`,
        );
    }
    if (id === undefined) throw new BlockError('chardev: no id specified');
    if (this.devs.has(String(id)))
      throw new BlockError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    const c = await this.create(backend, true);
    this.devs.set(String(id), c);
    return { listenPath: c instanceof SocketChardev ? c.listenPath : undefined };
  }

  /** Gives a chardev to a frontend (--monitor chardev=ID); it stays busy from then on. */
  open(id: string, frontend: Frontend): void {
    const c = this.devs.get(id);
    if (!c) throw new BlockError(`chardev "${id}" not found`);
    if (c.frontend) throw new BlockError(`Chardev '${id}' is busy`);
    c.open(frontend);
  }

  async closeAll(): Promise<void> {
    const all = [...this.devs.values()];
    this.devs.clear();
    await Promise.all(all.map((c) => c.close().catch(() => {})));
  }
}

function ringbuf(chardevs: ChardevRegistry, device: string): RingbufChardev {
  const c = chardevs.get(device);
  if (!c) throw new BlockError(`Device '${device}' not found`);
  if (!(c instanceof RingbufChardev)) throw new BlockError(`${device} is not a ringbuf device`);
  return c;
}

export function registerChardevCommands(r: CommandRegistry, chardevs: ChardevRegistry): void {
  const idArg = (name: string, doc: string) => t.object(name, { id: req(t.str, doc) });
  const backendArgs = (name: string) =>
    t.object(name, {
      id: req(t.str, "The chardev's id"),
      backend: req(ChardevBackendType, 'Backend type and options'),
    });

  r.registerCommand({
    name: 'chardev-add',
    args: backendArgs('q_obj_chardev-add-arg'),
    returns: ChardevReturn,
    doc: 'Adds a character device (backends ringbuf/memory, null, file and socket; the id must be new).',
    examples: [
      { args: { id: 'ring0', backend: { type: 'ringbuf', data: { size: 65536 } } } },
      {
        title: 'A second monitor socket (a QMP monitor still has to be attached to it)',
        args: {
          id: 'mon1',
          backend: {
            type: 'socket',
            data: { addr: { type: 'unix', data: { path: '/run/blockrepd/mon1.sock' } }, server: true },
          },
        },
      },
    ],
    handler: (a: { id: string; backend: ChardevBackend }) => chardevs.add(a.id, a.backend),
  });

  r.registerCommand({
    name: 'chardev-change',
    args: backendArgs('q_obj_chardev-change-arg'),
    returns: ChardevReturn,
    doc: 'Replaces the backend of a chardev no frontend (monitor) uses.',
    examples: [
      {
        args: {
          id: 'log0',
          backend: { type: 'file', data: { out: '/var/log/blockrepd/log0.txt', append: true } },
        },
      },
    ],
    handler: (a: { id: string; backend: ChardevBackend }) => chardevs.change(a.id, a.backend),
  });

  r.registerCommand({
    name: 'chardev-remove',
    args: idArg('q_obj_chardev-remove-arg', 'The chardev to remove (not in use by a monitor)'),
    doc: 'Removes a character device that no frontend uses.',
    examples: [{ args: { id: 'ring0' } }],
    handler: (a: { id: string }) => chardevs.remove(a.id),
  });

  r.registerCommand({
    name: 'chardev-send-break',
    args: idArg('q_obj_chardev-send-break-arg', 'The chardev'),
    doc: "Sends a break to a character device (none of blockrepd's backends has a line to break).",
    examples: [{ args: { id: 'ring0' } }],
    handler(a: { id: string }) {
      if (!chardevs.get(a.id)) throw new BlockError(`Chardev '${a.id}' not found`);
    },
  });

  r.registerCommand({
    name: 'query-chardev',
    returns: t.array(
      t.object('ChardevInfo', {
        label: req(t.str, "The chardev's id"),
        filename: req(
          t.str,
          'The chardev in the command-line encoding ("unix:/path,server=on", "disconnected:...")',
        ),
        'frontend-open': req(t.bool, 'Whether a frontend (a monitor) has it open'),
      }),
    ),
    doc: 'Lists the character devices, those of the command line included.',
    examples: [
      {
        returns: [
          { label: 'ring0', filename: 'ringbuf', 'frontend-open': false },
          { label: 'mon0', filename: 'unix:/run/blockrepd/qmp.sock,server=on', 'frontend-open': true },
        ],
      },
    ],
    handler: () => chardevs.list(),
  });

  r.registerCommand({
    name: 'query-chardev-backends',
    returns: t.array(t.object('ChardevBackendInfo', { name: req(t.str, 'Backend name') })),
    doc: 'Lists the chardev backends blockrepd opens: null, ringbuf, stdio (command line only), socket, file, memory.',
    examples: [
      {
        returns: [
          { name: 'null' },
          { name: 'ringbuf' },
          { name: 'stdio' },
          { name: 'socket' },
          { name: 'file' },
          { name: 'memory' },
        ],
      },
    ],
    handler: () => OPENED.map((name) => ({ name })),
  });

  r.registerCommand({
    name: 'ringbuf-write',
    args: t.object('q_obj_ringbuf-write-arg', {
      device: req(t.str, 'A ringbuf (or memory) chardev'),
      data: req(t.str, 'The data'),
      format: opt(DataFormat, 'utf8 (default: the string itself is written) or base64 (its decoding is)'),
    }),
    doc: 'Writes to a ring buffer chardev; a full ring drops its oldest bytes.',
    examples: [
      { args: { device: 'ring0', data: 'hello' } },
      { title: 'Bytes given in base64', args: { device: 'ring0', data: 'AAEC/w==', format: 'base64' } },
    ],
    handler(a: { device: string; data: string; format?: 'utf8' | 'base64' }) {
      const c = ringbuf(chardevs, a.device);
      c.write(a.format === 'base64' ? qemuBase64Decode(a.data) : qemuUtf8(a.data));
    },
  });

  r.registerCommand({
    name: 'ringbuf-read',
    args: t.object('q_obj_ringbuf-read-arg', {
      device: req(t.str, 'A ringbuf (or memory) chardev'),
      size: req(t.int, 'How many bytes to take at most'),
      format: opt(DataFormat, 'utf8 (default: as text, up to a NUL, invalid sequences as U+FFFD) or base64'),
    }),
    returns: { kind: 'str' } as QType,
    doc: 'Reads (and takes) up to size bytes from a ring buffer chardev.',
    examples: [{ args: { device: 'ring0', size: 100 }, returns: 'hello' }],
    handler(a: { device: string; size: number; format?: 'utf8' | 'base64' }) {
      const c = ringbuf(chardevs, a.device);
      if (a.size <= 0) throw new BlockError('size must be greater than zero');
      const data = c.read(a.size);
      return a.format === 'base64' ? data.toString('base64') : qemuUtf8Text(data);
    },
  });
}
