#!/usr/bin/env node
// Compiles the sparse-file addon with the system C compiler against Node's headers. Optional:
// without it the file driver falls back to writing zeroes and reporting everything as data.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';

const here = dirname(new URL(import.meta.url).pathname);
const candidates = [
  join(dirname(dirname(process.execPath)), 'include', 'node'),
  '/usr/include/node',
  '/usr/local/include/node',
];
const include = candidates.find((d) => existsSync(join(d, 'node_api.h')));
if (!include) {
  console.warn('sparse addon: node_api.h not found; the file driver will use its fallbacks');
  process.exit(0);
}
mkdirSync(join(here, 'build'), { recursive: true });
const out = join(here, 'build', 'sparse.node');
const r = spawnSync(
  process.env.CC || 'cc',
  [
    '-shared',
    '-fPIC',
    '-O2',
    '-Wall',
    '-DNODE_GYP_MODULE_NAME=sparse',
    `-I${include}`,
    '-o',
    out,
    join(here, 'sparse.c'),
  ],
  { stdio: 'inherit' },
);
if (r.status !== 0) console.warn('sparse addon: compile failed; the file driver will use its fallbacks');
