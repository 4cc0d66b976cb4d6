// WebSocket through the HTTP engine with the real `ws` package on both ends: large messages both
// ways, close codes passed through, a backend refusing the upgrade, tunnels counted while open and
// kept as live connections, the proxy's pings (a client that answers stays, one that does not is
// closed with 1001), maxPayloadSize (1009), a client speaking garbage after the upgrade, the
// RFC 6455 rules a frame-following tunnel enforces (1002, the refused frame never reaching the
// backend: a raw client writes frames by hand, a raw backend records every byte), and stop()
// closing open tunnels.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
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

// The raw backend: accepts any upgrade with a 101 and records every byte after it, per connection,
// exactly as the proxy passed it on; it never answers a frame.
interface IRawConnection {
  bytes: Buffer;
  closed: boolean;
}
const rawConnections: IRawConnection[] = [];
const rawBackend = net.createServer((socket) => {
  const conn: IRawConnection = { bytes: Buffer.alloc(0), closed: false };
  let head: Buffer | null = Buffer.alloc(0);
  socket.on('error', () => undefined);
  socket.on('close', () => (conn.closed = true));
  socket.on('data', (d: Buffer) => {
    if (head === null) {
      conn.bytes = Buffer.concat([conn.bytes, d]);
      return;
    }
    head = Buffer.concat([head, d]);
    const end = head.indexOf('\r\n\r\n');
    if (end < 0) return;
    const key = /sec-websocket-key:\s*(\S+)/i.exec(head.subarray(0, end).toString())?.[1] ?? '';
    const accept = createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
    conn.bytes = head.subarray(end + 4);
    head = null;
    rawConnections.push(conn);
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  });
});
await new Promise<void>((resolve) => rawBackend.listen(0, '127.0.0.1', resolve));
const rawTarget = { host: '127.0.0.1', port: (rawBackend.address() as AddressInfo).port };

const [plainPort, pingPort, limitPort, onePort, guardPort, pingGuardPort, rawPlainPort] = await freePorts(7);
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
    {
      name: 'ws-guard',
      match: { ports: guardPort, domains: '*' },
      action: { type: 'forward', target: rawTarget, websocket: { maxPayloadSize: 1024 } },
    },
    {
      name: 'ws-ping-guard',
      match: { ports: pingGuardPort, domains: '*' },
      action: { type: 'forward', target: rawTarget, websocket: { pingInterval: 60_000 } },
    },
    { name: 'ws-raw-plain', match: { ports: rawPlainPort, domains: '*' }, action: { type: 'forward', target: rawTarget } },
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

const MASK = Buffer.from([0x37, 0xfa, 0x21, 0x3d]);

/** A frame written by hand: `first` is FIN, RSV and opcode; masked with MASK unless told not to. */
function frame(first: number, payload: Buffer, masked = true): Buffer {
  const len = payload.length;
  const maskBit = masked ? 0x80 : 0;
  let head: Buffer;
  if (len <= 125) {
    head = Buffer.from([first, maskBit | len]);
  } else if (len <= 0xffff) {
    head = Buffer.from([first, maskBit | 126, len >> 8, len & 0xff]);
  } else {
    head = Buffer.alloc(10);
    head[0] = first;
    head[1] = maskBit | 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  if (!masked) return Buffer.concat([head, payload]);
  const body = Buffer.from(payload.map((b, i) => b ^ MASK[i % 4]));
  return Buffer.concat([head, MASK, body]);
}

interface IRawTunnel {
  socket: net.Socket;
  /** What the backend received on this tunnel's upstream connection. */
  backend: IRawConnection;
  /** The proxy's Close to the client: its status and reason. */
  closeFrame(): Promise<{ code: number; reason: string }>;
}

/** A raw client through the proxy to the raw backend, upgraded and ready for hand-written frames. */
async function rawTunnel(port: number): Promise<IRawTunnel> {
  const before = rawConnections.length;
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  const key = randomBytes(16).toString('base64');
  socket.write(`GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${key}\r\n\r\n`);
  let received = Buffer.alloc(0);
  socket.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
  await waitFor(() => received.includes('\r\n\r\n'), 3000, 'the 101');
  expect(received.toString().startsWith('HTTP/1.1 101')).toBeTrue();
  const headEnd = received.indexOf('\r\n\r\n') + 4;
  await waitFor(() => rawConnections.length > before, 3000, 'the backend to accept the upgrade');
  return {
    socket,
    backend: rawConnections[before],
    async closeFrame() {
      const frames = () => received.subarray(headEnd);
      await waitFor(() => frames().length >= 2 && frames().length >= 2 + frames()[1], 3000, "the proxy's Close");
      const close = frames();
      expect(close[0]).toEqual(0x88);
      return { code: close.readUInt16BE(2), reason: close.subarray(4, 2 + close[1]).toString() };
    },
  };
}

/** Ends the client's side once the proxy closed, and waits for the backend connection to end. */
async function finish(tunnel: IRawTunnel): Promise<void> {
  tunnel.socket.end();
  await waitFor(() => tunnel.backend.closed, 3000, 'the upstream connection to close');
}

tap.test('maxPayloadSize 1024: a 1 MiB frame with the reserved opcode 0xB is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(guardPort);
  tunnel.socket.write(frame(0x80 | 0xb, Buffer.alloc(1024 * 1024, 7)));
  expect(await tunnel.closeFrame()).toEqual({ code: 1002, reason: 'reserved opcode' });
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('a 126-byte ping is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(guardPort);
  tunnel.socket.write(frame(0x80 | 0x9, Buffer.alloc(126, 1)));
  expect(await tunnel.closeFrame()).toEqual({ code: 1002, reason: 'control frame over 125 bytes' });
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('a fragmented ping (FIN clear) is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(guardPort);
  tunnel.socket.write(frame(0x9, Buffer.from('ping')));
  expect(await tunnel.closeFrame()).toEqual({ code: 1002, reason: 'fragmented control frame' });
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('an unmasked client frame is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(guardPort);
  tunnel.socket.write(frame(0x81, Buffer.from('hello'), false));
  expect(await tunnel.closeFrame()).toEqual({ code: 1002, reason: 'unmasked client frame' });
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('RSV2 set with no extension to define it is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(guardPort);
  tunnel.socket.write(frame(0x80 | 0x20 | 0x1, Buffer.from('hello')));
  expect(await tunnel.closeFrame()).toEqual({ code: 1002, reason: 'reserved bits set' });
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('a valid fragmented message under the limit, a ping between its fragments, reaches the backend byte for byte', async () => {
  const tunnel = await rawTunnel(guardPort);
  // 400 + 400 + 200 = 1000 bytes of message, each frame in its own write, one head cut in two.
  const frames = [
    frame(0x1, Buffer.alloc(400, 0x61)),
    frame(0x80 | 0x9, Buffer.from('between')),
    frame(0x0, Buffer.alloc(400, 0x62)),
    frame(0x80 | 0x0, Buffer.alloc(200, 0x63)),
  ];
  for (const f of frames.slice(0, 3)) {
    tunnel.socket.write(f);
    await sleep(30);
  }
  tunnel.socket.write(frames[3].subarray(0, 3));
  await sleep(30);
  tunnel.socket.write(frames[3].subarray(3));
  const sent = Buffer.concat(frames);
  await waitFor(() => tunnel.backend.bytes.length >= sent.length, 3000, 'the message at the backend');
  expect(tunnel.backend.bytes.equals(sent)).toBeTrue();
  expect(tunnel.socket.destroyed).toBeFalse();
  tunnel.socket.destroy();
});

tap.test('frames before a refused one in the same write reach the backend; not one byte of the refused frame does, even with its head cut across writes', async () => {
  const tunnel = await rawTunnel(guardPort);
  const good = Buffer.concat([frame(0x81, Buffer.from('first')), frame(0x82, Buffer.alloc(300, 9))]);
  const bad = frame(0x81, Buffer.from('unmasked'), false);
  tunnel.socket.write(Buffer.concat([good, bad.subarray(0, 1)]));
  await sleep(100);
  tunnel.socket.write(bad.subarray(1));
  expect((await tunnel.closeFrame()).code).toEqual(1002);
  await finish(tunnel);
  expect(tunnel.backend.bytes.equals(good)).toBeTrue();
});

tap.test('a route with only pingInterval follows frames too: a reserved opcode is closed with 1002 and never reaches the backend', async () => {
  const tunnel = await rawTunnel(pingGuardPort);
  tunnel.socket.write(frame(0x80 | 0x3, Buffer.from('data?')));
  expect((await tunnel.closeFrame()).code).toEqual(1002);
  await finish(tunnel);
  expect(tunnel.backend.bytes.length).toEqual(0);
});

tap.test('a route without websocket settings stays a byte relay: bytes that are no WebSocket frames pass untouched', async () => {
  // Any protocol may be upgraded on an HTTP route; the tunnel cannot tell it is not WebSocket.
  const tunnel = await rawTunnel(rawPlainPort);
  const bytes = Buffer.concat([Buffer.from('not a frame\n'), frame(0x80 | 0xb, Buffer.alloc(200, 1), false)]);
  tunnel.socket.write(bytes);
  await waitFor(() => tunnel.backend.bytes.length >= bytes.length, 3000, 'the bytes at the backend');
  expect(tunnel.backend.bytes.equals(bytes)).toBeTrue();
  tunnel.socket.destroy();
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
  rawBackend.close();
});

tap.start({ throwOnError: true });
