/**
 * Fault cases of the secondary: a failing backup target (hidden disk), a failing make_empty at a
 * checkpoint, and a failing failover commit with the failover-failed write path after it. Errors
 * are injected with blkdebug rules armed once replication runs.
 */
import { createQcow2Image } from '@blockrep/qcow2';
import { afterEach, describe, expect, it } from 'vitest';
import { type Env, expectPattern, IMG_SIZE, makeEnv, namedBackend, writePattern } from './helpers';

let env: Env;
afterEach(async () => {
  await env.graph.closeAll();
});

const SIZE = IMG_SIZE / 4;

/** The test-replication.c secondary, with a blkdebug node named dbg under one of the disks. */
async function secondaryWithDebug(where: 'local' | 'active' | 'hidden') {
  env = makeEnv();
  const paths = {
    local: env.dir.file('local.qcow2'),
    active: env.dir.file('active.qcow2'),
    hidden: env.dir.file('hidden.qcow2'),
  };
  for (const f of Object.values(paths)) await createQcow2Image(f, { size: SIZE });
  const fileOf = (k: 'local' | 'active' | 'hidden') =>
    k === where
      ? { driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'file', filename: paths[k] } }
      : { driver: 'file', filename: paths[k] };
  const local = await env.graph.open({ driver: 'qcow2', 'node-name': 'local', file: fileOf('local') });
  const localBlk = namedBackend(env.graph, 'local-id', local);
  await writePattern(localBlk, 0x11, 0, SIZE);
  const top = await env.graph.open({
    driver: 'replication',
    'node-name': 'repl',
    mode: 'secondary',
    'top-id': 'top-id',
    file: {
      driver: 'qcow2',
      'node-name': 'active',
      file: fileOf('active'),
      backing: { driver: 'qcow2', 'node-name': 'hidden', file: fileOf('hidden'), backing: 'local-id' },
    },
  });
  const topBlk = namedBackend(env.graph, 'top-id', top);
  await env.repl.startAll('secondary');
  /** Arms a write error on dbg from now on (once: only the next write fails). */
  const failWrites = (once: boolean) => {
    const s = env.graph.findNode('dbg').opaque as { inject: unknown[]; active: unknown[] };
    const rule = { event: 'write_aio', iotype: 'write', errno: 5, sector: -1, once, immediately: false };
    s.inject.push(rule);
    s.active = [rule];
  };
  return { localBlk, topBlk, failWrites, state: env.repl.all()[0]! };
}

describe('replication faults', () => {
  it('a failing backup target fails the primary write and records the replication error', async () => {
    const { localBlk, failWrites } = await secondaryWithDebug('hidden');
    failWrites(false);
    await expect(writePattern(localBlk, 0x22, 0, 65536)).rejects.toMatchObject({ errno: 'EIO' });
    expect(() => env.repl.getErrorAll()).toThrow('I/O error occurred');
    expect(env.repl.query()).toEqual([
      { 'node-name': 'repl', mode: 'secondary', stage: 'running', error: 'Input/output error' },
    ]);
    expect(env.events.some(([n]) => n === 'REPLICATION_ERROR')).toBe(true);
    // The secondary disk was not touched: the old data is not lost.
    await expectPattern(localBlk, 0x11, 0, 65536, 0, 65536);
  });

  it('a failing make_empty fails the checkpoint with the error', async () => {
    const { topBlk, failWrites } = await secondaryWithDebug('active');
    await writePattern(topBlk, 0x33, 0, 65536);
    failWrites(false);
    await expect(env.repl.checkpointAll()).rejects.toMatchObject({ errno: 'EIO' });
  });

  it('a failing failover commit ends in failover-failed, and writes then take the failover-failed path', async () => {
    const { topBlk, localBlk, failWrites, state } = await secondaryWithDebug('local');
    // The secondary VM wrote the first 64 KiB (active); the primary the next 64 KiB (hidden keeps the old).
    await writePattern(topBlk, 0x33, 0, 65536);
    await writePattern(localBlk, 0x22, 65536, 65536);
    failWrites(true);
    await env.repl.stopAll(true);
    await env.repl.waitFailover(state);
    expect(state.stage).toBe('failover-failed');
    expect(() => env.repl.getErrorAll()).toThrow('I/O error occurred');
    // Allocated above the secondary disk (active or hidden): the write goes to the active disk.
    await writePattern(topBlk, 0x44, 0, 65536);
    await writePattern(topBlk, 0x45, 65536, 4096);
    // Not allocated above it: straight into the secondary disk.
    await writePattern(topBlk, 0x46, 4 * 65536, 65536);
    await expectPattern(topBlk, 0x44, 0, 65536, 0, 65536);
    await expectPattern(topBlk, 0x45, 0, 4096, 65536, 4096);
    await expectPattern(topBlk, 0x46, 0, 65536, 4 * 65536, 65536);
    await expectPattern(localBlk, 0x46, 0, 65536, 4 * 65536, 65536);
    await expectPattern(localBlk, 0x22, 0, 4096, 65536, 4096);
    // A primary-side start/stop now is refused or ignored as QEMU does.
    await expect(env.repl.startAll('secondary')).rejects.toThrow('Block replication is running or done');
  });

  it('a secondary stopped without failover reports the cancelled backup job, as QEMU does', async () => {
    env = makeEnv();
    const { state } = await (async () => {
      const r = await secondaryWithDebug('active');
      return r;
    })();
    await expect(env.repl.stopAll(false)).rejects.toThrow('Backup job was cancelled unexpectedly');
    expect(state.stage).toBe('done');
    // The error is the caller's to report; the cancel itself raises no event.
    expect(env.events.filter(([n]) => n === 'REPLICATION_ERROR')).toEqual([]);
    await expect(env.repl.stopAll(false)).resolves.toBeUndefined();
  });
});
