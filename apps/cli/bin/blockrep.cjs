#!/usr/bin/env node
// The installed command: runs the built CLI (pnpm build creates dist/). libuv's thread pool gets
// two threads per CPU, at least 4, as blockrepd's (set UV_THREADPOOL_SIZE to choose another
// size); CommonJS so that the size is set before the pool starts (see blockrepd.cjs).
process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * require('node:os').availableParallelism()));
import('../dist/main.js');
