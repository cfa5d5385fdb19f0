/**
 * QUORUM_REPORT_BAD as a user sees it, blockrepd beside qemu-storage-daemon 7.2: a quorum of a
 * local image and an NBD child whose server has died, exported over NBD; the same reads, writes
 * and flushes through the export give the same events (type and child, in order).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import type { QmpClient, QmpEvent } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuIo, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

async function run(qmp: QmpClient, dir: string, tag: string): Promise<string[]> {
  const local = `${dir}/${tag}-local.raw`;
  const remote = `${dir}/${tag}-remote.raw`;
  await qemuImg(['create', '-q', '-f', 'raw', local, '4M']);
  await qemuImg(['create', '-q', '-f', 'raw', remote, '4M']);
  const nbdSock = `${dir}/${tag}-remote.sock`;
  const server: ChildProcess = spawn('qemu-nbd', ['-f', 'raw', '-k', nbdSock, '--persistent', remote], {
    stdio: 'ignore',
  });
  try {
    await waitFor(
      async () =>
        (await qemuIo(['-f', 'raw', `nbd+unix:///?socket=${nbdSock}`], ['read 0 512'], { okCodes: [0, 1] }))
          .code === 0,
      {
        what: 'qemu-nbd serving',
      },
    );
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': 'local',
      file: { driver: 'file', filename: local },
    });
    await qmp.execute('blockdev-add', {
      driver: 'nbd',
      'node-name': 'remote',
      server: { type: 'unix', path: nbdSock },
    });
    await qmp.execute('blockdev-add', {
      driver: 'quorum',
      'node-name': 'q',
      children: ['local', 'remote'],
      'vote-threshold': 1,
      'read-pattern': 'fifo',
    });
    const sock = `${dir}/${tag}-export.sock`;
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'q', writable: true });
    server.kill('SIGKILL');
    await new Promise((r) => server.once('exit', r));
    const events: QmpEvent[] = [];
    qmp.on('event', (e: QmpEvent) => {
      if (e.event === 'QUORUM_REPORT_BAD') events.push(e);
    });
    const uri = `nbd+unix:///q?socket=${sock}`;
    for (const c of ['read 0 4k', 'read 64k 4k', 'write -P 1 0 4k', 'flush', 'read 1M 512k']) {
      await qemuIo(['-f', 'raw', uri], [c]);
    }
    // Rate-limited as QEMU limits them: the first at once, the last of the burst a second later.
    // (On a slow machine the burst may span more windows: it still ends with qemu-io's last flush.)
    const last = () => (events[events.length - 1]?.data as { type?: string } | undefined)?.type;
    await waitFor(() => events.length >= 2 && last() === 'flush', {
      what: 'the held-back QUORUM_REPORT_BAD',
      timeoutMs: 20_000,
    });
    await qmp.execute('block-export-del', { id: 'e' });
    return events.map(
      (e) => `${(e.data as { type: string }).type} ${(e.data as { 'node-name': string })['node-name']}`,
    );
  } finally {
    server.kill('SIGKILL');
  }
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-nbd', 'qemu-io'))(
  'QUORUM_REPORT_BAD, against qemu-storage-daemon',
  () => {
    it('a dead NBD child: the same events for small and large reads, writes and flushes (rate-limited as QEMU)', async () => {
      const dir = makeTempDir();
      const qsd = await startQsd(`${dir.path}/qsd.sock`);
      const theirs = await run(qsd.qmp, dir.path, 'q');
      await qsd.stop();
      const ours = await startDaemon(`${dir.path}/ours.sock`);
      const mine = await run(ours.qmp, dir.path, 'b');
      expect(await ours.stop()).toBe(0);
      // The first read's at once, then the last of the burst (qemu-io's flush at exit) when the
      // window ends; the dozen events between are held back and dropped, as QEMU drops them.
      expect(theirs[0]).toBe('read remote');
      expect(theirs[theirs.length - 1]).toBe('flush remote');
      expect([mine[0], mine[mine.length - 1]]).toEqual([theirs[0], theirs[theirs.length - 1]]);
      expect(mine.length).toBeLessThanOrEqual(4);
    });
  },
);
