import { BlockBackend, createGraph, Perm } from '@blockrep/block';
import { type ImgBenchWorkload, imgBenchRow, oursImgBench, qemuImgBench, warmMedian } from './qemu-img-bench';
import type { BenchRow } from './types';
import { makeTempDirPlain, runPeer } from './util';

const SIZE = 1 << 30;

async function oursBench(file: string, w: ImgBenchWorkload): Promise<number> {
  const g = createGraph();
  const node = await g.open({ driver: 'raw', file: { driver: 'file', filename: file } });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  const secs = await oursImgBench(blk, SIZE, w);
  await blk.detach();
  await g.closeAll();
  return secs;
}

/**
 * BlockBackend -> raw -> file against `qemu-img bench -f raw` on the same preallocated file:
 * 4 KiB strided ("random": a prime stride over 1 GiB) and 1 MiB sequential, reads and writes.
 */
export async function run(): Promise<BenchRow[]> {
  const dir = makeTempDirPlain();
  const file = `${dir}/bench.raw`;
  await runPeer('qemu-img', ['create', '-f', 'raw', '-o', 'preallocation=falloc', file, String(SIZE)]);
  const workloads: ImgBenchWorkload[] = [
    {
      name: 'block 4k random write qd16',
      write: true,
      bufsize: 4096,
      step: 4096 * 7919,
      depth: 16,
      count: 100_000,
    },
    {
      name: 'block 4k random read qd16',
      write: false,
      bufsize: 4096,
      step: 4096 * 7919,
      depth: 16,
      count: 100_000,
    },
    { name: 'block 1M seq write qd8', write: true, bufsize: 1 << 20, step: 1 << 20, depth: 8, count: 2048 },
    { name: 'block 1M seq read qd8', write: false, bufsize: 1 << 20, step: 1 << 20, depth: 8, count: 2048 },
  ];
  const rows: BenchRow[] = [];
  try {
    for (const w of workloads) {
      const secs = await warmMedian((side) =>
        side === 'qemu' ? qemuImgBench(file, { format: 'raw', ...w }) : oursBench(file, w),
      );
      rows.push(imgBenchRow(w, secs));
    }
  } finally {
    (await import('node:fs')).rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
