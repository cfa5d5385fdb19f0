import { describe, expect, it } from 'vitest';
import { optString, parseArgs } from '../src/args';
import { parseOptionList, sizeArg } from '../src/options';

describe('qemu-img-style arguments', () => {
  it('splits short options with attached or separate values, grouped flags, --long=value and --', () => {
    const p = parseArgs(['-fqcow2', '-O', 'raw', '-pq', '--output=json', 'a', '--', '-b'], ['-f', '-O']);
    expect(optString(p, '-f')).toBe('qcow2');
    expect(optString(p, '-O')).toBe('raw');
    expect(p.opts.get('-p')).toBe(true);
    expect(p.opts.get('-q')).toBe(true);
    expect(optString(p, '--output')).toBe('json');
    expect(p.positional).toEqual(['a', '-b']);
  });

  it('keeps negative sizes as positionals (resize FILE -1M) and repeated -o values in order', () => {
    const p = parseArgs(['-o', 'a=1', 'img', '-1M', '-o', 'b=2'], ['-o']);
    expect(p.positional).toEqual(['img', '-1M']);
    expect(p.all.get('-o')).toEqual(['a=1', 'b=2']);
    expect(() => parseArgs(['-f'], ['-f'])).toThrow("option requires an argument -- 'f'");
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
