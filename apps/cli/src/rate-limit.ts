import { setTimeout as sleep } from 'node:timers/promises';

/**
 * convert -r: the target's writes at `rate` bytes a second on average, as QEMU's throttle limits
 * them: a leaky bucket that lets a request through while it holds less than a tenth of a
 * second's worth, whatever the request's size, one request at a time.
 */
export class RateLimit {
  private level = 0;
  private at = performance.now();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly rate: number) {}

  /** Waits until a request of `bytes` may go, then counts it. */
  take(bytes: number): Promise<void> {
    const turn = this.queue.then(async () => {
      const max = this.rate / 10;
      for (this.leak(); this.level >= max; this.leak()) {
        await sleep(Math.ceil(((this.level - max) / this.rate) * 1000));
      }
      this.level += bytes;
    });
    this.queue = turn;
    return turn;
  }

  private leak(): void {
    const now = performance.now();
    this.level = Math.max(0, this.level - ((now - this.at) / 1000) * this.rate);
    this.at = now;
  }
}
