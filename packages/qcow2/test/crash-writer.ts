/*
 * The process the crash test kills (now and then it empties the image with makeEmpty): writes slots of a qcow2 image through BlockBackend -> qcow2 ->
 * file with many requests in flight and periodic flushes, logging to stdout when each write
 * starts ("S slot gen", "S slot gen Z" for a write of zeroes) and is acknowledged ("A slot gen"), and when flush n begins ("B n")
 * and completes ("F n"). Usage: crash-writer <image> <slot-bytes> <slots> <seed> <first-generation>
 */
import { writeSync } from 'node:fs';
import { BlockBackend, createGraph, Perm, ReqFlags } from '@blockrep/block';
import { qcow2Driver } from '../src/index';

const [image, slotArg, slotsArg, seedArg, genBase] = process.argv.slice(2);
const slotBytes = Number(slotArg);
const slots = Number(slotsArg);
let seed = Number(seedArg) >>> 0;
const rand = () => {
  seed = (seed * 1664525 + 1013904223) >>> 0;
  return seed / 4294967296;
};

/** Slot content for a generation: every 512-byte sector starts with (slot, gen). */
export function slotData(slot: number, gen: number, bytes: number): Buffer {
  const b = Buffer.alloc(bytes, (gen * 7 + slot) & 0xff);
  for (let off = 0; off < bytes; off += 512) {
    b.writeUInt32LE(slot, off);
    b.writeUInt32LE(gen, off + 4);
  }
  return b;
}

async function main(): Promise<void> {
  const g = createGraph([qcow2Driver]);
  const node = await g.open({ driver: 'qcow2', discard: 'unmap', file: { driver: 'file', filename: image } });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  // Synchronous: every line is in the pipe before the request it announces is issued.
  const out = (line: string) => {
    const b = Buffer.from(`${line}\n`);
    for (let done = 0; done < b.length; ) {
      try {
        done += writeSync(1, b, done);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      }
    }
  };
  const gens = new Array<number>(slots).fill(Number(genBase));
  const busy = new Set<number>();
  let writes = 0;
  let flushes = 0;
  out('READY');
  // makeEmpty runs alone: new writes wait at the barrier and in-flight ones finish first, so
  // its place in the log is exact.
  let barrier: Promise<void> | null = null;
  const empty = async () => {
    let release!: () => void;
    barrier = new Promise((r) => (release = r));
    out('E');
    while (busy.size) await new Promise((r) => setTimeout(r, 1));
    for (let s = 0; s < slots; s++) out(`S ${s} ${++gens[s]!} Z`);
    await blk.makeEmpty();
    for (let s = 0; s < slots; s++) out(`A ${s} ${gens[s]}`);
    barrier = null;
    release();
  };
  const worker = async () => {
    for (;;) {
      while (barrier) await barrier;
      let slot = Math.floor(rand() * slots);
      while (busy.has(slot)) slot = (slot + 1) % slots;
      busy.add(slot);
      const gen = gens[slot]! + 1;
      gens[slot] = gen;
      // Some generations are zeroes (whole clusters become zero clusters and are freed).
      const zero = rand() < 0.15;
      out(`S ${slot} ${gen}${zero ? ' Z' : ''}`);
      if (zero) await blk.writeZeroes(slot * slotBytes, slotBytes, ReqFlags.MAY_UNMAP);
      else await blk.write(slot * slotBytes, slotData(slot, gen, slotBytes));
      out(`A ${slot} ${gen}`);
      busy.delete(slot);
      if (++writes % 24 === 0) {
        if (writes % 240 === 0 && !barrier) await empty();
        // Workers flush concurrently: each flush has its own number, so that a completion is
        // paired with its own beginning, not with a later flush's.
        const id = ++flushes;
        out(`B ${id}`);
        await blk.flush();
        out(`F ${id}`);
      }
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
}

main().catch((e) => {
  process.stderr.write(`${e?.stack ?? e}\n`);
  process.exit(1);
});
