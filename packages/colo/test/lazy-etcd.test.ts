import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// The built package, in a process of its own: what loading it pulls in is the question.
const dist = fileURLToPath(new URL('../dist/index.js', import.meta.url));

function etcd3ModulesAfter(code: string): number {
  const script = `
    import { createRequire } from 'node:module';
    import * as colo from ${JSON.stringify(dist)};
    ${code}
    const cache = createRequire(import.meta.url).cache;
    console.log(Object.keys(cache).filter((k) => k.includes('/node_modules/etcd3/')).length);
  `;
  return Number(
    execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' }).trim(),
  );
}

describe('etcd3 is loaded only for an etcd arbiter', () => {
  it('importing the package loads none of it; making an etcd arbiter loads it', () => {
    expect(etcd3ModulesAfter('void colo;')).toBe(0);
    expect(
      etcd3ModulesAfter("new colo.EtcdArbiter({ endpoints: ['127.0.0.1:1'], pair: 'p', leaseTtl: 3000 });"),
    ).toBeGreaterThan(0);
  });
});
