/**
 * QEMU's COLO procedure (docs/COLO-FT.txt) after a failover, between blockrepd processes: a new
 * secondary is started, the surviving side mirrors its disk into the new secondary's export with
 * drive-mirror (mode existing, format raw, sync full), cancels the job once READY (the target is
 * then a consistent copy), adds the replication child again, and the pair protects the guest
 * once more: checkpoints and a second failover work. Both directions: the primary dies
 * ("Secondary resume replication") and the secondary dies ("Primary resume replication").
 *
 * Each host: disk.qcow2 as node parent0 (exported as 'parent0' for the peer's NBD client) and the
 * guest disk colo-disk, a quorum exported as 'guest'. On a primary the quorum has parent0 and the
 * replication child (mode primary, NBD to the peer's parent0); on a secondary it has childs0:
 * replication (mode secondary) -> active -> hidden -> parent0.
 */
import { coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from '@blockrep/replication';
import { hasPeer, makeTempDir, qemuImg, qemuImgCompare, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { type Daemon, killAll, startDaemon } from '../daemon';

const SIZE = 16 << 20;
afterEach(() => killAll());

interface Host {
  name: string;
  d: Daemon;
  nbd: string;
  file(n: string): string;
}

const uri = (sock: string, name: string) => `nbd+unix:///${name}?socket=${sock}`;

async function io(sock: string, name: string, cmds: string[]) {
  const r = await qemuIo(['-f', 'raw', uri(sock, name)], cmds);
  expect(r.stdout, r.stdout).not.toMatch(/fail|error|mismatch/i);
}

/** A host with its own files, its disk node and NBD server; no role yet. */
async function host(name: string): Promise<Host> {
  const dir = makeTempDir();
  const file = (n: string) => dir.file(n);
  for (const f of ['disk.qcow2', 'active.qcow2', 'hidden.qcow2'])
    await qemuImg(['create', '-f', 'qcow2', file(f), String(SIZE)]);
  const d = await startDaemon(file('qmp.sock'));
  const nbd = file('nbd.sock');
  await d.qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'parent0',
    file: { driver: 'file', filename: file('disk.qcow2') },
  });
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  return { name, d, nbd, file };
}

/** The guest's view: the quorum colo-disk exported as 'guest'. */
async function exportGuest(h: Host) {
  await h.d.qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e-guest',
    'node-name': 'colo-disk',
    name: 'guest',
    writable: true,
  });
}

/** The secondary's nodes and exports (COLO-FT step 3), replication not yet started. */
async function prepareSecondary(h: Host) {
  await h.d.qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e-parent0',
    'node-name': 'parent0',
    name: 'parent0',
    writable: true,
  });
  await h.d.qmp.execute(
    'blockdev-add',
    coloSecondaryOptions({
      nodeName: 'childs0',
      activeFile: h.file('active.qcow2'),
      hiddenFile: h.file('hidden.qcow2'),
      secondaryDisk: 'parent0',
      topId: 'colo-disk',
    }),
  );
  await h.d.qmp.execute('blockdev-add', coloQuorumOptions({ nodeName: 'colo-disk', localDisk: 'childs0' }));
  await exportGuest(h);
}

async function startSecondary(h: Host) {
  await h.d.qmp.execute('xen-set-replication', { enable: true, primary: false });
}

/** A primary's quorum over its own disk (the first primary of a pair). */
async function preparePrimary(h: Host) {
  await h.d.qmp.execute('blockdev-add', coloQuorumOptions({ nodeName: 'colo-disk', localDisk: 'parent0' }));
  await exportGuest(h);
}

/** Adds the replication child towards the secondary's disk and starts replication. */
async function protect(pri: Host, sec: Host) {
  await pri.d.qmp.execute(
    'blockdev-add',
    coloPrimaryChildOptions({
      nodeName: 'replication0',
      server: { type: 'unix', path: sec.nbd },
      exportName: 'parent0',
    }),
  );
  await pri.d.qmp.execute('x-blockdev-change', { parent: 'colo-disk', node: 'replication0' });
  await pri.d.qmp.execute('xen-set-replication', { enable: true, primary: true });
}

async function checkpoint(pri: Host, sec: Host) {
  await pri.d.qmp.execute('xen-colo-do-checkpoint');
  await sec.d.qmp.execute('xen-colo-do-checkpoint');
}

/** The surviving side copies its guest disk into the new secondary's disk (COLO's resync). */
async function resync(from: Host, to: Host) {
  await from.d.qmp.execute('drive-mirror', {
    device: 'colo-disk',
    'job-id': 'resync',
    target: uri(to.nbd, 'parent0'),
    mode: 'existing',
    format: 'raw',
    sync: 'full',
  });
  await from.d.qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === 'resync', 60_000);
  await from.d.qmp.execute('block-job-cancel', { device: 'resync' });
  const done = await from.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data?.device === 'resync', 60_000);
  expect(done.data?.error).toBeUndefined();
}

async function waitStage(h: Host, node: string, stage: string) {
  await h.d.qmp.waitEvent(
    'REPLICATION_STAGE_CHANGE',
    (e) => e.data?.['node-name'] === node && e.data?.stage === stage,
    60_000,
  );
}

/** The secondary takes over after the primary died: last checkpoint plus its own writes. */
async function secondaryFailover(sec: Host) {
  await sec.d.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
  await waitStage(sec, 'childs0', 'done');
  // Nobody may write the disk behind the guest's back any more (COLO-FT: nbd-server-stop).
  await sec.d.qmp.execute('block-export-del', { id: 'e-parent0' });
}

/** The primary goes on alone after the secondary died. */
async function primaryFailover(pri: Host) {
  await pri.d.qmp.execute('xen-set-replication', { enable: false, primary: true, failover: true });
  await pri.d.qmp.execute('x-blockdev-change', { parent: 'colo-disk', child: 'children.1' });
  await pri.d.qmp.execute('blockdev-del', { 'node-name': 'replication0' });
}

/** Both sides' disks hold the same bytes. */
async function expectInSync(pri: Host, sec: Host) {
  expect(await qemuImgCompare(uri(pri.nbd, 'guest'), uri(sec.nbd, 'parent0'), { a: 'raw', b: 'raw' })).toBe(
    'Images are identical.',
  );
}

/** Primary a protecting its guest with secondary b; the guest's first 4M (0x11) are checkpointed. */
async function protectedPair(): Promise<{ a: Host; b: Host }> {
  const a = await host('a');
  const b = await host('b');
  await prepareSecondary(b);
  await startSecondary(b);
  await preparePrimary(a);
  await protect(a, b);
  await io(a.nbd, 'guest', ['write -P 0x11 0 4M']);
  await checkpoint(a, b);
  return { a, b };
}

/** A new secondary host on a fresh disk, resynced from the primary, then protecting it. */
async function reprotect(pri: Host, name: string): Promise<Host> {
  const sec = await host(name);
  await prepareSecondary(sec);
  await resync(pri, sec);
  await expectInSync(pri, sec);
  await startSecondary(sec);
  await protect(pri, sec);
  return sec;
}

/** After a clean stop, the host's disk holds exactly these writes (qemu-img check and compare). */
async function expectDiskHolds(h: Host, writes: string[]) {
  expect(await h.d.stop()).toBe(0);
  const want = h.file('expected.raw');
  await qemuImg(['create', '-f', 'raw', want, String(SIZE)]);
  await qemuIo(['-f', 'raw', want], writes);
  expect((await qemuImg(['check', h.file('disk.qcow2')])).stdout).toContain('No errors were found');
  expect(await qemuImgCompare(h.file('disk.qcow2'), want, { a: 'qcow2', b: 'raw' })).toBe(
    'Images are identical.',
  );
}

describe.runIf(hasPeer('qemu-io'))('COLO resume replication with drive-mirror between blockrepd', () => {
  it('the primary dies: the secondary takes over, resyncs a new secondary, and fails over to it later', async () => {
    const { a, b } = await protectedPair();
    await io(a.nbd, 'guest', ['write -P 0x12 4M 1M']); // lost with the primary
    await io(b.nbd, 'guest', ['write -P 0x21 6M 1M']); // the secondary VM's own

    await a.d.kill();
    await secondaryFailover(b);
    await io(b.nbd, 'guest', ['read -P 0x11 0 4M', 'read -P 0 4M 1M', 'read -P 0x21 6M 1M']);
    // b is the primary now and its guest goes on writing.
    await io(b.nbd, 'guest', ['write -P 0x22 8M 1M']);

    // A new secondary on a fresh disk; b resyncs it, then protects its guest with it.
    const c = await reprotect(b, 'c');
    expect(await b.d.qmp.execute('query-xen-replication-status')).toEqual({ error: false });
    await io(b.nbd, 'guest', ['write -P 0x23 10M 1M']);
    await checkpoint(b, c);
    await expectInSync(b, c);
    await io(b.nbd, 'guest', ['write -P 0x24 12M 1M']); // lost with b
    await io(c.nbd, 'guest', ['write -P 0x31 14M 1M']); // c's own

    // The second failover: c takes over from b.
    await b.d.kill();
    await secondaryFailover(c);
    await io(c.nbd, 'guest', ['read -P 0x23 10M 1M', 'read -P 0 12M 1M', 'read -P 0x31 14M 1M']);
    await expectDiskHolds(c, [
      'write -P 0x11 0 4M',
      'write -P 0x21 6M 1M',
      'write -P 0x22 8M 1M',
      'write -P 0x23 10M 1M',
      'write -P 0x31 14M 1M',
    ]);
  });

  it('the secondary dies: the primary goes on, resyncs a new secondary, which later takes over', async () => {
    const { a, b } = await protectedPair();

    await b.d.kill();
    await io(a.nbd, 'guest', ['write -P 0x12 4M 1M']);
    await primaryFailover(a);
    await io(a.nbd, 'guest', ['write -P 0x13 6M 1M', 'read -P 0x12 4M 1M']);

    const c = await reprotect(a, 'c');
    await io(a.nbd, 'guest', ['write -P 0x14 8M 1M']);
    await checkpoint(a, c);
    await expectInSync(a, c);
    await io(a.nbd, 'guest', ['write -P 0x15 10M 1M']); // lost with a
    await io(c.nbd, 'guest', ['write -P 0x31 12M 1M']); // c's own

    await a.d.kill();
    await secondaryFailover(c);
    await io(c.nbd, 'guest', ['read -P 0x12 4M 1M', 'read -P 0 10M 1M', 'read -P 0x31 12M 1M']);
    await expectDiskHolds(c, [
      'write -P 0x11 0 4M',
      'write -P 0x12 4M 1M',
      'write -P 0x13 6M 1M',
      'write -P 0x14 8M 1M',
      'write -P 0x31 12M 1M',
    ]);
  });
});
