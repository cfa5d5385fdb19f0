/** One line of a benchmark: our figure beside the QEMU anchor's, higher is better. */
export interface BenchRow {
  name: string;
  ours: number;
  qemu: number;
  unit: string;
}
