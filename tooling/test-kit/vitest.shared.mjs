import { availableParallelism } from 'node:os';
import { defineConfig } from 'vitest/config';

/** The vitest settings every package shares: packages import each other's src/ (the `source`
 * export condition), and each run leaves a JSON report that the root test command sums up. */
/** @param {{ testTimeout?: number; include?: string[] }} [extra] */
export function sharedConfig(extra = {}) {
  return defineConfig({
    resolve: { conditions: ['source'] },
    ssr: { resolve: { conditions: ['source'] } },
    test: {
      include: extra.include ?? ['src/**/*.test.ts', 'test/**/*.test.ts'],
      // Deadlines for hangs, not for speed: a test that takes 5 s alone takes several times that
      // on a 2-core CI machine running other packages' suites (and maybe another run) beside it.
      testTimeout: extra.testTimeout ?? 120_000,
      hookTimeout: 120_000,
      reporters: ['default', ['json', { outputFile: '.vitest-result.json' }]],
      pool: 'forks',
      // `pnpm test` runs packages side by side (bin/run-tests.mjs: about one per core): half the
      // cores per package (one worker on two cores) keeps the machine from being oversubscribed.
      maxWorkers: Math.max(1, Math.floor(availableParallelism() / 2)),
      passWithNoTests: true,
    },
  });
}
