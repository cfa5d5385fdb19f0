import type { BlockBackend, DirtyBitmap } from '@blockrep/block';
import { STATE_DIRTY, STATE_HOLE, STATE_ZERO } from '../protocol';

/*
 * Extents for the transmission phase (nbdkit's extents.c in our terms): block status descriptors
 * of the base:allocation, qemu:allocation-depth and qemu:dirty-bitmap contexts, and the data/hole
 * runs a sparse read sends. Descriptors are flat [length, flags, length, flags, ...].
 */

/**
 * base:allocation (hole/zero) or qemu:allocation-depth (1 + the backing-chain layer holding the
 * data, 0 for none) descriptors, at most `max` of them.
 */
export async function chainExtents(
  backend: BlockBackend,
  depth: boolean,
  offset: number,
  length: number,
  max: number,
): Promise<number[]> {
  const out: number[] = [];
  const end = offset + length;
  for (let pos = offset; pos < end; ) {
    const st = await backend.blockStatus(pos, end - pos);
    if (st.bytes <= 0) break;
    const f = depth
      ? st.allocated
        ? st.depth + 1
        : 0
      : (st.data ? 0 : STATE_HOLE) | (st.zero ? STATE_ZERO : 0);
    const n = out.length;
    if (n > 0 && out[n - 1] === f) out[n - 2]! += st.bytes;
    else {
      if (n / 2 >= max) break;
      out.push(st.bytes, f);
    }
    pos += st.bytes;
  }
  if (out.length === 0) out.push(length, 0);
  return out;
}

/** qemu:dirty-bitmap descriptors: dirty extents flagged 1, clean ones 0. */
export function bitmapExtents(bm: DirtyBitmap, offset: number, length: number, max: number): number[] {
  const out: number[] = [];
  const end = offset + length;
  let pos = offset;
  const add = (bytes: number, f: number) => {
    if (bytes <= 0 || out.length / 2 >= max) return;
    out.push(bytes, f);
  };
  for (const [s, n] of bm.dirtyExtents(offset, length)) {
    add(s - pos, 0);
    add(n, STATE_DIRTY);
    pos = s + n;
    if (out.length / 2 >= max) break;
  }
  if (pos < end) add(end - pos, 0);
  if (out.length === 0) out.push(length, 0);
  return out;
}

/** A run of a sparse read: data, or zeroes sent as a hole. */
export interface ReadRun {
  offset: number;
  bytes: number;
  zero: boolean;
}

/**
 * The data and zero runs of [offset, offset+length), or null when block status cannot say (the
 * read then goes out as plain data).
 */
export async function readRuns(
  backend: BlockBackend,
  offset: number,
  length: number,
): Promise<ReadRun[] | null> {
  const runs: ReadRun[] = [];
  try {
    for (let pos = offset; pos < offset + length; ) {
      const st = await backend.blockStatus(pos, offset + length - pos);
      if (st.bytes <= 0) return null;
      const last = runs[runs.length - 1];
      if (last && last.zero === st.zero) last.bytes += st.bytes;
      else runs.push({ offset: pos, bytes: st.bytes, zero: st.zero });
      pos += st.bytes;
    }
  } catch {
    return null;
  }
  return runs;
}
