import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../src/byte-queue';
import { RecvBuffers } from '../src/server/recv-buffers';

/** Fills the region next() gives with `fill`, as a socket read of n bytes would. */
function read(r: RecvBuffers, n: number, fill: number): Buffer {
  const into = r.next();
  expect(into.length).toBeGreaterThanOrEqual(n);
  into.fill(fill, 0, n);
  return r.received(n);
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
      q.push(read(r, (1 << 20) - 7, fill));
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
      q.push(read(r, 256 << 10, 1));
      q.skip(256 << 10);
      seen.add(r.next().buffer);
    }
    expect(seen.size).toBeLessThanOrEqual(3);
  });
});
