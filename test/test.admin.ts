// The admin listener: /healthz without a token (200 running, 503 while stopping), the bearer token
// on every other path, /metrics, /api/status with routes, backends, history, and the status page.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import { writeFileSync } from 'node:fs';
import * as net from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { openPage } from './helpers/chromium.js';
import { freePorts, listenTracked, rejection, sleep, waitFor } from './helpers/net.js';

const TOKEN = 'op-s3cret';
// On every loopback address, so that two "backends" (127.0.0.1 and 127.0.0.2) reach it.
const backend = await listenTracked(http.createServer((_req, res) => res.end('ok')), 0, '0.0.0.0');
const [webPort, tcpPort, adminPort, busyAdminPort] = await freePorts(4);
const proxy = new SmartProxy({
  routes: [
    {
      name: 'web',
      match: { ports: webPort, domains: 'web.test' },
      action: { type: 'forward', target: { host: ['127.0.0.1', '127.0.0.2'], port: backend.port } },
    },
    { name: 'raw', match: { ports: tcpPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } },
  ],
  admin: { port: adminPort, token: TOKEN },
  gracefulShutdownTimeout: 3000,
});

function request(path: string, options: { token?: string; method?: string } = {}): Promise<{ status: number; type: string | undefined; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = options.token === undefined ? {} : { authorization: `Bearer ${options.token}` };
    const req = http.request({ port: adminPort, path, method: options.method ?? 'GET', headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body, headers: res.headers }));
    });
    req.on('error', reject);
    req.end();
  });
}

function webGet(): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port: webPort, path: '/', headers: { host: 'web.test' }, agent: false }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
    req.end();
  });
}

tap.test('start', async () => {
  await proxy.start();
});

tap.test('/healthz and the page need no token; the data and every other path need the bearer token', async () => {
  const health = await request('/healthz');
  expect(health.status).toEqual(200);
  expect(health.body).toEqual('ok\n');
  expect((await request('/')).status).toEqual(200);
  for (const path of ['/api/status', '/metrics', '/nope', '/index.html']) {
    const refused = await request(path);
    expect(refused.status).toEqual(401);
    expect(refused.headers['www-authenticate']).toInclude('Bearer');
    expect((await request(path, { token: 'wrong' })).status).toEqual(401);
    expect((await request(path, { token: `${TOKEN}x` })).status).toEqual(401);
  }
  expect((await request('/nope', { token: TOKEN })).status).toEqual(404);
  expect((await request('/metrics', { token: TOKEN, method: 'POST' })).status).toEqual(405);
});

tap.test('/metrics is the Prometheus exposition', async () => {
  for (let i = 0; i < 3; i++) expect(await webGet()).toEqual(200);
  const metrics = await request('/metrics', { token: TOKEN });
  expect(metrics.status).toEqual(200);
  expect(metrics.type).toEqual('text/plain; version=0.0.4; charset=utf-8');
  expect(metrics.body).toInclude('smartproxy_http_requests_total{route="web",class="2xx"} 3');
  expect(metrics.body).toInclude(`smartproxy_backend_up{route="web",backend="127.0.0.2:${backend.port}"} 1`);
});

tap.test('/api/status: routes with their kind and counts, backends with health, a history of seconds', async () => {
  // The sampler runs once a second: a point needs two samples.
  await sleep(2200);
  const response = await request('/api/status', { token: TOKEN });
  expect(response.status).toEqual(200);
  expect(response.type).toEqual('application/json');
  const status = JSON.parse(response.body);
  expect(status.stopping).toBeFalse();
  expect(status.listeningPorts).toEqual([webPort, tcpPort].sort((a, b) => a - b));
  expect(status.httpRequests).toEqual(3);
  const web = status.routes.find((r: { name: string }) => r.name === 'web');
  expect(web.kind).toEqual('http');
  expect(web.responses['2xx']).toEqual(3);
  expect(status.routes.find((r: { name: string }) => r.name === 'raw').kind).toEqual('tcp');
  const webBackends = status.backends.filter((b: { route: string }) => b.route === 'web');
  expect(webBackends.map((b: { host: string; healthy: boolean }) => `${b.host}:${b.healthy}`).sort()).toEqual(['127.0.0.1:true', '127.0.0.2:true']);
  expect(typeof webBackends[0].inFlight).toEqual('number');
  expect(status.history.length).toBeGreaterThan(0);
  const point = status.history[status.history.length - 1];
  for (const key of ['time', 'requestsPerSecond', 'bytesInPerSecond', 'bytesOutPerSecond', 'connections']) {
    expect(typeof point[key]).toEqual('number');
  }
  expect(status.certificates).toEqual([]);
  expect(typeof status.uptimeSeconds).toEqual('number');
});

tap.test('/ is one self-contained HTML page that reads /api/status', async () => {
  const page = await request('/');
  expect(page.status).toEqual(200);
  expect(page.type).toEqual('text/html; charset=utf-8');
  expect(page.body).toInclude('<canvas');
  expect(page.body).toInclude('api/status');
  // No external assets: nothing is loaded from another origin.
  expect(/(src|href)\s*=\s*["']?(https?:)?\/\//i.test(page.body)).toBeFalse();
  expect(/@import|url\(/i.test(page.body)).toBeFalse();
  const head = await request('/', { token: TOKEN, method: 'HEAD' });
  expect(head.status).toEqual(200);
  expect(head.body).toEqual('');
});

tap.test('the status page in headless Chromium: route names, three plots drawn, no console errors', async () => {
  const page = await openPage(`http://127.0.0.1:${adminPort}/#token=${TOKEN}`);
  try {
    const rendered = async () => page.evaluate<string>(`document.getElementById('routes').textContent`);
    const deadline = Date.now() + 10000;
    while (!(await rendered()).includes('web') && Date.now() < deadline) await sleep(100);
    const routes = await rendered();
    expect(routes).toInclude('web');
    expect(routes).toInclude('raw');
    expect(await page.evaluate<string>(`document.getElementById('backends').textContent`)).toInclude('127.0.0.2');
    expect(await page.evaluate<string>(`document.getElementById('state').textContent`)).toEqual('running');
    // Each plot has drawn its axes and series: pixels that are not transparent.
    const drawn = await page.evaluate<number[]>(`[...document.querySelectorAll('canvas')].map((c) => {
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let painted = 0;
      for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) painted++;
      return painted;
    })`);
    expect(drawn.length).toEqual(3);
    for (const pixels of drawn) expect(pixels).toBeGreaterThan(500);
    if (process.env.SMARTPROXY_SCREENSHOT) writeFileSync(process.env.SMARTPROXY_SCREENSHOT, await page.screenshot());
    expect(page.errors).toEqual([]);
  } finally {
    await page.close();
  }
});

tap.test('connections that hold the admin port open are bounded; the port answers again once they go', async () => {
  const idle: net.Socket[] = [];
  for (let i = 0; i < 64; i++) {
    const socket = net.connect(adminPort, '127.0.0.1');
    socket.on('error', () => undefined);
    await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
    idle.push(socket);
  }
  // Each accepted connection is a task of the listener before the next one is accepted.
  await sleep(200);
  expect(await rejection(request('/healthz'))).toBeInstanceOf(Error);
  for (const socket of idle) socket.destroy();
  const deadline = Date.now() + 5000;
  let status = 0;
  while (status !== 200 && Date.now() < deadline) {
    status = await request('/healthz').then((r) => r.status, () => 0);
    if (status !== 200) await sleep(50);
  }
  expect(status).toEqual(200);
});

tap.test('an admin port that is taken fails start() and binds nothing', async () => {
  const blocker = await listenTracked(net.createServer(), busyAdminPort);
  const [otherPort] = await freePorts(1);
  const second = new SmartProxy({
    routes: [{ name: 'x', match: { ports: otherPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }],
    admin: { port: busyAdminPort },
  });
  expect((await rejection(second.start()))?.message ?? '').toInclude('EADDRINUSE');
  const probe = await listenTracked(net.createServer(), otherPort);
  await probe.close();
  await blocker.close();
});

tap.test('while a stop drains, /healthz answers 503; after it, the listener is closed', async () => {
  // A connection held open keeps the drain going for up to gracefulShutdownTimeout.
  const held = net.connect(tcpPort, '127.0.0.1');
  await new Promise<void>((resolve) => held.once('connect', () => resolve()));
  await waitFor(() => proxy.getStatistics().activeConnections === 1);
  const stopped = proxy.stop();
  await waitFor(() => proxy.getListeningPorts().length === 0, 5000, 'the ports to close');
  const during = await request('/healthz');
  expect(during.status).toEqual(503);
  expect(during.body).toEqual('stopping\n');
  held.destroy();
  await stopped;
  expect((await rejection(request('/healthz')))?.message ?? '').toInclude('ECONNREFUSED');
  await backend.close();
});

tap.start({ throwOnError: true });
