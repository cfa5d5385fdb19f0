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
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: path }, 'read-only': readOnly, ...extra });
  const blk = new BlockBackend(g, { perm: readOnly ? Perm.CONSISTENT_READ : Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE });
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
  const { qemuImg } = await import('@blockrep/test-kit');
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
