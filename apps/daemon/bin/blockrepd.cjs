#!/usr/bin/env node
// The installed command: runs the built daemon (pnpm build creates dist/). libuv's thread pool
// (all file I/O) gets one thread per CPU, at least 2 (measured on 2 CPUs: 4 threads lost 10-20%
// of 4 KiB random I/O against 2; set UV_THREADPOOL_SIZE to choose another size). CommonJS on
// purpose: libuv sizes its pool at the first file operation, and Node's ES module loader reads
// files through the pool before an .mjs entry's first line runs, so the size would be ignored.
process.env.UV_THREADPOOL_SIZE ??= String(Math.max(2, require('node:os').availableParallelism()));
import('../dist/main.js');
