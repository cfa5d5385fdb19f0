/**
 * The packages as a consumer gets them: every public package packed with pnpm (workspace
 * versions resolved, the native addon's prebuilds included), installed with npm into a fresh
 * project outside the workspace, and used from ES modules and CommonJS: a qcow2 image served over
 * NBD, an installed blockrepd driven over QMP, and image locking working between them.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hasPeer } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';

const ROOT = join(import.meta.dirname, '..', '..');
const PUBLIC = [
  'packages/block',
  'packages/colo',
  'packages/filters',
  'packages/jobs',
  'packages/nbd',
  'packages/qcow2',
  'packages/qmp',
  'packages/replication',
  'apps/cli',
  'apps/daemon',
];

function tarList(tgz: string): string[] {
  return execFileSync('tar', ['-tzf', tgz], { encoding: 'utf8' }).trim().split('\n');
}

describe.runIf(hasPeer('npm', 'tar', 'cc'))('packed packages in a fresh project', () => {
  it('install from their tarballs and work from ESM and CommonJS, with image locking', {
    timeout: 600_000,
  }, () => {
    const packs = mkdtempSync(join(tmpdir(), 'blockrep-packs-'));
    const tarballs: Record<string, string> = {};
    for (const dir of PUBLIC) {
      const pkg = JSON.parse(readFileSync(join(ROOT, dir, 'package.json'), 'utf8'));
      expect(pkg.publishConfig?.access, pkg.name).toBe('public');
      expect(pkg.engines?.node, pkg.name).toBe('>=20');
      expect(pkg.repository?.directory, pkg.name).toBe(dir);
      execFileSync('pnpm', ['pack', '--pack-destination', packs], { cwd: join(ROOT, dir), stdio: 'pipe' });
      const file = `${pkg.name.replace('@', '').replace('/', '-')}-${pkg.version}.tgz`;
      expect(readdirSync(packs)).toContain(file);
      tarballs[pkg.name] = join(packs, file);
      const files = tarList(tarballs[pkg.name]!);
      for (const f of [
        'package/package.json',
        'package/README.md',
        'package/LICENSE',
        'package/CHANGELOG.md',
      ])
        expect(files, `${pkg.name} ships ${f}`).toContain(f);
      const packed = JSON.parse(
        execFileSync('tar', ['-xzOf', tarballs[pkg.name]!, 'package/package.json'], { encoding: 'utf8' }),
      );
      // Workspace ranges are resolved to the versions they name.
      for (const [dep, range] of Object.entries({ ...packed.dependencies }))
        expect(String(range), `${pkg.name} -> ${dep}`).not.toMatch(/^workspace:/);
      if (pkg.exports) {
        expect(files).toContain('package/dist/index.cjs');
        expect(files).toContain('package/dist/index.d.cts');
      }
    }
    // Prebuilt addons for both Linux architectures (the arm64 one cross-compiled at pack time).
    const blockFiles = tarList(tarballs['@blockrep/block']!);
    expect(blockFiles).toContain('package/prebuilds/linux-x64/node.napi.node');
    if (hasPeer('aarch64-linux-gnu-gcc')) {
      expect(blockFiles).toContain('package/prebuilds/linux-arm64/node.napi.node');
      const arm = execFileSync('tar', [
        '-xzOf',
        tarballs['@blockrep/block']!,
        'package/prebuilds/linux-arm64/node.napi.node',
      ]);
      expect(arm.subarray(0, 4).toString('latin1')).toBe('\x7fELF');
      expect(arm.readUInt16LE(18)).toBe(183); // e_machine: EM_AARCH64
    }

    const app = mkdtempSync(join(tmpdir(), 'blockrep-consumer-'));
    const deps = Object.fromEntries(Object.entries(tarballs).map(([n, t]) => [n, `file:${t}`]));
    writeFileSync(
      join(app, 'package.json'),
      JSON.stringify({ name: 'consumer', private: true, dependencies: deps, overrides: deps }, null, 2),
    );
    const install = spawnSync('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error'], {
      cwd: app,
      encoding: 'utf8',
    });
    expect(install.status, install.stderr).toBe(0);
    cpSync(join(ROOT, 'tests', 'fixtures', 'consumer'), app, { recursive: true });

    const run = (file: string) => {
      const r = spawnSync(process.execPath, [join(app, file), app], {
        cwd: app,
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status, `${file}: ${r.stderr}`).toBe(0);
      return JSON.parse(r.stdout.trim().split('\n').pop()!);
    };
    const version = JSON.parse(readFileSync(join(ROOT, 'packages/qmp/package.json'), 'utf8')).version;
    expect(run('esm.mjs')).toEqual({
      addon: { loaded: true },
      nbdReadBack: true,
      qmpPackage: `blockrep ${version}`,
      lockRefused: expect.stringMatching(/Failed to get "write" lock/),
      daemonWarned: false,
    });
    expect(run('cjs.cjs')).toEqual({
      addon: { loaded: true },
      readBack: true,
      qmpClient: 'function',
      jobManager: 'function',
    });
    // Without the addon (as on a platform with no prebuild and no compiler): blockrepd says so at
    // start-up and refuses to open an image without locks.
    const noAddon = spawnSync(
      join(app, 'node_modules', '.bin', 'blockrepd'),
      ['--blockdev', `driver=file,node-name=f,filename=${join(app, 'cjs.qcow2')}`],
      { encoding: 'utf8', env: { ...process.env, BLOCKREP_NO_SPARSE_ADDON: '1' }, timeout: 60_000 },
    );
    expect(noAddon.status).toBe(1);
    expect(noAddon.stderr).toContain('native addon missing: image locking is refused');
    expect(noAddon.stderr).toContain(
      'blockrepd: --blockdev driver=file,node-name=f,filename=' +
        `${join(app, 'cjs.qcow2')}: Image locking is not available: the native addon of @blockrep/block did not load (disabled by BLOCKREP_NO_SPARSE_ADDON)`,
    );
    const daemonVersion = JSON.parse(readFileSync(join(ROOT, 'apps/daemon/package.json'), 'utf8')).version;
    const v = spawnSync(join(app, 'node_modules', '.bin', 'blockrepd'), ['--version'], { encoding: 'utf8' });
    expect(v.stdout).toBe(`blockrepd version ${daemonVersion} (qemu-storage-daemon 7.2 command line)\n`);
  });
});
