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
