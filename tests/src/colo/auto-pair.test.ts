/**
 * The self-running COLO pair on one machine: two blockrepd --colo over Unix sockets with the
 * lock-file arbiter. Bring-up (full resync of a fresh peer), checkpoints on request, kill -9 of
 * the primary (the secondary takes over with the last checkpoint plus its own writes), the old
 * primary's return (fenced, resynced, protecting again), and a failover on request back.
 */
import { hasPeer, qemuImg, qemuImgCompare, runPeer, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { BLOCKREP, killAll } from '../daemon';
import {
  type Ack,
  dumpLogsIfFailed,
  expectGuestIo,
  guestIo,
  localSpecs,
  makePair,
  roleChange,
  startHost,
  startWriter,
  status,
  waitRole,
} from './hosts';

const UNTIL = { timeoutMs: 60_000, intervalMs: 50, what: 'checkpoints on the timer' };

afterEach((ctx) => {
  dumpLogsIfFailed(ctx);
  killAll();
});

describe.runIf(hasPeer('qemu-io'))('self-running COLO pair (lock-file arbiter, one machine)', () => {
  it('brings up, fails over on kill -9, re-protects the returning host, and fails back on request', async () => {
    const [a, b] = await makePair(localSpecs());
    await startHost(a, [], ['--metrics', '127.0.0.1:0']);
    const sa = await waitRole(a, 'standalone');
    expect(sa.epoch).toBe(1);
    await expectGuestIo(a, ['write -P 0x11 0 4M']);
    await startHost(b);
    // b comes up secondary, a resyncs it in full and is protected.
    await waitRole(a, 'primary', 'protected');
    expect((await status(b)).role).toBe('secondary');
    await expectGuestIo(a, ['write -P 0x22 4M 1M']);
    const cli = (h: typeof a, ...args: string[]) =>
      runPeer(process.execPath, [BLOCKREP, 'colo', ...args, '--socket', h.file('qmp.sock')]);
    await cli(a, 'checkpoint');
    const human = (await cli(a, 'status')).stdout;
    expect(human).toContain('pair vm1, host a: primary (epoch 1), protected');
    expect(human).toContain('peer b: alive, secondary (epoch 1)');
    expect(human).toMatch(/last resync: b, 16777216 bytes \(full\) in \d+ ms/);
    const bad = await runPeer(
      process.execPath,
      [BLOCKREP, 'colo', 'promote', '--socket', a.file('qmp.sock')],
      {
        okCodes: [1],
      },
    );
    expect(bad.stderr).toContain("Unknown colo command 'promote' (status, checkpoint, failover)");
    const s = await status(a);
    expect(s.checkpoints).toBeGreaterThanOrEqual(2);
    expect(s['peer-missing-bytes']).toBe(0);
    // The same figures on a's Prometheus endpoint, with the forwarded writes and their latency.
    const url = /"url":"(http:\/\/127\.0\.0\.1:\d+\/metrics)"/.exec(a.d!.log())![1]!;
    const m = await (await fetch(url)).text();
    const sample = (name: string) => {
      const line = m.split('\n').find((l) => l.startsWith(`${name} `));
      return line === undefined ? undefined : Number(line.slice(name.length + 1));
    };
    expect(sample('blockrep_colo_stage{pair="vm1",role="primary",stage="protected"}')).toBe(1);
    expect(sample('blockrep_colo_checkpoints_total{pair="vm1"}')).toBe(s.checkpoints);
    expect(sample('blockrep_colo_checkpoint_duration_seconds_count{pair="vm1"}')).toBe(s.checkpoints);
    expect(sample('blockrep_colo_peer_missing_bytes{pair="vm1"}')).toBe(0);
    expect(sample('blockrep_colo_peer_alive{pair="vm1"}')).toBe(1);
    const forwarded = m
      .split('\n')
      .filter((l) => l.startsWith('blockrep_replication_forwarded_bytes_total{'));
    expect(forwarded.map((l) => Number(l.split(' ')[1])).reduce((x, y) => x + y, 0)).toBeGreaterThanOrEqual(
      1 << 20,
    );
    expect(m).toMatch(/^blockrep_replication_forward_duration_seconds_count\{node="[^"]+"\} [1-9]/m);
    expect(m).toMatch(/^blockrep_replication_stage\{node="[^"]+",mode="primary",stage="running"\} 1$/m);

    const promoted = roleChange(b, 'standalone');
    const killedAt = performance.now();
    await a.d!.kill();
    const ev = await promoted;
    const took = performance.now() - killedAt;
    expect(ev.data?.epoch).toBe(2);
    // heartbeat timeout 800 ms, lease TTL 1600 ms: the lease a held must run out first.
    expect(took).toBeGreaterThan(800);
    await expectGuestIo(b, ['read -P 0x11 0 4M', 'read -P 0x22 4M 1M']);
    await expectGuestIo(b, ['write -P 0x33 8M 64k']);

    // a returns: its lease is gone, so it is fenced, set up to be resynced, and protects b.
    await startHost(a);
    await waitRole(b, 'primary', 'protected');
    await waitRole(a, 'secondary');
    // A secondary serves no guest export.
    await expect(guestIo(a, ['read 0 4k'])).rejects.toThrow(/export 'guest' not present/);

    // Fail back on request: b steps down, a takes over with everything.
    const back = roleChange(a, 'standalone');
    expect((await cli(b, 'failover')).stdout).toBe('stepped down; the secondary takes over\n');
    await back;
    await expectGuestIo(a, ['read -P 0x11 0 4M', 'read -P 0x22 4M 1M', 'read -P 0x33 8M 64k']);
    await waitRole(a, 'primary', 'protected');
    expect((await status(b)).role).toBe('secondary');
    process.env.COLO_TEST_LOG && console.log(a.d!.log(), b.d!.log());

    // After a clean stop both disks hold the same bytes, pass qemu-img check, and carry the
    // persistent bitmap of what a lost peer would miss.
    expect(await a.d!.stop()).toBe(0);
    expect(await b.d!.stop()).toBe(0);
    for (const h of [a, b]) {
      expect((await qemuImg(['check', h.file('disk.qcow2')])).stdout).toContain('No errors were found');
      const info = JSON.parse((await qemuImg(['info', '--output=json', h.file('disk.qcow2')])).stdout);
      expect(info['format-specific'].data.bitmaps.map((x: { name: string }) => x.name)).toEqual([
        'colo-peer',
      ]);
    }
    expect(await qemuImgCompare(a.file('disk.qcow2'), b.file('disk.qcow2'))).toBe('Images are identical.');
  });
});

describe.runIf(hasPeer('qemu-io'))('self-running COLO pair: restarts keep role, epoch and bitmap', () => {
  it('a secondary restarted cleanly is resynced from the bitmaps only, and so is a primary that lost its lease', async () => {
    const [a, b] = await makePair(localSpecs());
    await startHost(a);
    await waitRole(a, 'standalone');
    await startHost(b);
    await waitRole(a, 'primary', 'protected');
    await expectGuestIo(a, ['write -P 0x11 0 8M']);
    await a.d!.qmp.execute('colo-checkpoint');

    // The secondary stops cleanly; the primary goes on alone and records what it misses.
    await expectGuestIo(a, ['write -P 0x22 1M 1M']);
    const dropped = roleChange(a, 'standalone');
    expect(await b.d!.stop()).toBe(0);
    await dropped;
    await expectGuestIo(a, ['write -P 0x33 3M 2M']);
    expect((await status(a))['peer-missing-bytes']).toBe(3 << 20);
    await startHost(b);
    expect((await status(b)).role).toBe('secondary');
    const s = await waitRole(a, 'primary', 'protected');
    expect(s['last-resync']).toMatchObject({ peer: 'b', bytes: 3 << 20, full: false });

    // The primary stops cleanly; the secondary takes over once the lease runs out, and the old
    // primary comes back fenced (epoch 1 < 2) and is resynced from both bitmaps.
    await expectGuestIo(a, ['write -P 0x44 6M 64k']);
    const promoted = roleChange(b, 'standalone');
    expect(await a.d!.stop()).toBe(0);
    await promoted;
    await expectGuestIo(b, ['write -P 0x55 10M 128k']);
    await startHost(a);
    const s2 = await waitRole(b, 'primary', 'protected');
    // COLO: b took over with the last checkpoint plus its own writes, so a's 0x44 (after the last
    // checkpoint) was rolled back. Resynced: b's own 128k and the rolled-back 64k.
    expect(s2['last-resync']).toMatchObject({ peer: 'a', full: false });
    expect(s2['last-resync']!.bytes).toBe((64 + 128) << 10);
    expect((await status(a)).role).toBe('secondary');
    expect((await status(a)).epoch).toBe(2);
    await expectGuestIo(b, [
      'read -P 0x11 0 1M',
      'read -P 0x22 1M 1M',
      'read -P 0x33 3M 2M',
      'read -P 0x11 6M 64k',
      'read -P 0x55 10M 128k',
    ]);
    expect(await a.d!.stop()).toBe(0);
    expect(await b.d!.stop()).toBe(0);
    expect(await qemuImgCompare(a.file('disk.qcow2'), b.file('disk.qcow2'))).toBe('Images are identical.');
  });
});

describe.runIf(hasPeer('qemu-io'))('self-running COLO pair: checkpoints on the timer', () => {
  it('checkpoints every interval under guest writes; after a kill -9 the secondary holds every write before the last one', async () => {
    const [a, b] = await makePair(localSpecs(), { checkpointInterval: 300 });
    await startHost(a);
    await waitRole(a, 'standalone');
    await startHost(b);
    await waitRole(a, 'primary', 'protected');
    const acks: Ack[] = [];
    const w = startWriter(a, 'a', acks, 0, 64);
    const first = (await status(a)).checkpoints;
    await waitFor(async () => (await status(a)).checkpoints >= first + 3, UNTIL);
    await w.stop();
    // One more checkpoint after the last acknowledged write, then the primary dies.
    const after = (await status(a)).checkpoints;
    await waitFor(async () => (await status(a)).checkpoints > after, UNTIL);
    const promoted = roleChange(b, 'standalone');
    await a.d!.kill();
    await promoted;
    const last = new Map<number, number>();
    for (const x of acks) last.set(x.offset, x.seq & 0xff);
    expect(last.size).toBe(64);
    await expectGuestIo(
      b,
      [...last].map(([off, p]) => `read -P ${p} ${off} 4k`),
    );
  });
});
