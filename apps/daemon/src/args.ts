import { type Options, parseKeyVal, parseOptionArg } from '@blockrep/block';

/** What a qemu-storage-daemon style command line asks for, in order. */
export type Action = (
  | { kind: 'blockdev'; options: Options }
  | { kind: 'object'; options: Options }
  | { kind: 'nbd-server'; options: Options }
  | { kind: 'export'; options: Options }
  | { kind: 'chardev'; options: Options }
  | { kind: 'monitor'; options: Options }
  | { kind: 'qmp'; address: { type: 'unix'; path: string } | { type: 'tcp'; host: string; port: number } }
) & {
  /** The option as given ("--blockdev driver=file,..."): errors name it, as qemu-storage-daemon's do. */
  text: string;
};

export interface DaemonArgs {
  actions: Action[];
  /** --colo FILE: run as one host of a COLO pair. */
  colo?: string;
  pidfile?: string;
  daemonize: boolean;
  logLevel: 'debug' | 'info' | 'warn' | 'error';
  /** --metrics ADDR:PORT: the Prometheus endpoint. */
  metrics?: { host: string; port: number };
  help: boolean;
  version: boolean;
}

export const USAGE = `Usage: blockrepd [options]
blockrep storage daemon (the qemu-storage-daemon command line, for what blockrep covers)

  -h, --help                 display this help and exit
  -V, --version              output version information and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,<opts>...] | <json>
                             configure a block backend (as blockdev-add)
  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
  --chardev ringbuf|memory,id=<id>[,size=<bytes>] | file,id=<id>,path=<path> | null,id=<id>
  --chardev stdio,id=<id>
                             a character device (a monitor's, or ringbuf-read/-write's)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                             a QMP monitor on a chardev
  --qmp unix:<path> | tcp:<host>:<port>
                             shorthand for --chardev + --monitor
  --nbd-server addr.type=inet,addr.host=<h>,addr.port=<p>[,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>][,max-connections=<n>]
                             start the NBD server
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<export>][,writable=on|off][,description=<text>][,bitmap=<name>]
                             export a node over NBD
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server|client[,verify-peer=on|off]
                             TLS credentials
  --colo <file>              run as one host of a COLO pair (JSON config; see @blockrep/colo)
  --pidfile <path>           write the process id to a file (removed on exit)
  --daemonize                run in the background once set up
  --log-level debug|info|warn|error
                             what goes to stderr (JSON lines; default info)
  --metrics [<host>:]<port>  serve Prometheus metrics at http://<host>:<port>/metrics
                             (host default 127.0.0.1; port 0 picks one, logged at start)
`;

/** The options that take a value, with the implied key of their key=value syntax. */
const WITH_VALUE: Record<string, string | undefined> = {
  '--blockdev': 'driver',
  '--object': 'qom-type',
  '--nbd-server': undefined,
  '--export': 'type',
  '--chardev': 'backend',
  '--monitor': 'chardev',
  '--qmp': undefined,
  '--pidfile': undefined,
  '--colo': undefined,
  '--log-level': undefined,
  '--metrics': undefined,
};

/** The options that become an action on a node, a server or a monitor, and how their value is read. */
const OPTION_ACTIONS: Record<string, { kind: Exclude<Action['kind'], 'qmp'>; json: boolean }> = {
  '--blockdev': { kind: 'blockdev', json: true },
  '--object': { kind: 'object', json: true },
  '--nbd-server': { kind: 'nbd-server', json: false },
  '--export': { kind: 'export', json: true },
  '--chardev': { kind: 'chardev', json: false },
  '--monitor': { kind: 'monitor', json: false },
};

/** Parses argv the way qemu-storage-daemon does (`--opt value` or `--opt=value`). */
export function parseDaemonArgs(argv: string[]): DaemonArgs {
  const out: DaemonArgs = { actions: [], daemonize: false, logLevel: 'info', help: false, version: false };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i]!;
    let value: string | undefined;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      value = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    if (a === '-h' || a === '--help') {
      out.help = true;
      continue;
    }
    if (a === '-V' || a === '--version') {
      out.version = true;
      continue;
    }
    if (a === '--daemonize') {
      out.daemonize = true;
      continue;
    }
    // glibc getopt's texts, as qemu-storage-daemon prints them.
    if (!a.startsWith('-') || a === '-') throw new Error(`${argv[i]}: Unexpected argument`);
    if (!a.startsWith('--')) throw new Error(`invalid option -- '${a[1]}'`);
    if (!(a in WITH_VALUE)) throw new Error(`unrecognized option '${argv[i]}'`);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new Error(`option '${a}' requires an argument`);
      value = argv[++i]!;
    }
    const implied = WITH_VALUE[a];
    const text = `${a} ${value}`;
    try {
      addOption(out, a, value, implied, text);
    } catch (e) {
      // Named by the option, as qemu-storage-daemon names it: "--blockdev driver=x: ...".
      throw new Error(`${text}: ${(e as Error).message}`);
    }
  }
  return out;
}

function addOption(
  out: DaemonArgs,
  a: string,
  value: string,
  implied: string | undefined,
  text: string,
): void {
  const parsed = OPTION_ACTIONS[a];
  if (parsed) {
    // JSON is allowed where QEMU allows it (--blockdev, --object, --export), key=value everywhere.
    const options = parsed.json ? parseOptionArg(value, implied) : parseKeyVal(value, implied);
    out.actions.push({ kind: parsed.kind, options, text } as Action);
    return;
  }
  switch (a) {
    case '--qmp': {
      const m = /^unix:(.+)$/.exec(value) ?? null;
      const t = /^tcp:(.*):(\d+)$/.exec(value);
      if (m) out.actions.push({ kind: 'qmp', address: { type: 'unix', path: m[1]! }, text });
      else if (t)
        out.actions.push({
          kind: 'qmp',
          address: { type: 'tcp', host: t[1] || '127.0.0.1', port: Number(t[2]) },
          text,
        });
      else throw new Error('expecting unix:PATH or tcp:HOST:PORT');
      break;
    }
    case '--pidfile':
      out.pidfile = value;
      break;
    case '--colo':
      out.colo = value;
      break;
    case '--metrics': {
      const m = /^(?:(.*):)?(\d+)$/.exec(value);
      const port = m ? Number(m[2]) : Number.NaN;
      if (!m || port > 65535) throw new Error('expecting [HOST:]PORT');
      const host = (m[1] ?? '127.0.0.1').replace(/^\[(.*)\]$/, '$1') || '127.0.0.1';
      out.metrics = { host, port };
      break;
    }
    case '--log-level':
      if (!['debug', 'info', 'warn', 'error'].includes(value))
        throw new Error("Parameter 'log-level' does not accept this value (debug, info, warn, error)");
      out.logLevel = value as DaemonArgs['logLevel'];
      break;
  }
}

export type { Options };
