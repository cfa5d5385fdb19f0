import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { BlockError } from '@blockrep/block';

/*
 * One COLO host's config file (JSON): the pair, this host and its peer, the disks, the guest
 * export, the timers, the arbiter and the TLS credentials. Everything is checked before anything
 * starts; a bad value is one error naming its key.
 */

/** A listening or connecting address: TCP host and port, or a Unix socket path. */
export type ColoAddress = { type: 'inet'; host: string; port: number } | { type: 'unix'; path: string };

export interface ColoHost {
  name: string;
  /** Where this host's NBD server listens for the replication link (the secondary's export). */
  replication: ColoAddress;
  /** Where this host's peer channel listens (heartbeat, checkpoints, control). */
  channel: ColoAddress;
}

export type ColoArbiterConfig =
  | { type: 'lock-file'; path: string; leaseTtl: number }
  | { type: 'etcd'; endpoints: string[]; leaseTtl: number; prefix: string };

export interface ColoConfig {
  /** The config file it came from (paths in it are relative to its directory). */
  file: string;
  pair: string;
  host: ColoHost;
  peer: ColoHost;
  /** The protected disk (qcow2). */
  disk: string;
  /** The secondary's scratch images (created when missing). */
  active: string;
  hidden: string;
  /** Role, epoch and what the pair knows of the peer's disk survive restarts here. */
  stateDir: string;
  guest: { address: ColoAddress; export: string };
  /** Milliseconds between checkpoints (0: only on demand). */
  checkpointInterval: number;
  heartbeat: { interval: number; timeout: number };
  arbiter: ColoArbiterConfig;
  /** x509 credentials (QEMU's tls-creds-x509 directory layout); absent: no TLS. */
  tls: { dir: string } | null;
}

/** A bad config: the error names the key, and the file. */
export class ColoConfigError extends BlockError {
  constructor(
    readonly file: string,
    readonly key: string,
    why: string,
  ) {
    super(`${file}: '${key}' ${why}`, { errno: 'EINVAL' });
  }
}

/** The files of a tls-creds-x509 directory each host needs (it is server and client both). */
export const TLS_FILES = [
  'ca-cert.pem',
  'server-cert.pem',
  'server-key.pem',
  'client-cert.pem',
  'client-key.pem',
];

type Json = Record<string, unknown>;

/** Reads, parses and checks a config file. */
export function loadColoConfig(path: string): ColoConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new BlockError(`Could not read COLO config '${path}': ${(e as Error).message}`, {
      errno: 'ENOENT',
    });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new BlockError(`${path}: not valid JSON: ${(e as Error).message}`, { errno: 'EINVAL' });
  }
  return parseColoConfig(raw, path);
}

/** Checks a parsed config; relative paths are taken from the config file's directory. */
export function parseColoConfig(raw: unknown, file: string): ColoConfig {
  const r = new Reader(file);
  const top = r.object(raw, '');
  r.only(top, '', [
    'pair',
    'host',
    'peer',
    'disk',
    'active',
    'hidden',
    'state-dir',
    'guest',
    'checkpoint-interval',
    'heartbeat',
    'arbiter',
    'tls',
  ]);
  const pair = r.name(top.pair, 'pair');
  const host = r.host(top.host, 'host');
  const peer = r.host(top.peer, 'peer');
  if (host.name === peer.name) throw r.bad('peer.name', `must differ from 'host.name' (both '${host.name}')`);
  const disk = r.path(top.disk, 'disk');
  const active = r.path(top.active, 'active');
  const hidden = r.path(top.hidden, 'hidden');
  const seen = new Map<string, string>();
  for (const [key, p] of [
    ['disk', disk],
    ['active', active],
    ['hidden', hidden],
  ] as const) {
    const other = seen.get(p);
    if (other) throw r.bad(key, `names the same file as '${other}' (${p})`);
    seen.set(p, key);
  }
  const guestRaw = r.object(top.guest, 'guest');
  r.only(guestRaw, 'guest', ['address', 'export']);
  const guest = {
    address: r.address(guestRaw.address, 'guest.address'),
    export: r.string(guestRaw.export, 'guest.export'),
  };
  const hbRaw = r.object(top.heartbeat ?? {}, 'heartbeat');
  r.only(hbRaw, 'heartbeat', ['interval', 'timeout']);
  const heartbeat = {
    interval: r.millis(hbRaw.interval ?? 200, 'heartbeat.interval', 1),
    timeout: r.millis(hbRaw.timeout ?? 1000, 'heartbeat.timeout', 1),
  };
  if (heartbeat.timeout <= heartbeat.interval) {
    throw r.bad(
      'heartbeat.timeout',
      `must be longer than 'heartbeat.interval' (${heartbeat.timeout} <= ${heartbeat.interval})`,
    );
  }
  const arbiter = r.arbiter(top.arbiter, heartbeat.timeout);
  let tls: ColoConfig['tls'] = null;
  if (top.tls !== undefined) {
    const t = r.object(top.tls, 'tls');
    r.only(t, 'tls', ['dir']);
    const dir = r.path(t.dir, 'tls.dir');
    for (const f of TLS_FILES) {
      if (!existsSync(resolve(dir, f))) throw r.bad('tls.dir', `has no ${f} (${dir})`);
    }
    tls = { dir };
  }
  return {
    file,
    pair,
    host,
    peer,
    disk,
    active,
    hidden,
    stateDir: r.path(top['state-dir'], 'state-dir'),
    guest,
    checkpointInterval: r.millis(top['checkpoint-interval'] ?? 0, 'checkpoint-interval', 0),
    heartbeat,
    arbiter,
    tls,
  };
}

/** Parses "host:port", "[v6]:port" or "unix:/path". */
export function parseColoAddress(s: string): ColoAddress | null {
  if (s.startsWith('unix:')) {
    const path = s.slice(5);
    return path ? { type: 'unix', path } : null;
  }
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(s);
  if (!m) return null;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return null;
  return { type: 'inet', host: m[1] ?? m[2]!, port };
}

/** An address as the config writes it. */
export function formatColoAddress(a: ColoAddress): string {
  if (a.type === 'unix') return `unix:${a.path}`;
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

class Reader {
  private readonly base: string;

  constructor(readonly file: string) {
    this.base = dirname(resolve(file));
  }

  bad(key: string, why: string): ColoConfigError {
    return new ColoConfigError(this.file, key || '(top level)', why);
  }

  object(v: unknown, key: string): Json {
    if (v === undefined) throw this.bad(key, 'is missing');
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw this.bad(key, 'must be an object');
    return v as Json;
  }

  /** Refuses keys the format does not know (a typo would otherwise be silently ignored). */
  only(o: Json, key: string, known: string[]): void {
    for (const k of Object.keys(o)) {
      if (!known.includes(k)) throw this.bad(key ? `${key}.${k}` : k, `is not a known key`);
    }
  }

  string(v: unknown, key: string): string {
    if (v === undefined) throw this.bad(key, 'is missing');
    if (typeof v !== 'string' || v === '') throw this.bad(key, 'must be a non-empty string');
    return v;
  }

  /** A name used in keys and logs: letters, digits, '.', '_', '-'. */
  name(v: unknown, key: string): string {
    const s = this.string(v, key);
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(s)) {
      throw this.bad(key, `must be 1-64 letters, digits, '.', '_' or '-' (got '${s}')`);
    }
    return s;
  }

  path(v: unknown, key: string): string {
    const s = this.string(v, key);
    return isAbsolute(s) ? s : resolve(this.base, s);
  }

  millis(v: unknown, key: string, min: number): number {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > 24 * 3600 * 1000) {
      throw this.bad(
        key,
        `must be a whole number of milliseconds from ${min} to 86400000 (got ${JSON.stringify(v)})`,
      );
    }
    return v;
  }

  address(v: unknown, key: string): ColoAddress {
    const s = this.string(v, key);
    const a = parseColoAddress(s);
    if (!a) throw this.bad(key, `must be "host:port", "[v6-address]:port" or "unix:/path" (got '${s}')`);
    if (a.type === 'unix' && !isAbsolute(a.path)) a.path = resolve(this.base, a.path);
    return a;
  }

  host(v: unknown, key: string): ColoHost {
    const o = this.object(v, key);
    this.only(o, key, ['name', 'replication', 'channel']);
    return {
      name: this.name(o.name, `${key}.name`),
      replication: this.address(o.replication, `${key}.replication`),
      channel: this.address(o.channel, `${key}.channel`),
    };
  }

  arbiter(v: unknown, heartbeatTimeout: number): ColoArbiterConfig {
    const o = this.object(v, 'arbiter');
    const type = this.string(o.type, 'arbiter.type');
    const leaseTtl = this.millis(o['lease-ttl'] ?? 2 * heartbeatTimeout, 'arbiter.lease-ttl', 1);
    if (leaseTtl <= heartbeatTimeout) {
      // A primary renews well within the lease; a shorter lease would expire between heartbeats.
      throw this.bad(
        'arbiter.lease-ttl',
        `must be longer than 'heartbeat.timeout' (${leaseTtl} <= ${heartbeatTimeout})`,
      );
    }
    if (type === 'lock-file') {
      this.only(o, 'arbiter', ['type', 'path', 'lease-ttl']);
      const path = this.path(o.path, 'arbiter.path');
      const dir = dirname(path);
      if (!existsSync(dir) || !statSync(dir).isDirectory()) {
        throw this.bad('arbiter.path', `is in a directory that does not exist (${dir})`);
      }
      return { type, path, leaseTtl };
    }
    if (type === 'etcd') {
      this.only(o, 'arbiter', ['type', 'endpoints', 'lease-ttl', 'prefix']);
      const eps = o.endpoints;
      if (!Array.isArray(eps) || eps.length === 0) {
        throw this.bad('arbiter.endpoints', 'must be a non-empty list of URLs');
      }
      const endpoints = eps.map((e, i) => {
        const s = this.string(e, `arbiter.endpoints[${i}]`);
        if (!/^https?:\/\/[^/]+$/.test(s)) {
          throw this.bad(
            `arbiter.endpoints[${i}]`,
            `must be http://host:port or https://host:port (got '${s}')`,
          );
        }
        return s;
      });
      const prefix = o.prefix === undefined ? '/blockrep/colo/' : this.string(o.prefix, 'arbiter.prefix');
      return { type, endpoints, leaseTtl, prefix };
    }
    throw this.bad('arbiter.type', `must be 'lock-file' or 'etcd' (got '${type}')`);
  }
}
