import { type ChildProcess, spawn } from 'node:child_process';
import { freePort, makeTempDir, waitFor } from '@blockrep/test-kit';

/** A single-member etcd (Debian's etcd-server) on loopback ports, with its data in a temp dir. */
export interface EtcdServer {
  endpoint: string;
  /** Stops it (SIGTERM) and waits for the exit. */
  stop(): Promise<void>;
  /** Starts it again on the same ports and data (an etcd restart). */
  restart(): Promise<void>;
}

export async function startEtcd(): Promise<EtcdServer> {
  const dir = makeTempDir('blockrep-etcd-');
  const client = await freePort();
  const peer = await freePort();
  const endpoint = `http://127.0.0.1:${client}`;
  const args = [
    '--name',
    'arbiter',
    '--data-dir',
    dir.file('data'),
    '--listen-client-urls',
    endpoint,
    '--advertise-client-urls',
    endpoint,
    '--listen-peer-urls',
    `http://127.0.0.1:${peer}`,
    '--initial-advertise-peer-urls',
    `http://127.0.0.1:${peer}`,
    '--initial-cluster',
    `arbiter=http://127.0.0.1:${peer}`,
    '--log-level',
    'error',
  ];
  let proc: ChildProcess;
  const launch = async () => {
    proc = spawn('etcd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr += d));
    const exited = new Promise<never>((_, reject) =>
      proc.once('exit', (code) => reject(new Error(`etcd exited ${code}: ${stderr}`))),
    );
    // Ready when it answers its health endpoint.
    const healthy = waitFor(
      async () => {
        const r = await fetch(`${endpoint}/health`).catch(() => null);
        return r?.ok ? true : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 50, what: 'etcd to answer /health' },
    );
    await Promise.race([healthy, exited]);
    exited.catch(() => {});
  };
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
