import { type EtcdServer, hasPeer, startEtcd } from '@blockrep/test-kit';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ArbiterUnavailable, EtcdArbiter } from '../src/index';

describe.runIf(hasPeer('etcd'))('etcd arbiter (a real etcd)', () => {
  let etcd: EtcdServer;
  const open: EtcdArbiter[] = [];
  let pairNo = 0;
  beforeAll(async () => {
    etcd = await startEtcd();
  });
  afterAll(async () => {
    for (const a of open) await a.close();
    await etcd?.stop();
  });

  /** Two sides of a fresh pair. */
  function pair(leaseTtl = 2000) {
    const name = `pair${++pairNo}`;
    const make = () => {
      const a = new EtcdArbiter({ endpoints: [etcd.endpoint], pair: name, leaseTtl });
      open.push(a);
      return a;
    };
    return [make(), make()] as const;
  }

  it('one holder at a time; renewals keep the epoch; a release lets the other in with the next epoch', async () => {
    const [a, b] = pair();
    expect(await a.read()).toBeNull();
    expect(await a.acquire('a')).toEqual({ holder: 'a', epoch: 1, ttl: 2000 });
    expect(await b.acquire('b')).toBeNull();
    expect(await a.acquire('a')).toEqual({ holder: 'a', epoch: 1, ttl: 2000 });
    expect(await b.read()).toEqual({ holder: 'a', epoch: 1, ttl: 2000 });
    await b.release('b'); // not b's: nothing happens
    expect(await b.read()).toEqual({ holder: 'a', epoch: 1, ttl: 2000 });
    await a.release('a');
    expect(await b.read()).toBeNull();
    expect(await b.acquire('b')).toEqual({ holder: 'b', epoch: 2, ttl: 2000 });
    expect(await a.acquire('a')).toBeNull();
  });

  it('a holder that stops renewing loses the lease when etcd expires it; the other side gets the next epoch', async () => {
    const [a, b] = pair(1000);
    expect((await a.acquire('a'))?.epoch).toBe(1);
    // a goes silent; b may take it once etcd dropped the key, not before.
    const start = Date.now();
    let lease = await b.acquire('b');
    while (!lease) {
      await new Promise((r) => setTimeout(r, 50));
      lease = await b.acquire('b');
    }
    expect(Date.now() - start).toBeGreaterThanOrEqual(500);
    expect(lease).toEqual({ holder: 'b', epoch: 2, ttl: 1000 });
    // a's renewal fails: it must know it lost.
    expect(await a.acquire('a')).toBeNull();
  });

  it('sides racing for the lease: exactly one wins each round', async () => {
    for (let round = 0; round < 10; round++) {
      const sides = Array.from({ length: 4 }, (_, i) => {
        const a = new EtcdArbiter({ endpoints: [etcd.endpoint], pair: `race${round}`, leaseTtl: 2000 });
        open.push(a);
        return { a, name: `s${i}` };
      });
      const got = await Promise.all(sides.map(({ a, name }) => a.acquire(name)));
      const winners = got.filter((l) => l !== null);
      expect(winners).toHaveLength(1);
      expect(winners[0]!.epoch).toBe(1);
    }
  });

  it('etcd down: the arbiter is unavailable within its deadline; after a restart the holder renews', async () => {
    const [a] = pair(3000);
    expect((await a.acquire('a'))?.epoch).toBe(1);
    await etcd.stop();
    const t = Date.now();
    await expect(a.acquire('a')).rejects.toThrow(ArbiterUnavailable);
    // The deadline is twice the call timeout (1 s of a 3 s lease): well before the lease runs out.
    expect(Date.now() - t).toBeLessThan(3000);
    await etcd.restart();
    // etcd keeps leases across a restart (and extends them): the same holder goes on, same epoch.
    const lease = await waitForLease(() => a.acquire('a'));
    expect(lease).toEqual({ holder: 'a', epoch: 1, ttl: 3000 });
  });
});

async function waitForLease<T>(f: () => Promise<T | null>): Promise<T> {
  for (;;) {
    const v = await f().catch(() => null);
    if (v) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
}
