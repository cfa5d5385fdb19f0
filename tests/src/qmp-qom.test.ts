/**
 * QOM objects over QMP, blockrepd beside qemu-storage-daemon 7.2: object-add (and --object),
 * object-del, qom-list/get/set, qom-list-types and qom-list-properties give the same answers and
 * error texts for secret, iothread, throttle-group and tls-creds-x509 objects.
 */
import { writeFileSync } from 'node:fs';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeCerts, makeTempDir } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

/** "hello" under the 32-byte key below, AES-256-CBC with a zero IV, base64. */
const KEY = '0123456789abcdef0123456789abcdef';
const IV = 'AAAAAAAAAAAAAAAAAAAAAA==';
const HELLO_ENCRYPTED = 'pZwJZBLuy3mDACEQT4YTBw==';

/** The --object options both daemons start with (key=value, as a user writes them). */
const CLI_OBJECTS = [
  '--object',
  'secret,id=cli0,data=abc',
  '--object',
  'throttle-group,id=cg,limits.iops-total=5,limits.iops-total-max=10',
  '--object',
  'iothread,id=cio,poll-max-ns=10',
];

type Step = [string, Record<string, unknown>?];

function steps(dir: string, pki: string, nbdSock: string): Step[] {
  const obj = (p: string) => `/objects/${p}`;
  const get = (path: string, property: string): Step => ['qom-get', { path, property }];
  return [
    ['qom-list', { path: '/' }],
    ['qom-list', { path: '/objects' }],
    ['qom-list', { path: obj('cg') }],
    get(obj('cg'), 'limits'),
    get(obj('cio'), 'poll-max-ns'),
    get(obj('cli0'), 'data'),
    // secret: sources, formats, encryption, and each refusal
    ['object-add', { 'qom-type': 'secret', id: 's0' }],
    ['object-add', { 'qom-type': 'secret', id: 's0', data: 'x', file: `${dir}/key` }],
    ['object-add', { 'qom-type': 'secret', id: 's0', file: `${dir}/nonexistent` }],
    ['object-add', { 'qom-type': 'secret', id: 's0', data: '!!', format: 'base64' }],
    ['object-add', { 'qom-type': 'secret', id: 's0', data: 'x', loaded: true }],
    ['object-add', { 'qom-type': 'secret', id: 's0', data: 'aGVsbG8=', format: 'base64' }],
    ['object-add', { 'qom-type': 'secret', id: 's0', data: 'x' }],
    ['object-add', { 'qom-type': 'secret', id: 'k32', file: `${dir}/key` }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'nokey', iv: IV }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 's0', iv: IV }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'k32' }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'k32', iv: 'AAAA' }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'k32', iv: '!' }],
    ['object-add', { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'k32', iv: IV }],
    [
      'object-add',
      { 'qom-type': 'secret', id: 'e0', data: HELLO_ENCRYPTED, keyid: 'k32', iv: IV, format: 'base64' },
    ],
    [
      'object-add',
      {
        'qom-type': 'secret',
        id: 'e1',
        data: 'AAAAAAAAAAAAAAAAAAAAAA==',
        keyid: 'k32',
        iv: IV,
        format: 'base64',
      },
    ],
    ['qom-list', { path: obj('e0') }],
    get(obj('e0'), 'keyid'),
    get(obj('e0'), 'file'),
    get(obj('s0'), 'format'),
    get(obj('s0'), 'loaded'),
    get(obj('s0'), 'nope'),
    ['qom-set', { path: obj('s0'), property: 'data', value: 'y' }],
    get(obj('s0'), 'data'),
    ['qom-set', { path: obj('s0'), property: 'data', value: 1 }],
    ['qom-set', { path: obj('s0'), property: 'format', value: 'hex' }],
    ['qom-set', { path: obj('s0'), property: 'loaded', value: false }],
    ['qom-set', { path: obj('s0'), property: 'type', value: 'x' }],
    // ids and types
    ['object-add', { 'qom-type': 'secret', id: '1x', data: 'x' }],
    ['object-add', { 'qom-type': 'secret', id: 'a/b', data: 'x' }],
    ['object-add', { 'qom-type': 'secret', data: 'x' }],
    ['object-add', { id: 'x' }],
    ['object-add', { 'qom-type': 'nope', id: 'x' }],
    ['object-add', { 'qom-type': 'secret', id: 'x', data: 'x', bogus: 1 }],
    // iothread
    ['object-add', { 'qom-type': 'iothread', id: 'io0', 'poll-max-ns': -1 }],
    ['object-add', { 'qom-type': 'iothread', id: 'io0', 'thread-pool-min': 10, 'thread-pool-max': 5 }],
    ['object-add', { 'qom-type': 'iothread', id: 'io0', 'poll-grow': 2, 'aio-max-batch': 4 }],
    ['qom-list', { path: obj('io0') }],
    get(obj('io0'), 'poll-grow'),
    get(obj('io0'), 'thread-pool-max'),
    ['qom-set', { path: obj('io0'), property: 'poll-max-ns', value: 5 }],
    ['qom-set', { path: obj('io0'), property: 'poll-max-ns', value: '5' }],
    ['qom-set', { path: obj('io0'), property: 'thread-pool-min', value: 100 }],
    get(obj('io0'), 'poll-max-ns'),
    // throttle-group
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { 'iops-total': -1 } }],
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { 'iops-total': 1, 'iops-read': 1 } }],
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { 'iops-total-max': 10 } }],
    [
      'object-add',
      { 'qom-type': 'throttle-group', id: 't0', limits: { 'bps-read': 20, 'bps-read-max': 10 } },
    ],
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { 'iops-size': 512 } }],
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { 'bps-total-max-length': 5 } }],
    ['object-add', { 'qom-type': 'throttle-group', id: 't0', limits: { bogus: 5 } }],
    [
      'object-add',
      { 'qom-type': 'throttle-group', id: 't0', 'x-bps-total': 100, limits: { 'iops-read': 5 } },
    ],
    get(obj('t0'), 'limits'),
    get(obj('t0'), 'x-bps-total'),
    ['qom-set', { path: obj('t0'), property: 'x-bps-total', value: 1 }],
    ['qom-set', { path: obj('t0'), property: 'limits', value: { 'bps-read': 1 } }],
    ['qom-set', { path: obj('t0'), property: 'limits', value: { 'bps-total': 50, 'bps-total-max': 60 } }],
    ['qom-set', { path: obj('t0'), property: 'limits', value: 5 }],
    get(obj('t0'), 'limits'),
    // tls-creds-x509, and the NBD server that uses them
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0' }],
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir, endpoint: 'server' }],
    [
      'object-add',
      { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: pki, endpoint: 'server', passwordid: 'x' },
    ],
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: pki, endpoint: 'bogus' }],
    ['object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: pki, endpoint: 'server' }],
    [
      'object-add',
      { 'qom-type': 'tls-creds-x509', id: 'tlsc', dir: pki, 'verify-peer': false, priority: 'NORMAL' },
    ],
    ['qom-list', { path: obj('tls0') }],
    get(obj('tlsc'), 'endpoint'),
    get(obj('tlsc'), 'verify-peer'),
    get(obj('tlsc'), 'priority'),
    get(obj('tlsc'), 'sanity-check'),
    get(obj('tlsc'), 'loaded'),
    // Credentials of the wrong end, an object that is no credentials, and none at all.
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } }, 'tls-creds': 'tlsc' }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } }, 'tls-creds': 's0' }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } }, 'tls-creds': 'nope' }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } }, 'tls-creds': 'tls0' }],
    // QEMU lets credentials in use go: the server keeps its reference.
    ['object-del', { id: 'tls0' }],
    ['nbd-server-stop'],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } }, 'tls-creds': 'tls0' }],
    // the tree: enough objects that GLib's table grows, then some deleted
    ...['a1', 'b2', 'c3', 'd4', 'e5', 'f6', 'g7', 'h8', 'i9'].map(
      (id): Step => ['object-add', { 'qom-type': 'iothread', id }],
    ),
    ['object-del', { id: 'c3' }],
    ['object-del', { id: 'nope' }],
    ['object-del', { id: 's0' }],
    ['object-del', { id: 'f6' }],
    ['qom-list', { path: '/' }],
    ['qom-list', { path: '/objects' }],
    ['qom-list', { path: 'objects' }],
    ['qom-list', { path: 'e1' }],
    ['qom-list', { path: '/objects/' }],
    ['qom-list', { path: '/nope' }],
    ['qom-list', { path: '/objects/e1/x' }],
    ['qom-list', { path: '' }],
    get('/objects', 'e1'),
    get('/', 'objects'),
    get('/', 'type'),
    get('/nope', 'type'),
    ['qom-set', { path: '/objects', property: 'e1', value: 'x' }],
    // types
    ['qom-list-types', { implements: 'secret_common', abstract: true }],
    ['qom-list-types', { implements: 'tls-creds' }],
    ['qom-list-types', { implements: 'nope' }],
    ['qom-list-properties', { typename: 'secret' }],
    ['qom-list-properties', { typename: 'secret_common' }],
    ['qom-list-properties', { typename: 'iothread' }],
    ['qom-list-properties', { typename: 'throttle-group' }],
    ['qom-list-properties', { typename: 'tls-creds-x509' }],
    ['qom-list-properties', { typename: 'container' }],
    ['qom-list-properties', { typename: 'user-creatable' }],
    ['qom-list-properties', { typename: 'nope' }],
  ];
}

async function script(qmp: QmpClient, list: Step[]): Promise<unknown[]> {
  const out: unknown[] = [];
  for (const [cmd, args] of list) {
    try {
      out.push({ cmd, args, ok: await qmp.execute(cmd, args) });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, args, err: `${e.errorClass}: ${e.desc}` });
    }
  }
  return out;
}

/** What blockrepd does not model is left out of qemu-storage-daemon's answers. */
async function typesWeHave(qmp: QmpClient): Promise<Set<string>> {
  const all = (await qmp.execute('qom-list-types', { abstract: true })) as { name: string }[];
  return new Set(all.map((x) => x.name));
}

describe.runIf(hasPeer('qemu-storage-daemon'))('QOM objects over QMP, against qemu-storage-daemon', () => {
  it('same answers and errors for object-add/del, qom-list/get/set and the type queries', async () => {
    const dir = makeTempDir();
    const pki = dir.file('pki');
    makeCerts(pki);
    writeFileSync(dir.file('key'), KEY);
    const list = (sock: string) => steps(dir.path, pki, sock);

    const qsd = await startQsd(dir.file('qsd.sock'), CLI_OBJECTS);
    const theirs = await script(qsd.qmp, list(dir.file('qsd-nbd.sock')));
    await qsd.stop();
    const ours = await startDaemon(dir.file('ours.sock'), CLI_OBJECTS);
    const have = await typesWeHave(ours.qmp);
    const mine = await script(ours.qmp, list(dir.file('ours-nbd.sock')));
    expect(await ours.stop()).toBe(0);

    const normalise = (r: unknown) => {
      const x = r as { cmd: string; args?: Record<string, unknown>; ok?: unknown };
      // The NBD socket is each daemon's own.
      if (x.cmd === 'nbd-server-start') x.args = { ...x.args, addr: 'unix' };
      // blockrepd's types are a subset of qemu-storage-daemon's (chardevs, authz, ... are not QOM
      // objects here): its list is theirs without the types it lacks.
      if (x.cmd === 'qom-list-types' && Array.isArray(x.ok))
        x.ok = x.ok.filter((t: { name: string }) => have.has(t.name));
      // qemu-storage-daemon's monitor is a chardev under /chardevs; blockrepd's monitors are not.
      if (x.cmd === 'qom-list' && x.args?.path === '/chardevs') x.ok = 'chardevs';
      return x;
    };
    expect(mine.map(normalise)).toEqual(theirs.map(normalise));
  });

  it('--object refuses what object-add refuses, with the option named', async () => {
    const dir = makeTempDir();
    const bad = ['--object', 'secret,id=s,data=x,format=hex'];
    const qsd = await startQsd(dir.file('qsd.sock'), bad).catch((e: Error) => e);
    const ours = await startDaemon(dir.file('ours.sock'), bad).catch((e: Error) => e);
    expect(qsd).toBeInstanceOf(Error);
    expect(ours).toBeInstanceOf(Error);
    expect((ours as Error).message).toContain(
      "--object secret,id=s,data=x,format=hex: Parameter 'format' does not accept value 'hex'",
    );
    expect((qsd as Error).message).toContain("Parameter 'format' does not accept value 'hex'");
  });
});
