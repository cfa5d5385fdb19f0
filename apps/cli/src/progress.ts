/**
 * qemu-img's progress line, "    (42.00/100%)", redrawn in place. Shown only on a terminal:
 * piped output carries nothing but results.
 */
export class ProgressBar {
  private shown = -1;
  private readonly enabled: boolean;

  constructor(
    private readonly total: number,
    wanted: boolean,
    private readonly stream: NodeJS.WriteStream = process.stdout,
  ) {
    this.enabled = wanted && stream.isTTY === true;
    this.update(0);
  }

  update(done: number): void {
    if (!this.enabled) return;
    const pct = this.total ? Math.min(100, (100 * done) / this.total) : 100;
    // Redraw at most every 1% (as qemu-img does), the terminal is not a log.
    if (Math.floor(pct) === this.shown) return;
    this.shown = Math.floor(pct);
    this.stream.write(`    (${pct.toFixed(2)}/100%)\r`);
  }

  finish(): void {
    if (!this.enabled) return;
    this.update(this.total);
    this.stream.write('\n');
  }
}
