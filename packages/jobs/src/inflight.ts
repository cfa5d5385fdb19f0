/**
 * A bounded set of requests in flight for a job's run loop: the loop stays the one place that
 * pauses and sleeps, while up to `max` copies run at once.
 */
export class Inflight<T> {
  private readonly pending = new Set<Promise<void>>();
  private readonly done: T[] = [];

  constructor(readonly max: number) {}

  get size(): number {
    return this.pending.size;
  }

  /** Starts a task; its result is collected for `take()`. */
  add(task: () => Promise<T>): void {
    const p: Promise<void> = task().then((r) => {
      this.pending.delete(p);
      if (r !== undefined) this.done.push(r);
    });
    this.pending.add(p);
  }

  /** Waits until there is room for another task. */
  async room(): Promise<void> {
    while (this.pending.size >= this.max) await Promise.race(this.pending);
  }

  /** Waits for any one task in flight to finish (at once when none is). */
  async any(): Promise<void> {
    if (this.pending.size) await Promise.race(this.pending);
  }

  /** Waits for every task in flight. */
  async drain(): Promise<void> {
    while (this.pending.size) await Promise.race(this.pending);
  }

  /** The results that came back since the last call. */
  take(): T[] {
    return this.done.splice(0);
  }
}
