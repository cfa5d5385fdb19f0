import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { hasPeer, makeTempDir, type TempDir, waitFor } from '@blockrep/test-kit';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completeCommand } from '../src/commands/qmp-shell';
import { parseShellLine } from '../src/qmp-args';
import { bin, blockrep } from './helpers';

/** The workspace's blockrepd (a devDependency, so the test task builds it first). */
const daemonDir = dirname(createRequire(import.meta.url).resolve('@blockrep/daemon/package.json'));
const blockrepd = join(daemonDir, 'bin', 'blockrepd.cjs');
const daemonBuilt = existsSync(join(daemonDir, 'dist'));

describe('qmp-shell line parsing and completion', () => {
  it('key=value pairs are JSON when they parse, dotted keys nest, raw JSON passes through', () => {
    expect(parseShellLine('blockdev-add driver=null-co node-name=n0 size=1024 read-zeroes=true')).toEqual({
      execute: 'blockdev-add',
      arguments: { driver: 'null-co', 'node-name': 'n0', size: 1024, 'read-zeroes': true },
    });
    expect(parseShellLine('blockdev-add driver=qcow2 node-name=q file.driver=file file.filename=/x')).toEqual(
      {
        execute: 'blockdev-add',
        arguments: { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: '/x' } },
      },
    );
    expect(parseShellLine('{"execute": "query-block", "arguments": {"a": 1}}')).toEqual({
      execute: 'query-block',
      arguments: { a: 1 },
    });
    expect(parseShellLine(`x-cmd opts={"a": 1, "b": [2, 3]} name='two words' other="quoted"`)).toEqual({
      execute: 'x-cmd',
      arguments: { opts: { a: 1, b: [2, 3] }, name: 'two words', other: 'quoted' },
    });
    expect(parseShellLine('  # a comment')).toBeNull();
    expect(() => parseShellLine('query-block oops')).toThrow(/expected key=value/);
  });

  it('completes command names for the first word only', () => {
    const names = ['query-block', 'query-blockstats', 'quit', 'blockdev-add'];
    expect(completeCommand(names, 'query-bl')).toEqual([['query-block', 'query-blockstats'], 'query-bl']);
    expect(completeCommand(names, 'blockdev-add dri')).toEqual([[], 'blockdev-add dri']);
  });
});

describe.runIf(daemonBuilt)('qmp, qmp-shell and graph against a running blockrepd', () => {
  let dir: TempDir;
  let daemon: ChildProcess;
  let sock: string;

  beforeAll(async () => {
    dir = makeTempDir('blockrep-cli-qmp-');
    sock = dir.file('qmp.sock');
    daemon = spawn(
      process.execPath,
      [blockrepd, '--qmp', `unix:${sock}`, '--blockdev', 'driver=null-co,node-name=n0'],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    let log = '';
    await new Promise<void>((resolve, reject) => {
      daemon.stderr!.on('data', (d: Buffer) => {
        log += d.toString();
        if (log.includes('"msg":"ready"')) resolve();
      });
      daemon.once('exit', (code) => reject(new Error(`blockrepd exited with ${code}: ${log}`)));
    });
  });

  afterAll(() => {
    daemon?.kill('SIGKILL');
  });

  it('qmp prints the return as JSON, and a QMP error as its desc with exit code 1', async () => {
    const nodes = JSON.parse((await blockrep(['qmp', '--socket', sock, 'query-named-block-nodes'])).stdout);
    expect(nodes.map((n: { 'node-name': string }) => n['node-name'])).toContain('n0');
    const added = await blockrep([
      'qmp',
      '--socket',
      sock,
      'blockdev-add',
      '{"driver":"null-co","node-name":"qa","size":4096}',
    ]);
    expect(JSON.parse(added.stdout)).toEqual({});
    const dup = await blockrep(
      ['qmp', '--socket', sock, 'blockdev-add', 'driver=null-co', 'node-name=qa'],
      [1],
    );
    expect(dup.stderr).toBe("blockrep: Duplicate nodes with node-name='qa'\n");
    expect(dup.stdout).toBe('');
  });

  it('qmp-shell through a pipe: one command (a HOME without room for history is no obstacle)', async () => {
    const home = dir.file('home1');
    const r = await blockrep(
      ['qmp-shell', '--socket', sock],
      [0],
      { ...process.env, HOME: home },
      'query-version\n',
    );
    const lines = r.stdout.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!).return.qemu.major).toBe(7);
  });

  it('qmp-shell through a pipe: key=value, raw JSON and errors, one JSON line each, history kept', async () => {
    const home = dir.file('home2');
    mkdirSync(home);
    const input = [
      'blockdev-add driver=null-co node-name=sh0 size=1024',
      '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
      'no-such-command',
      '',
    ].join('\n');
    const r = await blockrep(['qmp-shell', '--socket', sock], [1], { ...process.env, HOME: home }, input);
    const [add, query, err] = r.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(add).toEqual({ return: {} });
    expect(query.return.map((n: { 'node-name': string }) => n['node-name'])).toContain('sh0');
    expect(err.error.class).toBe('CommandNotFound');
    const history = readFileSync(`${home}/.blockrep_qmp_history`, 'utf8');
    expect(history.split('\n')[0]).toBe('blockdev-add driver=null-co node-name=sh0 size=1024');
  });

  it('qmp-shell prints events as they arrive, between the responses', async () => {
    const created = dir.file('created.img');
    const input = `blockdev-create job-id=j0 options.driver=file options.filename=${created} options.size=65536\n`;
    const r = await blockrep(['qmp-shell', '--socket', sock], [0], process.env, input);
    const lines = r.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    const event = lines.find((l) => l.event === 'JOB_STATUS_CHANGE');
    expect(event.data).toEqual({ status: 'created', id: 'j0' });
    expect(Object.keys(event)).toEqual(['event', 'data', 'timestamp']);
    // The job goes on after blockdev-create returns: later events may follow the response.
    const ret = lines.findIndex((l) => 'return' in l);
    expect(lines[ret]).toEqual({ return: {} });
    expect(lines.indexOf(event)).toBeLessThan(ret);
  });

  it.runIf(hasPeer('script'))('qmp-shell on a terminal: prompt, Tab completes a command name', async () => {
    const home = dir.file('home3');
    mkdirSync(home);
    const shell = spawn('script', ['-qec', `node ${bin} qmp-shell --socket ${sock}`, '/dev/null'], {
      env: { ...process.env, HOME: home },
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    let out = '';
    shell.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
    });
    const until = async (re: RegExp) => {
      await waitFor(() => re.test(out), { on: [shell.stdout!, 'data'], what: `${re} on the terminal` }).catch(
        () => {},
      );
      expect(out).toMatch(re);
    };
    await until(/\(blockrep\) /);
    // Keys one chunk at a time: readline takes a Tab within pasted text literally. Its echo says
    // it has taken the first chunk.
    shell.stdin!.write('query-versi');
    await until(/query-versi/);
    shell.stdin!.write('\t');
    await until(/query-version/);
    shell.stdin!.write('\r');
    await until(/"return":\{"qemu"/);
    shell.stdin!.write('\x04');
    await new Promise((r) => shell.once('exit', r));
    expect(readFileSync(`${home}/.blockrep_qmp_history`, 'utf8')).toBe('query-version\n');
  });

  it.runIf(hasPeer('dot'))('graph renders the block graph as DOT and SVG', async () => {
    await blockrep(['qmp', '--socket', sock, 'blockdev-add', 'driver=raw', 'node-name=fmt0', 'file=n0']);
    // A file node and an NBD export: the picture names the file and the export.
    const img = dir.file('f0.img');
    writeFileSync(img, Buffer.alloc(65536));
    await blockrep([
      'qmp',
      '--socket',
      sock,
      'blockdev-add',
      'driver=file',
      'node-name=f0',
      `filename=${img}`,
    ]);
    await blockrep([
      'qmp',
      '--socket',
      sock,
      'nbd-server-start',
      'addr.type=unix',
      `addr.data.path=${dir.file('nbd.sock')}`,
    ]);
    await blockrep(['qmp', '--socket', sock, 'block-export-add', 'type=nbd', 'id=e0', 'node-name=fmt0']);
    const dot = (await blockrep(['graph', '--socket', sock])).stdout;
    expect(dot).toMatch(/^digraph block_graph \{/);
    expect(dot).toContain('label="fmt0\\nraw"');
    expect(dot).toContain('label="n0\\nnull-co"');
    expect(dot).toContain(`label="f0\\nfile\\n${img}"`);
    expect(dot).toMatch(
      /n(\d+) \[label="NBD export 'e0'\\nblock-backend", shape=box[^\n]*\n(.|\n)*n\1 -> n\d+ \[label="root/,
    );
    expect(dot).not.toContain('(anonymous)');
    expect(dot).toMatch(/-> n\d+ \[label="file\\nperm: [^"]*consistent-read/);
    const out = dir.file('graph.svg');
    await blockrep(['graph', '--socket', sock, '--format', 'svg', '-o', out]);
    const svg = readFileSync(out, 'utf8');
    expect(svg).toContain('<svg');
    expect(svg).toContain('fmt0');
  });
});
