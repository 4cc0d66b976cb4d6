// accessLog: one line per HTTP request (HTTP/1.1, HTTP/2 over TLS, the proxy's own answers) and per
// TCP connection, with the documented fields; no query string or credential ever written; the
// file reopened after a rename (reopenLogs(), and SIGUSR1 in the CLI); the combined format;
// standard output; and the counters in the Prometheus exposition.
import { tap, expect } from '@push.rocks/tapbundle';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

import { SmartProxy } from '../ts/index.js';
import { connectionRefused, exchange, freePorts, listenTracked, rejection, startEchoServer, thrown, waitFor } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';

interface ILine {
  time: string;
  route: string | null;
  clientIp: string;
  method: string | null;
  host: string | null;
  path: string | null;
  status: number | null;
  bytesIn: number;
  bytesOut: number;
  durationMs: number;
  upstream: string | null;
  protocol: string;
  tls: boolean;
  termination: string;
}

const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-access-log-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const logFile = path.join(dir, 'access.log');
const RESPONSE = 'hello from the backend';
const backend = await listenTracked(
  http.createServer((req, res) => {
    let received = 0;
    req.on('data', (chunk: Buffer) => (received += chunk.length));
    req.on('end', () => {
      const answer = () => {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(req.method === 'POST' ? `got ${received}` : RESPONSE);
      };
      if (req.url === '/slow') setTimeout(answer, 1500);
      else answer();
    });
  }),
);
const echo = await startEchoServer();
const ca = createTestCa();
const leaf = ca.issue(['secure.test']);
const [httpPort, tcpPort, tlsPort] = await freePorts(3);
const target = { host: '127.0.0.1', port: backend.port };
const proxy = new SmartProxy({
  routes: [
    { name: 'web', match: { ports: httpPort, domains: 'web.test' }, action: { type: 'forward', target } },
    {
      name: 'guarded',
      match: { ports: httpPort, domains: 'guarded.test' },
      action: { type: 'forward', target },
      security: { basicAuth: { enabled: true, users: [{ username: 'alice', password: 'wonderland-secret' }] } },
    },
    { name: 'tcp', match: { ports: tcpPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: echo.port } } },
    {
      name: 'secure',
      match: { ports: tlsPort, domains: 'secure.test' },
      action: { type: 'forward', target, tls: { mode: 'terminate', certificate: { key: leaf.key, cert: leaf.cert } } },
    },
  ],
  accessLog: { enabled: true, path: logFile },
});

function request(options: { host: string; path: string; method?: string; body?: string; auth?: string }): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { host: options.host };
    if (options.auth !== undefined) headers.authorization = `Basic ${Buffer.from(options.auth).toString('base64')}`;
    const req = http.request({ port: httpPort, path: options.path, method: options.method ?? 'GET', headers, agent: false }, (res) => {
      let body = '';
      res.on('data', (chunk: Buffer) => (body += chunk.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/** The line's values of the fields `expected` names equal those. */
function expectFields(line: ILine, expected: Partial<ILine>): void {
  const picked = Object.fromEntries(Object.keys(expected).map((key) => [key, line[key as keyof ILine]]));
  expect(picked).toEqual(expected);
}

function lines(file = logFile): ILine[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as ILine);
}

/** Waits until the file holds `count` lines (the writer is a thread of its own). */
async function linesWhen(count: number, file = logFile): Promise<ILine[]> {
  await waitFor(() => lines(file).length >= count, 5000, `${count} access log lines in ${file}`);
  return lines(file);
}

tap.test('setup', async () => {
  await proxy.start();
});

tap.test('an HTTP/1.1 request is one JSON line with the documented fields, and no query', async () => {
  const answer = await request({ host: 'web.test', path: '/docs/page?token=query-secret&x=1' });
  expect(answer.status).toEqual(200);
  const [line] = await linesWhen(1);
  // The documented fields, each once (their order in the object is not part of the contract).
  expect(Object.keys(line).sort()).toEqual([
    'time', 'route', 'clientIp', 'method', 'host', 'path', 'status', 'bytesIn', 'bytesOut', 'durationMs', 'upstream', 'protocol', 'tls', 'termination',
  ].sort());
  expect(line.route).toEqual('web');
  expect(line.clientIp).toEqual('127.0.0.1');
  expect(line.method).toEqual('GET');
  expect(line.host).toEqual('web.test');
  expect(line.path).toEqual('/docs/page');
  expect(line.status).toEqual(200);
  expect(line.bytesIn).toEqual(0);
  expect(line.bytesOut).toEqual(RESPONSE.length);
  expect(line.upstream).toEqual(`127.0.0.1:${backend.port}`);
  expect(line.protocol).toEqual('HTTP/1.1');
  expect(line.tls).toBeFalse();
  expect(line.termination).toEqual('completed');
  expect(line.durationMs).toBeGreaterThanOrEqual(0);
  expect(Math.abs(Date.parse(line.time) - Date.now())).toBeLessThan(60_000);
});

tap.test('a POST body is counted in, the response out', async () => {
  const body = 'x'.repeat(5000);
  const answer = await request({ host: 'web.test', path: '/upload', method: 'POST', body });
  expect(answer.body).toEqual('got 5000');
  const line = (await linesWhen(2))[1];
  expect(line.method).toEqual('POST');
  expect(line.bytesIn).toEqual(5000);
  expect(line.bytesOut).toEqual('got 5000'.length);
});

tap.test('answers the proxy gives itself are logged: 401 without credentials written, 404 for no route', async () => {
  expect((await request({ host: 'guarded.test', path: '/private?session=query-secret', auth: 'alice:wrong-password' })).status).toEqual(401);
  expect((await request({ host: 'guarded.test', path: '/private', auth: 'alice:wonderland-secret' })).status).toEqual(200);
  expect((await request({ host: 'nobody.test', path: '/missing' })).status).toEqual(404);
  const all = await linesWhen(5);
  const [refused, admitted, missing] = all.slice(2);
  expectFields(refused, { route: 'guarded', status: 401, path: '/private', upstream: null });
  expectFields(admitted, { route: 'guarded', status: 200, upstream: `127.0.0.1:${backend.port}` });
  expectFields(missing, { route: null, status: 404, host: 'nobody.test', path: '/missing', upstream: null });
  expect(refused.bytesOut).toBeGreaterThan(0);
  const text = readFileSync(logFile, 'utf8');
  for (const secret of ['query-secret', 'wonderland-secret', 'wrong-password', Buffer.from('alice:wonderland-secret').toString('base64'), '?']) {
    expect(text.includes(secret)).toBeFalse();
  }
});

tap.test('a TCP connection is one line with the bytes each way and the backend', async () => {
  const payload = 'ping over tcp';
  const echoed = await exchange(tcpPort, payload);
  expect(echoed.toString()).toEqual(payload);
  const line = (await linesWhen(6))[5];
  expectFields(line, {
    route: 'tcp',
    method: null,
    path: null,
    status: null,
    protocol: 'tcp',
    tls: false,
    bytesIn: payload.length,
    bytesOut: payload.length,
    upstream: `127.0.0.1:${echo.port}`,
  });
  expect(['completed', 'client_error', 'backend_error']).toContain(line.termination);
});

tap.test('HTTP/2 over terminated TLS: protocol HTTP/2, tls true, the host from :authority', async () => {
  const session = http2.connect(`https://127.0.0.1:${tlsPort}`, { ca: ca.cert, servername: 'secure.test' });
  const body = await new Promise<string>((resolve, reject) => {
    const stream = session.request({ ':path': '/h2?private=query-secret', ':authority': 'secure.test' });
    let data = '';
    stream.on('data', (chunk: Buffer) => (data += chunk.toString()));
    stream.on('end', () => resolve(data));
    stream.on('error', reject);
  });
  session.close();
  expect(body).toEqual(RESPONSE);
  const line = (await linesWhen(7))[6];
  expectFields(line, { route: 'secure', protocol: 'HTTP/2', tls: true, host: 'secure.test', path: '/h2', status: 200, bytesOut: RESPONSE.length });
  expect(readFileSync(logFile, 'utf8').includes('query-secret')).toBeFalse();
});

tap.test('a client-chosen path longer than 2 KiB is clipped in the log, whole at the backend', async () => {
  const long = `/${'p'.repeat(10_000)}`;
  expect((await request({ host: 'web.test', path: long })).status).toEqual(200);
  const line = (await linesWhen(8))[7];
  expect(line.path).toEqual(long.slice(0, 2048));
});

tap.test('an HTTP/2 client that cancels its stream before the response is logged as client_aborted, without a status', async () => {
  const session = http2.connect(`https://127.0.0.1:${tlsPort}`, { ca: ca.cert, servername: 'secure.test' });
  await new Promise<void>((resolve) => {
    const stream = session.request({ ':path': '/slow', ':authority': 'secure.test' });
    stream.on('error', () => undefined);
    stream.on('close', () => resolve());
    setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), 200);
  });
  session.close();
  const line = (await linesWhen(9))[8];
  expectFields(line, { route: 'secure', path: '/slow', status: null, protocol: 'HTTP/2', termination: 'client_aborted' });
});

tap.test('reopenLogs() after a rename: old lines stay in the renamed file, new ones go to a new file', async () => {
  const rotated = `${logFile}.1`;
  renameSync(logFile, rotated);
  proxy.reopenLogs();
  await request({ host: 'web.test', path: '/after-rotation' });
  const fresh = await linesWhen(1);
  expect(fresh.map((l) => l.path)).toEqual(['/after-rotation']);
  expect(lines(rotated).length).toEqual(9);
  expect(lines(rotated).some((l) => l.path === '/after-rotation')).toBeFalse();
});

tap.test('the Prometheus exposition counts the lines written and none dropped', async () => {
  const text = proxy.getPrometheusMetrics();
  const value = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1]);
  expect(value('smartproxy_access_log_lines_total')).toEqual(10);
  expect(value('smartproxy_access_log_dropped_total')).toEqual(0);
});

tap.test('stop() writes what is queued before the file closes', async () => {
  await request({ host: 'web.test', path: '/last' });
  await proxy.stop();
  expect(lines().map((l) => l.path)).toEqual(['/after-rotation', '/last']);
});

tap.test('the combined format: Apache lines, the path without its query, the referer without secrets', async () => {
  const combinedFile = path.join(dir, 'combined.log');
  const [port] = await freePorts(1);
  const combined = new SmartProxy({
    routes: [{ name: 'web', match: { ports: port, domains: 'localhost' }, action: { type: 'forward', target } }],
    accessLog: { enabled: true, path: combinedFile, format: 'combined' },
  });
  await combined.start();
  await new Promise<void>((resolve, reject) => {
    const headers = { referer: 'https://bob:hunter2@ref.test/from?ref-secret=1', 'user-agent': 'test-agent/1.0 "quoted"' };
    http
      .get({ port, path: '/c/page?q=query-secret', headers, agent: false }, (res) => {
        res.resume();
        res.on('end', resolve);
      })
      .on('error', reject);
  });
  await combined.stop();
  const text = readFileSync(combinedFile, 'utf8');
  expect(text).toMatch(
    /^127\.0\.0\.1 - - \[\d\d\/[A-Z][a-z]{2}\/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET \/c\/page HTTP\/1\.1" 200 22 "https:\/\/ref\.test\/from" "test-agent\/1\.0 \\x22quoted\\x22"\n$/,
  );
  for (const secret of ['query-secret', 'hunter2', 'ref-secret']) expect(text.includes(secret)).toBeFalse();
});

tap.test('bad accessLog options are refused clearly; an unopenable file fails start()', async () => {
  const route = { match: { ports: 1 }, action: { type: 'forward' as const, target } };
  const badFormat = thrown(() => new SmartProxy({ routes: [route], accessLog: { enabled: true, format: 'xml' as 'json' } }));
  expect(badFormat?.message ?? '').toInclude('accessLog.format');
  const badEnabled = thrown(() => new SmartProxy({ routes: [route], accessLog: { enabled: 'yes' as unknown as boolean } }));
  expect(badEnabled?.message ?? '').toInclude('accessLog.enabled');
  const [port] = await freePorts(1);
  const missingDir = path.join(dir, 'no-such-dir', 'access.log');
  const unopenable = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target } }],
    accessLog: { enabled: true, path: missingDir },
  });
  const err = await rejection(unopenable.start());
  expect(err?.message ?? '').toInclude(missingDir);
  // Nothing was left listening.
  expect(await connectionRefused(port)).toBeTrue();
});

const CLI = path.join(import.meta.dirname, '..', 'ts', 'cli.ts');

/** Runs the CLI on `config` until `done` resolves, then stops it with SIGTERM; its stdout. */
async function runCli(config: object, done: (stdout: () => string, pid: number) => Promise<void>): Promise<string> {
  const configFile = path.join(dir, `cli-${Date.now()}.json`);
  writeFileSync(configFile, JSON.stringify(config));
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    await waitFor(() => stdout.includes('press Ctrl+C'), 60_000, 'the CLI to start');
    await done(() => stdout, child.pid!);
  } finally {
    child.kill('SIGTERM');
    await exited;
  }
  return stdout;
}

tap.test('CLI: without a path, lines go to standard output', async () => {
  const [port] = await freePorts(1);
  await runCli(
    { routes: [{ name: 'out', match: { ports: port, domains: 'localhost' }, action: { type: 'forward', target } }], accessLog: { enabled: true } },
    async (stdout) => {
      await new Promise<void>((resolve, reject) => {
        http.get({ port, path: '/to-stdout?q=1', agent: false }, (res) => res.resume().on('end', resolve)).on('error', reject);
      });
      await waitFor(() => stdout().includes('"path":"/to-stdout"'), 5000, 'the access line on stdout');
      const line = stdout().split('\n').find((l) => l.includes('"path":"/to-stdout"'))!;
      expect((JSON.parse(line) as ILine).route).toEqual('out');
    },
  );
});

tap.test('CLI: SIGUSR1 reopens the file after logrotate renamed it', async () => {
  const [port] = await freePorts(1);
  const cliLog = path.join(dir, 'cli.log');
  const get = (p: string) =>
    new Promise<void>((resolve, reject) => {
      http.get({ port, path: p, agent: false }, (res) => res.resume().on('end', resolve)).on('error', reject);
    });
  await runCli(
    { routes: [{ name: 'cli', match: { ports: port, domains: 'localhost' }, action: { type: 'forward', target } }], accessLog: { enabled: true, path: cliLog } },
    async (_stdout, pid) => {
      await get('/before');
      await linesWhen(1, cliLog);
      renameSync(cliLog, `${cliLog}.1`);
      process.kill(pid, 'SIGUSR1');
      // The signal is delivered asynchronously: the reopened file exists once it was handled.
      await waitFor(() => existsSync(cliLog), 5000, 'the reopened file');
      await get('/after');
      await linesWhen(1, cliLog);
    },
  );
  expect(lines(`${cliLog}.1`).map((l) => l.path)).toEqual(['/before']);
  expect(lines(cliLog).map((l) => l.path)).toEqual(['/after']);
});

tap.test('teardown', async () => {
  await proxy.stop();
  await backend.close();
  await echo.close();
  rmSync(dir, { recursive: true, force: true });
});

export default tap.start();
