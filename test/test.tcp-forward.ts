// Raw TCP forwarding through the Rust relay: big payloads both ways, half-close, port ranges.
import { tap, expect } from '@push.rocks/tapbundle';
import * as net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';

import { SmartProxy } from '../ts/index.js';
import { exchange, freePort, freePortRange, startEchoServer, startTcpServer, startTaggedServer, connectAndRead, waitFor } from './helpers/net.js';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

tap.test('a 16 MiB upload is echoed back intact through the proxy, with half-close', async () => {
  const echo = await startEchoServer();
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ name: 'echo', match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: echo.port } } }],
  });
  await proxy.start();
  const payload = randomBytes(16 * 1024 * 1024);
  // exchange() ends its write side after the payload: the echo server only finishes (and the
  // response only completes) if the FIN travelled through the proxy.
  const received = await exchange(port, payload);
  expect(received.length).toEqual(payload.length);
  expect(sha(received)).toEqual(sha(payload));
  await proxy.stop();
  await echo.close();
});

tap.test('a backend can keep sending after the client half-closed, and the client gets it all', async () => {
  const download = randomBytes(8 * 1024 * 1024);
  let uploadSeen = 0;
  const backend = await startTcpServer((socket) => {
    socket.on('data', (d: Buffer) => (uploadSeen += d.length));
    socket.on('end', () => socket.end(download));
  });
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }],
  });
  await proxy.start();
  const received = await exchange(port, randomBytes(3 * 1024 * 1024));
  expect(uploadSeen).toEqual(3 * 1024 * 1024);
  expect(sha(received)).toEqual(sha(download));
  const stats = proxy.getStatistics();
  expect(stats.totalConnections).toEqual(1);
  await proxy.stop();
  await backend.close();
});

tap.test('a port range listens on every port and preserve keeps the port', async () => {
  const start = await freePortRange(3);
  const backends = await Promise.all([0, 1, 2].map((i) => startTaggedServer(`backend-${i}`)));
  const proxy = new SmartProxy({
    routes: [
      {
        name: 'range',
        match: { ports: [{ from: start, to: start + 2 }] },
        action: {
          type: 'forward',
          targets: [
            { host: '127.0.0.1', port: backends[0].port },
            { host: '127.0.0.1', port: backends[1].port, match: { ports: [start + 1] } },
            { host: '127.0.0.1', port: backends[2].port, match: { ports: [start + 2] }, priority: 5 },
          ],
        },
      },
    ],
  });
  await proxy.start();
  expect(proxy.getListeningPorts().sort()).toEqual([start, start + 1, start + 2]);
  const replies = await Promise.all([0, 1, 2].map((i) => connectAndRead(start + i)));
  expect(replies.map((r) => r.data.trim())).toEqual(['backend-0', 'backend-1', 'backend-2']);
  for (const r of replies) r.socket.destroy();
  await proxy.stop();
  await Promise.all(backends.map((b) => b.close()));
});

tap.test('a server-first protocol works: the backend speaks before the client sends anything', async () => {
  const backend = await startTaggedServer('220 smtp.example ready');
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }],
  });
  await proxy.start();
  const { data, socket } = await connectAndRead(port);
  expect(data).toEqual('220 smtp.example ready\n');
  socket.destroy();
  await proxy.stop();
  await backend.close();
});

tap.test('host arrays are used round robin', async () => {
  const backendPort = await freePort();
  const one = await startTaggedServer('one', backendPort, '127.0.0.1');
  const two = await startTaggedServer('two', backendPort, '127.0.0.2');
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: ['127.0.0.1', '127.0.0.2'], port: backendPort } } }],
  });
  await proxy.start();
  const seen: string[] = [];
  for (let i = 0; i < 4; i++) {
    const { data, socket } = await connectAndRead(port);
    socket.destroy();
    seen.push(data.trim());
  }
  expect(seen).toEqual(['one', 'two', 'one', 'two']);
  await proxy.stop();
  await one.close();
  await two.close();
});

tap.test('the proxy survives a client that resets mid-transfer and counts it closed', async () => {
  const echo = await startEchoServer();
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: echo.port } } }],
  });
  await proxy.start();
  const socket = net.connect(port, '127.0.0.1');
  await new Promise<void>((resolve) => socket.on('connect', () => resolve()));
  socket.write(randomBytes(1024 * 1024));
  socket.resetAndDestroy();
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'the reset connection to be released');
  const again = await exchange(port, 'still alive');
  expect(again.toString()).toEqual('still alive');
  await proxy.stop();
  await echo.close();
});

tap.start({ throwOnError: true });
