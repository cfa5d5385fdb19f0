import { defineConfig } from 'vitest/config';

// A package whose one suite needs a peer tool no machine has; test/run-tests.test.ts runs it
// with and without CI. Report and cache go where that test says.
export default defineConfig({
  cacheDir: process.env.FIXTURE_OUT,
  test: {
    include: ['*.check.ts'],
    reporters: ['default', ['json', { outputFile: `${process.env.FIXTURE_OUT}/report.json` }]],
  },
});
