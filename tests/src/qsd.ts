import { type ChildProcess, spawn } from 'node:child_process';
import { QmpClient } from '@blockrep/qmp';
import { waitForPidFile } from '@blockrep/test-kit';

/** A qemu-storage-daemon with a QMP monitor on a Unix socket, for side-by-side sessions. */
export async function startQsd(
  qmpPath: string,
  args: string[] = [],
): Promise<{ proc: ChildProcess; qmp: QmpClient; stop(): Promise<void> }> {
  const proc = spawn(
    'qemu-storage-daemon',
    [
      '--chardev',
      `socket,id=qmp0,path=${qmpPath},server=on,wait=off`,
      '--monitor',
      'chardev=qmp0',
      '--pidfile',
      `${qmpPath}.pid`,
      ...args,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  await waitForPidFile(`${qmpPath}.pid`, proc).catch((e: Error) => {
    throw new Error(`${e.message}: ${err}`);
  });
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
