/**
 * A disk that fills up under NBD writes: a size-limited tmpfs made by the test (root is needed to
 * mount it; CI runs as root). The client gets ENOSPC, the daemon keeps serving and answering QMP,
 * writes work again once space is freed, and afterwards `qemu-img check` finds no corruption and
 * no more leaked clusters than qemu-storage-daemon leaves on the same run.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { hasPeer, makeTempDir, qemuImg, qemuIo } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { startDaemon } from '../daemon';
import { startQsd } from '../qsd';

const root = process.getuid?.() === 0;
const CI = !!process.env.CI;

async function fillRun(
  kind: 'ours' | 'qsd',
): Promise<{ leaks: number; corruptions: number; stdout: string }> {
  const d = makeTempDir();
  const mnt = d.file('mnt');
  mkdirSync(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', mnt]);
  try {
    const img = `${mnt}/img.qcow2`;
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
    // Room to give back later.
    writeFileSync(`${mnt}/filler`, Buffer.alloc(2 << 20, 1));
    const sock = d.file('nbd.sock');
    const args = [
      '--blockdev',
      `driver=qcow2,node-name=disk,file.driver=file,file.filename=${img}`,
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
    ];
    const daemon =
      kind === 'ours'
        ? await startDaemon(d.file('qmp.sock'), args)
        : await startQsd(d.file('qmp.sock'), args);
    const uri = `nbd+unix:///disk?socket=${sock}`;
    // Four writers at once, each filling its own quarter, until the disk is full.
    const runs = await Promise.all(
      [0, 1, 2, 3].map((w) =>
        qemuIo(
          ['-f', 'raw', uri],
          Array.from({ length: 8 }, (_, i) => `write -P 0x11 ${w * 8 + i}M 1M`),
          { okCodes: [0, 1] },
        ),
      ),
    );
    const full = { stdout: runs.map((r) => r.stdout).join('') };
    // The daemon is still there: it answers QMP and serves what it holds.
    const nodes = await daemon.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', {
      flat: true,
    });
    expect(nodes.some((n) => n['node-name'] === 'disk')).toBe(true);
    await qemuIo(['-f', 'raw', uri], ['read -P 0x11 0 1M']);
    // Space again: writes work again.
    rmSync(`${mnt}/filler`);
    const again = await qemuIo(['-f', 'raw', uri], ['write -P 0x22 40M 512k', 'read -P 0x22 40M 512k']);
    expect(again.stdout).not.toMatch(/failed/);
    await daemon.qmp.execute('quit').catch(() => {});
    await daemon.stop();
    const chk = JSON.parse((await qemuImg(['check', '--output=json', img], { okCodes: [0, 2, 3] })).stdout);
    return { leaks: chk.leaks ?? 0, corruptions: chk.corruptions ?? 0, stdout: full.stdout };
  } finally {
    execFileSync('umount', ['-l', mnt]);
  }
}

describe.runIf((root || CI) && hasPeer('qemu-io') && hasPeer('qemu-storage-daemon'))(
  'a disk that fills up',
  () => {
    it('ENOSPC reaches the client, the daemon goes on, space again means writes again, no leak beyond QEMU', async () => {
      expect(root).toBe(true); // CI runs as root: mounting the small filesystem needs it.
      const theirs = await fillRun('qsd');
      const ours = await fillRun('ours');
      for (const r of [theirs, ours]) expect(r.stdout).toContain('No space left on device');
      expect(ours.corruptions).toBe(0);
      expect(theirs.corruptions).toBe(0);
      expect(ours.leaks).toBeLessThanOrEqual(theirs.leaks);
    });
  },
);
