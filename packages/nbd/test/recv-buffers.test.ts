import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../src/byte-queue';
import { RECV_POOL_BYTES, RecvBuffers, recvPoolBytes } from '../src/server/recv-buffers';

/**
 * Delivers n bytes of `fill` into the queue as socket reads would: each read takes what fits in
 * the region next() gives.
 */
function feed(r: RecvBuffers, q: ByteQueue, n: number, fill: number): void {
  while (n > 0) {
    const into = r.next();
    const k = Math.min(n, into.length);
    into.fill(fill, 0, k);
    q.push(r.received(k));
    n -= k;
  }
}

describe('RecvBuffers', () => {
  it('never hands out memory a held payload or a queued chunk still views', () => {
    const r = new RecvBuffers();
    r.recycling = true;
    const q = new ByteQueue((c) => r.release([c]));
    const held: { iov: Buffer[]; fill: number }[] = [];
    // 64 reads of 1 MiB - 7 bytes: payloads span slabs; every other one is held like a write in flight.
    for (let i = 0; i < 64; i++) {
      const fill = i & 0xff;
      feed(r, q, (1 << 20) - 7, fill);
      const iov = q.takeIov((1 << 20) - 7);
      if (i % 2 === 0) {
        r.hold(iov);
        held.push({ iov, fill });
      }
      // Release the oldest held payload now and then (a write completing).
      if (held.length > 5) r.release(held.shift()!.iov);
      for (const h of held) for (const b of h.iov) expect(b.every((x) => x === h.fill)).toBe(true);
    }
  });

  it('reuses slabs once they are full and unreferenced (no allocation in the steady state)', () => {
    const r = new RecvBuffers();
    r.recycling = true;
    const q = new ByteQueue((c) => r.release([c]));
    const seen = new Set<ArrayBufferLike>();
    for (let i = 0; i < 200; i++) {
      feed(r, q, 256 << 10, 1);
      q.skip(256 << 10);
      const b = r.next().buffer;
      // Slabs grow to their largest size within a few reads; from then on the same ones return.
      if (i < 20) seen.add(b);
      else expect(seen.has(b)).toBe(true);
    }
    // A stream of large writes reads into the largest slabs.
    expect(Math.max(...[...seen].map((b) => b.byteLength))).toBe(2 << 20);
  });

  it('gives small slabs to small traffic, shares free ones in a bounded pool, and guards what a payload views', () => {
    const conns = Array.from({ length: 40 }, () => {
      const r = new RecvBuffers();
      r.recycling = true;
      return { r, q: new ByteQueue((c) => r.release([c])) };
    });
    const held: { r: RecvBuffers; iov: Buffer[]; fill: number }[] = [];
    const seen = new Map<ArrayBufferLike, number>();
    for (let i = 0; i < 1200; i++) {
      const { r, q } = conns[i % conns.length]!;
      const fill = i & 0xff;
      // What 16 requests of 4 KiB in flight send at once, at most.
      const n = (1 + (i % 16)) * (4096 + 28);
      feed(r, q, n, fill);
      const next = r.next();
      seen.set(next.buffer, next.buffer.byteLength);
      const iov = q.takeIov(n);
      if (i % 3 === 0) {
        r.hold(iov);
        held.push({ r, iov, fill });
      }
      if (held.length > 8) {
        const h = held.shift()!;
        h.r.release(h.iov);
      }
      for (const h of held) for (const b of h.iov) expect(b.every((x) => x === h.fill)).toBe(true);
      expect(recvPoolBytes()).toBeLessThanOrEqual(RECV_POOL_BYTES);
    }
    // Two slabs of at most 512 KiB per connection, and the pool: far from 40 x 2 x 2 MiB.
    const total = [...seen.values()].reduce((a, b) => a + b, 0);
    expect(total).toBeLessThanOrEqual(40 * 2 * (512 << 10) + RECV_POOL_BYTES);
  });
});
