/**
 * Backup (sync none/full/top) and active commit in blockrepd while qemu-io writes through an NBD
 * export of the same node: the backup target equals the source at job start, bit for bit; after
 * the commit, the base reads as the top did.
 */
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuImgCompare, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';

const SIZE = 16 << 20;
afterEach(() => killAll());

/** Many writes in flight at once from one qemu-io (aio_write), then a flush. */
function guestWrites(pattern: number): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < 48; i++) cmds.push(`aio_write -P ${pattern} ${((i * 7919) % 250) * 65536} 64k`);
  cmds.push('aio_flush');
  return cmds;
}

async function waitStatus(qmp: QmpClient, id: string, status: string) {
  await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.id === id && e.data?.status === status, 60_000);
}

describe.runIf(hasPeer('qemu-io'))('block jobs under concurrent NBD writes', () => {
  for (const sync of ['full', 'top', 'none'] as const) {
    it(`backup sync=${sync}: the target is the source as it was when the job started`, async () => {
      const dir = makeTempDir();
      const src = dir.file('src.qcow2');
      await qemuImg(['create', '-f', 'qcow2', src, String(SIZE)]);
      await qemuIo(['-f', 'qcow2', src], ['write -P 0x11 0 6M', 'write -P 0x12 10M 2M', 'write -z 6M 1M']);
      const expected = dir.file('expected.raw');
      await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', src, expected]);
      const tgt = dir.file('tgt.qcow2');
      if (sync === 'none') await qemuImg(['create', '-f', 'qcow2', '-b', src, '-F', 'qcow2', tgt]);
      else await qemuImg(['create', '-f', 'qcow2', tgt, String(SIZE)]);

      const nbd = dir.file('nbd.sock');
      const d = await startDaemon(dir.file('qmp.sock'));
      await d.qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'src',
        file: { driver: 'file', filename: src },
      });
      await d.qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'tgt',
        file: { driver: 'file', filename: tgt },
        ...(sync === 'none' ? { backing: 'src' } : {}),
      });
      await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
      await d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', writable: true });
      await d.qmp.execute('blockdev-backup', {
        'job-id': 'b',
        device: 'src',
        target: 'tgt',
        sync,
        speed: sync === 'none' ? 0 : 8 << 20,
      });
      const w = await qemuIo(['-f', 'raw', `nbd+unix:///src?socket=${nbd}`], guestWrites(0x77));
      expect(w.stdout).not.toMatch(/fail|error/i);
      if (sync === 'none') await d.qmp.execute('job-cancel', { id: 'b' });
      await waitStatus(d.qmp, 'b', 'null');
      expect(await d.stop()).toBe(0);
      expect((await qemuImg(['check', tgt])).stdout).toContain('No errors were found');
      expect(await qemuImgCompare(tgt, expected, { a: 'qcow2', b: 'raw' })).toBe('Images are identical.');
      // The guest's writes did land in the source.
      const r = await qemuIo(['-f', 'qcow2', src], ['read -P 0x77 0 64k']);
      expect(r.stdout).not.toMatch(/fail|mismatch/i);
    });
  }

  it('active commit converges under writes, and the base then reads as the top did', async () => {
    const dir = makeTempDir();
    const base = dir.file('base.qcow2');
    const top = dir.file('top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', base, String(SIZE)]);
    await qemuIo(['-f', 'qcow2', base], ['write -P 0x21 0 8M']);
    await qemuImg(['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await qemuIo(['-f', 'qcow2', top], ['write -P 0x22 4M 4M']);
    const nbd = dir.file('nbd.sock');
    const d = await startDaemon(dir.file('qmp.sock'));
    await d.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: top },
    });
    await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
    await d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'top', writable: true });
    await d.qmp.execute('block-commit', { 'job-id': 'c', device: 'top' });
    const uri = `nbd+unix:///top?socket=${nbd}`;
    const w = await qemuIo(['-f', 'raw', uri], guestWrites(0x23));
    expect(w.stdout).not.toMatch(/fail|error/i);
    await d.qmp.waitEvent('BLOCK_JOB_READY', (e) => e.data?.device === 'c', 60_000);
    const view = dir.file('view.raw');
    await qemuImg(['convert', '-f', 'raw', '-O', 'raw', uri, view]);
    await d.qmp.execute('job-complete', { id: 'c' });
    await waitStatus(d.qmp, 'c', 'null');
    // The export now sits on the base and still serves the same data.
    expect(await qemuImgCompare(uri, view, { a: 'raw', b: 'raw' })).toBe('Images are identical.');
    expect(await d.stop()).toBe(0);
    expect((await qemuImg(['check', base])).stdout).toContain('No errors were found');
    expect(await qemuImgCompare(base, view, { a: 'qcow2', b: 'raw' })).toBe('Images are identical.');
  });
});
