import { truncateSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { checkQcow2Image, createQcow2Image } from '../src/index';
import { openQcow2, patch, peek, qemu, qemuImg, qemuIo } from './helpers';

/* check/repair reports what qemu-img check reports, and repairs leaks so that qemu-img agrees. */

const FIELDS = [
  'image-end-offset',
  'total-clusters',
  'check-errors',
  'leaks',
  'corruptions',
  'allocated-clusters',
  'fragmented-clusters',
  'compressed-clusters',
] as const;

async function qemuCheck(path: string): Promise<Record<string, number>> {
  const r = await qemu(['check', '--output=json', path], [0, 2, 3]);
  return JSON.parse(r.stdout);
}

async function expectSameAsQemu(path: string): Promise<void> {
  const q = await qemuCheck(path);
  const ours = (await checkQcow2Image(path)) as unknown as Record<string, number>;
  for (const k of FIELDS) expect([k, ours[k] ?? 0]).toEqual([k, q[k] ?? 0]);
}

describe('check', () => {
  it('agrees with qemu-img check on clean images of every kind', async () => {
    const d = makeTempDir();
    const a = d.file('a.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', a, '16M']);
    await qemuIo(
      [a],
      ['write -P 1 0 1M', 'write -P 2 8M 100k', 'write -P 3 200k 4k', 'write -z 4M 64k', 'write -P 4 64k 4k'],
    );
    await expectSameAsQemu(a);
    await qemuImg(['snapshot', '-c', 's1', a]);
    await qemuIo([a], ['write -P 5 0 300k']);
    await expectSameAsQemu(a);
    const c = d.file('c.qcow2');
    await qemuImg(['convert', '-c', '-O', 'qcow2', a, c]);
    await expectSameAsQemu(c);
    const v2 = d.file('v2.qcow2');
    await qemuImg(['convert', '-O', 'qcow2', '-o', 'compat=0.10', a, v2]);
    await expectSameAsQemu(v2);
    const ours = d.file('ours.qcow2');
    await createQcow2Image(ours, { size: 32 << 20, clusterSize: 512 });
    const h = await openQcow2(ours);
    for (let i = 0; i < 64; i++) await h.blk.write(((i * 7919) % 60) << 19, Buffer.alloc(3000, i + 1));
    await h.close();
    await expectSameAsQemu(ours);
    expect((await checkQcow2Image(ours))['allocated-clusters']).toBeGreaterThan(0);
  });

  it('reports leaks like qemu-img check and repairs them', async () => {
    const d = makeTempDir();
    const f = d.file('leak.qcow2');
    await createQcow2Image(f, { size: 8 << 20 });
    const h = await openQcow2(f);
    await h.blk.write(0, Buffer.alloc(256 << 10, 7));
    await h.close();
    // Refcount block at cluster 2 (our layout): raise the refcounts of clusters 20 and 21 from 0 to 1
    // (inside the file: qemu-img ignores refcounts past its end).
    truncateSync(f, 32 * 65536);
    patch(f, 2 * 65536 + 20 * 2, Buffer.from([0, 1, 0, 1]));
    const q = await qemuCheck(f);
    expect(q.leaks).toBe(2);
    const ours = await checkQcow2Image(f);
    expect(ours.leaks).toBe(2);
    expect(ours.corruptions ?? 0).toBe(0);
    expect(ours.messages.some((m) => m.startsWith('Leaked cluster 20 refcount=1 reference=0'))).toBe(true);
    const fixed = await checkQcow2Image(f, { repair: 'leaks' });
    expect(fixed['leaks-fixed']).toBe(2);
    expect(await qemuCheck(f)).not.toHaveProperty('leaks');
  });

  it('reports refcounts that are too low, and refcount overflow, as corruption', async () => {
    const d = makeTempDir();
    const f = d.file('low.qcow2');
    await createQcow2Image(f, { size: 8 << 20 });
    const h = await openQcow2(f);
    await h.blk.write(0, Buffer.alloc(64 << 10, 7));
    await h.close();
    const l2 = peek(f, 3 * 65536, 8).readUInt32BE(4);
    const data = peek(f, l2, 8).readUInt32BE(4);
    // Drop the data cluster's refcount to 0.
    patch(f, 2 * 65536 + (data / 65536) * 2, Buffer.from([0, 0]));
    const q = await qemuCheck(f);
    const ours = await checkQcow2Image(f);
    expect(q.corruptions).toBeGreaterThan(0);
    expect(ours.corruptions).toBe(q.corruptions);
    const fixed = await checkQcow2Image(f, { repair: 'all' });
    expect(fixed['corruptions-fixed']).toBeGreaterThan(0);
    expect((await qemuCheck(f)).corruptions ?? 0).toBe(0);

    // 1-bit refcounts and two L2 entries sharing a cluster: the reference count overflows.
    const g = d.file('overflow.qcow2');
    await createQcow2Image(g, { size: 8 << 20, refcountBits: 1 });
    const h2 = await openQcow2(g);
    await h2.blk.write(0, Buffer.alloc(64 << 10, 7));
    await h2.close();
    const l2b = peek(g, 3 * 65536, 8).readUInt32BE(4);
    patch(g, l2b + 8, peek(g, l2b, 8));
    const ov = await checkQcow2Image(g);
    expect(ov.corruptions).toBeGreaterThan(0);
    expect(ov.messages).toContain('ERROR: overflow cluster offset=0x50000');
    expect((await qemuCheck(g)).corruptions).toBeGreaterThan(0);
  });

  it('repairs stale refcounts of an image left dirty (lazy refcounts) when opened read-write', async () => {
    const d = makeTempDir();
    const f = d.file('dirty.qcow2');
    await createQcow2Image(f, { size: 8 << 20, lazyRefcounts: true });
    const h = await openQcow2(f);
    await h.blk.write(0, Buffer.alloc(128 << 10, 9));
    await h.close();
    const hdr = peek(f, 72, 8);
    hdr[7]! |= 1;
    patch(f, 72, hdr);
    truncateSync(f, 32 * 65536);
    patch(f, 2 * 65536 + 30 * 2, Buffer.from([0, 1]));
    expect((await qemuCheck(f)).leaks).toBe(1);
    const h2 = await openQcow2(f);
    expect((await h2.blk.read(0, 4))[0]).toBe(9);
    await h2.close();
    expect(peek(f, 72, 8)[7]! & 1).toBe(0);
    expect(await qemuCheck(f)).not.toHaveProperty('leaks');
  });
});
