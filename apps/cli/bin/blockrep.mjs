#!/usr/bin/env node
// The installed command: runs the built CLI (pnpm build creates dist/). libuv's thread pool
// defaults to one thread per CPU, as blockrepd's (set UV_THREADPOOL_SIZE to choose another size).
import { availableParallelism } from 'node:os';

process.env.UV_THREADPOOL_SIZE ??= String(Math.max(2, availableParallelism()));
await import('../dist/main.js');
