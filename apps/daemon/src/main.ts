import { spawn } from 'node:child_process';
import { createWriteStream, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { nativeAddon } from '@blockrep/block';
import { parseDaemonArgs, USAGE } from './args';
import { Logger } from './log';
import { type Running, setupDaemon } from './setup';

const READY_FD = 3;

/** --daemonize: the parent starts a detached copy and exits once that copy says it is ready. */
function daemonize(): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, process.argv.slice(1), {
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
      env: { ...process.env, BLOCKREPD_DAEMONIZED: '1' },
    });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
    });
    (child.stdio[READY_FD] as NodeJS.ReadableStream).once('data', () => {
      child.unref();
      (child.stderr as NodeJS.ReadableStream & { destroy(): void }).destroy();
      (child.stdio[READY_FD] as NodeJS.ReadableStream & { destroy(): void }).destroy();
      resolve(0);
    });
    child.once('exit', (code) => {
      process.stderr.write(err);
      resolve(code ?? 1);
    });
  });
}

async function main(): Promise<number> {
  let args: ReturnType<typeof parseDaemonArgs>;
  try {
    args = parseDaemonArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`blockrepd: ${(e as Error).message}\n`);
    return 1;
  }
  if (args.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.version) {
    const { version } = createRequire(import.meta.url)('../package.json') as { version: string };
    process.stdout.write(`blockrepd version ${version} (qemu-storage-daemon 7.2 command line)\n`);
    return 0;
  }
  if (args.daemonize && !process.env.BLOCKREPD_DAEMONIZED) return daemonize();

  const log = new Logger(args.logLevel);
  const addon = nativeAddon();
  if (!addon.loaded) {
    log.warn(
      'native addon missing: image locking is refused (locking=off per node, or BLOCKREP_LOCKING=warn)',
      {
        reason: addon.reason,
        locking: process.env.BLOCKREP_LOCKING === 'warn' ? 'off, with a warning' : 'refused',
      },
    );
  }
  let running: Running | null = null;
  let stopping = false;
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    log.info('shutting down', { why });
    try {
      await running?.metrics?.close();
      await running?.daemon.shutdown();
    } catch (e) {
      log.error('shutdown failed', { error: (e as Error).message });
    }
    for (const s of running?.sockets ?? []) rmSync(s, { force: true });
    if (args.pidfile) rmSync(args.pidfile, { force: true });
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    running = await setupDaemon(args, log, () => void stop('quit'));
  } catch (e) {
    process.stderr.write(`blockrepd: ${(e as Error).message}\n`);
    return 1;
  }
  if (args.pidfile) writeFileSync(args.pidfile, `${process.pid}\n`);
  // Like qemu-storage-daemon, the daemon runs until told to stop even with nothing to serve.
  setInterval(() => {}, 1 << 30);
  log.info('ready', { pid: process.pid });
  if (process.env.BLOCKREPD_DAEMONIZED) {
    // The parent stops listening once told: from here on stderr may be a broken pipe.
    log.muted = true;
    process.stderr.on('error', () => {});
    const ready = createWriteStream('', { fd: READY_FD });
    ready.on('error', () => {});
    ready.end('ready\n');
  }
  return -1; // keep running
}

main().then((code) => {
  if (code >= 0) process.exit(code);
});
