import type { BlockBackend } from './backend';
import type { BlockNode } from './node';

/** The kinds of I/O request counted per node and per BlockBackend. */
export const IO_OPS = ['read', 'write', 'zero', 'discard', 'flush'] as const;
export type IoOp = (typeof IO_OPS)[number];

const zeroes = (): Record<IoOp, number> => ({ read: 0, write: 0, zero: 0, discard: 0, flush: 0 });

/** Requests finished, their bytes and the failed ones, per operation (QEMU's BlockAcctStats). */
export class IoStats {
  readonly ops = zeroes();
  readonly bytes = zeroes();
  readonly failed = zeroes();
}

/** Told of every request as it ends, with its duration (metrics' latency histograms). */
export type IoObserver = (
  target: BlockNode | BlockBackend,
  op: IoOp,
  bytes: number,
  seconds: number,
  failed: boolean,
) => void;

let observer: IoObserver | null = null;

/** Sets (or with null removes) the one observer; without one no request is timed. */
export function setIoObserver(o: IoObserver | null): void {
  observer = o;
}

/** The start of a request: a timestamp while an observer wants durations, else 0. */
export function ioStart(): number {
  return observer ? performance.now() : 0;
}

/** A request ended: counted, and timed for the observer. */
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
  if (observer && t0) observer(target, op, bytes, (performance.now() - t0) / 1000, failed);
}
