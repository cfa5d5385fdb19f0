#!/usr/bin/env node
// The installed command: runs the built daemon (pnpm build creates dist/). libuv's thread pool
// (all file I/O) gets two threads per CPU, at least 4: a job that copies then reads from the disk
// while its writes go into the page cache (measured on 2 CPUs: a full mirror of 1 GiB 15-20%
// faster than with 2 threads; 1 MiB streams over NBD unchanged). Set UV_THREADPOOL_SIZE to choose
// another size. CommonJS on purpose: libuv sizes its pool at the first file operation, and Node's
// ES module loader reads files through the pool before an .mjs entry's first line runs, so the
// size would be ignored.
process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * require('node:os').availableParallelism()));
import('../dist/main.js');
