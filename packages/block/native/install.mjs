#!/usr/bin/env node
// Runs when the package is installed: the prebuilt addon for this platform is used if it loads;
// otherwise it is compiled here (a C compiler and Node's headers are needed). If neither works the
// package still installs, but says so loudly: without the addon image locking is refused (open
// images with locking=off, or set BLOCKREP_LOCKING=warn, to go on without locks).
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname } from 'node:path';

const root = dirname(dirname(new URL(import.meta.url).pathname));
const require = createRequire(import.meta.url);

function loads() {
  try {
    require('node-gyp-build')(root);
    return true;
  } catch {
    return false;
  }
}

if (!loads()) {
  spawnSync(process.execPath, [new URL('./build.mjs', import.meta.url).pathname], { stdio: 'inherit' });
  if (!loads()) {
    console.warn(
      [
        '',
        '*** @blockrep/block: no native addon for this platform, and it could not be built here.',
        '*** Image locking will be refused (QEMU tools could write to images blockrep has open);',
        '*** open images with locking=off or set BLOCKREP_LOCKING=warn to use blockrep without it.',
        '',
      ].join('\n'),
    );
  }
}
