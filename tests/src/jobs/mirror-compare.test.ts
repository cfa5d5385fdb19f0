/**
 * The same QMP session of blockdev-mirror and drive-mirror against qemu-storage-daemon 7.2 and
 * blockrepd: the same job states, events, error texts and images. A guest writes through an NBD
 * export of the source with qemu-io while the job runs.
 */
import { copyFileSync } from 'node:fs';
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuImgCompare, qemuIo, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';
import { jobEventSummary, waitJobStatus } from '../job-events';
import { startQsd } from '../qsd';

const SIZE = 8 << 20;
afterEach(() => killAll());

async function waitReady(qmp: QmpClient, id: string) {
  await qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === id, 60_000);
}

async function failure(qmp: QmpClient, cmd: string, args: Record<string, unknown>): Promise<string> {
  try {
    await qmp.execute(cmd, args);
    return 'ok';
  } catch (e) {
    const err = e as { class: string; desc: string };
    return `${err.class}: ${err.desc}`;
  }
}

const qcow2 = (name: string, file: string) => ({
  driver: 'qcow2',
  'node-name': name,
  file: { driver: 'file', filename: file },
});

/** The session; `peerSock` is the NBD socket of another daemon of the same kind exporting 'parent0'. */
async function session(qmp: QmpClient, dir: string, peerSock: string) {
  const f = (n: string) => `${dir}/${n}`;
  const guestSock = f('guest.sock');
  const guest = (cmds: string[]) => qemuIo(['-f', 'raw', `nbd+unix:///src?socket=${guestSock}`], cmds);
  await qmp.execute('blockdev-add', qcow2('src', f('src.qcow2')));
  await qmp.execute('blockdev-add', qcow2('tgt', f('tgt.qcow2')));
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: guestSock } } });
  await qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e0',
    'node-name': 'src',
    name: 'src',
    writable: true,
  });
  qmp.takeEvents();

  // 1. sync=full under guest writes, then job-complete: the export moves onto tgt.
  await qmp.execute('blockdev-mirror', {
    'job-id': 'm1',
    device: 'src',
    target: 'tgt',
    sync: 'full',
    'auto-dismiss': false,
  });
  await waitReady(qmp, 'm1');
  await guest(['write -P 0x31 2M 64k', 'write -P 0x32 7M 1M']);
  await qmp.execute('job-complete', { id: 'm1' });
  await waitJobStatus(qmp, 'm1', 'concluded');
  await qmp.execute('job-dismiss', { id: 'm1' });
  await waitJobStatus(qmp, 'm1', 'null');
  const completeEvents = jobEventSummary(qmp.takeEvents());
  // After the pivot the guest writes to tgt only.
  await guest(['write -P 0x33 0 4k']);
  // qemu-io has gone, but the server may not have seen its connection close yet.
  await waitFor(
    () =>
      qmp.execute('block-export-del', { id: 'e0' }).then(
        () => true,
        (e: { desc?: string }) => (e.desc?.includes('still in use') ? false : Promise.reject(e)),
      ),
    { what: "export e0's client gone" },
  );
  await qmp.waitEvent('BLOCK_EXPORT_DELETED', undefined, 30_000);

  // 2. A cancel after READY: src becomes a copy of tgt, nothing moves.
  qmp.takeEvents();
  await qmp.execute('blockdev-mirror', { 'job-id': 'm2', device: 'tgt', target: 'src', sync: 'full' });
  await waitReady(qmp, 'm2');
  await qmp.execute('block-job-cancel', { device: 'm2' });
  await waitJobStatus(qmp, 'm2', 'null');
  const cancelEvents = jobEventSummary(qmp.takeEvents());

  // 3. drive-mirror to another daemon's NBD export, COLO's "resume replication" step.
  await qmp.execute('drive-mirror', {
    'job-id': 'resync',
    device: 'tgt',
    target: `nbd+unix:///parent0?socket=${peerSock}`,
    mode: 'existing',
    format: 'raw',
    sync: 'full',
  });
  await waitReady(qmp, 'resync');
  await qmp.execute('block-job-cancel', { device: 'resync' });
  await waitJobStatus(qmp, 'resync', 'null');
  const driveEvents = jobEventSummary(qmp.takeEvents());

  const errors = [
    await failure(qmp, 'blockdev-mirror', { 'job-id': 'x', device: 'src', target: 'nope', sync: 'full' }),
    await failure(qmp, 'blockdev-mirror', { 'job-id': 'x', device: 'src', target: 'src', sync: 'full' }),
    await failure(qmp, 'blockdev-mirror', { 'job-id': 'x', device: 'src', target: 'tgt', sync: 'bogus' }),
    await failure(qmp, 'blockdev-mirror', {
      'job-id': 'x',
      device: 'src',
      target: 'tgt',
      sync: 'incremental',
    }),
    await failure(qmp, 'blockdev-mirror', { device: 'src', target: 'tgt', sync: 'full' }),
    await failure(qmp, 'blockdev-mirror', {
      'job-id': 'x',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      granularity: 1000,
    }),
    await failure(qmp, 'blockdev-mirror', {
      'job-id': 'x',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      granularity: 256,
    }),
    await failure(qmp, 'blockdev-mirror', {
      'job-id': 'x',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      'buf-size': -1,
    }),
    await failure(qmp, 'blockdev-mirror', {
      'job-id': 'x',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      replaces: 'nope',
    }),
    await failure(qmp, 'drive-mirror', {
      'job-id': 'x',
      device: 'src',
      target: f('missing.img'),
      mode: 'existing',
      format: 'raw',
      sync: 'full',
    }),
    await failure(qmp, 'drive-mirror', {
      'job-id': 'x',
      device: 'src',
      target: f('new.img'),
      sync: 'full',
      replaces: 'src',
    }),
  ].map((e) => e.replaceAll(dir, '<dir>'));
  const leftover = jobEventSummary(qmp.takeEvents());
  return { completeEvents, cancelEvents, driveEvents, errors, leftover };
}

async function images(dir: string) {
  await qemuImg(['create', '-f', 'qcow2', `${dir}/src.qcow2`, String(SIZE)]);
  await qemuIo(
    ['-f', 'qcow2', `${dir}/src.qcow2`],
    ['write -P 0x11 0 1M', 'write -P 0x12 3M 64k', 'write -z 5M 1M'],
  );
  await qemuImg(['create', '-f', 'qcow2', `${dir}/tgt.qcow2`, String(SIZE)]);
  await qemuImg(['create', '-f', 'raw', `${dir}/peer.raw`, String(SIZE)]);
}

/** The NBD peer: a daemon exporting peer.raw as 'parent0' (same command line for both kinds). */
function peerArgs(dir: string): string[] {
  return [
    '--blockdev',
    `driver=file,filename=${dir}/peer.raw,node-name=p0`,
    '--nbd-server',
    `addr.type=unix,addr.path=${dir}/peer.sock`,
    '--export',
    'type=nbd,id=e,node-name=p0,name=parent0,writable=on',
  ];
}

describe.runIf(hasPeer('qemu-storage-daemon'))('mirror: qemu-storage-daemon 7.2 vs blockrepd', () => {
  it('same job states, events, errors and images', async () => {
    const dq = makeTempDir();
    const db = makeTempDir();
    await images(dq.path);
    for (const f of ['src.qcow2', 'tgt.qcow2', 'peer.raw']) copyFileSync(dq.file(f), db.file(f));

    const qsdPeer = await startQsd(dq.file('peer-qmp.sock'), peerArgs(dq.path));
    const qsd = await startQsd(dq.file('qmp.sock'));
    const theirs = await session(qsd.qmp, dq.path, dq.file('peer.sock'));
    await qsd.stop();
    await qsdPeer.stop();

    const peer = await startDaemon(db.file('peer-qmp.sock'), peerArgs(db.path));
    const ours = await startDaemon(db.file('qmp.sock'));
    const mine = await session(ours.qmp, db.path, db.file('peer.sock'));
    expect(await ours.stop()).toBe(0);
    expect(await peer.stop()).toBe(0);

    expect(mine.errors).toEqual(theirs.errors);
    expect(mine.completeEvents).toEqual(theirs.completeEvents);
    expect(mine.cancelEvents).toEqual(theirs.cancelEvents);
    expect(mine.driveEvents).toEqual(theirs.driveEvents);
    expect(mine.leftover).toEqual(theirs.leftover);
    for (const f of ['src.qcow2', 'tgt.qcow2']) {
      expect((await qemuImg(['check', db.file(f)])).stdout).toContain('No errors were found');
      expect(await qemuImgCompare(db.file(f), dq.file(f)), f).toBe('Images are identical.');
    }
    expect(await qemuImgCompare(db.file('peer.raw'), dq.file('peer.raw'), { a: 'raw', b: 'raw' })).toBe(
      'Images are identical.',
    );
    // The peer holds what tgt holds: the source after the guest's writes, and the write after the pivot.
    expect(await qemuImgCompare(db.file('tgt.qcow2'), db.file('peer.raw'), { b: 'raw' })).toBe(
      'Images are identical.',
    );
  });
});

describe.runIf(hasPeer('qemu-io'))('mirror with a bitmap (blockrepd)', () => {
  it('resyncs only the dirty bytes into another daemon export, then the bitmap is clean', async () => {
    const dir = makeTempDir();
    await qemuImg(['create', '-f', 'qcow2', dir.file('src.qcow2'), String(SIZE)]);
    await qemuIo(['-f', 'qcow2', dir.file('src.qcow2')], ['write -P 0x11 0 8M']);
    await qemuImg(['create', '-f', 'qcow2', dir.file('peer.qcow2'), String(SIZE)]);
    const peer = await startDaemon(dir.file('peer-qmp.sock'), [
      '--blockdev',
      `driver=qcow2,file.driver=file,file.filename=${dir.file('peer.qcow2')},node-name=p0`,
      '--nbd-server',
      `addr.type=unix,addr.path=${dir.file('peer.sock')}`,
      '--export',
      'type=nbd,id=e,node-name=p0,name=parent0,writable=on',
    ]);
    const d = await startDaemon(dir.file('qmp.sock'));
    await d.qmp.execute('blockdev-add', qcow2('src', dir.file('src.qcow2')));
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'missed' });
    await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: dir.file('g.sock') } } });
    await d.qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'g',
      'node-name': 'src',
      name: 'src',
      writable: true,
    });
    // What the peer misses: 64 KiB, 1 MiB and 4 KiB (a whole 64 KiB granule) at three places.
    await qemuIo(
      ['-f', 'raw', `nbd+unix:///src?socket=${dir.file('g.sock')}`],
      ['write -P 0x21 64k 64k', 'write -P 0x22 2M 1M', 'write -P 0x23 7M 4k'],
    );
    const dirty = 64 * 1024 + (1 << 20) + 64 * 1024;
    await d.qmp.execute('drive-mirror', {
      'job-id': 'resync',
      device: 'src',
      target: `nbd+unix:///parent0?socket=${dir.file('peer.sock')}`,
      mode: 'existing',
      format: 'raw',
      sync: 'full',
      bitmap: 'missed',
    });
    const ready = await d.qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === 'resync', 60_000);
    expect(ready.data?.len).toBe(dirty);
    await d.qmp.execute('block-job-cancel', { device: 'resync' });
    await d.qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data?.device === 'resync', 60_000);
    // The working bitmap is clean: the peer lacks nothing now.
    const nodes = await d.qmp.execute<
      { 'node-name': string; 'dirty-bitmaps'?: { name: string; count: number }[] }[]
    >('query-named-block-nodes', { flat: true });
    const bm = nodes
      .find((n) => n['node-name'] === 'src')
      ?.['dirty-bitmaps']?.find((b) => b.name === 'missed');
    expect(bm?.count).toBe(0);
    expect(await d.stop()).toBe(0);
    expect(await peer.stop()).toBe(0);
    // The peer's image holds exactly the dirty bytes, nothing else was written to it.
    const map = (await qemuImg(['map', '--output=json', dir.file('peer.qcow2')])).stdout;
    const written = (JSON.parse(map) as { length: number; data: boolean }[])
      .filter((e) => e.data)
      .reduce((n, e) => n + e.length, 0);
    expect(written).toBe(dirty);
  });
});
