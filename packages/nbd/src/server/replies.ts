import { REPLY_FLAG_DONE, ReplyType, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC } from '../protocol';

/*
 * The transmission phase's replies as bytes (nbdkit's protocol-reply.c in our terms): simple
 * replies, structured chunk headers, error chunks, OFFSET_DATA/OFFSET_HOLE chunk headers. Pure
 * functions: the connection decides what to send and when.
 */

/** Bytes of a structured reply chunk header (and of an OFFSET_DATA chunk's header with its offset). */
export const STRUCTURED_HEADER = 20;
export const OFFSET_DATA_HEADER = STRUCTURED_HEADER + 8;
export const SIMPLE_HEADER = 16;

/** A simple reply: magic, error, handle. */
export function simpleReply(hi: number, lo: number, err: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_HEADER);
  writeSimpleHeader(b, hi, lo, err);
  return b;
}

export function writeSimpleHeader(b: Buffer, hi: number, lo: number, err: number): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(err, 4);
  b.writeUInt32BE(hi, 8);
  b.writeUInt32BE(lo, 12);
}

/** A structured chunk header at `at`: magic, flags, type, handle, payload length. */
export function structuredHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  hi: number,
  lo: number,
  len: number,
): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(hi, at + 8);
  b.writeUInt32BE(lo, at + 12);
  b.writeUInt32BE(len, at + 16);
}

/** The final ERROR chunk: the error and a message of at most 1024 bytes. */
export function errorChunk(hi: number, lo: number, err: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1024));
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER + 6 + msg.length);
  structuredHeader(b, 0, REPLY_FLAG_DONE, ReplyType.ERROR, hi, lo, 6 + msg.length);
  b.writeUInt32BE(err, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

function writeOffset(b: Buffer, offset: number): void {
  b.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
  b.writeUInt32BE(offset >>> 0, 24);
}

/** The header of an OFFSET_DATA chunk of `length` data bytes (the data follows in `b`). */
export function offsetDataHeader(
  b: Buffer,
  flags: number,
  hi: number,
  lo: number,
  offset: number,
  length: number,
): void {
  structuredHeader(b, 0, flags, ReplyType.OFFSET_DATA, hi, lo, 8 + length);
  writeOffset(b, offset);
}

/** An OFFSET_HOLE chunk into `b` (32 bytes): `length` bytes of zeroes at `offset`. */
export function offsetHoleChunk(
  b: Buffer,
  flags: number,
  hi: number,
  lo: number,
  offset: number,
  length: number,
): void {
  structuredHeader(b, 0, flags, ReplyType.OFFSET_HOLE, hi, lo, 12);
  writeOffset(b, offset);
  b.writeUInt32BE(length, 28);
}
