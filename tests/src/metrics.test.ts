/**
 * blockrepd --metrics: the Prometheus endpoint scraped while fio (its nbd engine) writes through
 * an export, and after; job progress while a backup runs; and the daemon's log lines for the same
 * events (NBD clients, a failed QMP command, job transitions).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';

afterEach(() => killAll());

/** One scrape: every sample as "name{labels}" -> value. */
async function scrape(url: string): Promise<Map<string, number>> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  const out = new Map<string, number>();
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return out;
}

/** Scrapes until the predicate holds (the state, not a time, decides). */
async function scrapeUntil(
  url: string,
  ok: (m: Map<string, number>) => boolean,
): Promise<Map<string, number>> {
  for (;;) {
    const m = await scrape(url);
    if (ok(m)) return m;
    await new Promise((r) => setTimeout(r, 20));
  }
}

const MiB = 1 << 20;

describe.runIf(hasPeer('fio', 'qemu-img'))('blockrepd --metrics', () => {
  it('counts and times export and node I/O during fio load, shows jobs, and logs what happened', {
    timeout: 180_000,
  }, async () => {
    const dir = makeTempDir();
    const img = dir.file('disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '64M']);
    const sock = dir.file('nbd.sock');
    const d = await startDaemon(dir.file('qmp.sock'), [
      '--log-level',
      'debug',
      '--metrics',
      '127.0.0.1:0',
      '--blockdev',
      `driver=qcow2,node-name=disk,file.driver=file,file.filename=${img}`,
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
    ]);
    const url = /"url":"(http:\/\/127\.0\.0\.1:\d+\/metrics)"/.exec(d.log())?.[1];
    expect(url).toBeDefined();

    const fio = spawn(
      'fio',
      [
        '--name=load',
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${sock}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=16',
        '--size=32M',
        '--io_size=48M',
        '--randrepeat=1',
        '--output-format=json',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let fioOut = '';
    fio.stdout.on('data', (b: Buffer) => {
      fioOut += b;
    });
    const fioDone = new Promise<number | null>((r) => fio.once('exit', r));
    // During the load: a client on the export, and writes counted as they land.
    const during = await scrapeUntil(
      url!,
      (m) =>
        m.get('blockrep_export_clients{export="disk"}') === 1 &&
        (m.get('blockrep_export_io_ops_total{export="disk",op="write"}') ?? 0) > 0,
    );
    expect(during.get('blockrep_export_io_bytes_total{export="disk",op="write"}')).toBeLessThanOrEqual(
      48 * MiB,
    );
    expect(await fioDone).toBe(0);
    const job = JSON.parse(fioOut.slice(fioOut.indexOf('{'))).jobs[0];
    expect(job.error).toBe(0);

    const after = await scrapeUntil(url!, (m) => m.get('blockrep_export_clients{export="disk"}') === 0);
    const writes = after.get('blockrep_export_io_ops_total{export="disk",op="write"}')!;
    expect(writes).toBe(job.write.total_ios);
    expect(after.get('blockrep_export_io_bytes_total{export="disk",op="write"}')).toBe(48 * MiB);
    expect(after.get('blockrep_export_io_failed_total{export="disk",op="write"}')).toBe(0);
    // Every write timed once, each in some bucket up to +Inf.
    expect(after.get('blockrep_export_io_duration_seconds_count{export="disk",op="write"}')).toBe(writes);
    expect(after.get('blockrep_export_io_duration_seconds_bucket{le="+Inf",export="disk",op="write"}')).toBe(
      writes,
    );
    expect(after.get('blockrep_export_io_duration_seconds_sum{export="disk",op="write"}')).toBeGreaterThan(0);
    // The qcow2 node saw the same bytes, and its file at least as many (metadata too).
    expect(after.get('blockrep_node_io_bytes_total{node="disk",op="write"}')).toBe(48 * MiB);
    const fileNode = [...after.keys()].find((k) =>
      /^blockrep_node_io_bytes_total\{node="#block\d+",op="write"\}$/.test(k),
    )!;
    expect(after.get(fileNode)).toBeGreaterThanOrEqual(48 * MiB);

    // A job's progress and status while it runs (a slow backup), gone once cancelled.
    const qmp: QmpClient = d.qmp;
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'tgt', size: 64 * MiB });
    await qmp.execute('blockdev-backup', {
      'job-id': 'b0',
      device: 'disk',
      target: 'tgt',
      sync: 'full',
      speed: 4 * MiB,
    });
    const running = await scrapeUntil(
      url!,
      (m) =>
        m.get('blockrep_job_status{job="b0",type="backup",status="running"}') === 1 &&
        (m.get('blockrep_job_progress{job="b0",type="backup"}') ?? 0) > 0,
    );
    expect(running.get('blockrep_job_progress_total{job="b0",type="backup"}')).toBe(64 * MiB);
    await qmp.execute('job-cancel', { id: 'b0' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => (e.data as { status: string }).status === 'null');
    const gone = await scrape(url!);
    expect([...gone.keys()].some((k) => k.includes('job="b0"'))).toBe(false);

    // A failed command is logged with QEMU's error, not with its arguments.
    await expect(
      qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': 'x',
        file: { driver: 'file', filename: dir.file('nope') },
      }),
    ).rejects.toBeInstanceOf(QmpError);
    const lines = d
      .log()
      .trim()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toContainEqual(expect.objectContaining({ level: 'info', msg: 'NBD client connected' }));
    expect(lines).toContainEqual(
      expect.objectContaining({ level: 'info', msg: 'NBD client disconnected', export: 'disk' }),
    );
    expect(lines).toContainEqual(
      expect.objectContaining({ level: 'info', msg: 'job status', id: 'b0', status: 'running' }),
    );
    expect(lines).toContainEqual(
      expect.objectContaining({ level: 'info', msg: 'block job cancelled', device: 'b0' }),
    );
    expect(lines).toContainEqual(
      expect.objectContaining({
        level: 'warn',
        msg: 'QMP command failed',
        command: 'blockdev-add',
        class: 'GenericError',
        error: expect.stringContaining('No such file or directory'),
      }),
    );
    expect(lines).toContainEqual(
      expect.objectContaining({ level: 'debug', msg: 'QMP command', command: 'blockdev-backup' }),
    );
    // Only the command's name, the error and the time: its arguments could carry secrets.
    const failed = lines.find((l) => l.msg === 'QMP command failed')!;
    expect(Object.keys(failed).sort()).toEqual(['class', 'command', 'error', 'level', 'ms', 'msg', 'ts']);

    // The Grafana dashboard in the repository asks only for metrics the endpoint has.
    const types = (await (await fetch(url!)).text())
      .split('\n')
      .filter((l) => l.startsWith('# TYPE '))
      .map((l) => l.split(' ')[2]!);
    const dashboard = readFileSync(
      join(import.meta.dirname, '..', '..', 'docs', 'grafana', 'blockrep-dashboard.json'),
      'utf8',
    );
    const used = new Set(
      [...dashboard.matchAll(/blockrep_[a-z_]+/g)].map((x) => x[0].replace(/_(bucket|sum|count)$/, '')),
    );
    expect(used.size).toBeGreaterThan(10);
    for (const name of used) expect(types, name).toContain(name);
    expect(await d.stop()).toBe(0);
  });
});
