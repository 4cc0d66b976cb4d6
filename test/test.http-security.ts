// HTTP-level security on routes the HTTP engine serves: per-route rate limits (by IP, path or
// header; 429 with Retry-After), basic auth and JWT auth (HS256/384/512, RS256, ES256; exp/nbf
// leeway, iss, aud, alg none, tampering, algorithm confusion), JWT claims in header templates, the
// Authorization header consumed unless forwardAuthorization, maxConnections on HTTP (503), the
// order of the checks (IP 403, maxConnections 503, rate limit 429, auth 401), HTTP/2 (h2c prior
// knowledge), the route helpers, config errors on routes that do not read requests, the refusal
// counters and the memory a flood of distinct rate-limit keys costs. Real sockets, real clients
// (node http/http2 and curl), backends that record what reached them.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import { createHmac, createSign, createVerify, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { AddressInfo } from 'node:net';

import { SmartProxy, SmartProxyConfigError, addBasicAuth, addJwtAuth, addRateLimiting, createHttpRoute } from '../ts/index.js';
import type { IRouteConfig, IRouteSecurity } from '../ts/index.js';
import { freePorts, sleep, waitFor } from './helpers/net.js';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// JWT (node:crypto only)
// ---------------------------------------------------------------------------------------------

const b64url = (data: Buffer | string): string => Buffer.from(data).toString('base64url');

type TSigner = (signingInput: string) => Buffer;

/** `header.payload.signature`, base64url, signed over `header.payload` by `signer`. */
function jwt(header: Record<string, unknown>, payload: Record<string, unknown>, signer: TSigner): string {
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  return `${input}.${b64url(signer(input))}`;
}

const hmacSigner = (alg: 'HS256' | 'HS384' | 'HS512', secret: string | Buffer): TSigner => {
  const hash = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }[alg];
  return (input) => createHmac(hash, secret).update(input).digest();
};
const rs256Signer = (privateKey: KeyObject): TSigner => (input) => createSign('RSA-SHA256').update(input).sign(privateKey);
const es256Signer = (privateKey: KeyObject): TSigner => (input) =>
  createSign('SHA256').update(input).sign({ key: privateKey, dsaEncoding: 'ieee-p1363' });
const noSigner: TSigner = () => Buffer.alloc(0);

const now = (): number => Math.floor(Date.now() / 1000);

const HS_SECRET = 'a-test-secret-of-decent-length-0123456789';
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const RSA_PUBLIC_PEM = rsa.publicKey.export({ type: 'spki', format: 'pem' }).toString();
const otherRsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const EC_PUBLIC_PEM = ec.publicKey.export({ type: 'spki', format: 'pem' }).toString();
const otherEc = generateKeyPairSync('ec', { namedCurve: 'P-256' });

/** An HS256 token for `HS_SECRET`, valid for an hour, with `extra` claims merged in. */
function hsToken(extra: Record<string, unknown> = {}, alg: 'HS256' | 'HS384' | 'HS512' = 'HS256', secret: string = HS_SECRET): string {
  return jwt({ alg, typ: 'JWT' }, { sub: 'alice', iat: now(), exp: now() + 3600, ...extra }, hmacSigner(alg, secret));
}

/** The token with its payload replaced by `payload` (the signature kept). */
function withPayload(token: string, payload: Record<string, unknown>): string {
  const [h, , s] = token.split('.');
  return `${h}.${b64url(JSON.stringify(payload))}.${s}`;
}

/** The token with the first character of its signature changed (always changes signature bits). */
function withFlippedSignature(token: string): string {
  const [h, p, s] = token.split('.');
  return `${h}.${p}.${s[0] === 'A' ? 'B' : 'A'}${s.slice(1)}`;
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

interface IBackend {
  port: number;
  /** Requests that reached the backend. */
  hits: number;
  /** The first 1000 of them. */
  requests: Array<{ url: string; headers: http.IncomingHttpHeaders }>;
  /** Requests under `/hold` waiting for `releaseOne`/`releaseAll`. */
  held: number;
  releaseOne(): void;
  releaseAll(): void;
  close(): Promise<void>;
}

/**
 * Answers JSON `{ url, headers }` of what it received. A path starting with `/hold` is answered
 * only once released (`releaseOne` / `releaseAll`), to keep requests in flight.
 */
async function startBackend(): Promise<IBackend> {
  const sockets = new Set<net.Socket>();
  const waiting: Array<() => void> = [];
  const backend: IBackend = {
    port: 0,
    hits: 0,
    requests: [],
    get held() {
      return waiting.length;
    },
    releaseOne: () => waiting.shift()?.(),
    releaseAll: () => {
      while (waiting.length > 0) waiting.shift()!();
    },
    close: async () => undefined,
  };
  const server = http.createServer((req, res) => {
    backend.hits++;
    // Only the first requests are kept: the flood test must not measure the backend's log.
    if (backend.requests.length < 1000) backend.requests.push({ url: req.url!, headers: req.headers });
    req.resume();
    const answer = (): void => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ url: req.url, headers: req.headers }));
    };
    req.on('end', () => {
      if (req.url!.startsWith('/hold')) waiting.push(answer);
      else answer();
    });
  });
  server.keepAliveTimeout = 30000;
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  backend.port = (server.address() as AddressInfo).port;
  backend.close = async () => {
    backend.releaseAll();
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return backend;
}

// ---------------------------------------------------------------------------------------------
// Clients and set-up
// ---------------------------------------------------------------------------------------------

interface IResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  /** The backend's JSON (`{ url, headers }`), null for answers the proxy wrote itself. */
  json: any;
}

function parseJson(text: string): any {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function request(
  port: number,
  opts: { path?: string; host?: string; headers?: Record<string, string>; localAddress?: string; agent?: http.Agent | false } = {},
): Promise<IResult> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: 'GET',
        path: opts.path ?? '/',
        headers: { host: opts.host ?? 'app.test', ...(opts.headers ?? {}) },
        localAddress: opts.localAddress,
        agent: opts.agent ?? false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('error', reject);
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          resolve({ status: res.statusCode!, headers: res.headers, text, json: parseJson(text) });
        });
      },
    );
    req.setTimeout(10000, () => req.destroy(new Error('client timeout')));
    req.on('error', reject);
    req.end();
  });
}

/** One request on an HTTP/2 session. */
function h2request(client: http2.ClientHttp2Session, path: string, headers: Record<string, string> = {}): Promise<IResult> {
  return new Promise((resolve, reject) => {
    const stream = client.request({ ':path': path, ':method': 'GET', ...headers });
    let status = 0;
    let responseHeaders: http.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    stream.on('response', (h) => {
      status = Number(h[':status']);
      responseHeaders = h as http.IncomingHttpHeaders;
    });
    stream.on('data', (d: Buffer) => chunks.push(d));
    stream.on('end', () => {
      const text = Buffer.concat(chunks).toString();
      resolve({ status, headers: responseHeaders, text, json: parseJson(text) });
    });
    stream.on('error', reject);
    stream.setTimeout(10000, () => stream.close(http2.constants.NGHTTP2_CANCEL));
    stream.end();
  });
}

/** An h2c (prior knowledge) session to the proxy for `host`. */
function h2connect(port: number, host = 'app.test'): http2.ClientHttp2Session {
  const client = http2.connect(`http://${host}:${port}`, { createConnection: () => net.connect(port, '127.0.0.1') });
  client.on('error', () => undefined);
  return client;
}

const basic = (user: string, password: string): string => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` });

/** A forward route for `domains` on `port` to `backend`. */
function route(name: string, port: number, backend: { port: number }, security: IRouteSecurity, extra: Partial<IRouteConfig> = {}, domains = 'app.test'): IRouteConfig {
  return {
    name,
    match: { ports: port, domains },
    action: { type: 'forward', targets: [{ host: '127.0.0.1', port: backend.port }] },
    security,
    ...extra,
  };
}

async function withProxy(routes: IRouteConfig[], run: (proxy: SmartProxy) => Promise<void>): Promise<void> {
  const proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 300, connectionRateLimitPerMinute: 0, maxConnectionsPerIP: 0 });
  await proxy.start();
  try {
    await run(proxy);
  } finally {
    await proxy.stop();
  }
}

/** A backend for the duration of `run`. */
async function withBackend(run: (backend: IBackend) => Promise<void>): Promise<void> {
  const backend = await startBackend();
  try {
    await run(backend);
  } finally {
    await backend.close();
  }
}

interface IRefusals {
  rateLimited: number;
  unauthorized: number;
  forbidden: number;
}

/** `getStatistics().refusals[routeName]` (an object of zeros if the route has none recorded). */
function refusals(proxy: SmartProxy, routeName: string): IRefusals {
  const all = (proxy.getStatistics() as unknown as { refusals?: Record<string, IRefusals> }).refusals;
  return all?.[routeName] ?? { rateLimited: 0, unauthorized: 0, forbidden: 0 };
}

function expectRetryAfter(res: IResult, atMost: number): void {
  const value = String(res.headers['retry-after'] ?? '');
  expect(/^\d+$/.test(value)).toBeTrue();
  expect(Number(value) >= 1).toBeTrue();
  expect(Number(value) <= atMost).toBeTrue();
}

function expectBasicChallenge(res: IResult, realm: string): void {
  expect(res.status).toEqual(401);
  expect(String(res.headers['www-authenticate'] ?? '').startsWith(`Basic realm="${realm}"`)).toBeTrue();
}

function expectBearerChallenge(res: IResult): void {
  expect(res.status).toEqual(401);
  expect(String(res.headers['www-authenticate'] ?? '').startsWith('Bearer')).toBeTrue();
}

// ---------------------------------------------------------------------------------------------
// The token helper itself
// ---------------------------------------------------------------------------------------------

tap.test('jwt helper: HS256, RS256 and ES256 tokens verify with node:crypto, alg none has an empty signature', async () => {
  const hs = hsToken({ role: 'admin' });
  const [h, p, s] = hs.split('.');
  expect(JSON.parse(Buffer.from(h, 'base64url').toString())).toEqual({ alg: 'HS256', typ: 'JWT' });
  expect(JSON.parse(Buffer.from(p, 'base64url').toString()).role).toEqual('admin');
  expect(s).toEqual(createHmac('sha256', HS_SECRET).update(`${h}.${p}`).digest('base64url'));
  expect(/[+/=]/.test(hs)).toBeFalse();

  const rs = jwt({ alg: 'RS256', typ: 'JWT' }, { sub: 'bob' }, rs256Signer(rsa.privateKey));
  const [rh, rp, rsig] = rs.split('.');
  expect(createVerify('RSA-SHA256').update(`${rh}.${rp}`).verify(RSA_PUBLIC_PEM, Buffer.from(rsig, 'base64url'))).toBeTrue();
  expect(RSA_PUBLIC_PEM.startsWith('-----BEGIN PUBLIC KEY-----')).toBeTrue();

  const es = jwt({ alg: 'ES256', typ: 'JWT' }, { sub: 'carol' }, es256Signer(ec.privateKey));
  const [eh, ep, esig] = es.split('.');
  expect(Buffer.from(esig, 'base64url').length).toEqual(64);
  expect(
    createVerify('SHA256').update(`${eh}.${ep}`).verify({ key: EC_PUBLIC_PEM, dsaEncoding: 'ieee-p1363' }, Buffer.from(esig, 'base64url')),
  ).toBeTrue();

  const none = jwt({ alg: 'none', typ: 'JWT' }, { sub: 'eve' }, noSigner);
  expect(none.endsWith('.')).toBeTrue();
  expect(withFlippedSignature(hs) !== hs).toBeTrue();
});

// ---------------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------------

tap.test('rateLimit by ip: N pass, the next gets 429 with Retry-After and the default message; other IPs have their own budget', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('rl-ip', port, backend, { rateLimit: { enabled: true, maxRequests: 3, window: 60 } })], async (proxy) => {
      for (let i = 0; i < 3; i++) expect((await request(port, { path: `/ok/${i}` })).status).toEqual(200);
      const refused = await request(port, { path: '/over' });
      expect(refused.status).toEqual(429);
      expectRetryAfter(refused, 60);
      expect(refused.text.trim()).toEqual('Too Many Requests');
      expect(backend.hits).toEqual(3);
      // Distinct loopback addresses are distinct clients.
      for (const ip of ['127.0.0.2', '127.0.0.3']) {
        for (let i = 0; i < 3; i++) expect((await request(port, { path: '/other', localAddress: ip })).status).toEqual(200);
        expect((await request(port, { path: '/other', localAddress: ip })).status).toEqual(429);
      }
      // The first client is still refused (also on a keep-alive connection).
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      try {
        expect((await request(port, { path: '/again', agent })).status).toEqual(429);
        expect((await request(port, { path: '/again', agent })).status).toEqual(429);
      } finally {
        agent.destroy();
      }
      expect(backend.hits).toEqual(9);
      expect(refusals(proxy, 'rl-ip').rateLimited).toEqual(5);
    });
  });
});

tap.test('rateLimit: errorMessage is the body of the 429', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 1, window: 30, errorMessage: 'Slow down, please' } };
    await withProxy([route('rl-msg', port, backend, security)], async () => {
      expect((await request(port)).status).toEqual(200);
      const refused = await request(port);
      expect(refused.status).toEqual(429);
      expect(refused.text.trim()).toEqual('Slow down, please');
      expectRetryAfter(refused, 30);
    });
  });
});

tap.test('rateLimit: the budget comes back after Retry-After', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('rl-refill', port, backend, { rateLimit: { enabled: true, maxRequests: 1, window: 1 } })], async () => {
      expect((await request(port)).status).toEqual(200);
      const refused = await request(port);
      expect(refused.status).toEqual(429);
      expectRetryAfter(refused, 1);
      await sleep(1300);
      expect((await request(port)).status).toEqual(200);
      expect((await request(port)).status).toEqual(429);
      expect(backend.hits).toEqual(2);
    });
  });
});

tap.test("rateLimit keyBy 'header': each header value has its own budget, requests without it share one", async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 2, window: 60, keyBy: 'header', headerName: 'X-Api-Key' } };
    await withProxy([route('rl-header', port, backend, security)], async () => {
      for (const key of ['k1', 'k2']) {
        expect((await request(port, { headers: { 'x-api-key': key } })).status).toEqual(200);
        expect((await request(port, { headers: { 'x-api-key': key } })).status).toEqual(200);
        expect((await request(port, { headers: { 'x-api-key': key } })).status).toEqual(429);
      }
      // Same IP, a fresh key: not limited by the other keys.
      expect((await request(port, { headers: { 'x-api-key': 'k3' } })).status).toEqual(200);
      // No header: one shared key, whatever the client address.
      expect((await request(port, { localAddress: '127.0.0.2' })).status).toEqual(200);
      expect((await request(port, { localAddress: '127.0.0.3' })).status).toEqual(200);
      expect((await request(port, { localAddress: '127.0.0.4' })).status).toEqual(429);
      expect(backend.hits).toEqual(7);
    });
  });
});

tap.test("rateLimit keyBy 'path': each path has its own budget", async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 2, window: 60, keyBy: 'path' } };
    await withProxy([route('rl-path', port, backend, security)], async () => {
      expect((await request(port, { path: '/a' })).status).toEqual(200);
      expect((await request(port, { path: '/a', localAddress: '127.0.0.2' })).status).toEqual(200);
      // Another client, same path: the path's budget is spent.
      expect((await request(port, { path: '/a', localAddress: '127.0.0.3' })).status).toEqual(429);
      expect((await request(port, { path: '/b' })).status).toEqual(200);
      expect((await request(port, { path: '/b' })).status).toEqual(200);
      expect((await request(port, { path: '/b' })).status).toEqual(429);
      expect((await request(port, { path: '/c' })).status).toEqual(200);
      expect(backend.hits).toEqual(5);
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Basic auth
// ---------------------------------------------------------------------------------------------

const USERS = [
  { username: 'alice', password: 'wonderland' },
  { username: 'bob', password: 'p:w with spaces' },
];

tap.test('basicAuth: 401 with the default realm without or with wrong credentials, 200 for each user; Authorization not forwarded', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('basic', port, backend, { basicAuth: { enabled: true, users: USERS } })], async (proxy) => {
      expectBasicChallenge(await request(port), 'Restricted');
      expectBasicChallenge(await request(port, { headers: { authorization: basic('alice', 'wrong') } }), 'Restricted');
      expectBasicChallenge(await request(port, { headers: { authorization: basic('mallory', 'wonderland') } }), 'Restricted');
      expectBasicChallenge(await request(port, { headers: { authorization: basic('alice', '') } }), 'Restricted');
      expectBasicChallenge(await request(port, { headers: { authorization: basic('bob', 'p') } }), 'Restricted');
      expect(backend.hits).toEqual(0);

      const ok = await request(port, { path: '/secret', headers: { authorization: basic('alice', 'wonderland') } });
      expect(ok.status).toEqual(200);
      expect(ok.json.url).toEqual('/secret');
      expect(ok.json.headers.authorization).toBeUndefined();
      // A password with a colon: only the first colon separates user and password.
      const bob = await request(port, { headers: { authorization: basic('bob', 'p:w with spaces') } });
      expect(bob.status).toEqual(200);
      expect(bob.json.headers.authorization).toBeUndefined();
      expect(backend.hits).toEqual(2);
      expect(refusals(proxy, 'basic')).toEqual({ rateLimited: 0, unauthorized: 5, forbidden: 0 });
    });
  });
});

tap.test('basicAuth: malformed Authorization headers are a 401 (never a 500) and the proxy keeps serving', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('basic-malformed', port, backend, { basicAuth: { enabled: true, users: USERS, realm: 'Staff only' } })], async () => {
      const malformed = [
        'Basic !!!',
        'Basic',
        'Basic ',
        `Basic ${Buffer.from('alicewonderland').toString('base64')}`,
        `Basic ${Buffer.from(':').toString('base64')}`,
        `Basic ${Buffer.from('alice:wonderland').toString('base64')}!!`,
        `Basic ${Buffer.from([0xff, 0xfe, 0x3a, 0x80]).toString('base64')}`,
        'Bearer x',
        `Bearer ${hsToken()}`,
        'Digest username="alice"',
        `Basic ${'A'.repeat(10 * 1024)}`,
        'x'.repeat(10 * 1024),
      ];
      for (const value of malformed) {
        const res = await request(port, { headers: { authorization: value } });
        expectBasicChallenge(res, 'Staff only');
      }
      // Still serving, on a fresh connection and on a kept-alive one.
      expect((await request(port, { headers: { authorization: basic('alice', 'wonderland') } })).status).toEqual(200);
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      try {
        expect((await request(port, { agent, headers: { authorization: 'Basic !!!' } })).status).toEqual(401);
        expect((await request(port, { agent, headers: { authorization: basic('alice', 'wonderland') } })).status).toEqual(200);
      } finally {
        agent.destroy();
      }
      expect(backend.hits).toEqual(2);
    });
  });
});

tap.test('basicAuth: excludePaths skip authentication', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { basicAuth: { enabled: true, users: USERS, excludePaths: ['/health', '/public/*'] } };
    await withProxy([route('basic-exclude', port, backend, security)], async () => {
      expect((await request(port, { path: '/health' })).status).toEqual(200);
      expect((await request(port, { path: '/public/logo.png' })).status).toEqual(200);
      expect((await request(port, { path: '/public/a/b/c' })).status).toEqual(200);
      expectBasicChallenge(await request(port, { path: '/private' }), 'Restricted');
      expectBasicChallenge(await request(port, { path: '/healthz' }), 'Restricted');
      expectBasicChallenge(await request(port, { path: '/publicity' }), 'Restricted');
      expectBasicChallenge(await request(port, { path: '/' }), 'Restricted');
      expect(backend.hits).toEqual(3);
    });
  });
});

tap.test('basicAuth with forwardAuthorization: true passes the header on to the backend', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('basic-forward', port, backend, { basicAuth: { enabled: true, users: USERS }, forwardAuthorization: true })], async () => {
      const ok = await request(port, { headers: { authorization: basic('alice', 'wonderland') } });
      expect(ok.status).toEqual(200);
      expect(ok.json.headers.authorization).toEqual(basic('alice', 'wonderland'));
      expectBasicChallenge(await request(port), 'Restricted');
    });
  });
});

tap.test('basicAuth with curl -u', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('basic-curl', port, backend, { basicAuth: { enabled: true, users: USERS, realm: 'curl realm' } })], async () => {
      const curl = async (...args: string[]): Promise<string> =>
        (await execFileAsync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '-H', 'Host: app.test', ...args, `http://127.0.0.1:${port}/c`])).stdout;
      expect(await curl('-u', 'alice:wonderland')).toEqual('200');
      expect(await curl('-u', 'alice:nope')).toEqual('401');
      expect(await curl()).toEqual('401');
      // curl's own retry after a challenge (--anyauth) finds Basic in it.
      expect(await curl('--anyauth', '-u', 'bob:p:w with spaces')).toEqual('200');
      expect(backend.hits).toEqual(2);
    });
  });
});

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

tap.test('jwtAuth HS256: valid token passes (Authorization not forwarded), missing/expired/not-yet-valid/none/tampered are 401', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('jwt-hs', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET } })], async (proxy) => {
      const valid = hsToken({ role: 'admin' });
      const ok = await request(port, { path: '/api', headers: bearer(valid) });
      expect(ok.status).toEqual(200);
      expect(ok.json.url).toEqual('/api');
      expect(ok.json.headers.authorization).toBeUndefined();
      // No exp at all is refused (requireExp defaults to true), and so is an exp that is not a number.
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, { sub: 'noexp' }, hmacSigner('HS256', HS_SECRET))) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ exp: String(now() + 3600) })) }));
      const hitsOk = backend.hits;

      expectBearerChallenge(await request(port));
      expectBearerChallenge(await request(port, { headers: { authorization: 'Bearer' } }));
      expectBearerChallenge(await request(port, { headers: { authorization: 'Bearer not.a.jwt' } }));
      expectBearerChallenge(await request(port, { headers: { authorization: basic('alice', 'wonderland') } }));
      expectBearerChallenge(await request(port, { headers: bearer(`${'A'.repeat(10 * 1024)}.${'B'.repeat(10)}.${'C'.repeat(10)}`) }));
      // Expired a minute ago (past the 30 s leeway).
      const expired = await request(port, { headers: bearer(hsToken({ exp: now() - 60 })) });
      expectBearerChallenge(expired);
      expect(String(expired.headers['www-authenticate'])).toEqual('Bearer error="invalid_token"');
      // Not valid for another minute.
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ nbf: now() + 60 })) }));
      // alg none, unsigned.
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'none', typ: 'JWT' }, { sub: 'alice', exp: now() + 3600 }, noSigner)) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'None', typ: 'JWT' }, { sub: 'alice', exp: now() + 3600 }, noSigner)) }));
      // alg none header on a real HS256 signature.
      const [, vp, vs] = valid.split('.');
      expectBearerChallenge(await request(port, { headers: bearer(`${b64url(JSON.stringify({ alg: 'none', typ: 'JWT' }))}.${vp}.${vs}`) }));
      // Tampered payload (signature of the original), tampered signature, wrong secret, other HS algorithm.
      expectBearerChallenge(await request(port, { headers: bearer(withPayload(valid, { sub: 'admin', role: 'admin', exp: now() + 3600 })) }));
      expectBearerChallenge(await request(port, { headers: bearer(withFlippedSignature(valid)) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({}, 'HS256', 'another-secret-of-decent-length-01234')) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({}, 'HS512')) }));
      expect(backend.hits).toEqual(hitsOk);

      // The valid token still works after all that (and twice: a remembered token is checked the same way).
      expect((await request(port, { headers: bearer(valid) })).status).toEqual(200);
      expect((await request(port, { headers: bearer(valid) })).status).toEqual(200);
      expect(refusals(proxy, 'jwt-hs').unauthorized).toEqual(16);
    });
  });
});

tap.test('jwtAuth leeway: 30 s both ways (expired 10 s ago and nbf 10 s ahead pass)', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('jwt-leeway', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET } })], async () => {
      expect((await request(port, { headers: bearer(hsToken({ exp: now() - 10 })) })).status).toEqual(200);
      expect((await request(port, { headers: bearer(hsToken({ nbf: now() + 10 })) })).status).toEqual(200);
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ exp: now() - 90 })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ nbf: now() + 90 })) }));
      expect(backend.hits).toEqual(2);
    });
  });
});

tap.test('jwtAuth HS384 and HS512 routes take their own algorithm only', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy(
      [
        route('jwt-384', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET, algorithm: 'HS384' } }, {}, 'hs384.test'),
        route('jwt-512', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET, algorithm: 'HS512' } }, {}, 'hs512.test'),
      ],
      async () => {
        expect((await request(port, { host: 'hs384.test', headers: bearer(hsToken({}, 'HS384')) })).status).toEqual(200);
        expect((await request(port, { host: 'hs512.test', headers: bearer(hsToken({}, 'HS512')) })).status).toEqual(200);
        expectBearerChallenge(await request(port, { host: 'hs384.test', headers: bearer(hsToken({}, 'HS256')) }));
        expectBearerChallenge(await request(port, { host: 'hs384.test', headers: bearer(hsToken({}, 'HS512')) }));
        expectBearerChallenge(await request(port, { host: 'hs512.test', headers: bearer(hsToken({}, 'HS384')) }));
        expect(backend.hits).toEqual(2);
      },
    );
  });
});

tap.test('jwtAuth issuer and audience', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { jwtAuth: { enabled: true, secret: HS_SECRET, issuer: 'https://issuer.test', audience: 'my-api' } };
    await withProxy([route('jwt-claims', port, backend, security)], async () => {
      const good = { iss: 'https://issuer.test', aud: 'my-api' };
      expect((await request(port, { headers: bearer(hsToken(good)) })).status).toEqual(200);
      // aud may be an array that contains the audience.
      expect((await request(port, { headers: bearer(hsToken({ ...good, aud: ['other', 'my-api'] })) })).status).toEqual(200);
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ ...good, iss: 'https://evil.test' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ ...good, aud: 'other-api' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ ...good, aud: ['other', 'another'] })) }));
      // A configured issuer / audience is required: a token without the claim, or with one that
      // is not a string (array of strings for aud), does not pass.
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ aud: 'my-api' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ iss: 'https://issuer.test' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({})) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ ...good, iss: 5 })) }));
      expectBearerChallenge(await request(port, { headers: bearer(hsToken({ ...good, aud: 5 })) }));
      expect(backend.hits).toEqual(2);
    });
  });
});

tap.test('jwtAuth RS256 (PEM public key): valid passes; other key, ES256 token and HS256-with-the-PEM (algorithm confusion) are 401', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('jwt-rs', port, backend, { jwtAuth: { enabled: true, secret: RSA_PUBLIC_PEM, algorithm: 'RS256' } })], async () => {
      const claims = { sub: 'rsa-user', exp: now() + 3600 };
      const valid = jwt({ alg: 'RS256', typ: 'JWT' }, claims, rs256Signer(rsa.privateKey));
      const ok = await request(port, { headers: bearer(valid) });
      expect(ok.status).toEqual(200);
      expect(ok.json.headers.authorization).toBeUndefined();

      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'RS256', typ: 'JWT' }, claims, rs256Signer(otherRsa.privateKey))) }));
      expectBearerChallenge(await request(port, { headers: bearer(withPayload(valid, { ...claims, sub: 'root' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(withFlippedSignature(valid)) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'ES256', typ: 'JWT' }, claims, es256Signer(ec.privateKey))) }));
      // Algorithm confusion: HMAC keyed with the public key's PEM text, exactly as configured.
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, claims, hmacSigner('HS256', RSA_PUBLIC_PEM))) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, claims, hmacSigner('HS256', RSA_PUBLIC_PEM.trim()))) }));
      // RS256 in the header over an HMAC-with-the-PEM signature.
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'RS256', typ: 'JWT' }, claims, hmacSigner('HS256', RSA_PUBLIC_PEM))) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'none', typ: 'JWT' }, claims, noSigner)) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'RS256', typ: 'JWT' }, { ...claims, exp: now() - 120 }, rs256Signer(rsa.privateKey))) }));
      expect(backend.hits).toEqual(1);
    });
  });
});

tap.test('jwtAuth ES256 (PEM public key): valid passes; other key, RS256 token, tampering and confusion are 401', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('jwt-es', port, backend, { jwtAuth: { enabled: true, secret: EC_PUBLIC_PEM, algorithm: 'ES256' } })], async () => {
      const claims = { sub: 'ec-user', exp: now() + 3600 };
      const valid = jwt({ alg: 'ES256', typ: 'JWT' }, claims, es256Signer(ec.privateKey));
      expect((await request(port, { headers: bearer(valid) })).status).toEqual(200);
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'ES256', typ: 'JWT' }, claims, es256Signer(otherEc.privateKey))) }));
      expectBearerChallenge(await request(port, { headers: bearer(withPayload(valid, { ...claims, sub: 'root' })) }));
      expectBearerChallenge(await request(port, { headers: bearer(withFlippedSignature(valid)) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'RS256', typ: 'JWT' }, claims, rs256Signer(rsa.privateKey))) }));
      expectBearerChallenge(await request(port, { headers: bearer(jwt({ alg: 'HS256', typ: 'JWT' }, claims, hmacSigner('HS256', EC_PUBLIC_PEM))) }));
      // A DER signature (not the JOSE r||s form) is not accepted.
      const der = jwt({ alg: 'ES256', typ: 'JWT' }, claims, (input) => createSign('SHA256').update(input).sign(ec.privateKey));
      expectBearerChallenge(await request(port, { headers: bearer(der) }));
      expect(backend.hits).toEqual(1);
    });
  });
});

tap.test('jwt claims in request header templates reach the backend; forwardAuthorization passes the token on', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const headers = { request: { 'X-User': '{jwt.sub}', 'X-Role': '{jwt.role}', 'X-Route': '{routeName}' } };
    await withProxy(
      [
        route('jwt-claims-headers', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET } }, { headers }),
        route('jwt-forward', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET }, forwardAuthorization: true }, { headers }, 'fwd.test'),
      ],
      async () => {
        const token = hsToken({ sub: 'alice', role: 'admin' });
        const ok = await request(port, { headers: bearer(token) });
        expect(ok.status).toEqual(200);
        expect(ok.json.headers['x-user']).toEqual('alice');
        expect(ok.json.headers['x-role']).toEqual('admin');
        expect(ok.json.headers['x-route']).toEqual('jwt-claims-headers');
        expect(ok.json.headers.authorization).toBeUndefined();

        const other = await request(port, { headers: bearer(hsToken({ sub: 'bob', role: 'viewer' })) });
        expect(other.json.headers['x-user']).toEqual('bob');
        expect(other.json.headers['x-role']).toEqual('viewer');

        // A client cannot supply the claim headers itself past a failed check.
        expectBearerChallenge(await request(port, { headers: { 'x-user': 'root', 'x-role': 'admin' } }));

        const fwd = await request(port, { host: 'fwd.test', headers: bearer(token) });
        expect(fwd.status).toEqual(200);
        expect(fwd.json.headers.authorization).toEqual(`Bearer ${token}`);
        expect(fwd.json.headers['x-user']).toEqual('alice');
        expect(backend.hits).toEqual(3);
      },
    );
  });
});

tap.test('jwtAuth excludePaths skip the token check', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { jwtAuth: { enabled: true, secret: HS_SECRET, excludePaths: ['/health', '/public/*'] } };
    await withProxy([route('jwt-exclude', port, backend, security)], async () => {
      expect((await request(port, { path: '/health' })).status).toEqual(200);
      expect((await request(port, { path: '/public/x' })).status).toEqual(200);
      expectBearerChallenge(await request(port, { path: '/api' }));
      expect((await request(port, { path: '/api', headers: bearer(hsToken()) })).status).toEqual(200);
      expect(backend.hits).toEqual(3);
    });
  });
});

// ---------------------------------------------------------------------------------------------
// maxConnections on HTTP, and the order of the checks
// ---------------------------------------------------------------------------------------------

/** Retries `run` until it answers `status` (within `timeoutMs`). */
async function eventually(run: () => Promise<IResult>, status: number, timeoutMs = 3000): Promise<IResult> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await run();
    if (res.status === status || Date.now() > deadline) return res;
    await sleep(50);
  }
}

tap.test('maxConnections on an HTTP route: a client that leaves while its request waits on a silent backend frees its slot', async () => {
  const [port] = await freePorts(1);
  // The first request is never answered; later ones are.
  let seen = 0;
  const backend = http.createServer((_req, res) => {
    if (++seen > 1) res.end('ok');
  });
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  const backendPort = (backend.address() as AddressInfo).port;
  const routes: IRouteConfig[] = [
    { name: 'one-at-a-time', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: backendPort }] }, security: { maxConnections: 1 } },
  ];
  try {
    await withProxy(routes, async () => {
      const gone = net.connect(port, '127.0.0.1', () => gone.write('GET /slow HTTP/1.1\r\nHost: app.test\r\n\r\n'));
      gone.on('error', () => undefined);
      await waitFor(() => seen === 1);
      gone.destroy();
      // Its request still waits upstream, but the client is gone: the next client is admitted
      // (503 until the proxy has seen it go).
      const deadline = Date.now() + 5000;
      let status = 0;
      while (status !== 200 && Date.now() < deadline) {
        status = (await request(port, { path: '/next' })).status;
        if (status !== 200) await sleep(100);
      }
      expect(status).toEqual(200);
    });
  } finally {
    backend.closeAllConnections();
    await new Promise<void>((resolve) => backend.close(() => resolve()));
  }
});

tap.test('maxConnections on an HTTP route: 503 while N requests are in flight, admitted again once one finishes', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('maxconn', port, backend, { maxConnections: 2 })], async () => {
      const first = request(port, { path: '/hold/1' });
      const second = request(port, { path: '/hold/2' });
      await waitFor(() => backend.held === 2, 5000, 'two requests held by the backend');
      const refused = await request(port, { path: '/third' });
      expect(refused.status).toEqual(503);
      expect((await request(port, { path: '/fourth', localAddress: '127.0.0.2' })).status).toEqual(503);
      expect(backend.hits).toEqual(2);

      // The backend answers the held request that reached it first, whichever of the two that was.
      backend.releaseOne();
      expect((await Promise.race([first, second])).status).toEqual(200);
      const admitted = await eventually(() => request(port, { path: '/after' }), 200);
      expect(admitted.status).toEqual(200);
      expect(admitted.json.url).toEqual('/after');
      backend.releaseAll();
      expect((await first).status).toEqual(200);
      expect((await second).status).toEqual(200);
      expect(backend.requests.map((r) => r.url).sort()).toEqual(['/after', '/hold/1', '/hold/2']);
    });
  });
});

tap.test('order: IP list (403) before rate limit (429) before auth (401); refused requests never reach the backend; refusals counted', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = {
      ipAllowList: ['127.0.0.1'],
      rateLimit: { enabled: true, maxRequests: 1, window: 60 },
      basicAuth: { enabled: true, users: USERS },
    };
    await withProxy([route('order', port, backend, security)], async (proxy) => {
      const good = { authorization: basic('alice', 'wonderland') };
      // Not allowed: 403 every time, with or without credentials, and no rate budget spent on it.
      for (let i = 0; i < 3; i++) expect((await request(port, { localAddress: '127.0.0.4', headers: good })).status).toEqual(403);
      // Allowed IP: the first request spends the budget even though it fails auth...
      expectBasicChallenge(await request(port), 'Restricted');
      // ...so the next ones are rate limited, with or without credentials.
      const limited = await request(port);
      expect(limited.status).toEqual(429);
      expect(limited.headers['www-authenticate']).toBeUndefined();
      expect((await request(port, { headers: good })).status).toEqual(429);
      expect(backend.hits).toEqual(0);
      expect(refusals(proxy, 'order')).toEqual({ rateLimited: 2, unauthorized: 1, forbidden: 3 });
    });
  });
});

tap.test('order: maxConnections (503) before rate limit (429)', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { maxConnections: 1, rateLimit: { enabled: true, maxRequests: 1, window: 60 } };
    await withProxy([route('order-conn', port, backend, security)], async (proxy) => {
      const held = request(port, { path: '/hold' });
      await waitFor(() => backend.held === 1, 5000, 'the request to be held');
      // The budget is spent, but the connection limit answers first.
      expect((await request(port, { path: '/busy' })).status).toEqual(503);
      backend.releaseAll();
      expect((await held).status).toEqual(200);
      const after = await eventually(() => request(port, { path: '/later' }), 429);
      expect(after.status).toEqual(429);
      expect(backend.hits).toEqual(1);
      expect(refusals(proxy, 'order-conn').rateLimited).toEqual(1);
    });
  });
});

tap.test('order: rate limit before JWT', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 2, window: 60 }, jwtAuth: { enabled: true, secret: HS_SECRET } };
    await withProxy([route('order-jwt', port, backend, security)], async (proxy) => {
      expect((await request(port, { headers: bearer(hsToken()) })).status).toEqual(200);
      expectBearerChallenge(await request(port, { headers: bearer('bad') }));
      expect((await request(port, { headers: bearer(hsToken()) })).status).toEqual(429);
      expect((await request(port)).status).toEqual(429);
      expect(backend.hits).toEqual(1);
      expect(refusals(proxy, 'order-jwt')).toEqual({ rateLimited: 2, unauthorized: 1, forbidden: 0 });
    });
  });
});

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c, prior knowledge)
// ---------------------------------------------------------------------------------------------

tap.test('h2c: basic auth (401 with challenge, 200, Authorization not forwarded) on one session', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy([route('h2-basic', port, backend, { basicAuth: { enabled: true, users: USERS, realm: 'h2 realm' } })], async () => {
      const client = h2connect(port);
      try {
        expectBasicChallenge(await h2request(client, '/a'), 'h2 realm');
        expectBasicChallenge(await h2request(client, '/a', { authorization: basic('alice', 'nope') }), 'h2 realm');
        expectBasicChallenge(await h2request(client, '/a', { authorization: 'Basic !!!' }), 'h2 realm');
        const ok = await h2request(client, '/a', { authorization: basic('alice', 'wonderland') });
        expect(ok.status).toEqual(200);
        expect(ok.json.url).toEqual('/a');
        expect(ok.json.headers.authorization).toBeUndefined();
        // Concurrent streams, mixed.
        const results = await Promise.all(
          Array.from({ length: 10 }, (_, i) => h2request(client, `/c/${i}`, i % 2 === 0 ? { authorization: basic('bob', 'p:w with spaces') } : {})),
        );
        results.forEach((r, i) => expect(r.status).toEqual(i % 2 === 0 ? 200 : 401));
        expect(backend.hits).toEqual(6);
      } finally {
        client.destroy();
      }
    });
  });
});

tap.test('h2c: rate limit, sequential and over concurrent streams (exactly N pass)', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    await withProxy(
      [
        route('h2-rl', port, backend, { rateLimit: { enabled: true, maxRequests: 3, window: 60 } }),
        route('h2-rl-burst', port, backend, { rateLimit: { enabled: true, maxRequests: 4, window: 60 } }, {}, 'burst.test'),
      ],
      async (proxy) => {
        const client = h2connect(port);
        try {
          for (let i = 0; i < 3; i++) expect((await h2request(client, `/s/${i}`)).status).toEqual(200);
          const refused = await h2request(client, '/s/over');
          expect(refused.status).toEqual(429);
          expectRetryAfter(refused, 60);
          expect(refused.text.trim()).toEqual('Too Many Requests');
        } finally {
          client.destroy();
        }
        const burst = h2connect(port, 'burst.test');
        try {
          const results = await Promise.all(Array.from({ length: 12 }, (_, i) => h2request(burst, `/b/${i}`)));
          expect(results.filter((r) => r.status === 200).length).toEqual(4);
          expect(results.filter((r) => r.status === 429).length).toEqual(8);
        } finally {
          burst.destroy();
        }
        expect(backend.hits).toEqual(7);
        expect(refusals(proxy, 'h2-rl').rateLimited).toEqual(1);
        expect(refusals(proxy, 'h2-rl-burst').rateLimited).toEqual(8);
      },
    );
  });
});

tap.test('h2c: JWT with claims in headers', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const route1 = route('h2-jwt', port, backend, { jwtAuth: { enabled: true, secret: HS_SECRET } }, { headers: { request: { 'X-User': '{jwt.sub}' } } });
    await withProxy([route1], async () => {
      const client = h2connect(port);
      try {
        expectBearerChallenge(await h2request(client, '/j'));
        const ok = await h2request(client, '/j', bearer(hsToken({ sub: 'h2-user' })));
        expect(ok.status).toEqual(200);
        expect(ok.json.headers['x-user']).toEqual('h2-user');
        expect(ok.json.headers.authorization).toBeUndefined();
        expect(backend.hits).toEqual(1);
      } finally {
        client.destroy();
      }
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Helpers, validation
// ---------------------------------------------------------------------------------------------

tap.test('route helpers: addRateLimiting, addBasicAuth, addJwtAuth on createHttpRoute start and enforce', async () => {
  const [rlPort, basicPort, jwtPort] = await freePorts(3);
  await withBackend(async (backend) => {
    const base = (port: number): IRouteConfig => createHttpRoute('app.test', { host: '127.0.0.1', port: backend.port }, { match: { ports: port } as never });
    const routes = [
      addRateLimiting(base(rlPort), { maxRequests: 2, window: 60 }),
      addBasicAuth(base(basicPort), { users: USERS }),
      addJwtAuth(base(jwtPort), { secret: HS_SECRET }),
    ];
    routes.forEach((r, i) => (r.name = `helper-${i}`));
    expect(routes[0].security?.rateLimit?.enabled).toBeTrue();
    expect(routes[1].security?.basicAuth?.enabled).toBeTrue();
    expect(routes[2].security?.jwtAuth?.enabled).toBeTrue();
    await withProxy(routes, async () => {
      expect((await request(rlPort)).status).toEqual(200);
      expect((await request(rlPort)).status).toEqual(200);
      expect((await request(rlPort)).status).toEqual(429);
      expectBasicChallenge(await request(basicPort), 'Restricted');
      expect((await request(basicPort, { headers: { authorization: basic('alice', 'wonderland') } })).status).toEqual(200);
      expectBearerChallenge(await request(jwtPort));
      expect((await request(jwtPort, { headers: bearer(hsToken()) })).status).toEqual(200);
      expect(backend.hits).toEqual(4);
    });
  });
});

tap.test('config: rateLimit/basicAuth/jwtAuth on a passthrough or raw route throw SmartProxyConfigError naming the field', async () => {
  const [port] = await freePorts(1);
  const target = { host: '127.0.0.1', port: 9 };
  const cases: Array<{ field: string; security: IRouteSecurity }> = [
    { field: 'rateLimit', security: { rateLimit: { enabled: true, maxRequests: 5, window: 10 } } },
    { field: 'basicAuth', security: { basicAuth: { enabled: true, users: USERS } } },
    { field: 'jwtAuth', security: { jwtAuth: { enabled: true, secret: HS_SECRET } } },
  ];
  for (const { field, security } of cases) {
    const variants: IRouteConfig[] = [
      { name: 'pt', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', targets: [target], tls: { mode: 'passthrough' } }, security },
      { name: 'raw', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', targets: [target], options: { raw: true } }, security },
    ];
    for (const r of variants) {
      let error: unknown;
      try {
        new SmartProxy({ routes: [r], gracefulShutdownTimeout: 300 });
      } catch (err) {
        error = err;
      }
      expect(error instanceof SmartProxyConfigError).toBeTrue();
      const message = (error as Error).message;
      if (!message.startsWith(`routes[0] "${r.name}": security.${field}`)) throw new Error(`unexpected message for ${r.name}/${field}: ${message}`);
    }
  }
  // The same security on a plain HTTP route is accepted (and enabled: false anywhere is fine).
  new SmartProxy({ routes: [route('fine', port, { port: 9 }, cases[0].security)], gracefulShutdownTimeout: 300 });
  new SmartProxy({
    routes: [
      {
        name: 'off',
        match: { ports: port },
        action: { type: 'forward', targets: [target], tls: { mode: 'passthrough' } },
        security: { rateLimit: { enabled: false, maxRequests: 1, window: 1 } },
      },
    ],
    gracefulShutdownTimeout: 300,
  });
});

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

tap.test('rateLimit.maxKeys: the least recently used key is forgotten at the cap (counted); long values are keyed by their digest', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 1, window: 300, keyBy: 'header', headerName: 'x-key', maxKeys: 3 } };
    await withProxy([route('capped', port, backend, security)], async (proxy) => {
      const status = async (key: string): Promise<number> => (await request(port, { headers: { 'x-key': key } })).status;
      expect(await status('k1')).toEqual(200);
      expect(await status('k1')).toEqual(429);
      for (const key of ['k2', 'k3', 'k4']) expect(await status(key)).toEqual(200);
      // k1 was the least recently used of four keys in a map of three: forgotten, so fresh again.
      expect(await status('k1')).toEqual(200);
      expect(proxy.getStatistics().rateLimitEvictions).toBeGreaterThan(0);
      // Two long values that differ only at their end have budgets of their own.
      const long = 'v'.repeat(4096);
      expect(await status(`${long}a`)).toEqual(200);
      expect(await status(`${long}b`)).toEqual(200);
      expect(await status(`${long}a`)).toEqual(429);
    });
  });
});

tap.test('memory: 100,000 distinct rate-limit keys leave memory bounded', async () => {
  const [port] = await freePorts(1);
  await withBackend(async (backend) => {
    // The window outlasts the flood even on a slow machine, so key-7 is still limited afterwards.
    const security: IRouteSecurity = { rateLimit: { enabled: true, maxRequests: 1, window: 300, keyBy: 'header', headerName: 'x-key' } };
    await withProxy([route('flood', port, backend, security)], async (proxy) => {
      const total = 100_000;
      const workers = 8;
      const agents = Array.from({ length: workers }, () => new http.Agent({ keepAlive: true, maxSockets: 1 }));
      // Warm up (connections, pools), then measure.
      await Promise.all(agents.map((agent, w) => request(port, { agent, headers: { 'x-key': `warm-${w}` } })));
      global.gc?.();
      const rssBefore = process.memoryUsage().rss;
      const started = Date.now();
      let next = 0;
      let ok = 0;
      let limited = 0;
      try {
        await Promise.all(
          agents.map(async (agent) => {
            for (;;) {
              const i = next++;
              if (i >= total) return;
              const res = await request(port, { agent, path: '/f', headers: { 'x-key': `key-${i}` } });
              if (res.status === 200) ok++;
              else if (res.status === 429) limited++;
            }
          }),
        );
      } finally {
        for (const agent of agents) agent.destroy();
      }
      const seconds = (Date.now() - started) / 1000;
      global.gc?.();
      const rssAfter = process.memoryUsage().rss;
      const delta = (rssAfter - rssBefore) / MiB;
      console.log(`RSS delta: ${delta.toFixed(1)} MiB (${total} keys in ${seconds.toFixed(1)} s, ${Math.round(total / seconds)} req/s)`);
      expect(ok).toEqual(total);
      expect(limited).toEqual(0);
      expect(seconds < 60).toBeTrue();
      expect(delta < 300).toBeTrue();
      // The limiter still works after the flood.
      expect((await request(port, { headers: { 'x-key': 'key-7' } })).status).toEqual(429);
      expect((await request(port, { headers: { 'x-key': 'fresh' } })).status).toEqual(200);
      expect(backend.hits).toEqual(total + workers + 1);
      expect(refusals(proxy, 'flood').rateLimited).toEqual(1);
    });
  });
});

tap.start({ throwOnError: true });
