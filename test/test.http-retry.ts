// Retries of the HTTP engine (`action.retry`): a connect failure moves to the next backend of the
// route; a 5xx answer is retried only for idempotent requests whose body could be kept whole;
// without `retry` a failure is answered at once.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort, waitFor } from './helpers/net.js';

interface IBackend {
  port: number;
  seen: string[];
  close(): Promise<void>;
}

/** Answers with the statuses in `script` in turn (then 200), recording `METHOD path body`. */
async function scriptedBackend(script: number[]): Promise<IBackend> {
  const seen: string[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      seen.push(`${req.method} ${req.url} ${body}`.trim());
      const status = script.shift() ?? 200;
      res.writeHead(status, { 'content-type': 'text/plain' });
      res.end(`status ${status}`);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    seen,
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}

function request(port: number, method: string, path: string, body?: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port, host: '127.0.0.1', method, path, headers: { host: 'retry.test' }, agent: false }, (res) => {
      let text = '';
      res.on('data', (d: Buffer) => (text += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const port = await freePort();
const flaky = await scriptedBackend([]);
let proxy: SmartProxy;

function route(name: string, path: string, target: Record<string, unknown>, retry?: Record<string, unknown>) {
  return {
    name,
    match: { ports: port, domains: 'retry.test', path },
    action: { type: 'forward' as const, target: target as { host: string | string[]; port: number }, ...(retry ? { retry } : {}) },
  };
}

tap.test('start', async () => {
  // 127.0.0.2 is a loopback address the backend does not listen on: connecting there is refused.
  proxy = new SmartProxy({
    gracefulShutdownTimeout: 500,
    routes: [
      route('connect-retry', '/connect/*', { host: ['127.0.0.2', '127.0.0.1'], port: flaky.port }, { maxRetries: 1, backoffMs: 10 }),
      route('no-retry', '/plain/*', { host: ['127.0.0.2', '127.0.0.1'], port: flaky.port }),
      route('5xx-retry', '/5xx/*', { host: '127.0.0.1', port: flaky.port }, { maxRetries: 2, on5xx: true, backoffMs: 10 }),
    ],
  });
  await proxy.start();
});

tap.test('a refused connect moves on to the next backend of the route', async () => {
  // Round robin starts at the refused address; the retry takes the next one.
  const first = await request(port, 'POST', '/connect/a', 'payload');
  expect(first.status).toEqual(200);
  expect(flaky.seen).toContain('POST /connect/a payload');
});

tap.test('without retry a refused connect is a 502 at once', async () => {
  const answers = [await request(port, 'GET', '/plain/1'), await request(port, 'GET', '/plain/2')];
  expect(answers.map((a) => a.status).sort()).toEqual([200, 502]);
  expect(answers.find((a) => a.status === 502)?.body).toInclude('refused');
});

tap.test('statistics count HTTP connections while they are open and every request', async () => {
  const before = proxy.getStatistics().httpRequests;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = () => new Promise<number>((resolve, reject) => {
    http.get({ port, host: '127.0.0.1', path: '/connect/stats', headers: { host: 'retry.test' }, agent }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    }).on('error', reject);
  });
  expect(await get()).toEqual(200);
  expect(await get()).toEqual(200);
  const open = proxy.getStatistics();
  expect(open.httpConnections).toEqual(1);
  expect(open.httpRequests - before).toEqual(2);
  agent.destroy();
  await waitFor(() => proxy.getStatistics().httpConnections === 0, 3000, 'the HTTP connection to close');
});

tap.test('a 5xx is retried for an idempotent request, the body sent again whole', async () => {
  flaky.seen.length = 0;
  const script = [503, 502];
  const server = await scriptedBackend(script);
  await proxy.updateRoutes([
    route('5xx-retry', '/5xx/*', { host: '127.0.0.1', port: server.port }, { maxRetries: 2, on5xx: true, backoffMs: 10 }),
  ]);
  const put = await request(port, 'PUT', '/5xx/item', 'same body');
  expect(put.status).toEqual(200);
  expect(server.seen).toEqual(['PUT /5xx/item same body', 'PUT /5xx/item same body', 'PUT /5xx/item same body']);
  await server.close();
});

tap.test('a POST is delivered at most once: its 5xx is passed on', async () => {
  const server = await scriptedBackend([503]);
  await proxy.updateRoutes([
    route('5xx-retry', '/5xx/*', { host: '127.0.0.1', port: server.port }, { maxRetries: 2, on5xx: true, backoffMs: 10 }),
  ]);
  const post = await request(port, 'POST', '/5xx/order', 'pay once');
  expect(post.status).toEqual(503);
  expect(server.seen).toEqual(['POST /5xx/order pay once']);
  await server.close();
});

tap.test('retries give up after maxRetries and pass the last answer on', async () => {
  const server = await scriptedBackend([500, 500, 500, 500]);
  await proxy.updateRoutes([
    route('5xx-retry', '/5xx/*', { host: '127.0.0.1', port: server.port }, { maxRetries: 2, on5xx: true, backoffMs: 10 }),
  ]);
  const get = await request(port, 'GET', '/5xx/x');
  expect(get.status).toEqual(500);
  expect(server.seen.length).toEqual(3);
  await server.close();
});

tap.test('stop', async () => {
  await proxy.stop();
  await flaky.close();
});

tap.start({ throwOnError: true });
