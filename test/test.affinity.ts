// Session affinity end to end: an MCP-style backend pair that issues session ids (a response
// header, or a Set-Cookie), clients that start a session and carry its id on new connections, and
// real redis-server processes shared by two proxy replicas (stopped and restarted mid-run). Keys:
// `header:Mcp-Session-Id`, `cookie:sid` and `ip` (clients bound to 127.0.0.X).
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, sleep, waitFor, withCleanup } from './helpers/net.js';

// ---------------------------------------------------------------------------------------------
// The MCP-style backend: `POST /mcp` without a session id creates one (`<name>-<counter>`) and
// issues it (header `Mcp-Session-Id`, or `Set-Cookie: sid=<id>; Path=/`); with an id it issued it
// answers `{ backend, session, n }`; with an id it does not know, 400 `unknown session`.

interface IMcpBackend {
  name: string;
  port: number;
  /** Every request that reached this backend. */
  requests: Array<{ session: string | null; host: string | undefined; headers: http.IncomingHttpHeaders }>;
  /** Session ids this backend issued. */
  issued: string[];
  close(): Promise<void>;
}

async function startMcpBackend(name: string, issueAs: 'header' | 'cookie' = 'header'): Promise<IMcpBackend> {
  const sessions = new Map<string, number>();
  let counter = 0;
  const requests: IMcpBackend['requests'] = [];
  const issued: string[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (d: Buffer) => chunks.push(d));
    req.on('end', () => {
      const headerId = req.headers['mcp-session-id'];
      let session: string | null = typeof headerId === 'string' && headerId !== '' ? headerId : null;
      if (session === null && req.headers.cookie) {
        const pair = req.headers.cookie.split(';').map((p) => p.trim()).find((p) => p.startsWith('sid='));
        if (pair) session = pair.slice(4);
      }
      requests.push({ session, host: req.headers.host, headers: req.headers });
      if (session === null) {
        const id = `${name}-${++counter}`;
        sessions.set(id, 0);
        issued.push(id);
        if (issueAs === 'header') res.setHeader('Mcp-Session-Id', id);
        else res.setHeader('Set-Cookie', `sid=${id}; Path=/`);
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ backend: name, session: id, n: 0 }));
        return;
      }
      if (!sessions.has(session)) {
        res.statusCode = 400;
        res.setHeader('content-type', 'text/plain');
        res.end('unknown session');
        return;
      }
      const n = sessions.get(session)! + 1;
      sessions.set(session, n);
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ backend: name, session, n }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    name,
    port: (server.address() as net.AddressInfo).port,
    requests,
    issued,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The client: one POST /mcp per new connection (agent: false), Host mcp.test.

interface IAnswer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  /** The parsed JSON body, or null when it is not JSON (e.g. the proxy's 400). */
  json: { backend: string; session: string; n: number } | null;
}

function post(port: number, opts: { session?: string; cookie?: string; localAddress?: string } = {}): Promise<IAnswer> {
  return new Promise((resolve, reject) => {
    const headers: http.OutgoingHttpHeaders = { host: 'mcp.test', 'content-type': 'application/json' };
    if (opts.session !== undefined) headers['mcp-session-id'] = opts.session;
    if (opts.cookie !== undefined) headers.cookie = opts.cookie;
    const req = http.request(
      { host: '127.0.0.1', port, method: 'POST', path: '/mcp', agent: false, localAddress: opts.localAddress, headers },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => {
          let json: IAnswer['json'] = null;
          try {
            json = JSON.parse(body);
          } catch {
            json = null;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body, json });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end('{"jsonrpc":"2.0","method":"ping","id":1}');
  });
}

/** Starts a session through `port` (a POST without an id) and returns the issued id and its backend. */
async function startSession(port: number): Promise<{ id: string; backend: string }> {
  const answer = await post(port);
  expect(answer.status).toEqual(200);
  const id = answer.headers['mcp-session-id'];
  expect(typeof id).toEqual('string');
  expect(answer.json!.session).toEqual(id);
  return { id: id as string, backend: answer.json!.backend };
}

// ---------------------------------------------------------------------------------------------
// redis-server as a child process, and a raw RESP client to inspect it.

interface IRedis {
  port: number;
  child: ChildProcess;
  /** SIGKILL, and wait until it exited. */
  kill(): Promise<void>;
}

/** One command; resolves with the reply (a string for simple/bulk strings, a number, null, or an Error for `-ERR`). */
function redisCommand(port: number, ...args: string[]): Promise<string | number | null | Error> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let buf = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error('redis did not answer'));
    }, 1000);
    const done = (value: string | number | null | Error): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(value);
    };
    socket.on('connect', () => {
      socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`);
    });
    socket.on('data', (d: Buffer) => {
      buf += d.toString();
      const end = buf.indexOf('\r\n');
      if (end < 0) return;
      const line = buf.slice(1, end);
      switch (buf[0]) {
        case '+':
          return done(line);
        case '-':
          return done(new Error(line));
        case ':':
          return done(Number(line));
        case '$': {
          const len = Number(line);
          if (len < 0) return done(null);
          if (buf.length >= end + 2 + len + 2) done(buf.slice(end + 2, end + 2 + len));
          return;
        }
        default:
          return done(new Error(`unexpected reply ${JSON.stringify(buf)}`));
      }
    });
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function redisAnswersPing(port: number): Promise<boolean> {
  try {
    return (await redisCommand(port, 'PING')) === 'PONG';
  } catch {
    return false;
  }
}

async function startRedis(port: number): Promise<IRedis> {
  const child = spawn('/usr/bin/redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1'], {
    stdio: ['ignore', 'ignore', 'ignore'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 5000;
  while (!(await redisAnswersPing(port))) {
    if (child.exitCode !== null) throw new Error(`redis-server on ${port} exited with ${child.exitCode}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`redis-server on ${port} did not answer PING`);
    }
    await sleep(30);
  }
  return {
    port,
    child,
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

// ---------------------------------------------------------------------------------------------

type TAffinity = NonNullable<NonNullable<IRouteConfig['action']['loadBalancing']>['affinity']>;

function mcpRoute(port: number, backends: IMcpBackend[], affinity: TAffinity): IRouteConfig {
  return {
    name: 'mcp',
    match: { ports: port, domains: 'mcp.test' },
    action: {
      type: 'forward',
      targets: backends.map((b) => ({ host: '127.0.0.1', port: b.port })),
      loadBalancing: { algorithm: 'round-robin', affinity },
    },
  };
}

const mcpAffinity: TAffinity = { key: 'header:Mcp-Session-Id', ttlSeconds: 3600, onUnknown: 'assign' };

async function startProxy(options: ConstructorParameters<typeof SmartProxy>[0], defer: (fn: () => Promise<unknown>) => void): Promise<SmartProxy> {
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 200, ...options });
  await proxy.start();
  defer(() => proxy.stop());
  return proxy;
}

async function startBackends(defer: (fn: () => Promise<unknown>) => void, prefix: string, issueAs: 'header' | 'cookie' = 'header'): Promise<[IMcpBackend, IMcpBackend]> {
  const a = await startMcpBackend(`${prefix}a`, issueAs);
  defer(() => a.close());
  const b = await startMcpBackend(`${prefix}b`, issueAs);
  defer(() => b.close());
  return [a, b];
}

async function noConnectionsLeft(...proxies: SmartProxy[]): Promise<void> {
  for (const proxy of proxies) {
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 3000, 'active connections to reach 0');
  }
}

// ---------------------------------------------------------------------------------------------

tap.test('memory only: a whole session (10 requests on new connections) stays on the issuing backend; the next session goes to the other one', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't1');
    const [port] = await freePorts(1);
    const proxy = await startProxy({ routes: [mcpRoute(port, [a, b], mcpAffinity)] }, defer);
    expect(proxy.getStatistics().affinity).not.toEqual(null);

    const first = await startSession(port);
    for (let i = 1; i <= 10; i++) {
      const answer = await post(port, { session: first.id });
      expect(answer.status).toEqual(200);
      expect(answer.json).toEqual({ backend: first.backend, session: first.id, n: i });
    }
    const second = await startSession(port);
    expect(second.backend).not.toEqual(first.backend);
    for (let i = 1; i <= 10; i++) {
      const answer = await post(port, { session: second.id });
      expect(answer.status).toEqual(200);
      expect(answer.json).toEqual({ backend: second.backend, session: second.id, n: i });
    }
    // Both backends got a session, and each saw exactly its own session's requests.
    expect(a.issued.length).toEqual(1);
    expect(b.issued.length).toEqual(1);
    expect(a.requests.length).toEqual(11);
    expect(b.requests.length).toEqual(11);
    // The backend got the original request: Host and the session header unchanged.
    for (const r of [...a.requests, ...b.requests]) expect(r.host).toEqual('mcp.test');
    const issuer = first.backend === a.name ? a : b;
    expect(issuer.requests.filter((r) => r.session === first.id).length).toEqual(10);

    const stats = proxy.getStatistics().affinity!;
    expect(stats.lookups).toEqual(20);
    expect(stats.redisLookups).toEqual(0);
    expect(stats.redisFallbacks).toEqual(0);
    expect(stats.memoryEntries).toEqual(2);
    await noConnectionsLeft(proxy);
  });
});

tap.test('maxKeys: 200 unique 8 KiB session values keep at most maxKeys bindings (evictions counted); a long value is bound by its digest', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 'tk');
    const [port] = await freePorts(1);
    const proxy = await startProxy({ routes: [mcpRoute(port, [a, b], { ...mcpAffinity, maxKeys: 20 })] }, defer);
    const long = (i: number): string => `${'s'.repeat(8 * 1024)}-${i}`;
    // Ids the backends never issued: each is bound on first sight (onUnknown 'assign') and the
    // backend answers for itself that it does not know it.
    for (let i = 0; i < 200; i++) expect((await post(port, { session: long(i) })).body).toEqual('unknown session');
    const stats = proxy.getStatistics().affinity!;
    expect(stats.memoryEntries).toBeLessThan(21);
    expect(stats.evictions).toBeGreaterThan(179);
    // The newest long value is still bound (by its digest): its next requests go where its first went.
    const reached = (backend: IMcpBackend): number => backend.requests.filter((r) => r.session === long(199)).length;
    const first = reached(a) === 1 ? a : b;
    for (let i = 0; i < 3; i++) await post(port, { session: long(199) });
    expect(reached(first)).toEqual(4);
    await noConnectionsLeft(proxy);
  });
});

tap.test("onUnknown 'reject': an id nobody issued gets 400 from the proxy and never reaches a backend; a fresh session works", async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't2');
    const [port] = await freePorts(1);
    const proxy = await startProxy({ routes: [mcpRoute(port, [a, b], { key: 'header:Mcp-Session-Id', onUnknown: 'reject' })] }, defer);

    for (const forged of ['forged-1', 't2a-1', 't2b-1']) {
      const answer = await post(port, { session: forged });
      expect(answer.status).toEqual(400);
      expect(answer.json).toEqual(null);
    }
    expect(a.requests.length + b.requests.length).toEqual(0);

    const session = await startSession(port);
    for (let i = 1; i <= 3; i++) {
      const answer = await post(port, { session: session.id });
      expect(answer.status).toEqual(200);
      expect(answer.json).toEqual({ backend: session.backend, session: session.id, n: i });
    }
    expect(a.requests.length + b.requests.length).toEqual(4);
    // A forged id is still refused after a real session exists.
    expect((await post(port, { session: 'forged-2' })).status).toEqual(400);
    expect(a.requests.length + b.requests.length).toEqual(4);
    await noConnectionsLeft(proxy);
  });
});

tap.test('two replicas sharing redis: a session created through proxy 1 continues through proxy 2 (alternating), on the issuing backend', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't3');
    const [p1, p2, redisPort] = await freePorts(3);
    const redis = await startRedis(redisPort);
    defer(() => redis.kill());
    const redisOption = { url: `redis://127.0.0.1:${redisPort}`, keyPrefix: 'test3:' };
    const proxy1 = await startProxy({ redis: redisOption, routes: [mcpRoute(p1, [a, b], mcpAffinity)] }, defer);
    const proxy2 = await startProxy({ redis: redisOption, routes: [mcpRoute(p2, [a, b], mcpAffinity)] }, defer);

    const withId = { [p1]: 0, [p2]: 0 };
    for (let s = 0; s < 2; s++) {
      const session = await startSession(p1);
      // The binding is in redis, under the route's name, naming the backend as host:port.
      const issuer = session.backend === a.name ? a : b;
      expect(await redisCommand(redisPort, 'GET', `test3:affinity:mcp:${session.id}`)).toEqual(`127.0.0.1:${issuer.port}`);
      for (let i = 1; i <= 8; i++) {
        const port = i % 2 === 1 ? p2 : p1;
        const answer = await post(port, { session: session.id });
        withId[port]++;
        expect(answer.status).toEqual(200);
        expect(answer.json).toEqual({ backend: session.backend, session: session.id, n: i });
      }
    }
    // Round robin on proxy 1 put the two sessions on different backends.
    expect(a.issued.length).toEqual(1);
    expect(b.issued.length).toEqual(1);

    const s1 = proxy1.getStatistics().affinity!;
    const s2 = proxy2.getStatistics().affinity!;
    expect(s1.redisLookups > 0).toBeTrue();
    expect(s2.redisLookups > 0).toBeTrue();
    expect(s1.redisLookups <= withId[p1]).toBeTrue();
    expect(s2.redisLookups <= withId[p2]).toBeTrue();
    expect(s1.redisFallbacks).toEqual(0);
    expect(s2.redisFallbacks).toEqual(0);
    await noConnectionsLeft(proxy1, proxy2);
  });
});

tap.test('TTL: with ttlSeconds 1 a session used at once works; after 2.5 s unused it is unknown (400) on both replicas', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't4');
    const [p1, p2, redisPort] = await freePorts(3);
    const redis = await startRedis(redisPort);
    defer(() => redis.kill());
    const redisOption = { url: `redis://127.0.0.1:${redisPort}`, keyPrefix: 'test4:' };
    const affinity: TAffinity = { key: 'header:Mcp-Session-Id', ttlSeconds: 1, onUnknown: 'reject' };
    const proxy1 = await startProxy({ redis: redisOption, routes: [mcpRoute(p1, [a, b], affinity)] }, defer);
    const proxy2 = await startProxy({ redis: redisOption, routes: [mcpRoute(p2, [a, b], affinity)] }, defer);

    const session = await startSession(p1);
    const first = await post(p1, { session: session.id });
    expect(first.status).toEqual(200);
    expect(first.json!.backend).toEqual(session.backend);
    const second = await post(p2, { session: session.id });
    expect(second.status).toEqual(200);
    expect(second.json).toEqual({ backend: session.backend, session: session.id, n: 2 });
    const reached = a.requests.length + b.requests.length;

    await sleep(2500);
    for (const port of [p1, p2]) {
      const answer = await post(port, { session: session.id });
      expect(answer.status).toEqual(400);
      expect(answer.json).toEqual(null);
    }
    // Both 400s came from the proxies: the backend (which still knows the session) saw neither.
    expect(a.requests.length + b.requests.length).toEqual(reached);
    expect(await redisCommand(redisPort, 'EXISTS', `test4:affinity:mcp:${session.id}`)).toEqual(0);
    await noConnectionsLeft(proxy1, proxy2);
  });
});

tap.test('redis stopped mid-run: live sessions are served from memory (fallbacks counted); after a restart new sessions are shared again', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't5');
    const [p1, p2, redisPort] = await freePorts(3);
    let redis = await startRedis(redisPort);
    defer(() => redis.kill());
    const redisOption = { url: `redis://127.0.0.1:${redisPort}`, keyPrefix: 'test5:' };
    const affinity: TAffinity = { key: 'header:Mcp-Session-Id', ttlSeconds: 3600, onUnknown: 'reject' };
    const proxy1 = await startProxy({ redis: redisOption, routes: [mcpRoute(p1, [a, b], affinity)] }, defer);
    const proxy2 = await startProxy({ redis: redisOption, routes: [mcpRoute(p2, [a, b], affinity)] }, defer);

    const session = await startSession(p1);
    expect((await post(p1, { session: session.id })).json!.backend).toEqual(session.backend);
    expect((await post(p2, { session: session.id })).json!.backend).toEqual(session.backend);
    expect(proxy1.getStatistics().affinity!.redisFallbacks).toEqual(0);

    await redis.kill();
    for (let i = 0; i < 5; i++) {
      const answer = await post(p1, { session: session.id });
      expect(answer.status).toEqual(200);
      expect(answer.json!.backend).toEqual(session.backend);
      expect(answer.json!.session).toEqual(session.id);
    }
    expect(proxy1.getStatistics().affinity!.redisFallbacks > 0).toBeTrue();

    redis = await startRedis(redisPort);
    // Once both replicas reach redis again, a new session made through proxy 1 is known to proxy 2.
    // (A replica finds its old connection broken on its first call after the restart: that call is
    // answered from memory, hence the bounded retry with a fresh session each time.)
    let shared: { id: string; backend: string } | null = null;
    const deadline = Date.now() + 10_000;
    while (shared === null) {
      if (Date.now() > deadline) throw new Error('a new session did not become visible through proxy 2 after redis returned');
      const candidate = await startSession(p1);
      const through2 = await post(p2, { session: candidate.id });
      if (through2.status === 200) {
        expect(through2.json!.backend).toEqual(candidate.backend);
        shared = candidate;
      } else {
        await sleep(200);
      }
    }
    const issuer = shared.backend === a.name ? a : b;
    expect(await redisCommand(redisPort, 'GET', `test5:affinity:mcp:${shared.id}`)).toEqual(`127.0.0.1:${issuer.port}`);
    // Shared now: the next new session is visible through proxy 2 straight away.
    const next = await startSession(p1);
    const viaProxy2 = await post(p2, { session: next.id });
    expect(viaProxy2.status).toEqual(200);
    expect(viaProxy2.json!.backend).toEqual(next.backend);
    await noConnectionsLeft(proxy1, proxy2);
  });
});

tap.test('redis hung (SIGSTOP): 20 concurrent lookups each fall back to memory within the call timeout, not one after another', async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't8');
    const [p1, redisPort] = await freePorts(2);
    const redis = await startRedis(redisPort);
    defer(() => redis.kill());
    // A stopped process cannot be killed cleanly until it runs again.
    defer(() => redis.child.kill('SIGCONT'));
    const affinity: TAffinity = { key: 'header:Mcp-Session-Id', ttlSeconds: 3600, onUnknown: 'reject' };
    const proxy = await startProxy({ redis: { url: `redis://127.0.0.1:${redisPort}`, keyPrefix: 'test8:' }, routes: [mcpRoute(p1, [a, b], affinity)] }, defer);
    const session = await startSession(p1);

    redis.child.kill('SIGSTOP');
    const started = Date.now();
    const answers = await Promise.all(Array.from({ length: 20 }, () => post(p1, { session: session.id })));
    const elapsed = Date.now() - started;
    for (const answer of answers) {
      expect(answer.status).toEqual(200);
      expect(answer.json!.backend).toEqual(session.backend);
    }
    // Each lookup is bounded by 250 ms however many queue behind a pipeline that never returns;
    // serialised waits would take 20 x 250 ms. The margin is for a loaded CI machine.
    expect(elapsed < 2500).toBeTrue();
    expect(proxy.getStatistics().affinity!.redisFallbacks >= 20).toBeTrue();
    redis.child.kill('SIGCONT');
    await noConnectionsLeft(proxy);
  });
});

tap.test("key 'cookie:sid': the backend's Set-Cookie binds the session; requests with the cookie stay on that backend", async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't6', 'cookie');
    const [port] = await freePorts(1);
    const proxy = await startProxy({ routes: [mcpRoute(port, [a, b], { key: 'cookie:sid' })] }, defer);

    const backendsUsed = new Set<string>();
    for (let s = 0; s < 2; s++) {
      const start = await post(port);
      expect(start.status).toEqual(200);
      const setCookie = start.headers['set-cookie'] ?? [];
      expect(setCookie.length).toEqual(1);
      const id = /^sid=([^;]+)/.exec(setCookie[0])![1];
      expect(start.json!.session).toEqual(id);
      backendsUsed.add(start.json!.backend);
      for (let i = 1; i <= 6; i++) {
        const answer = await post(port, { cookie: `theme=dark; sid=${id}; lang=en` });
        expect(answer.status).toEqual(200);
        expect(answer.json).toEqual({ backend: start.json!.backend, session: id, n: i });
      }
    }
    expect(backendsUsed.size).toEqual(2);
    expect(proxy.getStatistics().affinity!.memoryEntries).toEqual(2);
    await noConnectionsLeft(proxy);
  });
});

tap.test("key 'ip': each client address (127.0.0.2..6) keeps reaching one backend; both backends are used", async () => {
  await withCleanup(async (defer) => {
    const [a, b] = await startBackends(defer, 't7');
    const [port] = await freePorts(1);
    const proxy = await startProxy({ routes: [mcpRoute(port, [a, b], { key: 'ip' })] }, defer);

    const byIp = new Map<string, Set<string>>();
    for (let round = 0; round < 4; round++) {
      for (let x = 2; x <= 6; x++) {
        const ip = `127.0.0.${x}`;
        const answer = await post(port, { localAddress: ip });
        expect(answer.status).toEqual(200);
        if (!byIp.has(ip)) byIp.set(ip, new Set());
        byIp.get(ip)!.add(answer.json!.backend);
      }
    }
    for (const [ip, backends] of byIp) {
      if (backends.size !== 1) throw new Error(`${ip} reached ${[...backends].join(', ')}`);
    }
    const used = new Set([...byIp.values()].map((s) => [...s][0]));
    expect(used.size).toEqual(2);
    expect(a.requests.length + b.requests.length).toEqual(20);
    expect(proxy.getStatistics().affinity!.memoryEntries).toEqual(5);
    await noConnectionsLeft(proxy);
  });
});

tap.start();
