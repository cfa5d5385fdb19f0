/**
 * Character devices over QMP, blockrepd beside qemu-storage-daemon 7.2: one script of
 * chardev-add/change/remove, ringbuf-read/write and the queries, with chardevs from the command
 * line (a ringbuf, and a ringbuf a monitor writes its greeting to), gives the same answers and
 * error texts on both.
 */
import { mkdirSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

type Step = [string, Record<string, unknown>?] | 'settle';

const add = (id: string, type: string, data: Record<string, unknown> = {}): Step => [
  'chardev-add',
  { id, backend: { type, data } },
];
const write = (device: string, data: string, format?: string): Step => [
  'ringbuf-write',
  { device, data, ...(format ? { format } : {}) },
];
const read = (device: string, size: number, format?: string): Step => [
  'ringbuf-read',
  { device, size, ...(format ? { format } : {}) },
];
const unix = (path: string) => ({ type: 'unix', data: { path } });

/** The script, with `dir` a directory of the daemon's own (both use the same names in it). */
function steps(dir: string): Step[] {
  return [
    ['query-chardev'],
    // The chardevs of the command line.
    add('r0', 'null'),
    add('qmp0', 'null'),
    write('r0', 'abcdefghijk'),
    read('r0', 100),
    read('r0', 100),
    // Backends and their options.
    add('n1', 'null'),
    add('n1', 'ringbuf'),
    add('r1', 'ringbuf', { size: 3 }),
    add('r1', 'ringbuf', { size: -4 }),
    add('r2', 'memory', { size: 4 }),
    add('r3', 'ringbuf'),
    add('x', 'bogus'),
    ['chardev-add', { id: 'x', backend: { type: 'null' } }],
    add('x', 'null', { foo: 1 }),
    add('x', 'vc'),
    add('f1', 'file', { out: `${dir}/out.txt` }),
    add('f2', 'file', { out: `${dir}/out.txt`, append: true, in: `${dir}/out.txt` }),
    add('f3', 'file', { out: '/nonexistent/x' }),
    add('f4', 'file', { out: `${dir}/out2.txt`, in: '/nonexistent/y' }),
    add('s1', 'socket', { addr: unix(`${dir}/s1.sock`) }),
    add('s2', 'socket', { addr: unix(`${dir}/s1.sock`), server: false }),
    add('s3', 'socket', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '0' } }, wait: false }),
    add('s4', 'socket', { addr: unix(`${dir}/none.sock`), server: false }),
    'settle',
    ['query-chardev'],
    ['chardev-remove', { id: 's1' }],
    'settle',
    ['query-chardev'],
    // ringbuf-write and -read: a ring of 4 bytes keeps the last 4; utf8 reads stop at a NUL
    // byte and show each bad sequence as one U+FFFD.
    write('r2', 'aéb'),
    read('r2', 2),
    read('r2', 2),
    write('r2', 'xyzé'),
    read('r2', 10, 'base64'),
    write('r2', 'a\u0000b'),
    read('r2', 10, 'base64'),
    write('r2', 'YQBi', 'base64'),
    read('r2', 10),
    ...[
      '/w==',
      'gICA/w==',
      'wIA=',
      '7aCA',
      '4oI=',
      '4oJB',
      'wYE=',
      '4ICA',
      '9JCAgA==',
      '77+/',
      '/kE=',
      '8J+Y',
      '8J+YgA==',
    ].flatMap((b): Step[] => [write('r3', b, 'base64'), read('r3', 100)]),
    write('r3', '\u{1f600}'),
    read('r3', 100, 'base64'),
    // QEMU's base64 decoding, quirks included.
    ...['YW', 'YWJjZA', '=YWJj', 'YW=j', 'YQ==YQ==', 'Y===', 'YQ\n==', '!!!', ' YQ==', 'a-b_', ''].flatMap(
      (b): Step[] => [write('r3', b, 'base64'), read('r3', 100, 'base64')],
    ),
    // Errors of the ringbuf commands, in QEMU's order of checks.
    write('n1', 'x'),
    read('n1', 0),
    write('zz', 'x'),
    read('zz', -1),
    read('r0', 0),
    read('r0', -1),
    read('r0', 1, 'bogus'),
    // remove, send-break, change.
    ['chardev-remove', { id: 'qmp0' }],
    ['chardev-remove', { id: 'm0' }],
    ['chardev-remove', { id: 'zz' }],
    ['chardev-remove', { id: 'n1' }],
    ['chardev-remove', { id: 'n1' }],
    ['chardev-send-break', { id: 'r0' }],
    ['chardev-send-break', { id: 'qmp0' }],
    ['chardev-send-break', { id: 'zz' }],
    ['chardev-change', { id: 'zz', backend: { type: 'null', data: {} } }],
    ['chardev-change', { id: 'qmp0', backend: { type: 'null', data: {} } }],
    ['chardev-change', { id: 'm0', backend: { type: 'null', data: {} } }],
    ['chardev-change', { id: 'r3', backend: { type: 'null', data: {} } }],
    ['chardev-change', { id: 'r0', backend: { type: 'socket', data: { addr: unix(`${dir}/c.sock`) } } }],
    write('r3', 'x'),
    ['query-chardev'],
  ];
}

/**
 * Runs the script. What must differ is made equal: the daemon's directory (each has its own),
 * TCP ports (picked by the kernel), the version in the greeting of the monitor on ringbuf m0,
 * and the order of query-chardev (QEMU's is that of a hash table).
 */
async function script(qmp: QmpClient, dir: string): Promise<unknown[]> {
  const norm = (v: unknown): unknown =>
    v === undefined
      ? v
      : JSON.parse(
          JSON.stringify(v)
            .replaceAll(dir, '<dir>')
            .replace(/(\d+\.\d+\.\d+\.\d+):\d+/g, '$1:<port>'),
        );
  const out: unknown[] = [];
  // The monitor on m0 wrote its greeting there.
  const greeting = JSON.parse(await qmp.execute<string>('ringbuf-read', { device: 'm0', size: 4096 }));
  out.push({ greeting: Object.keys(greeting.QMP), capabilities: greeting.QMP.capabilities });
  for (const step of steps(dir)) {
    if (step === 'settle') {
      await sleep(200); // connections and hang-ups of the sockets land
      continue;
    }
    const [cmd, args] = step;
    try {
      let r = await qmp.execute(cmd, args);
      if (cmd === 'query-chardev')
        r = (r as { label: string }[]).sort((a, b) => a.label.localeCompare(b.label));
      out.push({ cmd, args: norm(args), ok: norm(r) });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, args: norm(args), err: norm(`${e.errorClass}: ${e.desc}`) });
    }
  }
  return out;
}

const CMDLINE = [
  '--chardev',
  'ringbuf,id=r0,size=8',
  '--chardev',
  'ringbuf,id=m0,size=1024',
  '--monitor',
  'chardev=m0',
];

describe.runIf(hasPeer('qemu-storage-daemon'))('chardevs over QMP, against qemu-storage-daemon', () => {
  it('same answers and errors for the same script', async () => {
    const tmp = makeTempDir();
    const q = tmp.file('q');
    const b = tmp.file('b');
    mkdirSync(q);
    mkdirSync(b);
    const qsd = await startQsd(`${q}/qmp.sock`, CMDLINE);
    const backends = await qsd.qmp.execute<{ name: string }[]>('query-chardev-backends');
    const theirs = await script(qsd.qmp, q);
    await qsd.stop();
    // The qmp0 chardev qemu-storage-daemon's monitor is on, beside blockrepd's own --qmp socket.
    const ours = await startDaemon(`${b}/ours.sock`, [
      '--chardev',
      `socket,id=qmp0,path=${b}/qmp.sock,server=on,wait=off`,
      '--monitor',
      'chardev=qmp0',
      ...CMDLINE,
    ]);
    // The script goes through qmp0, as on qemu-storage-daemon (where that connection shows).
    const qmp0 = await QmpClient.connect({ path: `${b}/qmp.sock` });
    const mine = await script(qmp0, b);
    // The backends blockrepd opens, in qemu-storage-daemon's order (README lists them).
    const supported = await ours.qmp.execute<{ name: string }[]>('query-chardev-backends');
    expect(supported).toEqual(backends.filter((x) => supported.some((s) => s.name === x.name)));
    expect(supported.map((s) => s.name).sort()).toEqual([
      'file',
      'memory',
      'null',
      'ringbuf',
      'socket',
      'stdio',
    ]);
    expect(await ours.stop()).toBe(0);
    expect(mine).toEqual(theirs);
  });

  it('keeps a chardev whose chardev-change failed (qemu-storage-daemon 7.2 loses it there)', async () => {
    const dir = makeTempDir();
    const ours = await startDaemon(dir.file('ours.sock'), ['--chardev', 'ringbuf,id=r0,size=8']);
    await ours.qmp.execute('ringbuf-write', { device: 'r0', data: 'kept' });
    await expect(
      ours.qmp.execute('chardev-change', { id: 'r0', backend: { type: 'ringbuf', data: { size: 3 } } }),
    ).rejects.toMatchObject({
      desc: "Failed to add chardev 'r0': size of ringbuf chardev must be power of two",
    });
    expect(await ours.qmp.execute('ringbuf-read', { device: 'r0', size: 8 })).toBe('kept');
    expect(await ours.stop()).toBe(0);
  });
});
