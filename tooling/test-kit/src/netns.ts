import { execFileSync } from 'node:child_process';
import { randomInt } from 'node:crypto';

/*
 * Hosts as Linux network namespaces (root only), for tests of a pair across machines:
 *
 *   link: a direct veth between the first two hosts (the replication link and peer channel),
 *         10.L.1.x/24, x = 1, 2;
 *   arbiter network: every host on a bridge in the last host's namespace, 10.L.2.x/24.
 *
 * A partition takes a link down; traffic goes only between the namespaces. This machine's kernel
 * has no tc qdiscs (netem), so delay and loss are not modelled.
 */

export interface HostNetwork {
  /** Namespace names by host. */
  ns: Record<string, string>;
  /** A host's address on the pair link (first two hosts) or on the arbiter network. */
  linkIp(host: string): string;
  arbiterIp(host: string): string;
  /** The command prefix that runs a program on the host. */
  exec(host: string): string[];
  /** Cuts (or restores) the pair link between the first two hosts. */
  setLink(up: boolean): void;
  /** Cuts (or restores) a host's way to the arbiter network. */
  setArbiterLink(host: string, up: boolean): void;
  destroy(): void;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' });

export function makeHostNetwork(hosts: string[]): HostNetwork {
  const id = randomInt(0x10000).toString(16).padStart(4, '0');
  const net = 100 + randomInt(150);
  const ns: Record<string, string> = {};
  const made: string[] = [];
  const destroy = () => {
    for (const n of made.splice(0)) {
      try {
        ip('netns', 'del', n);
      } catch {}
    }
  };
  try {
    for (const h of hosts) {
      ns[h] = `br${id}${h}`;
      ip('netns', 'add', ns[h]!);
      made.push(ns[h]!);
      ip('-n', ns[h]!, 'link', 'set', 'lo', 'up');
    }
    const arbiterHost = hosts.at(-1)!;
    const hub = ns[arbiterHost]!;
    ip('-n', hub, 'link', 'add', 'br0', 'type', 'bridge');
    ip('-n', hub, 'addr', 'add', `10.${net}.2.${hosts.length}/24`, 'dev', 'br0');
    ip('-n', hub, 'link', 'set', 'br0', 'up');
    hosts.slice(0, -1).forEach((h, i) => {
      const inner = `a${id}${i}`;
      const outer = `b${id}${i}`;
      ip('link', 'add', inner, 'type', 'veth', 'peer', 'name', outer);
      ip('link', 'set', inner, 'netns', ns[h]!);
      ip('link', 'set', outer, 'netns', hub);
      ip('-n', ns[h]!, 'link', 'set', inner, 'name', 'arb0');
      ip('-n', ns[h]!, 'addr', 'add', `10.${net}.2.${i + 1}/24`, 'dev', 'arb0');
      ip('-n', ns[h]!, 'link', 'set', 'arb0', 'up');
      ip('-n', hub, 'link', 'set', outer, 'master', 'br0');
      ip('-n', hub, 'link', 'set', outer, 'up');
    });
    const [h1, h2] = hosts as [string, string];
    ip('link', 'add', `l${id}1`, 'type', 'veth', 'peer', 'name', `l${id}2`);
    ip('link', 'set', `l${id}1`, 'netns', ns[h1]!);
    ip('link', 'set', `l${id}2`, 'netns', ns[h2]!);
    for (const [h, dev, x] of [
      [h1, `l${id}1`, 1],
      [h2, `l${id}2`, 2],
    ] as const) {
      ip('-n', ns[h]!, 'link', 'set', dev, 'name', 'link0');
      ip('-n', ns[h]!, 'addr', 'add', `10.${net}.1.${x}/24`, 'dev', 'link0');
      ip('-n', ns[h]!, 'link', 'set', 'link0', 'up');
    }
  } catch (e) {
    destroy();
    throw e;
  }
  const index = (h: string) => {
    const i = hosts.indexOf(h);
    if (i < 0) throw new Error(`no host '${h}'`);
    return i;
  };
  return {
    ns,
    linkIp: (h) => `10.${net}.1.${index(h) + 1}`,
    arbiterIp: (h) => `10.${net}.2.${index(h) + 1}`,
    exec: (h) => ['ip', 'netns', 'exec', ns[h]!],
    setLink(up) {
      for (const h of hosts.slice(0, 2)) ip('-n', ns[h]!, 'link', 'set', 'link0', up ? 'up' : 'down');
    },
    setArbiterLink(h, up) {
      ip('-n', ns[h]!, 'link', 'set', 'arb0', up ? 'up' : 'down');
    },
    destroy,
  };
}
