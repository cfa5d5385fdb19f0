import * as fsp from 'node:fs/promises';
import { type BlockChild, BlockError, type IoVec } from '@blockrep/block';

/**
 * What the qcow2 code needs from the file holding the image: positioned reads and writes, flush,
 * length and truncate. The driver gives it its `file` child; create and check use a plain fd.
 */
export interface Qcow2Storage {
  readv(offset: number, bytes: number, iov: IoVec): Promise<void>;
  write(offset: number, data: Buffer | IoVec): Promise<void>;
  flush(): Promise<void>;
  length(): Promise<number>;
  truncate(length: number): Promise<void>;
  readonly filename: string;
}

export async function readBuf(s: Qcow2Storage, offset: number, bytes: number): Promise<Buffer> {
  // Offsets past 2^53 (a hostile image's) are beyond any file: an I/O error, as the kernel gives QEMU.
  if (offset + bytes > Number.MAX_SAFE_INTEGER) throw new BlockError('Input/output error', { errno: 'EIO' });
  const b = Buffer.allocUnsafe(bytes);
  await s.readv(offset, bytes, [b]);
  return b;
}

/** The driver's storage: its file child. */
export function childStorage(child: BlockChild): Qcow2Storage {
  return {
    readv: (offset, bytes, iov) => child.readv(offset, bytes, iov),
    write: (offset, data) => child.write(offset, data),
    flush: () => child.flush(),
    length: async () => child.getLength(),
    truncate: (length) => child.truncate(length, { exact: true, prealloc: 'off' }),
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
    let done = 0;
    for (const b of iov) {
      const { bytesRead } = await this.fh.read(b, 0, b.length, offset + done);
      if (bytesRead < b.length) b.fill(0, bytesRead);
      done += b.length;
      if (done >= bytes) break;
    }
  }

  async write(offset: number, data: Buffer | IoVec): Promise<void> {
    const iov = Buffer.isBuffer(data) ? [data] : data;
    let pos = offset;
    for (const b of iov) {
      let n = 0;
      while (n < b.length) n += (await this.fh.write(b, n, b.length - n, pos + n)).bytesWritten;
      pos += b.length;
    }
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
