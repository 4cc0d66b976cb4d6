// HTTP limits: a client that trickles its request head is evicted after `headerTimeout` (on the
// first request of a connection and on later keep-alive ones), and `maxHeaderSize` bounds a head
// (over it: 431). The proxy keeps serving others meanwhile.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort, waitForClose } from './helpers/net.js';

const backend = http.createServer((req, res) => res.end(`ok ${req.url}`));
await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
const backendPort = (backend.address() as AddressInfo).port;
const port = await freePort();
const proxy = new SmartProxy({
  headerTimeout: 400,
  // After hyper answers a malformed later head itself (431 below), the connection is closed by the
  // keep-alive backstop (keep-alive + head timeout), not at once.
  httpKeepAliveTimeout: 1000,
  maxHeaderSize: 16 * 1024,
  initialDataTimeout: 10_000,
  gracefulShutdownTimeout: 500,
  routes: [{ name: 'web', match: { ports: port, domains: 'limits.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } }],
});

/** Writes `text` and collects everything until the proxy closes the connection. */
function exchangeUntilClose(socket: net.Socket): Promise<{ data: string; ms: number }> {
  const started = Date.now();
  let data = '';
  socket.on('data', (d: Buffer) => (data += d.toString()));
  return waitForClose(socket).then(() => ({ data, ms: Date.now() - started }));
}

tap.test('start', async () => {
  await proxy.start();
});

tap.test('a first request head trickled past headerTimeout is evicted long before initialDataTimeout', async () => {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  const closed = exchangeUntilClose(socket);
  socket.write('GET / HTTP/1.1\r\nHo');
  const timer = setInterval(() => socket.writable && socket.write('x'), 100);
  const { ms } = await closed;
  clearInterval(timer);
  expect(ms).toBeGreaterThan(300);
  expect(ms).toBeLessThan(3000);
});

tap.test('a later keep-alive request head trickled past headerTimeout is evicted too', async () => {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  let data = '';
  socket.on('data', (d: Buffer) => (data += d.toString()));
  socket.write('GET /first HTTP/1.1\r\nHost: limits.test\r\n\r\n');
  const deadline = Date.now() + 3000;
  while (!data.includes('ok /first') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  expect(data).toInclude('ok /first');
  const started = Date.now();
  socket.write('GET /second HTTP/1.1\r\nHo');
  const timer = setInterval(() => socket.writable && socket.write('x'), 100);
  await waitForClose(socket);
  clearInterval(timer);
  expect(Date.now() - started).toBeLessThan(3000);
  expect(data).not.toInclude('ok /second');
});

tap.test('a head over maxHeaderSize gets 431, a head under it is served', async () => {
  const big = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => big.once('connect', resolve));
  const answer = exchangeUntilClose(big);
  // The first head is sniffed whole by the session; send a small first request, then the big one.
  big.write(`GET /small HTTP/1.1\r\nHost: limits.test\r\n\r\nGET /big HTTP/1.1\r\nHost: limits.test\r\nX-Big: ${'a'.repeat(20 * 1024)}\r\n\r\n`);
  const { data } = await answer;
  expect(data).toInclude('ok /small');
  expect(data).toInclude('HTTP/1.1 431');
  expect(data).not.toInclude('ok /big');

  const fine = await new Promise<string>((resolve, reject) => {
    http.get({ port, host: '127.0.0.1', path: '/fine', headers: { host: 'limits.test', 'x-medium': 'b'.repeat(8 * 1024) }, agent: false }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
  expect(fine).toEqual('ok /fine');
});

tap.test('nothing stays open', async () => {
  const deadline = Date.now() + 3000;
  while (proxy.getStatistics().activeConnections > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  expect(proxy.getStatistics().activeConnections).toEqual(0);
});

tap.test('stop', async () => {
  await proxy.stop();
  await new Promise<void>((resolve) => backend.close(() => resolve()));
});

tap.start({ throwOnError: true });
