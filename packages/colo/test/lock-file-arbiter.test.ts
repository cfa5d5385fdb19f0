import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { ArbiterUnavailable, LockFileArbiter } from '../src/index';

function fakeClock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

describe('lock-file arbiter', () => {
  it('one holder at a time; renewals keep the epoch, a new holder gets the next one', async () => {
    const dir = makeTempDir();
    const clock = fakeClock();
    const a = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: 1000, now: clock.now });
    const b = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: 1000, now: clock.now });
    expect(await a.read()).toBeNull();
    expect(await a.acquire('a')).toEqual({ holder: 'a', epoch: 1, ttl: 1000 });
    expect(await b.acquire('b')).toBeNull();
    clock.advance(900);
    expect(await a.acquire('a')).toEqual({ holder: 'a', epoch: 1, ttl: 1000 });
    clock.advance(900);
    // Renewed at 900: still a's at 1800.
    expect(await b.acquire('b')).toBeNull();
    expect(await b.read()).toEqual({ holder: 'a', epoch: 1, ttl: 1000 });
    clock.advance(200);
    // Expired: b takes it with a newer epoch; a cannot renew.
    expect(await b.read()).toBeNull();
    expect(await b.acquire('b')).toEqual({ holder: 'b', epoch: 2, ttl: 1000 });
    expect(await a.acquire('a')).toBeNull();
    // Releasing is the holder's alone; after it the next holder's epoch is newer still.
    await a.release('a');
    expect(await a.read()).toEqual({ holder: 'b', epoch: 2, ttl: 1000 });
    await b.release('b');
    expect(await a.read()).toBeNull();
    expect(await a.acquire('a')).toEqual({ holder: 'a', epoch: 3, ttl: 1000 });
  });

  it('a holder that expires and takes the lease again gets a new epoch (its old writes are fenced)', async () => {
    const dir = makeTempDir();
    const clock = fakeClock();
    const a = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: 100, now: clock.now });
    expect((await a.acquire('a'))!.epoch).toBe(1);
    clock.advance(100);
    expect((await a.acquire('a'))!.epoch).toBe(2);
  });

  it('keeps a bounded number of lease versions', async () => {
    const dir = makeTempDir();
    const a = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: 1000 });
    for (let i = 0; i < 50; i++) await a.acquire('a');
    const files = readdirSync(dir.file('lease'));
    expect(files.length).toBeLessThanOrEqual(8);
    expect(files.every((f) => /^\d{12}\.json$/.test(f))).toBe(true);
  });

  it('a damaged lease stops everyone: nobody may guess who holds it', async () => {
    const dir = makeTempDir();
    mkdirSync(dir.file('lease'));
    writeFileSync(dir.file('lease/000000000001.json'), '{"holder": "a", "ep');
    const a = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: 1000 });
    await expect(a.acquire('b')).rejects.toThrow(ArbiterUnavailable);
    await expect(a.read()).rejects.toThrow(/the lease 000000000001.json in .* is damaged/);
  });

  it('processes racing for the lease: at most one holder per epoch, epochs in order', async () => {
    const dir = makeTempDir();
    const path = dir.file('lease');
    const worker = fileURLToPath(new URL('./lease-worker.ts', import.meta.url));
    const tsx = fileURLToPath(new URL('../node_modules/.bin/tsx', import.meta.url));
    const run = (name: string) =>
      new Promise<string>((resolve, reject) => {
        const p = spawn(tsx, ['--conditions=source', worker, path, name, '60'], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        p.stdout.on('data', (d: Buffer) => (out += d));
        p.on('error', reject);
        p.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${name} exited ${code}`))));
      });
    const outs = await Promise.all(['p', 'q', 'r', 's'].map(run));
    // Each line: "<holder> <epoch>" for every lease a worker was granted.
    const holderOf = new Map<number, string>();
    let grants = 0;
    for (const out of outs) {
      for (const line of out.trim().split('\n').filter(Boolean)) {
        const [holder, epoch] = line.split(' ');
        const e = Number(epoch);
        const other = holderOf.get(e);
        expect(other === undefined || other === holder, `epoch ${e}: ${other} and ${holder}`).toBe(true);
        holderOf.set(e, holder!);
        grants++;
      }
    }
    expect(grants).toBeGreaterThan(0);
    // Each worker releases after each grant, so the lease changed hands many times.
    expect(holderOf.size).toBeGreaterThan(1);
  });
});
