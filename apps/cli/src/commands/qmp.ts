import { QmpClient, QmpError } from '@blockrep/qmp';
import { HELP, type OptionSpec, optString, parseArgs } from '../args';
import { CliFailure } from '../failure';
import { qmpCall } from '../qmp-args';

/** Connects to a daemon's QMP socket (--socket PATH). */
export async function connectQmp(args: string[], name: string, spec: OptionSpec = { short: ':h' }) {
  const p = parseArgs(
    args,
    { short: spec.short, long: { ...HELP, socket: { arg: true }, ...spec.long } },
    name,
  );
  const path = optString(p, '--socket');
  if (!path) throw new CliFailure('--socket PATH is required');
  try {
    return { p, client: await QmpClient.connect({ path }) };
  } catch (e) {
    throw new CliFailure(`Could not connect to '${path}': ${(e as Error).message}`);
  }
}

/** Runs one command; a QMP error becomes its desc on stderr and exit code 1. */
export async function executeQmp(
  client: QmpClient,
  name: string,
  args?: Record<string, unknown>,
): Promise<unknown> {
  try {
    return await client.execute(name, args);
  } catch (e) {
    if (e instanceof QmpError) throw new CliFailure(e.desc);
    throw e;
  }
}

/** blockrep qmp --socket PATH COMMAND [JSON | key=value ...]: prints the command's return as JSON. */
export async function qmpCommand(args: string[]): Promise<number> {
  const { p, client } = await connectQmp(args, 'qmp');
  try {
    const [name, ...words] = p.positional;
    if (!name) throw new CliFailure('Expecting a QMP command name');
    const call = qmpCall(name, words);
    const ret = await executeQmp(client, call.execute, call.arguments);
    process.stdout.write(`${JSON.stringify(ret, null, 2)}\n`);
  } finally {
    await client.close();
  }
  return 0;
}
