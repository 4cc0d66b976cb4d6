// The `smartproxy` command: `--check`, a config file served, SIGHUP reloads that keep open
// connections and refuse a bad file, SIGTERM stopping gracefully.
import { tap, expect } from '@push.rocks/tapbundle';
import { spawn, type ChildProcess } from 'node:child_process';
import * as http from 'node:http';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

import { connectAndRead, connectionRefused, freePorts, listenTracked, startTaggedServer, waitFor } from './helpers/net.js';

const CLI = path.join(import.meta.dirname, '..', 'ts', 'cli.ts');
const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-cli-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const configFile = path.join(dir, 'config.json');
const backendA = await startTaggedServer('backend-a');
const backendB = await startTaggedServer('backend-b');
const web = await listenTracked(http.createServer((req, res) => res.end(`web ${req.url}`)));
const [portOne, portTwo, httpPort] = await freePorts(3);
const webRoute = { name: 'web', match: { ports: httpPort, domains: 'web.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: web.port } } };

/** A GET on the agent's connection (kept alive), and which local port it left from. */
function keepAliveGet(agent: http.Agent, url: string): Promise<{ body: string; localPort: number }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port: httpPort, path: url, headers: { host: 'web.test' }, agent }, (res) => {
      let body = '';
      res.on('data', (chunk: Buffer) => (body += chunk.toString()));
      res.on('end', () => resolve({ body, localPort: req.socket!.localPort! }));
    });
    req.on('error', reject);
    req.end();
  });
}

const forward = (name: string, port: number, backendPort: number) => ({
  name,
  match: { ports: port },
  action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } },
});

interface IRun {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number | null>;
}

function startCli(args: string[]): IRun {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, stdout: () => stdout, stderr: () => stderr, exited };
}

/** The first line a new connection to `port` gets (the tagged backend behind it). */
async function firstLine(port: number): Promise<string> {
  const { data, socket } = await connectAndRead(port);
  socket.destroy();
  return data.trim();
}

/** One round trip through an open connection to a tagged (echoing) backend. */
function echo(socket: net.Socket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const onData = (chunk: Buffer): void => {
      got += chunk.toString();
      if (got.includes(text)) {
        socket.off('data', onData);
        resolve(got);
      }
    };
    socket.on('data', onData);
    socket.once('error', reject);
    socket.write(text);
  });
}

tap.test('--check: 0 for a valid file, 1 with the field for an invalid one, 2 without a file', async () => {
  writeFileSync(configFile, JSON.stringify({ routes: [forward('one', portOne, backendA.port)] }));
  const valid = startCli(['--check', configFile]);
  expect(await valid.exited).toEqual(0);
  expect(valid.stdout()).toInclude('valid (1 routes)');

  const badFile = path.join(dir, 'bad.json');
  writeFileSync(badFile, JSON.stringify({ routes: [forward('one', 70000, backendA.port)] }));
  const invalid = startCli(['--check', badFile]);
  expect(await invalid.exited).toEqual(1);
  expect(invalid.stderr()).toInclude('match.ports');

  const notJson = path.join(dir, 'broken.json');
  writeFileSync(notJson, '{ "routes": [');
  const broken = startCli(['--check', notJson]);
  expect(await broken.exited).toEqual(1);
  expect(broken.stderr()).toInclude('not valid JSON');

  const missing = startCli(['--check']);
  expect(await missing.exited).toEqual(2);
});

tap.test("the README's config file validates", async () => {
  const readme = readFileSync(path.join(import.meta.dirname, '..', 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Run it from a config file'));
  const block = /```json\n([\s\S]*?)\n```/.exec(section);
  expect(block === null ? 'no json block' : 'found').toEqual('found');
  const file = path.join(dir, 'readme.json');
  writeFileSync(file, block![1]);
  const run = startCli(['--check', file]);
  const code = await run.exited;
  expect(run.stderr()).toEqual('');
  expect(code).toEqual(0);
  expect(run.stdout()).toInclude('valid (4 routes)');
});

tap.test('serves the file; SIGHUP applies a new one without dropping open connections; a bad file is refused; SIGTERM stops', async () => {
  writeFileSync(configFile, JSON.stringify({ routes: [forward('one', portOne, backendA.port), webRoute] }));
  const run = startCli([configFile]);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await waitFor(() => run.stdout().includes('listening on ports'), 30000, 'the CLI to start');
    expect(await firstLine(portOne)).toEqual('backend-a');
    const before = await keepAliveGet(agent, '/before');
    expect(before.body).toEqual('web /before');

    // A connection opened before the reload, kept open across it.
    const held = net.connect(portOne, '127.0.0.1');
    let greeting = '';
    held.on('data', (chunk: Buffer) => (greeting += chunk.toString()));
    await waitFor(() => greeting.includes('backend-a'), 5000, 'the held connection to be relayed');

    writeFileSync(configFile, JSON.stringify({ routes: [forward('one', portOne, backendB.port), forward('two', portTwo, backendB.port), webRoute] }));
    run.child.kill('SIGHUP');
    await waitFor(() => run.stdout().includes('reloaded'), 10000, 'the reload');
    expect(await firstLine(portOne)).toEqual('backend-b');
    expect(await firstLine(portTwo)).toEqual('backend-b');
    expect(await echo(held, 'still here\n')).toInclude('still here');
    // The keep-alive HTTP connection opened before the reload carries the next request too.
    const after = await keepAliveGet(agent, '/after');
    expect(after.body).toEqual('web /after');
    expect(after.localPort).toEqual(before.localPort);

    // A file that does not validate: refused, the running routes stay.
    writeFileSync(configFile, JSON.stringify({ routes: [forward('one', 70000, backendA.port)] }));
    run.child.kill('SIGHUP');
    await waitFor(() => run.stderr().includes('refused'), 10000, 'the refusal');
    expect(run.stderr()).toInclude('match.ports');
    expect(await firstLine(portOne)).toEqual('backend-b');
    expect(await firstLine(portTwo)).toEqual('backend-b');

    // Not JSON at all: refused as well.
    writeFileSync(configFile, '{ "routes": ');
    const refusalsBefore = run.stderr().split('refused').length;
    run.child.kill('SIGHUP');
    await waitFor(() => run.stderr().split('refused').length > refusalsBefore, 10000, 'the second refusal');
    expect(await echo(held, 'and still\n')).toInclude('and still');

    held.destroy();
    agent.destroy();
    run.child.kill('SIGTERM');
    expect(await run.exited).toEqual(0);
    expect(run.stdout()).toInclude('stopped');
    // Its ports are closed.
    expect(await connectionRefused(portOne)).toBeTrue();
  } finally {
    run.child.kill('SIGKILL');
  }
});

tap.test('the start lines name the UDP ports of datagram routes and of HTTP/3', async () => {
  const [udpPort] = await freePorts(1);
  const udpFile = path.join(dir, 'udp.json');
  writeFileSync(udpFile, JSON.stringify({ routes: [{ name: 'dns', match: { ports: udpPort, transport: 'udp' }, action: { type: 'forward', target: { host: '127.0.0.1', port: 53 } } }] }));
  const run = startCli([udpFile]);
  try {
    await waitFor(() => run.stdout().includes('UDP datagrams on ports'), 30000, 'the CLI to start');
    expect(run.stdout()).toInclude(`UDP datagrams on ports ${udpPort}`);
    expect(run.stdout()).not.toInclude('HTTP/3');
  } finally {
    run.child.kill('SIGTERM');
    await run.exited;
  }
});

tap.test('cleanup', async () => {
  await backendA.close();
  await backendB.close();
  await web.close();
  rmSync(dir, { recursive: true, force: true });
});

tap.start({ throwOnError: true });
