import { execFileSync } from 'node:child_process';
import { mkdtempSync, openSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { runPeer, unixAccepts } from '@blockrep/test-kit';

export { runPeer };

/**
 * The allocator setting both sides run under: QEMU 7.2 maps a fresh buffer for each large
 * request, and on this VM page faults are so slow that without it we would measure the VM.
 */
export const BENCH_ENV: NodeJS.ProcessEnv = {
  ...process.env,
  GLIBC_TUNABLES: 'glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824',
};

function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * Writes dirty pages out and, when allowed (root), empties the page cache: a job that writes
 * GiBs into the page cache would otherwise run as fast as the memory it is given happens to be
 * (on this VM the page cache grows into memory the hypervisor has not backed yet; measured, the
 * same mirror ran at 280-966 MiB/s with only `sync` between runs, and at 823-833 MiB/s with the
 * cache emptied before each). Every run then reads its source from the disk, on both sides.
 */
export function settlePageCache(): void {
  execFileSync('sync');
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    // Not root: sync alone.
  }
}

/**
 * Runs one measurement per side `rounds` times (at least 3), the order of the sides reversed
 * every other round and `sync` before each, so no side pays for another's dirty page cache;
 * returns the median of each side.
 */
export async function medianOfSides<S extends string>(
  sides: readonly S[],
  run: (side: S) => Promise<number>,
  rounds = 3,
): Promise<Record<S, number>> {
  const got = new Map<S, number[]>(sides.map((s) => [s, []]));
  for (let i = 0; i < Math.max(3, rounds); i++) {
    const order = i % 2 ? [...sides] : [...sides].reverse();
    for (const side of order) {
      execFileSync('sync');
      got.get(side)!.push(await run(side));
    }
  }
  return Object.fromEntries([...got].map(([s, v]) => [s, median(v)])) as Record<S, number>;
}

/** A workload fio runs during a warm-up. */
export interface WarmUpJob {
  rw: string;
  bs: string;
  depth: number;
}

/**
 * One uncounted fio pass over an NBD export, each job for `ms` milliseconds one after the other
 * (stonewall): a server started for a benchmark runs its first requests before V8 has compiled
 * its hot paths (measured: the first 1 MiB write run of a fresh blockrepd at 2934 MiB/s, the
 * next three at 3481-3622), where a daemon in service has long been warm. Every server of a
 * comparison gets the same pass, QEMU's included.
 */
export async function fioWarmUp(
  uri: string,
  jobs: readonly WarmUpJob[],
  size: string,
  ms = 1000,
): Promise<void> {
  const args = ['--ioengine=nbd', `--uri=${uri}`, `--size=${size}`, `--runtime=${ms}ms`, '--time_based'];
  jobs.forEach((j, i) => {
    args.push(`--name=warm${i}`, `--rw=${j.rw}`, `--bs=${j.bs}`, `--iodepth=${j.depth}`);
    if (i) args.push('--stonewall');
  });
  await runPeer('fio', args, { timeoutMs: 60_000 + jobs.length * ms * 4 });
}

/** medianOfSides for ours beside QEMU. */
export function medianAlternating(
  run: (side: 'ours' | 'qemu') => Promise<number>,
  rounds = 3,
): Promise<{ ours: number; qemu: number }> {
  return medianOfSides(['ours', 'qemu'] as const, run, rounds);
}

/** A temp directory the caller removes (benchmarks run outside vitest's cleanup). */
export function makeTempDirPlain(): string {
  return mkdtempSync(join(tmpdir(), 'blockrep-bench-'));
}

import { type ChildProcess, spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join as joinPath } from 'node:path';
import { QmpClient } from '@blockrep/qmp';

/**
 * Waits until `check` says the server accepts (its Unix socket or TCP port: accepting, not only
 * bound, since the socket file exists a moment before its listen()), or fails once it has exited
 * or after 10 s.
 */
export async function listening(
  child: ChildProcess,
  check: () => Promise<boolean>,
  what: string,
): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${what} did not start listening`);
}

export interface QmpProcess {
  qmp: QmpClient;
  proc: ChildProcess;
  stop(): Promise<void>;
}

const BLOCKREPD = joinPath(
  dirname(createRequire(import.meta.url).resolve('@blockrep/daemon/package.json')),
  'bin',
  'blockrepd.cjs',
);

/**
 * Starts blockrepd, qemu-storage-daemon or QEMU's system emulator without a guest (`-M none`: a
 * block layer with QMP, the one QEMU process that can start block replication) with a QMP socket
 * and connects to it.
 */
export async function startQmpDaemon(
  kind: 'blockrepd' | 'qsd' | 'qemu-system',
  qmpPath: string,
): Promise<QmpProcess> {
  const monitor = ['--chardev', `socket,id=q,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=q'];
  const proc =
    kind === 'blockrepd'
      ? spawn(
          process.execPath,
          [
            ...(process.env.BENCH_NODE_FLAGS?.split(' ').filter(Boolean) ?? []),
            BLOCKREPD,
            '--qmp',
            `unix:${qmpPath}`,
            '--log-level',
            'warn',
          ],
          {
            stdio: process.env.BENCH_NODE_LOG
              ? [
                  'ignore',
                  openSync(process.env.BENCH_NODE_LOG, 'w'),
                  openSync(process.env.BENCH_NODE_LOG, 'a'),
                ]
              : 'ignore',
            env: BENCH_ENV,
          },
        )
      : kind === 'qsd'
        ? spawn('qemu-storage-daemon', monitor, { stdio: 'ignore', env: BENCH_ENV })
        : spawn(
            'qemu-system-x86_64',
            [
              '-M',
              'none',
              '-nodefaults',
              '-display',
              'none',
              '-chardev',
              `socket,id=q,path=${qmpPath},server=on,wait=off`,
              '-mon',
              'chardev=q,mode=control',
            ],
            { stdio: 'ignore', env: BENCH_ENV },
          );
  await listening(proc, () => unixAccepts(qmpPath), kind);
  const qmp = await QmpClient.connect({ path: qmpPath });
  return {
    qmp,
    proc,
    stop: async () => {
      if (proc.exitCode !== null) return;
      const gone = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await gone;
    },
  };
}

/** Seconds between now and when the job reaches a status. */
export async function timeJob(qmp: QmpClient, id: string, status: string, start: bigint): Promise<number> {
  await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.id === id && e.data?.status === status, 600_000);
  return Number(process.hrtime.bigint() - start) / 1e9;
}
