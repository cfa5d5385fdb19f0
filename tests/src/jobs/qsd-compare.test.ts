/**
 * The same QMP session of blockdev-backup and block-commit against qemu-storage-daemon 7.2 and
 * blockrepd: the same job states and events, and equal images at the end.
 */
import { copyFileSync } from 'node:fs';
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuImgCompare, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';
import { jobEventSummary, waitJobStatus } from '../job-events';
import { startQsd } from '../qsd';

const SIZE = 8 << 20;
afterEach(() => killAll());

/** The session: a full backup, then an active commit, each waited for and dismissed. */
async function session(qmp: QmpClient, dir: string) {
  const f = (n: string) => `${dir}/${n}`;
  await qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'src',
    file: { driver: 'file', filename: f('src.qcow2') },
  });
  await qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'tgt',
    file: { driver: 'file', filename: f('tgt.qcow2') },
  });
  qmp.takeEvents();
  await qmp.execute('blockdev-backup', {
    'job-id': 'b1',
    device: 'src',
    target: 'tgt',
    sync: 'full',
    'auto-dismiss': false,
  });
  await waitJobStatus(qmp, 'b1', 'concluded');
  await qmp.execute('job-dismiss', { id: 'b1' });
  await waitJobStatus(qmp, 'b1', 'null');
  const backupEvents = jobEventSummary(qmp.takeEvents());
  // An error of each kind on the way.
  const errors: string[] = [];
  for (const [cmd, args] of [
    ['blockdev-backup', { 'job-id': 'b2', device: 'nope', target: 'tgt', sync: 'full' }],
    ['blockdev-backup', { 'job-id': 'b3', device: 'src', target: 'src', sync: 'full' }],
    ['job-complete', { id: 'nope' }],
  ] as const) {
    try {
      await qmp.execute(cmd, args as Record<string, unknown>);
      errors.push('ok');
    } catch (e) {
      errors.push((e as { class: string }).class);
    }
  }
  await qmp.execute('blockdev-del', { 'node-name': 'src' });
  await qmp.execute('blockdev-del', { 'node-name': 'tgt' });

  await qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'top',
    file: { driver: 'file', filename: f('top.qcow2') },
    backing: { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: f('base.qcow2') } },
  });
  qmp.takeEvents();
  await qmp.execute('block-commit', { 'job-id': 'c1', device: 'top', 'auto-dismiss': false });
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === 'c1', 30_000);
  await qmp.execute('job-complete', { id: 'c1' });
  await waitJobStatus(qmp, 'c1', 'concluded');
  await qmp.execute('job-dismiss', { id: 'c1' });
  await waitJobStatus(qmp, 'c1', 'null');
  const commitEvents = jobEventSummary(qmp.takeEvents());
  const nodes = (await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }))
    .map((n) => n['node-name'])
    .filter((n) => !n.startsWith('#'))
    .sort();
  return { backupEvents, commitEvents, errors, nodes };
}

async function images(dir: string) {
  await qemuImg(['create', '-f', 'qcow2', `${dir}/src.qcow2`, String(SIZE)]);
  await qemuIo(
    ['-f', 'qcow2', `${dir}/src.qcow2`],
    ['write -P 0x11 0 1M', 'write -P 0x12 3M 64k', 'write -z 5M 1M'],
  );
  await qemuImg(['create', '-f', 'qcow2', `${dir}/tgt.qcow2`, String(SIZE)]);
  await qemuImg(['create', '-f', 'qcow2', `${dir}/base.qcow2`, String(SIZE)]);
  await qemuIo(['-f', 'qcow2', `${dir}/base.qcow2`], ['write -P 0x21 0 2M']);
  await qemuImg(['create', '-f', 'qcow2', '-b', `${dir}/base.qcow2`, '-F', 'qcow2', `${dir}/top.qcow2`]);
  await qemuIo(['-f', 'qcow2', `${dir}/top.qcow2`], ['write -P 0x22 1M 2M', 'write -P 0x23 6M 4k']);
}

describe.runIf(hasPeer('qemu-storage-daemon'))(
  'backup and commit: qemu-storage-daemon 7.2 vs blockrepd',
  () => {
    it('same job states, events, errors and images', async () => {
      const dq = makeTempDir();
      const db = makeTempDir();
      await images(dq.path);
      for (const f of ['src.qcow2', 'tgt.qcow2', 'base.qcow2', 'top.qcow2'])
        copyFileSync(dq.file(f), db.file(f));

      const qsd = await startQsd(dq.file('qmp.sock'));
      const theirs = await session(qsd.qmp, dq.path);
      await qsd.stop();
      const ours = await startDaemon(db.file('qmp.sock'));
      const mine = await session(ours.qmp, db.path);
      expect(await ours.stop()).toBe(0);

      expect(mine.backupEvents).toEqual(theirs.backupEvents);
      expect(mine.commitEvents).toEqual(theirs.commitEvents);
      expect(mine.errors).toEqual(theirs.errors);
      expect(mine.nodes).toEqual(theirs.nodes);
      for (const f of ['tgt.qcow2', 'base.qcow2', 'top.qcow2']) {
        expect((await qemuImg(['check', db.file(f)])).stdout).toContain('No errors were found');
        expect(await qemuImgCompare(db.file(f), dq.file(f)), f).toBe('Images are identical.');
      }
    });
  },
);
