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
      testTimeout: extra.testTimeout ?? 30_000,
      hookTimeout: 30_000,
      reporters: ['default', ['json', { outputFile: '.vitest-result.json' }]],
      pool: 'forks',
      passWithNoTests: true,
    },
  });
}
