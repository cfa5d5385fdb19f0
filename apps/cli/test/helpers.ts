import { spawn } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { makeTempDir, PeerError, type PeerResult, type RunPeerOptions } from '@blockrep/test-kit';

export const bin = new URL('../bin/blockrep.mjs', import.meta.url).pathname;

/**
 * Runs a tool to completion (as test-kit's runPeer, which can fail the whole run with EPIPE when
 * a fast tool exits before its empty stdin is closed: here a closed stdin is no error).
 */
export function run(tool: string, args: string[], opts: RunPeerOptions = {}): Promise<PeerResult> {
  const okCodes = opts.okCodes ?? [0];
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => {});
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
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
    child.stdin.end(opts.input ?? '');
  });
}

export const qemuImg = (args: string[], opts?: RunPeerOptions) => run('qemu-img', args, opts);

export async function qemuImgJson<T = any>(args: string[]): Promise<T> {
  return JSON.parse((await qemuImg([...args, '--output=json'])).stdout) as T;
}

/** qemu-io with the given image options; each command becomes its own -c. */
export function qemuIo(imageArgs: string[], commands: string[]): Promise<PeerResult> {
  return run('qemu-io', [...imageArgs, ...commands.flatMap((c) => ['-c', c])]);
}

/** Runs the CLI as a user would; exit codes outside okCodes reject. */
export function blockrep(
  args: string[],
  okCodes = [0],
  env?: NodeJS.ProcessEnv,
  input?: string,
): Promise<PeerResult> {
  return run('node', [bin, ...args], { okCodes, env, input });
}

/** Runs the CLI and parses its stdout as JSON. */
export async function blockrepJson<T = any>(args: string[], okCodes = [0]): Promise<T> {
  return JSON.parse((await blockrep([...args, '--output=json'], okCodes)).stdout) as T;
}

function readU64(fd: number, at: number): number {
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, at);
  return Number(b.readBigUInt64BE(0) & 0x00fffffffffffe00n);
}

/**
 * Damages a qcow2 image with data in its first cluster: 'leak' forgets the L2 entry (the data
 * cluster stays counted: one leak), 'corrupt' zeroes the refcount of the L2 table (in use).
 */
export function damageQcow2(path: string, how: 'leak' | 'corrupt'): void {
  const fd = openSync(path, 'r+');
  try {
    const l1 = readU64(fd, 40);
    const l2 = readU64(fd, l1);
    if (how === 'leak') {
      writeSync(fd, Buffer.alloc(8), 0, 8, l2);
      return;
    }
    const clusterBits = Buffer.alloc(4);
    readSync(fd, clusterBits, 0, 4, 20);
    const cs = 2 ** clusterBits.readUInt32BE(0);
    const refblock = readU64(fd, readU64(fd, 48));
    writeSync(fd, Buffer.alloc(2), 0, 2, refblock + 2 * (l2 / cs));
  } finally {
    closeSync(fd);
  }
}

/** raw base <- qcow2 mid <- qcow2 top, with data, zero clusters and holes at every level. */
export async function makeChain() {
  const dir = makeTempDir();
  const base = dir.file('base.raw');
  const mid = dir.file('mid.qcow2');
  const top = dir.file('top.qcow2');
  await qemuImg(['create', '-q', '-f', 'raw', base, '8M']);
  await qemuIo(['-f', 'raw', base], ['write -P 1 0 256k', 'write -P 2 3M 64k', 'write -P 3 7M 1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', mid]);
  await qemuIo(['-f', 'qcow2', mid], ['write -P 4 64k 64k', 'write -z 3M 64k', 'write -P 5 5M 300k']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', mid, '-F', 'qcow2', top]);
  await qemuIo(['-f', 'qcow2', top], ['write -P 6 100k 8k', 'write -z 7M 512k', 'write -P 7 6M 4k']);
  return { dir, base, mid, top };
}
