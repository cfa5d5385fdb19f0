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
 */

const GiB = 1 << 30;

async function prepare(dir: string) {
  const q = (args: string[]) => runPeer('qemu-img', args, { timeoutMs: 600_000 });
  await q(['create', '-f', 'qcow2', `${dir}/src.qcow2`, String(GiB)]);
  await runPeer('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1G', `${dir}/src.qcow2`], {
    timeoutMs: 600_000,
  });
  await q(['create', '-f', 'qcow2', `${dir}/tgt.qcow2`, String(GiB)]);
  await q(['create', '-f', 'qcow2', `${dir}/base.qcow2`, String(GiB)]);
  await q(['create', '-f', 'qcow2', '-b', `${dir}/base.qcow2`, '-F', 'qcow2', `${dir}/top.qcow2`]);
  await runPeer('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x6b 0 512M', `${dir}/top.qcow2`], {
    timeoutMs: 600_000,
  });
}

/**
 * A daemon of one kind with copies of src.qcow2 and tgt.qcow2 added as nodes 'src' and 'tgt':
 * `start` sends the job's command, and the result is the seconds until the job is gone.
 */
async function onPair(
  kind: 'blockrepd' | 'qsd',
  dir: string,
  work: string,
  start: (qmp: QmpClient, id: string) => Promise<void>,
): Promise<number> {
  copyFileSync(`${dir}/src.qcow2`, `${work}/src.qcow2`);
  copyFileSync(`${dir}/tgt.qcow2`, `${work}/tgt.qcow2`);
  // The copies' dirty pages go to disk before the clock starts, not during the job.
  settlePageCache();
  const d = await startQmpDaemon(kind, `${work}/${kind}.sock`);
  try {
    for (const n of ['src', 'tgt']) {
      await d.qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': n,
        file: { driver: 'file', filename: `${work}/${n}.qcow2` },
      });
    }
    const t0 = process.hrtime.bigint();
    await start(d.qmp, 'j');
    return await timeJob(d.qmp, 'j', 'null', t0);
  } finally {
    await d.stop();
  }
}

const backup = (kind: 'blockrepd' | 'qsd', dir: string, work: string) =>
  onPair(kind, dir, work, async (qmp, id) => {
    await qmp.execute('blockdev-backup', { 'job-id': id, device: 'src', target: 'tgt', sync: 'full' });
  });

const mirror = (kind: 'blockrepd' | 'qsd', dir: string, work: string) =>
  onPair(kind, dir, work, async (qmp, id) => {
    await qmp.execute('blockdev-mirror', { 'job-id': id, device: 'src', target: 'tgt', sync: 'full' });
    await qmp.waitEvent('BLOCK_JOB_READY', () => true, 600_000);
    await qmp.execute('job-complete', { id });
  });

async function commit(kind: 'blockrepd' | 'qsd', dir: string, work: string): Promise<number> {
  copyFileSync(`${dir}/base.qcow2`, `${work}/base.qcow2`);
  copyFileSync(`${dir}/top.qcow2`, `${work}/top.qcow2`);
  settlePageCache();
  const d = await startQmpDaemon(kind, `${work}/${kind}.sock`);
  try {
    await d.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: `${work}/top.qcow2` },
      backing: {
        driver: 'qcow2',
        'node-name': 'base',
        file: { driver: 'file', filename: `${work}/base.qcow2` },
      },
    });
    const t0 = process.hrtime.bigint();
    await d.qmp.execute('block-commit', { 'job-id': 'c', device: 'top' });
    await d.qmp.waitEvent('BLOCK_JOB_READY', () => true, 600_000);
    await d.qmp.execute('job-complete', { id: 'c' });
    return await timeJob(d.qmp, 'c', 'null', t0);
  } finally {
    await d.stop();
  }
}

export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const work = makeTempDirPlain();
  try {
    await prepare(dir);
    const side = (s: 'ours' | 'qemu') => (s === 'ours' ? 'blockrepd' : 'qsd');
    const b = await medianAlternating((s) => backup(side(s), dir, work));
    const c = await medianAlternating((s) => commit(side(s), dir, work));
    const m = await medianAlternating((s) => mirror(side(s), dir, work));
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
