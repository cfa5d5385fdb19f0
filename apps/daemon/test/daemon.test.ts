import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { QmpClient } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg, qemuIo, runPeer, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';

const bin = new URL('../bin/blockrepd.cjs', import.meta.url).pathname;
const procs: ChildProcess[] = [];

afterEach(() => {
  for (const p of procs.splice(0)) if (p.exitCode === null) p.kill('SIGKILL');
});

/** Starts blockrepd and waits until it logged "ready" (or died). */
function start(
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ proc: ChildProcess; log: () => string }> {
  const proc = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  procs.push(proc);
  let log = '';
  return new Promise((resolve, reject) => {
    proc.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      if (log.includes('"msg":"ready"')) resolve({ proc, log: () => log });
    });
    proc.once('exit', (code) => reject(new Error(`blockrepd exited with ${code}: ${log}`)));
  });
}

function exited(proc: ChildProcess): Promise<number | null> {
  return proc.exitCode !== null ? Promise.resolve(proc.exitCode) : new Promise((r) => proc.once('exit', r));
}

describe('blockrepd process', () => {
  it('sizes the thread pool at two threads per CPU (at least 4) unless UV_THREADPOOL_SIZE says otherwise', async () => {
    const img = makeTempDir().file('disk.raw');
    writeFileSync(img, Buffer.alloc(1 << 20));
    /** The daemon's threads once it opened a file (libuv starts its whole pool at the first). */
    const threads = async (size: string | undefined) => {
      const { UV_THREADPOOL_SIZE: _, ...env } = process.env;
      const { proc } = await start(
        ['--blockdev', `driver=file,node-name=f0,filename=${img}`],
        size === undefined ? env : { ...env, UV_THREADPOOL_SIZE: size },
      );
      const n = readdirSync(`/proc/${proc.pid}/task`).length;
      proc.kill('SIGTERM');
      await exited(proc);
      return n;
    };
    const perCpu = Math.max(4, 2 * availableParallelism());
    const byDefault = await threads(undefined);
    expect(byDefault).toBe(await threads(String(perCpu)));
    // The count does show the pool: three more threads asked for, three more running.
    expect(await threads(String(perCpu + 3))).toBe(byDefault + 3);
  });
});

describe.runIf(hasPeer('qemu-io'))('blockrepd with a qemu-storage-daemon command line', () => {
  it('serves a qcow2 image to qemu-io and nbdcopy, answers QMP, and cleans up on SIGTERM', async () => {
    const dir = makeTempDir();
    const img = dir.file('disk.qcow2');
    await qemuImg(['create', '-f', 'qcow2', img, '64M']);
    const nbdSock = dir.file('nbd.sock');
    const qmpSock = dir.file('qmp.sock');
    const pid = dir.file('pid');
    // Exactly what one would pass to qemu-storage-daemon 7.2.
    const { proc } = await start([
      '--blockdev',
      `driver=file,node-name=file0,filename=${img}`,
      '--blockdev',
      'driver=qcow2,node-name=disk0,file=file0',
      '--nbd-server',
      `addr.type=unix,addr.path=${nbdSock}`,
      '--export',
      'type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on',
      '--chardev',
      `socket,id=qmp0,path=${qmpSock},server=on,wait=off`,
      '--monitor',
      'chardev=qmp0',
      '--pidfile',
      pid,
    ]);
    expect(readFileSync(pid, 'utf8').trim()).toBe(String(proc.pid));
    // Sockets only the daemon's user can use.
    expect(statSync(qmpSock).mode & 0o777).toBe(0o600);
    expect(statSync(nbdSock).mode & 0o777).toBe(0o600);
    const uri = `nbd+unix:///disk0?socket=${nbdSock}`;
    const w = await qemuIo(['-f', 'raw', uri], ['write -P 0x42 1M 2M', 'read -P 0x42 1M 2M']);
    expect(w.stdout).not.toMatch(/fail|error/i);
    if (hasPeer('nbdcopy')) {
      const copy = dir.file('copy.raw');
      await runPeer('nbdcopy', [uri, copy]);
      const data = readFileSync(copy);
      expect(data.length).toBe(64 << 20);
      expect(data.subarray(1 << 20, 3 << 20).every((b) => b === 0x42)).toBe(true);
    }
    const qmp = await QmpClient.connect({ path: qmpSock });
    const nodes = await qmp.execute<{ 'node-name': string; drv: string }[]>('query-named-block-nodes', {
      flat: true,
    });
    expect(nodes.map((n) => [n['node-name'], n.drv])).toEqual(
      expect.arrayContaining([
        ['disk0', 'qcow2'],
        ['file0', 'file'],
      ]),
    );
    expect(await qmp.execute('query-block-exports')).toEqual([
      { type: 'nbd', id: 'exp0', 'node-name': 'disk0', 'shutting-down': false },
    ]);
    await qmp.execute('block-export-del', { id: 'exp0' });
    expect((await qmp.waitEvent('BLOCK_EXPORT_DELETED')).data).toEqual({ id: 'exp0' });
    await expect(qmp.execute('blockdev-del', { 'node-name': 'file0' })).rejects.toMatchObject({
      class: 'GenericError',
    });
    qmp.close?.();
    proc.kill('SIGTERM');
    expect(await exited(proc)).toBe(0);
    expect(existsSync(pid)).toBe(false);
    expect(existsSync(qmpSock)).toBe(false);
    expect(existsSync(nbdSock)).toBe(false);
    const check = await qemuImg(['check', img]);
    expect(check.stdout).toContain('No errors were found on the image.');
    const r = await qemuIo(['-f', 'qcow2', img], ['read -P 0x42 1M 2M']);
    expect(r.stdout).not.toMatch(/fail|error|mismatch/i);
  });

  it('quits on the quit command and refuses bad command lines with a clear message', async () => {
    const dir = makeTempDir();
    const qmpSock = dir.file('q.sock');
    const { proc } = await start([
      '--blockdev',
      'driver=null-co,node-name=n0,size=1M',
      '--qmp',
      `unix:${qmpSock}`,
    ]);
    const qmp = await QmpClient.connect({ path: qmpSock });
    await qmp.execute('quit');
    expect(await exited(proc)).toBe(0);
    const bad = await runPeer(process.execPath, [bin, '--blockdev', 'driver=raw,node-name=x,file=nope'], {
      okCodes: [1],
    });
    expect(bad.stderr).toContain("Cannot find device='nope' nor node-name='nope'");
  });

  it('refuses bad command lines with the exit code and text of qemu-storage-daemon', async () => {
    const dir = makeTempDir();
    const img = dir.file('a.raw');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const lines: string[][] = [
      ['--frobnicate'],
      ['-z'],
      ['extra'],
      ['--blockdev'],
      ['--blockdev', 'driver=bogus,node-name=x'],
      ['--blockdev', 'driver=file,node-name=x'],
      ['--blockdev', 'driver=file,filename=/nonexistent/x,node-name=x'],
      ['--blockdev', 'driver=null-co,node-name=n,bogus=1'],
      ['--nbd-server', 'addr.host=x'],
      ['--nbd-server', 'addr.type=bogus'],
      ['--nbd-server', 'addr.type=unix'],
      ['--nbd-server', 'addr.type=inet,addr.host=127.0.0.1'],
      ['--export', 'id=e,node-name=x'],
      ['--export', 'type=bogus,id=e,node-name=x'],
      ['--export', 'type=nbd,node-name=x'],
      ['--export', 'type=nbd,id=e,node-name=x'],
      ['--blockdev', `driver=file,filename=${img},node-name=n`, '--export', 'type=nbd,id=e,node-name=n'],
      ['--object', 'bogus,id=x'],
      ['--monitor', 'chardev=nope'],
      ['--chardev', 'bogus,id=x'],
      ['--chardev', 'stdio,id=a', '--chardev', 'stdio,id=b'],
      ['--chardev', 'stdio,id=a,bogus=1'],
      ['--chardev', 'ringbuf,id=r,size=3'],
      ['--chardev', 'ringbuf,id=r,size=abc'],
      ['--chardev', 'memory,size=4'],
      ['--chardev', 'ringbuf,id=1r'],
      ['--chardev', 'ringbuf,id=r', '--chardev', 'null,id=r'],
      ['--chardev', 'file,id=f'],
      ['--chardev', 'file,id=f,path=/nonexistent/f'],
      ['--chardev', 'null,id=n,bogus=1'],
      ['--chardev', `socket,id=s,path=${img}.sock`],
    ];
    for (const args of lines) {
      const q = await runPeer('qemu-storage-daemon', args, { okCodes: [0, 1] });
      const b = await runPeer(process.execPath, [bin, ...args], { okCodes: [0, 1] });
      const line = args.join(' ');
      // Our structured log lines (JSON, at the default level info) aside, stderr is the same.
      const stderr = b.stderr
        .split('\n')
        .filter((l) => !l.startsWith('{'))
        .join('\n');
      expect({ line, code: b.code, stderr }).toEqual({
        line,
        code: q.code,
        stderr: q.stderr.replaceAll('qemu-storage-daemon', 'blockrepd'),
      });
    }
  });

  it("serves QMP on stdin/stdout with --chardev stdio, as QEMU's own tests drive qemu-storage-daemon", async () => {
    const proc = spawn(process.execPath, [bin, '--chardev', 'stdio,id=s', '--monitor', 'chardev=s'], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    procs.push(proc);
    const lines: Record<string, unknown>[] = [];
    let buf = '';
    proc.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        lines.push(JSON.parse(buf.slice(0, i)));
        buf = buf.slice(i + 1);
      }
    });
    proc.stdin!.write('{"execute":"qmp_capabilities"}\n{"execute":"query-block-exports","id":7}\n');
    await waitFor(() => lines.length >= 3, { what: 'three QMP messages on stdout' });
    expect(Object.keys(lines[0]!)).toEqual(['QMP']);
    expect(lines.slice(1)).toEqual([{ return: {} }, { return: [], id: 7 }]);
    proc.stdin!.write('{"execute":"quit"}\n');
    expect(await exited(proc)).toBe(0);
  });

  it('keeps running with nothing to do, as qemu-storage-daemon does, until SIGTERM', async () => {
    const { proc } = await start([]);
    expect(proc.exitCode).toBe(null);
    proc.kill('SIGTERM');
    expect(await exited(proc)).toBe(0);
  });

  it('refuses a bad --colo config with the key named, before anything starts', async () => {
    const dir = makeTempDir();
    const conf = dir.file('colo.json');
    writeFileSync(
      conf,
      JSON.stringify({
        pair: 'vm1',
        host: { name: 'a', replication: 'unix:/tmp/r', channel: 'unix:/tmp/c' },
        peer: { name: 'b', replication: 'unix:/tmp/r2', channel: 'unix:/tmp/c2' },
        disk: 'disk.qcow2',
        active: 'active.qcow2',
        hidden: 'hidden.qcow2',
        'state-dir': 'state',
        guest: { address: 'unix:/tmp/g', export: 'guest' },
        heartbeat: { interval: 500, timeout: 100 },
        arbiter: { type: 'lock-file', path: 'lease' },
      }),
    );
    const qmpSock = dir.file('q.sock');
    const bad = await runPeer(process.execPath, [bin, '--qmp', `unix:${qmpSock}`, '--colo', conf], {
      okCodes: [1],
    });
    expect(bad.stderr).toContain(
      `blockrepd: ${conf}: 'heartbeat.timeout' must be longer than 'heartbeat.interval' (100 <= 500)`,
    );
    expect(existsSync(qmpSock)).toBe(false);
  });

  it('--daemonize returns once serving, and the daemon keeps running', async () => {
    const dir = makeTempDir();
    const qmpSock = dir.file('q.sock');
    const pid = dir.file('pid');
    const r = await runPeer(process.execPath, [
      bin,
      '--daemonize',
      '--pidfile',
      pid,
      '--blockdev',
      'driver=null-co,node-name=n0',
      '--qmp',
      `unix:${qmpSock}`,
    ]);
    expect(r.code).toBe(0);
    const qmp = await QmpClient.connect({ path: qmpSock });
    expect((await qmp.execute<{ qemu: { major: number } }>('query-version')).qemu.major).toBe(7);
    await qmp.execute('quit');
    await waitFor(() => !existsSync(pid), { intervalMs: 20, what: 'the pid file removed' }).catch(() => {});
    expect(existsSync(pid)).toBe(false);
  });
});
