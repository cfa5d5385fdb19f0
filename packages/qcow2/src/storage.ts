import * as fsp from 'node:fs/promises';
import { type BlockChild, BlockError, type IoVec, iovLength, ReqFlags } from '@blockrep/block';

/**
 * What the qcow2 code needs from the file holding the image: positioned reads and writes, flush,
 * length and truncate. The driver gives it its `file` child; create and check use a plain fd.
 */
export interface Qcow2Storage {
  readv(offset: number, bytes: number, iov: IoVec): Promise<void>;
  /**
   * `fua`: the data is durable when the promise resolves (metadata that later writes depend on),
   * without flushing everything else written to the file.
   */
  write(offset: number, data: Buffer | IoVec, fua?: boolean): Promise<void>;
  flush(): Promise<void>;
  length(): Promise<number>;
  truncate(length: number): Promise<void>;
  /** Hands a range back to the storage (a hole in a file); absent where it cannot. */
  discard?(offset: number, bytes: number): Promise<void>;
  readonly filename: string;
}

/** QEMU's BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB. */
const MAX_REQUEST_OFFSET = 2 ** 63 - 2 ** 30;

/**
 * A hostile image's offsets, before they reach the file: past QEMU's largest request offset (its
 * BDRV_MAX_LENGTH) an I/O error; past 2^53 still beyond any file: a read gets zeroes, as past the
 * end of a file, and a write EFBIG, as the kernel answers QEMU there. null: an ordinary request.
 */
function outOfReach(offset: number, bytes: number, write: boolean): 'zeroes' | null {
  if (offset + bytes > MAX_REQUEST_OFFSET) throw new BlockError('Input/output error', { errno: 'EIO' });
  if (offset + bytes <= Number.MAX_SAFE_INTEGER) return null;
  if (write) throw new BlockError('File too large', { errno: 'EFBIG' });
  return 'zeroes';
}

function zeroFill(iov: IoVec): void {
  for (const b of iov) b.fill(0);
}

export async function readBuf(s: Qcow2Storage, offset: number, bytes: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(bytes);
  await s.readv(offset, bytes, [b]);
  return b;
}

/** The driver's storage: its file child. */
export function childStorage(child: BlockChild): Qcow2Storage {
  return {
    readv: async (offset, bytes, iov) => {
      if (outOfReach(offset, bytes, false)) zeroFill(iov);
      else await child.readv(offset, bytes, iov);
    },
    write: async (offset, data, fua) => {
      outOfReach(offset, iovLength(Buffer.isBuffer(data) ? [data] : data), true);
      await child.write(offset, data, fua ? ReqFlags.FUA : 0);
    },
    flush: () => child.flush(),
    length: async () => child.getLength(),
    truncate: (length) => child.truncate(length, { exact: true, prealloc: 'off' }),
    discard: (offset, bytes) => child.discard(offset, bytes),
    filename: child.node.filename,
  };
}

/** Storage on a plain file handle (image creation and check without a graph). */
export class FileStorage implements Qcow2Storage {
  private constructor(
    private readonly fh: fsp.FileHandle,
    readonly filename: string,
  ) {}

  static async open(path: string, flags: string): Promise<FileStorage> {
    return new FileStorage(await fsp.open(path, flags), path);
  }

  /** The file descriptor (image locks are taken on it). */
  get fd(): number {
    return this.fh.fd;
  }

  async readv(offset: number, bytes: number, iov: IoVec): Promise<void> {
    if (outOfReach(offset, bytes, false)) return zeroFill(iov);
    let done = 0;
    for (const b of iov) {
      const { bytesRead } = await this.fh.read(b, 0, b.length, offset + done);
      if (bytesRead < b.length) b.fill(0, bytesRead);
      done += b.length;
      if (done >= bytes) break;
    }
  }

  async write(offset: number, data: Buffer | IoVec, fua = false): Promise<void> {
    const iov = Buffer.isBuffer(data) ? [data] : data;
    outOfReach(offset, iovLength(iov), true);
    let pos = offset;
    for (const b of iov) {
      let n = 0;
      while (n < b.length) n += (await this.fh.write(b, n, b.length - n, pos + n)).bytesWritten;
      pos += b.length;
    }
    if (fua) await this.fh.datasync();
  }

  flush(): Promise<void> {
    return this.fh.datasync();
  }

  async length(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  truncate(length: number): Promise<void> {
    return this.fh.truncate(length);
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}
