/** Splits qemu-img-style arguments: short options with values, --long[=value], positionals. */
export function parseArgs(
  args: string[],
  withValue: string[],
): { opts: Map<string, string | true>; positional: string[] } {
  const opts = new Map<string, string | true>();
  const positional: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      if (eq > 0) opts.set(a.slice(0, eq), a.slice(eq + 1));
      else if (withValue.includes(a)) {
        if (i + 1 >= args.length) throw new Error(`option '${a}' requires an argument`);
        opts.set(a, args[++i]!);
      } else opts.set(a, true);
    } else if (a.startsWith('-') && a.length > 1) {
      if (withValue.includes(a)) {
        if (i + 1 >= args.length) throw new Error(`option requires an argument -- '${a.slice(1)}'`);
        opts.set(a, args[++i]!);
      } else opts.set(a, true);
    } else positional.push(a);
  }
  return { opts, positional };
}
