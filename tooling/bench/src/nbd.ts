import { spawn } from 'node:child_process';
import { copyFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { freePort, tcpAccepts, unixAccepts } from '@blockrep/test-kit';
import type { BenchRow } from './types';
import { BENCH_ENV, fioWarmUp, listening, makeTempDirPlain, medianOfSides, runPeer } from './util';

/*
 * fio's nbd engine (libnbd, one connection) against the shipped servers, each on its own copy of
 * the same image full of data: blockrepd, qemu-storage-daemon (QEMU's anchor) and, for raw,
 * nbdkit's file plugin (the C ceiling). 1 MiB sequential at depth 8 (MiB/s) and 4 KiB random at
 * depth 16 (IOPS), reads and writes, raw and qcow2.
 *
 * Fair by construction: every server runs under the same GLIBC_TUNABLES (QEMU 7.2 maps a fresh
 * buffer per large request; this VM's page faults would be measured otherwise); one column shows
 * qemu-storage-daemon with glibc's default allocator for reference. Unix sockets first (no
 * TCP_NODELAY question: QEMU 7.2 does not set it); TCP as a second column. Each figure is the
 * median of three runs, the order of the servers reversed every other round, `sync` before each,
 * after one uncounted second of each workload on every server (`fioWarmUp`).
 */

export const SIZE = '256M';
const RUNTIME_MS = 2500;
const RAMP_MS = 500;

interface Workload {
  name: string;
  rw: string;
  bs: string;
  depth: number;
  metric: 'bw' | 'iops';
}

const WORKLOADS: Workload[] = [
  { name: '1M seq write qd8', rw: 'write', bs: '1M', depth: 8, metric: 'bw' },
  { name: '1M seq read qd8', rw: 'read', bs: '1M', depth: 8, metric: 'bw' },
  { name: '4k rand write qd16', rw: 'randwrite', bs: '4k', depth: 16, metric: 'iops' },
  { name: '4k rand read qd16', rw: 'randread', bs: '4k', depth: 16, metric: 'iops' },
];

const BLOCKREPD = join(
  dirname(createRequire(import.meta.url).resolve('@blockrep/daemon/package.json')),
  'bin',
  'blockrepd.cjs',
);

async function fio(uri: string, w: Workload): Promise<number> {
  const r = await runPeer('fio', [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.depth}`,
    `--size=${SIZE}`,
    `--runtime=${RUNTIME_MS}ms`,
    `--ramp_time=${RAMP_MS}ms`,
    '--time_based',
    '--randrepeat=1',
    '--output-format=json',
  ]);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio failed on ${uri}: error ${job.error}`);
  const side = w.rw.includes('write') ? job.write : job.read;
  return w.metric === 'bw' ? side.bw / 1024 : side.iops;
}

export type Server = 'blockrepd' | 'qsd' | 'qsd-default-malloc' | 'nbdkit';

export interface Running {
  uri: string;
  /** The server's process id (its memory is read from /proc). */
  pid: number;
  stop(): Promise<void>;
}

/** A server of one kind on its own copy of the image, on a Unix socket or TCP. */
export async function start(
  kind: Server,
  format: string,
  image: string,
  dir: string,
  tcp: boolean,
): Promise<Running> {
  const file = join(dir, `${kind}${tcp ? '-tcp' : ''}.${format}`);
  copyFileSync(image, file);
  const sock = join(dir, `${kind}.sock`);
  const port = tcp ? await freePort() : 0;
  const addr = tcp
    ? `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`
    : `addr.type=unix,addr.path=${sock}`;
  const qsdArgs = [
    '--blockdev',
    `driver=file,filename=${file},node-name=file0`,
    '--blockdev',
    `driver=${format},file=file0,node-name=disk`,
    '--nbd-server',
    addr,
    '--export',
    'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
  ];
  const { GLIBC_TUNABLES: _, ...defaultEnv } = BENCH_ENV;
  const child =
    kind === 'blockrepd'
      ? spawn(process.execPath, [BLOCKREPD, ...qsdArgs, '--log-level', 'warn'], {
          stdio: 'ignore',
          env: BENCH_ENV,
        })
      : kind === 'nbdkit'
        ? spawn(
            'nbdkit',
            [
              '-f',
              ...(tcp ? ['-i', '127.0.0.1', '-p', String(port)] : ['-U', sock]),
              '-e',
              'disk',
              'file',
              file,
            ],
            {
              stdio: 'ignore',
              env: BENCH_ENV,
            },
          )
        : spawn('qemu-storage-daemon', qsdArgs, {
            stdio: 'ignore',
            env: kind === 'qsd' ? BENCH_ENV : defaultEnv,
          });
  await listening(child, tcp ? () => tcpAccepts(port) : () => unixAccepts(sock), kind);
  return {
    uri: tcp ? `nbd://127.0.0.1:${port}/disk` : `nbd+unix:///disk?socket=${sock}`,
    pid: child.pid!,
    stop: async () => {
      if (child.exitCode === null) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await gone;
      }
      rmSync(file, { force: true });
    },
  };
}

/** An image full of data: reads read data on every server, writes overwrite allocated clusters. */
export async function makeImage(dir: string, format: string): Promise<string> {
  const file = join(dir, `image.${format}`);
  await runPeer('qemu-img', ['create', '-q', '-f', format, file, SIZE]);
  await runPeer('qemu-io', ['-f', format, '-c', `write -P 0xa5 0 ${SIZE}`, file]);
  return file;
}

/** The figures of each server for each workload, servers started once and kept for all workloads. */
async function measure(servers: Server[], format: string, image: string, dir: string, tcp: boolean) {
  const running = new Map<Server, Running>();
  try {
    for (const s of servers) running.set(s, await start(s, format, image, dir, tcp));
    for (const s of servers) await fioWarmUp(running.get(s)!.uri, WORKLOADS, SIZE);
    const out = new Map<string, Record<Server, number>>();
    for (const w of WORKLOADS)
      out.set(w.name, await medianOfSides(servers, (s) => fio(running.get(s)!.uri, w)));
    return out;
  } finally {
    for (const r of running.values()) await r.stop();
  }
}

export async function run(): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  const dir = makeTempDirPlain();
  const fmt = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(2));
  try {
    for (const format of ['raw', 'qcow2']) {
      const image = await makeImage(dir, format);
      const unixSides: Server[] = ['blockrepd', 'qsd', 'qsd-default-malloc'];
      if (format === 'raw') unixSides.push('nbdkit');
      const unix = await measure(unixSides, format, image, dir, false);
      const tcp = await measure(['blockrepd', 'qsd'], format, image, dir, true);
      for (const w of WORKLOADS) {
        const u = unix.get(w.name)!;
        const t = tcp.get(w.name)!;
        const notes = [
          `tcp ${fmt(t.blockrepd)}/${fmt(t.qsd)} = ${(t.blockrepd / t.qsd).toFixed(2)}`,
          `qsd default malloc ${fmt(u['qsd-default-malloc'])}`,
          ...(format === 'raw'
            ? [`nbdkit ${fmt(u.nbdkit)} (ours/nbdkit ${(u.blockrepd / u.nbdkit).toFixed(2)})`]
            : []),
        ].join('; ');
        rows.push({
          name: `nbd ${format} ${w.name}`,
          ours: u.blockrepd,
          qemu: u.qsd,
          unit: w.metric === 'bw' ? 'MiB/s' : 'IOPS',
          notes,
        });
      }
      rmSync(image, { force: true });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
