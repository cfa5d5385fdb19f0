#!/usr/bin/env node
// Runs every package's tests through turbo and prints one line summed over all of them:
// "N passed, N failed, N skipped". Exits non-zero when anything failed or a package's run broke
// down. Under CI a test gated on a missing peer tool fails instead of being skipped (hasPeer in
// src/peers.ts), so such a run fails too.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { summarize, summaryLine } from './summary.mjs';

const root = new URL('../../../', import.meta.url).pathname;
const dirs = [];
for (const group of ['packages', 'apps', 'tooling']) {
  const g = join(root, group);
  if (!existsSync(g)) continue;
  for (const d of readdirSync(g)) dirs.push(join(g, d));
}
if (existsSync(join(root, 'tests', 'package.json'))) dirs.push(join(root, 'tests'));
const withTests = dirs.filter((d) => {
  if (!existsSync(join(d, 'package.json'))) return false;
  return Boolean(JSON.parse(readFileSync(join(d, 'package.json'), 'utf8')).scripts?.test);
});
for (const d of withTests) rmSync(join(d, '.vitest-result.json'), { force: true });

// Packages tested at once. turbo's default (10) started every suite together, and on two cores
// they starved each other into timeouts; each package runs its files in one or two workers
// (vitest.shared.mjs), so about one package per core, plus one to fill the time the others
// spend waiting on peer tools and sockets, keeps the cores busy without starving anyone.
// `pnpm test --concurrency=N` or BLOCKREP_TEST_CONCURRENCY=N sets it.
const extra = process.argv.slice(2);
const concurrency = process.env.BLOCKREP_TEST_CONCURRENCY || String(availableParallelism() + 1);
if (!extra.some((a) => a.startsWith('--concurrency'))) extra.push(`--concurrency=${concurrency}`);
const run = spawnSync('pnpm', ['exec', 'turbo', 'run', 'test', '--continue', ...extra], {
  cwd: root,
  stdio: 'inherit',
});

const sum = summarize(
  withTests.map((d) => ({ name: d.slice(root.length), report: join(d, '.vitest-result.json') })),
);
if (sum.missing.length) console.log(`no test report from: ${sum.missing.join(', ')}`);
console.log(summaryLine(sum));
process.exit(run.status === 0 && sum.failed === 0 && sum.missing.length === 0 ? 0 : 1);
