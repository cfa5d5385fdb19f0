/**
 * transaction and drive-backup over QMP, blockrepd beside qemu-storage-daemon 7.2: the same
 * transactions (failing ones undone, aborted ones undone, mixed ones with jobs) on copies of one
 * chain give the same answers, errors, job events, bitmaps, snapshots and graph.
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuImgJson, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

function normalise(v: unknown, dir: string): unknown {
  return JSON.parse(
    JSON.stringify(v)
      .split(dir)
      .join('D')
      .replace(/#block\d+/g, '#block'),
  );
}

const JOB_EVENTS = ['JOB_STATUS_CHANGE', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED', 'BLOCK_JOB_ERROR'];

async function script(qmp: QmpClient, dir: string): Promise<unknown[]> {
  const f = (n: string) => join(dir, n);
  const out: unknown[] = [];
  const run = async (cmd: string, args: Record<string, unknown> = {}) => {
    try {
      out.push({ cmd, ok: normalise(await qmp.execute(cmd, args), dir) });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, err: `${e.errorClass}: ${normalise(e.desc, dir)}` });
    }
  };
  const tx = (actions: [string, Record<string, unknown>][], properties?: Record<string, unknown>) =>
    run('transaction', {
      actions: actions.map(([type, data]) => ({ type, data })),
      ...(properties ? { properties } : {}),
    });
  const state = async (label: string) => {
    const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as Record<string, unknown>[];
    const graph = (await qmp.execute('x-debug-query-block-graph')) as {
      nodes: { id: number; name: string; type: string }[];
      edges: { parent: number; child: number; name: string }[];
    };
    const name = (id: number) => graph.nodes.find((n) => n.id === id)!;
    out.push({
      label,
      bitmaps: nodes
        .filter((n) => n['dirty-bitmaps'])
        .map((n) => ({
          node: n['node-name'],
          bitmaps: (n['dirty-bitmaps'] as Record<string, unknown>[]).map((b) => [
            b.name,
            b.count,
            b.recording,
          ]),
        })),
      edges: normalise(
        graph.edges
          .map((e) => `${name(e.parent).type}:${name(e.parent).name} -${e.name}-> ${name(e.child).name}`)
          .sort(),
        dir,
      ),
      jobs: await qmp.execute('query-jobs'),
    });
  };
  const jobEvents = async (until: string) => {
    const seen: unknown[] = [];
    for (;;) {
      const e = await qmp.waitEvent('JOB_STATUS_CHANGE', () => true, 60_000).catch(() => null);
      if (!e) break;
      seen.push(e.data);
      if ((e.data as { status: string }).status === until) break;
    }
    const others = qmp.takeEvents().filter((e) => JOB_EVENTS.includes(e.event));
    out.push({ jobEvents: seen, others: others.map((e) => [e.event, e.data]) });
  };

  await run('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'disk',
    file: { driver: 'file', filename: f('top.qcow2') },
  });
  await run('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'tgt',
    file: { driver: 'file', filename: f('tgt.qcow2') },
  });
  await run('block-dirty-bitmap-add', { node: 'disk', name: 'b0' });
  await state('start');

  await tx([
    ['block-dirty-bitmap-add', { node: 'disk', name: 'b1' }],
    ['block-dirty-bitmap-add', { node: 'disk', name: 'b1' }],
  ]);
  await tx([
    ['block-dirty-bitmap-add', { node: 'disk', name: 'b2', granularity: 4096 }],
    ['block-dirty-bitmap-disable', { node: 'disk', name: 'b0' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 'gone' }],
    ['abort', {}],
  ]);
  await tx([
    [
      'blockdev-snapshot-sync',
      { 'node-name': 'disk', 'snapshot-file': f('ov1.qcow2'), 'snapshot-node-name': 'ov1' },
    ],
    ['block-dirty-bitmap-add', { node: 'nope', name: 'x' }],
  ]);
  await tx([['bogus', {}]]);
  await tx([['block-dirty-bitmap-add', { node: 'disk', name: 'g' }]], { 'completion-mode': 'grouped' });
  await state('after failed transactions');

  await tx([
    ['blockdev-backup', { 'job-id': 'j0', device: 'disk', target: 'tgt', sync: 'full' }],
    ['abort', {}],
  ]);
  await jobEvents('null');
  await state('after an aborted backup');

  // A backup's filter sits above disk once prepared: an internal snapshot after it needs a root.
  await tx([
    ['blockdev-backup', { 'job-id': 'j1', device: 'disk', target: 'tgt', sync: 'full' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 'never' }],
  ]);
  await jobEvents('null');
  await tx([
    ['block-dirty-bitmap-add', { node: 'disk', name: 'b3' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 'kept' }],
    ['blockdev-backup', { 'job-id': 'j1', device: 'disk', target: 'tgt', sync: 'full' }],
    ['block-dirty-bitmap-clear', { node: 'disk', name: 'b0' }],
  ]);
  await jobEvents('null');
  await run('drive-backup', { device: 'disk', target: f('d0.qcow2'), sync: 'full' });
  await run('drive-backup', { 'job-id': 'j2', device: 'disk', target: f('d1.qcow2'), sync: 'top' });
  await jobEvents('null');
  await run('drive-backup', {
    'job-id': 'j3',
    device: 'disk',
    target: f('d2.img'),
    sync: 'full',
    format: 'raw',
  });
  await jobEvents('null');
  await run('drive-backup', { 'job-id': 'j4', device: 'disk', target: f('no/d.qcow2'), sync: 'full' });
  await run('drive-backup', {
    'job-id': 'j4',
    device: 'disk',
    target: f('d4.qcow2'),
    sync: 'full',
    format: 'bogus',
  });
  await run('drive-backup', {
    'job-id': 'j4',
    device: 'disk',
    target: f('nonex'),
    sync: 'full',
    mode: 'existing',
  });
  await run('drive-backup', {
    'job-id': 'j5',
    device: 'disk',
    target: f('d2.img'),
    sync: 'full',
    mode: 'existing',
  });
  await jobEvents('null');
  await tx([
    ['drive-backup', { 'job-id': 'j6', device: 'disk', target: f('d6.qcow2'), sync: 'none' }],
    [
      'blockdev-snapshot-sync',
      { 'node-name': 'disk', 'snapshot-file': f('ov2.qcow2'), 'snapshot-node-name': 'ov2' },
    ],
  ]);
  // The sync=none target backs onto disk, so disk is busy for the snapshot: the backup is undone.
  await jobEvents('null');
  await tx([
    ['block-dirty-bitmap-add', { node: 'disk', name: 'b4' }],
    [
      'blockdev-snapshot-sync',
      { 'node-name': 'disk', 'snapshot-file': f('ov2.qcow2'), 'snapshot-node-name': 'ov2' },
    ],
  ]);
  await state('end');
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-img', 'qemu-io'))(
  'transaction, against qemu-storage-daemon',
  () => {
    it('same answers, undo, job events and results', async () => {
      const dir = makeTempDir();
      const seed = dir.file('seed');
      mkdirSync(seed);
      await qemuImg(['create', '-q', '-f', 'qcow2', join(seed, 'base.qcow2'), '8M']);
      await qemuIo([join(seed, 'base.qcow2')], ['write -P 1 0 2M']);
      await qemuImg([
        'create',
        '-q',
        '-f',
        'qcow2',
        '-b',
        'base.qcow2',
        '-F',
        'qcow2',
        join(seed, 'top.qcow2'),
      ]);
      await qemuIo([join(seed, 'top.qcow2')], ['write -P 2 1M 2M']);
      await qemuImg(['create', '-q', '-f', 'qcow2', join(seed, 'tgt.qcow2'), '8M']);
      const copy = (name: string) => {
        const d = dir.file(name);
        mkdirSync(d);
        for (const img of ['base.qcow2', 'top.qcow2', 'tgt.qcow2'])
          copyFileSync(join(seed, img), join(d, img));
        return d;
      };
      const theirsDir = copy('qsd');
      const oursDir = copy('ours');
      const qsd = await startQsd(dir.file('qsd.sock'));
      const theirs = await script(qsd.qmp, theirsDir);
      await qsd.stop();
      const ours = await startDaemon(dir.file('ours.sock'));
      const mine = await script(ours.qmp, oursDir);
      expect(await ours.stop()).toBe(0);
      expect(mine).toEqual(theirs);
      const snapshots = async (d: string) =>
        ((await qemuImgJson(['info', join(d, 'top.qcow2')])).snapshots ?? []).map(
          (s: { name: string }) => s.name,
        );
      expect(await snapshots(oursDir)).toEqual(['kept']);
      expect(await snapshots(theirsDir)).toEqual(['kept']);
      for (const img of ['tgt.qcow2', 'd0.qcow2', 'd1.qcow2', 'd2.img']) {
        const verdict = await qemuImg(['compare', join(theirsDir, img), join(oursDir, img)]);
        expect(verdict.stdout, img).toMatch(/identical/);
      }
      const info = async (d: string, img: string) => {
        const i = await qemuImgJson(['info', join(d, img)]);
        return normalise({ format: i.format, backing: i['backing-filename'], size: i['virtual-size'] }, d);
      };
      for (const img of ['d0.qcow2', 'd1.qcow2', 'd2.img', 'd6.qcow2', 'ov1.qcow2', 'ov2.qcow2'])
        expect(await info(oursDir, img), img).toEqual(await info(theirsDir, img));
    });
  },
);
