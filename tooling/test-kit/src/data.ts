import { randomBytes } from 'node:crypto';

/** A buffer filled with one byte value, as qemu-io's `write -P`. */
export function patternBuffer(bytes: number, pattern: number): Buffer {
  return Buffer.alloc(bytes, pattern & 0xff);
}

export function randomBuffer(bytes: number): Buffer {
  return randomBytes(bytes);
}

/** A small seeded PRNG (mulberry32) so that a failing random schedule reproduces. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
