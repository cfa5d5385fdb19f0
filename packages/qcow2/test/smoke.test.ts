import { readFileSync } from 'node:fs';
import { makeTempDir, qemuImg, qemuImgJson, qemuIo, randomBuffer } from '@blockrep/test-kit';
import { expect, it } from 'vitest';
import { openQcow2 } from './helpers';

it('smoke', async () => {
  const d = makeTempDir();
  const f = d.file('a.qcow2');
  await qemuImg(['create', '-f', 'qcow2', f, '64M']);
  await qemuIo([f], ['write -P 0x11 100k 200k']);
  const { blk, close } = await openQcow2(f);
  const exp = Buffer.alloc(64 << 20);
  exp.fill(0x11, 100 << 10, 300 << 10);
  const data = randomBuffer(1 << 20);
  await blk.write(5000, data);
  data.copy(exp, 5000);
  const w2 = randomBuffer(4096);
  await blk.write(200 << 10, w2);
  w2.copy(exp, 200 << 10);
  const got = await blk.read(0, 2 << 20);
  expect(got.equals(exp.subarray(0, 2 << 20))).toBe(true);
  await close();
  const chk = await qemuImgJson(['check', f]);
  console.log(chk);
  const raw = d.file('a.raw');
  await qemuImg(['convert', '-O', 'raw', f, raw]);
  expect(readFileSync(raw).equals(exp)).toBe(true);
});
