// HTTP keep-alive connections end by the watchdog of the HTTP engine (src/http/watchdog.rs): an idle
// one after `inactivityTimeout`, a busy one not (each request moves its idle point on), and any one
// at `maxConnectionLifetime`, busy or not. Raw sockets speak HTTP/1.1 here, so every request
// travels over the one connection under test.

import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePorts, sleep, waitFor, waitForClose } from './helpers/net.js';

const DOMAIN = 'timeouts.example.com';

// X-Forwarded-For shows the requests came through the HTTP engine, not a raw relay.
let lastForwardedFor: string | undefined;
const backend = http.createServer((req, res) => {
  lastForwardedFor = req.headers['x-forwarded-for'] as string | undefined;
  req.resume();
  req.on('end', () => res.end('ok'));
});
let backendPort = 0;

/** A keep-alive client connection that sends one GET at a time and reads its whole answer. */
class KeepAliveClient {
  readonly socket: net.Socket;
  closed = false;
  private received = '';

  constructor(port: number) {
    this.socket = net.connect(port, '127.0.0.1');
    this.socket.setEncoding('latin1');
    this.socket.on('data', (chunk: string) => (this.received += chunk));
    this.socket.on('error', () => undefined);
    this.socket.on('close', () => (this.closed = true));
  }

  async get(): Promise<void> {
    const before = this.received.length;
    this.socket.write(`GET / HTTP/1.1\r\nHost: ${DOMAIN}\r\n\r\n`);
    // The backend answers `ok` with a Content-Length, so the answer ends with its body.
    await waitFor(() => this.received.slice(before).endsWith('\r\n\r\nok') || this.closed, 3000, 'an answer');
    expect(this.closed).toBeFalse();
    expect(this.received.slice(before).startsWith('HTTP/1.1 200')).toBeTrue();
  }
}

/** A proxy with one HTTP route to the backend on a fresh port, started, with `limits` on top. */
async function startProxy(limits: {
  inactivityTimeout?: number;
  maxConnectionLifetime?: number;
  headerTimeout?: number;
  httpKeepAliveTimeout?: number;
}): Promise<{ proxy: SmartProxy; port: number }> {
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 300,
    ...limits,
    routes: [{ match: { ports: port, domains: DOMAIN }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } }],
  });
  await proxy.start();
  return { proxy, port };
}

const reasons = (proxy: SmartProxy): Record<string, number> => proxy.getStatistics().terminationReasons as Record<string, number>;

tap.test('setup: the backend', async () => {
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  backendPort = (backend.address() as AddressInfo).port;
});

tap.test('inactivityTimeout closes an idle keep-alive HTTP connection, and not one that keeps sending requests', async () => {
  const { proxy, port } = await startProxy({ inactivityTimeout: 600 });
  try {
    const idle = new KeepAliveClient(port);
    const busy = new KeepAliveClient(port);
    await idle.get();
    await busy.get();
    expect(lastForwardedFor).toEqual('127.0.0.1');
    const idleClosed = waitForClose(idle.socket);
    // 12 requests 150 ms apart: 1.8 s, three times the timeout, never 600 ms without one.
    for (let i = 0; i < 12; i++) {
      await sleep(150);
      await busy.get();
    }
    await idleClosed;
    expect(busy.closed).toBeFalse();
    await waitFor(() => (reasons(proxy).idle_timeout ?? 0) >= 1, 2000, 'idle_timeout');
    expect(reasons(proxy).idle_timeout).toEqual(1);
    // Once it stops sending, the busy one goes the same way.
    await waitForClose(busy.socket);
    await waitFor(() => (reasons(proxy).idle_timeout ?? 0) >= 2, 2000, 'a second idle_timeout');
  } finally {
    await proxy.stop();
  }
  expect(proxy.getStatistics().activeConnections).toEqual(0);
});

tap.test('httpKeepAliveTimeout, not headerTimeout, ends a keep-alive connection waiting for its next request', async () => {
  const { proxy, port } = await startProxy({ headerTimeout: 300, httpKeepAliveTimeout: 1500 });
  try {
    const client = new KeepAliveClient(port);
    await client.get();
    const closed = waitForClose(client.socket);
    // Four head timeouts' worth of waiting between requests: still open, still served.
    await sleep(1200);
    expect(client.closed).toBeFalse();
    await client.get();
    await closed;
    await waitFor(() => (reasons(proxy).keep_alive_timeout ?? 0) >= 1, 2000, 'keep_alive_timeout');
    expect(reasons(proxy).head_timeout ?? 0).toEqual(0);
  } finally {
    await proxy.stop();
  }
  expect(proxy.getStatistics().activeConnections).toEqual(0);
});

tap.test('maxConnectionLifetime closes a keep-alive HTTP connection even while it sends requests', async () => {
  const { proxy, port } = await startProxy({ maxConnectionLifetime: 800 });
  try {
    const client = new KeepAliveClient(port);
    await client.get();
    const closed = waitForClose(client.socket);
    let answered = 1;
    // Far more requests than fit in the lifetime; the connection must end on its own.
    for (let i = 0; i < 60 && !client.closed; i++) {
      await sleep(100);
      if (client.closed) break;
      try {
        await client.get();
        answered++;
      } catch {
        break;
      }
    }
    await closed;
    expect(answered).toBeGreaterThan(2);
    expect(answered).toBeLessThan(60);
    await waitFor(() => (reasons(proxy).lifetime_exceeded ?? 0) >= 1, 2000, 'lifetime_exceeded');
    expect(reasons(proxy).lifetime_exceeded).toEqual(1);
  } finally {
    await proxy.stop();
  }
  expect(proxy.getStatistics().activeConnections).toEqual(0);
});

tap.test('teardown: the backend', async () => {
  backend.closeAllConnections();
  await new Promise<void>((resolve) => backend.close(() => resolve()));
});

tap.start({ throwOnError: true });
