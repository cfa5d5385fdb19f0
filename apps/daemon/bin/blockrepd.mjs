#!/usr/bin/env node
// The installed command: runs the built daemon (pnpm build creates dist/). libuv's thread pool
// (all file I/O) defaults to one thread per CPU: measured here, 4 threads on 2 CPUs halved small
// random I/O against 2 (set UV_THREADPOOL_SIZE to choose another size).
import { availableParallelism } from 'node:os';

process.env.UV_THREADPOOL_SIZE ??= String(Math.max(2, availableParallelism()));
await import('../dist/main.js');
