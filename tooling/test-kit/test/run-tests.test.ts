import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { summarize, summaryLine } from '../bin/summary.mjs';
import { makeTempDir } from '../src/temp';

const fixture = new URL('./peer-gated/', import.meta.url).pathname;
const vitestBin = join(dirname(createRequire(import.meta.url).resolve('vitest/package.json')), 'vitest.mjs');

/** Runs the fixture package's tests as turbo would, with CI set or not. */
function runFixture(
  ci: string | undefined,
): Promise<{ code: number | null; output: string; report: string }> {
  const out = makeTempDir('blockrep-fixture-').path;
  // The fixture run is a vitest of its own, not a worker of this one.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('VITEST')));
  delete env.CI;
  if (ci !== undefined) env.CI = ci;
  env.FIXTURE_OUT = out;
  env.NO_COLOR = '1';
  delete env.FORCE_COLOR;
  const child = spawn(process.execPath, [vitestBin, 'run'], {
    cwd: fixture,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (d: Buffer) => (output += d));
  child.stderr.on('data', (d: Buffer) => (output += d));
  return new Promise((resolve) =>
    child.on('close', (code) => resolve({ code, output, report: join(out, 'report.json') })),
  );
}

describe('pnpm test with a peer tool missing', () => {
  it('without CI: the suite needing it is skipped, and the run passes', async () => {
    const r = await runFixture(undefined);
    expect(r.code, r.output).toBe(0);
    const sum = summarize([{ name: 'fixture', report: r.report }]);
    expect(summaryLine(sum)).toBe('1 passed, 0 failed, 1 skipped');
  });

  it('under CI: the file needing it fails, naming the tool, and so does the run', async () => {
    const r = await runFixture('true');
    expect(r.code).toBe(1);
    expect(r.output).toContain('MissingPeerError: peer tool not on PATH: blockrep-no-such-peer-tool');
    const sum = summarize([{ name: 'fixture', report: r.report }]);
    expect(summaryLine(sum)).toBe('0 passed, 1 failed, 0 skipped');
  });
});

describe('summarize', () => {
  it('sums packages, counts a file that failed without a failed test, lists missing reports', () => {
    const d = makeTempDir();
    const report = (name: string, r: object | string) => {
      writeFileSync(d.file(name), typeof r === 'string' ? r : JSON.stringify(r));
      return { name, report: d.file(name) };
    };
    const sum = summarize([
      report('a', {
        numPassedTests: 3,
        numFailedTests: 1,
        numPendingTests: 2,
        numTodoTests: 1,
        testResults: [],
      }),
      report('b', {
        numPassedTests: 2,
        numFailedTests: 1,
        testResults: [
          { status: 'failed', assertionResults: [{ status: 'failed' }, { status: 'passed' }] },
          { status: 'failed', assertionResults: [] },
          { status: 'failed', assertionResults: [{ status: 'passed' }] },
        ],
      }),
      { name: 'c', report: d.file('none') },
      report('d', '{"numPassedTests": 4'),
    ]);
    expect(sum).toEqual({ passed: 5, failed: 4, skipped: 3, missing: ['c', 'd (unreadable report)'] });
    expect(summaryLine(sum)).toBe('5 passed, 4 failed, 3 skipped');
  });
});
