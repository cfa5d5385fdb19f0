// The third act of `pnpm demo`: the pair that runs itself. Two blockrepd --colo on this machine
// (Unix sockets, the lock-file arbiter): the first takes the lease and serves the guest, the
// second is resynced and protects it; the primary is killed with SIGKILL and the secondary takes
// over on its own; the old primary comes back, is fenced, resynced from the bitmaps and protects
// the new primary; `blockrep colo failover` hands the guest back.
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** Sends `signal` and resolves when the process has exited (SIGKILL after 30 s). */
export function stopProcess(proc, signal) {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill(signal);
  });
}

export async function autoPairDemo({ dir, run, blockrepd, blockrep, QmpClient }) {
  const file = (n) => join(dir, `auto-${n}`);
  const daemons = [];
  const hosts = ['a', 'b'];
  const addr = (h, what) => `unix:${file(`${h}-${what}.sock`)}`;
  for (const h of hosts) {
    const peer = h === 'a' ? 'b' : 'a';
    run('qemu-img', ['create', '-q', '-f', 'qcow2', file(`${h}-disk.qcow2`), '64M']);
    const conf = {
      pair: 'demo',
      host: { name: h, replication: addr(h, 'repl'), channel: addr(h, 'chan') },
      peer: { name: peer, replication: addr(peer, 'repl'), channel: addr(peer, 'chan') },
      disk: file(`${h}-disk.qcow2`),
      active: file(`${h}-active.qcow2`),
      hidden: file(`${h}-hidden.qcow2`),
      'state-dir': file(`${h}-state`),
      guest: { address: addr(h, 'guest'), export: 'guest' },
      heartbeat: { interval: 200, timeout: 1000 },
      arbiter: { type: 'lock-file', path: file('lease') },
    };
    writeFileSync(file(`${h}.json`), `${JSON.stringify(conf, null, 2)}\n`);
  }
  console.log(`-- host a's config (${file('a.json')}); b's swaps host and peer`);
  run('cat', [file('a.json')]);

  const qmp = {};
  async function start(h) {
    const sock = file(`${h}-qmp.sock`);
    console.log(`$ blockrepd --qmp unix:${sock} --colo ${file(`${h}.json`)} &`);
    const proc = spawn(process.execPath, [blockrepd, '--qmp', `unix:${sock}`, '--colo', file(`${h}.json`)], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    daemons.push(proc);
    let log = '';
    await new Promise((resolve, reject) => {
      proc.stderr.on('data', (d) => {
        log += d;
        if (log.includes('"msg":"ready"')) resolve();
      });
      proc.once('exit', (c) => reject(new Error(`blockrepd ${h} exited ${c}: ${log}`)));
    });
    qmp[h] = await QmpClient.connect({ path: sock });
    return proc;
  }
  const roleEvent = (h, role) =>
    qmp[h]
      .waitEvent('COLO_ROLE_CHANGE', (e) => e.data.role === role, 60_000)
      .then((e) => {
        console.log(
          `${h} COLO_ROLE_CHANGE: ${e.data.previous} -> ${e.data.role}, epoch ${e.data.epoch}: ${e.data.reason}`,
        );
        return e;
      });
  const colo = (h, verb) =>
    run(process.execPath, [blockrep, 'colo', verb, '--socket', file(`${h}-qmp.sock`)]);
  const guest = (h, cmds) =>
    run('qemu-io', [
      '-f',
      'raw',
      `nbd+unix:///guest?socket=${file(`${h}-guest.sock`)}`,
      ...cmds.flatMap((c) => ['-c', c]),
    ]);
  async function protectedBy(h) {
    for (;;) {
      const s = await qmp[h].execute('query-colo');
      if (s.role === 'primary' && s.stage === 'protected') return s;
      await qmp[h].waitEvent('COLO_ROLE_CHANGE', () => true, 250).catch(() => {});
    }
  }

  try {
    const pa = await start('a');
    guest('a', ['write -q -P 0x11 0 8M']);
    await start('b');
    await protectedBy('a');
    colo('a', 'status');
    guest('a', ['write -q -P 0x22 8M 1M']);
    colo('a', 'checkpoint');

    console.log('-- the primary dies (SIGKILL); the secondary takes over on its own');
    const promoted = roleEvent('b', 'standalone');
    const t0 = performance.now();
    pa.kill('SIGKILL');
    await promoted;
    console.log(
      `(promoted ${Math.round(performance.now() - t0)} ms after the kill: heartbeat timeout, then the lease ran out)`,
    );
    guest('b', ['read -P 0x11 0 8M', 'read -P 0x22 8M 1M', 'write -q -P 0x33 16M 64k']);

    console.log('-- a comes back: fenced (b holds the lease), resynced, protecting b');
    await start('a');
    await protectedBy('b');
    colo('b', 'status');

    console.log('-- a failover on request hands the guest back to a');
    const back = roleEvent('a', 'standalone');
    colo('b', 'failover');
    await back;
    await protectedBy('a');
    guest('a', ['read -P 0x11 0 8M', 'read -P 0x22 8M 1M', 'read -P 0x33 16M 64k']);
    colo('a', 'status');
  } finally {
    for (const c of Object.values(qmp)) await c.close().catch(() => {});
    // Wait for them: an exiting daemon still writes its state and lease files into dir.
    await Promise.all(daemons.map((d) => stopProcess(d, 'SIGTERM')));
  }
}
