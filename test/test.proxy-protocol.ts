// The PROXY protocol: a real HAProxy (send-proxy, send-proxy-v2) in front of the proxy makes the
// client address it saw the client IP (X-Forwarded-For, route matching, security); headers split
// across segments, v2 LOCAL, garbage and never-completing headers; an untrusted peer that sends a
// header is refused; and headers sent to backends (v1, v2) on raw relays and HTTP upstreams.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, openFdCount, sleep, waitFor } from './helpers/net.js';

/** Answers every request with the client address facts it received. */
async function startHttpBackend(): Promise<{ port: number; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ xff: req.headers['x-forwarded-for'] ?? null, peer: req.socket.remoteAddress }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A raw TCP backend that records the first bytes of each connection, then answers `seen\n`. */
async function startRecordingBackend(): Promise<{ port: number; firstBytes: Buffer[]; close(): Promise<void> }> {
  const firstBytes: Buffer[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    let got = Buffer.alloc(0);
    socket.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      // The v2 signature itself holds CRLFCRLF, and the PROXY header may arrive in a segment of its
      // own: only a request head (after `GET `) or the END marker completes what we record.
      const requestAt = got.indexOf('GET ');
      if ((requestAt >= 0 && got.indexOf('\r\n\r\n', requestAt) >= 0) || got.includes('END')) {
        firstBytes.push(got);
        socket.end('HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nseen\n');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    firstBytes,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Sends `chunks` (with a pause between them) and collects the answer until the proxy closes. */
function rawExchange(port: number, chunks: Array<string | Buffer>, localAddress = '127.0.0.1', pauseMs = 30): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1', localAddress }, async () => {
      for (const chunk of chunks) {
        socket.write(chunk);
        await sleep(pauseMs);
      }
    });
    let data = '';
    socket.on('data', (d: Buffer) => (data += d.toString()));
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(data));
  });
}

const v2Signature = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
function v2Header(command: 'LOCAL' | 'PROXY', src = '203.0.113.7', dst = '127.0.0.1', sport = 40000, dport = 80): Buffer {
  const body = Buffer.alloc(12);
  src.split('.').forEach((o, i) => body.writeUInt8(Number(o), i));
  dst.split('.').forEach((o, i) => body.writeUInt8(Number(o), 4 + i));
  body.writeUInt16BE(sport, 8);
  body.writeUInt16BE(dport, 10);
  return Buffer.concat([v2Signature, Buffer.from([command === 'LOCAL' ? 0x20 : 0x21, 0x11, 0x00, 12]), body]);
}

const request = (host = 'app.test'): string => `GET / HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`;
const xffOf = (answer: string): string | null => JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)).xff;

function httpRoute(port: number, backendPort: number, extra: Partial<IRouteConfig> = {}): IRouteConfig {
  return { name: 'app', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } }, ...extra };
}

tap.test('a trusted peer\'s v1 and v2 headers (also split across segments) name the client; LOCAL keeps the peer', async () => {
  const backend = await startHttpBackend();
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({ acceptProxyProtocol: true, proxyIPs: ['127.0.0.1'], gracefulShutdownTimeout: 200, routes: [httpRoute(port, backend.port)] });
  await proxy.start();
  try {
    expect(xffOf(await rawExchange(port, [`PROXY TCP4 198.51.100.4 127.0.0.1 5555 ${port}\r\n${request()}`]))).toEqual('198.51.100.4');
    // Split: the v1 line in three pieces, then the request.
    expect(xffOf(await rawExchange(port, ['PROXY TC', 'P4 198.51.100.5 127.0.0.1 5', `556 ${port}\r\n`, request()]))).toEqual('198.51.100.5');
    const v2 = v2Header('PROXY');
    expect(xffOf(await rawExchange(port, [v2.subarray(0, 5), v2.subarray(5, 17), Buffer.concat([v2.subarray(17), Buffer.from(request())])]))).toEqual('203.0.113.7');
    expect(xffOf(await rawExchange(port, [Buffer.concat([v2Header('LOCAL'), Buffer.from(request())])]))).toEqual('127.0.0.1');
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 3000, 'connections to close');
  } finally {
    await proxy.stop();
    await backend.close();
  }
});

tap.test('garbage, missing and never-completing headers from a trusted peer close the connection; nothing leaks', async () => {
  const backend = await startHttpBackend();
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    acceptProxyProtocol: true,
    proxyIPs: ['127.0.0.1'],
    initialDataTimeout: 300,
    gracefulShutdownTimeout: 200,
    routes: [httpRoute(port, backend.port)],
  });
  await proxy.start();
  try {
    const fdsBefore = openFdCount();
    expect(await rawExchange(port, [`PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n${request()}`])).toEqual('');
    expect(await rawExchange(port, [request()])).toEqual('');
    const started = Date.now();
    expect(await rawExchange(port, ['PROXY TCP4 1.2.3'])).toEqual('');
    expect(Date.now() - started >= 250).toBeTrue();
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 3000, 'connections to close');
    const reasons = proxy.getStatistics().terminationReasons;
    expect(reasons.invalid_proxy_header).toEqual(2);
    expect(reasons.initial_data_timeout).toEqual(1);
    expect(openFdCount() - fdsBefore <= 2).toBeTrue();
  } finally {
    await proxy.stop();
    await backend.close();
  }
});

tap.test('an untrusted peer that sends a header is refused; without one it is served, and its X-Forwarded-For is replaced', async () => {
  const backend = await startHttpBackend();
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({ acceptProxyProtocol: true, proxyIPs: ['10.9.9.9'], gracefulShutdownTimeout: 200, routes: [httpRoute(port, backend.port)] });
  await proxy.start();
  try {
    expect(await rawExchange(port, [`PROXY TCP4 198.51.100.4 127.0.0.1 5555 ${port}\r\n${request()}`])).toEqual('');
    const spoofed = `GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n`;
    expect(xffOf(await rawExchange(port, [spoofed]))).toEqual('127.0.0.1');
    await waitFor(() => proxy.getStatistics().terminationReasons.invalid_proxy_header === 1, 3000, 'the refusal');
  } finally {
    await proxy.stop();
    await backend.close();
  }
});

function startHaproxy(config: string): Promise<ChildProcess> {
  const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-haproxy-'));
  const file = path.join(dir, 'haproxy.cfg');
  writeFileSync(file, config);
  const child = spawn('haproxy', ['-db', '-f', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  // The configuration goes once HAProxy has ended (stopHaproxy, in each test's finally), or at
  // exit should this process end first.
  const removeDir = (): void => rmSync(dir, { recursive: true, force: true });
  process.once('exit', removeDir);
  child.once('close', () => {
    process.off('exit', removeDir);
    removeDir();
  });
  return Promise.resolve(child);
}

async function stopHaproxy(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
}

async function waitForPort(port: number): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const open = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (open) return;
    if (Date.now() > deadline) throw new Error(`port ${port} did not open`);
    await sleep(50);
  }
}

tap.test('HAProxy in front (send-proxy and send-proxy-v2): the backend sees the address HAProxy saw', async () => {
  const backend = await startHttpBackend();
  const [proxyPort, v1Port, v2Port] = await freePorts(3);
  const proxy = new SmartProxy({ acceptProxyProtocol: true, proxyIPs: ['127.0.0.1'], gracefulShutdownTimeout: 200, routes: [httpRoute(proxyPort, backend.port)] });
  await proxy.start();
  const haproxy = await startHaproxy([
    'global', '  maxconn 100',
    'defaults', '  mode tcp', '  timeout connect 2s', '  timeout client 5s', '  timeout server 5s',
    `frontend v1`, `  bind 127.0.0.1:${v1Port}`, '  default_backend to_proxy_v1',
    `frontend v2`, `  bind 127.0.0.1:${v2Port}`, '  default_backend to_proxy_v2',
    'backend to_proxy_v1', `  server p 127.0.0.1:${proxyPort} send-proxy`,
    'backend to_proxy_v2', `  server p 127.0.0.1:${proxyPort} send-proxy-v2`, '',
  ].join('\n'));
  try {
    await waitForPort(v1Port);
    await waitForPort(v2Port);
    expect(xffOf(await rawExchange(v1Port, [request()], '127.0.0.5'))).toEqual('127.0.0.5');
    expect(xffOf(await rawExchange(v2Port, [request()], '127.0.0.6'))).toEqual('127.0.0.6');
  } finally {
    await stopHaproxy(haproxy);
    await proxy.stop();
    await backend.close();
  }
});

tap.test('sendProxyProtocol: v1 and v2 to raw backends, v2 to an HTTP upstream (per client address), and HAProxy accept-proxy behind us', async () => {
  const recorder = await startRecordingBackend();
  const backend = await startHttpBackend();
  const [raw1, raw2, httpPort, behind, haproxyPort] = await freePorts(5);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [
      { name: 'raw-v1', match: { ports: raw1 }, action: { type: 'forward', target: { host: '127.0.0.1', port: recorder.port }, sendProxyProtocol: true } },
      { name: 'raw-v2', match: { ports: raw2 }, action: { type: 'forward', target: { host: '127.0.0.1', port: recorder.port }, sendProxyProtocol: 2 } },
      { name: 'http-v2', match: { ports: httpPort, domains: 'app.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: recorder.port }, sendProxyProtocol: 2 } },
      { name: 'to-haproxy', match: { ports: behind }, action: { type: 'forward', target: { host: '127.0.0.1', port: haproxyPort }, sendProxyProtocol: 2 } },
    ],
  });
  await proxy.start();
  const haproxy = await startHaproxy([
    'global', '  maxconn 100',
    'defaults', '  mode http', '  timeout connect 2s', '  timeout client 5s', '  timeout server 5s',
    'frontend fe', `  bind 127.0.0.1:${haproxyPort} accept-proxy`, '  http-request set-header X-Forwarded-For %[src]', '  default_backend be',
    'backend be', `  server b 127.0.0.1:${backend.port}`, '',
  ].join('\n'));
  try {
    await rawExchange(raw1, ['hello END'], '127.0.0.7');
    expect(recorder.firstBytes[0].toString()).toEqual(`PROXY TCP4 127.0.0.7 127.0.0.1 ${recorder.firstBytes[0].toString().split(' ')[4]} ${raw1}\r\nhello END`);
    await rawExchange(raw2, ['hello END'], '127.0.0.8');
    const v2 = recorder.firstBytes[1];
    expect(v2.subarray(0, 12).equals(v2Signature)).toBeTrue();
    expect([...v2.subarray(12, 16)]).toEqual([0x21, 0x11, 0x00, 12]);
    expect([...v2.subarray(16, 24)]).toEqual([127, 0, 0, 8, 127, 0, 0, 1]);
    expect(v2.readUInt16BE(26)).toEqual(raw2);
    expect(v2.subarray(28).toString()).toEqual('hello END');
    // HTTP upstream: the header precedes the request on the pooled connection of this client.
    expect((await rawExchange(httpPort, [request()], '127.0.0.9')).endsWith('seen\n')).toBeTrue();
    const upstream = recorder.firstBytes[2];
    expect(upstream.subarray(0, 12).equals(v2Signature)).toBeTrue();
    expect([...upstream.subarray(16, 20)]).toEqual([127, 0, 0, 9]);
    // The destination: the address and port the client connected to.
    expect([...upstream.subarray(20, 24)]).toEqual([127, 0, 0, 1]);
    expect(upstream.readUInt16BE(26)).toEqual(httpPort);
    expect(upstream.subarray(28).toString().startsWith('GET / HTTP/1.1\r\n')).toBeTrue();
    // A real PROXY v2 consumer behind us sees the client we saw.
    await waitForPort(haproxyPort);
    expect(xffOf(await rawExchange(behind, [request()], '127.0.0.10'))).toEqual('127.0.0.10');
  } finally {
    await stopHaproxy(haproxy);
    await proxy.stop();
    await recorder.close();
    await backend.close();
  }
});

tap.start();
