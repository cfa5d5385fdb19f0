import { describe, expect, it } from 'vitest';
import { HelpRequested, optString, parseArgs } from '../src/args';
import { parseOptionList, sizeArg } from '../src/options';

describe('qemu-img-style arguments', () => {
  it('splits short options with attached or separate values, grouped flags, --long=value and --', () => {
    const p = parseArgs(['-fqcow2', '-O', 'raw', '-pq', '--output=json', 'a', '--', '-b'], {
      short: ':f:O:pq',
      long: { output: { arg: true } },
    });
    expect(optString(p, '-f')).toBe('qcow2');
    expect(optString(p, '-O')).toBe('raw');
    expect(p.opts.get('-p')).toBe(true);
    expect(p.opts.get('-q')).toBe(true);
    expect(optString(p, '--output')).toBe('json');
    expect(p.positional).toEqual(['a', '-b']);
  });

  it('keeps negative sizes as positionals (resize FILE -1M) and repeated -o values in order', () => {
    const p = parseArgs(['-o', 'a=1', 'img', '-1M', '-o', 'b=2'], { short: ':o:' });
    expect(p.positional).toEqual(['img', '-1M']);
    expect(p.all.get('-o')).toEqual(['a=1', 'b=2']);
  });

  it("refuses what the command does not know with qemu-img's texts, as getopt_long sees it", () => {
    const spec = {
      short: ':f:hU',
      long: {
        help: { arg: false, as: '-h' },
        format: { arg: true, as: '-f' },
        'force-share': { arg: false, as: '-U' },
        'backing-chain': { arg: false },
        output: { arg: true },
      },
    };
    const refused = (args: string[]) => {
      try {
        parseArgs(args, spec, 'info');
      } catch (e) {
        return `${(e as Error).message} / ${(e as { hint?: string }).hint}`;
      }
      return 'accepted';
    };
    const tryHelp = "Try 'blockrep --help' for more information";
    expect(refused(['--bogus', 'f'])).toBe(`unrecognized option '--bogus' / ${tryHelp}`);
    expect(refused(['-z', 'f'])).toBe(`unrecognized option '-z' / ${tryHelp}`);
    // An unknown first letter of a group: getopt has not moved past the group, so the word
    // before it is named (qemu-img prints "unrecognized option 'info'" for `info -qU`).
    expect(refused(['-qU', 'f'])).toBe(`unrecognized option 'info' / ${tryHelp}`);
    expect(refused(['-Uq', 'f'])).toBe(`unrecognized option '-Uq' / ${tryHelp}`);
    expect(refused(['--backing-chain=1', 'f'])).toBe(`unrecognized option '--backing-chain=1' / ${tryHelp}`);
    // "--f" could be --format or --force-share.
    expect(refused(['--f=raw', 'f'])).toBe(`unrecognized option '--f=raw' / ${tryHelp}`);
    expect(refused(['f', '-f'])).toBe(`missing argument for option '-f' / ${tryHelp}`);
    expect(refused(['f', '--output'])).toBe(`missing argument for option '--output' / ${tryHelp}`);
    // Unique prefixes stand for the option, long names for their short letter.
    const p = parseArgs(['--form=qcow2', '--force', '--out', 'json', 'f'], spec);
    expect([optString(p, '-f'), p.opts.has('-U'), optString(p, '--output'), p.positional]).toEqual([
      'qcow2',
      true,
      'json',
      ['f'],
    ]);
    expect(() => parseArgs(['f', '--help'], spec)).toThrow(HelpRequested);
    expect(() => parseArgs(['-h'], spec)).toThrow(HelpRequested);
  });

  it('reads -o lists with QEMU escaping and sizes with suffixes', () => {
    const o = parseOptionList(['cluster_size=4k,backing_file=a,,b.img', 'lazy_refcounts']);
    expect([...o]).toEqual([
      ['cluster_size', '4k'],
      ['backing_file', 'a,b.img'],
      ['lazy_refcounts', 'on'],
    ]);
    expect(sizeArg('1.5G')).toBe(1.5 * 2 ** 30);
    expect(sizeArg('512')).toBe(512);
    expect(() => sizeArg('12Q')).toThrow(
      /^Invalid image size specified\. You may use k, M, G, T, P or E suffixes/,
    );
  });
});
