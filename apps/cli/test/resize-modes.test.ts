import { statSync } from 'node:fs';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { blockrep, qemuImg, qemuImgJson, qemuIo, run } from './helpers';

/* Differential: create and resize with each preallocation mode, by qemu-img and by blockrep. */

const qemu = hasPeer('qemu-img');

/** An image's allocation as qemu-img maps it, without host offsets (layouts may differ). */
async function mapOf(path: string) {
  const m = await qemuImgJson<Record<string, unknown>[]>(['map', path]);
  return m.map(({ offset: _o, ...rest }) => rest);
}

describe.runIf(qemu)('preallocation, against qemu-img', () => {
  it('create -o preallocation=metadata|falloc|full: same line, same map, clean check', async () => {
    const dir = makeTempDir();
    for (const mode of ['metadata', 'falloc', 'full']) {
      const q = dir.file(`q-${mode}.qcow2`);
      const b = dir.file(`b-${mode}.qcow2`);
      const qr = await qemuImg(['create', '-f', 'qcow2', '-o', `preallocation=${mode}`, q, '2M']);
      const br = await blockrep(['create', '-f', 'qcow2', '-o', `preallocation=${mode}`, b, '2M']);
      expect(br.stdout.replace(b, 'X')).toBe(qr.stdout.replace(q, 'X'));
      expect({ mode, map: await mapOf(b) }).toEqual({ mode, map: await mapOf(q) });
      await qemuImg(['check', b]);
    }
    const bad = await blockrep(
      ['create', '-f', 'qcow2', '-o', 'preallocation=bogus', dir.file('x.qcow2'), '1M'],
      [1],
    );
    const qbad = await run(
      'qemu-img',
      ['create', '-f', 'qcow2', '-o', 'preallocation=bogus', dir.file('y.qcow2'), '1M'],
      {
        okCodes: [1],
      },
    );
    expect(bad.stderr.replace('x.qcow2', 'F')).toBe(
      qbad.stderr.replace('qemu-img', 'blockrep').replace('y.qcow2', 'F'),
    );
  });

  it('resize --preallocation grows qcow2 and raw as qemu-img does; refusals alike', async () => {
    const dir = makeTempDir();
    const img = (who: string, ext: string) => dir.file(`${who}.${ext}`);
    for (const who of ['q', 'b']) {
      await qemuImg(['create', '-q', '-f', 'qcow2', img(who, 'qcow2'), '1M']);
      await qemuImg(['create', '-q', '-f', 'raw', img(who, 'raw'), '1M']);
    }
    const steps: [string[], string, string][] = [
      [['--preallocation=falloc'], 'qcow2', '2M'],
      [['--preallocation=full'], 'qcow2', '3M'],
      [['--preallocation=metadata'], 'qcow2', '4M'],
      [['--preallocation=bogus'], 'qcow2', '5M'],
      [['--preallocation=full', '--shrink'], 'qcow2', '512k'],
      [['-f', 'raw', '--preallocation=metadata'], 'raw', '2M'],
      [['-f', 'raw', '--preallocation=falloc'], 'raw', '2M'],
      [['-f', 'raw', '--preallocation=full'], 'raw', '3M'],
    ];
    for (const [opts, ext, size] of steps) {
      const qr = await run('qemu-img', ['resize', ...opts, img('q', ext), size], { okCodes: [0, 1] });
      const br = await blockrep(['resize', ...opts, img('b', ext), size], [0, 1]);
      const line = `${opts.join(' ')} ${ext} ${size}`;
      expect({ line, code: br.code, out: br.stdout, err: br.stderr }).toEqual({
        line,
        code: qr.code,
        out: qr.stdout,
        err: qr.stderr.replaceAll('qemu-img', 'blockrep'),
      });
    }
    expect(await mapOf(img('b', 'qcow2'))).toEqual(await mapOf(img('q', 'qcow2')));
    await qemuImg(['check', img('b', 'qcow2')]);
    await qemuImg(['compare', img('q', 'qcow2'), img('b', 'qcow2')]);
    const q = await qemuImgJson(['info', '-f', 'raw', img('q', 'raw')]);
    const b = await qemuImgJson(['info', '-f', 'raw', img('b', 'raw')]);
    expect(b['virtual-size']).toBe(q['virtual-size']);
    // falloc and full reserve the raw file's new 2 MiB (the first MiB stays sparse).
    expect(b['actual-size']).toBeGreaterThanOrEqual(2 << 20);
  });
});

describe.runIf(hasPeer('qemu-img', 'qemu-io'))('resize --shrink on qcow2, against qemu-img', () => {
  it('shrinks as qemu-img does (map, messages, file cut); zeroes the tail past an unaligned end; keeps snapshots and bitmaps sound', async () => {
    const dir = makeTempDir();
    for (const who of ['q', 'b']) {
      await qemuImg(['create', '-q', '-f', 'qcow2', dir.file(`${who}.qcow2`), '16M']);
      await qemuIo([dir.file(`${who}.qcow2`)], ['write -P 1 0 4M', 'write -P 2 10M 4M']);
    }
    for (const args of [['--shrink', '6M'], ['4M'], ['--shrink', '1000k'], ['2M']]) {
      const size = args[args.length - 1]!;
      const opts = args.slice(0, -1);
      const qr = await run('qemu-img', ['resize', ...opts, dir.file('q.qcow2'), size], { okCodes: [0, 1] });
      const br = await blockrep(['resize', ...opts, dir.file('b.qcow2'), size], [0, 1]);
      expect({ args, code: br.code, out: br.stdout, err: br.stderr }).toEqual({
        args,
        code: qr.code,
        out: qr.stdout,
        err: qr.stderr.replaceAll('qemu-img', 'blockrep'),
      });
    }
    const b = dir.file('b.qcow2');
    expect(await mapOf(b)).toEqual(await mapOf(dir.file('q.qcow2')));
    await qemuImg(['check', b]);
    expect(statSync(b).size).toBeLessThanOrEqual(statSync(dir.file('q.qcow2')).size);
    // What was cut off does not come back when the image grows again (QEMU shows the old bytes).
    const reads = await qemuIo([b], ['read -P 1 0 1000k', 'read -P 0 1000k 1048k']);
    expect(reads.stdout).not.toContain('Pattern verification failed');

    // An internal snapshot keeps its clusters; a persistent bitmap follows the new size.
    const sn = dir.file('sn.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', sn, '16M']);
    await qemuIo([sn], ['write -P 1 0 4M', 'write -P 2 10M 4M']);
    await qemuImg(['convert', '-O', 'raw', sn, dir.file('before.raw')]);
    await qemuImg(['snapshot', '-c', 's1', sn]);
    await qemuImg(['bitmap', '--add', sn, 'bm']);
    await blockrep(['resize', '--shrink', sn, '3M']);
    await qemuImg(['check', sn]);
    const info = await qemuImgJson(['info', sn]);
    expect(info['virtual-size']).toBe(3 << 20);
    expect(JSON.stringify(info['format-specific'])).toContain('"name":"bm"');
    // (QEMU applies a snapshot only without bitmaps.)
    await qemuImg(['bitmap', '--remove', sn, 'bm']);
    await qemuImg(['snapshot', '-a', 's1', sn]);
    await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', dir.file('before.raw'), sn]);
    await qemuImg(['check', sn]);
  });
});
