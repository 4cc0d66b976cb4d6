// The HTTP engine on plain (non-TLS) ports: path routing, target selection, header rewriting,
// keep-alive and upstream pooling, streaming, failures, request smuggling, header limits, HTTP/2
// prior knowledge (h2c) towards clients and backends, WebSocket tunnels and stop(). Every route
// under test has `domains` or `path`, so the port is served by the HTTP engine (not a raw relay).
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePorts, sleep, startTcpServer, waitFor } from './helpers/net.js';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

interface ISeenRequest {
  method: string;
  url: string;
  httpVersion: string;
  headers: http.IncomingHttpHeaders;
}

interface IInfoBackend {
  name: string;
  port: number;
  connections: number;
  requests: ISeenRequest[];
  close(): Promise<void>;
}

function bigBody(size: number): Buffer {
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i++) buf[i] = (i * 31 + (i >> 8)) & 0xff;
  return buf;
}
const BIG_RESPONSE = bigBody(5 * MiB);
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/**
 * An HTTP/1.1 backend. A path containing `/echo` echoes the request body, `/big` sends 5 MiB, everything else
 * answers with a JSON description of the request as received (method, url, version, headers).
 */
async function infoBackend(name: string): Promise<IInfoBackend> {
  const sockets = new Set<net.Socket>();
  const result: IInfoBackend = { name, port: 0, connections: 0, requests: [], close: async () => undefined };
  const server = http.createServer((req, res) => {
    result.requests.push({ method: req.method!, url: req.url!, httpVersion: req.httpVersion, headers: req.headers });
    if (req.url!.includes('/echo')) {
      res.setHeader('content-type', 'application/octet-stream');
      req.pipe(res);
      return;
    }
    if (req.url!.includes('/big')) {
      res.setHeader('content-type', 'application/octet-stream');
      res.setHeader('content-length', BIG_RESPONSE.length);
      // Several writes, so the response really streams.
      let offset = 0;
      const writeMore = (): void => {
        while (offset < BIG_RESPONSE.length) {
          const chunk = BIG_RESPONSE.subarray(offset, offset + 256 * 1024);
          offset += chunk.length;
          if (!res.write(chunk)) {
            res.once('drain', writeMore);
            return;
          }
        }
        res.end();
      };
      writeMore();
      return;
    }
    req.resume();
    req.on('end', () => {
      const body = JSON.stringify({ name, method: req.method, url: req.url, httpVersion: req.httpVersion, headers: req.headers });
      res.setHeader('content-type', 'application/json');
      res.setHeader('x-backend', name);
      res.end(body);
    });
  });
  server.keepAliveTimeout = 30000;
  server.on('connection', (socket: net.Socket) => {
    result.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  result.port = (server.address() as AddressInfo).port;
  result.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return result;
}

function target(b: { port: number }): { host: string; port: number } {
  return { host: '127.0.0.1', port: b.port };
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

interface IResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  text: string;
  reusedSocket: boolean;
}

function request(
  port: number,
  opts: { method?: string; path?: string; host?: string; headers?: Record<string, string>; body?: Buffer | string; agent?: http.Agent | false } = {},
): Promise<IResult> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: opts.method ?? 'GET',
        path: opts.path ?? '/',
        headers: { host: opts.host ?? 'test.local', ...(opts.headers ?? {}) },
        agent: opts.agent ?? false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('error', reject);
        res.on('end', () => {
          const body = Buffer.concat(chunks);
          resolve({ status: res.statusCode!, headers: res.headers, body, text: body.toString(), reusedSocket: req.reusedSocket });
        });
      },
    );
    req.setTimeout(10000, () => req.destroy(new Error('client timeout')));
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** The backend's JSON description of the request (from `infoBackend`). */
async function info(port: number, path: string, opts: Parameters<typeof request>[1] = {}): Promise<{ status: number; json: any; res: IResult }> {
  const res = await request(port, { ...opts, path });
  let json: any = null;
  try {
    json = JSON.parse(res.text);
  } catch {
    json = null;
  }
  return { status: res.status, json, res };
}

/** Writes raw bytes and collects everything until the peer closes or `timeoutMs` passes. */
function rawExchange(port: number, payload: Buffer | string, timeoutMs = 3000): Promise<{ data: string; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(payload));
    const chunks: Buffer[] = [];
    let done = false;
    const finish = (closed: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ data: Buffer.concat(chunks).toString('latin1'), closed });
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    socket.on('data', (d: Buffer) => chunks.push(d));
    socket.on('error', () => finish(true));
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
  });
}

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

const names = [
  'exact', 'prefix', 'static', 'param', 'low', 'high', 'first', 'second',
  'v2', 'post', 'dflt', 'tenantA', 'tenantOther', 'hdr', 'main', 'pool', 'smuggle', 'app',
] as const;
const b: Record<(typeof names)[number], IInfoBackend> = {} as any;
for (const n of names) b[n] = await infoBackend(n);

// A backend writing hop-by-hop headers in its responses.
const hopResponder = await startTcpServer((socket) => {
  let buffered = '';
  socket.on('data', (d: Buffer) => {
    buffered += d.toString('latin1');
    while (buffered.includes('\r\n\r\n')) {
      buffered = buffered.slice(buffered.indexOf('\r\n\r\n') + 4);
      socket.write(
        'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-secret-resp\r\nX-Secret-Resp: 1\r\n' +
          'Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: x-trail\r\nUpgrade: h2c\r\n' +
          'X-Normal-Resp: yes\r\n\r\nok',
      );
    }
  });
});

// Accepts, reads, never answers.
const silent = await startTcpServer((socket) => {
  socket.on('data', () => undefined);
});

// Answers with a truncated response, then drops the connection.
const garbage = await startTcpServer((socket) => {
  socket.once('data', () => {
    socket.write('HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort');
    setTimeout(() => socket.destroy(), 20);
  });
});

// An h2c (HTTP/2 cleartext) backend.
const h2Sessions = new Set<http2.ServerHttp2Session>();
const h2Backend = http2.createServer((req, res) => {
  const chunks: Buffer[] = [];
  req.on('data', (d: Buffer) => chunks.push(d));
  req.on('end', () => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({
      httpVersion: req.httpVersion,
      method: req.method,
      url: req.url,
      authority: req.headers[':authority'] ?? null,
      host: req.headers.host ?? null,
      bodyLength: Buffer.concat(chunks).length,
      bodySha: sha256(Buffer.concat(chunks)),
    }));
  });
});
h2Backend.on('session', (s) => {
  h2Sessions.add(s);
  s.on('close', () => h2Sessions.delete(s));
});
await new Promise<void>((resolve) => h2Backend.listen(0, '127.0.0.1', resolve));
const h2BackendPort = (h2Backend.address() as AddressInfo).port;

// WebSocket backends: one completes the handshake and echoes raw bytes, one refuses with 403.
function wsAccept(key: string): string {
  return createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC11B65').digest('base64');
}
const wsSockets = new Set<net.Socket>();
const wsSeen: http.IncomingHttpHeaders[] = [];
const wsBackend = http.createServer((_req, res) => res.end('not an upgrade'));
wsBackend.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
  wsSeen.push(req.headers);
  wsSockets.add(socket);
  socket.on('close', () => wsSockets.delete(socket));
  socket.on('error', () => undefined);
  if (req.url!.startsWith('/ws-deny')) {
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied');
    return;
  }
  socket.write(
    'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Accept: ${wsAccept(String(req.headers['sec-websocket-key']))}\r\n\r\n`,
  );
  if (head.length) socket.write(head);
  socket.pipe(socket);
});
await new Promise<void>((resolve) => wsBackend.listen(0, '127.0.0.1', resolve));
const wsBackendPort = (wsBackend.address() as AddressInfo).port;

const [port, stopPort, refusedPort] = await freePorts(3);
const ports = port;

const proxy = new SmartProxy({
  routes: [
    // 1. path routing
    { name: 'exact', match: { ports, path: '/api' }, action: { type: 'forward', target: target(b.exact) } },
    { name: 'prefix', match: { ports, path: '/api/*' }, action: { type: 'forward', target: target(b.prefix) } },
    { name: 'static', match: { ports, path: '/static/' }, action: { type: 'forward', target: target(b.static) } },
    { name: 'param', match: { ports, path: '/users/:id' }, action: { type: 'forward', target: target(b.param) } },
    { name: 'low', match: { ports, path: '/prio/*' }, action: { type: 'forward', target: target(b.low) } },
    { name: 'high', priority: 10, match: { ports, path: '/prio/*' }, action: { type: 'forward', target: target(b.high) } },
    { name: 'first', match: { ports, path: '/order/*' }, action: { type: 'forward', target: target(b.first) } },
    { name: 'second', match: { ports, path: '/order/*' }, action: { type: 'forward', target: target(b.second) } },
    // 2. target selection and header matches
    {
      name: 'targets',
      match: { ports, path: '/t/*' },
      action: {
        type: 'forward',
        targets: [
          { ...target(b.v2), match: { path: '/t/v2/*' } },
          { ...target(b.post), match: { method: ['POST'] } },
          target(b.dflt),
        ],
      },
    },
    { name: 'tenantA', match: { ports, path: '/tenant', headers: { 'x-tenant': 'a' } }, action: { type: 'forward', target: target(b.tenantA) } },
    { name: 'tenantOther', match: { ports, path: '/tenant' }, action: { type: 'forward', target: target(b.tenantOther) } },
    // 3. header rewriting and templates
    {
      name: 'hdr',
      match: { ports, path: '/hdr/*' },
      headers: {
        request: { 'x-route': '{routeName}:{domain}:{path}:{query}:{clientIp}:{port}', 'x-both': 'route', 'x-route-only': 'r' },
        response: { 'x-served-by': 'proxy', 'x-both-resp': 'route' },
      },
      action: {
        type: 'forward',
        target: { ...target(b.hdr), headers: { request: { 'x-both': 'target', 'x-target-only': 't' }, response: { 'x-both-resp': 'target' } } },
      },
    },
    { name: 'main', match: { ports, path: '/main/*' }, action: { type: 'forward', target: target(b.main) } },
    { name: 'hopresp', match: { ports, path: '/hopresp' }, action: { type: 'forward', target: { host: '127.0.0.1', port: hopResponder.port } } },
    // 4. pooling
    { name: 'pool', match: { ports, path: '/pool/*' }, action: { type: 'forward', target: target(b.pool) } },
    // 6. failures
    { name: 'refused', match: { ports, path: '/refused' }, action: { type: 'forward', target: { host: '127.0.0.1', port: refusedPort } } },
    {
      name: 'slow',
      match: { ports, path: '/slow' },
      action: { type: 'forward', target: { host: '127.0.0.1', port: silent.port }, timeouts: { responseMs: 300 } },
    },
    { name: 'garbage', match: { ports, path: '/garbage' }, action: { type: 'forward', target: { host: '127.0.0.1', port: garbage.port } } },
    // 7. smuggling
    { name: 'smuggle', match: { ports, path: '/smuggle' }, action: { type: 'forward', target: target(b.smuggle) } },
    // 10. h2c backend
    {
      name: 'h2backend',
      match: { ports, path: '/h2backend/*' },
      action: { type: 'forward', target: { host: '127.0.0.1', port: h2BackendPort }, options: { backendProtocol: 'http2' } },
    },
    // 11. WebSocket
    { name: 'ws', match: { ports, path: '/ws/*' }, action: { type: 'forward', target: { host: '127.0.0.1', port: wsBackendPort } } },
    { name: 'ws-deny', match: { ports, path: '/ws-deny' }, action: { type: 'forward', target: { host: '127.0.0.1', port: wsBackendPort } } },
    // 9. a domain route (h2c clients)
    { name: 'app', match: { ports, domains: 'app.example.com' }, action: { type: 'forward', target: target(b.app) } },
  ],
});

const stopBackend = await infoBackend('stop');
const stopProxy = new SmartProxy({
  gracefulShutdownTimeout: 5000,
  routes: [{ name: 'stop', match: { ports: stopPort, domains: 'stop.example.com' }, action: { type: 'forward', target: target(stopBackend) } }],
});

tap.test('start', async () => {
  await proxy.start();
  await stopProxy.start();
});

// ---------------------------------------------------------------------------------------------
// 1. Path routing
// ---------------------------------------------------------------------------------------------

tap.test('path: /api is exact, /api/* and /static/ are prefixes, /users/:id is one segment', async () => {
  expect((await info(port, '/api')).json?.name).toEqual('exact');
  expect((await info(port, '/api?q=1')).json?.name).toEqual('exact');
  expect((await info(port, '/api/x')).json?.name).toEqual('prefix');
  expect((await info(port, '/api/x/y?z=1')).json?.name).toEqual('prefix');
  expect((await info(port, '/static/a/b.css')).json?.name).toEqual('static');
  expect((await info(port, '/users/42')).json?.name).toEqual('param');
  expect((await info(port, '/users/42')).json?.url).toEqual('/users/42');
  expect((await request(port, { path: '/apix' })).status).toEqual(404);
  expect((await request(port, { path: '/users/42/posts' })).status).toEqual(404);
});

tap.test('path: routes go by priority, then array order', async () => {
  expect((await info(port, '/prio/a')).json?.name).toEqual('high');
  expect((await info(port, '/order/a')).json?.name).toEqual('first');
});

tap.test('path: no matching route → 404 (node http and curl)', async () => {
  const res = await request(port, { path: '/nothing/here', host: 'nomatch.test' });
  expect(res.status).toEqual(404);
  const { stdout } = await execFileAsync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '-H', 'Host: nomatch.test', `http://127.0.0.1:${port}/nothing`]);
  expect(stdout.trim()).toEqual('404');
  // The proxy still serves afterwards.
  expect((await info(port, '/api')).json?.name).toEqual('exact');
});

// ---------------------------------------------------------------------------------------------
// 2. Target selection
// ---------------------------------------------------------------------------------------------

tap.test('targets: a matching target wins, else the target without match', async () => {
  expect((await info(port, '/t/v2/x')).json?.name).toEqual('v2');
  expect((await info(port, '/t/x', { method: 'POST', body: 'abc' })).json?.name).toEqual('post');
  expect((await info(port, '/t/x')).json?.name).toEqual('dflt');
  expect((await info(port, '/t/v1/x', { method: 'PUT', body: 'abc' })).json?.name).toEqual('dflt');
});

tap.test('match.headers: exact string value on the route', async () => {
  expect((await info(port, '/tenant', { headers: { 'x-tenant': 'a' } })).json?.name).toEqual('tenantA');
  expect((await info(port, '/tenant', { headers: { 'X-Tenant': 'a' } })).json?.name).toEqual('tenantA');
  expect((await info(port, '/tenant', { headers: { 'x-tenant': 'ab' } })).json?.name).toEqual('tenantOther');
  expect((await info(port, '/tenant', { headers: { 'x-tenant': 'b' } })).json?.name).toEqual('tenantOther');
  expect((await info(port, '/tenant')).json?.name).toEqual('tenantOther');
});

// ---------------------------------------------------------------------------------------------
// 3. Header rewriting
// ---------------------------------------------------------------------------------------------

tap.test('headers: hop-by-hop request headers are dropped, X-Forwarded-* and Via set, Host kept', async () => {
  const head =
    'GET /main/hop?a=1 HTTP/1.1\r\n' +
    'Host: hop.example.com\r\n' +
    'Connection: close, x-private\r\n' +
    'X-Private: secret\r\n' +
    'Keep-Alive: timeout=5\r\n' +
    'TE: trailers\r\n' +
    'Trailer: x-foo\r\n' +
    'Upgrade: foo/1\r\n' +
    'Proxy-Connection: keep-alive\r\n' +
    'X-Forwarded-For: 9.9.9.9\r\n' +
    'X-Forwarded-Proto: https\r\n' +
    'X-Forwarded-Host: evil.test\r\n' +
    'X-Forwarded-Port: 1\r\n' +
    'X-Keep-Me: kept\r\n' +
    '\r\n';
  const { data } = await rawExchange(port, head, 5000);
  expect(data.startsWith('HTTP/1.1 200')).toBeTrue();
  const json = JSON.parse(data.slice(data.indexOf('\r\n\r\n') + 4));
  const h = json.headers as Record<string, string>;
  expect(json.name).toEqual('main');
  expect(json.url).toEqual('/main/hop?a=1');
  expect(h['x-private']).toBeUndefined();
  expect(h['keep-alive']).toBeUndefined();
  expect(h['te']).toBeUndefined();
  expect(h['trailer']).toBeUndefined();
  expect(h['upgrade']).toBeUndefined();
  expect(h['proxy-connection']).toBeUndefined();
  // A Connection header upstream may only carry the proxy's own keep-alive/close choice.
  if (h['connection'] !== undefined) {
    expect(/x-private|upgrade/i.test(h['connection'])).toBeFalse();
  }
  expect(h['x-keep-me']).toEqual('kept');
  expect(h['host']).toEqual('hop.example.com');
  expect(h['x-forwarded-for']).toEqual('127.0.0.1');
  expect(h['x-forwarded-proto']).toEqual('http');
  expect(h['x-forwarded-host']).toEqual('hop.example.com');
  expect(h['x-forwarded-port']).toEqual(String(port));
  expect(h['via']).toEqual('1.1 smartproxy');
});

tap.test('headers: Host with a port is kept as sent and is X-Forwarded-Host', async () => {
  const { json } = await info(port, '/main/host', { host: `Hop.Example.com:${port}` });
  expect(json.headers.host).toEqual(`Hop.Example.com:${port}`);
  expect(json.headers['x-forwarded-host']).toEqual(`Hop.Example.com:${port}`);
});

tap.test('headers: route and target templates; the target wins for the same name', async () => {
  const { status, json, res } = await info(port, '/hdr/a/b?x=1&y=2', { host: `tpl.example.com:${port}` });
  expect(status).toEqual(200);
  const h = json.headers as Record<string, string>;
  expect(h['x-route']).toEqual(`hdr:tpl.example.com:/hdr/a/b:x=1&y=2:127.0.0.1:${port}`);
  expect(h['x-route-only']).toEqual('r');
  expect(h['x-target-only']).toEqual('t');
  expect(h['x-both']).toEqual('target');
  expect(res.headers['x-served-by']).toEqual('proxy');
  expect(res.headers['x-both-resp']).toEqual('target');
  expect(res.headers['x-backend']).toEqual('hdr');
});

tap.test('headers: hop-by-hop response headers are dropped', async () => {
  const res = await request(port, { path: '/hopresp' });
  expect(res.status).toEqual(200);
  expect(res.text).toEqual('ok');
  expect(res.headers['x-normal-resp']).toEqual('yes');
  expect(res.headers['x-secret-resp']).toBeUndefined();
  expect(res.headers['keep-alive']).toBeUndefined();
  expect(res.headers['proxy-connection']).toBeUndefined();
  expect(res.headers['trailer']).toBeUndefined();
  expect(res.headers['upgrade']).toBeUndefined();
  if (res.headers['connection'] !== undefined) {
    expect(/x-secret-resp/i.test(String(res.headers['connection']))).toBeFalse();
  }
});

// ---------------------------------------------------------------------------------------------
// 4. Keep-alive and pooling
// ---------------------------------------------------------------------------------------------

tap.test('keep-alive: sequential requests on one client connection, pooled upstream', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const results: IResult[] = [];
    for (let i = 0; i < 6; i++) {
      results.push(await request(port, { path: `/pool/${i}`, agent }));
    }
    results.forEach((r, i) => {
      expect(r.status).toEqual(200);
      expect(JSON.parse(r.text).url).toEqual(`/pool/${i}`);
    });
    // The client connection was kept alive by the proxy.
    expect(results.slice(1).every((r) => r.reusedSocket)).toBeTrue();
    expect(b.pool.requests.length).toEqual(6);
    expect(b.pool.connections).toBeLessThan(6);
    expect(b.pool.connections).toBeGreaterThan(0);
  } finally {
    agent.destroy();
  }
});

// ---------------------------------------------------------------------------------------------
// 5. Streaming
// ---------------------------------------------------------------------------------------------

tap.test('streaming: a 5 MiB request body is echoed intact', async () => {
  const body = randomBytes(5 * MiB);
  const echoed = await request(port, { method: 'POST', path: '/main/echo', body, headers: { 'content-type': 'application/octet-stream' } });
  expect(echoed.status).toEqual(200);
  expect(echoed.body.length).toEqual(body.length);
  expect(sha256(echoed.body)).toEqual(sha256(body));
});

tap.test('streaming: a 5 MiB chunked request body (no Content-Length) is echoed intact', async () => {
  const body = randomBytes(5 * MiB);
  const echoed = await new Promise<Buffer>((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method: 'POST', path: '/main/echo', headers: { host: 'test.local' }, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () => resolve(Buffer.concat(chunks)));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    for (let off = 0; off < body.length; off += 300 * 1024) req.write(body.subarray(off, off + 300 * 1024));
    req.end();
  });
  expect(echoed.length).toEqual(body.length);
  expect(sha256(echoed)).toEqual(sha256(body));
});

tap.test('streaming: a 5 MiB response streams through', async () => {
  const res = await request(port, { path: '/main/big' });
  expect(res.status).toEqual(200);
  expect(res.body.length).toEqual(BIG_RESPONSE.length);
  expect(sha256(res.body)).toEqual(sha256(BIG_RESPONSE));
});

// ---------------------------------------------------------------------------------------------
// 6. Failures
// ---------------------------------------------------------------------------------------------

tap.test('failures: a refused backend connection → 502 with a short text body', async () => {
  const res = await request(port, { path: '/refused' });
  expect(res.status).toEqual(502);
  expect(res.text.length).toBeGreaterThan(0);
  expect(res.text.length).toBeLessThan(512);
});

tap.test('failures: a backend that never answers → 504 after responseMs', async () => {
  const started = Date.now();
  const res = await request(port, { path: '/slow' });
  const took = Date.now() - started;
  expect(res.status).toEqual(504);
  expect(took).toBeGreaterThanOrEqual(250);
  expect(took).toBeLessThan(3000);
});

tap.test('failures: a truncated backend response is not passed off as complete; the proxy serves on', async () => {
  const outcome = await new Promise<{ status?: number; body: string; complete: boolean; error?: string }>((resolve) => {
    let settled = false;
    const done = (v: { status?: number; body: string; complete: boolean; error?: string }): void => {
      if (!settled) {
        settled = true;
        resolve(v);
      }
    };
    const req = http.request({ host: '127.0.0.1', port, path: '/garbage', headers: { host: 'test.local' }, agent: false }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => done({ status: res.statusCode, body, complete: res.complete }));
      res.on('error', (e) => done({ status: res.statusCode, body, complete: false, error: e.message }));
      res.on('aborted', () => done({ status: res.statusCode, body, complete: false, error: 'aborted' }));
      res.on('close', () => done({ status: res.statusCode, body, complete: res.complete }));
    });
    req.setTimeout(5000, () => req.destroy(new Error('client timeout')));
    req.on('error', (e) => done({ body: '', complete: false, error: e.message }));
    req.end();
  });
  // Acceptable: a client-side error, a 502, or a 200 whose body was cut short (not complete).
  const passedOffAsComplete = outcome.status === 200 && outcome.complete && outcome.body.length === 100;
  expect(passedOffAsComplete).toBeFalse();
  expect(outcome.error === 'client timeout').toBeFalse();
  if (outcome.status !== undefined && outcome.status !== 200) expect(outcome.status).toEqual(502);
  // The next request is served fine.
  expect((await info(port, '/api')).json?.name).toEqual('exact');
});

tap.test('failures: activeConnections returns to 0 after the clients close', async () => {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to return to 0');
});

// ---------------------------------------------------------------------------------------------
// 7. Request smuggling
// ---------------------------------------------------------------------------------------------

tap.test('smuggling: Content-Length together with Transfer-Encoding → 400 and close, backend untouched', async () => {
  const before = b.smuggle.requests.length;
  const { data, closed } = await rawExchange(
    port,
    'POST /smuggle HTTP/1.1\r\nHost: test.local\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n' +
      'GET /smuggle?second HTTP/1.1\r\nHost: test.local\r\n\r\n',
    3000,
  );
  if (!data.startsWith('HTTP/1.1 400') || !closed) {
    await sleep(100);
    console.log('smuggling reply:', JSON.stringify(data.slice(0, 600)), 'closed:', closed);
    console.log('backend saw:', JSON.stringify(b.smuggle.requests.slice(before)));
  }
  expect(data.startsWith('HTTP/1.1 400')).toBeTrue();
  expect(closed).toBeTrue();
  await sleep(100);
  expect(b.smuggle.requests.length).toEqual(before);
  // The proxy still serves.
  expect((await info(port, '/smuggle')).json?.name).toEqual('smuggle');
});

// ---------------------------------------------------------------------------------------------
// 8. Header too large
// ---------------------------------------------------------------------------------------------

tap.test('limits: a 100 KiB request header → 431; the proxy keeps working', async () => {
  const before = b.main.requests.length;
  const { data } = await rawExchange(
    port,
    `GET /main/large HTTP/1.1\r\nHost: test.local\r\nX-Big: ${'a'.repeat(100 * 1024)}\r\n\r\n`,
    3000,
  );
  expect(data.startsWith('HTTP/1.1 431')).toBeTrue();
  expect(b.main.requests.length).toEqual(before);
  expect((await info(port, '/main/after-large')).json?.name).toEqual('main');
});

// ---------------------------------------------------------------------------------------------
// 9. HTTP/2 prior knowledge from the client (h2c)
// ---------------------------------------------------------------------------------------------

tap.test('h2c: 20 concurrent streams on one prior-knowledge connection, HTTP/1.1 backend', async () => {
  const client = http2.connect(`http://app.example.com:${port}`, { createConnection: () => net.connect(port, '127.0.0.1') });
  client.on('error', () => undefined);
  try {
    const one = (i: number): Promise<{ status: number; body: string }> =>
      new Promise((resolve, reject) => {
        const stream = client.request({ ':path': `/h2c/${i}?n=${i}`, ':method': 'GET' });
        let status = 0;
        let body = '';
        stream.on('response', (headers) => (status = Number(headers[':status'])));
        stream.on('data', (d: Buffer) => (body += d.toString()));
        stream.on('end', () => resolve({ status, body }));
        stream.on('error', reject);
        stream.end();
      });
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => one(i)));
    results.forEach((r, i) => {
      expect(r.status).toEqual(200);
      const json = JSON.parse(r.body);
      expect(json.name).toEqual('app');
      expect(json.url).toEqual(`/h2c/${i}?n=${i}`);
      expect(String(json.headers.host).toLowerCase().startsWith('app.example.com')).toBeTrue();
      expect(json.headers['x-forwarded-proto']).toEqual('http');
    });
  } finally {
    client.destroy();
  }
});

tap.test('h2c: curl --http2-prior-knowledge', async () => {
  const { stdout } = await execFileAsync('curl', [
    '-s', '--http2-prior-knowledge', '-H', 'Host: app.example.com', `http://127.0.0.1:${port}/h2c/curl`,
  ]);
  const json = JSON.parse(stdout);
  expect(json.name).toEqual('app');
  expect(json.url).toEqual('/h2c/curl');
});

// ---------------------------------------------------------------------------------------------
// 10. HTTP/2 towards the backend
// ---------------------------------------------------------------------------------------------

tap.test("backendProtocol 'http2': requests reach an h2c backend as HTTP/2", async () => {
  const get = await request(port, { path: '/h2backend/a?b=1', host: 'h2.example.com' });
  expect(get.status).toEqual(200);
  const g = JSON.parse(get.text);
  expect(g.httpVersion).toEqual('2.0');
  expect(g.method).toEqual('GET');
  expect(g.url).toEqual('/h2backend/a?b=1');

  const body = randomBytes(256 * 1024);
  const post = await request(port, { method: 'POST', path: '/h2backend/upload', host: 'h2.example.com', body });
  expect(post.status).toEqual(200);
  const p = JSON.parse(post.text);
  expect(p.httpVersion).toEqual('2.0');
  expect(p.method).toEqual('POST');
  expect(p.bodyLength).toEqual(body.length);
  expect(p.bodySha).toEqual(sha256(body));

  // Several concurrent requests, all over HTTP/2.
  const many = await Promise.all(Array.from({ length: 8 }, (_, i) => request(port, { path: `/h2backend/c${i}` })));
  many.forEach((r, i) => {
    expect(r.status).toEqual(200);
    const j = JSON.parse(r.text);
    expect(j.httpVersion).toEqual('2.0');
    expect(j.url).toEqual(`/h2backend/c${i}`);
  });
});

// ---------------------------------------------------------------------------------------------
// 11. WebSocket
// ---------------------------------------------------------------------------------------------

function upgrade(path: string): Promise<{ kind: 'upgrade'; res: http.IncomingMessage; socket: net.Socket; head: Buffer } | { kind: 'response'; status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const key = randomBytes(16).toString('base64');
    const req = http.request({
      host: '127.0.0.1',
      port,
      path,
      agent: false,
      headers: {
        host: 'ws.example.com',
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-key': key,
        'sec-websocket-version': '13',
      },
    });
    req.setTimeout(5000, () => req.destroy(new Error('client timeout')));
    req.on('upgrade', (res, socket, head) => {
      expect(res.headers['sec-websocket-accept']).toEqual(wsAccept(key));
      resolve({ kind: 'upgrade', res, socket, head });
    });
    req.on('response', (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ kind: 'response', status: res.statusCode!, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

tap.test('websocket: the upgrade is proxied and bytes echo through the tunnel', async () => {
  const result = await upgrade('/ws/echo');
  expect(result.kind).toEqual('upgrade');
  if (result.kind !== 'upgrade') return;
  expect(result.res.statusCode).toEqual(101);
  const socket = result.socket;
  try {
    const seen = wsSeen[wsSeen.length - 1];
    expect(String(seen.upgrade).toLowerCase()).toEqual('websocket');
    expect(String(seen.connection).toLowerCase().includes('upgrade')).toBeTrue();
    let received = result.head.toString('latin1');
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    const payload = 'hello through the proxy ' + 'x'.repeat(70000);
    socket.write(payload);
    await waitFor(() => received.length >= payload.length, 5000, 'the echo');
    expect(received).toEqual(payload);
    received = '';
    socket.write('second');
    await waitFor(() => received.length >= 6, 5000, 'the second echo');
    expect(received).toEqual('second');
  } finally {
    socket.destroy();
  }
});

tap.test('websocket: a backend that refuses the upgrade with 403 → the client sees 403, no tunnel', async () => {
  const result = await upgrade('/ws-deny');
  expect(result.kind).toEqual('response');
  if (result.kind !== 'response') {
    result.socket.destroy();
    return;
  }
  expect(result.status).toEqual(403);
  expect(result.body).toEqual('denied');
});

tap.test('after all of it: activeConnections back to 0', async () => {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to return to 0');
});

// ---------------------------------------------------------------------------------------------
// 12. stop()
// ---------------------------------------------------------------------------------------------

tap.test('stop(): returns quickly with an idle keep-alive client connection, and closes it', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  let clientSocket: net.Socket | undefined;
  try {
    const res = await new Promise<IResult>((resolve, reject) => {
      const req = http.request(
        { host: '127.0.0.1', port: stopPort, path: '/idle', headers: { host: 'stop.example.com' }, agent },
        (r) => {
          const chunks: Buffer[] = [];
          r.on('data', (d: Buffer) => chunks.push(d));
          r.on('end', () => {
            const body = Buffer.concat(chunks);
            resolve({ status: r.statusCode!, headers: r.headers, body, text: body.toString(), reusedSocket: req.reusedSocket });
          });
        },
      );
      req.on('socket', (s: net.Socket) => (clientSocket = s));
      req.on('error', reject);
      req.end();
    });
    expect(res.status).toEqual(200);
    expect(JSON.parse(res.text).name).toEqual('stop');
    await sleep(100);
    expect(clientSocket).toBeTruthy();
    expect(clientSocket!.destroyed).toBeFalse();
    const closed = new Promise<boolean>((resolve) => {
      clientSocket!.on('error', () => undefined);
      clientSocket!.once('close', () => resolve(true));
    });
    const started = Date.now();
    await stopProxy.stop();
    const took = Date.now() - started;
    expect(took).toBeLessThan(2000);
    const wasClosed = await Promise.race([closed, sleep(2000).then(() => false)]);
    expect(wasClosed).toBeTrue();
  } finally {
    agent.destroy();
    clientSocket?.destroy();
  }
});

tap.test('stop', async () => {
  await proxy.stop();
  for (const n of names) await b[n].close();
  await stopBackend.close();
  await hopResponder.close();
  await silent.close();
  await garbage.close();
  for (const s of h2Sessions) s.destroy();
  await new Promise<void>((resolve) => h2Backend.close(() => resolve()));
  for (const s of wsSockets) s.destroy();
  await new Promise<void>((resolve) => wsBackend.close(() => resolve()));
});

tap.start({ throwOnError: true });
