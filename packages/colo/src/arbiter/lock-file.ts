import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { type Arbiter, type ArbiterLease, ArbiterUnavailable } from './arbiter';

/*
 * The lock-file arbiter: both daemons of a pair on one machine (demo, tests) share a lease kept
 * in a directory of numbered versions. A change is a compare-and-swap: the new version is written
 * to a temporary file and hard-linked as number N+1, which fails if anyone else made N+1 first
 * (link never replaces a file). So no lock is held between steps and a daemon killed at any
 * point leaves nothing to break. Time is the machine's wall clock, which both daemons share.
 */

interface LeaseVersion {
  holder: string | null;
  epoch: number;
  /** Wall-clock milliseconds. */
  expiresAt: number;
}

export interface LockFileArbiterOptions {
  /** The lease directory (created when missing). */
  path: string;
  /** Lease time-to-live in milliseconds. */
  leaseTtl: number;
  /** The clock (tests give their own). */
  now?: () => number;
}

/** Versions kept behind the newest (older ones are removed by whoever writes). */
const KEEP = 8;
const VERSION = /^(\d{12})\.json$/;
const versionName = (n: number) => `${String(n).padStart(12, '0')}.json`;

export class LockFileArbiter implements Arbiter {
  readonly kind = 'lock-file';
  private readonly dir: string;
  private readonly ttl: number;
  private readonly now: () => number;

  constructor(opts: LockFileArbiterOptions) {
    this.dir = opts.path;
    this.ttl = opts.leaseTtl;
    this.now = opts.now ?? Date.now;
  }

  acquire(holder: string): Promise<ArbiterLease | null> {
    return this.update((cur, now) => {
      const valid = cur.holder !== null && cur.expiresAt > now;
      if (valid && cur.holder !== holder) return null;
      return { holder, epoch: valid ? cur.epoch : cur.epoch + 1, expiresAt: now + this.ttl };
    }).then((v) => (v?.holder === holder ? { holder, epoch: v.epoch, ttl: this.ttl } : null));
  }

  async read(): Promise<ArbiterLease | null> {
    const { value } = await this.newest();
    if (value.holder === null || value.expiresAt <= this.now()) return null;
    return { holder: value.holder, epoch: value.epoch, ttl: this.ttl };
  }

  async release(holder: string): Promise<void> {
    await this.update((cur) =>
      cur.holder === holder ? { holder: null, epoch: cur.epoch, expiresAt: 0 } : null,
    );
  }

  async close(): Promise<void> {}

  /**
   * Applies `change` to the newest version as a compare-and-swap, again on a newer version when
   * another writer got there first. Returns what was written, or null when `change` declined.
   */
  private async update(
    change: (cur: LeaseVersion, now: number) => LeaseVersion | null,
  ): Promise<LeaseVersion | null> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 }).catch((e: Error) => {
      throw new ArbiterUnavailable(this.kind, `cannot create ${this.dir}: ${e.message}`);
    });
    for (;;) {
      const { n, value } = await this.newest();
      const next = change(value, this.now());
      if (!next) return null;
      if (await this.publish(n + 1, next)) {
        // Only the newest version counts: one written after a newer one (its writer read an old
        // state whose successors were cleaned up) is taken back.
        const after = await this.newest();
        if (after.n === n + 1) {
          await this.cleanup(n + 1);
          return next;
        }
        await fsp.unlink(join(this.dir, versionName(n + 1))).catch(() => {});
      }
    }
  }

  /** Writes version n; false when it already exists (someone else's change won). */
  private async publish(n: number, v: LeaseVersion): Promise<boolean> {
    const tmp = join(this.dir, `.tmp.${process.pid}.${randomBytes(4).toString('hex')}`);
    try {
      const fh = await fsp.open(tmp, 'wx', 0o600);
      try {
        await fh.writeFile(`${JSON.stringify(v)}\n`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.link(tmp, join(this.dir, versionName(n)));
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw new ArbiterUnavailable(
        this.kind,
        `cannot write the lease in ${this.dir}: ${(e as Error).message}`,
      );
    } finally {
      await fsp.unlink(tmp).catch(() => {});
    }
  }

  /** The newest version and its number (0 and an empty lease when there is none). */
  private async newest(): Promise<{ n: number; value: LeaseVersion }> {
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { n: 0, value: EMPTY };
      throw new ArbiterUnavailable(this.kind, `cannot read ${this.dir}: ${(e as Error).message}`);
    }
    let n = 0;
    for (const name of names) {
      const m = VERSION.exec(name);
      if (m) n = Math.max(n, Number(m[1]));
    }
    if (n === 0) return { n, value: EMPTY };
    let text: string;
    try {
      text = await fsp.readFile(join(this.dir, versionName(n)), 'utf8');
    } catch (e) {
      // Cleaned up under our feet by a writer of a newer version: look again.
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return this.newest();
      throw new ArbiterUnavailable(
        this.kind,
        `cannot read the lease in ${this.dir}: ${(e as Error).message}`,
      );
    }
    try {
      const v = JSON.parse(text) as LeaseVersion;
      if (typeof v.epoch !== 'number' || typeof v.expiresAt !== 'number') throw new Error('fields missing');
      return { n, value: v };
    } catch (e) {
      // Nobody may guess who holds a lease: a damaged lease stops promotions until it is fixed.
      throw new ArbiterUnavailable(
        this.kind,
        `the lease ${versionName(n)} in ${this.dir} is damaged: ${(e as Error).message}`,
      );
    }
  }

  /** Removes versions well behind the newest. */
  private async cleanup(newest: number): Promise<void> {
    const names = await fsp.readdir(this.dir).catch(() => [] as string[]);
    for (const name of names) {
      const m = VERSION.exec(name);
      if (m && Number(m[1]) <= newest - KEEP) await fsp.unlink(join(this.dir, name)).catch(() => {});
    }
  }
}

const EMPTY: LeaseVersion = { holder: null, epoch: 0, expiresAt: 0 };
