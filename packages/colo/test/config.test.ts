import { mkdirSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { ColoConfigError, loadColoConfig, parseColoAddress, parseColoConfig, TLS_FILES } from '../src/index';

const dir = makeTempDir();

/** A valid config for host a, paired with b. */
function good(): Record<string, unknown> {
  return {
    pair: 'vm1',
    host: { name: 'a', replication: '10.0.0.1:10809', channel: '10.0.0.1:7800' },
    peer: { name: 'b', replication: '10.0.0.2:10809', channel: '[fd00::2]:7800' },
    disk: 'disk.qcow2',
    active: 'active.qcow2',
    hidden: '/var/lib/blockrep/hidden.qcow2',
    'state-dir': 'state',
    guest: { address: 'unix:guest.sock', export: 'guest' },
    'checkpoint-interval': 2000,
    heartbeat: { interval: 100, timeout: 500 },
    arbiter: { type: 'lock-file', path: dir.file('lease') },
  };
}

const file = () => dir.file('colo.json');

function refused(mutate: (c: Record<string, any>) => void): string {
  const c = good() as Record<string, any>;
  mutate(c);
  try {
    parseColoConfig(c, file());
  } catch (e) {
    expect(e).toBeInstanceOf(ColoConfigError);
    return (e as Error).message;
  }
  throw new Error('accepted');
}

describe('COLO config', () => {
  it('reads a good config: defaults, relative paths from the file, addresses', () => {
    const c = parseColoConfig(good(), file());
    expect(c.pair).toBe('vm1');
    expect(c.disk).toBe(dir.file('disk.qcow2'));
    expect(c.hidden).toBe('/var/lib/blockrep/hidden.qcow2');
    expect(c.stateDir).toBe(dir.file('state'));
    expect(c.guest.address).toEqual({ type: 'unix', path: dir.file('guest.sock') });
    expect(c.peer.channel).toEqual({ type: 'inet', host: 'fd00::2', port: 7800 });
    expect(c.arbiter).toEqual({ type: 'lock-file', path: dir.file('lease'), leaseTtl: 1000 });
    expect(c.tls).toBeNull();
    expect(c.heartbeat).toEqual({ interval: 100, timeout: 500 });
  });

  it('names the bad key in one error', () => {
    const f = file();
    expect(refused((c) => delete c.pair)).toBe(`${f}: 'pair' is missing`);
    expect(refused((c) => (c.pair = 'a b'))).toBe(
      `${f}: 'pair' must be 1-64 letters, digits, '.', '_' or '-' (got 'a b')`,
    );
    expect(refused((c) => (c.host.replication = '10.0.0.1'))).toBe(
      `${f}: 'host.replication' must be "host:port", "[v6-address]:port" or "unix:/path" (got '10.0.0.1')`,
    );
    expect(refused((c) => (c.peer.name = 'a'))).toBe(
      `${f}: 'peer.name' must differ from 'host.name' (both 'a')`,
    );
    expect(refused((c) => (c.hidden = 'disk.qcow2'))).toBe(
      `${f}: 'hidden' names the same file as 'disk' (${dir.file('disk.qcow2')})`,
    );
    expect(refused((c) => (c.heartbeat.timeout = 100))).toBe(
      `${f}: 'heartbeat.timeout' must be longer than 'heartbeat.interval' (100 <= 100)`,
    );
    expect(refused((c) => (c.heartbeat.interval = 1.5))).toBe(
      `${f}: 'heartbeat.interval' must be a whole number of milliseconds from 1 to 86400000 (got 1.5)`,
    );
    expect(refused((c) => (c.guest.exprot = 'x'))).toBe(`${f}: 'guest.exprot' is not a known key`);
    expect(refused((c) => (c.arbiter = { type: 'zookeeper' }))).toBe(
      `${f}: 'arbiter.type' must be 'lock-file' or 'etcd' (got 'zookeeper')`,
    );
    expect(refused((c) => (c.arbiter['lease-ttl'] = 400))).toBe(
      `${f}: 'arbiter.lease-ttl' must be longer than 'heartbeat.timeout' (400 <= 500)`,
    );
    expect(refused((c) => (c.arbiter.path = '/nonexistent-dir/lease'))).toBe(
      `${f}: 'arbiter.path' is in a directory that does not exist (/nonexistent-dir)`,
    );
    expect(refused((c) => (c.arbiter = { type: 'etcd', endpoints: ['10.0.0.3:2379'] }))).toBe(
      `${f}: 'arbiter.endpoints[0]' must be http://host:port or https://host:port (got '10.0.0.3:2379')`,
    );
    expect(refused((c) => (c.tls = { dir: dir.path }))).toBe(
      `${f}: 'tls.dir' has no ca-cert.pem (${dir.path})`,
    );
  });

  it('takes an etcd arbiter and TLS credentials in the tls-creds-x509 layout', () => {
    const creds = dir.file('pki');
    mkdirSync(creds, { recursive: true });
    for (const f of TLS_FILES) writeFileSync(`${creds}/${f}`, '');
    const c = parseColoConfig(
      {
        ...good(),
        arbiter: { type: 'etcd', endpoints: ['http://10.0.0.3:2379'], 'lease-ttl': 3000 },
        tls: { dir: 'pki' },
      },
      file(),
    );
    expect(c.arbiter).toEqual({
      type: 'etcd',
      endpoints: ['http://10.0.0.3:2379'],
      leaseTtl: 3000,
      prefix: '/blockrep/colo/',
    });
    expect(c.tls).toEqual({ dir: creds });
  });

  it('loads from a file; unreadable or broken JSON is one clear error', () => {
    writeFileSync(file(), JSON.stringify(good()));
    expect(loadColoConfig(file()).pair).toBe('vm1');
    writeFileSync(file(), '{"pair": ');
    expect(() => loadColoConfig(file())).toThrow(`${file()}: not valid JSON`);
    expect(() => loadColoConfig(dir.file('missing.json'))).toThrow(
      `Could not read COLO config '${dir.file('missing.json')}'`,
    );
  });

  it('parses addresses', () => {
    expect(parseColoAddress('h:1')).toEqual({ type: 'inet', host: 'h', port: 1 });
    expect(parseColoAddress('[::1]:10809')).toEqual({ type: 'inet', host: '::1', port: 10809 });
    expect(parseColoAddress('h:0')).toBeNull();
    expect(parseColoAddress('h:65536')).toBeNull();
    expect(parseColoAddress('::1:80')).toBeNull();
    expect(parseColoAddress('unix:')).toBeNull();
  });
});
