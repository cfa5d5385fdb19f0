import { BlockError } from '@blockrep/block';
import { createCommand } from './commands/create';
import { demoCommand } from './commands/demo';
import { infoCommand } from './commands/info';

const USAGE = `usage: blockrep <command> [options]

Image commands (qemu-img's arguments):
  create [-f fmt] FILE SIZE          create an image (raw)
  info [-f fmt] [--output=json] FILE show what an image is
  demo                               create, write and inspect a demo image
`;

const commands: Record<string, (args: string[]) => Promise<number>> = {
  create: createCommand,
  info: infoCommand,
  demo: demoCommand,
};

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return cmd ? 0 : 1;
  }
  const run = commands[cmd];
  if (!run) {
    process.stderr.write(`blockrep: Command not found: ${cmd}\n${USAGE}`);
    return 1;
  }
  return run(rest);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    const msg = e instanceof BlockError || e instanceof Error ? e.message : String(e);
    process.stderr.write(`blockrep: ${msg}\n`);
    process.exit(1);
  },
);
