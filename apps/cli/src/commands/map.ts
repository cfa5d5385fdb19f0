import { type BlockNode, blockStatusAbove } from '@blockrep/block';
import { INSPECT_OPTS, optString, outputFormat, parseArgs, refuseUnsupported, usageError } from '../args';
import { forceShare, imageGraph, openImage } from '../image';
import { sizeArg } from '../options';

/** One extent of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** The file holding the data (human output only). */
  filename?: string;
}

/** Extents with the same status (and contiguous host offsets) are one. */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if (a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/** The allocation map of an image and its backing chain from start to start+length. */
export async function imageMap(top: BlockNode, start = 0, length = top.length): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  const end = Math.min(top.length, start + length);
  for (let off = start; off < end; ) {
    const st = await blockStatusAbove(top, null, off, end - off);
    if (st.bytes <= 0) break;
    const e: MapEntry = {
      start: off,
      length: st.bytes,
      depth: st.depth,
      present: st.allocated,
      zero: st.zero,
      data: st.data,
    };
    if (st.offset !== undefined) e.offset = st.offset;
    if (st.file) e.filename = st.file.filename;
    const last = out[out.length - 1];
    if (last && mergeable(last, e)) last.length += e.length;
    else out.push(e);
    off += e.length;
  }
  return out;
}

const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`);

/** blockrep map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] FILE */
export async function mapCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':f:s:l:hU',
      long: {
        ...INSPECT_OPTS,
        'start-offset': { arg: true, as: '-s' },
        'max-length': { arg: true, as: '-l' },
      },
    },
    'map',
  );
  refuseUnsupported(p);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const output = outputFormat(p);
  const startText = optString(p, '-s');
  const lengthText = optString(p, '-l');
  const g = imageGraph();
  try {
    const top = await openImage(g, file, {
      format: optString(p, '-f'),
      forceShare: forceShare(p),
      imageOpts: p.opts.has('--image-opts'),
    });
    const entries = await imageMap(
      top,
      startText === undefined ? 0 : sizeArg(startText, 'offset'),
      lengthText === undefined ? top.length : sizeArg(lengthText, 'length'),
    );
    if (output === 'json') {
      const lines = entries.map((e) => {
        const fields = [
          `"start": ${e.start}`,
          `"length": ${e.length}`,
          `"depth": ${e.depth}`,
          `"present": ${e.present}`,
          `"zero": ${e.zero}`,
          `"data": ${e.data}`,
        ];
        if (e.offset !== undefined) fields.push(`"offset": ${e.offset}`);
        return `{ ${fields.join(', ')}}`;
      });
      process.stdout.write(`[${lines.join(',\n')}]\n`);
    } else {
      let text = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
      for (const e of entries) {
        if (!e.data || e.offset === undefined) continue;
        text += `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.filename}\n`;
      }
      process.stdout.write(text);
    }
  } finally {
    await g.closeAll();
  }
  return 0;
}
