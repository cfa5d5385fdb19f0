import { type ChildProcess, spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { QmpClient } from '@blockrep/qmp';

const require = createRequire(import.meta.url);
/** The blockrepd bin of the workspace (built by `pnpm build`). */
export const BLOCKREPD = join(
  dirname(require.resolve('@blockrep/daemon/package.json')),
  'bin',
  'blockrepd.cjs',
);

/** The blockrep CLI bin of the workspace. */
export const BLOCKREP = join(dirname(require.resolve('@blockrep/cli/package.json')), 'bin', 'blockrep.cjs');

export interface Daemon {
  proc: ChildProcess;
  qmp: QmpClient;
  qmpPath: string;
  log(): string;
  /** SIGTERM and wait for the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL: the host dies. */
  kill(): Promise<void>;
}

const running = new Set<ChildProcess>();

/** Kills every daemon a test left behind. */
export function killAll(): void {
  for (const p of running) if (p.exitCode === null) p.kill('SIGKILL');
  running.clear();
}

function exited(p: ChildProcess): Promise<number | null> {
  return p.exitCode !== null || p.signalCode !== null
    ? Promise.resolve(p.exitCode)
    : new Promise((r) => p.once('exit', (c) => r(c)));
}

/**
 * Starts blockrepd with a QMP socket (plus extra arguments) and connects a QMP client; `prefix`
 * runs it under another command (`ip netns exec NS`: a host of its own).
 */
export async function startDaemon(
  qmpPath: string,
  args: string[] = [],
  prefix: string[] = [],
): Promise<Daemon> {
  const cmd = [...prefix, process.execPath, BLOCKREPD, '--qmp', `unix:${qmpPath}`, ...args];
  const proc = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(proc);
  let log = '';
  await new Promise<void>((resolve, reject) => {
    proc.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      if (log.includes('"msg":"ready"')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`blockrepd exited with ${code}: ${log}`)));
  });
  const qmp = await QmpClient.connect({ path: qmpPath });
  return {
    proc,
    qmp,
    qmpPath,
    log: () => log,
    stop: async () => {
      proc.kill('SIGTERM');
      return exited(proc);
    },
    kill: async () => {
      proc.kill('SIGKILL');
      await exited(proc);
    },
  };
}
