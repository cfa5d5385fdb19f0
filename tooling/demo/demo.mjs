#!/usr/bin/env node
// The main job (`pnpm demo`): blockrepd, started with a qemu-storage-daemon command line, serves a
// qcow2 image over NBD; real clients (nbdinfo, qemu-io) use it; QMP shows the graph; the image is
// locked against QEMU's tools while in use; on SIGTERM the daemon shuts down cleanly and qemu-img
// finds the image consistent. Then colo.mjs runs a COLO replication pair through a failover, and
// auto-pair.mjs the self-running pair (blockrepd --colo) through an automatic failover.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { autoPairDemo, stopProcess } from './auto-pair.mjs';
import { coloDemo } from './colo.mjs';

const require = createRequire(import.meta.url);
const { QmpClient } = await import('@blockrep/qmp');
const blockrepd = join(dirname(require.resolve('@blockrep/daemon/package.json')), 'bin', 'blockrepd.cjs');
const blockrep = join(dirname(require.resolve('@blockrep/cli/package.json')), 'bin', 'blockrep.cjs');

const dir = mkdtempSync(join(tmpdir(), 'blockrep-demo-'));
const img = join(dir, 'demo.qcow2');
const nbd = join(dir, 'nbd.sock');
const qmpSock = join(dir, 'qmp.sock');
const uri = `nbd+unix:///demo?socket=${nbd}`;

/** Prints a tool's output indented under its command line. */
function indent(text) {
  if (text) process.stdout.write(`${text.replace(/\n$/, '').replace(/^/gm, '  ')}\n`);
}

function run(cmd, args) {
  console.log(`$ ${cmd} ${args.join(' ')}`);
  const out = execFileSync(cmd, args, { encoding: 'utf8' });
  indent(out);
  return out;
}

run('qemu-img', ['create', '-f', 'qcow2', img, '256M']);
const args = [
  '--blockdev',
  `driver=file,node-name=file0,filename=${img}`,
  '--blockdev',
  'driver=qcow2,node-name=disk0,file=file0',
  '--nbd-server',
  `addr.type=unix,addr.path=${nbd}`,
  '--export',
  'type=nbd,id=exp0,node-name=disk0,name=demo,writable=on',
  '--chardev',
  `socket,id=qmp0,path=${qmpSock},server=on,wait=off`,
  '--monitor',
  'chardev=qmp0',
];
console.log(`$ blockrepd ${args.join(' ')} &`);
const daemon = spawn(process.execPath, [blockrepd, ...args, '--log-level', 'warn'], {
  stdio: ['ignore', 'inherit', 'inherit'],
});
try {
  const qmp = await (async () => {
    for (let i = 0; ; i++) {
      try {
        return await QmpClient.connect({ path: qmpSock });
      } catch (e) {
        if (i > 200 || daemon.exitCode !== null) throw e;
        await new Promise((r) => setTimeout(r, 25));
      }
    }
  })();
  run('nbdinfo', ['--list', `nbd+unix:///?socket=${nbd}`]);
  run('qemu-io', [
    '-f',
    'raw',
    uri,
    '-c',
    'write -P 0xab 1M 4M',
    '-c',
    'write -P 0xcd 128M 64k',
    '-c',
    'read -P 0xab 1M 4M',
    '-c',
    'read -P 0 0 1M',
  ]);
  run('nbdinfo', ['--map', uri]);
  const nodes = await qmp.execute('query-named-block-nodes', { flat: true });
  console.log('QMP query-named-block-nodes:');
  for (const n of nodes)
    console.log(`  ${n['node-name']}: ${n.drv}, ${n.image['virtual-size']} bytes, ${n.file}`);
  console.log('QMP query-block-exports:', JSON.stringify(await qmp.execute('query-block-exports')));
  // The image is locked as QEMU locks it: qemu-img refuses to open it while blockrepd writes it,
  // and reads it with -U (force-share).
  console.log(`$ qemu-img info ${img}`);
  try {
    execFileSync('qemu-img', ['info', img], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    throw new Error('qemu-img opened an image blockrepd is writing: it is not locked');
  } catch (e) {
    if (!e.stderr) throw e;
    indent(e.stderr);
  }
  run('qemu-img', ['info', '-U', img]);
  const gone = new Promise((r) => daemon.once('exit', r));
  daemon.kill('SIGTERM');
  console.log(`blockrepd stopped (exit code ${await gone})`);
  run('qemu-img', ['check', img]);
  run('qemu-io', ['-f', 'qcow2', img, '-c', 'read -P 0xcd 128M 64k']);
  await coloDemo({ dir, run, blockrepd, QmpClient });
  await autoPairDemo({ dir, run, blockrepd, blockrep, QmpClient });
  console.log(
    'demo done: blockrepd served a qcow2 image over NBD to nbdinfo and qemu-io and QEMU read what it wrote;' +
      ' a COLO pair replicated a guest disk, checkpointed and failed over to the last checkpoint;' +
      ' a self-running pair failed over on its own when its primary was killed, re-protected, and failed back.',
  );
} finally {
  await stopProcess(daemon, 'SIGKILL');
  // Each act waits for its daemons to exit, so nothing writes into dir any more.
  rmSync(dir, { recursive: true, force: true });
}
