import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { BlockBackend, createGraph, Perm } from '@blockrep/block';
import { createQcow2Image, qcow2Driver } from '@blockrep/qcow2';
import { type ImgBenchWorkload, imgBenchRow, oursImgBench, qemuImgBench, warmMedian } from './qemu-img-bench';
import type { BenchRow } from './types';
import { makeTempDirPlain, medianOfSides } from './util';

const execFileAsync = promisify(execFile);

/*
 * BlockBackend -> qcow2 -> file against `qemu-img bench -f qcow2` on the same kind of image, with
 * the same offsets and depth: 4 KiB strided writes into a fresh image (every one allocates), 4 KiB
 * strided reads and 1 MiB sequential writes/reads; plus makeEmpty of an image holding 1 GiB
 * against one holding 1 MiB (it must not depend on the amount of data).
 */

/** Image size of the strided 4 KiB writes (sparse) and of makeEmpty. */
const SIZE = 1 << 30;
/** Image size of the other workloads (written in full first, so reads hit data). */
const DATA_SIZE = 256 << 20;
const STRIDE = 4096 * 7919;

interface Workload extends ImgBenchWorkload {
  /** Each run gets a new, empty image (allocating writes). */
  fresh: boolean;
  size: number;
}

async function openImage(file: string) {
  const g = createGraph([qcow2Driver]);
  const node = await g.open({ driver: 'qcow2', file: { driver: 'file', filename: file } });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  return {
    blk,
    close: async () => {
      await blk.detach();
      await g.closeAll();
    },
  };
}

/** Seconds our stack takes for the workload's requests (image opened beforehand, closed after). */
async function oursBench(file: string, w: Workload): Promise<number> {
  const { blk, close } = await openImage(file);
  const secs = await oursImgBench(blk, w.size, w);
  await close();
  return secs;
}

async function freshQcow2(file: string, size: number): Promise<void> {
  await execFileAsync('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(size)]);
}

/** Seconds for makeEmpty of an image holding `dataBytes` of data (written in 1 MiB requests). */
async function makeEmptyTime(file: string, dataBytes: number): Promise<number> {
  await createQcow2Image(file, { size: SIZE });
  const { blk, close } = await openImage(file);
  const buf = Buffer.alloc(1 << 20, 0x5a);
  for (let off = 0; off < dataBytes; off += 8 << 20) {
    const n = Math.min(8, (dataBytes - off) >> 20);
    await Promise.all(Array.from({ length: n }, (_, i) => blk.write(off + i * (1 << 20), buf)));
  }
  await blk.flush();
  const t0 = process.hrtime.bigint();
  await blk.makeEmpty();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  await close();
  return secs;
}

export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const shared = `${dir}/shared.qcow2`;
  const workloads: Workload[] = [
    // The 1 MiB runs move 512 MiB / 2 GiB: shorter ones (128 / 512 MiB, 30-50 ms) measured how
    // fast each side got going more than its throughput.
    {
      name: 'qcow2 1M seq write qd8 (allocating)',
      write: true,
      bufsize: 1 << 20,
      step: 1 << 20,
      depth: 8,
      count: 512,
      fresh: true,
      size: 2 * DATA_SIZE,
    },
    {
      name: 'qcow2 1M seq read qd8',
      write: false,
      bufsize: 1 << 20,
      step: 1 << 20,
      depth: 8,
      count: 2048,
      fresh: false,
      size: DATA_SIZE,
    },
    {
      name: 'qcow2 4k random read qd16',
      write: false,
      bufsize: 4096,
      step: STRIDE,
      depth: 16,
      count: 50_000,
      fresh: false,
      size: DATA_SIZE,
    },
    {
      name: 'qcow2 4k random write qd16 (allocating)',
      write: true,
      bufsize: 4096,
      step: STRIDE,
      depth: 16,
      count: 5_000,
      fresh: true,
      size: SIZE,
    },
  ];
  const rows: BenchRow[] = [];
  try {
    // The read workloads use one image, written in full first (so reads hit data clusters).
    await freshQcow2(shared, DATA_SIZE);
    await oursBench(shared, { ...workloads[0]!, count: DATA_SIZE >> 20, size: DATA_SIZE });
    for (const w of workloads) {
      const secs = await warmMedian(async (side, i) => {
        const f = w.fresh ? `${dir}/${side}${i}.qcow2` : shared;
        if (w.fresh) await freshQcow2(f, w.size);
        try {
          return side === 'qemu' ? await qemuImgBench(f, { format: 'qcow2', ...w }) : await oursBench(f, w);
        } finally {
          if (w.fresh) rmSync(f, { force: true });
        }
      });
      rows.push(imgBenchRow(w, secs));
    }
    rmSync(shared, { force: true });
    // QEMU has no standalone make_empty to time, so the anchor of both rows is our own 1 MiB
    // figure: a ratio near 1 on the 1 GiB row means the time does not grow with the data. Both are
    // the median of three runs taken in turns (the minimum of three 1 MiB runs against a single
    // 1 GiB run biased the row down).
    const { small, large } = await medianOfSides(['small', 'large'] as const, (k) =>
      makeEmptyTime(`${dir}/e-${k}.qcow2`, k === 'small' ? 1 << 20 : 1 << 30),
    );
    rows.push({
      name: 'qcow2 makeEmpty 1 MiB data (anchor: 1 MiB)',
      ours: 1 / small,
      qemu: 1 / small,
      unit: 'ops/s',
    });
    rows.push({
      name: 'qcow2 makeEmpty 1 GiB data (anchor: 1 MiB)',
      ours: 1 / large,
      qemu: 1 / small,
      unit: 'ops/s',
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
