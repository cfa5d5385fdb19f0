/**
 * Backing-chain commands over QMP, blockrepd beside qemu-storage-daemon 7.2: external snapshots
 * (blockdev-snapshot, blockdev-snapshot-sync), change-backing-file, block-set-write-threshold
 * with its event, and x-debug-block-dirty-bitmap-sha256. The same script on copies of one chain
 * gives the same answers, errors, events and graph, and leaves images qemu-img reads alike.
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
  const add = (name: string, file: string, driver = 'qcow2', more = {}) =>
    run('blockdev-add', { driver, 'node-name': name, file: { driver: 'file', filename: f(file) }, ...more });
  // Discards reach a node (and its threshold) only with discard=unmap.
  await add('disk', 'top.qcow2', 'qcow2', { discard: 'unmap' });
  await add('ov', 'ov.qcow2');
  await add('ovb', 'ovb.qcow2');
  await add('r', 'raw.img', 'raw');
  await run('nbd-server-start', { addr: { type: 'unix', data: { path: f('nbd.sock') } } });
  await run('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'disk', writable: true });
  const nbd = ['-f', 'raw', `nbd+unix:///disk?socket=${f('nbd.sock')}`];

  // x-blockdev-set-iothread: QEMU's checks (blockrepd has one event loop, so nothing moves).
  await run('object-add', { 'qom-type': 'iothread', id: 'io0' });
  await run('object-add', { 'qom-type': 'secret', id: 'sec0', data: 'x' });
  for (const [node, iothread, force] of [
    ['nope', 'io0'],
    ['disk', 'io0'],
    ['disk', 'io0', true],
    ['r', 'io0'],
    ['r', 'sec0'],
    ['r', 'nope'],
    ['r', 5],
    ['r', null],
    // Back to the main loop: qemu-storage-daemon 7.2 aborts when an NBD client of an export in an
    // iothread disconnects (assertion in nbd_blockdev_client_closed), as qemu-io does below.
    ['disk', null, true],
  ] as const)
    await run('x-blockdev-set-iothread', { 'node-name': node, iothread, ...(force ? { force } : {}) });

  // The write threshold: set, reported, passed by one write (the event), then cleared.
  await run('block-set-write-threshold', { 'node-name': 'nope', 'write-threshold': 1 });
  await run('block-set-write-threshold', { 'node-name': 'disk', 'write-threshold': 1048576 });
  await run('block-dirty-bitmap-add', { node: 'disk', name: 'b0' });
  const threshold = async () => {
    const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as Record<string, unknown>[];
    return nodes.find((n) => n['node-name'] === 'disk')?.write_threshold;
  };
  out.push({ threshold: await threshold() });
  await qemuIo(nbd, ['write -P 7 1048064 1024', 'write -P 8 3M 64k']);
  out.push({ event: (await qmp.waitEvent('BLOCK_WRITE_THRESHOLD')).data });
  out.push({ threshold: await threshold() });
  await run('x-debug-block-dirty-bitmap-sha256', { node: 'disk', name: 'b0' });
  await run('x-debug-block-dirty-bitmap-sha256', { node: 'disk', name: 'nope' });
  await run('block-set-write-threshold', { 'node-name': 'disk', 'write-threshold': 4194304 });
  await qemuIo(nbd, ['discard 4M 64k']);
  out.push({ event: (await qmp.waitEvent('BLOCK_WRITE_THRESHOLD')).data });

  // change-backing-file: errors in QEMU's order, then a header rewrite.
  for (const [device, image] of [
    ['nope', 'disk'],
    ['disk', 'nope'],
    ['disk', 'r'],
    ['r', 'disk'],
    ['disk', 'disk'],
  ])
    await run('change-backing-file', { device, 'image-node-name': image, 'backing-file': f('base.qcow2') });

  // blockdev-snapshot: the overlay checks, then ov on top of disk (the export moves with it).
  for (const [node, overlay] of [
    ['nope', 'ov'],
    ['disk', 'nope'],
    ['disk', 'ovb'],
    ['disk', 'r'],
    ['disk', 'disk'],
    ['disk', 'ov'],
    ['disk', 'ov'],
  ])
    await run('blockdev-snapshot', { node, overlay });

  // blockdev-snapshot-sync: a new file on top of ov.
  const sync = (args: Record<string, unknown>) => run('blockdev-snapshot-sync', args);
  await sync({ 'snapshot-file': f('s1.qcow2') });
  await sync({ 'node-name': 'ov', 'snapshot-file': f('s1.qcow2') });
  await sync({ 'node-name': 'ov', 'snapshot-file': f('s1.qcow2'), 'snapshot-node-name': 'disk' });
  await sync({ 'node-name': 'ov', 'snapshot-file': f('none/s1.qcow2'), 'snapshot-node-name': 's1' });
  await sync({
    'node-name': 'ov',
    'snapshot-file': f('nonex.qcow2'),
    'snapshot-node-name': 's1',
    mode: 'existing',
  });
  await sync({ 'node-name': 'ov', 'snapshot-file': f('s1.qcow2'), 'snapshot-node-name': 's1' });
  await sync({ device: 's1', 'node-name': 'ov', 'snapshot-file': f('s2.qcow2') });
  await run('blockdev-del', { 'node-name': 's1' });
  // On a node whose file name is plain: the new image names it as its backing file.
  await sync({ 'node-name': 'ovb', 'snapshot-file': f('s3.qcow2'), 'snapshot-node-name': 's3' });
  await qemuIo(nbd, ['write -P 9 0 64k']);
  // The export now sits on s1 over ov over disk: data below reads through, and a write into part
  // of a cluster copies the rest of it up from the chain.
  const io = await qemuIo(nbd, [
    'read -P 1 1152k 64k',
    'write -P 6 1536k 4k',
    'read -P 1 1540k 60k',
    'read -P 8 3M 64k',
  ]);
  out.push({ readThrough: io.stdout.includes('failed') ? io.stdout : 'ok' });

  out.push({ edges: await graphEdges(qmp, dir) });
  const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as Record<string, unknown>[];
  out.push({
    nodes: normalise(
      nodes
        .filter((n) => !String(n['node-name']).startsWith('#'))
        .map((n) => ({ name: n['node-name'], ro: n.ro, drv: n.drv, write_threshold: n.write_threshold })),
      dir,
    ),
  });
  // x-blockdev-amend: QEMU 7.2 amends only qcow2 encryption over QMP.
  const concluded = (id: string) =>
    qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.id === id && e.data?.status === 'concluded');
  const amend = (args: Record<string, unknown>) => run('x-blockdev-amend', args);
  await amend({ 'job-id': 'a1', 'node-name': 's1', options: { driver: 'qcow2' } });
  await concluded('a1');
  await amend({ 'job-id': 'a1', 'node-name': 's1', options: { driver: 'qcow2' } });
  await amend({ 'job-id': 'a2', 'node-name': 'r', options: { driver: 'raw' } });
  await amend({ 'job-id': 'a2', 'node-name': 'r', options: { driver: 'qcow2' } });
  await amend({ 'job-id': 'a2', 'node-name': 'nope', options: { driver: 'qcow2' } });
  await amend({ 'node-name': 's1', options: { driver: 'qcow2' } });
  await amend({ 'job-id': 'a3', 'node-name': 's1', options: { driver: 'qcow2', bogus: 1 } });
  await amend({
    'job-id': 'a3',
    'node-name': 's1',
    options: { driver: 'qcow2', encrypt: { format: 'luks' } },
  });
  await amend({
    'job-id': 'a4',
    'node-name': 's1',
    options: { driver: 'qcow2', encrypt: { format: 'luks', state: 'active', 'new-secret': 'x' } },
  });
  await concluded('a4');
  out.push({ jobs: await qmp.execute('query-jobs') });
  await run('block-export-del', { id: 'e' });
  await qmp.waitEvent('BLOCK_EXPORT_DELETED');
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-img', 'qemu-io'))(
  'backing-chain commands, against qemu-storage-daemon',
  () => {
    it('same answers, errors, events and graph; the chains read alike afterwards', async () => {
      const { dir, seed, img } = seedDir();
      await qcow2(img('base.qcow2'), '8M');
      await qemuIo([img('base.qcow2')], ['write -P 1 0 2M']);
      await qcow2(img('top.qcow2'), undefined, 'base.qcow2');
      await qcow2(img('ov.qcow2'), '8M');
      await qcow2(img('ovb.qcow2'), undefined, 'base.qcow2');
      await qemuImg(['create', '-q', '-f', 'raw', img('raw.img'), '1M']);
      const images = ['base.qcow2', 'top.qcow2', 'ov.qcow2', 'ovb.qcow2', 'raw.img'];
      const { theirs, mine, theirsDir, oursDir } = await sideBySide(dir, seed, images, script);
      expect(mine).toEqual(theirs);
      for (const d of [theirsDir, oursDir]) {
        await qemuImg(['check', join(d, 's1.qcow2')]);
        await qemuImg(['check', join(d, 's3.qcow2')]);
      }
      // s1's backing file is ov, whose graph backing (disk) is not the one its header names:
      // QEMU writes a json: name that qemu-img 7.2 cannot open ("does not support the option
      // 'backing.driver'"); blockrep writes ov's file name. The rest of the header is alike.
      const header = async (d: string) => {
        const i = await qemuImgJson(['info', join(d, 's1.qcow2')]);
        return normalise(
          {
            ...i,
            'backing-filename': typeof i['backing-filename'],
            'full-backing-filename': 0,
            'actual-size': 0,
          },
          d,
        );
      };
      expect(await header(oursDir)).toEqual(await header(theirsDir));
      const chain = async (d: string) =>
        normalise(
          (
            (await qemuImgJson(['info', '--backing-chain', join(d, 's3.qcow2')])) as Record<string, unknown>[]
          ).map((i) => ({
            filename: i.filename,
            backing: i['backing-filename'],
            format: i['backing-filename-format'],
          })),
          d,
        );
      expect(await chain(oursDir)).toEqual(await chain(theirsDir));
      expect(
        (await qemuImg(['compare', join(theirsDir, 's3.qcow2'), join(oursDir, 's3.qcow2')])).stdout,
      ).toMatch(/identical/);
      // What the guest wrote through the export after the snapshots went to the top image.
      expect(
        (await qemuImg(['compare', join(theirsDir, 'top.qcow2'), join(oursDir, 'top.qcow2')])).stdout,
      ).toMatch(/identical/);
    });
  },
);
