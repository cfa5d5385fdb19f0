/**
 * `pnpm bench [filter]`: runs each benchmark module (ours beside the QEMU anchor, in one run) and
 * prints a table with the ratio ours/qemu (> 1 means we are faster). Timings on a shared machine
 * are noisy; compare ratios.
 */
import type { BenchRow } from './types';

const MODULES = ['block', 'qcow2', 'nbd', 'load', 'jobs', 'replication'];

async function main() {
  const filter = process.argv[2];
  const rows: BenchRow[] = [];
  for (const m of MODULES) {
    if (filter && !m.startsWith(filter)) continue;
    let mod: { run(): Promise<BenchRow[]> };
    try {
      mod = await import(`./${m}.ts`);
    } catch (e) {
      if ((e as { code?: string }).code === 'ERR_MODULE_NOT_FOUND' && String(e).includes(`${m}.ts`)) continue;
      throw e;
    }
    process.stderr.write(`running ${m} ...\n`);
    const got = await mod.run();
    for (const r of got) print(r);
    rows.push(...got);
  }
  if (!rows.length) console.log('no benchmarks ran');
}

let header = false;
function print(r: BenchRow) {
  if (!header) {
    console.log(`${'benchmark'.padEnd(44)} ${'ours'.padStart(12)} ${'qemu'.padStart(12)}  unit    ratio`);
    header = true;
  }
  const fmt = (v: number) => (Number.isNaN(v) ? '-' : v >= 100 ? v.toFixed(0) : v.toFixed(2)).padStart(12);
  const ratio = Number.isNaN(r.qemu) ? '-' : (r.lowerIsBetter ? r.qemu / r.ours : r.ours / r.qemu).toFixed(2);
  const anchor = r.anchor ? `  (anchor: ${r.anchor})` : '';
  const notes = r.notes ? `  ${r.notes}` : '';
  console.log(
    `${r.name.padEnd(44)} ${fmt(r.ours)} ${fmt(r.qemu)}  ${r.unit.padEnd(6)} ${ratio}${anchor}${notes}`,
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
