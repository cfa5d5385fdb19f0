import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { BlockBackend, type BlockGraph, createGraph, PERM_ALL, Perm } from '@blockrep/block';
import { filterDrivers } from '@blockrep/filters';
import { createQcow2Image, qcow2Driver } from '@blockrep/qcow2';
import { makeTempDir } from '@blockrep/test-kit';
import { type JobEvent, JobManager } from '../src/index';

export const SIZE = 4 << 20;

export function randomData(bytes: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(bytes);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

export function env() {
  const dir = makeTempDir();
  const graph = createGraph([qcow2Driver, ...filterDrivers]);
  const manager = new JobManager();
  const events: JobEvent[] = [];
  manager.on('event', (e: JobEvent) => events.push(e));
  return { dir, graph, manager, events };
}

/** A raw file filled with data, opened as a named raw node. */
export async function rawNode(graph: BlockGraph, path: string, name: string, data?: Buffer) {
  writeFileSync(path, data ?? Buffer.alloc(SIZE));
  return graph.blockdevAdd({ driver: 'raw', 'node-name': name, file: { driver: 'file', filename: path } });
}

export async function qcow2Node(
  graph: BlockGraph,
  path: string,
  name: string,
  backing?: { path: string; node: string; fmt: string },
) {
  await createQcow2Image(path, {
    size: SIZE,
    ...(backing ? { backingFile: backing.path, backingFormat: backing.fmt } : {}),
  });
  return graph.blockdevAdd({
    driver: 'qcow2',
    'node-name': name,
    file: { driver: 'file', filename: path },
    ...(backing ? { backing: backing.node } : {}),
  });
}

/** A writer on a node, as a guest or an export would be. */
export function writer(graph: BlockGraph, node: string) {
  const blk = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: PERM_ALL });
  blk.attach(graph.findNode(node));
  return blk;
}

export async function readAll(graph: BlockGraph, node: string): Promise<Buffer> {
  const blk = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ, shared: PERM_ALL });
  blk.attach(graph.findNode(node));
  const data = await blk.read(0, blk.getLength());
  await blk.detach();
  return data;
}

export function snapshot(path: string, copyTo: string): Buffer {
  copyFileSync(path, copyTo);
  return readFileSync(copyTo);
}

/** Random 4 KiB-aligned writes at random offsets, n of them, all in flight at once. */
export async function randomWrites(blk: BlockBackend, n: number, seed: number): Promise<void> {
  let x = seed;
  const ops: Promise<void>[] = [];
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    const off = (x % (SIZE / 4096)) * 4096;
    ops.push(blk.write(off, Buffer.alloc(4096, (i % 250) + 1)));
  }
  await Promise.all(ops);
}

/** A raw source 's0' full of data (the seed's) and an empty raw target 't0'. */
export async function rawPair(e: ReturnType<typeof env>, seed: number): Promise<void> {
  await rawNode(e.graph, e.dir.file('s.raw'), 's0', randomData(SIZE, seed));
  await rawNode(e.graph, e.dir.file('t.raw'), 't0');
}

/** rawPair, and a blkdebug node 'dbg' over one of them injecting the errors of `rules`. */
export async function blkdebugPair(
  e: ReturnType<typeof env>,
  seed: number,
  over: 's0' | 't0',
  rules: Record<string, unknown>[],
): Promise<void> {
  await rawPair(e, seed);
  await e.graph.blockdevAdd({ driver: 'blkdebug', 'node-name': 'dbg', image: over, 'inject-error': rules });
}

/**
 * blkdebugPair with 'dbg' over the side that fails once at 1 MiB (a read of the source or a write
 * of the target). Returns the nodes a job should use as source and target.
 */
export async function failingPair(e: ReturnType<typeof env>, where: 'source' | 'target') {
  const rule = { event: where === 'source' ? 'read_aio' : 'write_aio', sector: 2048, once: true };
  await blkdebugPair(e, 9, where === 'source' ? 's0' : 't0', [rule]);
  return {
    source: e.graph.findNode(where === 'source' ? 'dbg' : 's0'),
    target: e.graph.findNode(where === 'source' ? 't0' : 'dbg'),
  };
}

/** qcow2 mid (over base.raw, node 'base') and qcow2 top over it. */
export async function overlays({ dir, graph }: ReturnType<typeof env>) {
  await qcow2Node(graph, dir.file('mid.qcow2'), 'mid', {
    path: dir.file('base.raw'),
    node: 'base',
    fmt: 'raw',
  });
  await qcow2Node(graph, dir.file('top.qcow2'), 'top', {
    path: dir.file('mid.qcow2'),
    node: 'mid',
    fmt: 'qcow2',
  });
}

/** raw base (random data of the seed), qcow2 mid over it with two writes, qcow2 top over mid. */
export async function chain3(seed = 11) {
  const e = env();
  const { dir, graph } = e;
  await rawNode(graph, dir.file('base.raw'), 'base', randomData(SIZE, seed));
  await overlays(e);
  const w = writer(graph, 'mid');
  await w.write(0, Buffer.alloc(65536, 0x11));
  await w.write(SIZE - 4096, Buffer.alloc(4096, 0x12));
  await w.detach();
  return e;
}
