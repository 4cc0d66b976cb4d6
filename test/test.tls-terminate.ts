// TLS terminated in the proxy (Rust): many routes on one port chosen by SNI next to a passthrough
// route, HTTP/1.1 and HTTP/2 clients (Node and curl) in front of plain HTTP/1.1 backends, HTTP/2
// multiplexing, misdirected requests (421), re-encryption towards TLS backends (verification, name
// checks, ALPN towards the backend), per-route TLS versions, session resumption, broken handshakes,
// WebSocket over TLS and certificate config errors. Every client verifies the certificate it gets.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as https from 'node:https';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { X509Certificate, createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort, rejection, sleep, waitFor } from './helpers/net.js';
import { createTestCa, startTlsBackend } from './helpers/tls.js';

const execFileAsync = promisify(execFile);

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

const ca = createTestCa();
const otherCa = createTestCa(); // not trusted by the proxy
const caDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-tls-terminate-'));
process.on('exit', () => rmSync(caDir, { recursive: true, force: true }));
const caFile = path.join(caDir, 'ca.pem');
writeFileSync(caFile, ca.cert);

// Presented by the proxy.
const appCert = ca.issue(['app.example.com']);
const apiCert = ca.issue(['api.example.com']);
const reencFrontCert = ca.issue(['reenc.example.com', 'wrongname.example.com', 'insecure.example.com', 'untrusted.example.com', 'named.example.com', 'h2auto.example.com', 'h2h1.example.com']);
const tls13Cert = ca.issue(['tls13.example.com']);
// Presented by backends.
const ptBackendCert = ca.issue(['pt.example.com']);
const reencBackendCert = ca.issue(['reenc.example.com']);
const wrongNameBackendCert = ca.issue(['somewhere-else.example.com']);
const localhostBackendCert = ca.issue(['localhost']);
const untrustedBackendCert = otherCa.issue(['untrusted.example.com']);
const h2BackendCert = ca.issue(['h2auto.example.com', 'h2h1.example.com']);

const fingerprint = (pem: string): string => new X509Certificate(pem).fingerprint256;

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

interface IBackend {
  name: string;
  port: number;
  requests: number;
  close(): Promise<void>;
}

function wsAccept(key: string): string {
  return createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC11B65').digest('base64');
}

/** Answers with JSON describing the request as received; on /echo, echoes the body. */
function describe(name: string, req: http.IncomingMessage, res: http.ServerResponse, extra: Record<string, unknown> = {}): void {
  if (req.url!.startsWith('/echo')) {
    req.pipe(res);
    return;
  }
  req.resume();
  req.on('end', () => {
    res.setHeader('content-type', 'application/json');
    res.setHeader('x-backend', name);
    res.end(JSON.stringify({ name, method: req.method, url: req.url, httpVersion: req.httpVersion, headers: req.headers, ...extra }));
  });
}

/** A plain HTTP/1.1 backend; it also accepts WebSocket upgrades and echoes the raw tunnel. */
async function plainBackend(name: string): Promise<IBackend> {
  const sockets = new Set<net.Socket>();
  const result: IBackend = { name, port: 0, requests: 0, close: async () => undefined };
  const server = http.createServer((req, res) => {
    result.requests++;
    describe(name, req, res);
  });
  server.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write(
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        `X-Forwarded-Proto-Seen: ${String(req.headers['x-forwarded-proto'])}\r\n` +
        `Sec-WebSocket-Accept: ${wsAccept(String(req.headers['sec-websocket-key']))}\r\n\r\n`,
    );
    if (head.length) socket.write(head);
    socket.pipe(socket);
  });
  server.on('connection', (socket: net.Socket) => {
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

/** An HTTPS (HTTP/1.1) backend reporting the SNI it was reached with. */
async function httpsBackend(name: string, creds: { key: string; cert: string }): Promise<IBackend> {
  const sockets = new Set<net.Socket>();
  const result: IBackend = { name, port: 0, requests: 0, close: async () => undefined };
  const server = https.createServer({ key: creds.key, cert: creds.cert }, (req, res) => {
    result.requests++;
    describe(name, req, res, { servername: (req.socket as tls.TLSSocket & { servername?: string }).servername ?? null });
  });
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  result.port = (server.address() as AddressInfo).port;
  result.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return result;
}

/** An HTTP/2 TLS backend that also speaks HTTP/1.1 (ALPN), reporting the version it was spoken to with. */
async function h2TlsBackend(name: string, creds: { key: string; cert: string }): Promise<IBackend> {
  const sockets = new Set<net.Socket>();
  const result: IBackend = { name, port: 0, requests: 0, close: async () => undefined };
  const server = http2.createSecureServer({ key: creds.key, cert: creds.cert, allowHTTP1: true }, (req, res) => {
    result.requests++;
    req.resume();
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ name, httpVersion: req.httpVersion, url: req.url, authority: req.headers[':authority'] ?? null, host: req.headers.host ?? null }));
    });
  });
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  result.port = (server.address() as AddressInfo).port;
  result.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return result;
}

const appBackend = await plainBackend('app');
const apiBackend = await plainBackend('api');
const tls13Backend = await plainBackend('tls13');
const ptBackend = await startTlsBackend('pt', ptBackendCert);
const reencBackend = await httpsBackend('reenc', reencBackendCert);
const wrongNameBackend = await httpsBackend('wrongname', wrongNameBackendCert);
const untrustedBackend = await httpsBackend('untrusted', untrustedBackendCert);
const localhostBackend = await httpsBackend('localhost', localhostBackendCert);
const h2Backend = await h2TlsBackend('h2', h2BackendCert);

const port = await freePort();
const local = (b: { port: number }): { host: string; port: number } => ({ host: '127.0.0.1', port: b.port });

const proxy = new SmartProxy({
  gracefulShutdownTimeout: 500,
  routes: [
    {
      name: 'app',
      match: { ports: port, domains: 'app.example.com' },
      action: { type: 'forward', target: local(appBackend), tls: { mode: 'terminate', certificate: appCert } },
    },
    {
      name: 'api',
      match: { ports: port, domains: 'api.example.com' },
      action: { type: 'forward', target: local(apiBackend), tls: { mode: 'terminate', certificate: apiCert } },
    },
    {
      name: 'pt',
      match: { ports: port, domains: 'pt.example.com' },
      action: { type: 'forward', target: local(ptBackend), tls: { mode: 'passthrough' } },
    },
    {
      name: 'reenc',
      match: { ports: port, domains: 'reenc.example.com' },
      action: { type: 'forward', target: local(reencBackend), tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } } },
    },
    {
      name: 'reenc-wrongname',
      match: { ports: port, domains: 'wrongname.example.com' },
      action: { type: 'forward', target: local(wrongNameBackend), tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } } },
    },
    {
      name: 'reenc-insecure',
      match: { ports: port, domains: 'insecure.example.com' },
      action: {
        type: 'forward',
        target: local(wrongNameBackend),
        tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert }, rejectUnauthorized: false },
      },
    },
    {
      name: 'reenc-untrusted',
      match: { ports: port, domains: 'untrusted.example.com' },
      action: { type: 'forward', target: local(untrustedBackend), tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } } },
    },
    {
      name: 'reenc-named',
      match: { ports: port, domains: 'named.example.com' },
      action: {
        type: 'forward',
        target: { host: 'localhost', port: localhostBackend.port },
        tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } },
      },
    },
    {
      name: 'h2auto',
      match: { ports: port, domains: 'h2auto.example.com' },
      action: {
        type: 'forward',
        target: local(h2Backend),
        tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } },
        options: { backendProtocol: 'auto' },
      },
    },
    {
      name: 'h2h1',
      match: { ports: port, domains: 'h2h1.example.com' },
      action: {
        type: 'forward',
        target: local(h2Backend),
        tls: { mode: 'terminate-and-reencrypt', certificate: { ...reencFrontCert, ca: ca.cert } },
        options: { backendProtocol: 'http1' },
      },
    },
    {
      name: 'tls13',
      match: { ports: port, domains: 'tls13.example.com' },
      action: { type: 'forward', target: local(tls13Backend), tls: { mode: 'terminate', certificate: tls13Cert, versions: ['TLSv1.3'] } },
    },
  ],
});

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

interface IHttpsResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: any;
  peerFingerprint: string;
  tlsVersion: string | null;
  reused: boolean;
}

/** An HTTPS/1.1 request to the proxy: SNI `servername`, verified against the test CA. */
function httpsRequest(
  servername: string,
  opts: { path?: string; host?: string; method?: string; body?: string; headers?: Record<string, string>; agent?: https.Agent | false; maxVersion?: tls.SecureVersion } = {},
): Promise<IHttpsResult> {
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        port,
        servername,
        ca: ca.cert,
        rejectUnauthorized: true,
        maxVersion: opts.maxVersion,
        method: opts.method ?? 'GET',
        path: opts.path ?? '/',
        headers: { host: opts.host ?? `${servername}:${port}`, ...(opts.headers ?? {}) },
        agent: opts.agent ?? false,
      },
      (res) => {
        const socket = res.socket as tls.TLSSocket;
        const peerFingerprint = socket.getPeerCertificate().fingerprint256;
        const tlsVersion = socket.getProtocol();
        const reused = socket.isSessionReused();
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('error', reject);
        res.on('end', () => {
          let json: any = null;
          try {
            json = JSON.parse(text);
          } catch {
            json = null;
          }
          resolve({ status: res.statusCode!, headers: res.headers, text, json, peerFingerprint, tlsVersion, reused });
        });
      },
    );
    req.setTimeout(10000, () => req.destroy(new Error('client timeout')));
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** An HTTP/2 session to the proxy over TLS (ALPN h2), SNI `servername`, verified against the test CA. */
function h2Connect(servername: string): Promise<http2.ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`https://${servername}:${port}`, {
      createConnection: () => tls.connect({ host: '127.0.0.1', port, servername, ca: ca.cert, rejectUnauthorized: true, ALPNProtocols: ['h2'] }),
    });
    session.once('connect', () => resolve(session));
    session.once('error', reject);
  });
}

function h2Request(session: http2.ClientHttp2Session, reqPath: string, headers: http2.OutgoingHttpHeaders = {}): Promise<{ status: number; text: string; json: any }> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': reqPath, ':method': 'GET', ...headers });
    let status = 0;
    let text = '';
    stream.setTimeout(10000, () => stream.close(http2.constants.NGHTTP2_CANCEL));
    stream.on('response', (h) => (status = Number(h[':status'])));
    stream.on('data', (d: Buffer) => (text += d.toString()));
    stream.on('end', () => {
      let json: any = null;
      try {
        json = JSON.parse(text);
      } catch {
        json = null;
      }
      resolve({ status, text, json });
    });
    stream.on('error', reject);
    stream.end();
  });
}

/** curl through the proxy: `--resolve name:port:127.0.0.1`, the test CA, extra flags. */
async function curl(name: string, reqPath: string, flags: string[]): Promise<{ status: number; httpVersion: string; body: string }> {
  const { stdout } = await execFileAsync('curl', [
    '-s', '-S', '--max-time', '10', '--cacert', caFile, '--resolve', `${name}:${port}:127.0.0.1`, ...flags,
    '-w', '\n%{http_code} %{http_version}', `https://${name}:${port}${reqPath}`,
  ]);
  const nl = stdout.lastIndexOf('\n');
  const [code, version] = stdout.slice(nl + 1).trim().split(' ');
  return { status: Number(code), httpVersion: version, body: stdout.slice(0, nl) };
}

interface ITlsExchange {
  data: string;
  peerFingerprint: string;
  protocol: string | null;
  reused: boolean;
  session?: Buffer;
}

/**
 * A raw TLS client (verified against the test CA): writes `payload` once connected and collects
 * everything until the server closes (or the first line when `firstLine`). Rejects on a failed handshake.
 */
function tlsExchange(
  servername: string,
  opts: { payload?: string; firstLine?: boolean; session?: Buffer; minVersion?: tls.SecureVersion; maxVersion?: tls.SecureVersion } = {},
): Promise<ITlsExchange> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host: '127.0.0.1',
      port,
      servername,
      ca: ca.cert,
      rejectUnauthorized: true,
      session: opts.session,
      minVersion: opts.minVersion,
      maxVersion: opts.maxVersion,
    });
    let data = '';
    let session: Buffer | undefined;
    let peerFingerprint = '';
    let protocol: string | null = null;
    let reused = false;
    let connected = false;
    let settled = false;
    const timer = setTimeout(() => socket.destroy(new Error('client timeout')), 10000);
    const finish = (err?: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err && !connected) reject(err);
      else resolve({ data, peerFingerprint, protocol, reused, session });
    };
    socket.on('session', (s: Buffer) => (session = s));
    socket.on('secureConnect', () => {
      connected = true;
      peerFingerprint = socket.getPeerCertificate().fingerprint256;
      protocol = socket.getProtocol();
      reused = socket.isSessionReused();
      if (opts.payload !== undefined) socket.write(opts.payload);
    });
    socket.on('data', (d: Buffer) => {
      data += d.toString('latin1');
      if (opts.firstLine && data.includes('\n')) {
        data = data.slice(0, data.indexOf('\n'));
        socket.end();
        finish();
      }
    });
    socket.on('error', (err) => finish(err));
    socket.on('close', () => finish(connected ? undefined : new Error('closed before the handshake completed')));
  });
}

const httpGet = (host: string, reqPath = '/'): string => `GET ${reqPath} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`;

/** Plain TCP: writes `payload`, resolves whether the proxy closed the connection within `timeoutMs`. */
function rawSend(payload: Buffer, timeoutMs = 5000): Promise<{ closed: boolean; data: Buffer }> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(payload));
    const chunks: Buffer[] = [];
    let done = false;
    const finish = (closed: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ closed, data: Buffer.concat(chunks) });
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    socket.on('data', (d: Buffer) => chunks.push(d));
    socket.on('error', () => finish(true));
    socket.on('end', () => finish(true));
    socket.on('close', () => finish(true));
  });
}

const reasons = (): Record<string, number> => ({ ...proxy.getStatistics().terminationReasons });
function reasonDiff(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) {
    const d = v - (before[k] ?? 0);
    if (d !== 0) out[k] = d;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

tap.test('start', async () => {
  await proxy.start();
  expect(proxy.getListeningPorts()).toContain(port);
});

// 1. Many routes on one port, chosen by SNI.

tap.test('sni: app.example.com and api.example.com each get their own certificate and backend', async () => {
  const app = await httpsRequest('app.example.com', { path: '/one' });
  expect(app.status).toEqual(200);
  expect(app.json?.name).toEqual('app');
  expect(app.peerFingerprint).toEqual(fingerprint(appCert.cert));
  const api = await httpsRequest('api.example.com', { path: '/two' });
  expect(api.status).toEqual(200);
  expect(api.json?.name).toEqual('api');
  expect(api.peerFingerprint).toEqual(fingerprint(apiCert.cert));
});

tap.test('sni: the passthrough route on the same port relays to the backend, whose certificate the client sees', async () => {
  const pt = await tlsExchange('pt.example.com', { firstLine: true });
  expect(pt.data).toEqual('pt:pt.example.com');
  expect(pt.peerFingerprint).toEqual(fingerprint(ptBackendCert.cert));
  expect(pt.peerFingerprint === fingerprint(appCert.cert)).toBeFalse();
  // And the terminating routes on the same port still serve with the proxy's certificate.
  const app = await tlsExchange('app.example.com', { payload: httpGet('app.example.com', '/raw') });
  expect(app.peerFingerprint).toEqual(fingerprint(appCert.cert));
  expect(app.data.startsWith('HTTP/1.1 200')).toBeTrue();
  expect(app.data).toInclude('"name":"app"');
});

tap.test('sni: a client expecting another name than the certificate fails verification', async () => {
  // SNI app.example.com but verifying for api.example.com: the proxy presents app's certificate.
  const err = await rejection(
    new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port, servername: 'app.example.com', ca: ca.cert, checkServerIdentity: (_h, cert) => tls.checkServerIdentity('api.example.com', cert) });
      s.on('secureConnect', () => {
        s.destroy();
        resolve(undefined);
      });
      s.on('error', reject);
    }),
  );
  expect(err?.message ?? '').toMatch(/altnames|Hostname\/IP does not match/i);
});

// 2. HTTP/1.1 and HTTP/2 clients, plain HTTP/1.1 backend.

tap.test('http1.1 (node https): x-forwarded-proto https, Host as sent, path and query kept', async () => {
  const res = await httpsRequest('app.example.com', { path: '/h1/path?q=1&r=2', host: `app.example.com:${port}` });
  expect(res.status).toEqual(200);
  expect(res.json.httpVersion).toEqual('1.1');
  expect(res.json.url).toEqual('/h1/path?q=1&r=2');
  expect(res.json.headers.host).toEqual(`app.example.com:${port}`);
  expect(res.json.headers['x-forwarded-proto']).toEqual('https');
  expect(res.json.headers['x-forwarded-port']).toEqual(String(port));
  expect(res.json.headers['x-forwarded-for']).toEqual('127.0.0.1');
  expect(res.headers['x-backend']).toEqual('app');
  // A Host without the port, in other letters, is the same route.
  const bare = await httpsRequest('app.example.com', { path: '/bare', host: 'APP.example.com' });
  expect(bare.status).toEqual(200);
  expect(bare.json.headers.host).toEqual('APP.example.com');
});

tap.test('http1.1 (node https): a POST body goes through intact', async () => {
  const body = randomBytes(200 * 1024).toString('base64');
  const res = await httpsRequest('app.example.com', { method: 'POST', path: '/echo', body, headers: { 'content-type': 'text/plain' } });
  expect(res.status).toEqual(200);
  expect(res.text.length).toEqual(body.length);
  expect(res.text === body).toBeTrue();
});

tap.test('http2 (node http2): the backend gets HTTP/1.1 with Host, path and x-forwarded-proto', async () => {
  const session = await h2Connect('app.example.com');
  try {
    expect((session.socket as tls.TLSSocket).alpnProtocol).toEqual('h2');
    const res = await h2Request(session, '/h2/path?x=y');
    expect(res.status).toEqual(200);
    expect(res.json.name).toEqual('app');
    expect(res.json.httpVersion).toEqual('1.1');
    expect(res.json.url).toEqual('/h2/path?x=y');
    expect(res.json.headers.host).toEqual(`app.example.com:${port}`);
    expect(res.json.headers['x-forwarded-proto']).toEqual('https');
  } finally {
    session.close();
  }
});

tap.test('curl --http1.1 and --http2 over terminated TLS', async () => {
  const h1 = await curl('app.example.com', '/curl/h1?a=b', ['--http1.1']);
  expect(h1.status).toEqual(200);
  expect(h1.httpVersion).toEqual('1.1');
  const j1 = JSON.parse(h1.body);
  expect(j1.name).toEqual('app');
  expect(j1.url).toEqual('/curl/h1?a=b');
  expect(j1.headers.host).toEqual(`app.example.com:${port}`);
  expect(j1.headers['x-forwarded-proto']).toEqual('https');

  const h2 = await curl('api.example.com', '/curl/h2', ['--http2']);
  expect(h2.status).toEqual(200);
  expect(h2.httpVersion).toEqual('2');
  const j2 = JSON.parse(h2.body);
  expect(j2.name).toEqual('api');
  expect(j2.url).toEqual('/curl/h2');
  expect(j2.httpVersion).toEqual('1.1');
  expect(j2.headers.host).toEqual(`api.example.com:${port}`);
  expect(j2.headers['x-forwarded-proto']).toEqual('https');
});

// 3. HTTP/2 multiplexing.

tap.test('http2: 50 concurrent streams on one session, each answered correctly', async () => {
  const session = await h2Connect('app.example.com');
  try {
    const before = appBackend.requests;
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => h2Request(session, `/mux/${i}?i=${i}`)));
    results.forEach((r, i) => {
      expect(r.status).toEqual(200);
      expect(r.json?.name).toEqual('app');
      expect(r.json?.url).toEqual(`/mux/${i}?i=${i}`);
      expect(r.json?.headers['x-forwarded-proto']).toEqual('https');
    });
    expect(appBackend.requests - before).toEqual(50);
  } finally {
    session.close();
  }
});

// 4. Misdirected requests.

tap.test('misdirected: on a connection made for app.example.com, a request for api.example.com → 421', async () => {
  const before = apiBackend.requests;
  const h1 = await httpsRequest('app.example.com', { path: '/x', host: 'api.example.com' });
  expect(h1.status).toEqual(421);
  const session = await h2Connect('app.example.com');
  try {
    const h2 = await h2Request(session, '/x', { ':authority': `api.example.com:${port}` });
    expect(h2.status).toEqual(421);
    // The same session still serves its own host.
    const ok = await h2Request(session, '/after-421');
    expect(ok.status).toEqual(200);
    expect(ok.json?.name).toEqual('app');
  } finally {
    session.close();
  }
  expect(apiBackend.requests).toEqual(before);
});

// 5. Re-encryption.

tap.test('re-encrypt: a backend with a certificate for the request domain signed by route ca → 200', async () => {
  const res = await httpsRequest('reenc.example.com', { path: '/re?x=1' });
  expect(res.status).toEqual(200);
  expect(res.peerFingerprint).toEqual(fingerprint(reencFrontCert.cert));
  expect(res.json.name).toEqual('reenc');
  expect(res.json.url).toEqual('/re?x=1');
  expect(res.json.headers['x-forwarded-proto']).toEqual('https');
  // The target host is an IP address: the SNI towards the backend is the request's domain.
  expect(res.json.servername).toEqual('reenc.example.com');
});

tap.test('re-encrypt: a target host given by name is the SNI and the verified name towards the backend', async () => {
  const res = await httpsRequest('named.example.com', { path: '/named' });
  expect(res.status).toEqual(200);
  expect(res.json.name).toEqual('localhost');
  expect(res.json.servername).toEqual('localhost');
  expect(res.json.headers.host).toEqual(`named.example.com:${port}`);
});

tap.test('re-encrypt: a backend certificate for another name → 502; the backend never sees the request', async () => {
  const before = wrongNameBackend.requests;
  const res = await httpsRequest('wrongname.example.com', { path: '/wrong' });
  expect(res.status).toEqual(502);
  expect(wrongNameBackend.requests).toEqual(before);
});

tap.test('re-encrypt: a backend certificate from a CA the route does not trust → 502', async () => {
  const before = untrustedBackend.requests;
  const res = await httpsRequest('untrusted.example.com', { path: '/untrusted' });
  expect(res.status).toEqual(502);
  expect(untrustedBackend.requests).toEqual(before);
});

tap.test('re-encrypt: rejectUnauthorized false accepts the wrong-name backend → 200', async () => {
  const res = await httpsRequest('insecure.example.com', { path: '/insecure' });
  expect(res.status).toEqual(200);
  expect(res.json.name).toEqual('wrongname');
  expect(res.json.url).toEqual('/insecure');
});

tap.test("re-encrypt: backendProtocol 'auto' speaks h2 to a backend offering it, 'http1' speaks HTTP/1.1", async () => {
  const auto = await httpsRequest('h2auto.example.com', { path: '/auto' });
  expect(auto.status).toEqual(200);
  expect(auto.json.httpVersion).toEqual('2.0');
  expect(auto.json.url).toEqual('/auto');
  const h1 = await httpsRequest('h2h1.example.com', { path: '/h1' });
  expect(h1.status).toEqual(200);
  expect(h1.json.httpVersion).toEqual('1.1');
  expect(h1.json.url).toEqual('/h1');
  // An HTTP/2 client in front of the 'auto' route: h2 on both sides.
  const session = await h2Connect('h2auto.example.com');
  try {
    const both = await Promise.all([h2Request(session, '/a1'), h2Request(session, '/a2')]);
    expect(both.map((r) => r.status)).toEqual([200, 200]);
    expect(both.map((r) => r.json.httpVersion)).toEqual(['2.0', '2.0']);
    expect(both.map((r) => r.json.url)).toEqual(['/a1', '/a2']);
  } finally {
    session.close();
  }
});

// 6. TLS versions.

tap.test("tls.versions ['TLSv1.3']: a TLSv1.2-only client fails the handshake, a TLSv1.3 client is served", async () => {
  const before = tls13Backend.requests;
  const err = await rejection(tlsExchange('tls13.example.com', { maxVersion: 'TLSv1.2', payload: httpGet('tls13.example.com') }));
  expect(err).toBeInstanceOf(Error);
  expect(tls13Backend.requests).toEqual(before);
  const ok = await tlsExchange('tls13.example.com', { minVersion: 'TLSv1.3', payload: httpGet('tls13.example.com', '/v13') });
  expect(ok.protocol).toEqual('TLSv1.3');
  expect(ok.data.startsWith('HTTP/1.1 200')).toBeTrue();
  expect(ok.data).toInclude('"name":"tls13"');
  // The restriction belongs to that route: app.example.com still accepts TLSv1.2.
  const app12 = await tlsExchange('app.example.com', { maxVersion: 'TLSv1.2', payload: httpGet('app.example.com', '/v12') });
  expect(app12.protocol).toEqual('TLSv1.2');
  expect(app12.data.startsWith('HTTP/1.1 200')).toBeTrue();
});

// 7. Session resumption.

tap.test('session resumption (TLSv1.3): a second connection with the first one\'s session is resumed', async () => {
  const first = await tlsExchange('app.example.com', { payload: httpGet('app.example.com', '/resume1') });
  expect(first.data.startsWith('HTTP/1.1 200')).toBeTrue();
  expect(first.protocol).toEqual('TLSv1.3');
  expect(first.reused).toBeFalse();
  expect(first.session).toBeInstanceOf(Buffer);
  const second = await tlsExchange('app.example.com', { payload: httpGet('app.example.com', '/resume2'), session: first.session });
  expect(second.reused).toBeTrue();
  expect(second.data.startsWith('HTTP/1.1 200')).toBeTrue();
  expect(second.data).toInclude('/resume2');
});

tap.test('session resumption (TLSv1.2): resumed as well', async () => {
  const first = await tlsExchange('app.example.com', { maxVersion: 'TLSv1.2', payload: httpGet('app.example.com', '/resume12a') });
  expect(first.protocol).toEqual('TLSv1.2');
  expect(first.session).toBeInstanceOf(Buffer);
  const second = await tlsExchange('app.example.com', { maxVersion: 'TLSv1.2', payload: httpGet('app.example.com', '/resume12b'), session: first.session });
  expect(second.reused).toBeTrue();
  expect(second.data.startsWith('HTTP/1.1 200')).toBeTrue();
});

tap.test('session resumption: an https.Agent reuses its cached session on a new connection', async () => {
  const agent = new https.Agent({ keepAlive: false, maxCachedSessions: 10 });
  try {
    const first = await httpsRequest('api.example.com', { path: '/agent1', agent });
    expect(first.status).toEqual(200);
    await sleep(50); // the TLSv1.3 ticket arrives after the handshake
    const second = await httpsRequest('api.example.com', { path: '/agent2', agent });
    expect(second.status).toEqual(200);
    expect(second.reused).toBeTrue();
  } finally {
    agent.destroy();
  }
});

// 9. WebSocket over terminated TLS.

tap.test('wss: an upgrade over terminated TLS reaches the backend and the tunnel echoes', async () => {
  const key = randomBytes(16).toString('base64');
  const { res, socket, head } = await new Promise<{ res: http.IncomingMessage; socket: net.Socket; head: Buffer }>((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1',
      port,
      servername: 'app.example.com',
      ca: ca.cert,
      rejectUnauthorized: true,
      path: '/ws/chat',
      agent: false,
      headers: {
        host: `app.example.com:${port}`,
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-key': key,
        'sec-websocket-version': '13',
      },
    });
    req.setTimeout(10000, () => req.destroy(new Error('client timeout')));
    req.on('upgrade', (r, s, h) => resolve({ res: r, socket: s, head: h }));
    req.on('response', (r) => reject(new Error(`no upgrade: ${r.statusCode}`)));
    req.on('error', reject);
    req.end();
  });
  try {
    expect(res.statusCode).toEqual(101);
    expect(res.headers['sec-websocket-accept']).toEqual(wsAccept(key));
    expect(res.headers['x-forwarded-proto-seen']).toEqual('https');
    expect((socket as tls.TLSSocket).getPeerCertificate().fingerprint256).toEqual(fingerprint(appCert.cert));
    let received = head.toString('latin1');
    socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
    const payload = 'over wss ' + 'y'.repeat(70000);
    socket.write(payload);
    await waitFor(() => received.length >= payload.length, 5000, 'the echo');
    expect(received).toEqual(payload);
    received = '';
    socket.write('again');
    await waitFor(() => received.length >= 5, 5000, 'the second echo');
    expect(received).toEqual('again');
  } finally {
    socket.destroy();
  }
});

// 8. Broken clients.

tap.test('broken clients: garbage bytes, a bad TLS record and an unknown SNI are closed; reasons are counted', async () => {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to be 0 first');

  const r0 = reasons();
  const garbage = await rawSend(Buffer.from([0x00, 0xff, 0x13, 0x37, ...Buffer.from('\r\nnot tls, not http at all\r\n\r\n')]));
  expect(garbage.closed).toBeTrue();
  expect(garbage.data.length).toEqual(0);
  await sleep(100);
  const r1 = reasons();
  const garbageDiff = reasonDiff(r0, r1);
  console.log('termination reasons after garbage bytes:', JSON.stringify(garbageDiff));
  expect((garbageDiff.no_route ?? 0) + (garbageDiff.invalid_tls ?? 0) + (garbageDiff.invalid_http ?? 0)).toEqual(1);

  // A complete TLS handshake record holding a complete but malformed 8-byte ClientHello (a real one
  // has at least a version, 32 random bytes, a session id, cipher suites and compression methods).
  const badHello = await rawSend(Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x00, 0x0c, 0x01, 0x00, 0x00, 0x08]), Buffer.from('junkjunk')]));
  expect(badHello.closed).toBeTrue();
  await sleep(100);
  const r2 = reasons();
  const badHelloDiff = reasonDiff(r1, r2);
  console.log('termination reasons after a malformed ClientHello:', JSON.stringify(badHelloDiff));
  expect((badHelloDiff.invalid_tls ?? 0) + (badHelloDiff.tls_handshake_failed ?? 0)).toEqual(1);

  const unknown = await rejection(tlsExchange('unknown.example.com', { payload: httpGet('unknown.example.com') }));
  expect(unknown?.message ?? '').toMatch(/unrecognized name|alert number 112/i);
  await sleep(100);
  const r3 = reasons();
  const unknownDiff = reasonDiff(r2, r3);
  console.log('termination reasons after an unknown SNI:', JSON.stringify(unknownDiff));
  expect(unknownDiff.no_route).toEqual(1);

  // A client that does not trust the proxy's certificate aborts the handshake.
  const untrusting = await rejection(
    new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port, servername: 'app.example.com', ca: otherCa.cert, rejectUnauthorized: true });
      s.on('secureConnect', () => {
        s.destroy();
        resolve(undefined);
      });
      s.on('error', reject);
    }),
  );
  expect(untrusting).toBeInstanceOf(Error);
  await sleep(100);
  const r4 = reasons();
  const untrustingDiff = reasonDiff(r3, r4);
  console.log('termination reasons after a client rejecting the certificate:', JSON.stringify(untrustingDiff));
  expect(untrustingDiff.tls_handshake_failed).toEqual(1);

  // A client that connects and then goes away mid-ClientHello.
  const half = await rawSend(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]), 300);
  expect(half.closed).toBeFalse();

  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to return to 0');
  const all = proxy.getStatistics().terminationReasons;
  console.log('all termination reasons:', JSON.stringify(all));
  expect(all.no_route).toBeGreaterThan(0);
  expect(all.tls_handshake_failed).toBeGreaterThan(0);
  // The TLSv1.2 client refused by the TLSv1.3-only route counted as a failed handshake too.
  expect(all.tls_handshake_failed).toBeGreaterThanOrEqual(2);
  // The proxy still serves afterwards.
  expect((await httpsRequest('app.example.com', { path: '/after-garbage' })).status).toEqual(200);
});

tap.test('statistics: open terminated and passthrough connections count as TLS; back to 0 after', async () => {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to return to 0');
  const session = await h2Connect('app.example.com');
  const pt = tls.connect({ host: '127.0.0.1', port, servername: 'pt.example.com', ca: ca.cert });
  pt.on('error', () => undefined);
  try {
    await new Promise<void>((resolve) => pt.once('data', () => resolve()));
    expect((await h2Request(session, '/stats')).status).toEqual(200);
    const open = proxy.getStatistics();
    expect(open.activeConnections).toEqual(2);
    expect(open.tlsConnections).toEqual(2);
    expect(open.nonTlsConnections).toEqual(0);
  } finally {
    session.close();
    pt.destroy();
  }
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'activeConnections to return to 0');
  const stats = proxy.getStatistics();
  expect(stats.tlsConnections).toEqual(0);
  expect(stats.totalConnections).toBeGreaterThan(20);
});

// 10. Config errors.

tap.test('config: a terminate route whose certificate PEM is garbage is refused by the constructor, naming the route', async () => {
  const build = (certificate: { key: string; cert: string }): Error | undefined => {
    try {
      new SmartProxy({
        gracefulShutdownTimeout: 500,
        routes: [{ name: 'badcert', match: { ports: port, domains: 'bad.example.com' }, action: { type: 'forward', target: local(appBackend), tls: { mode: 'terminate', certificate } } }],
      });
    } catch (err) {
      return err as Error;
    }
    return undefined;
  };
  const garbageCert = build({ key: appCert.key, cert: '-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n' });
  expect(garbageCert?.message ?? '(no error)').toStartWith('routes[0] "badcert": action.tls.certificate:');
  const notPem = build({ key: appCert.key, cert: 'garbage' });
  expect(notPem?.message ?? '(no error)').toStartWith('routes[0] "badcert": action.tls.certificate:');
  const garbageKey = build({ key: 'garbage', cert: appCert.cert });
  expect(garbageKey?.message ?? '(no error)').toStartWith('routes[0] "badcert": action.tls.certificate:');
  // A key that does not belong to the certificate.
  const mismatched = build({ key: apiCert.key, cert: appCert.cert });
  expect(mismatched?.message ?? '(no error)').toStartWith('routes[0] "badcert": action.tls.certificate:');
});

tap.test('stop', async () => {
  await proxy.stop();
  await appBackend.close();
  await apiBackend.close();
  await tls13Backend.close();
  await ptBackend.close();
  await reencBackend.close();
  await wrongNameBackend.close();
  await untrustedBackend.close();
  await localhostBackend.close();
  await h2Backend.close();
  rmSync(caDir, { recursive: true, force: true });
});

tap.start({ throwOnError: true });
