import { CliFailure } from './failure';

/** Parsed qemu-img-style arguments: options by name (repeated ones in `all`), positionals in order. */
export interface ParsedArgs {
  opts: Map<string, string | true>;
  all: Map<string, string[]>;
  /** Every option in the order given (commands whose actions run in that order: bitmap). */
  order: [string, string | true][];
  positional: string[];
}

/**
 * The options of one command, as qemu-img declares them to getopt_long: `short` is the option
 * string ("f:hU": a letter, then ':' when it takes a value), `long` the long options by name,
 * each with whether it takes a value and, for those that stand for a short option, which one
 * ("format" is "-f"). Options are stored under their short name when they have one, else under
 * "--name".
 */
export interface OptionSpec {
  short: string;
  long?: Record<string, { arg: boolean; as?: string }>;
}

/** The text after every usage error, as qemu-img's error_exit prints it. */
export const TRY_HELP = "Try 'blockrep --help' for more information";

/** A usage error: the message, then the line pointing at --help. */
export function usageError(message: string): CliFailure {
  return new CliFailure(message, 1, TRY_HELP);
}

/** Thrown for -h/--help: the caller prints the usage to stdout and exits 0. */
export class HelpRequested extends Error {
  constructor() {
    super('help');
  }
}

/** The long options every image command has (qemu-img's "help" and "object"). */
export const HELP: NonNullable<OptionSpec['long']> = { help: { arg: false, as: '-h' } };

/** The long options of the commands that open images (--object is refused: no secrets or TLS objects here). */
export const IMAGE_OPTS: NonNullable<OptionSpec['long']> = {
  object: { arg: true },
  'image-opts': { arg: false },
};

/** -U and its long name, on every command that reads images. */
export const FORCE_SHARE: NonNullable<OptionSpec['long']> = { 'force-share': { arg: false, as: '-U' } };

/** The long options info, check and map share: --help, --format, --output, --object, --image-opts, --force-share. */
export const INSPECT_OPTS: NonNullable<OptionSpec['long']> = {
  ...HELP,
  format: { arg: true, as: '-f' },
  output: { arg: true },
  ...IMAGE_OPTS,
  ...FORCE_SHARE,
};

/** Options qemu-img knows and blockrep does not implement yet: refused by name, never ignored. */
export function refuseUnsupported(p: ParsedArgs, more: string[] = []): void {
  for (const k of ['--object', ...more]) {
    if (p.opts.has(k)) throw new CliFailure(`Option '${k}' is not supported by blockrep yet`);
  }
}

/**
 * Splits arguments as glibc's getopt_long does for qemu-img (options and positionals in any
 * order, "--" ends the options, a long option may be shortened to any unique prefix, -fqcow2 as
 * well as -f qcow2, --name=value as well as --name value), refusing what the command does not
 * know with qemu-img's texts: "unrecognized option '--bogus'", "missing argument for option
 * '-f'". Arguments that look like negative numbers ("-1G") are positionals. `name` is the word
 * before the arguments (the command), which qemu-img names when the first letter of a group of
 * short options is unknown.
 */
export function parseArgs(args: string[], spec: OptionSpec, name = 'blockrep'): ParsedArgs {
  const takesArg = new Map<string, boolean>();
  const short = spec.short.replace(/^:/, '');
  for (let i = 0; i < short.length; i++) {
    const c = short[i]!;
    const arg = short[i + 1] === ':';
    takesArg.set(c, arg);
    if (arg) i++;
  }
  const long = spec.long ?? {};
  const opts = new Map<string, string | true>();
  const all = new Map<string, string[]>();
  const positional: string[] = [];
  const order: [string, string | true][] = [];
  const set = (k: string, v: string | true) => {
    if (k === '-h') throw new HelpRequested();
    opts.set(k, v);
    order.push([k, v]);
    if (typeof v === 'string') all.set(k, [...(all.get(k) ?? []), v]);
  };
  const unrecognized = (token: string) => usageError(`unrecognized option '${token}'`);
  const missing = (option: string) => usageError(`missing argument for option '${option}'`);
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      positional.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const given = a.slice(2, eq > 0 ? eq : undefined);
      const match = long[given]
        ? given
        : (() => {
            const prefixed = Object.keys(long).filter((n) => n.startsWith(given));
            return prefixed.length === 1 ? prefixed[0]! : null;
          })();
      if (!given || !match) throw unrecognized(a);
      const o = long[match]!;
      const key = o.as ?? `--${match}`;
      if (!o.arg) {
        if (eq > 0) throw unrecognized(a);
        set(key, true);
      } else if (eq > 0) set(key, a.slice(eq + 1));
      else if (i + 1 < args.length) set(key, args[++i]!);
      else throw missing(`--${match}`);
    } else if (a.startsWith('-') && a.length > 1 && !/^-\d/.test(a)) {
      for (let k = 1; k < a.length; k++) {
        const c = a[k]!;
        const arg = takesArg.get(c);
        if (arg === undefined) {
          // getopt has moved past the group only after its last letter.
          throw unrecognized(k === a.length - 1 ? a : (args[i - 1] ?? name));
        }
        if (!arg) {
          set(`-${c}`, true);
          continue;
        }
        if (k + 1 < a.length) set(`-${c}`, a.slice(k + 1));
        else if (i + 1 < args.length) set(`-${c}`, args[++i]!);
        else throw missing(`-${c}`);
        break;
      }
    } else positional.push(a);
  }
  return { opts, all, order, positional };
}

/** The string value of an option, if given. */
export function optString(p: ParsedArgs, name: string): string | undefined {
  const v = p.opts.get(name);
  return typeof v === 'string' ? v : undefined;
}

/** --output: human (the default) or json, refused otherwise with qemu-img's text. */
export function outputFormat(p: ParsedArgs): 'human' | 'json' {
  const v = optString(p, '--output');
  if (v === undefined || v === 'human') return 'human';
  if (v === 'json') return 'json';
  throw new CliFailure('--output must be used with human or json as argument.');
}
