/*
 * The L2 table cache (QEMU's qcow2-cache.c): a bounded LRU of whole L2 tables kept as the raw
 * big-endian clusters, so lookups read entries in place and write-back writes the buffer as is.
 * Entries in use are pinned and never evicted; dirty ones are written before they leave.
 */

export interface Qcow2CacheEntry {
  readonly offset: number;
  readonly table: Buffer;
  pins: number;
  /** Bumped on every change; the entry is clean when it equals `written`. */
  gen: number;
  written: number;
}

export class Qcow2L2Cache {
  /** Insertion order = LRU order (oldest first). */
  private readonly entries = new Map<number, Qcow2CacheEntry>();
  private readonly loading = new Map<number, Promise<Qcow2CacheEntry>>();
  /** Evicted dirty entries whose write is in flight (a lookup takes them back). */
  private readonly evicting = new Map<number, Qcow2CacheEntry>();
  /** Write-backs in flight (makeEmpty waits for them before reusing the clusters). */
  private readonly writes = new Set<Promise<void>>();
  /** A failed write-back of an evicted table, reported by the next flush. */
  private writeError: unknown = null;

  constructor(
    private readonly capacity: number,
    private readonly load: (offset: number) => Promise<Buffer>,
    private readonly writeBack: (e: Qcow2CacheEntry) => Promise<void>,
  ) {}

  /** The table at host offset `offset`, pinned: call unpin() when done with it. */
  async get(offset: number): Promise<Qcow2CacheEntry> {
    for (;;) {
      const e = this.entries.get(offset) ?? this.evicting.get(offset);
      if (e) {
        this.entries.delete(offset);
        this.evicting.delete(offset);
        this.entries.set(offset, e);
        e.pins++;
        return e;
      }
      let p = this.loading.get(offset);
      if (!p) {
        p = this.load(offset).then((table) => {
          const ne: Qcow2CacheEntry = { offset, table, pins: 0, gen: 0, written: 0 };
          this.loading.delete(offset);
          this.entries.set(offset, ne);
          this.evict();
          return ne;
        });
        p.catch(() => this.loading.delete(offset));
        this.loading.set(offset, p);
      }
      await p;
    }
  }

  /** The cached table at `offset` without waiting (null when it must be loaded). Not pinned. */
  peek(offset: number): Qcow2CacheEntry | null {
    const e = this.entries.get(offset);
    if (!e) return null;
    this.entries.delete(offset);
    this.entries.set(offset, e);
    return e;
  }

  /** Adds a table just created in memory (a new or copied L2 table), pinned. */
  insert(offset: number, table: Buffer, dirty: boolean): Qcow2CacheEntry {
    const e: Qcow2CacheEntry = { offset, table, pins: 1, gen: dirty ? 1 : 0, written: 0 };
    this.entries.set(offset, e);
    this.evict();
    return e;
  }

  unpin(e: Qcow2CacheEntry): void {
    e.pins--;
    if (this.entries.size > this.capacity) this.evict();
  }

  markDirty(e: Qcow2CacheEntry): void {
    e.gen++;
  }

  private evict(): void {
    for (const [off, e] of this.entries) {
      if (this.entries.size <= this.capacity) return;
      if (e.pins > 0) continue;
      this.entries.delete(off);
      if (e.gen !== e.written) {
        this.evicting.set(off, e);
        this.writeEntry(e)
          .catch((err) => {
            // Keep the table so that its entries are not lost and the next flush retries it.
            this.writeError = err;
            if (!this.entries.has(off)) this.entries.set(off, e);
          })
          .finally(() => {
            if (this.evicting.get(off) === e) this.evicting.delete(off);
          });
      }
    }
  }

  private async writeEntry(e: Qcow2CacheEntry): Promise<void> {
    const gen = e.gen;
    const p = this.writeBack(e);
    this.writes.add(p);
    try {
      await p;
    } finally {
      this.writes.delete(p);
    }
    if (e.written < gen) e.written = gen;
  }

  /** Waits for every write-back in flight (their outcome does not matter to the caller). */
  async drainWrites(): Promise<void> {
    while (this.writes.size) await Promise.allSettled([...this.writes]);
  }

  /** Writes every dirty table. */
  async flush(): Promise<void> {
    const dirty = [...this.entries.values(), ...this.evicting.values()].filter((e) => e.gen !== e.written);
    const err = this.writeError;
    this.writeError = null;
    await Promise.all(dirty.map((e) => this.writeEntry(e)));
    if (err && dirty.length === 0) throw err;
  }

  /** Forgets a table (its cluster was freed). */
  drop(offset: number): void {
    this.entries.delete(offset);
    this.evicting.delete(offset);
  }

  clear(): void {
    this.entries.clear();
    this.evicting.clear();
  }

  has(offset: number): boolean {
    return this.entries.has(offset) || this.evicting.has(offset);
  }

  get size(): number {
    return this.entries.size;
  }
}
