import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { waitFor } from './wait';

/** A QEMU (or libnbd, fio) peer tool exited with an error: the message carries its stderr. */
export class PeerError extends Error {
  constructor(
    readonly command: string,
    readonly code: number | null,
    readonly stdout: string,
    readonly stderr: string,
  ) {
    super(`${command} exited with ${code}: ${stderr.trim() || stdout.trim()}`);
  }
}

export interface PeerResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunPeerOptions {
  /** Exit codes that count as success (default [0]). */
  okCodes?: number[];
  input?: string | Buffer;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

/**
 * Whether a missing peer tool fails the tests it gates instead of skipping them: when the
 * environment variable CI is set (to anything but '', '0' or 'false'). A CI machine is set up
 * with every peer (tooling/setup.sh), so a missing one there is a broken set-up, not a choice.
 */
export function peersRequired(env: NodeJS.ProcessEnv = process.env): boolean {
  const ci = env.CI?.trim().toLowerCase();
  return ci !== undefined && ci !== '' && ci !== '0' && ci !== 'false';
}

/** Peer tools a test needs are not on PATH, and CI is set (see `peersRequired`). */
export class MissingPeerError extends Error {
  constructor(readonly tools: string[]) {
    super(
      `peer tool${tools.length > 1 ? 's' : ''} not on PATH: ${tools.join(', ')} (CI is set, so the tests ` +
        `needing ${tools.length > 1 ? 'them' : 'it'} fail instead of being skipped; tooling/setup.sh installs the peers)`,
    );
    this.name = 'MissingPeerError';
  }
}

const known = new Map<string, boolean>();

function onPath(tool: string): boolean {
  let found = known.get(tool);
  if (found === undefined) {
    found = spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
    known.set(tool, found);
  }
  return found;
}

/**
 * Whether the peer tools are all on PATH: the gate of the tests that need them,
 * `describe.runIf(hasPeer('qemu-io'))`. Without CI a missing tool returns false, and the tests
 * are skipped; under CI it throws `MissingPeerError`, so the file (or test) that needs the tool
 * fails, naming it, instead of being skipped.
 */
export function hasPeer(...tools: [string, ...string[]]): boolean {
  const missing = tools.filter((t) => !onPath(t));
  if (missing.length === 0) return true;
  if (peersRequired()) throw new MissingPeerError(missing);
  return false;
}

/**
 * Waits until a peer daemon has written its pid file and resolves with the pid: qemu-nbd
 * (`--pid-file`) and qemu-storage-daemon (`--pidfile`) write it once their images are open and
 * their sockets serve. Their sockets appear earlier (qemu-nbd listens before it opens the image),
 * so a test going by the socket can meet a daemon that holds no image lock yet, or whose socket
 * refuses connections still. Rejects as soon as the daemon exits.
 */
export function waitForPidFile(path: string, daemon: ChildProcess, timeoutMs = 30_000): Promise<number> {
  return waitFor(
    () => {
      if (daemon.exitCode !== null || daemon.signalCode !== null) {
        throw new Error(
          `${daemon.spawnargs.join(' ')} exited (${daemon.exitCode ?? daemon.signalCode}) before writing ${path}`,
        );
      }
      // QEMU creates the file, then writes "<pid>\n" into it.
      const text = existsSync(path) ? readFileSync(path, 'utf8') : '';
      return /^\d+\n/.test(text) ? Number.parseInt(text, 10) : 0;
    },
    { intervalMs: 20, timeoutMs, what: `${daemon.spawnfile}'s pid file ${path}` },
  );
}

/** Runs a peer tool to completion; rejects with its stderr on an unexpected exit code. */
export function runPeer(tool: string, args: string[], opts: RunPeerOptions = {}): Promise<PeerResult> {
  const okCodes = opts.okCodes ?? [0];
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const stdout = Buffer.concat(out).toString();
      const stderr = Buffer.concat(err).toString();
      const cmd = `${tool} ${args.join(' ')}`;
      if (code === null) reject(new PeerError(cmd, null, stdout, `killed by ${signal}\n${stderr}`));
      else if (!okCodes.includes(code)) reject(new PeerError(cmd, code, stdout, stderr));
      else resolve({ code, stdout, stderr });
    });
    // A tool that exits without reading its stdin must not crash the test run with EPIPE.
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}

export function qemuImg(args: string[], opts?: RunPeerOptions): Promise<PeerResult> {
  return runPeer('qemu-img', args, opts);
}

export async function qemuImgJson<T = any>(args: string[]): Promise<T> {
  const r = await runPeer('qemu-img', [...args, '--output=json']);
  return JSON.parse(r.stdout) as T;
}

/**
 * qemu-img compare's verdict on two images (trimmed stdout, e.g. 'Images are identical.'), with
 * their formats given explicitly when known so no probing happens.
 */
export async function qemuImgCompare(
  a: string,
  b: string,
  formats: { a?: string; b?: string } = {},
): Promise<string> {
  const args = ['compare'];
  if (formats.a) args.push('-f', formats.a);
  if (formats.b) args.push('-F', formats.b);
  const r = await runPeer('qemu-img', [...args, a, b], { okCodes: [0, 1] });
  return r.stdout.trim();
}

/** qemu-io with the given image options; each command becomes its own -c. */
export function qemuIo(imageArgs: string[], commands: string[], opts?: RunPeerOptions): Promise<PeerResult> {
  const args = [...imageArgs];
  for (const c of commands) args.push('-c', c);
  return runPeer('qemu-io', args, opts);
}
