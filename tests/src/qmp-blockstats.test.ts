/**
 * query-blockstats, blockrepd beside qemu-storage-daemon 7.2: the same nodes, written through an
 * NBD export by qemu-io, report the same statistics.
 */
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

async function stats(qmp: QmpClient, image: string, sock: string): Promise<unknown[]> {
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'f0', filename: image, discard: 'unmap' });
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: 'f0', discard: 'unmap' });
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'disk', writable: true });
  await qemuIo(
    ['-f', 'raw', `nbd+unix:///disk?socket=${sock}`],
    ['write -P 1 0 64k', 'write -P 2 1M 128k', 'read 0 4k', 'discard 1M 128k', 'flush'],
  );
  const out = [
    await qmp.execute('query-blockstats'),
    await qmp.execute('query-blockstats', { 'query-nodes': true }),
  ];
  await qmp.execute('block-export-del', { id: 'e0' });
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon', 'qemu-io'))(
  'query-blockstats, against qemu-storage-daemon',
  () => {
    it('the same answer with and without query-nodes after writes, reads and discards over NBD', async () => {
      const dir = makeTempDir();
      for (const f of ['q.qcow2', 'b.qcow2'])
        await qemuImg(['create', '-q', '-f', 'qcow2', dir.file(f), '16M']);
      const qsd = await startQsd(dir.file('qsd.sock'));
      const theirs = await stats(qsd.qmp, dir.file('q.qcow2'), dir.file('q.nbd'));
      await qsd.stop();
      const ours = await startDaemon(dir.file('ours.sock'));
      const mine = await stats(ours.qmp, dir.file('b.qcow2'), dir.file('b.nbd'));
      expect(await ours.stop()).toBe(0);
      expect(mine).toEqual(theirs);
      // Something was counted (the highest written offsets, the file's discards).
      expect(JSON.stringify(mine)).toMatch(/"wr_highest_offset":[1-9]/);
    });
  },
);
