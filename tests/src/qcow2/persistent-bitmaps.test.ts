/**
 * Persistent dirty bitmaps in qcow2, as QEMU stores them: blockrepd keeps what a guest writes in
 * bitmaps added with `persistent: true`, stores them when it stops, and qemu-storage-daemon 7.2
 * loads them with the same bits (and the other way round); `qemu-img info` lists them, `qemu-img
 * check` finds the image clean, and a daemon killed before storing leaves them in use, which both
 * then treat as inconsistent.
 */
import type { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';
import { startQsd } from '../qsd';

afterEach(() => killAll());

type Kind = 'ours' | 'qsd';

interface BitmapInfo {
  name: string;
  recording: boolean;
  persistent: boolean;
  granularity: number;
  count: number;
  inconsistent?: boolean;
}

async function bitmaps(q: QmpClient): Promise<BitmapInfo[]> {
  const nodes = await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: BitmapInfo[] }[]>(
    'query-named-block-nodes',
    { flat: true },
  );
  const list = nodes.find((n) => n['node-name'] === 'd0')?.['dirty-bitmaps'] ?? [];
  return list
    .map(({ name, recording, persistent, granularity, count, inconsistent }) => ({
      name,
      recording,
      persistent,
      granularity,
      count,
      ...(inconsistent ? { inconsistent } : {}),
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

/** A daemon of one kind with the image as node d0 (and an NBD export of it). */
async function open(kind: Kind, dir: ReturnType<typeof makeTempDir>, img: string) {
  const qmp = dir.file(`${kind}-${Math.random().toString(36).slice(2)}.sock`);
  const d = kind === 'ours' ? await startDaemon(qmp) : await startQsd(qmp);
  await d.qmp.execute('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'd0',
    file: { driver: 'file', filename: img },
  });
  const nbd = dir.file(`${kind}-nbd.sock`);
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  await d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'd0', writable: true });
  const quit = async () => {
    await d.qmp.execute('quit').catch(() => {});
    await d.stop();
  };
  /** The host dies: SIGKILL, nothing stored. */
  const kill = async () => {
    const gone = new Promise((r) => (d.proc.exitCode !== null ? r(null) : d.proc.once('exit', r)));
    d.proc.kill('SIGKILL');
    await gone;
  };
  return { d, uri: `nbd+unix:///d0?socket=${nbd}`, quit, kill };
}

describe.runIf(hasPeer('qemu-io', 'qemu-storage-daemon'))('persistent dirty bitmaps in qcow2', () => {
  for (const [writer, reader] of [
    ['ours', 'qsd'],
    ['qsd', 'ours'],
  ] as const) {
    it(`stored by ${writer === 'ours' ? 'blockrepd' : 'qemu-storage-daemon'}, loaded by the other with the same bits`, async () => {
      const dir = makeTempDir();
      const img = dir.file('pb.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
      const w = await open(writer, dir, img);
      await w.d.qmp.execute('block-dirty-bitmap-add', { node: 'd0', name: 'b', persistent: true });
      await w.d.qmp.execute('block-dirty-bitmap-add', {
        node: 'd0',
        name: 'c',
        persistent: true,
        granularity: 4096,
      });
      await w.d.qmp.execute('block-dirty-bitmap-add', {
        node: 'd0',
        name: 'd',
        persistent: true,
        disabled: true,
      });
      await qemuIo(['-f', 'raw', w.uri], ['write 1M 100k', 'write 40M 3M', 'write 63M 4k']);
      const written = await bitmaps(w.d.qmp);
      expect(written.find((b) => b.name === 'b')!.count).toBe(128 * 1024 + 3 * 1024 * 1024 + 64 * 1024);
      await w.quit();
      const info = await qemuImg(['info', img]);
      expect(info.stdout).toContain('    bitmaps:\n');
      expect((await qemuImg(['check', img])).stdout).toContain('No errors were found on the image.');
      const r = await open(reader, dir, img);
      expect(await bitmaps(r.d.qmp)).toEqual(written);
      await r.quit();
    });
  }

  it('killed before storing, the bitmaps stay in use on disk and both daemons see them inconsistent', async () => {
    const dir = makeTempDir();
    const img = dir.file('pb.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
    const w = await open('ours', dir, img);
    await w.d.qmp.execute('block-dirty-bitmap-add', { node: 'd0', name: 'b', persistent: true });
    await w.d.qmp.execute('block-dirty-bitmap-add', {
      node: 'd0',
      name: 'd',
      persistent: true,
      disabled: true,
    });
    await w.quit();
    // Open for writing, killed: the bitmaps stay "in use" on disk.
    const k = await open('ours', dir, img);
    await k.kill();
    expect((await qemuImg(['info', img])).stdout).toContain('[0]: in-use');
    for (const kind of ['qsd', 'ours'] as const) {
      const r = await open(kind, dir, img);
      expect((await bitmaps(r.d.qmp)).map((b) => [b.name, b.inconsistent, b.recording])).toEqual([
        ['b', true, false],
        ['d', true, false],
      ]);
      await r.quit();
    }
  });

  it('removing a persistent bitmap removes it from the image; errors as QEMU words them', async () => {
    const dir = makeTempDir();
    const img = dir.file('pb.qcow2');
    const v2 = dir.file('v2.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '64M']);
    const errors: Record<Kind, string[]> = { ours: [], qsd: [] };
    const leaks: Record<Kind, number> = { ours: 0, qsd: 0 };
    for (const kind of ['qsd', 'ours'] as const) {
      await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
      const w = await open(kind, dir, img);
      const q = w.d.qmp;
      await q.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'v2',
        file: { driver: 'file', filename: v2 },
      });
      await q.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0' });
      for (const args of [
        { node: 'v2', name: 'b', persistent: true },
        { node: 'n0', name: 'b', persistent: true },
        { node: 'd0', name: 'x'.repeat(1024), persistent: true },
      ]) {
        errors[kind].push(
          await q.execute('block-dirty-bitmap-add', args).then(
            () => 'ok',
            (e) => e.desc,
          ),
        );
      }
      await q.execute('block-dirty-bitmap-add', { node: 'd0', name: 'gone', persistent: true });
      await q.execute('block-dirty-bitmap-add', { node: 'd0', name: 'kept', persistent: true });
      await w.quit();
      const again = await open(kind, dir, img);
      await again.d.qmp.execute('block-dirty-bitmap-remove', { node: 'd0', name: 'gone' });
      await again.d.qmp.execute('block-dirty-bitmap-remove', { node: 'd0', name: 'kept' });
      // Gone from the image at once, not only when the daemon stops.
      await again.kill();
      expect((await qemuImg(['info', img])).stdout).not.toContain('bitmaps:');
      const chk = JSON.parse((await qemuImg(['check', '--output=json', img], { okCodes: [0, 3] })).stdout);
      leaks[kind] = chk.leaks ?? 0;
    }
    expect(errors.ours).toEqual(errors.qsd);
    // The host died right after the removals: no more leaked than QEMU leaves.
    expect(leaks.ours).toBeLessThanOrEqual(leaks.qsd);
  });
});
