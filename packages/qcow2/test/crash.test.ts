import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { makeTempDir } from '@blockrep/test-kit';
import { expect, it } from 'vitest';
import { checkQcow2Image, createQcow2Image } from '../src/index';
import { narrowPossible } from './crash-model';
import { prng, qemu } from './helpers';

/*
 * Crash safety: a writer process is SIGKILLed at random instants. After each kill qemu-img check
 * must find no corruption (leaks are allowed) and every write acknowledged before the last
 * completed flush must read back (qemu-img's view).
 */

const LONG = process.env.BLOCKREP_LONG_TESTS === '1';
const KILLS = LONG ? 50 : 6;

/** tsx's loader, found through the package's .bin shim (the writer runs in plain node with it). */
function tsxLoader(): string {
  const shim = join(import.meta.dirname, '..', 'node_modules', '.bin', 'tsx');
  const m = /"\$basedir\/([^"]*tsx\/dist)\/cli\.mjs"/.exec(readFileSync(shim, 'utf8'));
  if (!m) throw new Error('cannot find tsx');
  return pathToFileURL(join(dirname(shim), m[1]!, 'loader.mjs')).href;
}

interface Log {
  lines: string[];
}

function runUntilKilled(args: string[], delayMs: number): Promise<Log> {
  return new Promise((resolve, reject) => {
    const script = join(import.meta.dirname, 'crash-writer.ts');
    const child = spawn(process.execPath, ['--conditions=source', '--import', tsxLoader(), script, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const kill = () => child.kill('SIGKILL');
    let text = '';
    let err = '';
    let timer: NodeJS.Timeout | null = null;
    child.stdout.on('data', (d: Buffer) => {
      text += d.toString();
      // The clock starts at the first completed flush, so every kill checks flushed data however
      // slowly a loaded machine starts the writer.
      if (!timer && /^F /m.test(text)) timer = setTimeout(kill, delayMs);
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (_code, signal) => {
      if (signal !== 'SIGKILL') reject(new Error(`writer exited on its own: ${err}`));
      else resolve({ lines: text.split('\n').filter((l) => l && !text.endsWith(l)) });
    });
  });
}

it('the crash model pairs each flush completion with its own beginning (flushes overlap)', () => {
  const possible = () =>
    new Map([
      [0, new Set([0])],
      [1, new Set([0])],
    ]);
  // Flush 1 begins, slot 0 gen 5 is acknowledged, flush 2 begins, flush 1 completes: gen 5 is
  // not yet durable (only flush 2 covers it), so older generations stay possible.
  const overlapping = possible();
  narrowPossible(['S 0 5', 'B 1', 'A 0 5', 'B 2', 'F 1', 'S 1 7'], overlapping, new Set());
  expect([...overlapping.get(0)!]).toEqual([0, 5]);
  expect([...overlapping.get(1)!]).toEqual([0, 7]);
  // Once flush 2 completes, gen 5 is the only thing slot 0 may hold.
  const done = possible();
  narrowPossible(['S 0 5', 'B 1', 'A 0 5', 'B 2', 'F 1', 'F 2'], done, new Set());
  expect([...done.get(0)!]).toEqual([5]);
  // A later flush that completed first still counts from its own beginning.
  const outOfOrder = possible();
  narrowPossible(['B 1', 'S 0 5', 'A 0 5', 'B 2', 'F 2'], outOfOrder, new Set());
  expect([...outOfOrder.get(0)!]).toEqual([5]);
});

interface Subject {
  file: string;
  slots: number;
  possible: Map<number, Set<number>>;
  /** Generations that wrote zeroes. */
  zeroGens: Set<number>;
  runs: number;
}

it(
  `survives ${KILLS} SIGKILLs mid-write with no corruption and no lost flushed data`,
  async () => {
    const d = makeTempDir();
    const rand = prng(20261125);
    const slotBytes = 48 << 10;
    // Two images killed in turn: 64 KiB clusters, and 512-byte clusters with 64-bit refcounts
    // (a refcount block per 64 clusters: new blocks and refcount table growth all the time).
    const subjects: Subject[] = [];
    for (const [name, slots, opts] of [
      ['big.qcow2', 400, { clusterSize: 65536 }],
      ['small.qcow2', 60, { clusterSize: 512, refcountBits: 64 }],
    ] as const) {
      const file = d.file(name);
      await createQcow2Image(file, { size: slotBytes * slots, ...opts });
      const possible = new Map<number, Set<number>>();
      for (let s = 0; s < slots; s++) possible.set(s, new Set([0]));
      subjects.push({ file, slots, possible, zeroGens: new Set([0]), runs: 0 });
    }
    let flushes = 0;
    let empties = 0;
    for (let k = 0; k < KILLS; k++) {
      const sub = subjects[k % subjects.length]!;
      const f = sub.file;
      const log = await runUntilKilled(
        [f, String(slotBytes), String(sub.slots), String(k + 1), String((k + 1) * 1_000_000)],
        150 + Math.floor(rand() * 600),
      );
      const chk = await qemu(['check', '--output=json', f], [0, 3]);
      const res = JSON.parse(chk.stdout);
      expect(res.corruptions ?? 0, chk.stdout).toBe(0);
      expect(res['check-errors']).toBe(0);
      const raw = d.file(`after-${k}.raw`);
      await qemu(['convert', '-O', 'raw', f, raw]);
      const data = readFileSync(raw);
      narrowPossible(log.lines, sub.possible, sub.zeroGens);
      flushes += log.lines.filter((l) => l.startsWith('F ')).length;
      empties += log.lines.filter((l) => l === 'E').length;
      for (let s = 0; s < sub.slots; s++) {
        const ok = sub.possible.get(s)!;
        for (let off = s * slotBytes; off < (s + 1) * slotBytes; off += 512) {
          const gen = data.readUInt32LE(off + 4);
          const slot = data.readUInt32LE(off);
          const valid =
            gen === 0
              ? slot === 0 && data[off + 8] === 0 && [...ok].some((g) => sub.zeroGens.has(g))
              : slot === s && ok.has(gen) && data[off + 8] === ((gen * 7 + s) & 0xff);
          if (!valid) {
            throw new Error(
              `kill ${k} (${f}): slot ${s} sector ${off} holds slot ${slot} gen ${gen}; allowed ${[...ok]}`,
            );
          }
        }
      }
      // Our own check agrees there is no corruption; repairing the leaks leaves a clean image.
      if (sub.runs++ % 2 === 1) {
        const ours = await checkQcow2Image(f, { repair: 'leaks' });
        expect(ours.corruptions ?? 0).toBe(0);
        const again = JSON.parse((await qemu(['check', '--output=json', f])).stdout);
        expect(again.leaks ?? 0).toBe(0);
      }
    }
    // The kills landed after real work: flushed data was checked, not just empty images.
    expect(flushes).toBeGreaterThanOrEqual(KILLS);
    console.log(`crash test: ${flushes} flushes, ${empties} makeEmpty calls`);
  },
  LONG ? 900_000 : 60_000,
);
