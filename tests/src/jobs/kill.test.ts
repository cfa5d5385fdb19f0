/**
 * SIGKILL in the middle of a backup, an active commit, a mirror and a COLO secondary's
 * checkpoints: afterwards every image checks without corruption, and the images of the jobs leak
 * no more clusters than qemu-storage-daemon's do when killed at the same points (2 rounds each,
 * 20 with BLOCKREP_LONG_TESTS=1).
 */
import { coloSecondaryOptions } from '@blockrep/replication';
import { hasPeer, makeTempDir, qemuImg, qemuIo } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';
import { startQsd } from '../qsd';

const LONG = process.env.BLOCKREP_LONG_TESTS === '1';
const ROUNDS = LONG ? 20 : 2;
const SIZE = 32 << 20;

afterEach(() => killAll());

type Kind = 'ours' | 'qsd';
type JobKind = 'backup' | 'commit' | 'mirror';

function prng(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    return x / 0x80000000;
  };
}

const qcow2 = (name: string, file: string, backing?: unknown) => ({
  driver: 'qcow2',
  'node-name': name,
  file: { driver: 'file', filename: file },
  ...(backing !== undefined ? { backing } : {}),
});

/** One round: images, a daemon, the job started, killed once it has done `fraction` of its work. */
async function killedJob(
  kind: Kind,
  job: JobKind,
  fraction: number,
): Promise<Record<string, { leaks: number; corruptions: number }>> {
  const d = makeTempDir();
  const f = (n: string) => d.file(n);
  await qemuImg(['create', '-q', '-f', 'qcow2', f('src.qcow2'), String(SIZE)]);
  await qemuIo(['-f', 'qcow2', f('src.qcow2')], ['write -P 0x11 0 24M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', f('tgt.qcow2'), String(SIZE)]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', f('src.qcow2'), '-F', 'qcow2', f('top.qcow2')]);
  await qemuIo(['-f', 'qcow2', f('top.qcow2')], ['write -P 0x22 4M 16M']);
  const daemon = kind === 'ours' ? await startDaemon(f('qmp.sock')) : await startQsd(f('qmp.sock'));
  const q = daemon.qmp;
  // The jobs copy at a pace the kill can land inside (the images are small).
  const speed = 64 << 20;
  if (job === 'commit') {
    await q.execute('blockdev-add', qcow2('top', f('top.qcow2'), qcow2('src', f('src.qcow2'))));
    await q.execute('block-commit', { 'job-id': 'j', device: 'top', speed });
  } else {
    await q.execute('blockdev-add', qcow2('src', f('src.qcow2')));
    await q.execute('blockdev-add', qcow2('tgt', f('tgt.qcow2')));
    const cmd = job === 'backup' ? 'blockdev-backup' : 'blockdev-mirror';
    await q.execute(cmd, { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed });
  }
  // Polled only to pick the moment of the kill; nothing is asserted about time.
  for (;;) {
    const jobs =
      await q.execute<{ 'current-progress': number; 'total-progress': number; status: string }[]>(
        'query-jobs',
      );
    const j = jobs[0];
    if (j?.status !== 'running' || j['current-progress'] >= fraction * j['total-progress']) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  daemon.proc.kill('SIGKILL');
  await new Promise((r) =>
    daemon.proc.exitCode !== null || daemon.proc.signalCode ? r(null) : daemon.proc.once('exit', r),
  );
  const out: Record<string, { leaks: number; corruptions: number }> = {};
  for (const n of job === 'commit' ? ['top', 'src'] : ['src', 'tgt']) {
    const r = await qemuImg(['check', '--output=json', f(`${n}.qcow2`)], { okCodes: [0, 2, 3] });
    const j = JSON.parse(r.stdout);
    out[n] = { leaks: j.leaks ?? 0, corruptions: j.corruptions ?? 0 };
  }
  return out;
}

describe.runIf(hasPeer('qemu-io') && hasPeer('qemu-storage-daemon'))('SIGKILL during jobs', () => {
  for (const job of ['backup', 'commit', 'mirror'] as const) {
    it(`${job}: no corruption, no more leaks than qemu-storage-daemon`, {
      timeout: LONG ? 1_800_000 : 300_000,
    }, async () => {
      const rand = prng(job.length * 7919);
      const leaks = { ours: 0, qsd: 0 };
      for (let r = 0; r < ROUNDS; r++) {
        const fraction = 0.1 + rand() * 0.8;
        for (const kind of ['qsd', 'ours'] as const) {
          const res = await killedJob(kind, job, fraction);
          for (const [img, c] of Object.entries(res)) {
            expect([kind, job, r, img, c.corruptions]).toEqual([kind, job, r, img, 0]);
            leaks[kind] += c.leaks;
          }
        }
      }
      if (process.env.BLOCKREP_KILL_REPORT)
        console.log(
          `${job}: leaked clusters over ${ROUNDS} rounds: blockrepd ${leaks.ours}, qemu-storage-daemon ${leaks.qsd}`,
        );
      expect(leaks.ours).toBeLessThanOrEqual(leaks.qsd);
    });
  }
});

describe.runIf(hasPeer('qemu-io'))('SIGKILL during COLO checkpoints', () => {
  it('the secondary killed while checkpoints empty its active and hidden images: all three check clean of corruption', {
    timeout: LONG ? 1_800_000 : 300_000,
  }, async () => {
    const rand = prng(4242);
    for (let r = 0; r < ROUNDS; r++) {
      const d = makeTempDir();
      const f = (n: string) => d.file(n);
      for (const n of ['sec-disk.qcow2', 'active.qcow2', 'hidden.qcow2'])
        await qemuImg(['create', '-q', '-f', 'qcow2', f(n), String(SIZE)]);
      await qemuIo(['-f', 'qcow2', f('sec-disk.qcow2')], ['write -P 0x31 0 16M']);
      const sec = await startDaemon(f('qmp.sock'));
      const q = sec.qmp;
      const nbd = f('nbd.sock');
      await q.execute('blockdev-add', qcow2('sec-disk', f('sec-disk.qcow2')));
      await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
      await q.execute('block-export-add', {
        type: 'nbd',
        id: 'e1',
        'node-name': 'sec-disk',
        name: 'sec-disk',
        writable: true,
      });
      await q.execute(
        'blockdev-add',
        coloSecondaryOptions({
          nodeName: 'sec-repl',
          activeFile: f('active.qcow2'),
          hiddenFile: f('hidden.qcow2'),
          secondaryDisk: 'sec-disk',
        }),
      );
      await q.execute('block-export-add', {
        type: 'nbd',
        id: 'e2',
        'node-name': 'sec-repl',
        name: 'sec-view',
        writable: true,
      });
      await q.execute('xen-set-replication', { enable: true, primary: false });
      // The primary's forwarded writes (old data goes to hidden) and the secondary VM's own
      // (into active), then checkpoints until the kill.
      const epochs = 2 + Math.floor(rand() * 4);
      for (let e = 0; e < epochs; e++) {
        await qemuIo(['-f', 'raw', `nbd+unix:///sec-disk?socket=${nbd}`], [`write -P ${0x40 + e} ${e}M 2M`]);
        await qemuIo(
          ['-f', 'raw', `nbd+unix:///sec-view?socket=${nbd}`],
          [`write -P ${0x50 + e} ${8 + e}M 2M`],
        );
        if (e < epochs - 1) await q.execute('xen-colo-do-checkpoint');
      }
      const last = q.execute('xen-colo-do-checkpoint').catch(() => {});
      sec.proc.kill('SIGKILL');
      await last;
      await new Promise((res) =>
        sec.proc.exitCode !== null || sec.proc.signalCode ? res(null) : sec.proc.once('exit', res),
      );
      for (const n of ['sec-disk.qcow2', 'active.qcow2', 'hidden.qcow2']) {
        const c = JSON.parse(
          (await qemuImg(['check', '--output=json', f(n)], { okCodes: [0, 2, 3] })).stdout,
        );
        expect([r, n, c.corruptions ?? 0]).toEqual([r, n, 0]);
      }
    }
  });
});
