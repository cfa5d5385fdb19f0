import { type ChildProcess, spawn } from 'node:child_process';
import { freePort } from './ports';
import { makeTempDir } from './temp';

/** A single-member etcd (Debian's etcd-server) with its data in a temp dir. */
export interface EtcdServer {
  endpoint: string;
  /** Stops it (SIGTERM) and waits for the exit. */
  stop(): Promise<void>;
  /** Starts it again on the same address and data (an etcd restart). */
  restart(): Promise<void>;
}

export interface EtcdOptions {
  /** The address it listens on (default 127.0.0.1, on free ports; else ports 2379 and 2380). */
  host?: string;
  /** A command prefix it runs under, e.g. `['ip', 'netns', 'exec', 'ns']`. */
  prefix?: string[];
}

export async function startEtcd(o: EtcdOptions = {}): Promise<EtcdServer> {
  const dir = makeTempDir('blockrep-etcd-');
  const host = o.host ?? '127.0.0.1';
  const local = o.host === undefined;
  const client = local ? await freePort() : 2379;
  const peer = local ? await freePort() : 2380;
  const endpoint = `http://${host}:${client}`;
  const args = [
    'etcd',
    '--name',
    'arbiter',
    '--data-dir',
    dir.file('data'),
    '--listen-client-urls',
    endpoint,
    '--advertise-client-urls',
    endpoint,
    '--listen-peer-urls',
    `http://${host}:${peer}`,
    '--initial-advertise-peer-urls',
    `http://${host}:${peer}`,
    '--initial-cluster',
    `arbiter=http://${host}:${peer}`,
    '--log-level',
    'info',
  ];
  const cmd = [...(o.prefix ?? []), ...args];
  let proc: ChildProcess;
  const launch = () =>
    new Promise<void>((resolve, reject) => {
      proc = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      // Ready once it says it serves clients (its log; the test may not reach its address).
      proc.stderr!.on('data', (d: Buffer) => {
        stderr += d;
        if (/ready to serve client requests|serving client traffic/.test(stderr)) resolve();
        if (stderr.length > 1 << 20) stderr = stderr.slice(-4096);
      });
      proc.once('exit', (code) => reject(new Error(`etcd exited ${code}: ${stderr.slice(-2000)}`)));
    });
  const stop = async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    await gone;
  };
  await launch();
  return {
    endpoint,
    stop,
    restart: async () => {
      await stop();
      await launch();
    },
  };
}
