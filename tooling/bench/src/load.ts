import { readFileSync, rmSync } from 'node:fs';
import { makeImage, type Running, type Server, SIZE, start } from './nbd';
import type { BenchRow } from './types';
import { makeTempDirPlain, medianOfSides, runPeer } from './util';

/*
 * Under load, blockrepd beside qemu-storage-daemon (same command line, raw image, Unix socket,
 * the same allocator setting; median of three runs, order alternated, `sync` before each):
 * - the 99th percentile latency of 4 KiB random writes (depth 1) while a 1 MiB sequential write
 *   stream (depth 8) runs on another connection;
 * - 4 KiB random write IOPS with 8 connections (depth 16 each), beside 1 connection: throughput
 *   should not fall as clients are added;
 * - the server's peak resident memory (VmHWM) after these runs.
 */

const RUNTIME = '3s';

async function fio(args: string[]): Promise<{ jobs: Array<Record<string, any>> }> {
  const r = await runPeer('fio', [
    '--ioengine=nbd',
    `--size=${SIZE}`,
    `--runtime=${RUNTIME}`,
    '--ramp_time=500ms',
    '--time_based',
    '--output-format=json',
    ...args,
  ]);
  return JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
}

/** p99 completion latency (ms) of 4k random writes beside a 1M stream. */
async function p99UnderStream(uri: string): Promise<number> {
  const out = await fio([
    `--uri=${uri}`,
    '--name=stream',
    '--rw=write',
    '--bs=1M',
    '--iodepth=8',
    '--name=small',
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=1',
  ]);
  const small = out.jobs.find((j) => j.jobname === 'small')!;
  return small.write.clat_ns.percentile['99.000000'] / 1e6;
}

/** Total 4k random write IOPS over n connections. */
async function iops(uri: string, n: number): Promise<number> {
  const out = await fio([
    `--uri=${uri}`,
    '--name=w',
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    `--numjobs=${n}`,
    '--group_reporting',
  ]);
  return out.jobs[0]!.write.iops;
}

/** A memory figure of /proc/PID/status (VmHWM: peak resident; RssAnon, RssFile: resident now) in MiB. */
function statusMiB(pid: number, field: 'VmHWM' | 'RssAnon' | 'RssFile'): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : Number.NaN;
}

export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const servers = ['blockrepd', 'qsd'] as const satisfies readonly Server[];
  const running = {} as Record<(typeof servers)[number], Running>;
  try {
    const image = await makeImage(dir, 'raw');
    for (const s of servers) running[s] = await start(s, 'raw', image, dir, false);
    const idle = Object.fromEntries(servers.map((s) => [s, statusMiB(running[s].pid, 'VmHWM')]));
    const p99 = await medianOfSides(servers, (s) => p99UnderStream(running[s].uri));
    const one = await medianOfSides(servers, (s) => iops(running[s].uri, 1));
    const eight = await medianOfSides(servers, (s) => iops(running[s].uri, 8));
    const rss = {
      blockrepd: statusMiB(running.blockrepd.pid, 'VmHWM'),
      qsd: statusMiB(running.qsd.pid, 'VmHWM'),
    };
    const f = (v: number) => v.toFixed(0);
    // Resident now, split into anonymous memory and file pages (Node's own binary is ~40 MiB of code).
    const split = (s: (typeof servers)[number]) =>
      `${f(idle[s]!)} at start, now anon ${f(statusMiB(running[s].pid, 'RssAnon'))} + file ${f(statusMiB(running[s].pid, 'RssFile'))}`;
    return [
      {
        name: 'load 4k write p99 beside a 1M stream',
        ours: p99.blockrepd,
        qemu: p99.qsd,
        unit: 'ms',
        lowerIsBetter: true,
      },
      {
        name: 'load 4k rand write, 8 connections',
        ours: eight.blockrepd,
        qemu: eight.qsd,
        unit: 'IOPS',
        notes: `1 connection: ours ${f(one.blockrepd)}, qsd ${f(one.qsd)}; 8/1: ours ${(eight.blockrepd / one.blockrepd).toFixed(2)}, qsd ${(eight.qsd / one.qsd).toFixed(2)}`,
      },
      {
        name: 'load peak resident memory',
        ours: rss.blockrepd,
        qemu: rss.qsd,
        unit: 'MiB',
        lowerIsBetter: true,
        notes: `ours ${split('blockrepd')}; qsd ${split('qsd')}`,
      },
    ];
  } finally {
    for (const r of Object.values(running)) await r.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
