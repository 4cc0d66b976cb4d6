// L4 admission: allow/block lists (route and defaults), the per-IP limit, the connection rate
// limit, per-route maxConnections, and the idle timeout. Clients use distinct loopback addresses
// (127.0.0.x) to be distinct IPs.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import * as net from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { connectAndRead, freePort, sleep, startTaggedServer, waitFor, waitForClose } from './helpers/net.js';

const backend = await startTaggedServer('welcome');

function forward(port: number, extra: Record<string, unknown> = {}) {
  return { match: { ports: port }, action: { type: 'forward' as const, target: { host: '127.0.0.1', port: backend.port } }, ...extra };
}

tap.test('a route allow list admits listed clients and closes the others', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(port, { security: { ipAllowList: ['127.0.0.2', '10.0.0.0/8'] } })] });
  await proxy.start();
  expect((await connectAndRead(port, undefined, '127.0.0.2')).data).toEqual('welcome\n');
  const refused = await connectAndRead(port, undefined, '127.0.0.3');
  expect(refused.closed).toBeTrue();
  expect(refused.data).toEqual('');
  // The reason is recorded when the session task ends, just after the client sees the close.
  await waitFor(() => (proxy.getStatistics().terminationReasons.route_ip_blocked ?? 0) >= 1, 2000, 'route_ip_blocked');
  expect(proxy.getStatistics().terminationReasons.route_ip_blocked).toEqual(1);
  await proxy.stop();
});

tap.test('block beats allow, with globs', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 300,
    routes: [forward(port, { security: { ipAllowList: ['127.0.0.*'], ipBlockList: ['127.0.0.4'] } })],
  });
  await proxy.start();
  expect((await connectAndRead(port, undefined, '127.0.0.5')).data).toEqual('welcome\n');
  expect((await connectAndRead(port, undefined, '127.0.0.4')).closed).toBeTrue();
  await proxy.stop();
});

tap.test('defaults.security applies to every route', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, defaults: { security: { ipBlockList: ['127.0.0.6'] } }, routes: [forward(port)] });
  await proxy.start();
  expect((await connectAndRead(port, undefined, '127.0.0.6')).closed).toBeTrue();
  expect((await connectAndRead(port, undefined, '127.0.0.7')).data).toEqual('welcome\n');
  // The reason is recorded when the session task ends, just after the client sees the close.
  await waitFor(() => (proxy.getStatistics().terminationReasons.ip_blocked ?? 0) >= 1, 2000, 'ip_blocked');
  expect(proxy.getStatistics().terminationReasons.ip_blocked).toEqual(1);
  await proxy.stop();
});

tap.test('maxConnectionsPerIP refuses the extra connection from one IP only', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, maxConnectionsPerIP: 2, routes: [forward(port)] });
  await proxy.start();
  const first = await connectAndRead(port, undefined, '127.0.0.8');
  const second = await connectAndRead(port, undefined, '127.0.0.8');
  expect(first.data + second.data).toEqual('welcome\nwelcome\n');
  const third = await connectAndRead(port, undefined, '127.0.0.8');
  expect(third.closed).toBeTrue();
  const otherIp = await connectAndRead(port, undefined, '127.0.0.9');
  expect(otherIp.data).toEqual('welcome\n');
  first.socket.destroy();
  await waitFor(() => (proxy.getMetrics().connections.byIP().get('127.0.0.8') ?? 0) < 2, 3000, 'the slot to be freed');
  const again = await connectAndRead(port, undefined, '127.0.0.8');
  expect(again.data).toEqual('welcome\n');
  for (const c of [second, otherIp, again]) c.socket.destroy();
  await proxy.stop();
});

// A connection served request by request (plain HTTP routed per request) held no slot once it was
// handed to the HTTP engine: every idle keep-alive connection was uncounted and the limit never
// refused one.
tap.test('maxConnectionsPerIP holds for plain HTTP connections served request by request', async () => {
  const server = http.createServer((_req, res) => res.end('ok'));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const backendPort = (server.address() as net.AddressInfo).port;
  const port = await freePort();
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 300,
    maxConnectionsPerIP: 2,
    routes: [{ match: { ports: port, domains: 'limited.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } }],
  });
  await proxy.start();
  const request = 'GET / HTTP/1.1\r\nHost: limited.test\r\n\r\n';
  const first = await connectAndRead(port, request, '127.0.0.12');
  const second = await connectAndRead(port, request, '127.0.0.12');
  expect(first.data.startsWith('HTTP/1.1 200')).toBeTrue();
  expect(second.data.startsWith('HTTP/1.1 200')).toBeTrue();
  // Both answered and idle, both still open: each holds its slot.
  expect(proxy.getMetrics().connections.byIP().get('127.0.0.12')).toEqual(2);
  const third = await connectAndRead(port, request, '127.0.0.12');
  expect(third.closed).toBeTrue();
  expect(third.data).toEqual('');
  const otherIp = await connectAndRead(port, request, '127.0.0.13');
  expect(otherIp.data.startsWith('HTTP/1.1 200')).toBeTrue();
  first.socket.destroy();
  await waitFor(() => (proxy.getMetrics().connections.byIP().get('127.0.0.12') ?? 0) < 2, 3000, 'the slot to be freed');
  const again = await connectAndRead(port, request, '127.0.0.12');
  expect(again.data.startsWith('HTTP/1.1 200')).toBeTrue();
  await waitFor(() => (proxy.getStatistics().terminationReasons.per_ip_limit ?? 0) >= 1, 2000, 'per_ip_limit');
  for (const c of [second, otherIp, again]) c.socket.destroy();

  // The same over HTTP/2 with prior knowledge, which the same engine serves.
  const h2Get = (localAddress: string): Promise<http2.ClientHttp2Session | null> =>
    new Promise((resolve) => {
      const session = http2.connect(`http://127.0.0.1:${port}`, { createConnection: () => net.connect({ port, host: '127.0.0.1', localAddress }) });
      session.on('error', () => resolve(null));
      session.on('close', () => resolve(null));
      const stream = session.request({ ':path': '/', ':authority': 'limited.test' });
      stream.on('error', () => resolve(null));
      stream.on('response', (headers) => {
        stream.resume();
        stream.on('end', () => resolve(headers[':status'] === 200 ? session : null));
      });
      stream.end();
    });
  await waitFor(() => (proxy.getMetrics().connections.byIP().get('127.0.0.12') ?? 0) === 0, 3000, 'the HTTP/1 connections to close');
  const h2First = await h2Get('127.0.0.12');
  const h2Second = await h2Get('127.0.0.12');
  expect(h2First).not.toBeNull();
  expect(h2Second).not.toBeNull();
  expect(await h2Get('127.0.0.12')).toBeNull();
  h2First?.destroy();
  h2Second?.destroy();
  await proxy.stop();
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

tap.test('connectionRateLimitPerMinute refuses connections over the budget', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, connectionRateLimitPerMinute: 3, routes: [forward(port)] });
  await proxy.start();
  for (let i = 0; i < 3; i++) {
    const ok = await connectAndRead(port, undefined, '127.0.0.10');
    expect(ok.data).toEqual('welcome\n');
    ok.socket.destroy();
  }
  expect((await connectAndRead(port, undefined, '127.0.0.10')).closed).toBeTrue();
  expect((await connectAndRead(port, undefined, '127.0.0.11')).data).toEqual('welcome\n');
  // The reason is recorded when the session task ends, just after the client sees the close.
  await waitFor(() => (proxy.getStatistics().terminationReasons.rate_limited ?? 0) >= 1, 2000, 'rate_limited');
  expect(proxy.getStatistics().terminationReasons.rate_limited).toEqual(1);
  await proxy.stop();
});

tap.test('route maxConnections refuses the N+1th concurrent connection and admits it once one closes', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(port, { security: { maxConnections: 2 } })] });
  await proxy.start();
  const a = await connectAndRead(port);
  const b = await connectAndRead(port);
  expect(a.data + b.data).toEqual('welcome\nwelcome\n');
  expect((await connectAndRead(port)).closed).toBeTrue();
  a.socket.destroy();
  await waitFor(() => proxy.getStatistics().activeConnections === 1, 3000, 'one connection to close');
  const c = await connectAndRead(port);
  expect(c.data).toEqual('welcome\n');
  b.socket.destroy();
  c.socket.destroy();
  await proxy.stop();
});

tap.test('an idle connection is closed after inactivityTimeout, an active one is not', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, inactivityTimeout: 600, routes: [forward(port)] });
  await proxy.start();
  const idle = await connectAndRead(port);
  const busy = await connectAndRead(port);
  const busyClosed = waitForClose(busy.socket);
  let busyOpen = true;
  busyClosed.then(() => (busyOpen = false));
  for (let i = 0; i < 8 && busyOpen; i++) {
    busy.socket.write('ping');
    await sleep(150);
  }
  await waitForClose(idle.socket);
  expect(busyOpen).toBeTrue();
  busy.socket.destroy();
  // The reason is recorded when the session task ends, just after the client sees the close.
  await waitFor(() => (proxy.getStatistics().terminationReasons.idle_timeout ?? 0) >= 1, 2000, 'idle_timeout');
  expect(proxy.getStatistics().terminationReasons.idle_timeout).toEqual(1);
  await proxy.stop();
});

tap.test('initialDataTimeout closes a client that never sends on a port that needs its first bytes', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 300,
    initialDataTimeout: 300,
    routes: [{ match: { ports: port, domains: 'a.example.com' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }],
  });
  await proxy.start();
  const socket = net.connect(port, '127.0.0.1');
  await waitForClose(socket);
  // The reason is recorded as the session unwinds, just after the socket closed.
  await waitFor(() => proxy.getStatistics().terminationReasons.initial_data_timeout === 1, 2000, 'initial_data_timeout');
  await proxy.stop();
});

tap.test('close the backend', async () => {
  await backend.close();
});

tap.start({ throwOnError: true });
