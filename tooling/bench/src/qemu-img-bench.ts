import type { BenchRow } from './types';
import { BENCH_ENV, medianAlternating, runPeer } from './util';

export interface ImgBenchOptions {
  format: 'raw' | 'qcow2';
  write: boolean;
  count: number;
  depth: number;
  bufsize: number;
  step: number;
  flushInterval?: number;
}

/** Runs `qemu-img bench` and returns the seconds it reports for the run itself. */
export async function qemuImgBench(file: string, o: ImgBenchOptions): Promise<number> {
  const args = [
    'bench',
    '-f',
    o.format,
    '-c',
    String(o.count),
    '-d',
    String(o.depth),
    '-s',
    String(o.bufsize),
  ];
  args.push('-S', String(o.step), '-t', 'writeback', '-i', 'threads');
  if (o.write) args.push('-w');
  if (o.flushInterval) args.push(`--flush-interval=${o.flushInterval}`);
  args.push(file);
  const r = await runPeer('qemu-img', args, { timeoutMs: 300_000, env: BENCH_ENV });
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (!m) throw new Error(`unexpected qemu-img bench output: ${r.stdout}`);
  return Number(m[1]);
}

/** The offsets qemu-img bench (7.2) visits: start at 0, advance by step, wrap at the image size. */
export function benchOffsets(imageSize: number, step: number, count: number): Float64Array {
  const out = new Float64Array(count);
  let off = 0;
  for (let i = 0; i < count; i++) {
    out[i] = off;
    off = (off + step) % imageSize;
  }
  return out;
}

/** A qemu-img bench workload: the same offsets and depth on both sides. */
export interface ImgBenchWorkload {
  name: string;
  write: boolean;
  bufsize: number;
  step: number;
  depth: number;
  count: number;
}

/** Our side of qemu-img bench: `depth` requests in flight, one reused buffer per slot; seconds. */
export async function oursImgBench(
  blk: { write(off: number, b: Buffer): Promise<void>; readv(off: number, iov: Buffer[]): Promise<void> },
  imageSize: number,
  w: ImgBenchWorkload,
): Promise<number> {
  const offsets = benchOffsets(imageSize, w.step, w.count);
  // Buffers are filled before the clock starts, as qemu-img bench does: touching new memory
  // costs about 4 ms per MiB on this kind of VM, a third of a 128 MiB run.
  const bufs = Array.from({ length: w.depth }, () => Buffer.alloc(w.bufsize, 0xa5));
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async (buf: Buffer) => {
    while (next < w.count) {
      const off = offsets[next++]!;
      if (w.write) await blk.write(off, buf);
      else await blk.readv(off, [buf]);
    }
  };
  await Promise.all(bufs.map(worker));
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/**
 * Uncounted runs of each side before the measured ones. A daemon runs with its hot paths compiled
 * by the JIT; our first runs of a workload measure V8's compiler instead (on 2 CPUs its threads
 * take CPU from the I/O). Measured, 512 allocating 1 MiB qcow2 writes in a row, user CPU of the
 * whole process per run: 243, 153, 99, 90, 58, 53 ms (`process.resourceUsage`; system CPU stayed
 * at 214-314 ms, and qemu-img's user CPU for the same run is ~10 ms). It still falls a little
 * after three (90, then 58); three keep the module's run time short. qemu-img gets the same runs.
 */
export const WARM_UP_RUNS = 3;

/**
 * Counted runs per side of the in-process rows. A run takes well under a second, and on this kind
 * of VM one side's runs of the same workload spread widely (qemu-img's 1 MiB writes, ten runs in a
 * row: 1950-4414 MiB/s; ours 2287-2980), so a median of three moves by more than the difference
 * measured; seven cost a few seconds more.
 */
export const IMG_BENCH_ROUNDS = 7;

/**
 * Runs each side WARM_UP_RUNS times uncounted (above), then the median of IMG_BENCH_ROUNDS runs
 * per side with the order alternated and `sync` before each (so neither side pays for the page
 * cache the other left dirty). `run` gets the side and the run's number (-1 for the warm-ups).
 */
export async function warmMedian(
  run: (side: 'ours' | 'qemu', i: number) => Promise<number>,
): Promise<{ qemu: number; ours: number }> {
  for (let w = 0; w < WARM_UP_RUNS; w++) {
    await run('qemu', -1);
    await run('ours', -1);
  }
  let i = 0;
  return medianAlternating((side) => run(side, i++), IMG_BENCH_ROUNDS);
}

/** A result row in MiB/s (1 MiB requests) or IOPS (smaller ones) from each side's seconds. */
export function imgBenchRow(w: ImgBenchWorkload, secs: { qemu: number; ours: number }): BenchRow {
  const big = w.bufsize >= 1 << 20;
  const per = (t: number) => (big ? (w.count * w.bufsize) / t / 2 ** 20 : w.count / t);
  return { name: w.name, ours: per(secs.ours), qemu: per(secs.qemu), unit: big ? 'MiB/s' : 'IOPS' };
}
