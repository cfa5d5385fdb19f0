import { type BlockBackend, blockStatus, type BlockStatus } from '@blockrep/block';

/**
 * The content status of an export's range (data / zero), through the node's whole chain.
 *
 * Works around a block-core gap: when a format passes the status down to its file (`recurse`)
 * and the file's extent reaches the end of the file, the core reports the extent as zeroes,
 * although only an extent *past* the end reads as zeroes. Such an answer is re-asked of the
 * file itself, so that a raw image's last data extent is not sent as a hole.
 */
export async function contentStatus(
  backend: BlockBackend,
  offset: number,
  bytes: number,
): Promise<BlockStatus> {
  const st = await backend.blockStatus(offset, bytes);
  if (st.eof && st.zero && !st.data && st.file && st.offset !== undefined && st.file !== backend.node) {
    const inner = await blockStatus(st.file, st.offset, st.bytes);
    if (inner.bytes > 0 && inner.data)
      return { ...st, bytes: Math.min(st.bytes, inner.bytes), data: true, zero: false };
    if (inner.bytes > 0 && !inner.zero) return { ...st, bytes: Math.min(st.bytes, inner.bytes), zero: false };
  }
  return st;
}
