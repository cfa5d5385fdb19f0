#!/usr/bin/env node
// Runs the benchmarks with the thread pool size blockrepd uses (two threads per CPU, at least 4),
// so the in-process figures measure what the daemon does, and under the allocator setting every
// side runs with (src/util.ts, BENCH_ENV: our in-process side inherits it from here).
import { spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';

const env = {
  ...process.env,
  UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? String(Math.max(4, 2 * availableParallelism())),
  GLIBC_TUNABLES: 'glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824',
};
const r = spawnSync('tsx', ['--conditions=source', 'src/main.ts', ...process.argv.slice(2)], {
  stdio: 'inherit',
  env,
});
process.exit(r.status ?? 1);
