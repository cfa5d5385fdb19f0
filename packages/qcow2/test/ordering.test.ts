import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import {
  BlockBackend,
  type BlockChild,
  type BlockDriver,
  ChildRole,
  createGraph,
  filterChildPerm,
  iovToBuffer,
  opt,
  Perm,
  ReqFlags,
} from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { createQcow2Image, type Qcow2Image, qcow2Driver } from '../src/index';

/*
 * Metadata write ordering, checked as it happens: a filter between qcow2 and its file keeps a
 * shadow of what is durable (writes completed before a flush began, applied when the flush ends;
 * a FUA write when it completes).
 * Whenever qcow2 issues a write of an L2 table or of the L1 table, every cluster it references
 * must already have a refcount of at least 1 in the durable shadow; so no crash, a power loss
 * included, can leave a reference to a cluster counted as free.
 */

interface Recorder {
  shadow: Buffer;
  /** Writes completed and not yet covered by a flush that ended, in the order they completed. */
  completed: { seq: number; off: number; data: Buffer }[];
  seq: number;
  /** Called when a write is issued, before it reaches the file. */
  onWrite: ((off: number, data: Buffer) => void) | null;
}

const rec = (node: { opaque: unknown }) => node.opaque as Recorder;
const file = (node: { file: BlockChild | null }) => node.file as BlockChild;

function apply(r: Recorder, off: number, data: Buffer): void {
  if (off + data.length > r.shadow.length) {
    const grown = Buffer.alloc(Math.max(off + data.length, r.shadow.length * 2));
    r.shadow.copy(grown);
    r.shadow = grown;
  }
  data.copy(r.shadow, off);
}

/** A pass-through filter that records what is durable. */
const recorderDriver: BlockDriver = {
  name: 'ordering-recorder',
  isFilter: true,
  options: { file: opt.child('The file', { required: true }) },
  supportedWriteFlags: ReqFlags.FUA,
  async open(node, opts, ctx) {
    const c = (await ctx.openChild('file', opts.file, ChildRole.FILTERED | ChildRole.PRIMARY))!;
    node.opaque = {
      shadow: readFileSync(c.node.filename),
      completed: [],
      seq: 0,
      onWrite: null,
    } satisfies Recorder;
  },
  childPerm: (_n, _c, perm, shared) => filterChildPerm(perm, shared),
  getLength: (node) => file(node).node.length,
  read: (node, offset, bytes, iov) => file(node).readv(offset, bytes, iov),
  async write(node, offset, _bytes, iov, flags) {
    const r = rec(node);
    const data = Buffer.from(iovToBuffer(iov));
    r.onWrite?.(offset, data);
    await file(node).write(offset, iov, flags);
    if (!(flags & ReqFlags.FUA)) {
      r.completed.push({ seq: ++r.seq, off: offset, data });
      return;
    }
    // FUA: durable now, this write alone. Earlier writes of the range are superseded in the page
    // cache, so a later flush makes this data durable there, not theirs.
    for (const w of r.completed) {
      const from = Math.max(w.off, offset);
      const to = Math.min(w.off + w.data.length, offset + data.length);
      if (from < to) data.copy(w.data, from - w.off, from - offset, to - offset);
    }
    apply(r, offset, data);
  },
  // A flush makes durable every write that completed before it began, whatever other flushes
  // run meanwhile; those writes reach the shadow in the order they completed.
  async flush(node) {
    const r = rec(node);
    const upTo = r.seq;
    await file(node).flush();
    while (r.completed.length && r.completed[0]!.seq <= upTo) {
      const w = r.completed.shift()!;
      apply(r, w.off, w.data);
    }
  },
  truncate: (node, length, opts) => file(node).truncate(length, opts),
};

/** The refcount of a cluster in an image buffer (16-bit refcounts). */
function durableRefcount(img: Buffer, cs: number, cluster: number): number {
  const reftable = Number(img.readBigUInt64BE(48));
  const perBlock = cs / 2;
  const block = Math.floor(cluster / perBlock);
  if (reftable + block * 8 + 8 > img.length) return 0;
  const bOff = Number(img.readBigUInt64BE(reftable + block * 8) & 0x00fffffffffffe00n);
  if (!bOff || bOff + cs > img.length) return 0;
  return img.readUInt16BE(bOff + (cluster % perBlock) * 2);
}

/** Host clusters a table (L1 or L2) references. */
function referenced(table: Buffer, cs: number): number[] {
  const out: number[] = [];
  for (let p = 0; p + 8 <= table.length; p += 8) {
    const off = Number(table.readBigUInt64BE(p) & 0x00fffffffffffe00n);
    if (off) out.push(off / cs);
  }
  return out;
}

/** A qcow2 node over the recording filter over the file, with a BlockBackend attached. */
async function openRecorded(path: string, extra: Record<string, unknown> = {}) {
  const g = createGraph([qcow2Driver, recorderDriver]);
  const node = await g.open({
    driver: 'qcow2',
    file: { driver: 'ordering-recorder', file: { driver: 'file', filename: path } },
    ...extra,
  });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  const close = async () => {
    await blk.detach();
    await g.close(node);
  };
  return { node, blk, close, r: rec(node.file!.node), img: node.opaque as Qcow2Image };
}

/** Counts the flushes and FUA writes the qcow2 node sends to its file from now on. */
function countSyncs(node: { file: BlockChild | null }): { flushes: number; fua: number } {
  const filter = file(node).node;
  const drv = filter.driver;
  const c = { flushes: 0, fua: 0 };
  filter.driver = {
    ...drv,
    flush: (n) => {
      c.flushes++;
      return drv.flush!(n);
    },
    write: (n, o, b, iov, flags) => {
      if (flags & ReqFlags.FUA) c.fua++;
      return drv.write!(n, o, b, iov, flags);
    },
  };
  return c;
}

describe('qcow2 metadata write ordering', () => {
  it('an L1 or L2 table never reaches the file before the refcounts of what it references are durable', async () => {
    const d = makeTempDir();
    const path = d.file('o.qcow2');
    const cs = 65536;
    const size = 256 << 20;
    await createQcow2Image(path, { size, clusterSize: cs });
    const { blk, close, r, img } = await openRecorded(path, { 'l2-cache-size': 2 * cs });
    const violations: string[] = [];
    let tableWrites = 0;
    r.onWrite = (off, data) => {
      const isL1 = off >= img.l1Offset && off < img.l1Offset + img.header.l1Size * 8;
      const isL2 = !isL1 && data.length === cs && referenced(img.l1, cs).includes(off / cs);
      if (!isL1 && !isL2) return;
      tableWrites++;
      for (const c of referenced(data, cs)) {
        if (durableRefcount(r.shadow, cs, c) < 1)
          violations.push(`${isL1 ? 'L1' : 'L2'} at ${off} -> cluster ${c}`);
      }
    };
    // Writers across several L2 tables (a small cache: tables are evicted and written back
    // while others allocate), flushes in between, zero writes that free clusters.
    const data = Buffer.alloc(64 << 10, 0x5a);
    let x = 12345;
    const next = () => {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      return x;
    };
    const worker = async (w: number) => {
      for (let i = 0; i < 150; i++) {
        const off = (next() % (size / 4096)) * 4096;
        const len = Math.min(4096 * (1 + (next() % 16)), size - off);
        if (next() % 7 === 0) await blk.writeZeroes(off, len, ReqFlags.MAY_UNMAP);
        else await blk.write(off, data.subarray(0, len));
        if ((i + w) % 20 === 0) await blk.flush();
      }
    };
    await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map(worker));
    await blk.flush();
    await close();
    expect(tableWrites).toBeGreaterThan(10);
    expect(violations).toEqual([]);
  });

  it('allocating L2 tables and refcounts does not flush the file: a sequential writer never waits for its own data to be written out', async () => {
    const d = makeTempDir();
    const path = d.file('seq.qcow2');
    const cs = 65536;
    // 64 KiB clusters: 8192 entries per L2 table, so 1 GiB spans two tables.
    await createQcow2Image(path, { size: 1 << 30, clusterSize: cs });
    const { node, blk, close, img } = await openRecorded(path);
    const syncs = countSyncs(node);
    const data = Buffer.alloc(1 << 20, 0x6b);
    // Across the first table's end (512 MiB) and into the second.
    for (let off = 510 << 20; off < 516 << 20; off += 1 << 20) await blk.write(off, data);
    expect(img.l2Offset(0)).toBeGreaterThan(0);
    expect(img.l2Offset(1)).toBeGreaterThan(0);
    expect(syncs.flushes).toBe(0);
    // The new tables and their refcounts went out with FUA instead.
    expect(syncs.fua).toBeGreaterThanOrEqual(4);
    await close();
  });

  it('makeEmpty: the empty L1 table is durable before a lowered refcount reaches the file, and nothing is flushed', async () => {
    const d = makeTempDir();
    const path = d.file('e.qcow2');
    const cs = 65536;
    await createQcow2Image(path, { size: 64 << 20, clusterSize: cs });
    const { node, blk, close, r, img } = await openRecorded(path);
    await blk.write(0, Buffer.alloc(8 << 20, 0x5a));
    await blk.flush();
    // Every cluster the durable L1 and L2 tables reference, by the shadow.
    const durableRefs = () => {
      const l1 = r.shadow.subarray(img.l1Offset, img.l1Offset + img.header.l1Size * 8);
      const out = new Set<number>();
      for (const t of referenced(l1, cs)) {
        out.add(t);
        for (const c of referenced(r.shadow.subarray(t * cs, (t + 1) * cs), cs)) out.add(c);
      }
      return out;
    };
    expect(durableRefs().size).toBeGreaterThan(100);
    const violations: string[] = [];
    let refblockWrites = 0;
    r.onWrite = (off, data) => {
      if (!img.refcounts.blockOffsets.has(off - (off % cs))) return;
      refblockWrites++;
      const first = ((off % cs) / 2) | 0;
      for (const c of durableRefs()) {
        const k = c - first;
        if (k >= 0 && k * 2 < data.length && data.readUInt16BE(k * 2) < 1) violations.push(`cluster ${c}`);
      }
    };
    const syncs = countSyncs(node);
    await blk.makeEmpty();
    expect(syncs.flushes).toBe(0);
    expect(durableRefs().size).toBe(0);
    // The lowered counts go out with the next write-back, and the image is clean after it.
    await blk.write(1 << 20, Buffer.alloc(65536, 0x6b));
    await blk.flush();
    expect(refblockWrites).toBeGreaterThan(0);
    expect(violations).toEqual([]);
    await close();
    expect(execFileSync('qemu-img', ['check', path]).toString()).toContain('No errors were found');
  });
});
