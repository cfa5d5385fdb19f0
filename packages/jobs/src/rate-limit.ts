/**
 * A byte-rate limit in time slices (QEMU's RateLimit): each slice may carry speed * slice bytes;
 * work beyond that pushes the next permitted start out by whole slices.
 */
export class RateLimit {
  private quota = 0;
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  constructor(
    speed = 0,
    readonly sliceMs = 100,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.setSpeed(speed);
  }

  /** Bytes per second; 0 means unlimited. */
  setSpeed(speed: number): void {
    this.quota = speed > 0 ? Math.max(1, (speed * this.sliceMs) / 1000) : 0;
  }

  /** Milliseconds to wait before the next piece of work may start (0: go now). */
  delay(): number {
    if (!this.quota) return 0;
    const now = this.now();
    if (this.sliceEnd < now) {
      this.sliceStart = now;
      this.sliceEnd = now + this.sliceMs;
      this.dispatched = 0;
    }
    const slices = Math.floor(this.dispatched / this.quota);
    if (slices === 0) return 0;
    // The work already done fills `slices` slices: the next may start only after them.
    this.sliceEnd = this.sliceStart + slices * this.sliceMs;
    return Math.max(0, this.sliceEnd - now);
  }

  /** Accounts bytes just processed. */
  account(bytes: number): void {
    if (this.quota) this.dispatched += bytes;
  }
}
