#!/usr/bin/env node
// Runs every package's tests through turbo and prints one line summed over all of them:
// "N passed, N failed". Exits non-zero when anything failed or a package's run broke down.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';

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

const extra = process.argv.slice(2);
const run = spawnSync('pnpm', ['exec', 'turbo', 'run', 'test', '--continue', ...extra], {
  cwd: root,
  stdio: 'inherit',
});

let passed = 0;
let failed = 0;
let skipped = 0;
const missing = [];
for (const d of withTests) {
  const f = join(d, '.vitest-result.json');
  if (!existsSync(f)) {
    missing.push(d.slice(root.length));
    continue;
  }
  let r;
  try {
    r = JSON.parse(readFileSync(f, 'utf8'));
  } catch {
    // a report cut short (the disk filled up, the run was killed): count the package as broken
    missing.push(`${d.slice(root.length)} (unreadable report)`);
    continue;
  }
  passed += r.numPassedTests ?? 0;
  failed += r.numFailedTests ?? 0;
  skipped += (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
  if (r.numFailedTestSuites && !r.numFailedTests) failed += r.numFailedTestSuites;
}
if (missing.length) console.log(`no test report from: ${missing.join(', ')}`);
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(run.status === 0 && failed === 0 && missing.length === 0 ? 0 : 1);
