import { BlockError } from '@blockrep/block';

/*
 * The arbiter decides who may be primary (Patroni's DCS leader key, reduced to what a COLO pair
 * needs): one lease per pair with a holder, a time-to-live, and an epoch that grows each time the
 * lease changes hands. The epoch is the fencing token: whatever a primary does is tagged with it,
 * and a side that sees a newer epoch knows it lost the lease.
 */

export interface ArbiterLease {
  holder: string;
  /** Grows by one each time the lease is taken by a holder that did not hold it (or after expiry). */
  epoch: number;
  /** Milliseconds the lease lasts from the moment it was asked for. */
  ttl: number;
}

export interface Arbiter {
  /** 'lock-file' or 'etcd', for logs and query-colo. */
  readonly kind: string;
  /**
   * Takes the lease for `holder`, or renews it when `holder` holds it (same epoch). Null when
   * another holder's lease is still valid. Throws ArbiterUnavailable when the arbiter cannot be
   * asked: then nobody may act as if they held it.
   */
  acquire(holder: string): Promise<ArbiterLease | null>;
  /** The lease as it stands (null: nobody holds it, or it expired). */
  read(): Promise<ArbiterLease | null>;
  /** Gives the lease up if `holder` still holds it; the epoch stays, so the next holder's is newer. */
  release(holder: string): Promise<void>;
  close(): Promise<void>;
}

/** The arbiter could not be reached or did not answer in time. */
export class ArbiterUnavailable extends BlockError {
  constructor(kind: string, why: string) {
    super(`COLO arbiter (${kind}) unavailable: ${why}`, { errno: 'EIO' });
  }
}
