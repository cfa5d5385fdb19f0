/** Parsed qemu-img-style arguments: options by name (repeated ones in `all`), positionals in order. */
export interface ParsedArgs {
  opts: Map<string, string | true>;
  all: Map<string, string[]>;
  positional: string[];
}

/** Splits qemu-img-style arguments: short options with values, --long[=value], positionals. */
export function parseArgs(args: string[], withValue: string[]): ParsedArgs {
  const opts = new Map<string, string | true>();
  const all = new Map<string, string[]>();
  const positional: string[] = [];
  const set = (k: string, v: string | true) => {
    opts.set(k, v);
    if (typeof v === 'string') all.set(k, [...(all.get(k) ?? []), v]);
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      positional.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      if (eq > 0) set(a.slice(0, eq), a.slice(eq + 1));
      else if (withValue.includes(a)) {
        if (i + 1 >= args.length) throw new Error(`option '${a}' requires an argument`);
        set(a, args[++i]!);
      } else set(a, true);
    } else if (a.startsWith('-') && a.length > 1 && !/^-\d/.test(a)) {
      // -fqcow2 as well as -f qcow2.
      const flag = a.slice(0, 2);
      if (withValue.includes(flag)) {
        if (a.length > 2) set(flag, a.slice(2));
        else if (i + 1 >= args.length) throw new Error(`option requires an argument -- '${a.slice(1)}'`);
        else set(flag, args[++i]!);
      } else for (const c of a.slice(1)) set(`-${c}`, true);
    } else positional.push(a);
  }
  return { opts, all, positional };
}

/** The string value of an option, if given. */
export function optString(p: ParsedArgs, name: string): string | undefined {
  const v = p.opts.get(name);
  return typeof v === 'string' ? v : undefined;
}
