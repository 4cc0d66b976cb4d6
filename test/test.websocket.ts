// WebSocket through the HTTP engine with the real `ws` package on both ends: large messages both
// ways, close codes passed through, a backend refusing the upgrade, tunnels counted while open and
// kept as live connections, the proxy's pings (a client that answers stays, one that does not is
// closed with 1001), maxPayloadSize (1009), a client speaking garbage after the upgrade, and stop()
// closing open tunnels.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';

import { SmartProxy } from '../ts/index.js';
import { freePorts, sleep, waitFor } from './helpers/net.js';

// The backend: a ws server echoing every message; /close-4001 closes with 4001 at once; /deny is refused.
const backendHttp = http.createServer((_req, res) => res.end('plain'));
const backend = new WebSocketServer({ noServer: true });
const backendCloses: Array<{ code: number; reason: string }> = [];
const backendMessages: number[] = [];
let backendPings = 0;
backendHttp.on('upgrade', (req, socket, head) => {
  if (req.url === '/deny') {
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied');
    return;
  }
  backend.handleUpgrade(req, socket, head, (ws) => {
    ws.on('ping', () => backendPings++);
    ws.on('message', (data, isBinary) => {
      backendMessages.push((data as Buffer).length);
      ws.send(data, { binary: isBinary });
    });
    ws.on('close', (code, reason) => backendCloses.push({ code, reason: reason.toString() }));
    if (req.url === '/close-4001') ws.close(4001, 'backend says bye');
  });
});
await new Promise<void>((resolve) => backendHttp.listen(0, '127.0.0.1', resolve));
const backendPort = (backendHttp.address() as AddressInfo).port;
const target = { host: '127.0.0.1', port: backendPort };

const [plainPort, pingPort, limitPort, onePort] = await freePorts(4);
const proxy = new SmartProxy({
  gracefulShutdownTimeout: 500,
  routes: [
    { name: 'ws-plain', match: { ports: plainPort, domains: '*' }, action: { type: 'forward', target } },
    {
      name: 'ws-ping',
      match: { ports: pingPort, domains: '*' },
      action: { type: 'forward', target, websocket: { pingInterval: 150, pingTimeout: 300 } },
    },
    {
      name: 'ws-limit',
      match: { ports: limitPort, domains: '*' },
      action: { type: 'forward', target, websocket: { maxPayloadSize: 1000 } },
    },
    { name: 'ws-one', match: { ports: onePort, domains: '*' }, action: { type: 'forward', target }, security: { maxConnections: 1 } },
  ],
});
await proxy.start();

function open(port: number, path = '/', options: ConstructorParameters<typeof WebSocket>[2] = {}): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, options);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function closed(ws: WebSocket): Promise<{ code: number; reason: string }> {
  return new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve({ code: -1, reason: 'already closed' });
    ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }));
  });
}

function nextMessage(ws: WebSocket): Promise<Buffer> {
  return new Promise((resolve) => ws.once('message', (data) => resolve(data as Buffer)));
}

tap.test('large messages echo intact both ways: 1 MiB binary, 200 KiB text, 100 small ones in order', async () => {
  const ws = await open(plainPort);
  const big = randomBytes(1024 * 1024);
  ws.send(big);
  expect((await nextMessage(ws)).equals(big)).toBeTrue();
  const text = 'x'.repeat(200 * 1024);
  ws.send(text);
  expect((await nextMessage(ws)).toString()).toEqual(text);
  const got: string[] = [];
  const all = new Promise<void>((resolve) => ws.on('message', (d) => { got.push(d.toString()); if (got.length === 100) resolve(); }));
  for (let i = 0; i < 100; i++) ws.send(`m${i}`);
  await all;
  expect(got).toEqual(Array.from({ length: 100 }, (_, i) => `m${i}`));
  const closesBefore = backendCloses.length;
  ws.close(1000);
  await closed(ws);
  // The backend sees the close a moment after the client does; the next test counts closes.
  await waitFor(() => backendCloses.length > closesBefore, 3000, 'the backend to see the close');
});

tap.test('close codes pass through: the client closing with 4000 and the backend closing with 4001', async () => {
  backendCloses.length = 0;
  const ws = await open(plainPort);
  ws.close(4000, 'client says bye');
  expect(await closed(ws)).toEqual({ code: 4000, reason: 'client says bye' });
  await waitFor(() => backendCloses.length >= 1, 3000, 'the backend to see the close');
  expect(backendCloses).toEqual([{ code: 4000, reason: 'client says bye' }]);

  const second = await open(plainPort, '/close-4001');
  expect(await closed(second)).toEqual({ code: 4001, reason: 'backend says bye' });
});

tap.test('a backend refusing the upgrade with 403: the client gets the 403, no tunnel opens', async () => {
  const totalBefore = proxy.getStatistics().websocketTotal;
  const status = await new Promise<number>((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${plainPort}/deny`);
    ws.once('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.once('open', () => reject(new Error('opened')));
    ws.once('error', () => undefined);
  });
  expect(status).toEqual(403);
  expect(proxy.getStatistics().websocketTotal).toEqual(totalBefore);
});

tap.test('an open tunnel counts as a live connection and a websocket one until it closes', async () => {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 3000, 'earlier connections to end');
  const totalBefore = proxy.getStatistics().websocketTotal;
  const ws = await open(plainPort);
  await sleep(300);
  // hyper is done with the connection once it is upgraded: the session must still hold it.
  const stats = proxy.getStatistics();
  expect(stats.activeConnections).toEqual(1);
  expect(stats.websocketConnections).toEqual(1);
  expect(stats.websocketTotal).toEqual(totalBefore + 1);
  ws.send('still here');
  expect((await nextMessage(ws)).toString()).toEqual('still here');
  ws.close();
  await closed(ws);
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 3000, 'the tunnel to end');
  expect(proxy.getStatistics().websocketConnections).toEqual(0);
});

tap.test('an open tunnel holds its route slot: with maxConnections 1 a second upgrade gets 503 until the first closes', async () => {
  const first = await open(onePort);
  const refused = await new Promise<number>((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${onePort}/`);
    ws.once('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.once('open', () => {
      resolve(101);
      ws.close();
    });
    ws.once('error', () => undefined);
  });
  expect(refused).toEqual(503);
  first.close();
  await closed(first);
  await waitFor(() => proxy.getStatistics().websocketConnections === 0, 3000, 'the first tunnel to end');
  const again = await open(onePort);
  again.close();
  await closed(again);
});

tap.test('pingInterval: the proxy pings the client between frames; a client that pongs stays open, the backend sees no ping', async () => {
  backendPings = 0;
  const ws = await open(pingPort);
  let pings = 0;
  ws.on('ping', (payload) => {
    pings++;
    expect(payload.toString()).toEqual('smartproxy');
  });
  // Traffic both ways during the pings: the pings must land between frames, never inside one.
  const payload = randomBytes(256 * 1024);
  for (let i = 0; i < 5; i++) {
    ws.send(payload);
    expect((await nextMessage(ws)).equals(payload)).toBeTrue();
    await sleep(200);
  }
  expect(pings).toBeGreaterThan(3);
  expect(ws.readyState).toEqual(WebSocket.OPEN);
  expect(backendPings).toEqual(0);
  ws.close();
  await closed(ws);
});

tap.test('pingTimeout: a client that never answers a ping is closed with 1001 after interval + timeout', async () => {
  const started = Date.now();
  const ws = await open(pingPort, '/', { autoPong: false });
  const result = await closed(ws);
  const took = Date.now() - started;
  expect(result.code).toEqual(1001);
  expect(result.reason).toEqual('ping timeout');
  expect(took).toBeGreaterThan(400);
  expect(took).toBeLessThan(3000);
  await waitFor(() => proxy.getStatistics().websocketConnections === 0, 3000, 'the tunnel to be released');
});

tap.test('maxPayloadSize: a message up to the limit passes; a larger one closes the tunnel with 1009 and never reaches the backend', async () => {
  backendMessages.length = 0;
  const ws = await open(limitPort);
  ws.send(Buffer.alloc(1000, 1));
  expect((await nextMessage(ws)).length).toEqual(1000);
  ws.send(Buffer.alloc(1001, 2));
  const result = await closed(ws);
  expect(result.code).toEqual(1009);
  expect(backendMessages).toEqual([1000]);

  // Fragmented: the frames' payloads add up.
  const second = await open(limitPort);
  const fragmentsDone = closed(second);
  second.send(Buffer.alloc(600, 3), { fin: false });
  second.send(Buffer.alloc(600, 4), { fin: true });
  expect((await fragmentsDone).code).toEqual(1009);
  expect(backendMessages).toEqual([1000]);
});

tap.test('garbage after the upgrade on a frame-following route: closed with 1002, the proxy serves on', async () => {
  const socket = net.connect(limitPort, '127.0.0.1');
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  const key = randomBytes(16).toString('base64');
  socket.write(`GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${key}\r\n\r\n`);
  let received = Buffer.alloc(0);
  socket.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
  await waitFor(() => received.includes('\r\n\r\n'), 3000, 'the 101');
  expect(received.toString().startsWith('HTTP/1.1 101')).toBeTrue();
  const headEnd = received.indexOf('\r\n\r\n') + 4;
  // A frame claiming a payload length with the top bit set (RFC 6455 forbids it).
  socket.write(Buffer.from([0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]));
  await new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const close = received.subarray(headEnd);
  expect(close[0]).toEqual(0x88);
  expect(close.readUInt16BE(2)).toEqual(1002);
  const ws = await open(limitPort);
  ws.send('after');
  expect((await nextMessage(ws)).toString()).toEqual('after');
  ws.close();
  await closed(ws);
});

tap.test('stop() closes open tunnels within the grace period and completes', async () => {
  const sockets = await Promise.all([open(plainPort), open(pingPort)]);
  const done = sockets.map(closed);
  const started = Date.now();
  await proxy.stop();
  const results = await Promise.all(done);
  expect(Date.now() - started).toBeLessThan(3000);
  // The frame-following tunnel says it is going away; the plain one is a byte relay and just closes.
  expect(results[1].code).toEqual(1001);
  expect(proxy.getStatistics().activeConnections).toEqual(0);
  backend.close();
  backendHttp.close();
});

tap.start({ throwOnError: true });
