// The cleanup cases the TypeScript original fixed one by one: whatever clients and backends do,
// activeConnections returns to 0 and the process's open file descriptors do not grow.
import { tap, expect } from '@push.rocks/tapbundle';
import * as net from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort, openFdCount, sleep, startBlackhole, waitFor, waitForClose } from './helpers/net.js';

async function settle(proxy: SmartProxy, what: string): Promise<void> {
  await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, `activeConnections to return to 0 after ${what}`);
  await waitFor(() => proxy.getStatistics().readBuffersLent === 0, 5000, `readBuffersLent to return to 0 after ${what}`);
}

function connectOnce(port: number): net.Socket {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  return socket;
}

tap.test('20 rapid retries against a refused backend leave nothing behind', async () => {
  const refusedPort = await freePort();
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: refusedPort } } }],
  });
  await proxy.start();
  await sleep(50);
  const fdsBefore = openFdCount();
  for (let i = 0; i < 20; i++) {
    const socket = connectOnce(port);
    socket.write('hello');
    await waitForClose(socket);
    await sleep(50);
  }
  await settle(proxy, 'refused backends');
  expect(proxy.getStatistics().terminationReasons.backend_connect_failed).toEqual(20);
  expect(openFdCount()).toBeLessThan(fdsBefore + 3);
  await proxy.stop();
});

tap.test('clients that connect and leave before sending a byte', async () => {
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [
      // The domain makes the proxy wait for the first bytes (sniffing) before it can route.
      { match: { ports: port, domains: 'a.example.com' }, action: { type: 'forward', target: { host: '127.0.0.1', port: 9 } } },
    ],
  });
  await proxy.start();
  const fdsBefore = openFdCount();
  const sockets = Array.from({ length: 50 }, () => connectOnce(port));
  await Promise.all(sockets.map((s) => new Promise<void>((resolve) => s.once('connect', () => resolve()))));
  for (const s of sockets) s.destroy();
  // The proxy may not even have accepted them all yet: wait until every one has ended.
  await waitFor(() => proxy.getStatistics().totalConnections === 50, 5000, 'all 50 to be accepted');
  await settle(proxy, 'clients that left before data');
  expect(proxy.getStatistics().terminationReasons.client_closed_before_data).toEqual(50);
  await waitFor(() => openFdCount() < fdsBefore + 3, 3000, 'fds to be released');
  await proxy.stop();
});

tap.test('clients that leave while the backend connect is pending', async () => {
  const blackhole = await startBlackhole();
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: blackhole.port } } }],
  });
  await proxy.start();
  const fdsBefore = openFdCount();
  const sockets = Array.from({ length: 20 }, () => connectOnce(port));
  await Promise.all(sockets.map((s) => new Promise<void>((resolve) => s.once('connect', () => resolve()))));
  await waitFor(() => proxy.getStatistics().activeConnections === 20, 3000, 'all 20 to be connecting');
  await sleep(200);
  expect(proxy.getStatistics().activeConnections).toEqual(20);
  for (const s of sockets) s.destroy();
  await settle(proxy, 'clients that left during connect');
  expect(proxy.getStatistics().terminationReasons.client_closed_during_connect).toEqual(20);
  await waitFor(() => openFdCount() < fdsBefore + 3, 3000, 'fds to be released');
  await proxy.stop();
  blackhole.close();
});

tap.test('a storm of mixed failures returns to zero', async () => {
  const refusedPort = await freePort();
  const port = await freePort();
  const proxy = new SmartProxy({
    initialDataTimeout: 500,
    routes: [
      { match: { ports: port, domains: 'x.example.com' }, action: { type: 'forward', target: { host: '127.0.0.1', port: refusedPort } } },
    ],
  });
  await proxy.start();
  const fdsBefore = openFdCount();
  const work: Promise<unknown>[] = [];
  const answers: string[] = [];
  for (let i = 0; i < 100; i++) {
    const socket = connectOnce(port);
    switch (i % 4) {
      case 0: socket.once('connect', () => socket.destroy()); break;                       // leaves at once
      case 1: {                                                                             // refused backend: 502
        let answer = '';
        socket.on('data', (d: Buffer) => (answer += d.toString()));
        socket.once('close', () => answers.push(answer));
        socket.once('connect', () => socket.end('GET / HTTP/1.1\r\nHost: x.example.com\r\n\r\n'));
        break;
      }
      case 2: socket.once('connect', () => socket.write('\x16\x03\x01\x00\x05garbage')); break; // invalid TLS
      default: break;                                                                        // silent: times out
    }
    work.push(waitForClose(socket));
  }
  await Promise.all(work);
  await settle(proxy, 'the storm');
  await waitFor(() => openFdCount() < fdsBefore + 3, 3000, 'fds to be released');
  const reasons = proxy.getStatistics().terminationReasons;
  expect(reasons.initial_data_timeout).toEqual(25);
  expect(reasons.invalid_tls).toEqual(25);
  // HTTP is answered per request: each refused connect is a 502, and the client connection ends cleanly.
  expect(answers.length).toEqual(25);
  expect(answers.every((a) => a.startsWith('HTTP/1.1 502 '))).toBeTrue();
  expect(reasons.completed).toEqual(25);
  await proxy.stop();
});

tap.start({ throwOnError: true });
