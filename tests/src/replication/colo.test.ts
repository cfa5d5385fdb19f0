/**
 * COLO block replication black-box: two blockrepd processes configured over QMP, I/O by qemu-io
 * through NBD exports, checkpoints and a failover, final images checked with qemu-img compare.
 *
 *   primary:   export "guest" -> quorum(fifo, threshold 1) -> [pri-disk, replication(primary) -> nbd -> secondary's "sec-disk"]
 *   secondary: export "sec-disk" -> secondary disk;  export "sec-view" -> replication(secondary) -> active -> hidden -> secondary disk
 */
import { coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from '@blockrep/replication';
import { hasPeer, makeTempDir, qemuImg, qemuImgCompare, qemuIo, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { type Daemon, killAll, startDaemon } from '../daemon';

const SIZE = 16 << 20;

afterEach(() => killAll());

async function secondary(dir: ReturnType<typeof makeTempDir>): Promise<{ d: Daemon; nbd: string }> {
  const nbd = dir.file('sec-nbd.sock');
  for (const f of ['sec-disk.qcow2', 'active.qcow2', 'hidden.qcow2'])
    await qemuImg(['create', '-f', 'qcow2', dir.file(f), String(SIZE)]);
  const d = await startDaemon(dir.file('sec-qmp.sock'));
  await d.qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'sec-disk',
    file: { driver: 'file', filename: dir.file('sec-disk.qcow2') },
  });
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  await d.qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e-sec',
    'node-name': 'sec-disk',
    writable: true,
  });
  await d.qmp.execute(
    'blockdev-add',
    coloSecondaryOptions({
      nodeName: 'sec-repl',
      activeFile: dir.file('active.qcow2'),
      hiddenFile: dir.file('hidden.qcow2'),
      secondaryDisk: 'sec-disk',
    }),
  );
  await d.qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e-view',
    'node-name': 'sec-repl',
    name: 'sec-view',
    writable: true,
  });
  await d.qmp.execute('xen-set-replication', { enable: true, primary: false });
  return { d, nbd };
}

async function primary(
  dir: ReturnType<typeof makeTempDir>,
  secNbd: string,
): Promise<{ d: Daemon; nbd: string }> {
  const nbd = dir.file('pri-nbd.sock');
  await qemuImg(['create', '-f', 'qcow2', dir.file('pri-disk.qcow2'), String(SIZE)]);
  const d = await startDaemon(dir.file('pri-qmp.sock'));
  await d.qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'pri-disk',
    file: { driver: 'file', filename: dir.file('pri-disk.qcow2') },
  });
  await d.qmp.execute('blockdev-add', coloQuorumOptions({ nodeName: 'colo-disk', localDisk: 'pri-disk' }));
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  await d.qmp.execute('block-export-add', {
    type: 'nbd',
    id: 'e-guest',
    'node-name': 'colo-disk',
    name: 'guest',
    writable: true,
  });
  await d.qmp.execute(
    'blockdev-add',
    coloPrimaryChildOptions({
      nodeName: 'pri-repl',
      server: { type: 'unix', path: secNbd },
      exportName: 'sec-disk',
    }),
  );
  await d.qmp.execute('x-blockdev-change', { parent: 'colo-disk', node: 'pri-repl' });
  await d.qmp.execute('xen-set-replication', { enable: true, primary: true });
  return { d, nbd };
}

const uri = (sock: string, name: string) => `nbd+unix:///${name}?socket=${sock}`;

async function io(sock: string, name: string, cmds: string[]) {
  const r = await qemuIo(['-f', 'raw', uri(sock, name)], cmds);
  expect(r.stdout, r.stdout).not.toMatch(/fail|error|mismatch/i);
}

describe.runIf(hasPeer('qemu-io'))('COLO block replication between two blockrepd', () => {
  it('forwards primary writes, keeps the secondary view checkpoint-consistent, fails over to last checkpoint + own writes', async () => {
    const dir = makeTempDir();
    const sec = await secondary(dir);
    const pri = await primary(dir, sec.nbd);
    expect(await pri.d.qmp.execute('query-replication')).toEqual([
      { 'node-name': 'pri-repl', mode: 'primary', stage: 'running' },
    ]);

    // Epoch 1: the primary guest writes; both disks get it, the secondary view does not yet.
    await io(pri.nbd, 'guest', ['write -P 0x11 0 4M', 'write -P 0x12 8M 1M', 'flush']);
    expect(
      await qemuImgCompare(uri(pri.nbd, 'guest'), uri(sec.nbd, 'sec-disk'), { a: 'raw', b: 'raw' }),
    ).toBe('Images are identical.');
    await io(sec.nbd, 'sec-view', ['read -P 0 0 4M']);
    // The secondary VM writes into its active disk only.
    await io(sec.nbd, 'sec-view', ['write -P 0x21 2M 1M', 'read -P 0x21 2M 1M']);
    await io(sec.nbd, 'sec-disk', ['read -P 0x11 2M 1M']);

    // Checkpoint: both sides agree again; the secondary VM's own writes are gone.
    await pri.d.qmp.execute('xen-colo-do-checkpoint');
    await sec.d.qmp.execute('xen-colo-do-checkpoint');
    await io(sec.nbd, 'sec-view', ['read -P 0x11 0 4M', 'read -P 0x12 8M 1M']);

    // Epoch 2: primary writes (to be lost at failover) and secondary VM writes (to be kept).
    await io(pri.nbd, 'guest', ['write -P 0x13 1M 1M', 'flush']);
    await io(sec.nbd, 'sec-disk', ['read -P 0x13 1M 1M']);
    await io(sec.nbd, 'sec-view', ['read -P 0x11 1M 1M', 'write -P 0x22 12M 1M']);
    expect((await pri.d.qmp.execute('query-xen-replication-status')).error).toBe(false);

    // The primary host dies; the secondary fails over.
    await pri.d.kill();
    await sec.d.qmp.execute('xen-set-replication', { enable: false, primary: false, failover: true });
    await waitFor(
      async () =>
        (await sec.d.qmp.execute<{ stage: string }[]>('query-replication'))[0]!.stage !== 'failover',
      { intervalMs: 25, what: 'the failover done' },
    ).catch(() => {});
    expect(await sec.d.qmp.execute('query-replication')).toEqual([
      { 'node-name': 'sec-repl', mode: 'secondary', stage: 'done' },
    ]);
    await io(sec.nbd, 'sec-view', ['read -P 0x11 0 1M', 'read -P 0x11 1M 1M', 'read -P 0x22 12M 1M']);
    expect(await sec.d.stop()).toBe(0);

    // The secondary disk holds the last checkpoint plus the secondary VM's own writes.
    const expected = dir.file('expected.raw');
    await qemuImg(['create', '-f', 'raw', expected, String(SIZE)]);
    await qemuIo(
      ['-f', 'raw', expected],
      ['write -P 0x11 0 4M', 'write -P 0x12 8M 1M', 'write -P 0x22 12M 1M'],
    );
    expect((await qemuImg(['check', dir.file('sec-disk.qcow2')])).stdout).toContain('No errors were found');
    expect(await qemuImgCompare(dir.file('sec-disk.qcow2'), expected, { a: 'qcow2', b: 'raw' })).toBe(
      'Images are identical.',
    );
  });

  it('the primary keeps serving its guest when the secondary goes away, and reports the error', async () => {
    const dir = makeTempDir();
    const sec = await secondary(dir);
    const pri = await primary(dir, sec.nbd);
    await io(pri.nbd, 'guest', ['write -P 0x31 0 1M']);
    await sec.d.kill();
    await io(pri.nbd, 'guest', ['write -P 0x32 1M 1M', 'flush', 'read -P 0x32 1M 1M']);
    expect(await pri.d.qmp.execute('query-xen-replication-status')).toEqual({
      error: true,
      desc: 'I/O error occurred',
    });
    const [s] = await pri.d.qmp.execute<{ error?: string }[]>('query-replication');
    expect(s!.error).toBeDefined();
    // Failover on the primary: the replication child goes, the guest keeps its disk.
    await pri.d.qmp.execute('xen-set-replication', { enable: false, primary: true, failover: true });
    await pri.d.qmp.execute('x-blockdev-change', { parent: 'colo-disk', child: 'children.1' });
    await io(pri.nbd, 'guest', ['write -P 0x33 2M 1M', 'read -P 0x31 0 1M']);
    expect(await pri.d.stop()).toBe(0);
    const cmp = await qemuImg(['check', dir.file('pri-disk.qcow2')]);
    expect(cmp.stdout).toContain('No errors were found');
  });
});
