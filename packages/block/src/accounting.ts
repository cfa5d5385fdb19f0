import type { BlockBackend } from './backend';
import type { BlockNode } from './node';

/** The kinds of I/O request counted per node and per BlockBackend. */
export const IO_OPS = ['read', 'write', 'zero', 'discard', 'flush'] as const;
export type IoOp = (typeof IO_OPS)[number];

/** Latency histogram bucket bounds, seconds (50 µs to 5 s; one more bucket past the last). */
export const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
] as const;

const zeroes = (): Record<IoOp, number> => ({ read: 0, write: 0, zero: 0, discard: 0, flush: 0 });

/** How long requests took: a count per bucket of LATENCY_BUCKETS (the last: longer) and the sum. */
export class IoLatency {
  readonly counts = new Float64Array(LATENCY_BUCKETS.length + 1);
  sum = 0;

  add(seconds: number): void {
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.counts[i]!++;
    this.sum += seconds;
  }
}

/** Requests finished, their bytes and the failed ones, per operation (QEMU's BlockAcctStats). */
export class IoStats {
  readonly ops = zeroes();
  readonly bytes = zeroes();
  readonly failed = zeroes();
  /** Durations per operation, kept while timing is on (setIoTiming). */
  readonly latency: Partial<Record<IoOp, IoLatency>> = {};
}

let timing = false;

/**
 * Times every request from now on (true) or no more (false): the metrics endpoint's latency
 * histograms. Off, a request costs three counter increments; on, two clock reads and a bucket.
 */
export function setIoTiming(on: boolean): void {
  timing = on;
}

/** The start of a request: a timestamp while timing is on, else 0. */
export function ioStart(): number {
  return timing ? performance.now() : 0;
}

/** A request ended: counted, and timed while timing is on. */
export function ioDone(
  target: BlockNode | BlockBackend,
  op: IoOp,
  bytes: number,
  t0: number,
  failed: boolean,
): void {
  const s = target.ioStats;
  s.ops[op]++;
  s.bytes[op] += bytes;
  if (failed) s.failed[op]++;
  if (!t0) return;
  let lat = s.latency[op];
  if (!lat) {
    lat = new IoLatency();
    s.latency[op] = lat;
  }
  lat.add((performance.now() - t0) / 1000);
}
