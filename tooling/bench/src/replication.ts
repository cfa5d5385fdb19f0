import { rmSync } from 'node:fs';
import type { QmpClient } from '@blockrep/qmp';
import { coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from '@blockrep/replication';
import type { BenchRow } from './types';
import { makeTempDirPlain, type QmpProcess, runPeer, startQmpDaemon } from './util';

/*
 * COLO replication in blockrepd: the primary guest's write throughput and 4 KiB IOPS through
 * quorum + replication -> NBD -> secondary, beside qemu-storage-daemon running the same data path
 * (see qemuSecondary) and beside our primary with replication off; the secondary's checkpoint time after 1 MiB and after 256 MiB were dirtied; the
 * failover (active commit) time of 256 MiB. fio's nbd engine drives the guest export.
 */

const SIZE = 1 << 30;
const RUNTIME = 3;

async function fio(uri: string, rw: string, bs: string, depth: number): Promise<number> {
  const r = await runPeer('fio', [
    '--name=repl',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${depth}`,
    '--size=512M',
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
async function daemonWithDisk(kind: 'blockrepd' | 'qsd', dir: string, tag: string, disk: string) {
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
async function secondaryDisk(kind: 'blockrepd' | 'qsd', dir: string, tag: string) {
  const s = await daemonWithDisk(kind, dir, tag, 'sec-disk');
  await exportNode(s.q, 'e-sec', 'sec-disk');
  await qcow2(dir, `${tag}-hidden`);
  return { ...s, hiddenFile: `${dir}/${tag}-hidden.qcow2` };
}

/** The primary's guest disk: a quorum over its local disk and `more` nodes, exported as "guest". */
async function guestDisk(
  kind: 'blockrepd' | 'qsd',
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

async function secondary(dir: string): Promise<{ d: QmpProcess; nbd: string }> {
  const { d, q, nbd, hiddenFile } = await secondaryDisk('blockrepd', dir, 'sec');
  await qcow2(dir, 'active');
  await q.execute(
    'blockdev-add',
    coloSecondaryOptions({
      nodeName: 'sec-repl',
      activeFile: `${dir}/active.qcow2`,
      hiddenFile,
      secondaryDisk: 'sec-disk',
    }),
  );
  await exportNode(q, 'e-view', 'sec-repl', 'sec-view');
  await q.execute('xen-set-replication', { enable: true, primary: false });
  return { d, nbd };
}

async function primary(dir: string, secNbd: string | null): Promise<{ d: QmpProcess; uri: string }> {
  const { d, q, uri } = await guestDisk('blockrepd', dir, secNbd ? 'pri' : 'solo', []);
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

/*
 * QEMU's anchor for the same data path. qemu-storage-daemon has the replication driver but no
 * command that starts it (COLO starts it from the migration code), so the anchor is the path a
 * started pair runs, built from the parts it uses: the secondary exports its disk with a
 * sync=none backup job (the copy-before-write filter) into a hidden qcow2 backed by it, and the
 * primary's quorum writes to its local disk and, through the nbd driver, to that export.
 */
async function qemuSecondary(dir: string): Promise<{ d: QmpProcess; nbd: string }> {
  const { d, q, nbd, hiddenFile } = await secondaryDisk('qsd', dir, 'q-sec');
  await q.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'hidden',
    file: { driver: 'file', filename: hiddenFile },
    backing: 'sec-disk',
  });
  await q.execute('blockdev-backup', { 'job-id': 'cbw', device: 'sec-disk', target: 'hidden', sync: 'none' });
  return { d, nbd };
}

async function qemuPrimary(dir: string, secNbd: string): Promise<{ d: QmpProcess; uri: string }> {
  const sec = {
    driver: 'nbd',
    'node-name': 'sec',
    server: { type: 'unix', path: secNbd },
    export: 'sec-disk',
  };
  const { d, uri } = await guestDisk('qsd', dir, 'q-pri', [sec]);
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
  try {
    const sec = await secondary(dir);
    procs.push(sec.d);
    const pri = await primary(dir, sec.nbd);
    procs.push(pri.d);
    const solo = await primary(dir, null);
    procs.push(solo.d);
    const qSec = await qemuSecondary(dir);
    procs.push(qSec.d);
    const qPri = await qemuPrimary(dir, qSec.nbd);
    procs.push(qPri.d);
    const rows: BenchRow[] = [];
    for (const [name, bs, depth, unit] of [
      ['colo primary 1M seq write qd8', '1M', 8, 'MiB/s'],
      ['colo primary 4k rand write qd16', '4k', 16, 'IOPS'],
    ] as const) {
      const rw = bs === '4k' ? 'randwrite' : 'write';
      const on = await fio(pri.uri, rw, bs, depth);
      const qemu = await fio(qPri.uri, rw, bs, depth);
      const off = await fio(solo.uri, rw, bs, depth);
      rows.push({ name, ours: on, qemu, unit });
      rows.push({ name: `${name}, on/off`, ours: on, qemu: off, unit, anchor: 'replication off' });
    }
    await sec.d.qmp.execute('xen-colo-do-checkpoint');
    const secUri = (n: string) => `nbd+unix:///${n}?socket=${sec.nbd}`;
    // Checkpoints after 1 MiB and 256 MiB of primary writes (copied to hidden) and VM writes (active).
    for (const mib of [1, 256]) {
      await runPeer('qemu-io', ['-f', 'raw', '-c', `write -P 0x42 0 ${mib / 2}M`, secUri('sec-disk')]);
      await runPeer('qemu-io', ['-f', 'raw', '-c', `write -P 0x43 512M ${mib / 2}M`, secUri('sec-view')]);
      const t = await timed(() => sec.d.qmp.execute('xen-colo-do-checkpoint'));
      rows.push({
        name: `colo checkpoint, ${mib} MiB dirtied`,
        ours: t * 1000,
        qemu: Number.NaN,
        unit: 'ms',
      });
    }
    await runPeer('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 256M', secUri('sec-view')]);
    await pri.d.stop();
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
