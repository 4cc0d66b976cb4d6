// getPrometheusMetrics() and the metrics.prometheus listener: the text exposition format, requests
// by route and status class, the request-duration histogram, refusals, and the listener's answers.
import { tap, expect } from '@push.rocks/tapbundle';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { X509Certificate } from 'node:crypto';

import { SmartProxy } from '../ts/index.js';
import { connectionRefused, freePorts, listenTracked, rejection, thrown } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';

const backend = await listenTracked(
  http.createServer((req, res) => {
    res.writeHead(req.url === '/fail' ? 503 : 200, { 'content-type': 'text/plain' });
    res.end('answer');
  }),
);
const [port, metricsPort, busyPort] = await freePorts(3);
const API_ROUTE = 'api "main" \\ v1';
const proxy = new SmartProxy({
  routes: [
    { name: API_ROUTE, match: { ports: port, domains: 'api.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } },
    {
      name: 'guarded',
      match: { ports: port, domains: 'guarded.test' },
      action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } },
      security: { basicAuth: { enabled: true, users: [{ username: 'u', password: 'p' }] } },
    },
  ],
  metrics: { prometheus: { port: metricsPort } },
});

function get(host: string, path: string, method = 'GET'): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port, path, method, headers: { host }, agent: false }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
    req.end();
  });
}

function scrape(path = '/metrics', method = 'GET'): Promise<{ status: number; type: string | undefined; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port: metricsPort, path, method, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** The value of the one sample `name{labels}` (labels as written in the exposition). */
function sample(text: string, name: string, labels = ''): number | undefined {
  const prefix = labels === '' ? `${name} ` : `${name}{${labels}} `;
  const line = text.split('\n').find((l) => l.startsWith(prefix));
  return line === undefined ? undefined : Number(line.slice(prefix.length));
}

/** Every line is a comment (`# HELP` / `# TYPE`) or `name{labels} value`, and every sample's
 * family was announced with a type first. */
function checkFormat(text: string): void {
  const typed = new Map<string, string>();
  expect(text.endsWith('\n')).toBeTrue();
  for (const line of text.trimEnd().split('\n')) {
    const type = /^# TYPE (\w+) (counter|gauge|histogram)$/.exec(line);
    if (type) {
      expect(typed.has(type[1])).toBeFalse();
      typed.set(type[1], type[2]);
      continue;
    }
    if (line.startsWith('# HELP ')) continue;
    const match = /^(\w+)(\{(?:\w+="(?:[^"\\\n]|\\["\\n])*"(?:,|(?=\})))*\})? (-?[0-9.e+]+|\+Inf|NaN)$/.exec(line);
    expect(match === null ? `malformed: ${line}` : 'ok').toEqual('ok');
    const name = match![1];
    const family = typed.has(name) ? name : name.replace(/_(bucket|sum|count)$/, '');
    expect(typed.has(family) ? 'announced' : `not announced: ${name}`).toEqual('announced');
  }
}

tap.test('start', async () => {
  await proxy.start();
});

tap.test('requests are counted by route and status class, refusals by reason', async () => {
  for (let i = 0; i < 5; i++) expect(await get('api.test', '/ok?secret=1')).toEqual(200);
  for (let i = 0; i < 2; i++) expect(await get('api.test', '/fail')).toEqual(503);
  expect(await get('guarded.test', '/ok')).toEqual(401);
  expect(await get('nowhere.test', '/ok')).toEqual(404);

  const text = proxy.getPrometheusMetrics();
  checkFormat(text);
  const api = 'route="api \\"main\\" \\\\ v1"';
  expect(sample(text, 'smartproxy_http_requests_total', `${api},class="2xx"`)).toEqual(5);
  expect(sample(text, 'smartproxy_http_requests_total', `${api},class="5xx"`)).toEqual(2);
  expect(sample(text, 'smartproxy_http_requests_total', `${api},class="4xx"`)).toEqual(0);
  expect(sample(text, 'smartproxy_http_requests_total', 'route="guarded",class="4xx"')).toEqual(1);
  expect(sample(text, 'smartproxy_route_refusals_total', 'route="guarded",reason="auth"')).toEqual(1);
  expect(sample(text, 'smartproxy_route_refusals_total', 'route="guarded",reason="rate_limit"')).toEqual(0);
  expect(sample(text, 'smartproxy_http_requests_received_total')).toEqual(9);
  expect(text).toInclude('# TYPE smartproxy_http_requests_total counter');
  expect(text).toInclude(`smartproxy_build_info{version="`);
  // Every termination reason is there, zeros included, so that rates work from the first scrape.
  expect(sample(text, 'smartproxy_connection_terminations_total', 'reason="invalid_proxy_header"')).toEqual(0);
  // Paths, queries and client addresses never become labels.
  expect(text.includes('/ok') || text.includes('secret') || text.includes('/fail')).toBeFalse();
});

tap.test('the request-duration histogram is cumulative and counts every answered request of the route', async () => {
  const text = proxy.getPrometheusMetrics();
  expect(text).toInclude('# TYPE smartproxy_http_request_duration_seconds histogram');
  const api = 'route="api \\"main\\" \\\\ v1"';
  const buckets = text
    .split('\n')
    .filter((l) => l.startsWith(`smartproxy_http_request_duration_seconds_bucket{${api},`))
    .map((l) => ({ le: /le="([^"]+)"/.exec(l)![1], count: Number(l.split(' ').pop()) }));
  expect(buckets.length).toBeGreaterThan(5);
  expect(buckets[buckets.length - 1].le).toEqual('+Inf');
  for (let i = 1; i < buckets.length; i++) {
    expect(buckets[i].count >= buckets[i - 1].count).toBeTrue();
    if (i < buckets.length - 1) expect(Number(buckets[i].le) > Number(buckets[i - 1].le)).toBeTrue();
  }
  expect(buckets[buckets.length - 1].count).toEqual(7);
  expect(sample(text, 'smartproxy_http_request_duration_seconds_count', api)).toEqual(7);
  expect(sample(text, 'smartproxy_http_request_duration_seconds_sum', api)! > 0).toBeTrue();
});

tap.test('the listener serves the exposition at its path, and only there', async () => {
  const scraped = await scrape();
  expect(scraped.status).toEqual(200);
  expect(scraped.type).toEqual('text/plain; version=0.0.4; charset=utf-8');
  checkFormat(scraped.body);
  expect(sample(scraped.body, 'smartproxy_http_requests_total', 'route="guarded",class="4xx"')).toEqual(1);
  expect((await scrape('/metrics?x=1')).status).toEqual(200);
  const head = await scrape('/metrics', 'HEAD');
  expect(head.status).toEqual(200);
  expect(head.body).toEqual('');
  expect((await scrape('/other')).status).toEqual(404);
  expect((await scrape('/metrics', 'POST')).status).toEqual(405);
  // Something that is not HTTP gets a 400 and a close, not a hang.
  const answer = await new Promise<string>((resolve, reject) => {
    const socket = net.connect(metricsPort, '127.0.0.1', () => socket.end('\x16\x03\x01\r\n\r\n'));
    let data = '';
    socket.on('data', (chunk) => (data += chunk.toString('latin1')));
    socket.on('close', () => resolve(data));
    socket.on('error', reject);
  });
  expect(answer.startsWith('HTTP/1.1 400')).toBeTrue();
});

tap.test('a metrics port that is taken fails start() and binds none of the route ports', async () => {
  const blocker = await listenTracked(net.createServer(), busyPort);
  const [otherPort] = await freePorts(1);
  const second = new SmartProxy({
    routes: [{ name: 'x', match: { ports: otherPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }],
    metrics: { prometheus: { port: busyPort } },
  });
  const err = await rejection(second.start());
  expect(err?.message ?? '').toInclude('EADDRINUSE');
  // The route port is free: nothing of the failed start stayed bound.
  const probe = await listenTracked(net.createServer(), otherPort);
  await probe.close();
  await blocker.close();
});

tap.test('every metric the Grafana dashboard queries is one the engine exposes', async () => {
  const dashboard = JSON.parse(readFileSync(path.join(import.meta.dirname, '..', 'dashboards', 'smartproxy.json'), 'utf8'));
  const exprs: string[] = dashboard.panels.flatMap((panel: { targets: Array<{ expr: string }> }) => panel.targets.map((t) => t.expr));
  exprs.push(dashboard.templating.list.find((v: { name: string }) => v.name === 'instance').definition);
  const queried = new Set(exprs.flatMap((expr) => expr.match(/smartproxy_\w+/g) ?? []).map((name) => name.replace(/_(bucket|sum|count)$/, '')));
  expect(queried.size).toBeGreaterThan(15);
  // The affinity families appear once an affinity store exists: a route with affinity makes one.
  const [stickyPort] = await freePorts(1);
  const withAffinity = new SmartProxy({
    routes: [{ name: 'sticky', match: { ports: stickyPort, domains: 'sticky.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port }, loadBalancing: { affinity: { key: 'ip' } } } }],
  });
  await withAffinity.start();
  const announced = new Set([...withAffinity.getPrometheusMetrics().matchAll(/^# TYPE (\w+) /gm)].map((m) => m[1]));
  await withAffinity.stop();
  const missing = [...queried].filter((name) => !announced.has(name));
  expect(missing).toEqual([]);
});

tap.test('metrics.prometheus is validated like every option', async () => {
  const make = (prometheus: unknown) => () =>
    new SmartProxy({ routes: [], metrics: { prometheus } as never });
  expect(thrown(make({ port: 0 }))?.message ?? '').toInclude('metrics.prometheus.port');
  expect(thrown(make({ port: 9999, path: 'metrics' }))?.message ?? '').toInclude('metrics.prometheus.path');
  // An unknown key is warned about and ignored, as every unknown option is.
  const warnings: string[] = [];
  const onWarning = (warning: Error) => warnings.push(warning.message);
  process.on('warning', onWarning);
  expect(thrown(make({ port: 9999, colour: 'red' }))).toBeUndefined();
  await new Promise((resolve) => setImmediate(resolve));
  process.off('warning', onWarning);
  expect(warnings.join('\n')).toInclude('metrics.prometheus.colour');
  expect(thrown(make('9100'))?.message ?? '').toInclude('metrics.prometheus');
});

tap.test('upstream checkouts: pooled reuse and new connections add up to the requests, failed connects are counted', async () => {
  const [ownPort, deadPort] = await freePorts(2);
  const own = new SmartProxy({
    routes: [
      { name: 'live', match: { ports: ownPort, domains: 'live.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } },
      { name: 'dead', match: { ports: ownPort, domains: 'dead.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: deadPort } } },
    ],
  });
  await own.start();
  try {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const once = (host: string) =>
      new Promise<number>((resolve, reject) => {
        http.get({ port: ownPort, path: '/', headers: { host }, agent }, (res) => res.resume().on('end', () => resolve(res.statusCode ?? 0))).on('error', reject);
      });
    for (let i = 0; i < 10; i++) expect(await once('live.test')).toEqual(200);
    expect(await once('dead.test')).toEqual(502);
    agent.destroy();
    const text = own.getPrometheusMetrics();
    checkFormat(text);
    const reused = sample(text, 'smartproxy_upstream_connections_reused_total')!;
    const opened = sample(text, 'smartproxy_upstream_connections_opened_total')!;
    expect(reused + opened).toEqual(10);
    expect(reused).toBeGreaterThanOrEqual(9);
    expect(sample(text, 'smartproxy_upstream_connect_failures_total')).toEqual(1);
    expect(sample(text, 'smartproxy_upstream_pool_exhausted_total')).toEqual(0);
  } finally {
    await own.stop();
  }
});

tap.test('the expiry of a static certificate is exposed like that of an automatic one', async () => {
  const ca = createTestCa();
  const leaf = ca.issue(['static.test']);
  const notAfter = Math.floor(Date.parse(new X509Certificate(leaf.cert).validTo) / 1000);
  const [tlsPort] = await freePorts(1);
  const own = new SmartProxy({
    routes: [
      {
        name: 'static-tls',
        match: { ports: tlsPort, domains: 'static.test' },
        action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port }, tls: { mode: 'terminate', certificate: { key: leaf.key, cert: leaf.cert } } },
      },
    ],
  });
  const text = own.getPrometheusMetrics();
  checkFormat(text);
  expect(sample(text, 'smartproxy_certificate_expiry_timestamp_seconds', 'route="static-tls",domain="static.test"')).toEqual(notAfter);
});

tap.test('stop closes the listener', async () => {
  await proxy.stop();
  expect(await connectionRefused(metricsPort)).toBeTrue();
  await backend.close();
});

tap.start({ throwOnError: true });
