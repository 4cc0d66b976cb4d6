// getStatistics() and getMetrics(): counts and bytes as the client sees them.
import { tap, expect } from '@push.rocks/tapbundle';
import { randomBytes } from 'node:crypto';

import { SmartProxy } from '../ts/index.js';
import { connectAndRead, exchange, freePort, sleep, startEchoServer, waitFor } from './helpers/net.js';

const echo = await startEchoServer();
const port = await freePort();
const proxy = new SmartProxy({
  routes: [{ name: 'echo-route', match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: echo.port } } }],
});

tap.test('start', async () => {
  await proxy.start();
});

tap.test('bytes are counted on the client side, exactly', async () => {
  const payload = randomBytes(3 * 1024 * 1024 + 17);
  const back = await exchange(port, payload);
  expect(back.length).toEqual(payload.length);
  await waitFor(() => proxy.getStatistics().activeConnections === 0);
  const metrics = proxy.getMetrics();
  expect(metrics.totals.bytesIn()).toEqual(payload.length);
  expect(metrics.totals.bytesOut()).toEqual(payload.length);
  expect(metrics.totals.connections()).toEqual(1);
  expect(metrics.requests.total()).toEqual(1);
  const stats = proxy.getStatistics();
  expect(stats.bytesIn).toEqual(payload.length);
  expect(stats.terminationReasons.completed).toEqual(1);
  expect(stats.routes).toEqual(1);
  expect(stats.listeningPorts).toEqual([port]);
});

tap.test('active connections are counted per route and per IP', async () => {
  const a = await connectAndRead(port, 'x\n', '127.0.0.21');
  const b = await connectAndRead(port, 'y\n', '127.0.0.21');
  const c = await connectAndRead(port, 'z\n', '127.0.0.22');
  const metrics = proxy.getMetrics();
  expect(metrics.connections.active()).toEqual(3);
  expect(metrics.connections.byRoute().get('echo-route')).toEqual(3);
  expect(metrics.connections.byIP().get('127.0.0.21')).toEqual(2);
  expect(metrics.connections.topIPs(1)).toEqual([{ ip: '127.0.0.21', count: 2 }]);
  expect(proxy.getStatistics().nonTlsConnections).toEqual(3);
  for (const conn of [a, b, c]) conn.socket.destroy();
  await waitFor(() => proxy.getMetrics().connections.active() === 0);
  expect(proxy.getMetrics().connections.byRoute().get('echo-route')).toEqual(0);
});

tap.test('throughput windows see a transfer after the per-second sampler ran', async () => {
  await exchange(port, randomBytes(4 * 1024 * 1024));
  await sleep(2200);
  const metrics = proxy.getMetrics();
  // The 4 MiB went through within the last few samples: the 10 s window shows a positive rate.
  expect(metrics.throughput.recent().in).toBeGreaterThan(0);
  expect(metrics.throughput.custom(10).out).toBeGreaterThan(0);
  expect(metrics.throughput.byRoute(10).get('echo-route')!.in).toBeGreaterThan(0);
  const history = metrics.throughput.history(10);
  expect(history.length).toBeGreaterThan(0);
  expect(history.some((point) => point.in > 0)).toBeTrue();
  expect(typeof history[0].timestamp).toEqual('number');
});

tap.test('stop', async () => {
  await proxy.stop();
  await echo.close();
});

tap.start({ throwOnError: true });
