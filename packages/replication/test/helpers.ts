import { BlockBackend, type BlockGraph, createGraph, PERM_ALL, Perm } from '@blockrep/block';
import { filterDrivers } from '@blockrep/filters';
import { JobManager } from '@blockrep/jobs';
import { createQcow2Image, qcow2Driver } from '@blockrep/qcow2';
import { makeTempDir } from '@blockrep/test-kit';
import { expect } from 'vitest';
import { ReplicationManager } from '../src/index';

export const IMG_SIZE = 64 * 1024 * 1024;

export interface Env {
  graph: BlockGraph;
  jobs: JobManager;
  repl: ReplicationManager;
  events: [string, Record<string, unknown>][];
  dir: ReturnType<typeof makeTempDir>;
}

export function makeEnv(): Env {
  const jobs = new JobManager();
  const repl = new ReplicationManager(jobs);
  const graph = createGraph([qcow2Driver, ...filterDrivers, repl.driver]);
  const events: [string, Record<string, unknown>][] = [];
  graph.onEvent((n, d) => events.push([n, d]));
  return { graph, jobs, repl, events, dir: makeTempDir() };
}

/** A named BlockBackend on a node (QEMU's monitor_add_blk). */
export function namedBackend(
  graph: BlockGraph,
  name: string,
  node: string | ReturnType<BlockGraph['findNode']>,
) {
  const blk = new BlockBackend(graph, { name, perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: PERM_ALL });
  blk.attach(typeof node === 'string' ? graph.findNode(node) : node);
  return blk;
}

/** The primary of test-replication.c: replication(primary) over a qcow2 local disk. */
export async function startPrimary(env: Env) {
  const disk = env.dir.file('p_local_disk.qcow2');
  await createQcow2Image(disk, { size: IMG_SIZE });
  const node = await env.graph.open(
    `driver=replication,mode=primary,node-name=xxx,file.driver=qcow2,file.file.filename=${disk},file.file.locking=off`,
  );
  return namedBackend(env.graph, 'primary-id', node);
}

/**
 * The secondary of test-replication.c: the local disk (qcow2, filled with 0x11, its own named
 * BlockBackend) below hidden and active disks, with replication(secondary) on top.
 */
export async function startSecondary(env: Env, opts: { topId?: string } = {}) {
  const local = env.dir.file('s_local_disk.qcow2');
  const active = env.dir.file('s_active_disk.qcow2');
  const hidden = env.dir.file('s_hidden_disk.qcow2');
  for (const f of [local, active, hidden]) await createQcow2Image(f, { size: IMG_SIZE });
  const localNode = await env.graph.open(`file.filename=${local},driver=qcow2,file.locking=off`);
  const localBlk = namedBackend(env.graph, 'secondary-local-disk-id', localNode);
  await writePattern(localBlk, 0x11, 0, IMG_SIZE);
  const top = await env.graph.open(
    `driver=replication,mode=secondary,top-id=${opts.topId ?? 'secondary-id'},` +
      `file.driver=qcow2,file.file.filename=${active},file.file.locking=off,` +
      `file.backing.driver=qcow2,file.backing.file.filename=${hidden},file.backing.file.locking=off,` +
      'file.backing.backing=secondary-local-disk-id',
  );
  const topBlk = namedBackend(env.graph, 'secondary-id', top);
  return { topBlk, localBlk };
}

export async function writePattern(blk: BlockBackend, pattern: number, offset: number, count: number) {
  await blk.write(offset, Buffer.alloc(count, pattern));
}

/** Reads [offset, offset+count) and checks every byte of [offset+po, +pc) is the pattern. */
export async function expectPattern(
  blk: BlockBackend,
  pattern: number,
  po: number,
  pc: number,
  offset: number,
  count: number,
) {
  const buf = await blk.read(offset, count);
  const part = buf.subarray(po, po + pc);
  const bad = part.findIndex((b) => b !== pattern);
  expect(
    bad,
    `byte ${offset + po + bad} is 0x${part[bad]?.toString(16)}, expected 0x${pattern.toString(16)}`,
  ).toBe(-1);
}

export async function expectFails(p: Promise<unknown>) {
  let failed = false;
  try {
    await p;
  } catch {
    failed = true;
  }
  expect(failed).toBe(true);
}
