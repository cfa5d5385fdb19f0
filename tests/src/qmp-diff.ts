/**
 * The side-by-side QMP tests' common parts: one script run on qemu-storage-daemon and on
 * blockrepd, each over its own copy of the seed images, with answers and errors recorded in a
 * form that compares (paths and generated node names made alike).
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { makeTempDir, qemuImg, type TempDir } from '@blockrep/test-kit';
import { expect } from 'vitest';
import { startDaemon } from './daemon';
import { startQsd } from './qsd';

/** Paths (the run's directory becomes D) and generated node names differ; nothing else may. */
export function normalise(v: unknown, dir: string): unknown {
  return JSON.parse(
    JSON.stringify(v)
      .split(dir)
      .join('D')
      .replace(/#block\d+/g, '#block'),
  );
}

/**
 * Runs commands and records each answer, or the error (class and text, with the arguments
 * unless `withArgs` is false); resolves with whether the command succeeded.
 */
export function recorder(qmp: QmpClient, dir: string, out: unknown[], withArgs = true) {
  return async (cmd: string, args: Record<string, unknown> = {}): Promise<boolean> => {
    try {
      out.push({ cmd, ok: normalise(await qmp.execute(cmd, args), dir) });
      return true;
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      const err = `${e.errorClass}: ${normalise(e.desc, dir)}`;
      out.push(withArgs ? { cmd, args: normalise(args, dir), err } : { cmd, err });
      return false;
    }
  };
}

/** x-debug-query-block-graph as sorted "type:parent -child-> node" lines. */
export async function graphEdges(qmp: QmpClient, dir: string): Promise<unknown> {
  const graph = (await qmp.execute('x-debug-query-block-graph')) as {
    nodes: { id: number; name: string; type: string }[];
    edges: { parent: number; child: number; name: string }[];
  };
  const node = (id: number) => graph.nodes.find((n) => n.id === id)!;
  return normalise(
    graph.edges
      .map((e) => `${node(e.parent).type}:${node(e.parent).name} -${e.name}-> ${node(e.child).name}`)
      .sort(),
    dir,
  );
}

/** A qcow2 image (of the backing file's size when one is named; its format qcow2). */
export async function qcow2(path: string, size?: string, backing?: string): Promise<void> {
  await qemuImg([
    'create',
    '-q',
    '-f',
    'qcow2',
    ...(backing ? ['-b', backing, '-F', 'qcow2'] : []),
    path,
    ...(size ? [size] : []),
  ]);
}

/**
 * The script on qemu-storage-daemon, then on blockrepd (which must exit 0 when stopped), each
 * over copies of the named seed images; resolves with both records and both directories.
 */
export async function sideBySide(
  dir: TempDir,
  seed: string,
  images: string[],
  script: (qmp: QmpClient, dir: string) => Promise<unknown[]>,
): Promise<{ theirs: unknown[]; mine: unknown[]; theirsDir: string; oursDir: string }> {
  const copy = (name: string) => {
    const d = dir.file(name);
    mkdirSync(d);
    for (const img of images) copyFileSync(join(seed, img), join(d, img));
    return d;
  };
  const theirsDir = copy('qsd');
  const oursDir = copy('ours');
  const qsd = await startQsd(dir.file('qsd.sock'));
  const theirs = await script(qsd.qmp, theirsDir);
  await qsd.stop();
  const ours = await startDaemon(dir.file('ours.sock'));
  const mine = await script(ours.qmp, oursDir);
  expect(await ours.stop()).toBe(0);
  return { theirs, mine, theirsDir, oursDir };
}

/** A temporary directory with a `seed` folder for the images both sides start from. */
export function seedDir(): { dir: TempDir; seed: string; img: (n: string) => string } {
  const dir = makeTempDir();
  const seed = dir.file('seed');
  mkdirSync(seed);
  return { dir, seed, img: (n) => join(seed, n) };
}
