import { rmSync } from 'node:fs';
import type { QmpClient } from '@blockrep/qmp';
import { coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from '@blockrep/replication';
import type { BenchRow } from './types';
import { fioWarmUp, makeTempDirPlain, medianOfSides, type QmpProcess, runPeer, startQmpDaemon } from './util';

/*
 * COLO block replication, blockrepd beside QEMU's own: the same headless pair on each side (the
 * secondary's disk exported over NBD, its replication node over active and hidden images, started
 * with xen-set-replication; the primary's quorum over its disk and the replication child, started
 * likewise), QEMU's side in qemu-system-x86_64 -M none (qemu-storage-daemon has the replication
 * driver but no command that starts it). fio's nbd engine writes through the primary's guest
 * export: 1 MiB sequential at depth 8 and 4 KiB random at depth 16, the median of three runs with
 * the order alternated, each side also with replication off (a primary without the replication
 * child), after eight uncounted seconds of each workload on every primary (`fioWarmUp`,
 * `WARM_UP_MS`). Then the secondary's checkpoint after 1 MiB and 256 MiB were dirtied on each side
 * (ours rewrites the emptied images' tables and leaves the freed clusters at the file's end until
 * close; QEMU truncates the file at once, which is most of its time for 256 MiB), and our failover
 * (active commit) of 256 MiB (QEMU's runs as an internal job, not timed from outside).
 */

type Kind = 'blockrepd' | 'qemu-system';

const SIZE = 1 << 30;
const RUNTIME = 3;
/** The range fio writes through the primary's guest export. */
const FIO_SIZE = '512M';

/**
 * Uncounted fio time per workload on every primary before the measured runs. A pair is two
 * daemons whose hot paths run once per request, so V8 takes its time to optimise them: after one
 * second, measured, Turbofan was 13% of our primary's CPU samples in the first counted run, 4% in
 * the second and none from the fourth, and our primary spent 556-632 ms of user CPU per GiB in
 * the first run against 213-240 in the fourth and later; after eight seconds, 295 in the first.
 * QEMU's figures do not move with it.
 */
const WARM_UP_MS = 8000;

/** The primary's workloads, each measured (and warmed up) with replication on and off. */
const WORKLOADS = [
  { name: 'colo primary 1M seq write qd8', rw: 'write', bs: '1M', depth: 8, unit: 'MiB/s' },
  { name: 'colo primary 4k rand write qd16', rw: 'randwrite', bs: '4k', depth: 16, unit: 'IOPS' },
] as const;

async function fio(uri: string, rw: string, bs: string, depth: number): Promise<number> {
  const r = await runPeer('fio', [
    '--name=repl',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${depth}`,
    `--size=${FIO_SIZE}`,
    `--runtime=${RUNTIME}`,
    '--ramp_time=1',
    '--time_based',
    '--output-format=json',
  ]);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  return bs === '4k' ? job.write.iops : job.write.bw / 1024;
}

async function qcow2(dir: string, name: string) {
  await runPeer('qemu-img', ['create', '-f', 'qcow2', `${dir}/${name}.qcow2`, String(SIZE)]);
}

/**
 * blockrepd or qemu-storage-daemon (`tag` names its files) with a new qcow2 image added as node
 * `disk` and an NBD server on a Unix socket.
 */
async function daemonWithDisk(kind: Kind, dir: string, tag: string, disk: string) {
  await qcow2(dir, `${tag}-disk`);
  const nbd = `${dir}/${tag}-nbd.sock`;
  const d = await startQmpDaemon(kind, `${dir}/${tag}-qmp.sock`);
  const q = d.qmp;
  await q.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': disk,
    file: { driver: 'file', filename: `${dir}/${tag}-disk.qcow2` },
  });
  await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  return { d, q, nbd };
}

/** A writable NBD export of a node. */
function exportNode(q: QmpClient, id: string, node: string, name = node) {
  return q.execute('block-export-add', { type: 'nbd', id, 'node-name': node, name, writable: true });
}

/** The secondary disk, exported, and beside it a new image for the hidden disk. */
async function secondaryDisk(kind: Kind, dir: string, tag: string) {
  const s = await daemonWithDisk(kind, dir, tag, 'sec-disk');
  await exportNode(s.q, 'e-sec', 'sec-disk');
  await qcow2(dir, `${tag}-hidden`);
  return { ...s, hiddenFile: `${dir}/${tag}-hidden.qcow2` };
}

/** The primary's guest disk: a quorum over its local disk and `more` nodes, exported as "guest". */
async function guestDisk(
  kind: Kind,
  dir: string,
  tag: string,
  more: { 'node-name': string; [k: string]: unknown }[],
) {
  const p = await daemonWithDisk(kind, dir, tag, 'disk');
  for (const n of more) await p.q.execute('blockdev-add', n);
  // The COLO quorum, with the QEMU anchor's nbd child among its children from the start.
  const quorum = coloQuorumOptions({ nodeName: 'colo', localDisk: 'disk' });
  await p.q.execute('blockdev-add', { ...quorum, children: ['disk', ...more.map((n) => n['node-name'])] });
  await exportNode(p.q, 'g', 'colo', 'guest');
  return { ...p, uri: `nbd+unix:///guest?socket=${p.nbd}` };
}

async function secondary(kind: Kind, dir: string, tag: string): Promise<{ d: QmpProcess; nbd: string }> {
  const { d, q, nbd, hiddenFile } = await secondaryDisk(kind, dir, tag);
  await qcow2(dir, `${tag}-active`);
  await q.execute(
    'blockdev-add',
    coloSecondaryOptions({
      nodeName: 'sec-repl',
      activeFile: `${dir}/${tag}-active.qcow2`,
      hiddenFile,
      secondaryDisk: 'sec-disk',
    }),
  );
  await exportNode(q, 'e-view', 'sec-repl', 'sec-view');
  await q.execute('xen-set-replication', { enable: true, primary: false });
  return { d, nbd };
}

async function primary(
  kind: Kind,
  dir: string,
  tag: string,
  secNbd: string | null,
): Promise<{ d: QmpProcess; uri: string }> {
  const { d, q, uri } = await guestDisk(kind, dir, tag, []);
  if (secNbd) {
    await q.execute(
      'blockdev-add',
      coloPrimaryChildOptions({
        nodeName: 'pri-repl',
        server: { type: 'unix', path: secNbd },
        exportName: 'sec-disk',
      }),
    );
    await q.execute('x-blockdev-change', { parent: 'colo', node: 'pri-repl' });
    await q.execute('xen-set-replication', { enable: true, primary: true });
  }
  return { d, uri };
}

const seconds = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e9;

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return seconds(t0);
}

async function waitDone(q: QmpClient) {
  for (;;) {
    const [s] = await q.execute<{ stage: string }[]>('query-replication');
    if (s!.stage !== 'failover') return s!.stage;
    await new Promise((r) => setTimeout(r, 5));
  }
}

export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const procs: QmpProcess[] = [];
  const fmt = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(2));
  try {
    const sides = {} as Record<Kind, { d: QmpProcess; nbd: string }>;
    /** The guest export of each primary: ours and QEMU's, with replication on and off. */
    const uri = {} as Record<'ours-on' | 'ours-off' | 'qemu-on' | 'qemu-off', string>;
    for (const [kind, t] of [
      ['blockrepd', 'b'],
      ['qemu-system', 'q'],
    ] as const) {
      const sec = await secondary(kind, dir, `${t}-sec`);
      procs.push(sec.d);
      const pri = await primary(kind, dir, `${t}-pri`, sec.nbd);
      procs.push(pri.d);
      const solo = await primary(kind, dir, `${t}-solo`, null);
      procs.push(solo.d);
      sides[kind] = sec;
      const side = kind === 'blockrepd' ? 'ours' : 'qemu';
      uri[`${side}-on`] = pri.uri;
      uri[`${side}-off`] = solo.uri;
    }
    const rows: BenchRow[] = [];
    for (const u of Object.values(uri)) await fioWarmUp(u, WORKLOADS, FIO_SIZE, WARM_UP_MS);
    for (const { name, rw, bs, depth, unit } of WORKLOADS) {
      const m = await medianOfSides(['ours-on', 'qemu-on', 'ours-off', 'qemu-off'] as const, (s) =>
        fio(uri[s], rw, bs, depth),
      );
      rows.push({
        name,
        ours: m['ours-on'],
        qemu: m['qemu-on'],
        unit,
        notes: `on/off: ours ${fmt(m['ours-on'])}/${fmt(m['ours-off'])} = ${(m['ours-on'] / m['ours-off']).toFixed(2)}, QEMU ${fmt(m['qemu-on'])}/${fmt(m['qemu-off'])} = ${(m['qemu-on'] / m['qemu-off']).toFixed(2)}`,
      });
    }
    // Checkpoints after 1 MiB and 256 MiB of primary writes (copied to hidden) and VM writes (active).
    const checkpoint = async (kind: Kind, mib: number) => {
      const sec = sides[kind];
      const uri = (n: string) => `nbd+unix:///${n}?socket=${sec.nbd}`;
      await sec.d.qmp.execute('xen-colo-do-checkpoint');
      await runPeer('qemu-io', ['-f', 'raw', '-c', `write -P 0x42 0 ${mib / 2}M`, uri('sec-disk')]);
      await runPeer('qemu-io', ['-f', 'raw', '-c', `write -P 0x43 512M ${mib / 2}M`, uri('sec-view')]);
      return (await timed(() => sec.d.qmp.execute('xen-colo-do-checkpoint'))) * 1000;
    };
    for (const mib of [1, 256]) {
      const m = await medianOfSides(['blockrepd', 'qemu-system'] as const, (k) => checkpoint(k, mib));
      rows.push({
        name: `colo checkpoint, ${mib} MiB dirtied`,
        ours: m.blockrepd,
        qemu: m['qemu-system'],
        unit: 'ms',
        lowerIsBetter: true,
      });
    }
    const sec = sides.blockrepd;
    await runPeer('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x44 0 256M',
      `nbd+unix:///sec-view?socket=${sec.nbd}`,
    ]);
    const t = await timed(async () => {
      await sec.d.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
      const stage = await waitDone(sec.d.qmp);
      if (stage !== 'done') throw new Error(`failover ended in ${stage}`);
    });
    rows.push({
      name: 'colo failover (active commit) 256 MiB',
      ours: t * 1000,
      qemu: Number.NaN,
      unit: 'ms',
    });
    return rows;
  } finally {
    for (const p of procs) await p.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
}
