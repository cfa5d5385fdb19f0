import { copyFileSync, rmSync } from 'node:fs';
import type { QmpClient } from '@blockrep/qmp';
import type { BenchRow } from './types';
import {
  makeTempDirPlain,
  medianAlternating,
  runPeer,
  settlePageCache,
  startQmpDaemon,
  timeJob,
} from './util';

/*
 * Block jobs, ours (blockrepd) beside qemu-storage-daemon, both driven over QMP on copies of the
 * same images: a full backup of a 1 GiB qcow2 image full of data, an active commit of 512 MiB
 * of data from an overlay into its base, and a full mirror of the 1 GiB image into an empty
 * qcow2 (READY, then job-complete). Figures are MiB/s of the job's data (wall clock from the
 * command to the job's end), the median of three runs per side with the order alternated, each
 * started with the image copies on disk and the page cache emptied (settlePageCache).
 *
 * Each daemon first runs the same kind of job on 128 MiB images, uncounted: a daemon in service
 * has its hot paths compiled, while a fresh blockrepd pays V8's optimizing compiler during the
 * first second of its first job (0.7 s of compiler thread time, measured with --trace-opt).
 * qemu-storage-daemon gets the same warm-up job.
 */

const GiB = 1 << 30;
const WARM = 128 << 20;

async function prepare(dir: string) {
  const q = (args: string[]) => runPeer('qemu-img', args, { timeoutMs: 600_000 });
  const io = (cmd: string, file: string) =>
    runPeer('qemu-io', ['-f', 'qcow2', '-c', cmd, file], { timeoutMs: 600_000 });
  for (const [p, size] of [
    ['', GiB],
    ['w', WARM],
  ] as const) {
    await q(['create', '-f', 'qcow2', `${dir}/${p}src.qcow2`, String(size)]);
    await io(`write -P 0x5a 0 ${size}`, `${dir}/${p}src.qcow2`);
    await q(['create', '-f', 'qcow2', `${dir}/${p}tgt.qcow2`, String(size)]);
    await q(['create', '-f', 'qcow2', `${dir}/${p}base.qcow2`, String(size)]);
    await q(['create', '-f', 'qcow2', '-b', `${dir}/${p}base.qcow2`, '-F', 'qcow2', `${dir}/${p}top.qcow2`]);
    await io(`write -P 0x6b 0 ${size / 2}`, `${dir}/${p}top.qcow2`);
  }
}

type Kind = 'blockrepd' | 'qsd';
/** A job of one kind: `p` prefixes its node and file names ('' for the measured job, 'w' for the warm-up). */
type Job = (qmp: QmpClient, id: string, p: string) => Promise<void>;

const addQcow2 = (qmp: QmpClient, work: string, name: string, backing?: string) =>
  qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': name,
    file: { driver: 'file', filename: `${work}/${name}.qcow2` },
    ...(backing
      ? {
          backing: {
            driver: 'qcow2',
            'node-name': backing,
            file: { driver: 'file', filename: `${work}/${backing}.qcow2` },
          },
        }
      : {}),
  });

/** The nodes a job of the pair kind (backup, mirror) or the chain kind (commit) works on. */
async function addNodes(qmp: QmpClient, work: string, p: string, chain: boolean): Promise<void> {
  if (chain) await addQcow2(qmp, work, `${p}top`, `${p}base`);
  else for (const n of ['src', 'tgt']) await addQcow2(qmp, work, `${p}${n}`);
}

/**
 * A fresh daemon of one kind on copies of the images: the warm-up job runs to its end, then the
 * measured one; the result is the seconds from the measured job's command until it is gone.
 */
async function timed(kind: Kind, dir: string, work: string, chain: boolean, job: Job): Promise<number> {
  const files = chain ? ['top', 'base'] : ['src', 'tgt'];
  for (const p of ['', 'w'])
    for (const f of files) copyFileSync(`${dir}/${p}${f}.qcow2`, `${work}/${p}${f}.qcow2`);
  const d = await startQmpDaemon(kind, `${work}/${kind}.sock`);
  try {
    await addNodes(d.qmp, work, 'w', chain);
    await job(d.qmp, 'w', 'w');
    await timeJob(d.qmp, 'w', 'null', process.hrtime.bigint());
    await addNodes(d.qmp, work, '', chain);
    // The copies' and the warm-up's dirty pages go to disk before the clock starts, not during the job.
    settlePageCache();
    const t0 = process.hrtime.bigint();
    await job(d.qmp, 'j', '');
    return await timeJob(d.qmp, 'j', 'null', t0);
  } finally {
    await d.stop();
  }
}

const backup: Job = async (qmp, id, p) => {
  await qmp.execute('blockdev-backup', { 'job-id': id, device: `${p}src`, target: `${p}tgt`, sync: 'full' });
};

/** Mirror and active commit end the same way: READY, then job-complete. */
async function completeWhenReady(qmp: QmpClient, id: string): Promise<void> {
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === id, 600_000);
  await qmp.execute('job-complete', { id });
}

const mirror: Job = async (qmp, id, p) => {
  await qmp.execute('blockdev-mirror', { 'job-id': id, device: `${p}src`, target: `${p}tgt`, sync: 'full' });
  await completeWhenReady(qmp, id);
};

const commit: Job = async (qmp, id, p) => {
  await qmp.execute('block-commit', { 'job-id': id, device: `${p}top` });
  await completeWhenReady(qmp, id);
};

export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const work = makeTempDirPlain();
  try {
    await prepare(dir);
    const side = (s: 'ours' | 'qemu') => (s === 'ours' ? 'blockrepd' : 'qsd');
    const b = await medianAlternating((s) => timed(side(s), dir, work, false, backup));
    const c = await medianAlternating((s) => timed(side(s), dir, work, true, commit));
    const m = await medianAlternating((s) => timed(side(s), dir, work, false, mirror));
    return [
      {
        name: 'jobs full backup 1 GiB (qcow2->qcow2)',
        ours: 1024 / b.ours,
        qemu: 1024 / b.qemu,
        unit: 'MiB/s',
      },
      { name: 'jobs active commit 512 MiB', ours: 512 / c.ours, qemu: 512 / c.qemu, unit: 'MiB/s' },
      {
        name: 'jobs full mirror 1 GiB (qcow2->qcow2)',
        ours: 1024 / m.ours,
        qemu: 1024 / m.qemu,
        unit: 'MiB/s',
      },
    ];
  } finally {
    rmSync(dir, { recursive: true, force: true });
    rmSync(work, { recursive: true, force: true });
  }
}
