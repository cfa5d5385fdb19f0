import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { makeTempDir, runPeer, waitForPidFile } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { sparse } from '../src/drivers/file/sparse';
import { BlockBackend, BlockError, createGraph, Perm } from '../src/index';

/*
 * Image locking with QEMU's lock bytes: QEMU's tools and blockrep refuse to write an image the
 * other is using, and to open one for consistent reads while the other writes it.
 */

const RW = Perm.CONSISTENT_READ | Perm.WRITE;
const children: ChildProcess[] = [];

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
});

function image(): string {
  const f = makeTempDir().file('locked.img');
  writeFileSync(f, Buffer.alloc(1 << 20));
  return f;
}

async function writer(f: string, extra: Record<string, unknown> = {}) {
  const g = createGraph();
  const node = await g.open({ driver: 'raw', file: { driver: 'file', filename: f, ...extra } });
  const blk = new BlockBackend(g, { perm: RW, shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED });
  blk.attach(node);
  return { g, node, blk };
}

/** qemu-nbd serving the image writable on a Unix socket: QEMU holding it open for writing. */
async function qemuNbdHolding(f: string): Promise<void> {
  const sock = `${f}.sock`;
  const child = spawn('qemu-nbd', ['-f', 'raw', '-k', sock, '--pid-file', `${f}.pid`, f], {
    stdio: 'ignore',
  });
  children.push(child);
  await waitForPidFile(`${f}.pid`, child);
  expect(existsSync(sock)).toBe(true);
}

describe.runIf(sparse.locking)('image locking', () => {
  it('a writer that does not share write keeps qemu-io from writing, until it is closed', async () => {
    const f = image();
    const { g, blk } = await writer(f);
    await blk.write(0, Buffer.alloc(512, 1));
    const r = await runPeer('qemu-io', ['-f', 'raw', '-c', 'write 0 512', f], { okCodes: [1] });
    expect(r.stderr).toContain('Failed to get "write" lock');
    expect(r.stderr).toContain('Is another process using the image');
    // Reading stays possible: raw does not mind others writing under it.
    expect((await runPeer('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 1 0 512', f])).stdout).toContain(
      'read 512/512',
    );
    await blk.detach();
    await g.closeAll();
    expect((await runPeer('qemu-io', ['-f', 'raw', '-c', 'write 0 512', f])).stdout).toContain(
      'wrote 512/512',
    );
  });

  it('refuses not to share write while QEMU writes, naming the lock; sharing like QEMU works', async () => {
    const f = image();
    await qemuNbdHolding(f);
    const g = createGraph();
    const node = await g.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    const exclusive = new BlockBackend(g, { perm: RW, shared: Perm.CONSISTENT_READ });
    let err: unknown;
    try {
      exclusive.attach(node);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BlockError);
    expect((err as BlockError).message).toBe('Failed to get shared "write" lock');
    expect((err as BlockError).hint).toBe(`Is another process using the image [${f}]?`);
    // qemu-nbd shares write (not resize): a writer sharing the same may join it.
    const sharing = new BlockBackend(g, { perm: RW });
    sharing.attach(node);
    await sharing.write(4096, Buffer.alloc(512, 3));
    const grow = new BlockBackend(g, { perm: Perm.RESIZE });
    expect(() => grow.attach(node)).toThrow('Failed to get "resize" lock');
    await g.closeAll();
  });

  it('two nodes on one file conflict within one process too; a failed change keeps the old locks', async () => {
    const f = image();
    const a = await writer(f);
    const g2 = createGraph();
    const n2 = await g2.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    const b2 = new BlockBackend(g2, { perm: RW });
    expect(() => b2.attach(n2)).toThrow('Failed to get "write" lock');
    // The refused attach released nothing of a's: QEMU still cannot write.
    const q = await runPeer('qemu-io', ['-f', 'raw', '-c', 'write 0 512', f], { okCodes: [1] });
    expect(q.stderr).toContain('lock');
    // The first writer drops write (keeps reading): the second may now write.
    a.blk.setPerm(Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED);
    b2.attach(n2);
    await b2.write(0, Buffer.alloc(512, 2));
    await g2.closeAll();
    await a.g.closeAll();
  });

  it('locking=off takes no locks', async () => {
    const f = image();
    const { g } = await writer(f, { locking: 'off' });
    expect((await runPeer('qemu-io', ['-f', 'raw', '-c', 'write 0 512', f])).stdout).toContain(
      'wrote 512/512',
    );
    await g.closeAll();
  });
});
