import { BlockError } from '../../errors';
import { PERM_ALL, permNames } from '../../perm';
import { sparse } from './sparse';

/** Byte offsets of QEMU's image locking protocol (file-posix; libvirt keeps byte 0). */
const PERM_BASE = 100;
const SHARED_BASE = 200;
const BITS = [0, 1, 2, 3, 4];

/**
 * Image locking, the protocol QEMU uses, so that QEMU's tools and blockrep see each other: for
 * each permission bit i a node holds, a shared lock on byte 100 + i of the file; for each bit it
 * does not share, one on byte 200 + i. The locks are open file description (OFD) locks, so two
 * nodes on one file conflict even within one process, and they go when the fd is closed. Taking
 * permission i fails while another description locks 200 + i (it refuses to share i); refusing
 * to share i fails while another locks 100 + i (it uses i).
 */
export class ImageLocks {
  /** Bits locked on the fd now. */
  private perm = 0;
  private unshared = 0;

  constructor(
    private fd: number,
    private readonly filename: string,
  ) {}

  /** Locks for a node now using `perm` and sharing `shared`; throws on a conflict, unchanged. */
  apply(perm: number, shared: number): void {
    const unshared = ~shared & PERM_ALL;
    if (perm === this.perm && unshared === this.unshared) return;
    const old = [this.perm, this.unshared] as const;
    try {
      // Both states' locks first: at no moment does the file show fewer than either.
      this.set(this.perm | perm, this.unshared | unshared);
      this.check(perm, unshared);
    } catch (e) {
      this.set(...old);
      throw e;
    }
    this.set(perm, unshared);
  }

  /** Moves the locks to a new fd (a reopen); the old one's go when it is closed. */
  moveTo(fd: number): void {
    const [perm, unshared] = [this.perm, this.unshared];
    this.fd = fd;
    this.perm = 0;
    this.unshared = 0;
    this.set(perm, unshared);
  }

  private set(perm: number, unshared: number): void {
    for (const i of BITS) {
      const bit = 1 << i;
      if ((perm & bit) !== (this.perm & bit)) this.lockByte(PERM_BASE + i, (perm & bit) !== 0);
      if ((unshared & bit) !== (this.unshared & bit)) this.lockByte(SHARED_BASE + i, (unshared & bit) !== 0);
    }
    this.perm = perm;
    this.unshared = unshared;
  }

  private lockByte(offset: number, on: boolean): void {
    const r = sparse.ofdLock(this.fd, offset, on);
    if (r < 0 && on) {
      throw new BlockError(`Failed to lock byte ${offset}: errno ${-r}`, { errno: 'EIO' });
    }
  }

  private check(perm: number, unshared: number): void {
    for (const i of BITS) {
      const bit = 1 << i;
      if (perm & bit && sparse.ofdHeld(this.fd, SHARED_BASE + i)) {
        throw this.conflict(`Failed to get "${permNames(bit)}" lock`);
      }
    }
    for (const i of BITS) {
      const bit = 1 << i;
      if (unshared & bit && sparse.ofdHeld(this.fd, PERM_BASE + i)) {
        throw this.conflict(`Failed to get shared "${permNames(bit)}" lock`);
      }
    }
  }

  private conflict(message: string): BlockError {
    return new BlockError(message, {
      errno: 'EAGAIN',
      hint: `Is another process using the image [${this.filename}]?`,
    });
  }
}
