// HTTP/3 to clients (`action.http3`): a real HTTP/3 client (aioquic, test/helpers/h3-client.py)
// against the proxy's QUIC endpoint on the route's port. Routing by SNI and `:authority` among two
// domains with their own certificates, the same security and rewriting as over TCP, 10 MiB bodies
// both ways, 50 concurrent streams, `Alt-Svc` on the TCP side, certificates swapped live, the
// engine's IP lists before any handshake, statistics, and the UDP port released at stop.
import { tap, expect } from '@push.rocks/tapbundle';
import * as dgram from 'node:dgram';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import * as https from 'node:https';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort, sleep, waitFor, withCleanup, type TDefer } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';
import { h3ClientAvailable, h3Header, h3PatternBody, h3Request, h3RequestOk, sha256Hex, startH3Server, startHalfOpenHandshakes, certSha256, h3Answer } from './helpers/h3.js';

type TOptions = ConstructorParameters<typeof SmartProxy>[0];
type TRoute = TOptions['routes'][number];

const ca = createTestCa();
const certA = ca.issue(['a.test']);
const certB = ca.issue(['b.test']);
const workDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-h3-'));
process.on('exit', () => rmSync(workDir, { recursive: true, force: true }));
const caFile = path.join(workDir, 'ca.pem');
writeFileSync(caFile, ca.cert);

interface IEchoBackend {
  port: number;
  /** `x-forwarded-proto`, `via` and `host` of every request seen, in order. */
  seen: Array<{ host: string; path: string; forwardedProto: string; via: string }>;
  close(): Promise<void>;
}

/**
 * An HTTP/1.1 backend: POST/PUT bodies are streamed back as they come (with their sha256 in a
 * trailer-free header computed at the end is impossible, so the client compares hashes itself);
 * GET `/big` answers 10 MiB of the pattern; `/slow` answers `slow` after 1.5 s; anything else
 * `<tag> <host> <path>`.
 */
async function startEchoBackend(tag: string): Promise<IEchoBackend> {
  const seen: IEchoBackend['seen'] = [];
  const server = http.createServer((req, res) => {
    seen.push({ host: req.headers.host ?? '', path: req.url ?? '', forwardedProto: String(req.headers['x-forwarded-proto'] ?? ''), via: String(req.headers.via ?? '') });
    if (req.method === 'POST' || req.method === 'PUT') {
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      req.pipe(res);
      return;
    }
    if (req.url === '/slow') {
      setTimeout(() => {
        res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 4 });
        res.end('slow');
      }, 1500);
      return;
    }
    if (req.url === '/big') {
      const body = h3PatternBody(10 * 1024 * 1024);
      res.writeHead(200, { 'content-length': body.length });
      res.end(body);
      return;
    }
    const body = `${tag} ${req.headers.host ?? ''} ${req.url ?? ''}`;
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  });
  server.keepAliveTimeout = 30_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    seen,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A terminating route for `domain` on `port`, served over HTTP/3 too (unless `http3: false`). */
function h3Route(name: string, domain: string, port: number, backendPort: number, creds: { key: string; cert: string }, extra: Partial<TRoute> & { http3?: boolean; altSvcMaxAge?: number } = {}): TRoute {
  const { http3 = true, altSvcMaxAge, ...rest } = extra;
  return {
    name,
    match: { ports: port, domains: domain },
    action: {
      type: 'forward',
      targets: [{ host: '127.0.0.1', port: backendPort }],
      tls: { mode: 'terminate', certificate: { key: creds.key, cert: creds.cert } },
      ...(http3 ? { http3: { enabled: true, ...(altSvcMaxAge !== undefined ? { altSvcMaxAge } : {}) } } : {}),
    },
    ...rest,
  } as TRoute;
}

async function startProxy(defer: TDefer, options: TOptions): Promise<SmartProxy> {
  const proxy = new SmartProxy(options);
  await proxy.start();
  defer(() => proxy.stop());
  return proxy;
}

async function twoDomains(defer: TDefer, extraA: Partial<TRoute> = {}): Promise<{ port: number; proxy: SmartProxy; a: IEchoBackend; b: IEchoBackend }> {
  const a = await startEchoBackend('A');
  defer(() => a.close());
  const b = await startEchoBackend('B');
  defer(() => b.close());
  const port = await freePort();
  const proxy = await startProxy(defer, { routes: [h3Route('site-a', 'a.test', port, a.port, certA, extraA), h3Route('site-b', 'b.test', port, b.port, certB)] });
  return { port, proxy, a, b };
}

const statsOf = (proxy: SmartProxy) => proxy.getStatistics();

/** Tests need the aioquic client; without it they fail loudly rather than pass unseen. */
function h3Test(name: string, body: () => Promise<void>): void {
  tap.test(name, async () => {
    if (!h3ClientAvailable()) throw new Error('the HTTP/3 test client is missing: run .ci/run (it makes .venv-h3 with aioquic)');
    await body();
  });
}

h3Test('two domains on one port: each SNI gets its own certificate and backend, by :authority', async () => {
  await withCleanup(async (defer) => {
    const { port, a, b } = await twoDomains(defer);
    for (const [domain, cert, tag] of [['a.test', certA.cert, 'A'], ['b.test', certB.cert, 'B']] as const) {
      const result = await h3RequestOk({ port, serverName: domain, caFile, requests: [{ path: '/hello?x=1' }] });
      expect(result.alpn).toEqual('h3');
      expect(result.peerCertSha256).toEqual(certSha256(cert));
      const response = h3Answer(result.responses[0]);
      expect(response.status).toEqual(200);
      expect(response.bodyText).toEqual(`${tag} ${domain} /hello?x=1`);
    }
    // What the backend received: the host as the client named it, X-Forwarded-Proto https, Via 3.
    expect(a.seen[0]).toEqual({ host: 'a.test', path: '/hello?x=1', forwardedProto: 'https', via: '3 smartproxy' });
    expect(b.seen.length).toEqual(1);
  });
});

h3Test("a request for another route's host on a connection made for a.test is misdirected (421)", async () => {
  await withCleanup(async (defer) => {
    const { port, b } = await twoDomains(defer);
    const result = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ authority: 'b.test', path: '/' }, { authority: 'a.test', path: '/ok' }] });
    expect(h3Answer(result.responses[0]).status).toEqual(421);
    expect(h3Answer(result.responses[1]).status).toEqual(200);
    expect(b.seen.length).toEqual(0);
  });
});

h3Test('an SNI no HTTP/3 route takes fails the handshake; a TCP-only route on the port is not reachable over QUIC', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    const proxy = await startProxy(defer, { routes: [h3Route('site-a', 'a.test', port, a.port, certA), h3Route('tcp-only', 'b.test', port, a.port, certB, { http3: false })] });
    const unknown = await h3Request({ port, serverName: 'c.test', insecure: true, timeoutMs: 5000, requests: [{ path: '/' }] });
    expect(unknown.ok).toBeFalse();
    const tcpOnly = await h3Request({ port, serverName: 'b.test', insecure: true, timeoutMs: 5000, requests: [{ path: '/' }] });
    expect(tcpOnly.ok).toBeFalse();
    // Its :authority on a connection made for a.test: the route does not serve HTTP/3.
    const asked = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ authority: 'b.test', path: '/' }] });
    expect(h3Answer(asked.responses[0]).status).toEqual(421);
    expect(a.seen.length).toEqual(0);
    expect(statsOf(proxy).quic?.handshakeFailures).toBeGreaterThanOrEqual(2);
  });
});

h3Test('route security over HTTP/3: basic auth answers 401 without credentials and passes with them', async () => {
  await withCleanup(async (defer) => {
    const { port, a } = await twoDomains(defer, { security: { basicAuth: { enabled: true, users: [{ username: 'u', password: 'p' }] } } } as Partial<TRoute>);
    const credentials = Buffer.from('u:p').toString('base64');
    const result = await h3RequestOk({
      port,
      serverName: 'a.test',
      caFile,
      sequential: true,
      requests: [{ path: '/private' }, { path: '/private', headers: [['authorization', `Basic ${credentials}`]] }],
    });
    const refused = h3Answer(result.responses[0]);
    expect(refused.status).toEqual(401);
    expect(h3Header(refused.headers, 'www-authenticate')).toInclude('Basic');
    expect(h3Answer(result.responses[1]).status).toEqual(200);
    expect(a.seen.map((r) => r.path)).toEqual(['/private']);
  });
});

h3Test('10 MiB both ways: a POST streamed to the backend and echoed back intact, and a 10 MiB download', async () => {
  await withCleanup(async (defer) => {
    const { port } = await twoDomains(defer);
    const size = 10 * 1024 * 1024;
    const result = await h3RequestOk({ port, serverName: 'a.test', caFile, timeoutMs: 60_000, requests: [{ method: 'POST', path: '/upload', bodySize: size }, { path: '/big' }] });
    const echoed = h3Answer(result.responses[0]);
    expect(echoed.status).toEqual(200);
    expect(echoed.bodyLength).toEqual(size);
    expect(echoed.sentSha256).toEqual(sha256Hex(h3PatternBody(size)));
    expect(echoed.bodySha256).toEqual(echoed.sentSha256);
    const download = h3Answer(result.responses[1]);
    expect(download.bodyLength).toEqual(size);
    expect(download.bodySha256).toEqual(sha256Hex(h3PatternBody(size)));
  });
});

h3Test('50 concurrent streams on one connection, all answered; statistics count the connection and return to zero', async () => {
  await withCleanup(async (defer) => {
    const { port, proxy, a } = await twoDomains(defer);
    const result = await h3RequestOk({ port, serverName: 'a.test', caFile, timeoutMs: 30_000, requests: [{ path: '/stream', streams: 50 }] });
    expect(result.responses.length).toEqual(50);
    for (const response of result.responses) expect(h3Answer(response).bodyText).toEqual('A a.test /stream');
    expect(a.seen.length).toEqual(50);
    const deadline = Date.now() + 5000;
    while ((statsOf(proxy).quicConnections !== 0 || statsOf(proxy).activeConnections !== 0) && Date.now() < deadline) await sleep(50);
    const stats = statsOf(proxy);
    expect(stats.quicConnections).toEqual(0);
    expect(stats.activeConnections).toEqual(0);
    expect(stats.quic?.connectionsTotal).toEqual(1);
    expect(stats.quicPorts).toEqual([port]);
    expect(stats.udpPorts).toEqual([]);
    expect(stats.httpRequests).toBeGreaterThanOrEqual(50);
    expect(stats.bytesIn).toBeGreaterThan(0);
  });
});

h3Test("Alt-Svc on the route's HTTP/1.1 and HTTP/2 responses over TLS names the QUIC port; not on routes without HTTP/3", async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    await startProxy(defer, { routes: [h3Route('site-a', 'a.test', port, a.port, certA, { altSvcMaxAge: 600 }), h3Route('tcp-only', 'b.test', port, a.port, certB, { http3: false })] });
    const h1 = (servername: string) =>
      new Promise<http.IncomingMessage>((resolve, reject) => {
        const req = https.request({ host: '127.0.0.1', port, servername, path: '/', headers: { host: servername }, ca: ca.cert }, (res) => {
          res.resume();
          res.on('end', () => resolve(res));
        });
        req.on('error', reject);
        req.end();
      });
    expect((await h1('a.test')).headers['alt-svc']).toEqual(`h3=":${port}"; ma=600`);
    expect((await h1('b.test')).headers['alt-svc']).toBeUndefined();
    const session = http2.connect(`https://a.test:${port}`, { host: '127.0.0.1', servername: 'a.test', ca: ca.cert });
    defer(() => session.close());
    const altSvc = await new Promise<unknown>((resolve, reject) => {
      const stream = session.request({ ':path': '/' });
      stream.on('response', (headers) => resolve(headers['alt-svc']));
      stream.on('error', reject);
      stream.resume();
    });
    expect(altSvc).toEqual(`h3=":${port}"; ma=600`);
  });
});

h3Test('a new certificate through updateRoutes serves the next QUIC handshake; HTTP/3 taken off a port releases its UDP socket', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    const proxy = await startProxy(defer, { routes: [h3Route('site-a', 'a.test', port, a.port, certA)] });
    const first = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/' }] });
    expect(first.peerCertSha256).toEqual(certSha256(certA.cert));
    const renewed = ca.issue(['a.test']);
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, renewed)]);
    const second = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/' }] });
    expect(second.peerCertSha256).toEqual(certSha256(renewed.cert));
    expect(second.peerCertSha256).not.toEqual(first.peerCertSha256);
    // Without HTTP/3 the UDP port is free again once its (closed) connections are gone (TCP
    // keeps serving).
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, renewed, { http3: false })]);
    await waitForUdpFree(port);
  });
});

h3Test('HTTP/3 taken off a port by updateRoutes: a request in flight finishes (GOAWAY, then its answer), new connections are refused, then the port is free; enabling it again binds at once', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    const proxy = await startProxy(defer, { routes: [h3Route('site-a', 'a.test', port, a.port, certA)] });
    // h3Request resolves with ok: false on a failure: nothing rejects before it is awaited.
    const inFlight = h3Request({ port, serverName: 'a.test', caFile, requests: [{ path: '/slow' }] });
    await waitFor(() => a.seen.some((r) => r.path === '/slow'), 5000, 'the slow request to reach the backend');
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, certA, { http3: false })]);
    expect(statsOf(proxy).quicPorts).toEqual([]);

    const refused = await h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 2000, requests: [{ path: '/late' }] });
    expect(refused.ok).toBeFalse();
    expect(a.seen.some((r) => r.path === '/late')).toBeFalse();

    const done = await inFlight;
    if (!done.ok) throw new Error(`the request in flight failed: ${done.error}`);
    const answer = h3Answer(done.responses[0]);
    expect(answer.status).toEqual(200);
    expect(answer.bodyText).toEqual('slow');
    await waitForUdpFree(port);

    // Flipped on again: served at once.
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, certA)]);
    const again = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/again' }] });
    expect(h3Answer(again.responses[0]).status).toEqual(200);
    const slowAgain = h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 5000, requests: [{ path: '/slow' }] });
    await waitFor(() => a.seen.filter((r) => r.path === '/slow').length === 2, 5000, 'the second slow request to reach the backend');
    // Off and on again while that request drains: the port is wanted again, so the draining
    // endpoint is closed at once to free it, and the new one serves.
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, certA, { http3: false })]);
    await proxy.updateRoutes([h3Route('site-a', 'a.test', port, a.port, certA)]);
    expect(statsOf(proxy).quicPorts).toEqual([port]);
    const third = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/third' }] });
    expect(h3Answer(third.responses[0]).status).toEqual(200);
    expect((await slowAgain).ok).toBeFalse();
  });
});

/** Polls `bindUdp(port)` until the port is free (bounded). */
async function waitForUdpFree(port: number, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await bindUdp(port);
      return;
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`UDP port ${port} still taken after ${timeoutMs} ms: ${(err as Error).message}`);
      await sleep(50);
    }
  }
}

/** Binds and closes a UDP socket on `port` (all interfaces, as the proxy binds): rejects if taken. */
function bindUdp(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket({ type: 'udp6' });
    socket.once('error', (err) => {
      socket.close();
      reject(err);
    });
    socket.bind(port, '::', () => socket.close(() => resolve()));
  });
}

h3Test('stop() with an HTTP/3 request in flight: a GOAWAY, its answer arrives whole, then the proxy stops and the port is free', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    const proxy = new SmartProxy({ routes: [h3Route('site-a', 'a.test', port, a.port, certA)], gracefulShutdownTimeout: 10000 } as TOptions);
    await proxy.start();
    const inFlight = h3Request({ port, serverName: 'a.test', caFile, requests: [{ path: '/slow' }] });
    await waitFor(() => a.seen.some((r) => r.path === '/slow'), 5000, 'the slow request to reach the backend');
    await proxy.stop();
    const done = await inFlight;
    if (!done.ok) throw new Error(`the request in flight failed: ${done.error}`);
    expect(h3Answer(done.responses[0]).bodyText).toEqual('slow');
    await bindUdp(port);
  });
});

h3Test('the engine block list refuses a QUIC client before any handshake; stop() releases the UDP port', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    const proxy = new SmartProxy({ routes: [h3Route('site-a', 'a.test', port, a.port, certA)], defaults: { security: { ipBlockList: ['127.0.0.1'] } } } as TOptions);
    await proxy.start();
    let stopped = false;
    defer(() => (stopped ? undefined : proxy.stop()));
    const refused = await h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 5000, requests: [{ path: '/' }] });
    expect(refused.ok).toBeFalse();
    expect(statsOf(proxy).quic?.refused).toBeGreaterThanOrEqual(1);
    expect(statsOf(proxy).quic?.connectionsTotal).toEqual(0);
    expect(a.seen.length).toEqual(0);
    await proxy.stop();
    stopped = true;
    await bindUdp(port);
  });
});

h3Test('more than 64 handshakes in progress: a new client is first sent a Retry, proves its address and is served; the half-open ones time out', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    // The half-open handshakes come from one IP: its connection budget must not refuse them first.
    const proxy = await startProxy(defer, {
      routes: [h3Route('site-a', 'a.test', port, a.port, certA)],
      maxConnectionsPerIP: 1000,
      connectionRateLimitPerMinute: 100000,
      initialDataTimeout: 3000,
    } as TOptions);
    const quic = () => statsOf(proxy).quic!;

    // Below the mark a client goes straight in.
    const direct = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/before' }] });
    expect(h3Answer(direct.responses[0]).status).toEqual(200);
    expect(quic().retries).toEqual(0);

    const flood = await startHalfOpenHandshakes({ port, serverName: 'a.test', count: 80, holdMs: 10000 });
    defer(() => flood.kill());
    expect(flood.sent).toEqual(80);
    // Each attempt is in progress, or was sent a Retry once 64 were (which this flood ignores).
    await waitFor(() => quic().handshaking + quic().retries >= 80, 5000, 'every half-open attempt to be taken');
    expect(quic().handshaking).toBeGreaterThanOrEqual(64);
    const retriesBefore = quic().retries;

    const result = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/after-retry' }] });
    expect(h3Answer(result.responses[0]).status).toEqual(200);
    expect(quic().retries).toEqual(retriesBefore + 1);
    expect(a.seen.map((r) => r.path)).toContain('/after-retry');

    // initialDataTimeout bounds a handshake: the abandoned ones end as failures, none is left.
    await waitFor(() => quic().handshaking === 0, 8000, 'the half-open handshakes to time out');
    expect(quic().handshakeFailures).toBeGreaterThanOrEqual(64);
    expect(quic().connectionsTotal).toEqual(2);
  });
});

h3Test("a route's own IP block list refuses the QUIC handshake once the SNI chose the route; nothing reaches the backend", async () => {
  await withCleanup(async (defer) => {
    const { port, proxy, a } = await twoDomains(defer, { security: { ipBlockList: ['127.0.0.1'] } } as Partial<TRoute>);
    const result = await h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 5000, requests: [{ path: '/' }] });
    expect(result.ok).toBeFalse();
    // Refused in the handshake, before any key exchange: no certificate is offered.
    if (!result.ok) expect(result.peerCertSha256).toBeUndefined();
    expect(a.seen.length).toEqual(0);
    expect(statsOf(proxy).refusals['site-a']?.forbidden).toEqual(1);
    expect(statsOf(proxy).terminationReasons['route_ip_blocked']).toEqual(1);
  });
});

h3Test('config: HTTP/3 needs a terminating route, and its port cannot also relay UDP', async () => {
  const port = await freePort();
  const passthrough = {
    name: 'pt',
    match: { ports: port, domains: 'a.test' },
    action: { type: 'forward', targets: [{ host: '127.0.0.1', port: 1 }], tls: { mode: 'passthrough' }, http3: { enabled: true } },
  } as TRoute;
  expect(() => new SmartProxy({ routes: [passthrough] })).toThrow();
  const udpRelay = { name: 'relay', match: { ports: port, transport: 'udp' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: 1 }] } } as TRoute;
  let message = '';
  try {
    new SmartProxy({ routes: [h3Route('site-a', 'a.test', port, 1, certA), udpRelay] });
  } catch (err) {
    message = (err as Error).message;
  }
  expect(message).toInclude('action.http3');
  expect(message).toInclude('UDP socket');
});

/** A route terminating TLS for a.test on `port`, to `backendPort` over HTTP/3 (TLS verified against the test CA). */
function toH3Backend(port: number, backendPort: number, extra: { http3?: boolean } = {}): TRoute {
  return {
    name: 'to-h3',
    match: { ports: port, domains: 'a.test' },
    action: {
      type: 'forward',
      targets: [{ host: '127.0.0.1', port: backendPort }],
      tls: { mode: 'terminate-and-reencrypt', certificate: { key: certA.key, cert: certA.cert, ca: ca.cert } },
      options: { backendProtocol: 'http3' },
      ...(extra.http3 ? { http3: { enabled: true } } : {}),
    },
  } as TRoute;
}

/** An HTTPS GET or POST through the proxy for a.test; resolves with status, headers and body. */
function httpsRequest(port: number, path: string, body?: Buffer): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, servername: 'a.test', path, method: body ? 'POST' : 'GET', headers: { host: 'a.test' }, ca: ca.cert, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

h3Test("backendProtocol 'http3': HTTP/1.1 clients reach an HTTP/3 backend, all requests on one pooled QUIC connection, bodies both ways", async () => {
  await withCleanup(async (defer) => {
    const backend = await startH3Server({ tag: 'H3', cert: certA.cert, key: certA.key });
    defer(() => backend.close());
    const port = await freePort();
    await startProxy(defer, { routes: [toH3Backend(port, backend.port)] });
    const first = await httpsRequest(port, '/one?x=1');
    expect(first.status).toEqual(200);
    expect(first.body.toString()).toEqual('H3 a.test /one?x=1');
    const upload = h3PatternBody(3 * 1024 * 1024 + 17);
    const echoed = await httpsRequest(port, '/echo', upload);
    expect(echoed.status).toEqual(200);
    expect(sha256Hex(echoed.body)).toEqual(sha256Hex(upload));
    const parallel = await Promise.all(Array.from({ length: 20 }, (_, i) => httpsRequest(port, `/p${i}`)));
    for (const [i, response] of parallel.entries()) expect(response.body.toString()).toEqual(`H3 a.test /p${i}`);
    // One QUIC connection carried them all: the backend numbers its connections.
    const connections = new Set([first, echoed, ...parallel].map((r) => String(r.headers['x-h3-connection'])));
    expect(connections.size).toEqual(1);
  });
});

h3Test("backendProtocol 'http3' end to end: an HTTP/3 client through the proxy to an HTTP/3 backend", async () => {
  await withCleanup(async (defer) => {
    const backend = await startH3Server({ tag: 'H3', cert: certA.cert, key: certA.key });
    defer(() => backend.close());
    const port = await freePort();
    await startProxy(defer, { routes: [toH3Backend(port, backend.port, { http3: true })] });
    const size = 2 * 1024 * 1024;
    const result = await h3RequestOk({ port, serverName: 'a.test', caFile, timeoutMs: 30_000, requests: [{ path: '/both' }, { method: 'POST', path: '/echo', bodySize: size }] });
    expect(h3Answer(result.responses[0]).bodyText).toEqual('H3 a.test /both');
    const echoed = h3Answer(result.responses[1]);
    expect(echoed.bodyLength).toEqual(size);
    expect(echoed.bodySha256).toEqual(echoed.sentSha256);
  });
});

h3Test("backendProtocol 'http3': a backend killed without a word times out (504), its connection is given up, and a new backend on the port is dialled", async () => {
  await withCleanup(async (defer) => {
    const backend = await startH3Server({ tag: 'H3', cert: certA.cert, key: certA.key });
    const port = await freePort();
    // QUIC hears of no refused port: a backend that left without closing is known by its silence.
    const route = toH3Backend(port, backend.port) as TRoute & { action: { timeouts?: { responseMs: number; connectMs: number } } };
    route.action.timeouts = { responseMs: 1500, connectMs: 1500 };
    await startProxy(defer, { routes: [route] });
    expect((await httpsRequest(port, '/up')).status).toEqual(200);
    const backendPort = backend.port;
    await backend.kill();
    const down = await httpsRequest(port, '/down');
    expect(down.status).toEqual(504);
    // The connection that heard nothing was given up: a new dial, which nothing answers, fails.
    const stillDown = await httpsRequest(port, '/still-down');
    expect(stillDown.status).toEqual(502);
    expect(stillDown.body.toString()).toInclude('timed out');
    const again = await startH3Server({ tag: 'H3b', cert: certA.cert, key: certA.key, port: backendPort });
    defer(() => again.close());
    const back = await httpsRequest(port, '/back');
    expect(back.status).toEqual(200);
    expect(back.body.toString()).toEqual('H3b a.test /back');
  });
});

h3Test("backendProtocol 'http3': a backend whose certificate the route does not trust is a 502", async () => {
  await withCleanup(async (defer) => {
    const otherCa = createTestCa();
    const untrusted = otherCa.issue(['a.test']);
    const backend = await startH3Server({ tag: 'H3', cert: untrusted.cert, key: untrusted.key });
    defer(() => backend.close());
    const port = await freePort();
    await startProxy(defer, { routes: [toH3Backend(port, backend.port)] });
    const response = await httpsRequest(port, '/');
    expect(response.status).toEqual(502);
    expect(response.body.toString()).toInclude('QUIC');
  });
});

/** An HTTPS (TCP) backend for a.test answering `TCP <host> <path>`, advertising HTTP/3 on `altSvcPort`. */
async function startAdvertisingBackend(altSvcPort: () => number): Promise<{ port: number; close(): Promise<void> }> {
  const server = https.createServer({ key: certA.key, cert: certA.cert }, (req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'alt-svc': `h3=":${altSvcPort()}"; ma=600` });
    res.end(`TCP ${req.headers.host ?? ''} ${req.url ?? ''}`);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

h3Test("backendProtocol 'auto' learns Alt-Svc h3 from a TLS backend, goes over HTTP/3, and back to TCP (for good) when HTTP/3 fails", async () => {
  await withCleanup(async (defer) => {
    let h3Port = 0;
    const tcp = await startAdvertisingBackend(() => h3Port);
    defer(() => tcp.close());
    // HTTP/3 on the backend's own port number, over UDP.
    const quic = await startH3Server({ tag: 'H3', cert: certA.cert, key: certA.key, port: tcp.port });
    h3Port = quic.port;
    const port = await freePort();
    const route = {
      name: 'auto',
      match: { ports: port, domains: 'a.test' },
      action: {
        type: 'forward',
        targets: [{ host: '127.0.0.1', port: tcp.port }],
        tls: { mode: 'terminate-and-reencrypt', certificate: { key: certA.key, cert: certA.cert, ca: ca.cert } },
      },
    } as TRoute;
    await startProxy(defer, { routes: [route] });
    expect((await httpsRequest(port, '/1')).body.toString()).toEqual('TCP a.test /1');
    // Learnt: the next request goes over QUIC to the advertised port.
    expect((await httpsRequest(port, '/2')).body.toString()).toEqual('H3 a.test /2');
    expect((await httpsRequest(port, '/3')).body.toString()).toEqual('H3 a.test /3');
    // HTTP/3 goes away: the request falls back to TCP, and stays there despite the backend's
    // advertisement.
    await quic.close();
    const fallback = await httpsRequest(port, '/4');
    expect(fallback.status).toEqual(200);
    expect(fallback.body.toString()).toEqual('TCP a.test /4');
    expect((await httpsRequest(port, '/5')).body.toString()).toEqual('TCP a.test /5');
  });
});

h3Test('header limits: a section over maxHeaderSize is answered 431; a HEADERS frame far over it is refused as it arrives; the proxy serves on', async () => {
  await withCleanup(async (defer) => {
    const a = await startEchoBackend('A');
    defer(() => a.close());
    const port = await freePort();
    await startProxy(defer, { maxHeaderSize: 4096, routes: [h3Route('site-a', 'a.test', port, a.port, certA)] } as TOptions);
    const over = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/over', headers: [['x-big', 'b'.repeat(6000)]] }] });
    expect(h3Answer(over.responses[0]).status).toEqual(431);
    // A frame h3 would have buffered whole before deciding: refused while it streams in.
    const noise = Array.from({ length: 60000 }, (_, i) => String.fromCharCode(33 + ((i * 7919) % 90))).join('').replace(/[,;"\\]/g, 'x');
    const far = await h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 5000, requests: [{ path: '/far', headers: [['x-huge', noise]] }] });
    // The stream is stopped with H3_EXCESSIVE_LOAD (0x107) before any answer.
    expect(far.ok).toBeTrue();
    if (far.ok) expect((far.responses[0] as { stopSending?: number }).stopSending).toEqual(0x107);
    expect(a.seen.map((r) => r.path)).toEqual([]);
    const after = await h3RequestOk({ port, serverName: 'a.test', caFile, requests: [{ path: '/after' }] });
    expect(h3Answer(after.responses[0]).bodyText).toEqual('A a.test /after');
  });
});

export default tap.start();
