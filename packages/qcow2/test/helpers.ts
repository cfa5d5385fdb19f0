import { spawn } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { BlockBackend, type BlockNode, createGraph, Perm } from '@blockrep/block';
import { qcow2Driver } from '../src/index';

export function qcowGraph() {
  return createGraph([qcow2Driver]);
}

/** Opens a qcow2 image file with a BlockBackend on it (read-write unless readOnly). */
export async function openQcow2(
  path: string,
  extra: Record<string, unknown> = {},
  readOnly = false,
): Promise<{ node: BlockNode; blk: BlockBackend; close: () => Promise<void> }> {
  const g = qcowGraph();
  const node = await g.open({
    driver: 'qcow2',
    file: { driver: 'file', filename: path },
    'read-only': readOnly,
    ...extra,
  });
  const blk = new BlockBackend(g, {
    perm: readOnly ? Perm.CONSISTENT_READ : Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
  });
  blk.attach(node);
  return {
    node,
    blk,
    close: async () => {
      await blk.detach();
      if (!node.closed) await g.close(node);
    },
  };
}

/** Reads a whole image through our driver (the guest view, backing chain included). */
export async function readAllOurs(path: string, extra: Record<string, unknown> = {}): Promise<Buffer> {
  const { blk, close } = await openQcow2(path, extra, true);
  try {
    return await blk.read(0, blk.getLength());
  } finally {
    await close();
  }
}

/** What qemu-img reads from an image (convert to raw). */
export async function readAllQemu(path: string, dir: { file(n: string): string }): Promise<Buffer> {
  const { readFileSync } = await import('node:fs');
  const out = dir.file(`qemu-${Math.random().toString(36).slice(2)}.raw`);
  await qemuImg(['convert', '-O', 'raw', path, out]);
  return readFileSync(out);
}

/** Asserts two buffers are equal, naming the first differing offset (vitest diffs of MiBs are useless). */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  for (let off = 0; off < a.length; off += 4096) {
    if (a.compare(b, off, Math.min(off + 4096, a.length), off, Math.min(off + 4096, a.length)) !== 0) {
      for (let i = off; ; i++) if (a[i] !== b[i]) return i;
    }
  }
  return -1;
}

export { prng } from '@blockrep/test-kit';

export interface Workload {
  blk: import('@blockrep/block').BlockBackend;
  expected: Buffer;
  rand: () => number;
  /** Zero/discard requests too (discard only where the result reads as zeroes: no backing). */
  zeroes?: boolean;
  /** Discards (the node must be opened with discard=unmap); whole clusters of `cs` read as zeroes after. */
  discard?: boolean;
  cs?: number;
}

/**
 * Issues `rounds` batches of concurrent, non-overlapping writes (random offsets and sizes, some
 * unaligned), optionally write-zeroes and discards, keeping `expected` in step.
 */
export async function randomWorkload(
  w: Workload,
  rounds: number,
  perRound = 16,
  maxLen = 200_000,
): Promise<void> {
  const size = w.expected.length;
  for (let r = 0; r < rounds; r++) {
    const taken: [number, number][] = [];
    const ops: Promise<void>[] = [];
    for (let i = 0; i < perRound; i++) {
      const len = 1 + Math.floor(w.rand() * maxLen);
      const off = Math.floor(w.rand() * (size - len));
      if (taken.some(([a, b]) => off < b && a < off + len)) continue;
      taken.push([off, off + len]);
      const kind = w.rand();
      if (w.zeroes && kind < 0.15) {
        w.expected.fill(0, off, off + len);
        ops.push(w.blk.writeZeroes(off, len, kind < 0.07 ? 0x2 : 0));
      } else if (w.discard && kind < 0.25) {
        // Discarded data reads back as zeroes here (no backing file, qcow2 never exposes stale data).
        const cs = w.cs ?? 65536;
        const a = Math.ceil(off / cs) * cs;
        const b = Math.floor((off + len) / cs) * cs;
        if (b > a) w.expected.fill(0, a, b);
        ops.push(w.blk.discard(off, len));
      } else {
        const data = Buffer.alloc(len, Math.floor(w.rand() * 255) + 1);
        data.writeUInt32LE(r * 1000 + i, 0);
        data.copy(w.expected, off);
        ops.push(w.blk.write(off, data));
      }
    }
    await Promise.all(ops);
    if (r % 3 === 2) await w.blk.flush();
  }
}

/**
 * Runs a QEMU tool with stdin closed. (test-kit's runPeer writes to the child's stdin, which
 * raises an uncaught EPIPE when the tool has already exited.) Rejects on other exit codes.
 */
export function runTool(
  tool: string,
  args: string[],
  okCodes = [0],
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== null && okCodes.includes(code)) resolve({ code, stdout, stderr });
      else reject(new Error(`${tool} ${args.join(' ')} exited with ${code}: ${stderr}`));
    });
  });
}

export const qemu = (args: string[], okCodes = [0]) => runTool('qemu-img', args, okCodes);
export const qemuImg = (args: string[]) => runTool('qemu-img', args);
export async function qemuImgJson<T = any>(args: string[]): Promise<T> {
  return JSON.parse((await runTool('qemu-img', [...args, '--output=json'])).stdout) as T;
}
export function qemuIo(imageArgs: string[], commands: string[]) {
  return runTool('qemu-io', [...imageArgs, ...commands.flatMap((c) => ['-c', c])]);
}

/** Overwrites bytes of a file in place (to corrupt images on purpose). */
export function patch(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

/** Reads bytes of a file. */
export function peek(path: string, offset: number, bytes: number): Buffer {
  const fd = openSync(path, 'r');
  const b = Buffer.alloc(bytes);
  readSync(fd, b, 0, bytes, offset);
  closeSync(fd);
  return b;
}
