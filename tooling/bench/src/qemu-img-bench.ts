import { runPeer } from '@blockrep/test-kit';

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
  const r = await runPeer('qemu-img', args, { timeoutMs: 300_000 });
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
