import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { makeTempDir, type PeerResult, qemuImg, qemuImgJson, qemuIo, runPeer } from '@blockrep/test-kit';
import { expect } from 'vitest';

export const bin = new URL('../bin/blockrep.cjs', import.meta.url).pathname;

/** test-kit's peer runner (a closed stdin is no error there either). */
export const run = runPeer;
export { qemuImg, qemuImgJson, qemuIo };

/** Runs the CLI as a user would; exit codes outside okCodes reject. */
export function blockrep(
  args: string[],
  okCodes = [0],
  env?: NodeJS.ProcessEnv,
  input?: string,
): Promise<PeerResult> {
  return run('node', [bin, ...args], { okCodes, env, input });
}

/**
 * Differential: `theirs` to qemu-img and `ours` (the same by default; other image copies when the
 * command changes them) to blockrep. Exit code and stderr must agree with the program's name
 * swapped (and `swap` pairs of texts: qemu-img's paths to ours), and stdout too unless
 * `stdout: false`. Returns both results.
 */
export async function sameAsQemuImg(
  theirs: string[],
  ours: string[] = theirs,
  opts: { stdout?: boolean; swap?: [string, string][] } = {},
): Promise<{ q: PeerResult; b: PeerResult }> {
  const q = await run('qemu-img', theirs, { okCodes: [0, 1, 2, 3] });
  const b = await blockrep(ours, [0, 1, 2, 3]);
  const norm = (t: string) => {
    let out = t.replaceAll('qemu-img', 'blockrep');
    for (const [from, to] of opts.swap ?? []) out = out.replaceAll(from, to);
    return out;
  };
  const line = ours.join(' ');
  const shown = (r: PeerResult, n: (t: string) => string) => ({
    line,
    code: r.code,
    stderr: n(r.stderr),
    ...(opts.stdout === false ? {} : { stdout: n(r.stdout) }),
  });
  expect(shown(b, (t) => t)).toEqual(shown(q, norm));
  return { q, b };
}

/** Runs the CLI and parses its stdout as JSON. */
export async function blockrepJson<T = any>(args: string[], okCodes = [0]): Promise<T> {
  return JSON.parse((await blockrep([...args, '--output=json'], okCodes)).stdout) as T;
}

function readU64(fd: number, at: number): number {
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, at);
  return Number(b.readBigUInt64BE(0) & 0x00fffffffffffe00n);
}

/**
 * Damages a qcow2 image with data in its first cluster: 'leak' forgets the L2 entry (the data
 * cluster stays counted: one leak), 'corrupt' zeroes the refcount of the L2 table (in use).
 */
export function damageQcow2(path: string, how: 'leak' | 'corrupt'): void {
  const fd = openSync(path, 'r+');
  try {
    const l1 = readU64(fd, 40);
    const l2 = readU64(fd, l1);
    if (how === 'leak') {
      writeSync(fd, Buffer.alloc(8), 0, 8, l2);
      return;
    }
    const clusterBits = Buffer.alloc(4);
    readSync(fd, clusterBits, 0, 4, 20);
    const cs = 2 ** clusterBits.readUInt32BE(0);
    const refblock = readU64(fd, readU64(fd, 48));
    writeSync(fd, Buffer.alloc(2), 0, 2, refblock + 2 * (l2 / cs));
  } finally {
    closeSync(fd);
  }
}

/** raw base <- qcow2 mid <- qcow2 top, with data, zero clusters and holes at every level. */
export async function makeChain() {
  const dir = makeTempDir();
  const base = dir.file('base.raw');
  const mid = dir.file('mid.qcow2');
  const top = dir.file('top.qcow2');
  await qemuImg(['create', '-q', '-f', 'raw', base, '8M']);
  await qemuIo(['-f', 'raw', base], ['write -P 1 0 256k', 'write -P 2 3M 64k', 'write -P 3 7M 1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', mid]);
  await qemuIo(['-f', 'qcow2', mid], ['write -P 4 64k 64k', 'write -z 3M 64k', 'write -P 5 5M 300k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', mid, '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', top], ['write -P 6 100k 8k', 'write -z 7M 512k', 'write -P 7 6M 4k']);
  return { dir, base, mid, top };
}

/** The dirty extents of a bitmap of an image, as blockrep reads them back. */
export async function bitmapExtents(file: string, name: string): Promise<[number, number][]> {
  const { findDirtyBitmap } = await import('@blockrep/block');
  const { imageGraph, openImage } = await import('../src/image');
  const g = imageGraph();
  try {
    const node = await openImage(g, file);
    return [...findDirtyBitmap(node, name)!.dirtyExtents(0, node.length)];
  } finally {
    await g.closeAll();
  }
}
