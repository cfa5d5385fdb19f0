import { appendFileSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { CliFailure } from '../failure';
import { parseShellLine } from '../qmp-args';
import { connectQmp } from './qmp';

const HISTORY_MAX = 1000;

export function historyFile(): string {
  return join(homedir(), '.blockrep_qmp_history');
}

function loadHistory(): string[] {
  try {
    // readline wants the newest entry first.
    return readFileSync(historyFile(), 'utf8').split('\n').filter(Boolean).slice(-HISTORY_MAX).reverse();
  } catch {
    return [];
  }
}

/** History is a convenience: a home that cannot take the file does not stop the shell. */
function saveHistory(line: string): void {
  try {
    appendFileSync(historyFile(), `${line}\n`);
  } catch {
    // No history then.
  }
}

/** readline's completer: command names for the first word, nothing after it. */
export function completeCommand(names: string[], line: string): [string[], string] {
  if (/\s/.test(line.trimStart())) return [[], line];
  const word = line.trimStart();
  return [names.filter((n) => n.startsWith(word)).sort(), word];
}

async function commandNames(client: QmpClient): Promise<string[]> {
  try {
    const list = (await client.execute('query-commands')) as { name: string }[];
    return list.map((c) => c.name);
  } catch {
    return [];
  }
}

/**
 * blockrep qmp-shell --socket PATH [-p]: one QMP command per line (`name key=value ...` or raw
 * JSON), responses and events printed as JSON. On a terminal: prompt, history, tab completion.
 */
export async function qmpShellCommand(args: string[]): Promise<number> {
  const { p, client } = await connectQmp(args, 'qmp-shell', {
    short: ':hp',
    long: { pretty: { arg: false, as: '-p' } },
  });
  const pretty = p.opts.has('-p');
  const show = (v: unknown) => `${JSON.stringify(v, null, pretty ? 4 : undefined)}\n`;
  const interactive = process.stdin.isTTY === true;
  const names = interactive ? await commandNames(client) : [];
  const rl = createInterface({
    input: process.stdin,
    output: process.stdout,
    terminal: interactive,
    history: interactive ? loadHistory() : [],
    historySize: HISTORY_MAX,
    completer: (line: string) => completeCommand(names, line),
  });
  rl.setPrompt('(blockrep) ');
  const print = (text: string) => {
    if (interactive) process.stdout.write('\r\x1b[K');
    process.stdout.write(text);
    if (interactive) rl.prompt(true);
  };
  client.on('event', (e) => print(show({ event: e.event, data: e.data, timestamp: e.timestamp })));
  client.on('close', () => rl.close());
  let failed = false;
  if (interactive) rl.prompt();
  try {
    for await (const line of rl) {
      let call: ReturnType<typeof parseShellLine>;
      try {
        call = parseShellLine(line);
      } catch (e) {
        failed = true;
        process.stderr.write(`${(e as Error).message}\n`);
        if (interactive) rl.prompt();
        continue;
      }
      if (call) {
        saveHistory(line.trim());
        try {
          const ret = await client.execute(call.execute, call.arguments);
          process.stdout.write(show({ return: ret }));
        } catch (e) {
          if (!(e instanceof QmpError)) throw new CliFailure((e as Error).message);
          failed = true;
          process.stdout.write(show({ error: { class: e.errorClass, desc: e.desc } }));
        }
      }
      if (interactive) rl.prompt();
    }
  } finally {
    rl.close();
    await client.close();
  }
  if (interactive) process.stdout.write('\n');
  return !interactive && failed ? 1 : 0;
}
