/** One line of a benchmark: our figure beside the QEMU anchor's, higher is better. */
export interface BenchRow {
  name: string;
  ours: number;
  qemu: number;
  unit: string;
  /** What `qemu` measured when it is not QEMU (e.g. "replication off"); NaN when there is no anchor. */
  anchor?: string;
  /** Times: the ratio printed is qemu/ours, so that above 1 still means we are faster. */
  lowerIsBetter?: boolean;
  /** Further figures printed after the ratio (other anchors, another transport). */
  notes?: string;
}
