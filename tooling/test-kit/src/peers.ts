import { spawn, spawnSync } from 'node:child_process';

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

const known = new Map<string, boolean>();

/** Whether a peer tool is on PATH. */
export function hasPeer(tool: string): boolean {
  let found = known.get(tool);
  if (found === undefined) {
    found = spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
    known.set(tool, found);
  }
  return found;
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

/** qemu-io with the given image options; each command becomes its own -c. */
export function qemuIo(imageArgs: string[], commands: string[], opts?: RunPeerOptions): Promise<PeerResult> {
  const args = [...imageArgs];
  for (const c of commands) args.push('-c', c);
  return runPeer('qemu-io', args, opts);
}
