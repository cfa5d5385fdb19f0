import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClientConnection } from '@blockrep/nbd';
import type { QmpEvent } from '@blockrep/qmp';
import { makeTempDir, qemuImg, qemuIo, waitFor } from '@blockrep/test-kit';
import { expect } from 'vitest';
import { type Daemon, startDaemon } from '../daemon';

/*
 * COLO hosts for the self-running pair's tests: each a blockrepd started with --colo and its own
 * directory (disk, scratch images, state), both on this machine over Unix sockets with a lock-file
 * arbiter, or on network namespaces (addresses given).
 */

export const SIZE = 16 << 20;

export interface HostSpec {
  name: string;
  /** Listening addresses in the config's syntax (`unix:/p` or `host:port`). */
  replication: string;
  channel: string;
  guest: string;
}

export interface ColoHost {
  name: string;
  dir: string;
  config: string;
  spec: HostSpec;
  d: Daemon | null;
  file(n: string): string;
}

export interface PairOptions {
  heartbeat?: { interval: number; timeout: number };
  arbiter?: Record<string, unknown>;
  tls?: { a: string; b: string };
  checkpointInterval?: number;
}

/** Two hosts' directories and config files (nothing started). */
export async function makePair(
  specs: [HostSpec, HostSpec],
  o: PairOptions = {},
): Promise<[ColoHost, ColoHost]> {
  const shared = makeTempDir();
  const hosts: ColoHost[] = [];
  for (const [i, spec] of specs.entries()) {
    const peer = specs[1 - i]!;
    const dir = makeTempDir();
    await qemuImg(['create', '-f', 'qcow2', dir.file('disk.qcow2'), String(SIZE)]);
    const config = dir.file('colo.json');
    writeFileSync(
      config,
      JSON.stringify(
        {
          pair: 'vm1',
          host: { name: spec.name, replication: spec.replication, channel: spec.channel },
          peer: { name: peer.name, replication: peer.replication, channel: peer.channel },
          disk: 'disk.qcow2',
          active: 'active.qcow2',
          hidden: 'hidden.qcow2',
          'state-dir': 'state',
          guest: { address: spec.guest, export: 'guest' },
          'checkpoint-interval': o.checkpointInterval ?? 0,
          heartbeat: o.heartbeat ?? { interval: 100, timeout: 800 },
          arbiter: o.arbiter ?? { type: 'lock-file', path: join(shared.path, 'lease') },
          ...(o.tls ? { tls: { dir: i === 0 ? o.tls.a : o.tls.b } } : {}),
        },
        null,
        2,
      ),
    );
    hosts.push({ name: spec.name, dir: dir.path, config, spec, d: null, file: dir.file });
  }
  return hosts as [ColoHost, ColoHost];
}

/** Unix-socket specs for two hosts on this machine. */
export function localSpecs(): [HostSpec, HostSpec] {
  const t = makeTempDir();
  return (['a', 'b'] as const).map((n) => ({
    name: n,
    replication: `unix:${t.file(`${n}-repl.sock`)}`,
    channel: `unix:${t.file(`${n}-chan.sock`)}`,
    guest: `unix:${t.file(`${n}-guest.sock`)}`,
  })) as [HostSpec, HostSpec];
}

const started: Array<{ name: string; d: Daemon }> = [];

export async function startHost(h: ColoHost, prefix: string[] = [], extra: string[] = []): Promise<Daemon> {
  h.d = await startDaemon(h.file('qmp.sock'), ['--colo', h.config, ...extra], prefix);
  started.push({ name: h.name, d: h.d });
  return h.d;
}

/** The logs of the daemons this test started, each whole or its last `lines` lines. */
function daemonLogs(lines = Number.POSITIVE_INFINITY): string {
  return started
    .map(({ name, d }) => {
      // slice(-Infinity) keeps every line.
      const tail = d.log().trimEnd().split('\n').slice(-lines).join('\n');
      const which = Number.isFinite(lines) ? `, last ${lines} log lines` : '';
      return `---- blockrepd ${name}${which} ----\n${tail}\n`;
    })
    .join('');
}

/**
 * For afterEach: a failed test prints the logs of the daemons it started. CI shows only the tail
 * of the output, so a timeout's error carries the last lines too (roleChange, waitRole).
 */
export function dumpLogsIfFailed(ctx: { task: { result?: { state?: string } } }): void {
  if (ctx.task.result?.state === 'fail') process.stderr.write(daemonLogs());
  started.length = 0;
}

export interface ColoStatus {
  role: string;
  epoch: number;
  stage: string;
  peer: { alive: boolean; role?: string };
  'peer-missing-bytes': number;
  'last-resync'?: { peer: string; bytes: number; full: boolean };
  checkpoints: number;
  'writes-acknowledged': number;
  'writes-refused': number;
  'last-cycle': string;
  'lease-valid': boolean;
}

export async function status(h: ColoHost): Promise<ColoStatus> {
  return (await h.d!.qmp.execute('query-colo')) as ColoStatus;
}

/** Waits for this host's COLO_ROLE_CHANGE to `role`. */
export async function roleChange(h: ColoHost, role: string, timeout = 60_000): Promise<QmpEvent> {
  try {
    return await h.d!.qmp.waitEvent('COLO_ROLE_CHANGE', (e) => e.data?.role === role, timeout);
  } catch (e) {
    throw new Error(`${h.name}: ${(e as Error).message} (role ${role})\n${daemonLogs(12)}`);
  }
}

/** Waits until query-colo says the host has the role (and stage, if given). */
export async function waitRole(
  h: ColoHost,
  role: string,
  stage?: string,
  timeout = 60_000,
): Promise<ColoStatus> {
  let last: ColoStatus | null = null;
  const got = await waitFor(
    async () => {
      last = await status(h);
      return last.role === role && (stage === undefined || last.stage === stage) ? last : undefined;
    },
    {
      timeoutMs: timeout,
      intervalMs: 50,
      what: () => `${h.name} to be ${role}/${stage} (have ${JSON.stringify(last)})\n${daemonLogs(12)}`,
    },
  );
  return got!;
}

/** The guest URI of a host's export (its config's guest address). */
export function guestUri(h: ColoHost): string {
  const g = h.spec.guest;
  return g.startsWith('unix:') ? `nbd+unix:///guest?socket=${g.slice(5)}` : `nbd://${g}/guest`;
}

export async function guestIo(h: ColoHost, cmds: string[]): Promise<string> {
  const r = await qemuIo(['-f', 'raw', guestUri(h)], cmds);
  return r.stdout + r.stderr;
}

export async function expectGuestIo(h: ColoHost, cmds: string[]): Promise<void> {
  const out = await guestIo(h, cmds);
  expect(out, out).not.toMatch(/fail|error|mismatch|Could not/i);
}

/** One acknowledged guest write. */
export interface Ack {
  side: string;
  seq: number;
  offset: number;
  /** performance.now() when the reply came. */
  at: number;
}

/**
 * A guest writing 4 KiB blocks to a host's guest export as fast as it is answered, reconnecting
 * after errors, logging every acknowledged write. Block i of `slots` at `base`, pattern seq & 0xff.
 */
export function startWriter(h: ColoHost, side: string, log: Ack[], base: number, slots = 256) {
  let stopped = false;
  let seq = 0;
  const g = h.spec.guest;
  const server = g.startsWith('unix:')
    ? ({ type: 'unix', path: g.slice(5) } as const)
    : ({ type: 'inet', host: g.split(':')[0]!, port: g.split(':')[1]! } as const);
  const run = (async () => {
    while (!stopped) {
      let c: NbdClientConnection | null = null;
      try {
        c = await NbdClientConnection.connect({ server, export: 'guest' });
        while (!stopped) {
          const s = seq++;
          const offset = base + (s % slots) * 4096;
          await c.write(offset, [Buffer.alloc(4096, s & 0xff)], 4096);
          log.push({ side, seq: s, offset, at: performance.now() });
        }
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      } finally {
        c?.destroy();
      }
    }
  })();
  return {
    async stop() {
      stopped = true;
      await run;
    },
  };
}
