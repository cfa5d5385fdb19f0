// The second act of `pnpm demo`: a COLO block replication pair, two blockrepd processes set up
// with QEMU's QMP commands. A guest writes through the primary's quorum (its own disk and, over
// NBD, the secondary's disk); the secondary VM's view stays at the last checkpoint plus its own
// writes; after the primary dies, the secondary fails over and qemu-img finds on its disk exactly
// the last checkpoint plus what the secondary VM wrote.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from '@blockrep/replication';
import { stopProcess } from './auto-pair.mjs';

const SIZE = '64M';

/**
 * Runs the act in `dir`. `run(cmd, args)` prints a command and its output; `blockrepd` is the
 * daemon's entry point; `QmpClient` the QMP client class.
 */
export async function coloDemo({ dir, run, blockrepd, QmpClient }) {
  const file = (n) => join(dir, n);
  const uri = (sock, name) => `nbd+unix:///${name}?socket=${file(sock)}`;
  const daemons = [];

  async function start(name) {
    const sock = file(`${name}-qmp.sock`);
    const proc = spawn(process.execPath, [blockrepd, '--qmp', `unix:${sock}`, '--log-level', 'warn'], {
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    daemons.push(proc);
    for (let i = 0; ; i++) {
      try {
        const qmp = await QmpClient.connect({ path: sock });
        return { proc, qmp, exec: (cmd, args) => qmpLine(name, qmp, cmd, args) };
      } catch (e) {
        if (i > 200 || proc.exitCode !== null) throw e;
        await new Promise((r) => setTimeout(r, 25));
      }
    }
  }

  async function qmpLine(name, qmp, cmd, args) {
    console.log(
      `${name} QMP> ${JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd })}`,
    );
    const r = await qmp.execute(cmd, args);
    if (r !== undefined && !(typeof r === 'object' && Object.keys(r).length === 0))
      console.log(`  ${JSON.stringify(r)}`);
    return r;
  }

  const qemuIo = (sock, name, cmds) =>
    run('qemu-io', ['-f', 'raw', uri(sock, name), ...cmds.flatMap((c) => ['-c', c])]);

  try {
    console.log('\n== COLO block replication: a primary and a secondary blockrepd ==');
    for (const n of ['sec-disk', 'active', 'hidden', 'pri-disk'])
      run('qemu-img', ['create', '-q', '-f', 'qcow2', file(`${n}.qcow2`), SIZE]);

    console.log(`$ blockrepd --qmp unix:${file('sec-qmp.sock')} &   # the secondary`);
    const sec = await start('secondary');
    await sec.exec('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'sec-disk',
      file: { driver: 'file', filename: file('sec-disk.qcow2') },
    });
    await sec.exec('nbd-server-start', { addr: { type: 'unix', data: { path: file('sec-nbd.sock') } } });
    await sec.exec('block-export-add', { type: 'nbd', id: 'e-sec', 'node-name': 'sec-disk', writable: true });
    await sec.exec(
      'blockdev-add',
      coloSecondaryOptions({
        nodeName: 'sec-repl',
        activeFile: file('active.qcow2'),
        hiddenFile: file('hidden.qcow2'),
        secondaryDisk: 'sec-disk',
      }),
    );
    await sec.exec('block-export-add', {
      type: 'nbd',
      id: 'e-view',
      'node-name': 'sec-repl',
      name: 'sec-view',
      writable: true,
    });
    await sec.exec('xen-set-replication', { enable: true, primary: false });

    console.log(`$ blockrepd --qmp unix:${file('pri-qmp.sock')} &   # the primary`);
    const pri = await start('primary');
    await pri.exec('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'pri-disk',
      file: { driver: 'file', filename: file('pri-disk.qcow2') },
    });
    await pri.exec('blockdev-add', coloQuorumOptions({ nodeName: 'colo-disk', localDisk: 'pri-disk' }));
    await pri.exec('nbd-server-start', { addr: { type: 'unix', data: { path: file('pri-nbd.sock') } } });
    await pri.exec('block-export-add', {
      type: 'nbd',
      id: 'e-guest',
      'node-name': 'colo-disk',
      name: 'guest',
      writable: true,
    });
    await pri.exec(
      'blockdev-add',
      coloPrimaryChildOptions({
        nodeName: 'pri-repl',
        server: { type: 'unix', path: file('sec-nbd.sock') },
        exportName: 'sec-disk',
      }),
    );
    await pri.exec('x-blockdev-change', { parent: 'colo-disk', node: 'pri-repl' });
    await pri.exec('xen-set-replication', { enable: true, primary: true });
    await pri.exec('query-replication');

    console.log('-- the primary guest writes; the secondary disk gets every write');
    qemuIo('pri-nbd.sock', 'guest', ['write -P 0x11 0 4M', 'flush']);
    run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      uri('pri-nbd.sock', 'guest'),
      uri('sec-nbd.sock', 'sec-disk'),
    ]);
    console.log('-- the secondary VM writes to its own view only');
    qemuIo('sec-nbd.sock', 'sec-view', ['write -P 0x21 1M 1M']);
    console.log('-- checkpoint: the secondary view is the primary guest disk again');
    await pri.exec('xen-colo-do-checkpoint');
    await sec.exec('xen-colo-do-checkpoint');
    qemuIo('sec-nbd.sock', 'sec-view', ['read -P 0x11 0 4M']);
    console.log('-- after the checkpoint: a primary write (lost at failover), a secondary VM write (kept)');
    qemuIo('pri-nbd.sock', 'guest', ['write -P 0x12 2M 1M', 'flush']);
    qemuIo('sec-nbd.sock', 'sec-view', ['write -P 0x22 8M 1M']);

    console.log('-- the primary dies (SIGKILL); the secondary fails over');
    const gone = new Promise((r) => pri.proc.once('exit', r));
    pri.proc.kill('SIGKILL');
    await gone;
    await sec.exec('xen-set-replication', { enable: false, primary: false, failover: true });
    for (let i = 0; i < 400; i++) {
      const [s] = await sec.qmp.execute('query-replication');
      if (s.stage !== 'failover') break;
      await new Promise((r) => setTimeout(r, 25));
    }
    const [state] = await sec.exec('query-replication');
    if (state.stage !== 'done') throw new Error(`failover ended in stage ${state.stage}`);
    const stopped = new Promise((r) => sec.proc.once('exit', r));
    sec.proc.kill('SIGTERM');
    console.log(`secondary blockrepd stopped (exit code ${await stopped})`);

    console.log("-- the secondary disk: the last checkpoint plus the secondary VM's own write");
    const expected = file('expected.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', expected, SIZE]);
    run('qemu-io', ['-f', 'raw', expected, '-c', 'write -q -P 0x11 0 4M', '-c', 'write -q -P 0x22 8M 1M']);
    run('qemu-img', ['check', file('sec-disk.qcow2')]);
    // run() throws on a non-zero exit: compare exits 1 when the images differ.
    run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', file('sec-disk.qcow2'), expected]);
  } finally {
    await Promise.all(daemons.map((d) => stopProcess(d, 'SIGKILL')));
  }
}
