// Load balancing end to end: weighted round robin (several targets and a host array), least
// connections on a raw TCP route, ip-hash on the client address (127.0.0.X) with minimal movement
// when a backend is removed, active health checks (HTTP GET and TCP connect) taking a backend out
// and back in, passive checks from real connect failures, fail open when every backend is down,
// and checks that stop with stop() and when updateRoutes removes the route.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig, IRouteTarget } from '../ts/index.js';
import { freePorts, sleep, startTaggedServer, startTcpServer, waitFor, connectAndRead, type ITestServer } from './helpers/net.js';

// ---------------------------------------------------------------------------------------------
// Helpers

interface IHttpBackend {
  name: string;
  port: number;
  /** Requests other than the health path (`METHOD url host`). */
  requests: string[];
  /** Health probes (`METHOD url`). */
  probes: string[];
  close(): Promise<void>;
}

/** An HTTP backend answering every request with its name; `/health` answers 200 `ok`. */
async function startHttpBackend(name: string, port = 0, host = '127.0.0.1'): Promise<IHttpBackend> {
  const requests: string[] = [];
  const probes: string[] = [];
  const server = http.createServer((req, res) => {
    if (req.url === '/health') {
      probes.push(`${req.method} ${req.url}`);
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok');
      return;
    }
    requests.push(`${req.method} ${req.url} ${req.headers.host}`);
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(name);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return {
    name,
    port: (server.address() as net.AddressInfo).port,
    requests,
    probes,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

interface IAnswer {
  status: number;
  body: string;
}

/** GET through the proxy with `Host: lb.test`; without an agent the request has a connection of its own. */
function get(port: number, opts: { agent?: http.Agent; localAddress?: string; path?: string } = {}): Promise<IAnswer> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { host: 'lb.test' };
    if (!opts.agent) headers.connection = 'close';
    const req = http.request(
      { port, host: '127.0.0.1', method: 'GET', path: opts.path ?? '/', headers, agent: opts.agent ?? false, localAddress: opts.localAddress },
      (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on('error', reject);
    req.end();
  });
}

function tally(names: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const n of names) out[n] = (out[n] ?? 0) + 1;
  return out;
}

function within(actual: number | undefined, expected: number, tolerance: number, what: string): void {
  const value = actual ?? 0;
  if (Math.abs(value - expected) > tolerance) {
    throw new Error(`${what}: expected ${expected} ±${tolerance}, got ${value}`);
  }
}

function lbRoute(port: number, targets: IRouteTarget[], loadBalancing?: IRouteConfig['action']['loadBalancing'], http = true, name = 'lb'): IRouteConfig {
  return {
    name,
    match: http ? { ports: port, domains: 'lb.test' } : { ports: port },
    action: { type: 'forward', targets, ...(loadBalancing ? { loadBalancing } : {}) },
  };
}

const local = (port: number, weight?: number): IRouteTarget => ({ host: '127.0.0.1', port, ...(weight !== undefined ? { weight } : {}) });

type BackendStat = { host: string; port: number; healthy: boolean; inFlight: number };

function backendsOf(proxy: SmartProxy, route = 'lb'): BackendStat[] {
  return proxy.getStatistics().backends?.[route] ?? [];
}

function statOf(proxy: SmartProxy, port: number, host = '127.0.0.1', route = 'lb'): BackendStat | undefined {
  return backendsOf(proxy, route).find((b) => b.port === port && b.host === host);
}

function inFlightSum(proxy: SmartProxy, route = 'lb'): number {
  return backendsOf(proxy, route).reduce((sum, b) => sum + b.inFlight, 0);
}

async function settle(proxy: SmartProxy): Promise<void> {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'every connection to close');
  expect(proxy.getStatistics().activeConnections).toEqual(0);
}

/** A held raw connection through the proxy: which backend greeted it. */
async function hold(port: number, localAddress?: string): Promise<{ name: string; socket: net.Socket }> {
  const { data, closed, socket } = await connectAndRead(port, undefined, localAddress);
  if (closed && data === '') return { name: '', socket };
  return { name: data.trim(), socket };
}

/** Opens `count` connections one after another and keeps them open (in `held`); their backends' names. */
async function holdMany(port: number, count: number, held: net.Socket[]): Promise<string[]> {
  const names: string[] = [];
  for (let i = 0; i < count; i++) {
    const c = await hold(port);
    held.push(c.socket);
    names.push(c.name);
  }
  return names;
}

const healthFast = { path: '/health', interval: 200, timeout: 500, unhealthyThreshold: 2, healthyThreshold: 2 };

// ---------------------------------------------------------------------------------------------
// 1. Weighted round robin

tap.test('weighted round robin 3:1:1 over 100 keep-alive requests gives 60/20/20; the backend sees the original Host', async () => {
  const backends = await Promise.all(['a', 'b', 'c'].map((n) => startHttpBackend(n)));
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, [local(backends[0].port, 3), local(backends[1].port), local(backends[2].port)])],
  });
  await proxy.start();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const answers: IAnswer[] = [];
    for (let i = 0; i < 100; i++) answers.push(await get(port, { agent }));
    expect(answers.every((a) => a.status === 200)).toBeTrue();
    const counts = tally(answers.map((a) => a.body));
    within(counts.a, 60, 5, 'a (weight 3)');
    within(counts.b, 20, 5, 'b (weight 1)');
    within(counts.c, 20, 5, 'c (weight 1)');
    // Every request reached its backend with the client's Host.
    for (const b of backends) expect(b.requests.every((r) => r === 'GET / lb.test')).toBeTrue();
    // Statistics: one entry per backend, healthy, nothing in flight once the answers are read.
    const stats = backendsOf(proxy);
    expect(stats.map((s) => s.port).sort()).toEqual(backends.map((b) => b.port).sort());
    expect(stats.every((s) => s.host === '127.0.0.1' && s.healthy)).toBeTrue();
    await waitFor(() => inFlightSum(proxy) === 0, 3000, 'no request in flight');
    agent.destroy();
    await settle(proxy);
  } finally {
    agent.destroy();
    await proxy.stop();
    await Promise.all(backends.map((b) => b.close()));
  }
});

tap.test('round robin without weights: three targets and a host array each share 30 requests 10/10/10', async () => {
  const targets = await Promise.all(['a', 'b', 'c'].map((n) => startHttpBackend(n)));
  // A host array: the same port on three loopback addresses.
  const [sharedPort, port1, port2] = await freePorts(3);
  const hosts = ['127.0.0.1', '127.0.0.2', '127.0.0.3'];
  const arrayBackends = await Promise.all(hosts.map((h, i) => startHttpBackend(`h${i + 1}`, sharedPort, h)));
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [
      lbRoute(port1, targets.map((b) => local(b.port)), { algorithm: 'round-robin' }),
      lbRoute(port2, [{ host: hosts, port: sharedPort }], undefined, true, 'lb-array'),
    ],
  });
  await proxy.start();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const first: string[] = [];
    for (let i = 0; i < 30; i++) {
      const a = await get(port1, { agent });
      expect(a.status).toEqual(200);
      first.push(a.body);
    }
    const c1 = tally(first);
    for (const n of ['a', 'b', 'c']) within(c1[n], 10, 2, `target ${n}`);

    const second: string[] = [];
    for (let i = 0; i < 30; i++) {
      const a = await get(port2); // a new connection each time
      expect(a.status).toEqual(200);
      second.push(a.body);
    }
    const c2 = tally(second);
    for (const n of ['h1', 'h2', 'h3']) within(c2[n], 10, 2, `host-array backend ${n}`);
    expect(backendsOf(proxy, 'lb-array').map((s) => `${s.host}:${s.port}`).sort()).toEqual(hosts.map((h) => `${h}:${sharedPort}`));
    agent.destroy();
    await settle(proxy);
  } finally {
    agent.destroy();
    await proxy.stop();
    await Promise.all([...targets, ...arrayBackends].map((b) => b.close()));
  }
});

// ---------------------------------------------------------------------------------------------
// 2. Least connections (raw TCP)

tap.test('least connections on a raw TCP route: a new connection goes to the backend with the fewest; 9 held → 3/3/3', async () => {
  const names = ['a', 'b', 'c'];
  const backends: ITestServer[] = await Promise.all(names.map((n) => startTaggedServer(n)));
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, backends.map((b) => local(b.port)), { algorithm: 'least-connections' }, false)],
  });
  await proxy.start();
  const held: net.Socket[] = [];
  try {
    // One connection on each backend.
    const c1 = await hold(port);
    const c2 = await hold(port);
    const c3 = await hold(port);
    held.push(c1.socket, c2.socket, c3.socket);
    expect([c1.name, c2.name, c3.name].sort()).toEqual(names);
    await waitFor(() => inFlightSum(proxy) === 3, 3000, '3 connections in flight');
    // Close the second: its backend is now the only one with nothing in flight. Round robin would
    // pick the first connection's backend next (the 4th pick of a cycle of 3).
    c2.socket.destroy();
    await waitFor(() => inFlightSum(proxy) === 2, 3000, 'the proxy to see the second connection closed');
    const c4 = await hold(port);
    held.push(c4.socket);
    expect(c4.name).toEqual(c2.name);
    // And again, with another one closed.
    c1.socket.destroy();
    await waitFor(() => inFlightSum(proxy) === 2, 3000, 'the proxy to see the first connection closed');
    const c5 = await hold(port);
    held.push(c5.socket);
    expect(c5.name).toEqual(c1.name);

    for (const s of held) s.destroy();
    held.length = 0;
    await waitFor(() => inFlightSum(proxy) === 0, 3000, 'all connections closed');

    // Nine held connections spread 3/3/3.
    const nine = await holdMany(port, 9, held);
    expect(tally(nine)).toEqual({ a: 3, b: 3, c: 3 });
    await waitFor(() => inFlightSum(proxy) === 9, 3000, '9 connections in flight');
    expect(backendsOf(proxy).map((s) => s.inFlight)).toEqual([3, 3, 3]);
    for (const s of held) s.destroy();
    held.length = 0;
    await waitFor(() => inFlightSum(proxy) === 0, 3000, 'all connections closed');
    await settle(proxy);
  } finally {
    for (const s of held) s.destroy();
    await proxy.stop();
    await Promise.all(backends.map((b) => b.close()));
  }
});

tap.test('least connections is relative to weight: 2:1:1 with 8 held connections → 4/2/2', async () => {
  const names = ['a', 'b', 'c'];
  const backends: ITestServer[] = await Promise.all(names.map((n) => startTaggedServer(n)));
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, [local(backends[0].port, 2), local(backends[1].port), local(backends[2].port)], { algorithm: 'least-connections' }, false)],
  });
  await proxy.start();
  const held: net.Socket[] = [];
  try {
    const seen = await holdMany(port, 8, held);
    expect(tally(seen)).toEqual({ a: 4, b: 2, c: 2 });
    for (const s of held) s.destroy();
    held.length = 0;
    await settle(proxy);
  } finally {
    for (const s of held) s.destroy();
    await proxy.stop();
    await Promise.all(backends.map((b) => b.close()));
  }
});

// ---------------------------------------------------------------------------------------------
// 3. ip-hash

tap.test('ip-hash: each client IP keeps its backend; removing a backend moves only its clients', async () => {
  const backends = await Promise.all(['a', 'b', 'c'].map((n) => startHttpBackend(n)));
  const [port] = await freePorts(1);
  const targets = backends.map((b) => local(b.port));
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, targets, { algorithm: 'ip-hash' })],
  });
  await proxy.start();
  try {
    const ips = Array.from({ length: 40 }, (_, i) => `127.0.0.${i + 1}`);
    const before = new Map<string, string>();
    for (const ip of ips) {
      const one = await get(port, { localAddress: ip });
      const two = await get(port, { localAddress: ip });
      expect(one.status).toEqual(200);
      expect(two.status).toEqual(200);
      if (one.body !== two.body) throw new Error(`client ${ip} reached ${one.body} then ${two.body}`);
      before.set(ip, one.body);
    }
    const spread = tally([...before.values()]);
    for (const n of ['a', 'b', 'c']) {
      if (!(spread[n] > 0)) throw new Error(`backend ${n} got no client: ${JSON.stringify(spread)}`);
    }

    // Remove c.
    await proxy.updateRoutes([lbRoute(port, targets.slice(0, 2), { algorithm: 'ip-hash' })]);
    expect(backendsOf(proxy).map((s) => s.port).sort()).toEqual([backends[0].port, backends[1].port].sort());
    const moved: string[] = [];
    for (const ip of ips) {
      const one = await get(port, { localAddress: ip });
      const two = await get(port, { localAddress: ip });
      expect(one.status).toEqual(200);
      if (one.body !== two.body) throw new Error(`client ${ip} reached ${one.body} then ${two.body} after the update`);
      const was = before.get(ip)!;
      if (was === 'c') {
        if (one.body !== 'a' && one.body !== 'b') throw new Error(`client ${ip} of c reached ${one.body}`);
      } else if (one.body !== was) {
        moved.push(`${ip}: ${was} → ${one.body}`);
      }
    }
    if (moved.length > 0) throw new Error(`clients of a/b moved: ${moved.join(', ')}`);
    await settle(proxy);
  } finally {
    await proxy.stop();
    await Promise.all(backends.map((b) => b.close()));
  }
});

// ---------------------------------------------------------------------------------------------
// 4. Active health checks

tap.test('active HTTP check: a stopped backend is taken out (no request reaches it, all succeed) and comes back when restarted', async () => {
  let backends = await Promise.all(['a', 'b', 'c'].map((n) => startHttpBackend(n)));
  const [port] = await freePorts(1);
  const bPort = backends[1].port;
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, backends.map((b) => local(b.port)), { healthCheck: healthFast })],
  });
  await proxy.start();
  try {
    // Probes arrive on every backend: GET /health.
    await waitFor(() => backends.every((b) => b.probes.length >= 2), 5000, 'health probes on every backend');
    for (const b of backends) expect(b.probes.every((p) => p === 'GET /health')).toBeTrue();
    expect(backendsOf(proxy).every((s) => s.healthy)).toBeTrue();

    await backends[1].close();
    await waitFor(() => statOf(proxy, bPort)?.healthy === false, 5000, 'b to be marked unhealthy');
    expect(statOf(proxy, backends[0].port)?.healthy).toBeTrue();
    expect(statOf(proxy, backends[2].port)?.healthy).toBeTrue();

    const whileDown: IAnswer[] = [];
    for (let i = 0; i < 30; i++) whileDown.push(await get(port));
    const statuses = tally(whileDown.map((a) => String(a.status)));
    expect(statuses).toEqual({ '200': 30 });
    const down = tally(whileDown.map((a) => a.body));
    expect(down.b).toBeUndefined();
    expect(down.a > 0 && down.c > 0).toBeTrue();

    // Restart b on its port: it becomes healthy and receives its share again.
    const b2 = await startHttpBackend('b', bPort);
    backends = [backends[0], b2, backends[2]];
    await waitFor(() => statOf(proxy, bPort)?.healthy === true, 5000, 'b to be marked healthy again');
    expect(b2.probes.length >= 2).toBeTrue();
    const afterUp: string[] = [];
    for (let i = 0; i < 30; i++) {
      const a = await get(port);
      expect(a.status).toEqual(200);
      afterUp.push(a.body);
    }
    const up = tally(afterUp);
    within(up.b, 10, 2, 'b after restart');
    await settle(proxy);
  } finally {
    await proxy.stop();
    await Promise.all(backends.map((b) => b.close()));
  }
});

tap.test('active TCP check on a raw route: probes are connects; a closed backend is taken out and new connections avoid it', async () => {
  const a = await startTaggedServer('a');
  const b = await startTaggedServer('b');
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, [local(a.port), local(b.port)], { healthCheck: { ...healthFast, path: '/' } }, false)],
  });
  await proxy.start();
  const held: net.Socket[] = [];
  try {
    // Without any client traffic the backends are being connected to.
    await waitFor(() => a.connections >= 2 && b.connections >= 2, 5000, 'TCP probes on both backends');
    expect(backendsOf(proxy).every((s) => s.healthy)).toBeTrue();
    await b.close();
    await waitFor(() => statOf(proxy, b.port)?.healthy === false, 5000, 'b to be marked unhealthy');
    expect(statOf(proxy, a.port)?.healthy).toBeTrue();
    const seen = await holdMany(port, 10, held);
    expect(tally(seen)).toEqual({ a: 10 });
    for (const s of held) s.destroy();
    held.length = 0;
    await settle(proxy);
  } finally {
    for (const s of held) s.destroy();
    await proxy.stop();
    await a.close();
    await b.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 5. Passive checks

tap.test('passive: without healthCheck, a refused backend is taken out after at most 3 failures', async () => {
  const live = await startTaggedServer('live');
  const [port, deadPort] = await freePorts(2); // nothing listens on deadPort
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, [local(live.port), local(deadPort)], undefined, false)],
  });
  await proxy.start();
  try {
    const outcomes: string[] = [];
    for (let i = 0; i < 16; i++) {
      const c = await hold(port);
      c.socket.destroy();
      outcomes.push(c.name === '' ? 'failed' : c.name);
    }
    const failures = outcomes.filter((o) => o === 'failed').length;
    if (failures < 1 || failures > 3) throw new Error(`expected 1..3 failed connections, got ${failures}: ${outcomes.join(' ')}`);
    const lastFailure = outcomes.lastIndexOf('failed');
    const after = outcomes.slice(lastFailure + 1);
    if (after.length < 10 || !after.every((o) => o === 'live')) {
      throw new Error(`expected ≥10 connections to reach the live backend after the last failure: ${outcomes.join(' ')}`);
    }
    expect(statOf(proxy, deadPort)?.healthy).toEqual(false);
    expect(statOf(proxy, live.port)?.healthy).toEqual(true);
    await settle(proxy);
  } finally {
    await proxy.stop();
    await live.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 6. Fail open

tap.test('fail open: when every backend is down, requests still go to them', async () => {
  const a = await startHttpBackend('a');
  let b = await startHttpBackend('b');
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [
      lbRoute(port, [local(a.port), local(b.port)], {
        healthCheck: { path: '/health', interval: 200, timeout: 500, unhealthyThreshold: 1, healthyThreshold: 100 },
      }),
    ],
  });
  await proxy.start();
  try {
    expect((await get(port)).status).toEqual(200);
    await a.close();
    await b.close();
    await waitFor(() => backendsOf(proxy).length === 2 && backendsOf(proxy).every((s) => !s.healthy), 5000, 'both backends to be marked unhealthy');
    // Both down and refusing: the request is tried on one of them → 502 (not a "no backend" answer).
    const refused = await get(port);
    expect(refused.status).toEqual(502);

    // b is back on its port but still marked down (100 successes needed): requests reach it.
    b = await startHttpBackend('b', b.port);
    expect(statOf(proxy, b.port)?.healthy).toEqual(false);
    const answers: IAnswer[] = [];
    for (let i = 0; i < 4; i++) answers.push(await get(port));
    const ok = answers.filter((x) => x.status === 200);
    if (ok.length < 1) throw new Error(`no request reached the restarted backend: ${JSON.stringify(answers)}`);
    expect(ok.every((x) => x.body === 'b')).toBeTrue();
    expect(answers.every((x) => x.status === 200 || x.status === 502)).toBeTrue();
    expect(b.requests.length).toEqual(ok.length);
    await settle(proxy);
  } finally {
    await proxy.stop();
    await a.close();
    await b.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 7. Checks stop

tap.test('health checks stop with stop()', async () => {
  const a = await startHttpBackend('a');
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port, [local(a.port)], { healthCheck: healthFast })],
  });
  await proxy.start();
  try {
    await waitFor(() => a.probes.length >= 2, 5000, 'probes to arrive');
    await settle(proxy);
  } finally {
    await proxy.stop();
  }
  const count = a.probes.length;
  await sleep(3 * 200 + 200);
  expect(a.probes.length).toEqual(count);
  await a.close();
});

tap.test('health checks stop for a route updateRoutes removes, and go on for the routes kept', async () => {
  const a = await startHttpBackend('a');
  const k = await startHttpBackend('k');
  const [port1, port2] = await freePorts(2);
  const kept = lbRoute(port2, [local(k.port)], { healthCheck: healthFast }, true, 'kept');
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [lbRoute(port1, [local(a.port)], { healthCheck: healthFast }), kept],
  });
  await proxy.start();
  try {
    await waitFor(() => a.probes.length >= 2 && k.probes.length >= 2, 5000, 'probes to arrive');
    await proxy.updateRoutes([kept]);
    expect(proxy.getStatistics().backends?.lb).toBeUndefined();
    const count = a.probes.length;
    const keptBefore = k.probes.length;
    await sleep(3 * 200 + 200);
    expect(a.probes.length).toEqual(count);
    if (!(k.probes.length > keptBefore)) throw new Error('the kept route stopped probing too');
    await settle(proxy);
  } finally {
    await proxy.stop();
    await a.close();
    await k.close();
  }
});

tap.start();
