import {
  type BlockBackend,
  type BlockGraph,
  type BlockNode,
  blockStatus,
  blockStatusAbove,
  errnoText,
  ReqFlags,
  toBlockError,
} from '@blockrep/block';
import { loadSnapshotReadOnly } from '@blockrep/qcow2';
import {
  FORCE_SHARE,
  HELP,
  IMAGE_OPTS,
  optString,
  type ParsedArgs,
  parseArgs,
  refuseUnsupported,
} from '../args';
import { CliFailure } from '../failure';
import {
  attachBackend,
  checkFormat,
  forceShare,
  imageGraph,
  isZero,
  openImage,
  qcow2Of,
  runInFlight,
} from '../image';
import { cvtnum, parseOptionList, strtol } from '../options';
import { ProgressBar } from '../progress';
import { RateLimit } from '../rate-limit';
import { createImage } from './create';

const CHUNK = 2 << 20;
const SECTOR = 512;
/** -S at most (qemu-img's largest buffer). */
const MAX_SPARSE = 32768 * SECTOR;

interface Extent {
  /** Where in the target (sources are concatenated). */
  offset: number;
  bytes: number;
  /** Reads as zeroes on the source: nothing to copy. */
  zero: boolean;
  source: Source;
}

interface Source {
  node: BlockNode;
  blk: BlockBackend;
  /** Offset of this source in the target. */
  base: number;
}

/** How the copy goes: what the options ask of every read and write. */
interface CopyRules {
  to: BlockBackend;
  /** Zeroes must be written where the source reads zeroes (the target may not read as zeroes). */
  mustZero: boolean;
  /** --salvage: unreadable sectors are copied as zeroes, each reported unless `quiet`. */
  salvage: boolean;
  quiet: boolean;
  /** -r: the target's writes are throttled. */
  rate: RateLimit | null;
  /** Writes go in the order of the target's offsets (reads run ahead); -W lets them go as they come. */
  inOrder: boolean;
}

/**
 * Lets writes run in the order their requests were taken (qemu-img's default, which also places
 * a new qcow2 target's clusters in guest order): each request waits for the one before it.
 */
class WriteOrder {
  private last: Promise<void> = Promise.resolve();

  /** A turn for the next request: wait() before writing, done() after (also on failure). */
  take(): { wait: () => Promise<void>; done: () => void } {
    const before = this.last;
    let done!: () => void;
    this.last = new Promise((resolve) => {
      done = resolve;
    });
    return { wait: () => before, done };
  }
}

/** Runs the request's writes when its turn comes (when writes keep their order). */
async function inTurn(
  turn: ReturnType<WriteOrder['take']>,
  rules: CopyRules,
  write: () => Promise<void>,
): Promise<void> {
  try {
    if (rules.inOrder) await turn.wait();
    await write();
  } finally {
    turn.done();
  }
}

const SPARSE_GRAIN = 4096;

/** strerror of what a request failed with, as qemu-img names it. */
const failureText = (e: unknown) => errnoText(toBlockError(e).errno);

/** buf (read at offset) cut at multiples of grain into alternating runs of zeroes and data. */
function zeroRuns(
  buf: Buffer,
  offset: number,
  grain: number,
): { start: number; end: number; zero: boolean }[] {
  const runs: { start: number; end: number; zero: boolean }[] = [];
  for (let pos = 0; pos < buf.length; ) {
    const end = Math.min(buf.length, (Math.floor((offset + pos) / grain) + 1) * grain - offset);
    const zero = isZero(buf.subarray(pos, end));
    const last = runs[runs.length - 1];
    if (last && last.zero === zero) last.end = end;
    else runs.push({ start: pos, end, zero });
    pos = end;
  }
  return runs;
}

/**
 * Reads part (at offset of the source). With --salvage a failed read is retried sector by
 * sector, and each sector that still fails reads as zeroes, with qemu-img's warning.
 */
async function readSource(s: Source, offset: number, part: Buffer, rules: CopyRules): Promise<void> {
  try {
    await s.blk.readv(offset, [part]);
    return;
  } catch (e) {
    if (!rules.salvage) throw e;
  }
  for (let at = 0; at < part.length; at += SECTOR) {
    const sector = part.subarray(at, Math.min(part.length, at + SECTOR));
    try {
      await s.blk.readv(offset + at, [sector]);
    } catch (e) {
      if (!rules.quiet)
        process.stderr.write(
          `blockrep: warning: error while reading offset ${offset + at}: ${failureText(e)}\n`,
        );
      sector.fill(0);
    }
  }
}

/** Reads target bytes [offset, offset+n) from the concatenated sources. */
async function readSources(sources: Source[], offset: number, n: number, rules: CopyRules): Promise<Buffer> {
  const buf = Buffer.alloc(n);
  try {
    for (const s of sources) {
      const from = Math.max(offset, s.base);
      const to = Math.min(offset + n, s.base + s.node.length);
      if (from < to) await readSource(s, from - s.base, buf.subarray(from - offset, to - offset), rules);
    }
  } catch (e) {
    throw new CliFailure(`error while reading at byte ${offset}: ${failureText(e)}`);
  }
  return buf;
}

/** Runs the writes of one request (at offset), failing with qemu-img's text. */
async function writeRequest(offset: number, write: () => Promise<void>): Promise<void> {
  try {
    await write();
  } catch (e) {
    throw new CliFailure(`error while writing at byte ${offset}: ${failureText(e)}`);
  }
}

async function writeData(rules: CopyRules, offset: number, buf: Buffer, flags = 0): Promise<void> {
  await rules.rate?.take(buf.length);
  await rules.to.write(offset, buf, flags);
}

async function writeZeroes(rules: CopyRules, offset: number, bytes: number): Promise<void> {
  await rules.rate?.take(bytes);
  await rules.to.writeZeroes(offset, bytes, ReqFlags.MAY_UNMAP);
}

/**
 * convert -c: every target cluster some data extent touches is read whole and written as one
 * compressed cluster (the qcow2 driver stores it plainly when deflate saves nothing); runs of
 * clusters of zeroes are skipped on a new target and zeroed on an existing one.
 */
async function writeCompressedClusters(
  sources: Source[],
  extents: Extent[],
  rules: CopyRules,
  cs: number,
  size: number,
  depth: number,
  bar: ProgressBar,
): Promise<void> {
  const ZERO = 1;
  const DATA = 2;
  const kinds = new Uint8Array(Math.ceil(size / cs));
  for (const e of extents) {
    const last = Math.floor((e.offset + e.bytes - 1) / cs);
    for (let c = Math.floor(e.offset / cs); c <= last; c++)
      kinds[c] = Math.max(kinds[c]!, e.zero ? ZERO : DATA);
  }
  const runs: { first: number; count: number; data: boolean }[] = [];
  for (let c = 0; c < kinds.length; c++) {
    const prev = runs[runs.length - 1];
    if (kinds[c] === DATA) runs.push({ first: c, count: 1, data: true });
    else if (kinds[c] !== ZERO || !rules.mustZero) continue;
    else if (prev && !prev.data && prev.first + prev.count === c) prev.count++;
    else runs.push({ first: c, count: 1, data: false });
  }
  let next = 0;
  let done = 0;
  const order = new WriteOrder();
  await runInFlight(depth, () => {
    const run = runs[next++];
    if (!run) return null;
    const turn = order.take();
    return async () => {
      const offset = run.first * cs;
      const n = Math.min(run.count * cs, size - offset);
      if (!run.data) {
        await inTurn(turn, rules, () => writeRequest(offset, () => writeZeroes(rules, offset, n)));
      } else {
        const buf = await readSources(sources, offset, n, rules).catch((e) => {
          turn.done();
          throw e;
        });
        await inTurn(turn, rules, () =>
          writeRequest(offset, async () => {
            if (!isZero(buf)) await writeData(rules, offset, buf, ReqFlags.WRITE_COMPRESSED);
            else if (rules.mustZero) await writeZeroes(rules, offset, n);
          }),
        );
      }
      done += n;
      bar.update(done);
    };
  });
}

/**
 * A source's extents (its whole chain flattened), data split into chunks of at most CHUNK. With
 * `ownOnly` (convert -B) what the source's backing chain provides is left out: the target's
 * backing file provides it (a source without a backing file reads zeroes there: written).
 * `fill` (-S 0): zeroes are copied as data too, in chunks.
 */
async function sourceExtents(source: Source, ownOnly: boolean, fill: boolean): Promise<Extent[]> {
  const { node, base } = source;
  const out: Extent[] = [];
  const skipBacking = ownOnly && node.backing !== null;
  for (let off = 0; off < node.length; ) {
    const st = skipBacking
      ? await blockStatus(node, off, node.length - off)
      : await blockStatusAbove(node, null, off, node.length - off);
    const n = Math.max(1, st.bytes);
    if (skipBacking && !st.allocated) {
      off += n;
      continue;
    }
    const zero = st.zero || !st.allocated;
    if (zero && !fill) out.push({ offset: base + off, bytes: n, zero: true, source });
    else
      for (let o = off; o < off + n; o += CHUNK)
        out.push({ offset: base + o, bytes: Math.min(CHUNK, off + n - o), zero: false, source });
    off += n;
  }
  return out;
}

/** -l: a snapshot by id or name ("snapshot.id=ID,snapshot.name=NAME"), or one id-or-name. */
type SnapshotChoice = { id?: string; name?: string } | { idOrName: string };

/** -l's value, parsed as qemu-img parses it (QemuOpts: unknown keys refused, key-only items warned about). */
function snapshotParam(text: string): SnapshotChoice {
  if (!text.startsWith('snapshot.')) return { idOrName: text };
  const choice: { id?: string; name?: string } = {};
  for (const raw of text.replace(/,,/g, '\0').split(',')) {
    const item = raw.replace(/\0/g, ',');
    const eq = item.indexOf('=');
    let key = eq < 0 ? item : item.slice(0, eq);
    let value = eq < 0 ? 'on' : item.slice(eq + 1);
    if (eq < 0) {
      if (item.startsWith('no')) [key, value] = [item.slice(2), 'off'];
      process.stderr.write(
        `blockrep: warning: short-form boolean option '${item}' deprecated\nPlease use ${key}=${value} instead\n`,
      );
    }
    if (key === 'snapshot.id') choice.id = value;
    else if (key === 'snapshot.name') choice.name = value;
    else
      throw new CliFailure(
        `Invalid parameter '${key}'\nblockrep: Failed in parsing snapshot param '${text}'`,
      );
  }
  return choice;
}

/** Makes the (qcow2) source read the chosen snapshot, refused with qemu-img's texts. */
async function loadSnapshot(node: BlockNode, choice: SnapshotChoice): Promise<void> {
  const img = qcow2Of(node);
  try {
    if (!img)
      throw new Error(
        `Block format '${node.driver.name}' used by device '' does not support temporarily loading internal snapshots`,
      );
    if (!('idOrName' in choice)) await loadSnapshotReadOnly(img, choice);
    else {
      await loadSnapshotReadOnly(img, { id: choice.idOrName }).catch(() =>
        loadSnapshotReadOnly(img, { name: choice.idOrName }),
      );
    }
  } catch (e) {
    throw new CliFailure(`Failed to load snapshot: ${(e as Error).message}`);
  }
}

/** The source's persistent bitmaps in the order qemu-img walks them (newest first). */
const persistentBitmaps = (node: BlockNode) => [...node.dirtyBitmaps].reverse().filter((b) => b.persistent);

/** Whether a node can store persistent bitmaps (qcow2 v3). */
const storesBitmaps = (node: BlockNode) => qcow2Of(node)?.v3 === true;

/**
 * --bitmaps: each persistent bitmap of the source added to the target (same granularity, enabled
 * or not) and filled from it, by block-dirty-bitmap-add and -merge as qemu-img does;
 * --skip-broken-bitmaps passes over inconsistent ones with a warning.
 */
async function copyBitmaps(
  g: BlockGraph,
  src: BlockNode,
  dst: BlockNode,
  skipBroken: boolean,
): Promise<void> {
  const { CommandRegistry, registerBitmapCommands } = await import('@blockrep/qmp');
  const qmp = new CommandRegistry();
  registerBitmapCommands(qmp, g);
  // The bitmap commands use nothing of a QMP session.
  const run = (name: string, a: Record<string, unknown>) => qmp.require(name).handler(a, {} as never);
  for (const bm of persistentBitmaps(src)) {
    const name = bm.name ?? '';
    if (bm.inconsistent && skipBroken) {
      process.stderr.write(`blockrep: warning: Skipping inconsistent bitmap '${name}'\n`);
      continue;
    }
    try {
      await run('block-dirty-bitmap-add', {
        node: dst.nodeName,
        name,
        granularity: bm.granularity,
        persistent: true,
        disabled: !bm.enabled,
      });
    } catch (e) {
      throw new CliFailure(`Failed to create bitmap ${name}: ${(e as Error).message}`);
    }
    try {
      await run('block-dirty-bitmap-merge', {
        node: dst.nodeName,
        target: name,
        bitmaps: [{ node: src.nodeName, name }],
      });
    } catch (e) {
      throw new CliFailure(`Failed to populate bitmap ${name}: ${(e as Error).message}`);
    }
  }
}

/** The option values qemu-img checks while it reads its options, in the order given. */
interface ConvertValues {
  snapshot?: SnapshotChoice;
  sparse?: number;
  depth: number;
  rate: number;
}

function optionValues(p: ParsedArgs): ConvertValues {
  const v: ConvertValues = { depth: 8, rate: 0 };
  for (const [k, value] of p.order) {
    if (typeof value !== 'string') continue;
    if (k === '-l') v.snapshot = snapshotParam(value);
    else if (k === '-S') {
      v.sparse = cvtnum(value, 'buffer size for sparse output');
      if (v.sparse % SECTOR || v.sparse > MAX_SPARSE)
        throw new CliFailure(
          `Invalid buffer size for sparse output specified. Valid sizes are multiples of ${SECTOR} up to ${MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output).`,
        );
    } else if (k === '-m') {
      const n = strtol(value);
      if (n === undefined || n < 1 || n > 16)
        throw new CliFailure(
          'Invalid number of coroutines. Allowed number of coroutines is between 1 and 16',
        );
      v.depth = n;
    } else if (k === '-r') v.rate = cvtnum(value, 'rate limit');
  }
  return v;
}

/** Refuses what qemu-img refuses before it opens anything, with its texts and in its order. */
function refuseCombinations(p: ParsedArgs, v: ConvertValues): void {
  const has = (k: string) => p.opts.has(k);
  const refusals: [boolean, string][] = [
    [has('--skip-broken-bitmaps') && !has('--bitmaps'), 'Use of --skip-broken-bitmaps requires --bitmaps'],
    [has('-C') && has('-c'), 'Cannot enable copy offloading when -c is used'],
    [has('-C') && v.sparse !== undefined, 'Cannot enable copy offloading when -S is used'],
    [has('-C') && has('--salvage'), 'Cannot use copy offloading in salvaging mode'],
    [has('--target-image-opts') && !has('-n'), '--target-image-opts requires use of -n flag'],
    [has('-n') && has('-o'), '-o has no effect when skipping image creation'],
    [has('--target-is-zero') && !has('-n'), '--target-is-zero requires use of -n flag'],
  ];
  for (const [refused, text] of refusals) if (refused) throw new CliFailure(text);
}

/**
 * blockrep convert [-f fmt] [-O fmt] [-B backing -F fmt] [-o options] [-n] [-p] [-q] [-m N] [-S size]
 * [-c] [-C] [-W] [-U] [-r rate] [-l snapshot] [--salvage] [--bitmaps [--skip-broken-bitmaps]]
 * [--target-image-opts] [--target-is-zero] SOURCE... TARGET (sources concatenated)
 */
export async function convertCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:',
      long: {
        ...HELP,
        ...IMAGE_OPTS,
        'target-image-opts': { arg: false },
        'target-is-zero': { arg: false },
        salvage: { arg: false },
        bitmaps: { arg: false },
        'skip-broken-bitmaps': { arg: false },
        ...FORCE_SHARE,
      },
    },
    'convert',
  );
  refuseUnsupported(p);
  const values = optionValues(p);
  refuseCombinations(p, values);
  const compress = p.opts.has('-c');
  const backing = optString(p, '-B');
  const files = p.positional.slice(0, -1);
  const target = p.positional[p.positional.length - 1];
  if (!files.length || !target) throw new CliFailure('Must specify image file name');
  const existing = p.opts.has('-n');
  const targetOpts = p.opts.has('--target-image-opts');
  // With --target-image-opts the options name the target's format (-O would be a second one).
  const outFmt = optString(p, '-O') ?? (targetOpts ? undefined : 'raw');
  const bitmaps = p.opts.has('--bitmaps');
  const quiet = p.opts.has('-q');

  const g = imageGraph();
  try {
    const sources: Source[] = [];
    let size = 0;
    for (const file of files) {
      const node = await openImage(g, file, {
        format: optString(p, '-f'),
        forceShare: forceShare(p),
        imageOpts: p.opts.has('--image-opts'),
      });
      sources.push({ node, blk: attachBackend(g, node, false), base: size });
      size += node.length;
    }
    const first = sources[0]!;
    if (values.snapshot) {
      if ('idOrName' in values.snapshot && sources.length > 1)
        throw new CliFailure('No support for concatenating multiple snapshot');
      await loadSnapshot(first.node, values.snapshot);
    }
    const createOpts = parseOptionList(p.all.get('-o') ?? []);
    if (!existing) checkFormat(outFmt!);
    // qemu-img prints this one and then exits 0 without converting; blockrep fails.
    if (p.opts.has('--target-is-zero') && backing !== undefined)
      throw new CliFailure('Cannot use --target-is-zero when the destination image has a backing file');
    if (sources.length > 1 && backing !== undefined)
      throw new CliFailure(
        'Having a backing file for the target makes no sense when concatenating multiple input images',
      );
    if (!existing && backing !== undefined && optString(p, '-F') === undefined)
      throw new CliFailure('Use of backing file requires explicit backing format');
    if (compress && !existing) {
      if (outFmt !== 'qcow2') throw new CliFailure('Compression not supported for this file format');
      const prealloc = createOpts.get('preallocation');
      if (prealloc !== undefined && prealloc !== 'off')
        throw new CliFailure('Compression and preallocation not supported at the same time');
    }
    if (bitmaps) {
      if (sources.length > 1) throw new CliFailure('Copying bitmaps only possible with single source');
      if (!storesBitmaps(first.node)) throw new CliFailure('Source lacks bitmap support');
      const broken = persistentBitmaps(first.node).find((b) => b.inconsistent);
      if (broken && !p.opts.has('--skip-broken-bitmaps'))
        throw new CliFailure(
          `Cannot copy inconsistent bitmap '${broken.name}'`,
          1,
          "Try --skip-broken-bitmaps, or use 'blockrep bitmap --remove' to delete it",
        );
    }
    if (!existing) {
      // qcow2 sizes are whole sectors; the tail of an odd-sized raw source reads as zeroes.
      const targetSize = outFmt === 'qcow2' ? Math.ceil(size / SECTOR) * SECTOR : size;
      await createImage(target, outFmt!, targetSize, createOpts, backing, optString(p, '-F'));
    }
    const dst = await openImage(g, target, {
      format: outFmt,
      imageOpts: targetOpts,
      readOnly: false,
      // -S 0 keeps every block allocated: nothing is unmapped then.
      unmap: values.sparse !== 0,
    });
    if (bitmaps && !storesBitmaps(dst))
      throw new CliFailure(`Format driver '${dst.driver.name}' does not support bitmaps`);
    if (compress && !qcow2Of(dst)) throw new CliFailure('Compression not supported for this file format');
    if (existing && Math.ceil(dst.length / SECTOR) < Math.ceil(size / SECTOR))
      throw new CliFailure('output file is smaller than input file');
    const rules: CopyRules = {
      to: attachBackend(g, dst, true),
      // A new target reads zeroes where nothing is written, unless it has a backing file; an
      // existing one does only when the user says so (--target-is-zero).
      mustZero: existing ? !p.opts.has('--target-is-zero') : backing !== undefined,
      salvage: p.opts.has('--salvage'),
      quiet,
      rate: values.rate ? new RateLimit(values.rate) : null,
      inOrder: !p.opts.has('-W'),
    };
    const fill = values.sparse === 0;
    const extents = (
      await Promise.all(sources.map((src) => sourceExtents(src, backing !== undefined, fill)))
    ).flat();
    // Zeroes in the data are not written either, in units the target allocates, or -S bytes; none
    // are looked for with -S 0 or -C (a copy offload moves the data as it is).
    const grain = fill || p.opts.has('-C') ? 0 : (values.sparse ?? qcow2Of(dst)?.cs ?? SPARSE_GRAIN);
    const bar = new ProgressBar(size, !quiet);
    if (compress) {
      await writeCompressedClusters(sources, extents, rules, qcow2Of(dst)!.cs, size, values.depth, bar);
    } else {
      let done = 0;
      let next = 0;
      const order = new WriteOrder();
      await runInFlight(values.depth, () => {
        const e = extents[next++];
        if (!e) return null;
        const turn = order.take();
        return async () => {
          if (e.zero) {
            await inTurn(turn, rules, async () => {
              if (rules.mustZero) await writeRequest(e.offset, () => writeZeroes(rules, e.offset, e.bytes));
            });
          } else {
            const buf = await readSources([e.source], e.offset, e.bytes, rules).catch((err) => {
              turn.done();
              throw err;
            });
            const runs = grain
              ? zeroRuns(buf, e.offset, grain)
              : [{ start: 0, end: buf.length, zero: false }];
            await inTurn(turn, rules, () =>
              writeRequest(e.offset, async () => {
                for (const run of runs) {
                  const at = e.offset + run.start;
                  if (!run.zero) await writeData(rules, at, buf.subarray(run.start, run.end));
                  else if (rules.mustZero) await writeZeroes(rules, at, run.end - run.start);
                }
              }),
            );
          }
          done += e.bytes;
          bar.update(done);
        };
      });
    }
    await rules.to.flush();
    if (bitmaps) await copyBitmaps(g, first.node, dst, p.opts.has('--skip-broken-bitmaps'));
    bar.finish();
  } finally {
    await g.closeAll();
  }
  return 0;
}
