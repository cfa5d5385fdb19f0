#!/usr/bin/env node
// Compiles the native addon (sparse files, OFD image locks, non-blocking cached reads) with the
// system C compiler against Node's N-API headers, into prebuilds/<platform>-<arch>/node.napi.node
// where node-gyp-build finds it. On x64 Linux with aarch64-linux-gnu-gcc installed it also
// cross-compiles the linux-arm64 build, so that a packed package carries both.
//
//   node native/build.mjs            the host's build (skipped with a warning without a compiler)
//   node native/build.mjs --all      the host's, and the cross builds that can be made here
//   node native/build.mjs --require  fail (exit 1) unless the host's build was made
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';

const here = dirname(new URL(import.meta.url).pathname);
const root = dirname(here);
const all = process.argv.includes('--all');
const required = process.argv.includes('--require');

const candidates = [
  join(dirname(dirname(process.execPath)), 'include', 'node'),
  '/usr/include/node',
  '/usr/local/include/node',
];
const include = candidates.find((d) => existsSync(join(d, 'node_api.h')));

function has(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function build(arch, cc) {
  const dir = join(root, 'prebuilds', `${process.platform}-${arch}`);
  mkdirSync(dir, { recursive: true });
  const out = join(dir, 'node.napi.node');
  // Compiled beside it and renamed into place: a process loading the addon meanwhile (tests, a
  // pack while others run) sees the old file or the new one, never a half-written one.
  const tmp = `${out}.${process.pid}.tmp`;
  const r = spawnSync(
    cc,
    [
      '-shared',
      '-fPIC',
      '-O2',
      '-Wall',
      '-DNODE_GYP_MODULE_NAME=sparse',
      `-I${include}`,
      '-o',
      tmp,
      join(here, 'sparse.c'),
      join(here, 'writer.c'),
      '-lpthread',
    ],
    { stdio: 'inherit' },
  );
  if (r.status !== 0) {
    rmSync(tmp, { force: true });
    console.warn(`blockrep native addon: the ${arch} build failed (${cc})`);
    return false;
  }
  renameSync(tmp, out);
  console.log(`blockrep native addon: ${out}`);
  return true;
}

if (!include) {
  console.warn('blockrep native addon: node_api.h not found, nothing built (image locking will be refused)');
  process.exit(required ? 1 : 0);
}
const hostCc = process.env.CC || 'cc';
const hostOk = has(hostCc) && build(process.arch, hostCc);
if (!hostOk) {
  console.warn('blockrep native addon: no host build (image locking will be refused at open)');
  if (required) process.exit(1);
}
if (all && process.platform === 'linux') {
  const cross = { x64: ['arm64', 'aarch64-linux-gnu-gcc'], arm64: ['x64', 'x86_64-linux-gnu-gcc'] }[
    process.arch
  ];
  if (cross && has(cross[1])) build(cross[0], cross[1]);
  else if (cross) console.warn(`blockrep native addon: ${cross[1]} not found, no ${cross[0]} build`);
}
