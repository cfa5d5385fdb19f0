import { FORCE_SHARE, HELP, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, imageGraph, openImage, runInFlight } from '../image';
import { sizeArg } from '../options';

function intOption(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new CliFailure(`Invalid ${what} specified`);
  return n;
}

/**
 * blockrep bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-o offset] [--pattern=N]
 * [-s size] [-S step] [-t cache] [-w] [-q] FILE: qemu-img bench's sequential request loop.
 */
export async function benchCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':hc:d:f:ni:o:qs:S:t:wU',
      long: {
        ...HELP,
        'flush-interval': { arg: true },
        'image-opts': { arg: false },
        pattern: { arg: true },
        'no-drain': { arg: false },
        ...FORCE_SHARE,
      },
    },
    'bench',
  );
  refuseUnsupported(p);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const count = intOption(optString(p, '-c'), 75000, 'request count');
  const depth = intOption(optString(p, '-d'), 64, 'queue depth');
  const size = sizeArg(optString(p, '-s') ?? '4096', 'buffer size');
  const stepText = optString(p, '-S');
  const step = stepText === undefined ? size : sizeArg(stepText, 'step size');
  const start = sizeArg(optString(p, '-o') ?? '0', 'offset');
  const write = p.opts.has('-w');
  const patternText = optString(p, '--pattern');
  const pattern = patternText === undefined ? 0 : Number(patternText);
  if (!Number.isInteger(pattern) || pattern < 0 || pattern > 0xff)
    throw new CliFailure('Invalid pattern byte specified');
  if (patternText !== undefined && !write) throw new CliFailure('--pattern is only for write requests (-w)');
  const flushInterval = intOption(
    optString(p, '--flush-interval'),
    Number.MAX_SAFE_INTEGER,
    'flush interval',
  );

  const g = imageGraph();
  try {
    const node = await openImage(g, file, {
      format: optString(p, '-f'),
      readOnly: !write,
      imageOpts: p.opts.has('--image-opts'),
    });
    const blk = attachBackend(g, node, write);
    const length = node.length;
    if (size > length) throw new CliFailure(`${file}: request size ${size} is larger than the image`);
    if (!p.opts.has('-q')) {
      process.stdout.write(
        `Sending ${count} ${write ? 'write' : 'read'} requests, ${size} bytes each, ${depth} in parallel (starting at offset ${start}, step size ${step})\n`,
      );
    }
    const buf = Buffer.alloc(size, pattern);
    let offset = start;
    let issued = 0;
    const t0 = process.hrtime.bigint();
    await runInFlight(depth, () => {
      if (issued >= count) return null;
      issued++;
      // Requests that would run past the end wrap around to the start of the image.
      if (offset + size > length) offset = 0;
      const at = offset;
      offset += step;
      const flushNow = write && issued % flushInterval === 0;
      return async () => {
        if (write) await blk.write(at, buf);
        else await blk.read(at, size);
        if (flushNow) await blk.flush();
      };
    });
    if (write && !p.opts.has('--no-drain')) await blk.flush();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    if (!p.opts.has('-q')) process.stdout.write(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
  } finally {
    await g.closeAll();
  }
  return 0;
}
