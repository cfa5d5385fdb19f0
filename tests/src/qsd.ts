import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { QmpClient } from '@blockrep/qmp';

/** A qemu-storage-daemon with a QMP monitor on a Unix socket, for side-by-side sessions. */
export async function startQsd(
  qmpPath: string,
  args: string[] = [],
): Promise<{ proc: ChildProcess; qmp: QmpClient; stop(): Promise<void> }> {
  const proc = spawn(
    'qemu-storage-daemon',
    ['--chardev', `socket,id=qmp0,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=qmp0', ...args],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  for (let i = 0; i < 200 && !existsSync(qmpPath); i++) {
    if (proc.exitCode !== null) throw new Error(`qemu-storage-daemon exited: ${err}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const qmp = await QmpClient.connect({ path: qmpPath });
  return {
    proc,
    qmp,
    stop: async () => {
      if (proc.exitCode !== null) return;
      const gone = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await gone;
    },
  };
}
