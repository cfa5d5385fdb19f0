/**
 * The self-running COLO pair across hosts: two hosts and etcd on a third as Linux network
 * namespaces (a direct link between the pair for replication and the peer channel, both with
 * mutual x509 TLS; an arbiter network to etcd), each host a blockrepd --colo with its own files,
 * the guest writing through the guest export (qemu-io, or a logging writer).
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import {
  type EtcdServer,
  type HostNetwork,
  hasPeer,
  makeCerts,
  makeHostNetwork,
  makeTempDir,
  qemuImg,
  qemuImgCompare,
  startEtcd,
  waitFor,
} from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll } from '../daemon';
import {
  type Ack,
  type ColoHost,
  dumpLogsIfFailed,
  expectGuestIo,
  makePair,
  roleChange,
  startHost,
  startWriter,
  status,
  waitRole,
} from './hosts';

const isRoot = process.getuid?.() === 0;
/** Guest writes and log lines are polled for; a deadline sized for a busy CI machine. */
const LONG = { timeoutMs: 60_000, intervalMs: 20 };
let net: HostNetwork | null = null;
let etcd: EtcdServer | null = null;

afterEach(async (ctx) => {
  dumpLogsIfFailed(ctx);
  killAll();
  await etcd?.stop();
  etcd = null;
  net?.destroy();
  net = null;
});

interface Setup {
  a: ColoHost;
  b: ColoHost;
  run: (h: ColoHost) => Promise<unknown>;
  tlsDir: string;
}

/** The network, etcd on host e, the two hosts' files and certificates; a started and primary. */
async function setUp(
  o: { heartbeat?: { interval: number; timeout: number }; leaseTtl?: number } = {},
): Promise<Setup> {
  net = makeHostNetwork(['a', 'b', 'e']);
  const n = net;
  etcd = await startEtcd({ host: n.arbiterIp('e'), prefix: n.exec('e') });
  const tlsDir = makeTempDir().file('pki');
  makeCerts(tlsDir, { ips: [n.linkIp('a'), n.linkIp('b')] });
  const sock = makeTempDir();
  const [a, b] = await makePair(
    (['a', 'b'] as const).map((h) => ({
      name: h,
      replication: `${n.linkIp(h)}:10809`,
      channel: `${n.linkIp(h)}:7800`,
      guest: `unix:${sock.file(`${h}-guest.sock`)}`,
    })) as never,
    {
      heartbeat: o.heartbeat ?? { interval: 200, timeout: 1000 },
      arbiter: {
        type: 'etcd',
        endpoints: [etcd.endpoint],
        ...(o.leaseTtl ? { 'lease-ttl': o.leaseTtl } : {}),
      },
      tls: { a: tlsDir, b: tlsDir },
    },
  );
  const run = (h: ColoHost) => startHost(h, n.exec(h.name));
  return { a, b, run, tlsDir };
}

async function protectedPair(s: Setup): Promise<void> {
  await s.run(s.a);
  await waitRole(s.a, 'standalone');
  await s.run(s.b);
  await waitRole(s.a, 'primary', 'protected');
}

describe.runIf(isRoot && hasPeer('ip', 'etcd', 'openssl', 'qemu-io'))(
  'COLO pair across network namespaces',
  () => {
    it('kill -9 of the primary: the secondary serves the checkpoint within the lease; ten failovers back and forth', async () => {
      const s = await setUp();
      const { a, b } = s;
      await protectedPair(s);
      await expectGuestIo(a, ['write -P 0x11 0 4M']);
      await a.d!.qmp.execute('colo-checkpoint');

      // kill -9: b notices after the heartbeat timeout (1000 ms), promotes once the lease it
      // could not renew ran out on etcd (TTL 2 s from a's last renewal).
      const promoted = roleChange(b, 'standalone');
      const t0 = performance.now();
      await a.d!.kill();
      const ev = await promoted;
      const took = performance.now() - t0;
      expect(ev.data?.reason).toMatch(/promoted self to primary in epoch 2: primary a silent for \d+ ms/);
      expect(took).toBeGreaterThan(1000);
      expect(took).toBeLessThan(2000 + 1000 + 1500);
      const noticed = /primary a silent for (\d+) ms, but a \(epoch 1\) holds the lease/.exec(b.d!.log());
      expect(noticed).not.toBeNull();
      console.log(
        `kill -9 -> detected at ${noticed![1]} ms of silence, promoted ${Math.round(took)} ms after the kill (${ev.data?.reason})`,
      );
      await expectGuestIo(b, ['read -P 0x11 0 4M']);

      // a returns: fenced (b holds epoch 2), resynced from b, protecting again.
      await s.run(a);
      await waitRole(b, 'primary', 'protected');
      expect((await status(a)).role).toBe('secondary');

      // Ten failovers on request, alternating; each round's write is read on the new primary.
      let pri = b;
      let sec = a;
      const writes: string[] = [];
      for (let round = 0; round < 10; round++) {
        const cmd = `write -P ${0x20 + round} ${round * 1024}k 512k`;
        await expectGuestIo(pri, [cmd]);
        writes.push(cmd.replace('write', 'read'));
        await pri.d!.qmp.execute('colo-checkpoint');
        const up = roleChange(sec, 'standalone');
        await pri.d!.qmp.execute('colo-failover');
        await up;
        [pri, sec] = [sec, pri];
        await waitRole(pri, 'primary', 'protected');
        await expectGuestIo(pri, writes);
      }
      const st = await status(pri);
      expect(st.epoch).toBe(12);
      expect(await a.d!.stop()).toBe(0);
      expect(await b.d!.stop()).toBe(0);
      expect(await qemuImgCompare(a.file('disk.qcow2'), b.file('disk.qcow2'))).toBe('Images are identical.');
    });

    it('the secondary dies: the primary goes on, its bitmap grows, and the returning peer gets only that', async () => {
      const s = await setUp();
      const { a, b } = s;
      await protectedPair(s);
      await expectGuestIo(a, ['write -P 0x11 0 8M']);
      await a.d!.qmp.execute('colo-checkpoint');
      const dropped = roleChange(a, 'standalone');
      await b.d!.kill();
      await dropped;
      await expectGuestIo(a, ['write -P 0x22 1M 1M', 'write -P 0x33 12M 64k']);
      expect((await status(a))['peer-missing-bytes']).toBe((1 << 20) + (64 << 10));
      await s.run(b);
      const st = await waitRole(a, 'primary', 'protected');
      // b died uncleanly: its own bitmap cannot be trusted, so it asks for everything.
      expect(st['last-resync']).toMatchObject({ peer: 'b', full: true });
      await a.d!.qmp.execute('colo-checkpoint');
      // A clean stop and return of the secondary: only what a wrote meanwhile is copied.
      const dropped2 = roleChange(a, 'standalone');
      expect(await b.d!.stop()).toBe(0);
      await dropped2;
      await expectGuestIo(a, ['write -P 0x44 4M 256k']);
      await s.run(b);
      const st2 = await waitRole(a, 'primary', 'protected');
      expect(st2['last-resync']).toMatchObject({ peer: 'b', full: false, bytes: 256 << 10 });
      expect(await a.d!.stop()).toBe(0);
      expect(await b.d!.stop()).toBe(0);
      expect(await qemuImgCompare(a.file('disk.qcow2'), b.file('disk.qcow2'))).toBe('Images are identical.');
    });

    it('a partition with a writer on each side: the acknowledged writes of the two sides never overlap', async () => {
      const s = await setUp();
      const { a, b } = s;
      await protectedPair(s);
      await a.d!.qmp.execute('colo-checkpoint');
      const acks: Ack[] = [];
      const wa = startWriter(a, 'a', acks, 0);
      const wb = startWriter(b, 'b', acks, 8 << 20);
      await waitFor(() => acks.length > 20, LONG);
      // The link between the hosts goes, and a loses etcd too: a must stop acknowledging before
      // b may take the lease; b promotes and its writer gets answers.
      const promoted = roleChange(b, 'standalone');
      const fenced = roleChange(a, 'fenced');
      n().setLink(false);
      n().setArbiterLink('a', false);
      await fenced;
      await promoted;
      await waitFor(() => acks.some((x) => x.side === 'b'), LONG);
      await wa.stop();
      await wb.stop();
      const lastA = Math.max(...acks.filter((x) => x.side === 'a').map((x) => x.at));
      const firstB = Math.min(...acks.filter((x) => x.side === 'b').map((x) => x.at));
      expect(acks.filter((x) => x.side === 'a').length).toBeGreaterThan(0);
      expect(lastA).toBeLessThan(firstB);
      console.log(`partition: a's last ack ${Math.round(firstB - lastA)} ms before b's first`);
      expect((await status(b)).epoch).toBe(2);
      // b's acknowledged writes are on b's disk.
      const lastB = new Map<number, number>();
      for (const x of acks) if (x.side === 'b') lastB.set(x.offset, x.seq & 0xff);
      const reads = [...lastB].slice(0, 32).map(([off, p]) => `read -P ${p} ${off} 4k`);
      await expectGuestIo(b, reads);
      // The link comes back: a is resynced by b and protects it.
      n().setArbiterLink('a', true);
      n().setLink(true);
      await waitRole(b, 'primary', 'protected');
      expect((await status(a)).role).toBe('secondary');
    });

    it('etcd restarted mid-run: nobody changes role and the guest keeps writing', async () => {
      const s = await setUp({ heartbeat: { interval: 200, timeout: 1000 }, leaseTtl: 6000 });
      const { a, b } = s;
      await protectedPair(s);
      const acks: Ack[] = [];
      const w = startWriter(a, 'a', acks, 0);
      const changes: unknown[] = [];
      for (const h of [a, b])
        h.d!.qmp.on('event', (e: { event: string }) => {
          if (e.event === 'COLO_ROLE_CHANGE') changes.push(e);
        });
      await etcd!.restart();
      const before = acks.length;
      await waitFor(() => acks.length > before + 50, LONG);
      await w.stop();
      expect(changes).toEqual([]);
      expect((await status(a)).role).toBe('primary');
      expect((await status(a)).epoch).toBe(1);
      expect((await status(b)).role).toBe('secondary');
    });

    it('an impostor with a certificate of another CA is refused as the peer, and nothing is written to it', async () => {
      const s = await setUp();
      const { a, b } = s;
      await s.run(a);
      await waitRole(a, 'standalone');
      await expectGuestIo(a, ['write -P 0x11 0 1M']);
      // The impostor takes b's place on the link with certificates of its own CA.
      const rogue = makeTempDir().file('pki');
      makeCerts(rogue, { ips: [n().linkIp('a'), n().linkIp('b')] });
      const conf = JSON.parse(readFileSync(b.config, 'utf8'));
      conf.tls = { dir: rogue };
      writeFileSync(b.config, JSON.stringify(conf));
      await s.run(b);
      await waitFor(() => /refused a peer channel connection/.test(a.d!.log()), {
        ...LONG,
        timeoutMs: 30_000,
      });
      const st = await status(a);
      expect(st.role).toBe('standalone');
      expect(st.peer.alive).toBe(false);
      expect(st['last-resync' as never]).toBeUndefined();
      expect(await b.d!.stop()).toBe(0);
      const map = JSON.parse((await qemuImg(['map', '--output=json', b.file('disk.qcow2')])).stdout) as {
        data: boolean;
      }[];
      expect(map.some((e) => e.data)).toBe(false);
      expect(existsSync(b.file('disk.qcow2'))).toBe(true);
    });
  },
);

function n(): HostNetwork {
  return net!;
}
