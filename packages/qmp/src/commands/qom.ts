import { createDecipheriv } from 'node:crypto';
import { accessSync, constants, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdTlsCreds, registerTlsCreds, unregisterTlsCreds } from '@blockrep/nbd';
import { QmpError } from '../errors';
import { qdictOrder } from '../json';
import type { CommandRegistry } from '../registry';
import { opt, type QMembers, type QType, req, t, validateArgs, validateValue } from '../schema';

/*
 * QOM's user-creatable objects, as qemu-storage-daemon 7.2 offers those a storage daemon needs:
 * `secret`, `tls-creds-x509`, `iothread` (accepted; blockrepd has one thread) and
 * `throttle-group` (limits kept, not enforced). object-add and --object share `QomObjects.add`.
 */

const generic = (desc: string) => QmpError.generic(desc);

// ---- GLib's hash table order ----

/** GLib's table sizes' moduli by shift. */
const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/** g_str_hash: djb2 over signed chars; 0 and 1 are GLib's marks, so they become 2. */
function strHash(s: string): number {
  let h = 5381;
  for (const b of Buffer.from(s)) h = (Math.imul(h, 33) + ((b << 24) >> 24)) >>> 0;
  return Math.max(h, 2);
}

/**
 * The keys of a GHashTable (string keys) in the order GLib iterates them: QOM keeps an object's
 * properties in one, and qom-list shows them in that order (reversed).
 */
class GHashKeys {
  private shift = 3;
  private hashes = new Uint32Array(8);
  private keys: (string | undefined)[] = new Array(8);
  private nnodes = 0;
  private noccupied = 0;

  private get mask(): number {
    return (1 << this.shift) - 1;
  }

  private home(hash: number): number {
    return (Math.imul(hash, 11) >>> 0) % PRIME_MOD[this.shift]!;
  }

  private lookup(key: string, hash: number): number {
    let i = this.home(hash);
    let step = 0;
    let tomb = -1;
    while (this.hashes[i] !== 0) {
      if (this.hashes[i] === hash && this.keys[i] === key) return i;
      if (this.hashes[i] === 1 && tomb < 0) tomb = i;
      i = (i + ++step) & this.mask;
    }
    return tomb >= 0 ? tomb : i;
  }

  has(key: string): boolean {
    return this.hashes[this.lookup(key, strHash(key))]! >= 2;
  }

  add(key: string): void {
    const hash = strHash(key);
    const i = this.lookup(key, hash);
    if (this.hashes[i]! >= 2) return;
    if (this.hashes[i] === 0) this.noccupied++;
    this.hashes[i] = hash;
    this.keys[i] = key;
    this.nnodes++;
    this.maybeResize();
  }

  delete(key: string): void {
    const i = this.lookup(key, strHash(key));
    if (this.hashes[i]! < 2) return;
    this.hashes[i] = 1;
    this.keys[i] = undefined;
    this.nnodes--;
    this.maybeResize();
  }

  /** GLib's iteration order. */
  list(): string[] {
    const out: string[] = [];
    for (let i = 0; i < this.hashes.length; i++) if (this.hashes[i]! >= 2) out.push(this.keys[i]!);
    return out;
  }

  private maybeResize(): void {
    const size = this.hashes.length;
    const occ = this.noccupied;
    if ((size > this.nnodes * 4 && size > 8) || size <= occ + Math.floor(occ / 16)) this.resize();
  }

  /** GLib's in-place rehash: each entry moves to its new home, evicting what sits there. */
  private resize(): void {
    const oldSize = this.hashes.length;
    let n = Math.trunc(this.nnodes * 1.333);
    let shift = 0;
    for (; n; shift++) n >>= 1;
    this.shift = Math.max(shift, 3);
    const size = 1 << this.shift;
    const hashes = new Uint32Array(Math.max(size, oldSize));
    hashes.set(this.hashes);
    const keys = [...this.keys];
    const placed = new Uint8Array(Math.max(size, oldSize));
    for (let i = 0; i < oldSize; i++) {
      let hash = hashes[i]!;
      if (hash < 2) {
        hashes[i] = 0;
        continue;
      }
      if (placed[i]) continue;
      hashes[i] = 0;
      let key = keys[i];
      keys[i] = undefined;
      for (;;) {
        let j = this.home(hash);
        let step = 0;
        while (placed[j]) j = (j + ++step) & this.mask;
        placed[j] = 1;
        const evicted = hashes[j]!;
        const evictedKey = keys[j];
        hashes[j] = hash;
        keys[j] = key;
        if (evicted < 2) break;
        hash = evicted;
        key = evictedKey;
      }
    }
    this.hashes = hashes.slice(0, size);
    this.keys = keys.slice(0, size);
    this.noccupied = this.nnodes;
  }
}

// ---- types and properties ----

/** One property of a QOM class. */
interface QomProp {
  name: string;
  /** Its QOM type, as qom-list shows it. */
  type: string;
  /** Validates a value given to qom-set / object-add. */
  schema: QType;
  get(o: QomObject): unknown;
  /** Absent: read-only. */
  set?(o: QomObject, v: unknown): void;
}

interface QomType {
  name: string;
  parent?: string;
  abstract?: boolean;
  interfaces?: string[];
  /** This class's own properties, in the order qom-list shows them. */
  props: QomProp[];
  /** What object-add does once the properties are set (QEMU's `complete`); throws to refuse. */
  complete?(o: QomObject): void;
  /** What object-del undoes. */
  unparent?(o: QomObject): void;
}

/** An object of the tree: a container or a user-created object. */
export class QomObject {
  readonly values = new Map<string, unknown>();
  /** child<> properties (containers' children), in GLib's order. */
  readonly childOrder = new GHashKeys();
  readonly children = new Map<string, QomObject>();
  /** Set once object-add completed it: some properties are then fixed. */
  complete = false;
  constructor(
    readonly type: QomType,
    readonly id: string,
  ) {}

  str(name: string): string | undefined {
    return this.values.get(name) as string | undefined;
  }

  addChild(name: string, child: QomObject): void {
    if (this.children.has(name))
      throw generic(`attempt to add duplicate property '${name}' to object (type '${this.type.name}')`);
    this.children.set(name, child);
    this.childOrder.add(name);
  }

  removeChild(name: string): void {
    this.children.delete(name);
    this.childOrder.delete(name);
  }
}

/** A string property that reads "" while unset, as QOM's string getters do. */
function strProp(name: string, set = true): QomProp {
  return {
    name,
    type: 'string',
    schema: t.str,
    get: (o) => o.str(name) ?? '',
    set: set
      ? (o, v) => {
          o.values.set(name, v);
        }
      : undefined,
  };
}

function boolProp(name: string, dflt: boolean): QomProp {
  return {
    name,
    type: 'bool',
    schema: t.bool,
    get: (o) => (o.values.get(name) as boolean | undefined) ?? dflt,
    set: (o, v) => {
      o.values.set(name, v);
    },
  };
}

function enumProp(name: string, type: string, values: readonly string[], dflt: string): QomProp {
  return {
    name,
    type,
    schema: t.enum(type, values),
    get: (o) => o.str(name) ?? dflt,
    set: (o, v) => {
      o.values.set(name, v);
    },
  };
}

const loadedProp = (isLoaded: (o: QomObject) => boolean): QomProp => ({
  name: 'loaded',
  type: 'bool',
  schema: t.bool,
  get: isLoaded,
});

// secret: the value comes from data or file, optionally base64 and/or AES-256-CBC encrypted.

const SECRET_FORMATS = ['raw', 'base64'] as const;

function base64Decode(s: string): Buffer {
  if (s.includes('\0')) throw generic('Base64 data contains embedded NUL characters');
  if (!/^[A-Za-z0-9+/=\n]*$/.test(s)) throw generic('Base64 data contains invalid characters');
  return Buffer.from(s, 'base64');
}

/** The decoded bytes of a loaded secret (QEMU's rawdata). */
const secretBytes = new WeakMap<QomObject, Buffer>();

function lookupSecret(objects: QomObjects, id: string): Buffer {
  const o = objects.root.children.get('objects')?.children.get(id);
  if (!o) throw generic(`No secret with id '${id}'`);
  if (!objects.isA(o.type.name, 'secret_common')) throw generic(`Object with id '${id}' is not a secret`);
  const data = secretBytes.get(o);
  if (!data) throw generic(`Secret with id '${id}' has no data`);
  return data;
}

function loadSecret(objects: QomObjects, o: QomObject): void {
  const data = o.str('data');
  const file = o.str('file');
  if (data !== undefined && file !== undefined) throw generic("'file' and 'data' are mutually exclusive");
  let input: Buffer;
  if (data !== undefined) input = Buffer.from(data);
  else if (file !== undefined) {
    try {
      input = readFileSync(file);
    } catch (e) {
      const reason = STRERROR[(e as NodeJS.ErrnoException).code ?? ''] ?? (e as Error).message;
      // GLib's g_file_get_contents text, quotes included.
      throw generic(`Unable to read ${file}: Failed to open file “${file}”: ${reason}`);
    }
  } else throw generic("Either 'file' or 'data' must be provided");
  const base64 = o.str('format') === 'base64';
  const keyid = o.str('keyid');
  if (keyid === undefined) {
    secretBytes.set(o, base64 ? base64Decode(input.toString()) : input);
    return;
  }
  const key = lookupSecret(objects, keyid);
  if (key.length !== 32) throw generic('Key should be 32 bytes in length');
  const ivText = o.str('iv');
  if (ivText === undefined) throw generic('IV is required to decrypt secret');
  const iv = base64Decode(ivText);
  if (iv.length !== 16) throw generic(`IV should be 16 bytes in length not ${iv.length}`);
  const ciphertext = base64 ? base64Decode(input.toString()) : input;
  if (ciphertext.length % 16)
    throw generic(`Length ${ciphertext.length} must be a multiple of block size 16`);
  const aes = createDecipheriv('aes-256-cbc', key, iv).setAutoPadding(false);
  const plain = Buffer.concat([aes.update(ciphertext), aes.final()]);
  // QEMU checks the count in the last byte only, not the padding bytes themselves.
  const pad = plain.length ? plain[plain.length - 1]! : 0;
  if (pad > 16 || pad > plain.length)
    throw generic(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
  secretBytes.set(o, plain.subarray(0, plain.length - pad));
}

// tls-creds-x509: loaded into @blockrep/nbd's NbdTlsCreds, findable by id for tls-creds=ID.

/** strerror's text for the errors a credentials file gives. */
const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
};

function loadTlsCreds(objects: QomObjects, o: QomObject): void {
  const dir = o.str('dir');
  if (dir === undefined) throw generic("Missing 'dir' property value");
  const endpoint = o.str('endpoint') ?? 'client';
  // QEMU's order and text: the CA, then (a server's required) certificate and key.
  for (const f of ['ca-cert.pem', ...(endpoint === 'server' ? ['server-cert.pem', 'server-key.pem'] : [])]) {
    const path = join(dir, f);
    try {
      accessSync(path, constants.R_OK);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? '';
      throw generic(`Unable to access credentials ${path}: ${STRERROR[code] ?? (e as Error).message}`);
    }
  }
  const passwordid = o.str('passwordid');
  if (passwordid !== undefined) lookupSecret(objects, passwordid);
  registerTlsCreds(
    new NbdTlsCreds({
      id: o.id,
      endpoint: endpoint as 'server' | 'client',
      dir,
      verifyPeer: (o.values.get('verify-peer') as boolean | undefined) ?? true,
    }),
  );
}

// iothread: accepted and remembered; blockrepd runs every node in its one event loop.

const INT64_MAX = '9223372036854775807';

function loopProp(name: string, dflt: number): QomProp {
  return {
    name,
    type: 'int',
    schema: t.int,
    get: (o) => (o.values.get(name) as number | undefined) ?? dflt,
    set: (o, v) => {
      if ((v as number) < 0) throw generic(`${name} value must be in range [0, ${INT64_MAX}]`);
      const next = new Map(o.values).set(name, v);
      const min = (next.get('thread-pool-min') as number | undefined) ?? 0;
      const max = (next.get('thread-pool-max') as number | undefined) ?? 64;
      if (min > max) throw generic('bad thread-pool-min/thread-pool-max values');
      o.values.set(name, v);
    },
  };
}

// throttle-group: limits validated and kept as QEMU keeps them (not enforced by blockrepd).

/** ThrottleLimits' members in QAPI order. */
const LIMIT_NAMES = ['iops', 'bps'].flatMap((k) =>
  ['total', 'read', 'write'].flatMap((d) => [`${k}-${d}`, `${k}-${d}-max`, `${k}-${d}-max-length`]),
);
/** What a limit of ThrottleLimits means, from its name (e.g. bps-read-max). */
function limitDoc(name: string): string {
  if (name === 'iops-size')
    return 'Bytes one request counts as for the iops limits (0: any size counts once)';
  const [unit, dir, max, length] = name.split('-');
  const what = `${unit === 'bps' ? 'bytes' : 'requests'} per second (${dir === 'total' ? 'reads and writes' : `${dir}s`})`;
  if (length) return `Seconds a burst of ${unit}-${dir}-max may last (default 1)`;
  return max ? `Burst limit of ${what}` : `Limit of ${what}, 0 for none`;
}

const ThrottleLimits = t.object(
  'ThrottleLimits',
  Object.fromEntries([...LIMIT_NAMES, 'iops-size'].map((n) => [n, opt(t.int, limitDoc(n))])),
);
const THROTTLE_MAX = 1e15;

type Limits = Record<string, number>;

function limitsOf(o: QomObject): Limits {
  let l = o.values.get('limits') as Limits | undefined;
  if (!l) {
    l = Object.fromEntries(
      [...LIMIT_NAMES, 'iops-size'].map((n) => [n, n.endsWith('-length') ? 1 : 0]),
    ) as Limits;
    o.values.set('limits', l);
  }
  return l;
}

/** QEMU's checks of a throttle configuration, in its order. */
function checkLimits(l: Limits): void {
  const nz = (n: string) => l[n] !== 0;
  const mixed = (k: string, sfx: string) =>
    nz(`${k}-total${sfx}`) && (nz(`${k}-read${sfx}`) || nz(`${k}-write${sfx}`));
  if (mixed('bps', '') || mixed('iops', '') || mixed('bps', '-max') || mixed('iops', '-max'))
    throw generic('bps/iops/max total values and read/write values cannot be used at the same time');
  if (nz('iops-size') && !nz('iops-total') && !nz('iops-read') && !nz('iops-write'))
    throw generic('iops size requires an iops value to be set');
  for (const k of ['bps', 'iops']) {
    for (const d of ['total', 'read', 'write']) {
      const avg = l[`${k}-${d}`]!;
      const max = l[`${k}-${d}-max`]!;
      const len = l[`${k}-${d}-max-length`]!;
      // QEMU keeps these unsigned: a negative value is a huge one.
      if (avg < 0 || max < 0 || avg > THROTTLE_MAX || max > THROTTLE_MAX)
        throw generic(`bps/iops/max values must be within [0, ${THROTTLE_MAX}]`);
      if (!len) throw generic('the burst length cannot be 0');
      if (len > 1 && !max) throw generic('burst length set without burst rate');
      if (max && len > Math.floor(THROTTLE_MAX / max))
        throw generic('burst length too high for this burst rate');
      if (max && !avg) throw generic('bps_max/iops_max require corresponding bps/iops values');
      if (max && max < avg) throw generic('bps_max/iops_max cannot be lower than bps/iops');
    }
  }
}

const limitsProp: QomProp = {
  name: 'limits',
  type: 'ThrottleLimits',
  schema: ThrottleLimits,
  get: (o) => ({ ...limitsOf(o) }),
  set: (o, v) => {
    const next = { ...limitsOf(o), ...(v as Limits) };
    checkLimits(next);
    o.values.set('limits', next);
  },
};

/** The x-<limit> properties: settable only while the group is being created. */
function throttleXProp(limit: string): QomProp {
  return {
    name: `x-${limit}`,
    type: 'int',
    schema: t.int,
    get: (o) => limitsOf(o)[limit],
    set: (o, v) => {
      if (o.complete) throw generic('Property cannot be set after initialization');
      limitsOf(o)[limit] = v as number;
    },
  };
}

/** throttle-group's properties in qom-list's order. */
const THROTTLE_PROP_ORDER = [
  'bps-write-max-length',
  'iops-total-max-length',
  'iops-size',
  'limits',
  'bps-total',
  'iops-read-max-length',
  'bps-write',
  'iops-write-max-length',
  'bps-read-max',
  'iops-read-max',
  'bps-total-max',
  'bps-read-max-length',
  'iops-read',
  'bps-read',
  'bps-write-max',
  'iops-total-max',
  'iops-total',
  'iops-write',
  'bps-total-max-length',
  'iops-write-max',
];

/**
 * The classes blockrepd has, in the order qemu-storage-daemon 7.2's qom-list-types lists them
 * (its type table's order: a subset keeps its relative order).
 */
function qomTypes(objects: QomObjects): QomType[] {
  return [
    {
      name: 'secret_common',
      parent: 'object',
      abstract: true,
      interfaces: ['user-creatable'],
      props: [
        strProp('iv'),
        strProp('keyid'),
        loadedProp((o) => secretBytes.has(o)),
        enumProp('format', 'QCryptoSecretFormat', SECRET_FORMATS, 'raw'),
      ],
    },
    { name: 'container', parent: 'object', props: [] },
    { name: 'interface', abstract: true, props: [] },
    {
      name: 'iothread',
      parent: 'event-loop-base',
      props: [loopProp('poll-max-ns', 32768), loopProp('poll-grow', 0), loopProp('poll-shrink', 0)],
    },
    {
      name: 'secret',
      parent: 'secret_common',
      props: [strProp('file'), strProp('data')],
      complete: (o) => loadSecret(objects, o),
    },
    {
      name: 'tls-creds',
      parent: 'object',
      abstract: true,
      props: [
        enumProp('endpoint', 'QCryptoTLSCredsEndpoint', ['client', 'server'], 'client'),
        strProp('dir'),
        boolProp('verify-peer', true),
        strProp('priority'),
      ],
    },
    {
      name: 'event-loop-base',
      parent: 'object',
      abstract: true,
      interfaces: ['user-creatable'],
      props: [loopProp('thread-pool-min', 0), loopProp('aio-max-batch', 0), loopProp('thread-pool-max', 64)],
    },
    { name: 'user-creatable', parent: 'interface', abstract: true, props: [] },
    {
      name: 'object',
      abstract: true,
      props: [{ name: 'type', type: 'string', schema: t.str, get: (o) => o.type.name }],
    },
    {
      name: 'tls-creds-x509',
      parent: 'tls-creds',
      interfaces: ['user-creatable'],
      props: [boolProp('sanity-check', true), strProp('passwordid'), loadedProp((o) => o.complete)],
      complete: (o) => loadTlsCreds(objects, o),
      // An NBD server started with these credentials keeps them, as QEMU's holds a reference.
      unparent: (o) => unregisterTlsCreds(o.id),
    },
    {
      name: 'throttle-group',
      parent: 'object',
      interfaces: ['user-creatable'],
      props: THROTTLE_PROP_ORDER.map((n) => (n === 'limits' ? limitsProp : throttleXProp(n))),
      complete: (o) => checkLimits(limitsOf(o)),
    },
  ];
}

/** QEMU 7.2's ObjectType: what object-add's schema accepts (blockrepd creates the four above). */
const OBJECT_TYPES = [
  'authz-list',
  'authz-listfile',
  'authz-pam',
  'authz-simple',
  'can-bus',
  'can-host-socketcan',
  'colo-compare',
  'cryptodev-backend',
  'cryptodev-backend-builtin',
  'cryptodev-backend-lkcf',
  'cryptodev-vhost-user',
  'dbus-vmstate',
  'filter-buffer',
  'filter-dump',
  'filter-mirror',
  'filter-redirector',
  'filter-replay',
  'filter-rewriter',
  'input-barrier',
  'input-linux',
  'iothread',
  'main-loop',
  'memory-backend-epc',
  'memory-backend-file',
  'memory-backend-memfd',
  'memory-backend-ram',
  'pef-guest',
  'pr-manager-helper',
  'qtest',
  'rng-builtin',
  'rng-egd',
  'rng-random',
  'secret',
  'secret_keyring',
  'sev-guest',
  'thread-context',
  's390-pv-guest',
  'throttle-group',
  'tls-creds-anon',
  'tls-creds-psk',
  'tls-creds-x509',
  'tls-cipher-suites',
  'x-remote-object',
  'x-vfio-user-server',
];

/** ObjectOptions' variants for the types blockrepd creates, members in QAPI order. */
const OBJECT_VARIANTS: Record<string, QMembers> = {
  iothread: {
    'aio-max-batch': opt(t.int, 'Maximum number of requests in a batch (accepted, not used)'),
    'thread-pool-min': opt(t.int, 'Minimum number of threads of the pool (accepted, not used)'),
    'thread-pool-max': opt(t.int, 'Maximum number of threads of the pool (accepted, not used)'),
    'poll-max-ns': opt(t.int, 'Maximum busy-wait time, ns (default 32768; accepted, not used)'),
    'poll-grow': opt(t.int, 'Polling time multiplier (accepted, not used)'),
    'poll-shrink': opt(t.int, 'Polling time divisor (accepted, not used)'),
  },
  secret: {
    loaded: opt(t.bool, 'Deprecated; refused as not writable'),
    format: opt(t.enum('QCryptoSecretFormat', SECRET_FORMATS), 'Encoding of data/file (default raw)'),
    keyid: opt(t.str, 'Id of a 32-byte secret that decrypts the data (AES-256-CBC)'),
    iv: opt(t.str, 'Base64 16-byte initialisation vector for keyid'),
    data: opt(t.str, 'The secret itself'),
    file: opt(t.str, 'A file holding the secret'),
  },
  'throttle-group': {
    limits: opt(ThrottleLimits, 'I/O limits (kept, not enforced by blockrepd)'),
    ...Object.fromEntries([...LIMIT_NAMES, 'iops-size'].map((n) => [`x-${n}`, opt(t.int, `limits.${n}`)])),
  },
  'tls-creds-x509': {
    'verify-peer': opt(t.bool, 'Server: require a client certificate (default true)'),
    dir: opt(t.str, 'Directory with ca-cert.pem and <endpoint>-cert.pem / -key.pem'),
    endpoint: opt(t.enum('QCryptoTLSCredsEndpoint', ['client', 'server']), 'Default client'),
    priority: opt(t.str, 'GnuTLS priority string (kept, not used)'),
    loaded: opt(t.bool, 'Deprecated; refused as not writable'),
    'sanity-check': opt(t.bool, 'Check the certificates on load (default true)'),
    passwordid: opt(t.str, 'Id of the secret that decrypts the key (must exist)'),
  },
};

const ObjectOptions = t.union(
  'ObjectOptions',
  {
    'qom-type': req(t.enum('ObjectType', OBJECT_TYPES), 'The class of the new object'),
    id: req(t.str, 'Its name under /objects'),
  },
  'qom-type',
  () => OBJECT_VARIANTS,
);

const ObjectPropertyInfo = t.object('ObjectPropertyInfo', {
  name: req(t.str, 'Property name'),
  type: req(t.str, "Its type; 'child<T>' for a child object"),
  description: opt(t.str, 'What it is'),
  'default-value': opt(t.any, 'Its default'),
});

const ObjectTypeInfo = t.object('ObjectTypeInfo', {
  name: req(t.str, 'Type name'),
  abstract: opt(t.bool, 'Present (true) for types that cannot be instantiated'),
  parent: opt(t.str, 'Name of the parent type'),
});

/** QEMU's identifier rule for ids: a letter, then letters, digits, '-', '.', '_'. */
const ID_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

/** The QOM tree of one daemon: `/`, `/chardevs`, and `/objects` once an object was added. */
export class QomObjects {
  readonly types = new Map<string, QomType>();
  readonly root: QomObject;

  constructor() {
    for (const ty of qomTypes(this)) this.types.set(ty.name, ty);
    const container = this.types.get('container')!;
    this.root = new QomObject(container, '');
    // qemu-storage-daemon's monitors are chardevs, so it always has this container.
    this.root.addChild('chardevs', new QomObject(container, 'chardevs'));
  }

  /** Whether type `name` is `what`, derives from it, or implements it as an interface. */
  isA(name: string, what: string): boolean {
    for (let ty = this.types.get(name); ty; ty = ty.parent ? this.types.get(ty.parent) : undefined) {
      if (ty.name === what) return true;
      if (ty.interfaces?.some((i) => this.isA(i, what))) return true;
    }
    return false;
  }

  /** Whether type `name` is `what` or derives from it (interfaces aside). */
  private derives(name: string, what: string): boolean {
    for (let ty = this.types.get(name); ty; ty = ty.parent ? this.types.get(ty.parent) : undefined)
      if (ty.name === what) return true;
    return false;
  }

  /** A class's properties as qom-list shows them: the root class's first, children last. */
  private classProps(name: string): QomProp[] {
    const ty = this.types.get(name)!;
    return [...(ty.parent ? this.classProps(ty.parent) : []), ...ty.props];
  }

  private prop(o: QomObject, name: string): QomProp {
    const p = this.classProps(o.type.name).find((x) => x.name === name);
    if (!p) throw generic(`Property '${o.type.name}.${name}' not found`);
    return p;
  }

  private setProp(o: QomObject, name: string, v: unknown): void {
    const p = this.prop(o, name);
    if (!p.set) throw generic(`Property '${o.type.name}.${name}' is not writable`);
    validateValue(p.schema, v, name);
    p.set(o, v);
  }

  /** object-add and --object: QAPI-checked options (key=value strings converted first). */
  add(options: Record<string, unknown>): void {
    validateArgs(ObjectOptions, options);
    const { 'qom-type': type, id, ...props } = options as { 'qom-type': string; id: string };
    if (!ID_RE.test(id)) throw generic("Parameter 'id' expects an identifier");
    const ty = this.types.get(type);
    if (!ty || !OBJECT_VARIANTS[type]) throw generic(`invalid object type: ${type}`);
    const o = new QomObject(ty, id);
    // QEMU sets them from a QDict, so in its hash order.
    for (const k of qdictOrder(Object.keys(props))) this.setProp(o, k, (props as Record<string, unknown>)[k]);
    if (!this.root.children.has('objects'))
      this.root.addChild('objects', new QomObject(this.types.get('container')!, 'objects'));
    const objects = this.root.children.get('objects')!;
    objects.addChild(id, o);
    try {
      for (let t2: QomType | undefined = ty; t2; t2 = t2.parent ? this.types.get(t2.parent) : undefined)
        t2.complete?.(o);
    } catch (e) {
      objects.removeChild(id);
      throw e;
    }
    o.complete = true;
  }

  /** object-del. */
  del(id: string): void {
    const objects = this.root.children.get('objects');
    const o = objects?.children.get(id);
    if (!o) throw generic(`object '${id}' not found`);
    o.type.unparent?.(o);
    objects!.removeChild(id);
  }

  /** QEMU's path resolution: absolute from `/`, or a partial path that must match one object. */
  resolve(path: string): QomObject {
    const notFound = () => new QmpError('DeviceNotFound', `Device '${path}' not found`);
    const parts = path.split('/').filter((p) => p);
    const walk = (from: QomObject, names: string[]) =>
      names.reduce<QomObject | undefined>((o, n) => o?.children.get(n), from);
    if (path.startsWith('/')) {
      const o = walk(this.root, parts);
      if (!o) throw notFound();
      return o;
    }
    const found = new Set<QomObject>();
    const visit = (o: QomObject) => {
      const hit = walk(o, parts);
      if (hit) found.add(hit);
      for (const c of o.children.values()) visit(c);
    };
    visit(this.root);
    if (found.size > 1) throw generic(`Path '${path}' is ambiguous`);
    const [only] = found;
    if (!only) throw notFound();
    return only;
  }

  /** qom-list: QEMU builds the list by prepending, so it reads in reverse of its table order. */
  list(o: QomObject): { name: string; type: string }[] {
    return [
      ...this.classProps(o.type.name).map((p) => ({ name: p.name, type: p.type })),
      ...o.childOrder
        .list()
        .reverse()
        .map((n) => ({ name: n, type: `child<${o.children.get(n)!.type.name}>` })),
    ];
  }

  get(o: QomObject, name: string): unknown {
    const child = o.children.get(name);
    if (child) return this.pathOf(child);
    return this.prop(o, name).get(o);
  }

  set(o: QomObject, name: string, v: unknown): void {
    if (o.children.has(name)) throw generic(`Property '${o.type.name}.${name}' is not writable`);
    this.setProp(o, name, v);
  }

  private pathOf(o: QomObject): string {
    const up = (from: QomObject, prefix: string): string | undefined => {
      for (const [n, c] of from.children) {
        if (c === o) return `${prefix}/${n}`;
        const deeper = up(c, `${prefix}/${n}`);
        if (deeper) return deeper;
      }
      return undefined;
    };
    return up(this.root, '') ?? '/';
  }

  /** qom-list-types. */
  listTypes(implementsType?: string, abstract = false): Record<string, unknown>[] {
    return [...this.types.values()]
      .filter((ty) => (abstract || !ty.abstract) && (!implementsType || this.isA(ty.name, implementsType)))
      .map((ty) => ({
        name: ty.name,
        ...(ty.abstract ? { abstract: true } : {}),
        ...(ty.parent ? { parent: ty.parent } : {}),
      }));
  }

  /** qom-list-properties. */
  listProperties(typename: string): { name: string; type: string }[] {
    const ty = this.types.get(typename);
    if (!ty) throw new QmpError('DeviceNotFound', `Class '${typename}' not found`);
    if (this.derives(typename, 'interface')) throw generic("Parameter 'typename' expects a QOM type");
    return this.classProps(typename).map((p) => ({ name: p.name, type: p.type }));
  }
}

/** --object's key=value form: strings become the types object-add's schema asks for. */
export function objectOptionsFromKeyval(o: Record<string, unknown>): Record<string, unknown> {
  const convert = (type: QType, v: unknown, path: string): unknown => {
    if (type.kind === 'object' && v && typeof v === 'object' && !Array.isArray(v)) {
      return Object.fromEntries(
        Object.entries(v).map(([k, x]) => [k, type.members[k] ? convert(type.members[k].type, x, k) : x]),
      );
    }
    if (typeof v !== 'string') return v;
    if (type.kind === 'int') {
      if (!/^-?\d+$/.test(v)) throw generic(`Parameter '${path}' expects integer`);
      return Number(v);
    }
    if (type.kind === 'bool') {
      if (['on', 'yes', 'true', 'y'].includes(v)) return true;
      if (['off', 'no', 'false', 'n'].includes(v)) return false;
      throw generic(`Parameter '${path}' expects 'on' or 'off'`);
    }
    return v;
  };
  const variant = OBJECT_VARIANTS[o['qom-type'] as string] ?? {};
  return convert(t.object('ObjectOptions', variant), o, '') as Record<string, unknown>;
}

/** object-add, object-del and the qom-* commands over one daemon's QOM tree. */
export function registerQomCommands(r: CommandRegistry, objects = new QomObjects()): QomObjects {
  r.registerCommand({
    name: 'object-add',
    args: ObjectOptions,
    doc:
      'Creates a QOM object under /objects: secret, tls-creds-x509 (usable as tls-creds=ID), ' +
      'iothread (accepted; blockrepd is single-threaded) or throttle-group (limits kept, not enforced).',
    examples: [
      { args: { 'qom-type': 'secret', id: 'sec0', data: 'letmein' } },
      {
        title: 'TLS credentials for nbd-server-start',
        args: { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: '/etc/pki/blockrep', endpoint: 'server' },
      },
    ],
    handler: (a: Record<string, unknown>) => objects.add(a),
  });
  r.registerCommand({
    name: 'object-del',
    args: t.object('q_obj_object-del-arg', { id: req(t.str, 'The object to remove') }),
    doc: 'Removes an object from /objects (an NBD server keeps TLS credentials it already uses).',
    examples: [{ args: { id: 'sec0' } }],
    handler: (a: { id: string }) => objects.del(a.id),
  });
  r.registerCommand({
    name: 'qom-list',
    args: t.object('q_obj_qom-list-arg', { path: req(t.str, 'Absolute or partial QOM path') }),
    returns: t.array(ObjectPropertyInfo),
    doc: 'Lists the properties (and child objects) of an object of the QOM tree.',
    examples: [
      {
        args: { path: '/objects/sec0' },
        returns: [
          { name: 'type', type: 'string' },
          { name: 'iv', type: 'string' },
          { name: 'keyid', type: 'string' },
          { name: 'loaded', type: 'bool' },
          { name: 'format', type: 'QCryptoSecretFormat' },
          { name: 'file', type: 'string' },
          { name: 'data', type: 'string' },
        ],
      },
    ],
    handler: (a: { path: string }) => objects.list(objects.resolve(a.path)),
  });
  r.registerCommand({
    name: 'qom-get',
    args: t.object('q_obj_qom-get-arg', {
      path: req(t.str, 'Absolute or partial QOM path'),
      property: req(t.str, 'The property to read'),
    }),
    returns: t.any,
    doc: "Reads a property of an object; a child's value is its path.",
    examples: [{ args: { path: '/objects/sec0', property: 'format' }, returns: 'raw' }],
    handler: (a: { path: string; property: string }) => objects.get(objects.resolve(a.path), a.property),
  });
  r.registerCommand({
    name: 'qom-set',
    args: t.object('q_obj_qom-set-arg', {
      path: req(t.str, 'Absolute or partial QOM path'),
      property: req(t.str, 'The property to write'),
      value: req(t.any, 'Its new value'),
    }),
    doc: 'Writes a property of an object (the value is stored; a loaded secret or TLS credentials keep what they loaded).',
    examples: [
      { args: { path: '/objects/throttle0', property: 'limits', value: { 'bps-total': 104857600 } } },
    ],
    handler: (a: { path: string; property: string; value: unknown }) =>
      objects.set(objects.resolve(a.path), a.property, a.value),
  });
  r.registerCommand({
    name: 'qom-list-types',
    args: t.object('q_obj_qom-list-types-arg', {
      implements: opt(t.str, 'Only types that are or implement this type'),
      abstract: opt(t.bool, 'Include abstract types (default false)'),
    }),
    returns: t.array(ObjectTypeInfo),
    doc: "Lists blockrepd's QOM types (a subset of qemu-storage-daemon's, in its order).",
    examples: [
      { args: { implements: 'tls-creds' }, returns: [{ name: 'tls-creds-x509', parent: 'tls-creds' }] },
    ],
    handler: (a: { implements?: string; abstract?: boolean }) => objects.listTypes(a.implements, a.abstract),
  });
  r.registerCommand({
    name: 'qom-list-properties',
    args: t.object('q_obj_qom-list-properties-arg', { typename: req(t.str, 'A QOM type name') }),
    returns: t.array(ObjectPropertyInfo),
    doc: 'Lists the properties of a QOM type.',
    examples: [
      {
        args: { typename: 'iothread' },
        returns: [
          { name: 'type', type: 'string' },
          { name: 'thread-pool-min', type: 'int' },
          { name: 'aio-max-batch', type: 'int' },
          { name: 'thread-pool-max', type: 'int' },
          { name: 'poll-max-ns', type: 'int' },
          { name: 'poll-grow', type: 'int' },
          { name: 'poll-shrink', type: 'int' },
        ],
      },
    ],
    handler: (a: { typename: string }) => objects.listProperties(a.typename),
  });
  return objects;
}
