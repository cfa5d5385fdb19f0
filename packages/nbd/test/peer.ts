import { spawn } from 'node:child_process';
import { PeerError, type PeerResult, type RunPeerOptions } from '@blockrep/test-kit';

/**
 * Runs a peer tool like test-kit's runPeer, but with an error handler on the child's stdin: a
 * tool that exits before its (empty) stdin is closed made runPeer raise an unhandled EPIPE.
 */
export function runPeer(tool: string, args: string[], opts: RunPeerOptions = {}): Promise<PeerResult> {
  const okCodes = opts.okCodes ?? [0];
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => {});
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
    child.stdin.end(opts.input ?? '');
  });
}

export const qemuImg = (args: string[], opts?: RunPeerOptions) => runPeer('qemu-img', args, opts);

/** qemu-io with the given image options; each command becomes its own -c. */
export function qemuIo(imageArgs: string[], commands: string[], opts?: RunPeerOptions): Promise<PeerResult> {
  return runPeer('qemu-io', [...imageArgs, ...commands.flatMap((c) => ['-c', c])], opts);
}
