// Per-target settings that override the route's for the connection to one target (API.md
// "Routes": IRouteTarget.tls "overrides route-level"; sendProxyProtocol on "options, route action
// or target"): a target's PROXY header version on raw TCP relays and on HTTP upstreams, and a
// target's own TLS (re-encryption to one target, plain to another, its own verification, and TLS
// to a target behind a plain HTTP route). The TLS clients see stays the route's.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import type * as tls from 'node:tls';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, listenTracked, type ITestServer } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';

const ca = createTestCa();
const frontCert = ca.issue(['app.example.com', 'reenc.example.com', 'verify.example.com']);
const backendCert = ca.issue(['app.example.com', 'reenc.example.com', 'verify.example.com', 'origin.example.com']);

type IServer = ITestServer;

const listening = (server: net.Server): Promise<IServer> => listenTracked(server);

const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/**
 * A TCP backend that reads an optional PROXY header (v1 line or v2 binary) before an HTTP request
 * head, and answers with JSON: the v1 line without its CRLF, 'v2', or null.
 */
function proxyAwareBackend(): Promise<IServer> {
  return listening(
    net.createServer((socket) => {
      let got = Buffer.alloc(0);
      socket.on('data', (d: Buffer) => {
        got = Buffer.concat([got, d]);
        let proxy: string | null = null;
        let rest = got;
        if (got.subarray(0, 12).equals(V2_SIGNATURE)) {
          if (got.length < 16) return;
          const length = 16 + got.readUInt16BE(14);
          if (got.length < length) return;
          proxy = 'v2';
          rest = got.subarray(length);
        } else if (got.subarray(0, 6).toString() === 'PROXY ') {
          const end = got.indexOf('\r\n');
          if (end < 0) return;
          proxy = got.subarray(0, end).toString();
          rest = got.subarray(end + 2);
        }
        if (rest.indexOf('\r\n\r\n') < 0) return;
        const body = JSON.stringify({ proxy });
        socket.end(`HTTP/1.1 200 OK\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      });
    }),
  );
}

/** Answers with JSON: the backend's name, and the SNI it was reached with (TLS backends). */
function describe(name: string) {
  return (req: http.IncomingMessage, res: http.ServerResponse): void => {
    req.resume();
    const servername = (req.socket as tls.TLSSocket & { servername?: string }).servername ?? null;
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ name, servername }));
  };
}

/** The JSON answer of one request (a fresh connection each time), or the status when not 200. */
function request(
  port: number,
  host: string,
  headers: Record<string, string> = {},
  secure = false,
): Promise<{ status: number; body: Record<string, unknown> | string }> {
  return new Promise((resolve, reject) => {
    const options: https.RequestOptions = { host: '127.0.0.1', port, path: '/', headers: { host, ...headers }, agent: false };
    const onResponse = (res: http.IncomingMessage): void => {
      let text = '';
      res.on('data', (d: Buffer) => (text += d.toString()));
      res.on('end', () => {
        const status = res.statusCode ?? 0;
        resolve({ status, body: status === 200 ? (JSON.parse(text) as Record<string, unknown>) : text });
      });
    };
    const req = secure ? https.request({ ...options, servername: host, ca: ca.cert }, onResponse) : http.request(options, onResponse);
    req.on('error', reject);
    req.end();
  });
}

/** Sends an HTTP request over a raw TCP connection and returns the backend's JSON answer. */
function rawRequest(port: number): Promise<{ proxy: string | null }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1' }, () => socket.write('GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n'));
    let data = '';
    socket.on('data', (d: Buffer) => (data += d.toString()));
    socket.on('error', reject);
    socket.on('close', () => {
      const at = data.indexOf('\r\n\r\n');
      if (at < 0) reject(new Error(`no answer (got ${JSON.stringify(data)})`));
      else resolve(JSON.parse(data.slice(at + 4)) as { proxy: string | null });
    });
  });
}

const servers: IServer[] = [];
let proxy: SmartProxy;
const ports = { raw1: 0, raw2: 0, raw3: 0, http: 0, https: 0, origin: 0 };

tap.test('start: routes whose targets override the route\'s PROXY header and TLS', async () => {
  const recorder = await proxyAwareBackend();
  const plain = await listening(http.createServer(describe('plain')));
  const secure = await listening(https.createServer({ key: backendCert.key, cert: backendCert.cert }, describe('tls')));
  servers.push(recorder, plain, secure);
  [ports.raw1, ports.raw2, ports.raw3, ports.http, ports.https, ports.origin] = await freePorts(6);
  const at = (server: IServer) => ({ host: '127.0.0.1', port: server.port });
  const front = { mode: 'terminate' as const, certificate: { key: frontCert.key, cert: frontCert.cert } };
  const routes: IRouteConfig[] = [
    // Raw TCP: the route says v1; one target says v2, another none.
    {
      name: 'raw',
      match: { ports: [ports.raw1, ports.raw2, ports.raw3] },
      action: {
        type: 'forward',
        sendProxyProtocol: 1,
        targets: [
          { ...at(recorder), match: { ports: [ports.raw2] }, sendProxyProtocol: 2 },
          { ...at(recorder), match: { ports: [ports.raw3] }, sendProxyProtocol: false },
          at(recorder),
        ],
      },
    },
    // HTTP upstream: neither the option nor the route sends one; one target does.
    {
      name: 'http',
      match: { ports: ports.http, domains: 'app.test' },
      action: { type: 'forward', targets: [{ ...at(recorder), match: { headers: { 'x-pp': '1' } }, sendProxyProtocol: true }, at(recorder)] },
    },
    // Terminated TLS: one target re-encrypts (trusting the test CA), the other gets plain HTTP.
    {
      name: 'front',
      match: { ports: ports.https, domains: 'app.example.com' },
      action: {
        type: 'forward',
        tls: front,
        targets: [{ ...at(secure), match: { headers: { 'x-secure': '1' } }, tls: { mode: 'terminate-and-reencrypt', certificate: { ca: ca.cert } } }, at(plain)],
      },
    },
    // A re-encrypting route: one target says plain.
    {
      name: 'reenc',
      match: { ports: ports.https, domains: 'reenc.example.com' },
      action: {
        type: 'forward',
        tls: { mode: 'terminate-and-reencrypt', certificate: { ...front.certificate, ca: ca.cert } },
        targets: [{ ...at(plain), match: { headers: { 'x-plain': '1' } }, tls: { mode: 'terminate' } }, at(secure)],
      },
    },
    // Verification per target: the same backend, verified (and failing: the system roots do not
    // know the test CA) on one target, not verified on the other.
    {
      name: 'verify',
      match: { ports: ports.https, domains: 'verify.example.com' },
      action: {
        type: 'forward',
        tls: front,
        targets: [
          { ...at(secure), match: { headers: { 'x-verify': '1' } }, tls: { mode: 'terminate-and-reencrypt' } },
          { ...at(secure), tls: { mode: 'terminate-and-reencrypt', rejectUnauthorized: false } },
        ],
      },
    },
    // A plain HTTP route whose target is reached over TLS.
    {
      name: 'origin',
      match: { ports: ports.origin, domains: 'origin.example.com' },
      action: { type: 'forward', targets: [{ ...at(secure), tls: { mode: 'terminate-and-reencrypt', certificate: { ca: ca.cert } } }] },
    },
  ];
  proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 200 });
  await proxy.start();
});

tap.test('sendProxyProtocol on a target overrides the route\'s on raw TCP relays (v1, v2, none)', async () => {
  const v1 = await rawRequest(ports.raw1);
  expect(v1.proxy).toMatch(new RegExp(`^PROXY TCP4 127\\.0\\.0\\.1 127\\.0\\.0\\.1 \\d+ ${ports.raw1}$`));
  expect((await rawRequest(ports.raw2)).proxy).toEqual('v2');
  expect((await rawRequest(ports.raw3)).proxy).toBeNull();
});

tap.test('sendProxyProtocol on a target sends a PROXY header on its HTTP upstream connections only', async () => {
  const chosen = await request(ports.http, 'app.test', { 'x-pp': '1' });
  expect((chosen.body as { proxy: string }).proxy).toMatch(new RegExp(`^PROXY TCP4 127\\.0\\.0\\.1 127\\.0\\.0\\.1 \\d+ ${ports.http}$`));
  expect(await request(ports.http, 'app.test')).toEqual({ status: 200, body: { proxy: null } });
});

tap.test('target tls on a terminating route: TLS to that target (SNI = the request\'s domain), plain to the other', async () => {
  expect(await request(ports.https, 'app.example.com', { 'x-secure': '1' }, true)).toEqual({ status: 200, body: { name: 'tls', servername: 'app.example.com' } });
  expect(await request(ports.https, 'app.example.com', {}, true)).toEqual({ status: 200, body: { name: 'plain', servername: null } });
});

tap.test("target tls mode 'terminate' on a re-encrypting route: plain to that target; the others still re-encrypt", async () => {
  expect(await request(ports.https, 'reenc.example.com', { 'x-plain': '1' }, true)).toEqual({ status: 200, body: { name: 'plain', servername: null } });
  expect(await request(ports.https, 'reenc.example.com', {}, true)).toEqual({ status: 200, body: { name: 'tls', servername: 'reenc.example.com' } });
});

tap.test('target tls replaces the route\'s whole: verified without a CA → 502; rejectUnauthorized false → 200', async () => {
  expect((await request(ports.https, 'verify.example.com', { 'x-verify': '1' }, true)).status).toEqual(502);
  expect(await request(ports.https, 'verify.example.com', {}, true)).toEqual({ status: 200, body: { name: 'tls', servername: 'verify.example.com' } });
});

tap.test('a re-encrypting target behind a plain HTTP route gets its requests over TLS', async () => {
  expect(await request(ports.origin, 'origin.example.com')).toEqual({ status: 200, body: { name: 'tls', servername: 'origin.example.com' } });
});

tap.test('stop', async () => {
  await proxy.stop();
  for (const server of servers) await server.close();
});

tap.start();
