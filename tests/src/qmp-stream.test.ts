/**
 * block-stream over QMP, blockrepd beside qemu-storage-daemon 7.2: the same argument errors, job
 * events and graph, and a top image that afterwards reads, maps and names its backing file as
 * QEMU's does (partial stream onto a base node, then the whole chain).
 */
import { join } from 'node:path';
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, qemuImg, qemuImgJson, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll } from './daemon';
import { graphEdges, normalise, qcow2, recorder, seedDir, sideBySide } from './qmp-diff';

afterEach(() => killAll());

async function script(qmp: QmpClient, dir: string): Promise<unknown[]> {
  const f = (n: string) => join(dir, n);
  const out: unknown[] = [];
  const run = recorder(qmp, dir, out);
  const state = async (label: string) => {
    const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as Record<string, unknown>[];
    out.push({
      label,
      nodes: normalise(
        nodes
          .filter((n) => !String(n['node-name']).startsWith('#'))
          .map((n) => ({ name: n['node-name'], ro: n.ro, backing: n.backing_file ?? null })),
        dir,
      ),
      edges: await graphEdges(qmp, dir),
    });
  };
  const jobEvents = async () => {
    const seen: unknown[] = [];
    for (;;) {
      const e = await qmp.waitEvent('JOB_STATUS_CHANGE', () => true, 60_000);
      seen.push(e.data);
      if ((e.data as { status: string }).status === 'null') break;
    }
    const others = qmp.takeEvents().filter((e) => e.event.startsWith('BLOCK_JOB'));
    out.push({ jobEvents: seen, others: others.map((e) => [e.event, e.data]) });
  };
  const add = (name: string, file: string, backing?: string | null) =>
    run('blockdev-add', {
      driver: 'qcow2',
      'node-name': name,
      file: { driver: 'file', filename: f(file) },
      ...(backing !== undefined ? { backing } : {}),
    });
  await add('base', 'base.qcow2');
  await add('mid', 'mid.qcow2', 'base');
  await add('top', 'top.qcow2', 'mid');
  await state('start');

  const stream = (args: Record<string, unknown>) => run('block-stream', args);
  await stream({ device: 'top', base: f('base.qcow2'), 'base-node': 'base' });
  await stream({ device: 'top', base: f('base.qcow2'), bottom: 'mid' });
  await stream({ device: 'top', 'base-node': 'base', bottom: 'mid' });
  await stream({ device: 'nope' });
  await stream({ device: 'top', 'base-node': 'nope' });
  await stream({ device: 'top', 'base-node': 'top' });
  await stream({ device: 'mid', 'base-node': 'top' });
  await stream({ device: 'top', base: f('nope.qcow2') });
  await stream({ device: 'top', 'backing-file': 'x.qcow2' });
  await stream({ device: 'top', bottom: 'nope' });
  await stream({ device: 'top' });
  await stream({ device: 'top', 'job-id': 't1', 'base-node': 'base', 'on-error': 'bogus' });

  if (await stream({ device: 'top', 'job-id': 't1', 'base-node': 'base' })) await jobEvents();
  await state('top streamed down to base');
  if (await stream({ device: 'top', 'job-id': 't2', base: f('base.qcow2'), 'backing-file': 'renamed.qcow2' }))
    await jobEvents();
  await state('again, with a backing file name given');
  if (await stream({ device: 'top', 'job-id': 't3' })) await jobEvents();
  await state('the whole chain streamed');
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-img', 'qemu-io'))(
  'block-stream, against qemu-storage-daemon',
  () => {
    it('same errors, events and graph; the streamed images read and map alike', async () => {
      const { dir, seed, img } = seedDir();
      await qcow2(img('base.qcow2'), '8M');
      await qemuIo([img('base.qcow2')], ['write -P 1 0 3M', 'write -P 5 6M 512k']);
      await qcow2(img('mid.qcow2'), undefined, 'base.qcow2');
      await qemuIo([img('mid.qcow2')], ['write -P 2 1M 3M', 'write -z 6M 64k']);
      await qcow2(img('top.qcow2'), undefined, 'mid.qcow2');
      await qemuIo([img('top.qcow2')], ['write -P 3 2560k 1M']);
      const images = ['base.qcow2', 'mid.qcow2', 'top.qcow2'];
      const { theirs, mine, theirsDir, oursDir } = await sideBySide(dir, seed, images, script);
      expect(mine).toEqual(theirs);
      // The seed chain's view, now held by top alone.
      await qemuImg(['compare', img('top.qcow2'), join(oursDir, 'top.qcow2')]);
      await qemuImg(['check', join(oursDir, 'top.qcow2')]);
      const map = async (d: string) => normalise(await qemuImgJson(['map', join(d, 'top.qcow2')]), d);
      const mapOf = (m: unknown) => (m as Record<string, unknown>[]).map(({ offset: _, ...rest }) => rest);
      expect(mapOf(await map(oursDir))).toEqual(mapOf(await map(theirsDir)));
      const info = async (d: string) => normalise(await qemuImgJson(['info', join(d, 'top.qcow2')]), d);
      const header = (i: unknown) => {
        const { 'actual-size': _, ...rest } = i as Record<string, unknown>;
        return rest;
      };
      expect(header(await info(oursDir))).toEqual(header(await info(theirsDir)));
    });
  },
);
