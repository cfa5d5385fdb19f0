import { checkQcow2Image, type Qcow2CheckResult } from '@blockrep/qcow2';
import { INSPECT_OPTS, optString, outputFormat, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { checkFormat, forceShare, imageArg, openFailure, probeFormat } from '../image';
import { qemuJson } from '../json';

/** qemu-img check's exit codes. */
const EXIT = { ok: 0, checkErrors: 1, corruptions: 2, leaks: 3, unsupported: 63 } as const;

function exitCode(r: Qcow2CheckResult): number {
  if (r['check-errors']) return EXIT.checkErrors;
  if (r.corruptions) return EXIT.corruptions;
  if (r.leaks) return EXIT.leaks;
  return EXIT.ok;
}

const pct = (n: number, total: number) => (total ? (100 * n) / total : 0).toFixed(2);

function humanReport(r: Qcow2CheckResult, fixed: { leaks: number; corruptions: number } | null): string {
  const out: string[] = [];
  if (fixed && (fixed.leaks || fixed.corruptions)) {
    out.push('The following inconsistencies were found and repaired:', '');
    out.push(`    ${fixed.leaks} leaked clusters`, `    ${fixed.corruptions} corruptions`, '');
    out.push('Double checking the fixed image now...');
  }
  if (r.corruptions) {
    out.push(
      '',
      `${r.corruptions} errors were found on the image.`,
      'Data may be corrupted, or further writes to the image may corrupt it.',
    );
  }
  if (r.leaks) {
    out.push(
      '',
      `${r.leaks} leaked clusters were found on the image.`,
      'This means waste of disk space, but no harm to data.',
    );
  }
  if (r['check-errors']) out.push('', `${r['check-errors']} internal errors have occurred during the check.`);
  if (!r.corruptions && !r.leaks && !r['check-errors']) out.push('No errors were found on the image.');
  const total = r['total-clusters'];
  const alloc = r['allocated-clusters'] ?? 0;
  if (total && alloc) {
    out.push(
      `${alloc}/${total} = ${pct(alloc, total)}% allocated, ${pct(r['fragmented-clusters'] ?? 0, alloc)}% fragmented, ${pct(r['compressed-clusters'] ?? 0, alloc)}% compressed clusters`,
    );
  }
  if (r['image-end-offset'] !== undefined) out.push(`Image end offset: ${r['image-end-offset']}`);
  return `${out.join('\n')}\n`;
}

/** The fields of `--output=json` (ImageCheck, in QAPI member order; zero counts left out). */
function jsonReport(r: Qcow2CheckResult): Record<string, unknown> {
  const keys = [
    'filename',
    'format',
    'check-errors',
    'image-end-offset',
    'corruptions',
    'leaks',
    'corruptions-fixed',
    'leaks-fixed',
    'total-clusters',
    'allocated-clusters',
    'fragmented-clusters',
    'compressed-clusters',
  ] as const;
  const out: Record<string, unknown> = {};
  for (const k of keys) if (r[k] !== undefined) out[k] = r[k];
  return out;
}

/** blockrep check [-f fmt] [--output=json] [-r leaks|all] [-q] [-U] FILE */
export async function checkCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':hf:r:T:qU',
      long: { ...INSPECT_OPTS, repair: { arg: true, as: '-r' } },
    },
    'check',
  );
  refuseUnsupported(p);
  const repair = optString(p, '-r');
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all')
    throw usageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${repair}`);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const arg = p.positional[0]!;
  const output = outputFormat(p);
  // A json: filename or --image-opts list works when it names a format over a file, nothing more.
  const spec = imageArg(arg, { imageOpts: p.opts.has('--image-opts'), format: optString(p, '-f') });
  const file = spec.path;
  if (spec.options) {
    const { driver, file: f, ...rest } = spec.options;
    const { driver: _d, filename: _f, ...fileRest } = (f ?? {}) as Record<string, unknown>;
    if (!file || Object.keys(rest).length || Object.keys(fileRest).length)
      throw new CliFailure(
        `Could not open '${arg}': check takes a format over a file here (driver, file.filename)`,
      );
    if (driver !== undefined) checkFormat(driver as string);
  }
  const fmt = (spec.options?.driver as string | undefined) ?? optString(p, '-f') ?? probeFormat(file);
  checkFormat(fmt);
  if (fmt !== 'qcow2') throw new CliFailure('This image format does not support checks', EXIT.unsupported);

  let r: Qcow2CheckResult;
  let fixed: { leaks: number; corruptions: number } | null = null;
  // Findings go to stderr line by line, as qemu-img's driver check prints them; the ones QEMU
  // reports as errors of the program carry its name; a check that could not finish says so.
  const tell = (found: Qcow2CheckResult) => {
    const lines = found.messages.map((m, i) => (found.reported?.includes(i) ? `blockrep: ${m}` : m));
    if (lines.length) process.stderr.write(`${lines.join('\n')}\n`);
    if (found.failed) throw new CliFailure(`Check failed: ${found.failed}`);
  };
  try {
    const share = forceShare(p);
    r = await checkQcow2Image(file, repair ? { repair, forceShare: share } : { forceShare: share });
    tell(r);
    if (repair && (r['leaks-fixed'] || r['corruptions-fixed'])) {
      // Report what the fixed image looks like now, with what was fixed (as qemu-img does).
      fixed = { leaks: r['leaks-fixed'] ?? 0, corruptions: r['corruptions-fixed'] ?? 0 };
      const again = await checkQcow2Image(file, { forceShare: share });
      tell(again);
      r = { ...again };
      if (fixed.leaks) r['leaks-fixed'] = fixed.leaks;
      if (fixed.corruptions) r['corruptions-fixed'] = fixed.corruptions;
    }
  } catch (e) {
    if (e instanceof CliFailure) throw e;
    throw openFailure(arg, e);
  }
  r.filename = file;
  if (output === 'json') {
    process.stdout.write(`${await qemuJson(jsonReport(r))}\n`);
  } else if (!p.opts.has('-q')) {
    process.stdout.write(humanReport(r, fixed));
  }
  return exitCode(r);
}
