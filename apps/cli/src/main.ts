import { createRequire } from 'node:module';
import { HelpRequested, TRY_HELP } from './args';
import { CliFailure } from './failure';

/** The version line of --version / -V (qemu-img's shape; the version comes from package.json). */
const VERSION = `blockrep version ${(createRequire(import.meta.url)('../package.json') as { version: string }).version} (qemu-img 7.2 command line)\n`;

const USAGE = `usage: blockrep [-V | --version | -h | --help] <command> [options]

Image commands (qemu-img's arguments; formats raw and qcow2; -U: read an image another
process is writing, as qemu-img -U does):
  create [-q] [-f fmt] [-b backing [-F fmt]] [-o options] FILE [SIZE]
  info [-f fmt] [-U] [--output=human|json] [--backing-chain] FILE
  check [-q] [-f fmt] [-U] [--output=human|json] [-r leaks|all] FILE
  map [-f fmt] [-U] [--output=human|json] [--start-offset=N] [--max-length=N] FILE
  compare [-q] [-f fmt] [-F fmt] [-s] [-U] FILE1 FILE2
  convert [-p] [-q] [-n] [-c] [-C] [-W] [-U] [-f fmt] [-O fmt] [-B backing -F fmt] [-o options]
          [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [--salvage]
          [--bitmaps [--skip-broken-bitmaps]] [--target-image-opts] [--target-is-zero]
          SOURCE... TARGET
  resize [-q] [-f fmt] [--shrink] FILE [+|-]SIZE
  commit [-q] [-p] [-d] [-f fmt] [-b base] FILE
  rebase [-q] [-p] [-u] [-U] [-f fmt] -b backing [-F fmt] FILE
  measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt] [-U] FILE]
  amend [-p] [-q] [-f fmt] -o options FILE
  snapshot [-q] [-U] [-f fmt] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE
  bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)... [-g granularity]
         [-b source_file [-F fmt]] [-f fmt] FILE BITMAP
  dd [--image-opts] [-U] [-f fmt] [-O fmt] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT
  bench [-q] [-c count] [-d depth] [-f fmt] [-o offset] [-s size] [-S step] [-w] [--pattern=N]
        [--flush-interval=N] [--no-drain] [-t cache] FILE

Daemon commands (a blockrepd QMP socket):
  qmp --socket PATH COMMAND [JSON | key=value ...]
  qmp-shell --socket PATH [-p]
  graph --socket PATH [--format dot|svg|png] [-o FILE]
  colo status|checkpoint|failover --socket PATH [--output=human|json]
                                     a COLO pair host (blockrepd --colo)

  demo                               create, write and inspect a demo image

Every command takes -h / --help. Unknown options and option values are refused, as qemu-img
refuses them.
`;

type Command = (args: string[]) => Promise<number>;

/** Each command's module, loaded when it runs (image commands do not load the QMP client). */
const commands: Record<string, () => Promise<Command>> = {
  create: async () => (await import('./commands/create')).createCommand,
  info: async () => (await import('./commands/info')).infoCommand,
  check: async () => (await import('./commands/check')).checkCommand,
  map: async () => (await import('./commands/map')).mapCommand,
  compare: async () => (await import('./commands/compare')).compareCommand,
  convert: async () => (await import('./commands/convert')).convertCommand,
  resize: async () => (await import('./commands/resize')).resizeCommand,
  commit: async () => (await import('./commands/commit')).commitCommand,
  rebase: async () => (await import('./commands/rebase')).rebaseCommand,
  measure: async () => (await import('./commands/measure')).measureCommand,
  amend: async () => (await import('./commands/amend')).amendCommand,
  snapshot: async () => (await import('./commands/snapshot')).snapshotCommand,
  bitmap: async () => (await import('./commands/bitmap')).bitmapCommand,
  dd: async () => (await import('./commands/dd')).ddCommand,
  bench: async () => (await import('./commands/bench')).benchCommand,
  qmp: async () => (await import('./commands/qmp')).qmpCommand,
  'qmp-shell': async () => (await import('./commands/qmp-shell')).qmpShellCommand,
  graph: async () => (await import('./commands/graph')).graphCommand,
  colo: async () => (await import('./commands/colo')).coloCommand,
  demo: async () => (await import('./commands/demo')).demoCommand,
};

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  if (cmd === '--version' || cmd === '-V') {
    process.stdout.write(VERSION);
    return 0;
  }
  if (!cmd) throw new CliFailure('Not enough arguments', 1, TRY_HELP);
  const load = commands[cmd];
  if (!load) {
    throw new CliFailure(
      cmd.startsWith('-') ? `unrecognized option '${cmd}'` : `Command not found: ${cmd}`,
      1,
      TRY_HELP,
    );
  }
  try {
    return await (await load())(rest);
  } catch (e) {
    if (!(e instanceof HelpRequested)) throw e;
    process.stdout.write(USAGE);
    return 0;
  }
}

/** Exits once stdout has drained (a piped reader gets every byte). */
function exit(code: number): void {
  process.exitCode = code;
  process.stdout.write('', () => process.exit(code));
}

main(process.argv.slice(2)).then(exit, (e) => {
  const msg = e instanceof Error ? e.message : String(e);
  // QEMU's error hints go on their own line after the message ("Is another process using ...").
  const hint = (e as { hint?: string } | null)?.hint;
  process.stderr.write(`blockrep: ${msg}\n${hint ? `${hint}\n` : ''}`);
  exit(e instanceof CliFailure ? e.exitCode : 1);
});
