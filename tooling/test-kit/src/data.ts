import { randomBytes } from 'node:crypto';

/** A buffer filled with one byte value, as qemu-io's `write -P`. */
export function patternBuffer(bytes: number, pattern: number): Buffer {
  return Buffer.alloc(bytes, pattern & 0xff);
}

export function randomBuffer(bytes: number): Buffer {
  return randomBytes(bytes);
}
