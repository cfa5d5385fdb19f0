import { existsSync, readFileSync } from 'node:fs';

/**
 * Sums the vitest JSON reports of the packages a run tested. A package without a readable report
 * is listed in `missing` (its run broke down before reporting: the run fails). A test file that
 * failed without a failed test (it threw at collection, e.g. a peer tool missing under CI, or a
 * hook failed) counts as one failed test, so the line never says "0 failed" for a failed run.
 * @param {{ name: string; report: string }[]} packages
 * @returns {{ passed: number; failed: number; skipped: number; missing: string[] }}
 */
export function summarize(packages) {
  const sum = { passed: 0, failed: 0, skipped: 0, missing: [] };
  for (const { name, report } of packages) {
    if (!existsSync(report)) {
      sum.missing.push(name);
      continue;
    }
    let r;
    try {
      r = JSON.parse(readFileSync(report, 'utf8'));
    } catch {
      // a report cut short (the disk filled up, the run was killed): count the package as broken
      sum.missing.push(`${name} (unreadable report)`);
      continue;
    }
    sum.passed += r.numPassedTests ?? 0;
    sum.failed += r.numFailedTests ?? 0;
    sum.skipped += (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
    for (const file of r.testResults ?? []) {
      const failedTests = (file.assertionResults ?? []).filter((a) => a.status === 'failed').length;
      if (file.status === 'failed' && failedTests === 0) sum.failed++;
    }
  }
  return sum;
}

/** The run's last line, plain: "N passed, N failed, N skipped". */
export function summaryLine({ passed, failed, skipped }) {
  return `${passed} passed, ${failed} failed, ${skipped} skipped`;
}
