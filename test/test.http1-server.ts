// The proxy's own HTTP/1.x server loop (src/http/h1): pipelining, heads and bodies split over many
// reads, Expect: 100-continue, HTTP/1.0 (close by default, keep-alive on request, bodies delimited
// by the close), HEAD/204/304 without a body, chunked responses, a backend that answers before it
// read the upload, clients that leave mid-head, mid-body and mid-response, a malformed later head
// on a kept-alive connection, and an upload echoed while it is still being sent. Real sockets only:
// raw node:net / node:tls clients for byte-exact cases, node:http / node:https clients, and one
// node:http backend that records what it received. Most cases run on a plain port and on a
// TLS-terminated port.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, sleep, waitFor } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';

// ---------------------------------------------------------------------------------------------
// The backend: one node:http server that records every request it got
// ---------------------------------------------------------------------------------------------

interface ISeen {
  method: string;
  url: string;
  httpVersion: string;
  headers: http.IncomingHttpHeaders;
  /** The body as received so far (de-chunked by node). */
  body: Buffer;
  /** The body arrived to its end. */
  complete: boolean;
}

const seen: ISeen[] = [];
/** Responses still open (dripping ones), ended at teardown. */
const open = new Set<http.ServerResponse>();
/** Responses of `/wait` requests, held until a test ends them. */
const waiting: Array<() => void> = [];
const STREAM_PARTS = ['part1;', 'part2;', 'part3;', 'part4;', 'part5'];

function handleBackend(req: http.IncomingMessage, res: http.ServerResponse): void {
  const record: ISeen = { method: req.method!, url: req.url!, httpVersion: req.httpVersion, headers: req.headers, body: Buffer.alloc(0), complete: false };
  seen.push(record);
  const chunks: Buffer[] = [];
  req.on('data', (d: Buffer) => chunks.push(d));
  req.on('end', () => {
    record.body = Buffer.concat(chunks);
    record.complete = true;
  });
  req.on('error', () => undefined);
  res.on('error', () => undefined);
  const url = req.url!;
  if (url.startsWith('/echo')) {
    // Echo the body as it arrives; the head goes out at once.
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    res.flushHeaders();
    req.pipe(res);
    return;
  }
  if (url.startsWith('/reject')) {
    // Answers before reading a byte of the body.
    res.writeHead(413, { 'content-type': 'text/plain' });
    res.end('too large');
    return;
  }
  if (url.startsWith('/drip')) {
    // A response that starts at once and then streams slowly until the other side goes.
    open.add(res);
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.write('first\n');
    const timer = setInterval(() => res.write('tick\n'), 50);
    const stop = setTimeout(() => res.end('last\n'), 20_000);
    res.on('close', () => {
      clearInterval(timer);
      clearTimeout(stop);
      open.delete(res);
    });
    return;
  }
  if (url.startsWith('/wait')) {
    // Answered only when a test says so.
    req.on('end', () => waiting.push(() => res.end(`waited:${url}`)));
    return;
  }
  req.on('end', () => {
    if (url.startsWith('/head')) {
      if (req.method === 'HEAD') {
        res.writeHead(200, { 'content-length': '1234', 'x-kind': 'head' });
        res.end();
      } else {
        res.end('h'.repeat(1234));
      }
    } else if (url === '/status/204') {
      res.writeHead(204, { 'x-status': '204' });
      res.end();
    } else if (url === '/status/304') {
      res.writeHead(304, { etag: '"v1"', 'x-status': '304' });
      res.end();
    } else if (url.startsWith('/chunks')) {
      // Three writes, no Content-Length: chunked to the proxy.
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('alpha-');
      setTimeout(() => {
        res.write('beta-');
        setTimeout(() => res.end('gamma'), 20);
      }, 20);
    } else if (url.startsWith('/stream')) {
      // A body of unknown length, written in parts.
      res.writeHead(200, { 'content-type': 'text/plain' });
      let i = 0;
      const next = (): void => {
        if (i === STREAM_PARTS.length - 1) {
          res.end(STREAM_PARTS[i]);
          return;
        }
        res.write(STREAM_PARTS[i++]);
        setTimeout(next, 20);
      };
      next();
    } else if (url.startsWith('/body')) {
      res.end(`got:${record.body.length}`);
    } else {
      res.end(`path:${url}`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// A raw client: bytes in, responses parsed out of the byte stream exactly as sent
// ---------------------------------------------------------------------------------------------

interface IRawResponse {
  version: string;
  status: number;
  /** Lowercased names; every value of repeated fields. */
  headers: Record<string, string[]>;
  head: string;
  body: Buffer;
}

function field(r: IRawResponse, name: string): string | undefined {
  return r.headers[name]?.join(', ');
}

/** A response at the start of `buf`: null while incomplete. `ended`: the peer closed (ends a body without a length). */
function parseResponse(buf: Buffer, method: string, ended: boolean): { response: IRawResponse; consumed: number } | null {
  const headEnd = buf.indexOf('\r\n\r\n');
  if (headEnd < 0) return null;
  const head = buf.subarray(0, headEnd).toString('latin1');
  const [statusLine, ...lines] = head.split('\r\n');
  const m = /^(HTTP\/\d\.\d) (\d{3})(?: .*)?$/.exec(statusLine);
  if (!m) throw new Error(`malformed status line ${JSON.stringify(statusLine)} in ${JSON.stringify(buf.toString('latin1').slice(0, 300))}`);
  const headers: Record<string, string[]> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`malformed header line ${JSON.stringify(line)}`);
    const name = line.slice(0, colon).toLowerCase();
    (headers[name] ??= []).push(line.slice(colon + 1).trim());
  }
  const status = Number(m[2]);
  const response: IRawResponse = { version: m[1], status, headers, head, body: Buffer.alloc(0) };
  let at = headEnd + 4;
  if (method === 'HEAD' || (status >= 100 && status < 200) || status === 204 || status === 304) {
    return { response, consumed: at };
  }
  const te = headers['transfer-encoding']?.join(',').toLowerCase();
  if (te !== undefined && te.includes('chunked')) {
    const parts: Buffer[] = [];
    for (;;) {
      const lineEnd = buf.indexOf('\r\n', at);
      if (lineEnd < 0) return null;
      const sizeText = buf.subarray(at, lineEnd).toString('latin1').split(';')[0].trim();
      if (!/^[0-9a-fA-F]+$/.test(sizeText)) throw new Error(`malformed chunk size ${JSON.stringify(sizeText)}`);
      const size = parseInt(sizeText, 16);
      at = lineEnd + 2;
      if (size === 0) {
        // Trailer section up to its empty line.
        if (buf.length < at + 2) return null;
        if (buf[at] === 0x0d && buf[at + 1] === 0x0a) return { response: { ...response, body: Buffer.concat(parts) }, consumed: at + 2 };
        const trailerEnd = buf.indexOf('\r\n\r\n', at);
        if (trailerEnd < 0) return null;
        return { response: { ...response, body: Buffer.concat(parts) }, consumed: trailerEnd + 4 };
      }
      if (buf.length < at + size + 2) return null;
      parts.push(buf.subarray(at, at + size));
      if (buf[at + size] !== 0x0d || buf[at + size + 1] !== 0x0a) throw new Error('a chunk does not end in CRLF');
      at += size + 2;
    }
  }
  const cl = field(response, 'content-length');
  if (cl !== undefined) {
    const n = Number(cl);
    if (buf.length < at + n) return null;
    return { response: { ...response, body: buf.subarray(at, at + n) }, consumed: at + n };
  }
  // Delimited by the close.
  if (!ended) return null;
  return { response: { ...response, body: buf.subarray(at) }, consumed: buf.length };
}

const rawClients = new Set<RawClient>();

class RawClient {
  /** Bytes received and not yet taken by readResponse. */
  buf = Buffer.alloc(0);
  /** Every byte received. */
  received = Buffer.alloc(0);
  /** The peer closed its side (FIN), or the socket failed or closed. */
  ended = false;
  error: Error | null = null;
  private wakers: Array<() => void> = [];

  constructor(public readonly socket: net.Socket) {
    rawClients.add(this);
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.received = Buffer.concat([this.received, d]);
      this.wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      rawClients.delete(this);
      this.wake();
    });
    socket.on('error', (err) => {
      this.error = err;
      this.wake();
    });
  }

  static async connect(path: IPath): Promise<RawClient> {
    let socket: net.Socket;
    if (path.tls) {
      socket = tls.connect({ port: path.port, host: '127.0.0.1', servername: 'a.test', ca: ca.cert, ALPNProtocols: ['http/1.1'] });
    } else {
      socket = net.connect(path.port, '127.0.0.1');
    }
    socket.setNoDelay(true);
    const client = new RawClient(socket);
    await new Promise<void>((resolve, reject) => {
      socket.once(path.tls ? 'secureConnect' : 'connect', () => resolve());
      socket.once('error', reject);
    });
    return client;
  }

  write(data: string | Buffer): void {
    this.socket.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
  }

  /** Writes `data` one byte per write, yielding to the event loop (and the wire) between them. */
  async writeByByte(data: string): Promise<void> {
    const bytes = Buffer.from(data, 'latin1');
    for (let i = 0; i < bytes.length; i++) {
      this.socket.write(bytes.subarray(i, i + 1));
      await new Promise((r) => setImmediate(r));
      if (i % 8 === 7) await sleep(1);
    }
  }

  private wake(): void {
    const wakers = this.wakers;
    this.wakers = [];
    for (const w of wakers) w();
  }

  private changed(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.max(1, ms));
      this.wakers.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  describe(): string {
    return `received ${JSON.stringify(this.received.toString('latin1').slice(0, 600))}${this.ended ? ' +closed' : ''}`;
  }

  async readResponse(method = 'GET', timeoutMs = 5000): Promise<IRawResponse> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const parsed = parseResponse(this.buf, method, this.ended);
      if (parsed) {
        this.buf = this.buf.subarray(parsed.consumed);
        return parsed.response;
      }
      if (this.ended) throw new Error(`the connection ended before a complete response; ${this.describe()}`);
      if (Date.now() > deadline) throw new Error(`no complete response within ${timeoutMs} ms; ${this.describe()}`);
      await this.changed(deadline - Date.now());
    }
  }

  /** Waits until `text` was received (anywhere), or fails. */
  async waitForText(text: string, timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.received.includes(text)) {
      if (this.ended) throw new Error(`the connection ended before ${JSON.stringify(text)}; ${this.describe()}`);
      if (Date.now() > deadline) throw new Error(`${JSON.stringify(text)} not received within ${timeoutMs} ms; ${this.describe()}`);
      await this.changed(deadline - Date.now());
    }
  }

  /** Whether the peer closed within `timeoutMs`. */
  async closedWithin(timeoutMs = 3000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended && Date.now() < deadline) await this.changed(deadline - Date.now());
    return this.ended;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// node:http / node:https clients
// ---------------------------------------------------------------------------------------------

interface IPath {
  name: string;
  port: number;
  tls: boolean;
}

interface INodeResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

function nodeRequest(path: IPath, options: http.RequestOptions): http.ClientRequest {
  const common = { host: '127.0.0.1', port: path.port, agent: false as const, ...options, headers: { host: 'a.test', ...(options.headers ?? {}) } };
  return path.tls ? https.request({ ...common, servername: 'a.test', ca: ca.cert }) : http.request(common);
}

function collect(res: http.IncomingMessage): Promise<INodeResponse> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    res.on('data', (d: Buffer) => chunks.push(d));
    res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
    res.on('error', reject);
  });
}

async function nodeGet(path: IPath, urlPath: string): Promise<INodeResponse> {
  return new Promise((resolve, reject) => {
    const req = nodeRequest(path, { method: 'GET', path: urlPath });
    req.on('response', (res) => collect(res).then(resolve, reject));
    req.on('error', reject);
    req.end();
  });
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

const ca = createTestCa();
const cert = ca.issue(['a.test']);
const basicAuth = { enabled: true, users: [{ username: 'u', password: 'p' }] };

let proxy: SmartProxy | null = null;
let backend: http.Server | null = null;
/** Plain and TLS-terminated paths to the recording backend. */
const paths: IPath[] = [];
/** The same, behind basicAuth. */
const authPaths: IPath[] = [];

function theProxy(): SmartProxy {
  if (!proxy) throw new Error('the proxy did not start');
  return proxy;
}

async function settled(what: string, timeoutMs = 5000): Promise<void> {
  await waitFor(() => theProxy().getStatistics().activeConnections === 0, timeoutMs,
    `activeConnections to return to 0 after ${what} (now ${theProxy().getStatistics().activeConnections})`);
  // Every read buffer lent to a connection with work is back (idle pooled upstream connections
  // and idle clients hold none), however the connections ended.
  await waitFor(() => theProxy().getStatistics().readBuffersLent === 0, timeoutMs,
    `readBuffersLent to return to 0 after ${what} (now ${theProxy().getStatistics().readBuffersLent})`);
}

/**
 * Runs a test's body, then destroys what it left open and waits for the proxy to count no
 * connection. After a failed body a failed wait is only logged, so it does not hide the failure.
 */
async function thenCleanup(what: string, body: () => Promise<void>): Promise<void> {
  let failed = false;
  try {
    await body();
  } catch (err) {
    failed = true;
    throw err;
  } finally {
    await cleanup(what, failed);
  }
}

async function cleanup(what: string, afterFailure: boolean): Promise<void> {
  for (const c of [...rawClients]) c.destroy();
  for (const answer of waiting.splice(0)) answer();
  try {
    await settled(what);
  } catch (err) {
    if (!afterFailure) throw err;
    console.log(`(after the failure above) ${(err as Error).message}`);
  }
}

const requestsTo = (prefix: string): ISeen[] => seen.filter((s) => s.url.startsWith(prefix));

tap.test('setup: a recording backend and a proxy with a plain port, a TLS-terminated port and both again behind basicAuth', async () => {
  backend = http.createServer(handleBackend);
  await new Promise<void>((resolve) => backend!.listen(0, '127.0.0.1', resolve));
  const backendPort = (backend.address() as AddressInfo).port;
  const [plainPort, tlsPort, authPort, tlsAuthPort] = await freePorts(4);
  const targets = [{ host: '127.0.0.1', port: backendPort }];
  const terminate = { mode: 'terminate' as const, certificate: cert };
  const routes: IRouteConfig[] = [
    // A domain makes the plain port an HTTP route (a plain route without one is a raw TCP relay).
    { name: 'plain', match: { ports: plainPort, domains: ['a.test'] }, action: { type: 'forward', targets } },
    { name: 'tls', match: { ports: tlsPort, domains: ['a.test'] }, action: { type: 'forward', targets, tls: terminate } },
    { name: 'auth', match: { ports: authPort }, action: { type: 'forward', targets }, security: { basicAuth } },
    { name: 'tls-auth', match: { ports: tlsAuthPort, domains: ['a.test'] }, action: { type: 'forward', targets, tls: terminate }, security: { basicAuth } },
  ];
  proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 300, connectionRateLimitPerMinute: 0, maxConnectionsPerIP: 0 });
  await proxy.start();
  paths.push({ name: 'plain', port: plainPort, tls: false }, { name: 'tls', port: tlsPort, tls: true });
  authPaths.push({ name: 'plain', port: authPort, tls: false }, { name: 'tls', port: tlsAuthPort, tls: true });
  // Both paths answer.
  for (const p of paths) {
    const r = await nodeGet(p, '/p/hello');
    expect(r.status).toEqual(200);
    expect(r.body.toString()).toEqual('path:/p/hello');
  }
  await settled('setup');
});

tap.test('requests waiting for their response hold no read buffer, client side or upstream, plain and TLS', async () => {
  // A read buffer is lent to a connection only while it has bytes at hand: these connections
  // wait for the backend, so the pool lends none until the responses come.
  const perPath = 8;
  const answers: Array<Promise<INodeResponse>> = [];
  for (const p of paths) {
    for (let i = 0; i < perPath; i++) answers.push(nodeGet(p, `/wait/${p.name}-${i}`));
  }
  await thenCleanup('requests waiting upstream', async () => {
    await waitFor(() => waiting.length === answers.length, 5000, `${answers.length} requests to reach the backend (now ${waiting.length})`);
    await sleep(50);
    expect(theProxy().getStatistics().readBuffersLent).toEqual(0);
    for (const answer of waiting.splice(0)) answer();
    const responses = await Promise.all(answers);
    const bodies = responses.map((r) => `${r.status} ${r.body.toString()}`).sort();
    const expected = paths.flatMap((p) => Array.from({ length: perPath }, (_, i) => `200 waited:/wait/${p.name}-${i}`)).sort();
    expect(bodies).toEqual(expected);
  });
});

// ---------------------------------------------------------------------------------------------
// 1. Pipelining
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: three GETs in one write are answered in order and the connection stays open`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('pipelining', async () => {
      const tag = `pipe-${name}`;
      client.write(
        `GET /p/${tag}-1 HTTP/1.1\r\nHost: a.test\r\n\r\n` +
        `GET /p/${tag}-2 HTTP/1.1\r\nHost: a.test\r\n\r\n` +
        `GET /p/${tag}-3 HTTP/1.1\r\nHost: a.test\r\n\r\n`,
      );
      for (let i = 1; i <= 3; i++) {
        const r = await client.readResponse();
        expect(r.status).toEqual(200);
        expect(r.body.toString()).toEqual(`path:/p/${tag}-${i}`);
        expect(field(r, 'connection')).toBeUndefined();
      }
      expect(seen.map((s) => s.url)).toEqual([`/p/${tag}-1`, `/p/${tag}-2`, `/p/${tag}-3`]);
      // Nothing more came, and the connection is still open: a fourth request is answered.
      await sleep(200);
      expect(client.buf.length).toEqual(0);
      expect(client.ended).toBeFalse();
      client.write(`GET /p/${tag}-4 HTTP/1.1\r\nHost: a.test\r\n\r\n`);
      const fourth = await client.readResponse();
      expect(fourth.status).toEqual(200);
      expect(fourth.body.toString()).toEqual(`path:/p/${tag}-4`);
      expect(client.ended).toBeFalse();
    });
  });
}

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a connection's first write holding a POST with its whole body and a GET after it: both reach the backend exactly, in order`, async () => {
    // The session reads the first head to route the connection and hands it to the HTTP engine,
    // which must then read the body and the next request from the bytes after that head.
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('first write', async () => {
      const body = 'first-body\r\n\r\nGET /not-a-request HTTP/1.1\r\n\r\n';
      client.write(
        `POST /body/first-${name} HTTP/1.1\r\nHost: a.test\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
        `GET /p/first-${name}-2 HTTP/1.1\r\nHost: a.test\r\n\r\n`,
      );
      const first = await client.readResponse();
      expect(first.status).toEqual(200);
      expect(first.body.toString()).toEqual(`got:${body.length}`);
      const second = await client.readResponse();
      expect(second.status).toEqual(200);
      expect(second.body.toString()).toEqual(`path:/p/first-${name}-2`);
      expect(seen.map((s) => `${s.method} ${s.url} ${s.body.toString()}`)).toEqual([`POST /body/first-${name} ${body}`, `GET /p/first-${name}-2 `]);
      expect(client.ended).toBeFalse();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 2. Split reads
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a Content-Length POST and a chunked POST (extension, trailer) sent one byte per write reach the backend exactly`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('split reads', async () => {
      const body = 'hello, split world: 0123456789';
      await client.writeByByte(`POST /body/cl HTTP/1.1\r\nHost: a.test\r\nContent-Type: text/plain\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
      const first = await client.readResponse();
      expect(first.status).toEqual(200);
      expect(first.body.toString()).toEqual(`got:${body.length}`);
      await client.writeByByte(
        'POST /body/chunked HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n' +
        '5;ext=val\r\nhello\r\n' +
        '7;a="q s"\r\n, world\r\n' +
        '0\r\nX-Trailer: t\r\n\r\n',
      );
      const second = await client.readResponse();
      expect(second.status).toEqual(200);
      expect(second.body.toString()).toEqual('got:12');
      expect(seen.map((s) => `${s.method} ${s.url} ${s.complete} ${s.body.toString()}`)).toEqual([
        `POST /body/cl true ${body}`,
        'POST /body/chunked true hello, world',
      ]);
      expect(client.ended).toBeFalse();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 3. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: Expect: 100-continue gets 100 Continue, then the body reaches the backend whole`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('100-continue', async () => {
      const body = randomBytes(100_000);
      let continued = false;
      const response = await new Promise<INodeResponse>((resolve, reject) => {
        const req = nodeRequest(path, {
          method: 'POST',
          path: '/body/continue',
          headers: { expect: '100-continue', 'content-length': String(body.length), 'content-type': 'application/octet-stream' },
        });
        req.on('continue', () => {
          continued = true;
          req.end(body);
        });
        req.on('response', (res) => collect(res).then(resolve, reject));
        req.on('error', reject);
        req.flushHeaders();
      });
      expect(continued).toBeTrue();
      expect(response.status).toEqual(200);
      expect(response.body.toString()).toEqual(`got:${body.length}`);
      const got = requestsTo('/body/continue');
      expect(got.length).toEqual(1);
      expect(got[0].complete).toBeTrue();
      expect(sha256(got[0].body)).toEqual(sha256(body));
    });
  });

  tap.test(`${name}: Expect: 100-continue refused before the body (basicAuth, no credentials) gets 401 without 100 Continue, then a close`, async () => {
    const path = authPaths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('a refused 100-continue', async () => {
      client.write('POST /body/refused HTTP/1.1\r\nHost: a.test\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n');
      const r = await client.readResponse();
      expect(r.status).toEqual(401);
      expect(client.received.toString('latin1').startsWith('HTTP/1.1 401 ')).toBeTrue();
      expect(client.received.toString('latin1')).not.toInclude('100 Continue');
      expect(field(r, 'www-authenticate')).toBeTruthy();
      expect(field(r, 'connection')).toEqual('close');
      expect(await client.closedWithin(3000)).toBeTrue();
      expect(client.buf.length).toEqual(0);
      expect(seen.length).toEqual(0);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP/1.0
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: HTTP/1.0 without keep-alive is answered and closed`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('HTTP/1.0', async () => {
      client.write('GET /p/ten HTTP/1.0\r\nHost: a.test\r\n\r\n');
      const r = await client.readResponse();
      expect(r.status).toEqual(200);
      expect(r.body.toString()).toEqual('path:/p/ten');
      expect(field(r, 'connection')).toEqual('close');
      expect(field(r, 'transfer-encoding')).toBeUndefined();
      expect(await client.closedWithin(3000)).toBeTrue();
      expect(client.buf.length).toEqual(0);
      expect(seen.map((s) => s.url)).toEqual(['/p/ten']);
    });
  });

  tap.test(`${name}: HTTP/1.0 with Connection: keep-alive gets keep-alive and a second request is answered`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('HTTP/1.0 keep-alive', async () => {
      client.write('GET /p/ka-1 HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n');
      const first = await client.readResponse();
      expect(first.status).toEqual(200);
      expect(first.body.toString()).toEqual('path:/p/ka-1');
      expect(field(first, 'connection')).toEqual('keep-alive');
      expect(field(first, 'content-length')).toEqual(String('path:/p/ka-1'.length));
      expect(field(first, 'transfer-encoding')).toBeUndefined();
      await sleep(100);
      expect(client.ended).toBeFalse();
      client.write('GET /p/ka-2 HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n');
      const second = await client.readResponse();
      expect(second.status).toEqual(200);
      expect(second.body.toString()).toEqual('path:/p/ka-2');
      expect(field(second, 'connection')).toEqual('keep-alive');
      // A third without keep-alive is the last.
      client.write('GET /p/ka-3 HTTP/1.0\r\nHost: a.test\r\n\r\n');
      const third = await client.readResponse();
      expect(third.body.toString()).toEqual('path:/p/ka-3');
      expect(field(third, 'connection')).toEqual('close');
      expect(await client.closedWithin(3000)).toBeTrue();
      expect(seen.map((s) => s.url)).toEqual(['/p/ka-1', '/p/ka-2', '/p/ka-3']);
    });
  });

  tap.test(`${name}: a body of unknown length reaches an HTTP/1.0 client whole and the close ends it (also when it asked for keep-alive)`, async () => {
    const path = paths.find((p) => p.name === name)!;
    for (const keepAlive of [false, true]) {
      const client = await RawClient.connect(path);
      await thenCleanup('HTTP/1.0 streamed body', async () => {
        client.write(`GET /stream/${keepAlive ? 'ka' : 'plain'} HTTP/1.0\r\nHost: a.test\r\n${keepAlive ? 'Connection: keep-alive\r\n' : ''}\r\n`);
        const r = await client.readResponse();
        expect(r.status).toEqual(200);
        // No chunked coding towards HTTP/1.0: the close delimits the body.
        expect(field(r, 'transfer-encoding')).toBeUndefined();
        expect(field(r, 'connection')).toEqual('close');
        expect(r.body.toString()).toEqual(STREAM_PARTS.join(''));
        expect(client.ended).toBeTrue();
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// 5. HEAD, 204, 304
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: HEAD keeps Content-Length 1234 without a body; 204 and 304 carry no body; keep-alive stays intact`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    const client = await RawClient.connect(path);
    await thenCleanup('HEAD/204/304', async () => {
      client.write('HEAD /head HTTP/1.1\r\nHost: a.test\r\n\r\n');
      const head = await client.readResponse('HEAD');
      expect(head.status).toEqual(200);
      expect(field(head, 'content-length')).toEqual('1234');
      expect(field(head, 'x-kind')).toEqual('head');
      expect(field(head, 'transfer-encoding')).toBeUndefined();
      await sleep(200);
      expect(client.buf.length).toEqual(0);

      client.write('GET /p/after-head HTTP/1.1\r\nHost: a.test\r\n\r\n');
      const after = await client.readResponse();
      expect(after.status).toEqual(200);
      expect(after.body.toString()).toEqual('path:/p/after-head');

      client.write('GET /status/204 HTTP/1.1\r\nHost: a.test\r\n\r\n');
      const noContent = await client.readResponse();
      expect(noContent.status).toEqual(204);
      expect(field(noContent, 'x-status')).toEqual('204');
      expect(field(noContent, 'transfer-encoding')).toBeUndefined();
      await sleep(200);
      expect(client.buf.length).toEqual(0);

      client.write('GET /status/304 HTTP/1.1\r\nHost: a.test\r\nIf-None-Match: "v1"\r\n\r\n');
      const notModified = await client.readResponse();
      expect(notModified.status).toEqual(304);
      expect(field(notModified, 'etag')).toEqual('"v1"');
      expect(field(notModified, 'transfer-encoding')).toBeUndefined();
      await sleep(200);
      expect(client.buf.length).toEqual(0);

      // HEAD, 204 and 304 pipelined in one write, then a GET: all four parse in order.
      client.write(
        'HEAD /head HTTP/1.1\r\nHost: a.test\r\n\r\n' +
        'GET /status/204 HTTP/1.1\r\nHost: a.test\r\n\r\n' +
        'GET /status/304 HTTP/1.1\r\nHost: a.test\r\n\r\n' +
        'GET /p/last HTTP/1.1\r\nHost: a.test\r\n\r\n',
      );
      expect((await client.readResponse('HEAD')).status).toEqual(200);
      expect((await client.readResponse()).status).toEqual(204);
      expect((await client.readResponse()).status).toEqual(304);
      const last = await client.readResponse();
      expect(last.status).toEqual(200);
      expect(last.body.toString()).toEqual('path:/p/last');
      await sleep(100);
      expect(client.buf.length).toEqual(0);
      expect(client.ended).toBeFalse();
      expect(seen.map((s) => `${s.method} ${s.url}`)).toEqual([
        'HEAD /head', 'GET /p/after-head', 'GET /status/204', 'GET /status/304',
        'HEAD /head', 'GET /status/204', 'GET /status/304', 'GET /p/last',
      ]);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 6. Chunked responses
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a response written in three parts without a length reaches an HTTP/1.1 client chunked and exact`, async () => {
    const path = paths.find((p) => p.name === name)!;
    const client = await RawClient.connect(path);
    await thenCleanup('chunked response', async () => {
      client.write('GET /chunks HTTP/1.1\r\nHost: a.test\r\n\r\n');
      const r = await client.readResponse();
      expect(r.status).toEqual(200);
      expect(field(r, 'transfer-encoding')).toEqual('chunked');
      expect(field(r, 'content-length')).toBeUndefined();
      expect(r.body.toString()).toEqual('alpha-beta-gamma');
      // Keep-alive after the last chunk.
      client.write('GET /p/after-chunks HTTP/1.1\r\nHost: a.test\r\n\r\n');
      const next = await client.readResponse();
      expect(next.body.toString()).toEqual('path:/p/after-chunks');
      expect(client.ended).toBeFalse();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 7. Early response
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a backend answering 413 before reading a 5 MiB upload: the client reads the 413, then the connection goes`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('early response', async () => {
      const body = randomBytes(5 * 1024 * 1024);
      let requestError: Error | null = null;
      let responseReceived = false;
      const response = await new Promise<INodeResponse>((resolve, reject) => {
        const req = nodeRequest(path, {
          method: 'POST',
          path: '/reject',
          headers: { 'content-length': String(body.length), 'content-type': 'application/octet-stream' },
        });
        req.on('response', (res) => {
          responseReceived = true;
          collect(res).then(resolve, reject);
        });
        req.on('error', (err) => {
          // An EPIPE/ECONNRESET on the upload side is fine once the response is in.
          requestError = err;
          if (!responseReceived) reject(new Error(`the request failed before a response: ${err.message}`));
        });
        req.end(body);
      });
      expect(response.status).toEqual(413);
      expect(response.body.toString()).toEqual('too large');
      if (requestError !== null) {
        console.log(`upload side ended with ${(requestError as NodeJS.ErrnoException).code} after the response (tolerated)`);
        expect(['EPIPE', 'ECONNRESET']).toContain((requestError as NodeJS.ErrnoException).code);
      }
      expect(requestsTo('/reject').length).toEqual(1);
      await settled('an early 413');
    });
  });
}

/** A raw client that keeps its side open after the proxy's FIN, as an uploading client does. */
async function halfOpenClient(path: IPath): Promise<net.Socket> {
  const socket = path.tls
    ? tls.connect({ port: path.port, host: '127.0.0.1', servername: 'a.test', ca: ca.cert, ALPNProtocols: ['http/1.1'], allowHalfOpen: true } as tls.ConnectionOptions)
    : net.connect({ port: path.port, host: '127.0.0.1', allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    socket.once(path.tls ? 'secureConnect' : 'connect', () => resolve());
    socket.once('error', reject);
  });
  return socket;
}

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a refused 2 MiB upload still being sent after the 413 is read whole (no reset while the client sends), and the close follows the client's`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('a refused upload sent whole', async () => {
      const socket = await halfOpenClient(path);
      let received = Buffer.alloc(0);
      let failure: Error | null = null;
      socket.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
      socket.on('error', (err) => (failure = err));
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      const total = 2 * 1024 * 1024;
      const piece = randomBytes(64 * 1024);
      socket.write(`POST /reject HTTP/1.1\r\nHost: a.test\r\nContent-Length: ${total}\r\n\r\n`);
      for (let sent = 0; sent < total; sent += piece.length) {
        await new Promise<void>((resolve) => socket.write(piece, () => resolve()));
        await sleep(2);
        if (failure !== null) break;
      }
      // Every byte went out while the proxy lingered: no write failed and the 413 is here.
      expect(failure).toBeNull();
      expect(received.toString('latin1')).toMatch(/^HTTP\/1\.1 413 /);
      expect(received.toString('latin1')).toInclude('too large');
      socket.end();
      await closed;
      expect(failure).toBeNull();
      expect(requestsTo('/reject').length).toEqual(1);
      await settled('a refused upload sent whole');
    });
  });

  tap.test(`${name}: a client that keeps sending after a 413 is closed once the linger time is over`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('a client that keeps sending', async () => {
      const socket = await halfOpenClient(path);
      let received = Buffer.alloc(0);
      socket.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
      socket.on('error', () => undefined);
      let closed = false;
      socket.once('close', () => (closed = true));
      socket.write(`POST /reject HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000000\r\n\r\n`);
      // Slower than the linger's byte budget lasts: the time bound is what ends it.
      const piece = randomBytes(16 * 1024);
      const deadline = Date.now() + 15_000;
      while (!closed && Date.now() < deadline) {
        if (!socket.destroyed) socket.write(piece);
        await sleep(5);
      }
      expect(closed).toBeTrue();
      expect(received.toString('latin1')).toMatch(/^HTTP\/1\.1 413 /);
      await settled('a client that kept sending');
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 8. Clients that leave
// ---------------------------------------------------------------------------------------------

type LeaveKind = 'mid-body' | 'mid-head' | 'mid-second-head' | 'mid-response' | 'mid-chunked-body';

/** One client that leaves at the given point; resolves once it is gone. */
async function leaver(path: IPath, kind: LeaveKind, tag: string): Promise<void> {
  const client = await RawClient.connect(path);
  if (kind === 'mid-body') {
    client.write(`POST /body/${tag} HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n0123456789`);
    await sleep(20);
  } else if (kind === 'mid-chunked-body') {
    client.write(`POST /body/${tag} HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n01234`);
    await sleep(20);
  } else if (kind === 'mid-head') {
    client.write(`GET /p/${tag} HTTP/1.1\r\nHost: a.te`);
    await sleep(20);
  } else if (kind === 'mid-second-head') {
    // The first head is read while routing; a later one only by the HTTP/1 loop.
    client.write(`GET /p/${tag}-first HTTP/1.1\r\nHost: a.test\r\n\r\n`);
    await client.readResponse();
    client.write(`GET /p/${tag} HTTP/1.1\r\nHost: a.te`);
    await sleep(20);
  } else {
    client.write(`GET /drip/${tag} HTTP/1.1\r\nHost: a.test\r\n\r\n`);
    await client.waitForText('first\n', 5000);
    if (client.ended) throw new Error(`the dripping response ended early; ${client.describe()}`);
  }
  client.destroy();
}

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: clients that leave mid-body, mid-head and mid-response leave no connection behind; the next request works`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('clients that left', async () => {
      await settled('earlier tests');
      await leaver(path, 'mid-body', 'left-1');
      await leaver(path, 'mid-head', 'left-2');
      await leaver(path, 'mid-response', 'left-3');
      await leaver(path, 'mid-chunked-body', 'left-4');
      await leaver(path, 'mid-second-head', 'left-5');
      await settled('five clients that left', 5000);
      // The backend never got the half-sent heads; what it got of the bodies was not completed.
      expect(requestsTo('/p/left-2').length).toEqual(0);
      expect(seen.filter((s) => s.url === '/p/left-5').length).toEqual(0);
      expect(requestsTo('/p/left-5-first').length).toEqual(1);
      for (const s of [...requestsTo('/body/left-1'), ...requestsTo('/body/left-4')]) expect(s.complete).toBeFalse();
      // The dripping response's upstream exchange ends with its client.
      await waitFor(() => open.size === 0, 5000, 'the dripping upstream response to be closed');
      const r = await nodeGet(path, '/p/after-leavers');
      expect(r.status).toEqual(200);
      expect(r.body.toString()).toEqual('path:/p/after-leavers');
      await settled('a normal request');
    });
  });
}

tap.test('storm: 200 clients on both paths leave mid-head, mid-body and mid-response; nothing is left behind', async () => {
  seen.length = 0;
  await thenCleanup('the storm', async () => {
    const kinds: LeaveKind[] = ['mid-body', 'mid-head', 'mid-second-head', 'mid-response', 'mid-chunked-body'];
    const jobs: Array<Promise<void>> = [];
    for (let i = 0; i < 200; i++) {
      jobs.push(leaver(paths[i % 2], kinds[Math.floor(i / 2) % kinds.length], `storm-${i}`));
    }
    const results = await Promise.allSettled(jobs);
    const failures = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failures.length > 0) throw new Error(`${failures.length} storm clients failed, first: ${failures[0].reason}`);
    await settled('the storm', 10_000);
    await waitFor(() => open.size === 0, 5000, 'every dripping upstream response to be closed');
    for (const p of paths) {
      const r = await nodeGet(p, `/p/after-storm-${p.name}`);
      expect(r.status).toEqual(200);
      expect(r.body.toString()).toEqual(`path:/p/after-storm-${p.name}`);
    }
    await settled('requests after the storm');
  });
});

// ---------------------------------------------------------------------------------------------
// 9. A malformed later head
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  for (const pipelined of [false, true]) {
    tap.test(`${name}: a valid GET then a head with two Hosts${pipelined ? ' (in one write)' : ''}: 200, then 400 and a close; the backend saw one request`, async () => {
      const path = paths.find((p) => p.name === name)!;
      seen.length = 0;
      const client = await RawClient.connect(path);
      await thenCleanup('a malformed later head', async () => {
        const good = 'GET /p/good HTTP/1.1\r\nHost: a.test\r\n\r\n';
        const bad = 'GET /p/bad HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n';
        if (pipelined) client.write(good + bad);
        else client.write(good);
        const first = await client.readResponse();
        expect(first.status).toEqual(200);
        expect(first.body.toString()).toEqual('path:/p/good');
        expect(field(first, 'connection')).toBeUndefined();
        if (!pipelined) client.write(bad);
        const second = await client.readResponse();
        expect(second.status).toEqual(400);
        expect(field(second, 'connection')).toEqual('close');
        expect(await client.closedWithin(3000)).toBeTrue();
        expect(client.buf.length).toEqual(0);
        await sleep(100);
        expect(seen.map((s) => s.url)).toEqual(['/p/good']);
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// 10. Upload streaming both ways
// ---------------------------------------------------------------------------------------------

for (const name of ['plain', 'tls']) {
  tap.test(`${name}: a 4 MiB upload echoed as it arrives: the echo flows while the upload is still going, byte-exact`, async () => {
    const path = paths.find((p) => p.name === name)!;
    seen.length = 0;
    await thenCleanup('echoed upload', async () => {
      const body = randomBytes(4 * 1024 * 1024);
      const piece = 64 * 1024;
      const received: Buffer[] = [];
      let receivedBytes = 0;
      let status = 0;
      let ended = false;
      let failure: Error | null = null;
      const req = nodeRequest(path, {
        method: 'POST',
        path: '/echo',
        headers: { 'content-length': String(body.length), 'content-type': 'application/octet-stream' },
      });
      req.on('error', (err) => (failure = err));
      req.on('response', (res) => {
        status = res.statusCode!;
        res.on('data', (d: Buffer) => {
          received.push(d);
          receivedBytes += d.length;
        });
        res.on('end', () => (ended = true));
        res.on('error', (err) => (failure = err));
      });
      req.flushHeaders();
      // Lockstep: each piece goes only once everything before it came back. A proxy that held the
      // response until the upload ended (or the upload until the response ended) stalls here.
      for (let sent = 0; sent < body.length; sent += piece) {
        req.write(body.subarray(sent, sent + piece));
        if (sent + piece < body.length) {
          await waitFor(() => receivedBytes >= sent + piece || failure !== null, 5000,
            `the echo of the first ${sent + piece} bytes while the upload is still going (got ${receivedBytes})`);
          if (failure) throw failure;
        }
      }
      req.end();
      await waitFor(() => ended || failure !== null, 10_000, 'the end of the echo');
      if (failure) throw failure;
      expect(status).toEqual(200);
      const echoed = Buffer.concat(received);
      expect(echoed.length).toEqual(body.length);
      expect(sha256(echoed)).toEqual(sha256(body));
      const got = requestsTo('/echo');
      expect(got.length).toEqual(1);
      expect(got[0].complete).toBeTrue();
      expect(sha256(got[0].body)).toEqual(sha256(body));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Teardown
// ---------------------------------------------------------------------------------------------

tap.test('teardown', async () => {
  for (const c of [...rawClients]) c.destroy();
  for (const res of open) res.destroy();
  if (proxy) await proxy.stop();
  if (backend) {
    backend.closeAllConnections();
    await new Promise<void>((resolve) => backend!.close(() => resolve()));
  }
});

tap.start({ throwOnError: true });
