/**
 * Internal snapshots over QMP, blockrepd beside qemu-storage-daemon 7.2: the same commands on
 * copies of one image give the same answers and errors, and each daemon's snapshots are images
 * qemu-img checks, lists and applies.
 */
import { copyFileSync } from 'node:fs';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuImgJson, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

async function script(qmp: QmpClient, image: string): Promise<unknown[]> {
  await qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'disk',
    file: { driver: 'file', filename: image },
  });
  await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'nul' });
  const steps: [string, Record<string, unknown>][] = [
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 's1' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 's1' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: '' }],
    ['blockdev-snapshot-internal-sync', { device: 'nul', name: 'x' }],
    ['blockdev-snapshot-internal-sync', { device: 'nope', name: 'x' }],
    ['blockdev-snapshot-internal-sync', { device: 'disk', name: 's2' }],
    ['blockdev-snapshot-delete-internal-sync', { device: 'disk' }],
    ['blockdev-snapshot-delete-internal-sync', { device: 'disk', name: 'nope' }],
    ['blockdev-snapshot-delete-internal-sync', { device: 'disk', id: '1', name: 's2' }],
    ['blockdev-snapshot-delete-internal-sync', { device: 'disk', name: 's1' }],
  ];
  const out: unknown[] = [];
  for (const [cmd, args] of steps) {
    try {
      const r = (await qmp.execute(cmd, args)) as Record<string, unknown>;
      // The date (and the VM clock, which follows it without a VM) differs between the two runs.
      const when = ['date-sec', 'date-nsec', 'vm-clock-sec', 'vm-clock-nsec'];
      out.push({
        cmd,
        ok: Object.fromEntries(Object.entries(r).map(([k, v]) => [k, when.includes(k) ? typeof v : v])),
      });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, err: `${e.errorClass}: ${e.desc}` });
    }
  }
  await qmp.execute('blockdev-del', { 'node-name': 'disk' });
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-img'))(
  'internal snapshots over QMP, against qemu-storage-daemon',
  () => {
    it('same answers and errors; the images check clean and keep snapshot s2 as it was', async () => {
      const dir = makeTempDir();
      const base = dir.file('base.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
      await qemuIo([base], ['write -P 1 0 2M']);
      const q = dir.file('q.qcow2');
      const b = dir.file('b.qcow2');
      copyFileSync(base, q);
      copyFileSync(base, b);
      const qsd = await startQsd(dir.file('qsd.sock'));
      const theirs = await script(qsd.qmp, q);
      await qsd.stop();
      const ours = await startDaemon(dir.file('ours.sock'));
      const mine = await script(ours.qmp, b);
      expect(await ours.stop()).toBe(0);
      expect(mine).toEqual(theirs);
      await qemuImg(['check', b]);
      const list = (await qemuImgJson(['info', b])).snapshots as { name: string }[];
      expect(list.map((s) => s.name)).toEqual(['s2']);
      await qemuIo([b], ['write -P 9 0 1M']);
      await qemuImg(['snapshot', '-a', 's2', b]);
      await qemuImg(['compare', base, b]);
    });
  },
);
