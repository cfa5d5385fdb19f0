import { type ChildProcess, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import * as net from 'node:net';
import { type BlockDriver, createGraph } from '@blockrep/block';
import { NbdServer } from '@blockrep/nbd';
import { freePort } from '@blockrep/test-kit';
import type { BenchRow } from './types';
import { makeTempDirPlain, runPeer } from './util';

/*
 * fio's nbd engine (libnbd, one connection) against our NbdServer (in this process) and against
 * qemu-storage-daemon and qemu-nbd serving the same kind of image: 1 MiB sequential at depth 8
 * (MiB/s) and 4 KiB random at depth 16 (IOPS), reads and writes, raw and qcow2.
 */

const SIZE = '256M';
const RUNTIME_MS = 2500;
const RAMP_MS = 500;
/** Each side runs each workload this many times, interleaved; the best run counts. */
const REPEATS = 2;

interface Workload {
  name: string;
  rw: string;
  bs: string;
  depth: number;
  /** 'bw' in MiB/s or 'iops'. */
  metric: 'bw' | 'iops';
}

const WORKLOADS: Workload[] = [
  { name: '1M seq write qd8', rw: 'write', bs: '1M', depth: 8, metric: 'bw' },
  { name: '1M seq read qd8', rw: 'read', bs: '1M', depth: 8, metric: 'bw' },
  { name: '4k rand write qd16', rw: 'randwrite', bs: '4k', depth: 16, metric: 'iops' },
  { name: '4k rand read qd16', rw: 'randread', bs: '4k', depth: 16, metric: 'iops' },
];

async function fio(uri: string, w: Workload): Promise<number> {
  // Each run starts with no dirty page cache left by the run before (whichever server that was).
  await runPeer('sync', []);
  const r = await runPeer('fio', [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.depth}`,
    `--size=${SIZE}`,
    `--runtime=${RUNTIME_MS}ms`,
    `--ramp_time=${RAMP_MS}ms`,
    '--time_based',
    '--randrepeat=1',
    '--output-format=json',
  ]);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio failed on ${uri}: error ${job.error}`);
  const side = w.rw.includes('write') ? job.write : job.read;
  return w.metric === 'bw' ? side.bw / 1024 : side.iops;
}

function waitPort(port: number, child: ChildProcess): Promise<void> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 10_000;
    const attempt = () => {
      if (child.exitCode !== null)
        return reject(new Error(`${child.spawnfile} exited with ${child.exitCode}`));
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', () => {
        if (Date.now() > deadline) reject(new Error(`${child.spawnfile} did not listen on ${port}`));
        else setTimeout(attempt, 50);
      });
    };
    attempt();
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  await new Promise<void>((r) => {
    child.once('exit', () => r());
    child.kill('SIGTERM');
  });
}

/** A QEMU NBD server process over a copy of the image; returns its URI and a stop function. */
async function startQemu(kind: 'qsd' | 'qemu-nbd', format: string, file: string) {
  const port = await freePort();
  const child =
    kind === 'qsd'
      ? spawn(
          'qemu-storage-daemon',
          [
            '--blockdev',
            `driver=file,filename=${file},node-name=file0`,
            '--blockdev',
            `driver=${format},file=file0,node-name=disk`,
            '--nbd-server',
            `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
            '--export',
            'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
          ],
          { stdio: 'ignore' },
        )
      : spawn('qemu-nbd', ['-f', format, '-x', 'disk', '-b', '127.0.0.1', '-p', String(port), '-t', file], {
          stdio: 'ignore',
        });
  await waitPort(port, child);
  return { uri: `nbd://127.0.0.1:${port}/disk`, stop: () => stop(child) };
}

/** Our server over the image, in this process. */
async function startOurs(format: string, file: string, drivers: BlockDriver[]) {
  const graph = createGraph(drivers);
  const node = await graph.open({
    driver: format,
    'node-name': 'disk',
    file: { driver: 'file', filename: file },
  });
  const server = new NbdServer(graph);
  const addr = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ node, name: 'disk', writable: true });
  const port = addr.type === 'inet' ? addr.port : 0;
  return {
    uri: `nbd://127.0.0.1:${port}/disk`,
    stop: async () => {
      await server.close();
      await graph.closeAll();
    },
  };
}

/**
 * An image full of data: reads then read data on every server (a preallocated but unwritten file
 * reads as holes, which a server may answer without reading at all).
 */
async function makeImage(dir: string, format: string, name: string): Promise<string> {
  const file = `${dir}/${name}.${format}`;
  await runPeer('qemu-img', ['create', '-q', '-f', format, file, SIZE]);
  await runPeer('qemu-io', ['-f', format, '-c', `write -P 0xa5 0 ${SIZE}`, file]);
  return file;
}

async function loadQcow2(): Promise<BlockDriver | null> {
  try {
    const mod = (await import('@blockrep/qcow2')) as { qcow2Driver?: BlockDriver };
    return mod.qcow2Driver ?? null;
  } catch {
    return null;
  }
}

export async function run(): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  const dir = makeTempDirPlain();
  try {
    const qcow2 = await loadQcow2();
    const formats: { format: string; drivers: BlockDriver[]; withQemuNbd: boolean }[] = [
      { format: 'raw', drivers: [], withQemuNbd: true },
    ];
    if (qcow2) formats.push({ format: 'qcow2', drivers: [qcow2], withQemuNbd: true });
    else process.stderr.write('nbd bench: @blockrep/qcow2 has no qcow2Driver yet, raw only\n');
    for (const f of formats) {
      const ours = await startOurs(f.format, await makeImage(dir, f.format, 'ours'), f.drivers);
      const qsd = await startQemu('qsd', f.format, await makeImage(dir, f.format, 'qsd'));
      const qnbd = f.withQemuNbd
        ? await startQemu('qemu-nbd', f.format, await makeImage(dir, f.format, 'qnbd'))
        : null;
      try {
        for (const w of WORKLOADS) {
          const unit = w.metric === 'bw' ? 'MiB/s' : 'IOPS';
          // Interleaved, best of REPEATS: a noisy neighbour hurts all sides alike.
          let a = 0;
          let b = 0;
          let c = 0;
          for (let i = 0; i < REPEATS; i++) {
            a = Math.max(a, await fio(ours.uri, w));
            b = Math.max(b, await fio(qsd.uri, w));
            if (qnbd) c = Math.max(c, await fio(qnbd.uri, w));
          }
          rows.push({ name: `nbd ${f.format} ${w.name}`, ours: a, qemu: b, unit });
          if (qnbd) rows.push({ name: `nbd ${f.format} ${w.name} vs qemu-nbd`, ours: a, qemu: c, unit });
        }
      } finally {
        await ours.stop();
        await qsd.stop();
        await qnbd?.stop();
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
