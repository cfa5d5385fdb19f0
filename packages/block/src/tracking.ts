import type { BlockNode } from './node';

/** One request in flight on a node (for drain and for serialising overlapping requests). */
export class TrackedRequest {
  private waiters: (() => void)[] | null = null;
  private finished = false;

  constructor(
    readonly offset: number,
    readonly bytes: number,
    readonly serialising: boolean,
  ) {}

  overlaps(offset: number, bytes: number): boolean {
    return offset < this.offset + this.bytes && this.offset < offset + bytes;
  }

  /** Resolves when the request has finished. */
  done(): Promise<void> {
    if (this.finished) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiters ??= [];
      this.waiters.push(resolve);
    });
  }

  finish(): void {
    this.finished = true;
    const w = this.waiters;
    this.waiters = null;
    if (w) for (const f of w) f();
  }
}

/** Registers a request on the node; pair with endRequest in a finally. */
export function beginRequest(
  node: BlockNode,
  offset: number,
  bytes: number,
  serialising: boolean,
): TrackedRequest {
  const req = new TrackedRequest(offset, bytes, serialising);
  node.tracked.add(req);
  node.inFlight++;
  if (serialising) node.serialising++;
  return req;
}

export function endRequest(node: BlockNode, req: TrackedRequest): void {
  node.tracked.delete(req);
  if (req.serialising) node.serialising--;
  node.inFlight--;
  req.finish();
  if (node.inFlight === 0) node.graph.notifyIdle();
}

/**
 * Waits until no earlier overlapping request conflicts with req: a serialising request waits for
 * every earlier overlapping one, and any request waits for earlier overlapping serialising ones.
 * Only earlier requests are waited for, so waits never form a cycle.
 */
export async function waitSerialising(node: BlockNode, req: TrackedRequest): Promise<void> {
  if (node.serialising === 0) return;
  for (;;) {
    let blocker: TrackedRequest | null = null;
    for (const other of node.tracked) {
      if (other === req) break;
      if ((other.serialising || req.serialising) && other.overlaps(req.offset, req.bytes)) {
        blocker = other;
        break;
      }
    }
    if (!blocker) return;
    await blocker.done();
  }
}

/**
 * Exclusive locks on byte ranges, taken in arrival order: what drivers use to keep concurrent
 * requests off the same clusters (qcow2 allocation, copy-before-write).
 */
export class RangeLock {
  private readonly held = new Set<TrackedRequest>();

  /** Waits for every earlier overlapping lock, then holds [offset, offset+bytes). */
  async lock(offset: number, bytes: number): Promise<() => void> {
    const me = new TrackedRequest(offset, bytes, true);
    const earlier = [...this.held].filter((r) => r.overlaps(offset, bytes));
    this.held.add(me);
    for (const r of earlier) await r.done();
    return () => {
      this.held.delete(me);
      me.finish();
    };
  }

  /** Waits until no lock overlapping the range is held (without taking one). */
  async waitUnlocked(offset: number, bytes: number): Promise<void> {
    for (;;) {
      const r = [...this.held].find((h) => h.overlaps(offset, bytes));
      if (!r) return;
      await r.done();
    }
  }

  isLocked(offset: number, bytes: number): boolean {
    for (const r of this.held) if (r.overlaps(offset, bytes)) return true;
    return false;
  }
}

/** Mutual exclusion for async sections (a metadata update that must not interleave with another). */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  /** Runs fn once every earlier run has finished; resolves with its result. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
