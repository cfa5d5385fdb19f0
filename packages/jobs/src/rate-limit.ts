/**
 * A byte-rate limit in time slices (QEMU's RateLimit): each slice may carry speed * slice bytes.
 * Work is accounted when it is dispatched, and work beyond a slice's quota pushes the end of the
 * slice (and so the next dispatch) out in proportion.
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

  /**
   * Accounts `bytes` about to be dispatched and returns how many milliseconds to wait before the
   * next dispatch (0: go on now). `calculateDelay(0)` only asks.
   */
  calculateDelay(bytes: number): number {
    if (!this.quota) return 0;
    const now = this.now();
    if (this.sliceEnd < now) {
      // The previous (possibly extended) slice is over: start a new one.
      this.sliceStart = now;
      this.sliceEnd = now + this.sliceMs;
      this.dispatched = 0;
    }
    this.dispatched += bytes;
    if (this.dispatched < this.quota) return 0;
    this.sliceEnd = this.sliceStart + (this.dispatched / this.quota) * this.sliceMs;
    return Math.max(0, this.sliceEnd - now);
  }
}
