import { parseSize } from '@blockrep/block';
import { CliFailure } from './failure';

/* Values of qemu-img's command lines: sizes with suffixes and `-o key=value,...` lists. */

/** qemu-img's two-line hint (two error reports: the second line has the program's prefix too). */
const SIZE_HELP =
  'You may use k, M, G, T, P or E suffixes for\nblockrep: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

/** A size such as 10G, 512k or 1048576. */
export function sizeArg(text: string, what = 'image size'): number {
  const size = parseSize(text);
  if (size === undefined) throw new CliFailure(`Invalid ${what} specified. ${SIZE_HELP}`);
  return size;
}

const INT64_MAX = 2n ** 63n - 1n;
const SUFFIX_SHIFT: Record<string, bigint> = { b: 0n, k: 10n, m: 20n, g: 30n, t: 40n, p: 50n, e: 60n };

/**
 * A value as qemu-img's cvtnum reads it (rate limits): digits (or 0x and hex digits, whose
 * multiplier suffix earns a deprecation warning) with an optional fraction before a suffix other
 * than b, then one suffix letter at most; nothing may follow. Values past INT64_MAX are refused
 * with the range text; above 2^53 the number loses precision, which no limit notices.
 */
export function cvtnum(text: string, what: string): number {
  const m = /^\s*(?:(0x[0-9a-f]+)|(\d+)(?:\.(\d+))?)([bkmgtpe])?$/i.exec(text);
  const suffix = m?.[4]?.toLowerCase();
  if (!m || (m[3] !== undefined && (suffix === undefined || suffix === 'b')))
    throw new CliFailure(`Invalid ${what} specified. ${SIZE_HELP}`);
  if (m[1] && suffix)
    process.stderr.write(
      `blockrep: warning: Using a multiplier suffix on hex numbers is deprecated: ${text}\n`,
    );
  const shift = SUFFIX_SHIFT[suffix ?? 'b']!;
  const whole = BigInt(m[1] ?? m[2]!) << shift;
  const fraction = m[3] ? BigInt(Math.floor(Number(`0.${m[3]}`) * 2 ** Number(shift))) : 0n;
  const value = whole + fraction;
  if (value > INT64_MAX)
    throw new CliFailure(`Invalid ${what} specified. Must be between 0 and ${INT64_MAX}.`);
  return Number(value);
}

/** A whole number as C's strtol reads it with base 0 (decimal, 0x hex, 0 octal; leading blanks, a sign); undefined unless all of text is one. */
export function strtol(text: string): number | undefined {
  const m = /^\s*([-+]?)(?:0x([0-9a-f]+)|(0[0-7]*)|([1-9]\d*))$/i.exec(text);
  if (!m) return undefined;
  const v =
    m[2] !== undefined
      ? Number.parseInt(m[2], 16)
      : m[3] !== undefined
        ? Number.parseInt(m[3], 8)
        : Number(m[4]);
  return m[1] === '-' ? -v : v;
}

/** -o options (repeatable, comma-separated; ',,' is a literal comma as in QEMU). */
export function parseOptionList(texts: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const text of texts) {
    for (const item of text.replace(/,,/g, '\0').split(',')) {
      if (!item) continue;
      const eq = item.indexOf('=');
      const key = (eq < 0 ? item : item.slice(0, eq)).replace(/\0/g, ',');
      const value = eq < 0 ? 'on' : item.slice(eq + 1).replace(/\0/g, ',');
      out.set(key, value);
    }
  }
  return out;
}

/** on/off as QEMU spells booleans. */
export function boolOption(key: string, value: string): boolean {
  if (['on', 'yes', 'true'].includes(value)) return true;
  if (['off', 'no', 'false'].includes(value)) return false;
  throw new CliFailure(`Parameter '${key}' expects 'on' or 'off'`);
}
