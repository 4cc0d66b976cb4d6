// Request smuggling and edge hygiene, data-driven: the same bytes get the same answer on every path.
// The cases live in test/corpus/http1.txt (raw HTTP/1.x bytes) and test/corpus/http2.txt (HTTP/2
// header lists, sent as raw frames with a tiny HPACK encoder, because node:http2 refuses to send
// most of them). Each HTTP/1 case is written on a fresh connection to three paths: a plain port whose
// route has `domains: ['a.test']`, a plain port whose route has no domains, and a TLS-terminated port;
// each HTTP/2 case goes as h2c prior knowledge to both plain ports and as ALPN h2 to the TLS port.
// Every route has basicAuth, so a request that bypassed the HTTP engine would be visible (a 200
// without a 401 challenge, no X-Forwarded-For at the backend). Each path has its own recording
// backend (test/helpers/recording-backend.ts: a raw socket server with its own parser), and the
// assertions are on what it received. The paths run concurrently, the cases of one path one after
// the other; every (path, case) is one TAP test named "<path>: <case>", and a table of the failures
// is printed at the end.
import { tap } from '@push.rocks/tapbundle';
import * as net from 'node:net';
import * as tls from 'node:tls';
import * as http2 from 'node:http2';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, sleep } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';
import { startRecordingBackend, type IRecordingBackend, type IRecordedRequest } from './helpers/recording-backend.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** A case waits at most this long for an answer (or for the close after a 400). */
const CASE_TIMEOUT_MS = 2000;
/** After a complete response, the client waits this long for more bytes before it is done. */
const QUIET_MS = 250;
/** After the client is done, the backend gets this long to receive anything late (a smuggled request). */
const SETTLE_MS = 150;
/** Answers after which the proxy must close the connection. */
const CLOSING_STATUSES = new Set([400, 431, 505]);

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

interface IBackendExpectation {
  /** 'none' | 'incomplete' | exact count | at most. */
  count: { kind: 'none' } | { kind: 'incomplete' } | { kind: 'exactly'; n: number } | { kind: 'atMost'; n: number };
  xff: boolean;
  noauth: boolean;
  host?: string;
  method?: string;
  target?: string;
  xffNot?: string;
  text: string;
}

interface IH1Case {
  name: string;
  line: number;
  request: Buffer;
  statuses: string[];
  backend: IBackendExpectation;
}

interface IH2Case {
  name: string;
  line: number;
  headers: Array<[string, string]>;
  body: Buffer | null;
  statuses: string[];
  backend: IBackendExpectation;
}

/** `\r \n \t \0 \\ \xNN` after expanding `{TEXT*N}`; the result as bytes (latin1). */
function decodeBytes(field: string): Buffer {
  const expanded = field.replace(/\{([^{}]*)\*(\d+)\}/g, (_, text: string, n: string) => text.repeat(Number(n)));
  let out = '';
  for (let i = 0; i < expanded.length; i++) {
    const c = expanded[i];
    if (c !== '\\') {
      out += c;
      continue;
    }
    const e = expanded[++i];
    if (e === 'r') out += '\r';
    else if (e === 'n') out += '\n';
    else if (e === 't') out += '\t';
    else if (e === '0') out += '\0';
    else if (e === '\\') out += '\\';
    else if (e === 'x') {
      const hex = expanded.slice(i + 1, i + 3);
      if (!/^[0-9a-fA-F]{2}$/.test(hex)) throw new Error(`bad \\x escape in ${JSON.stringify(field)}`);
      out += String.fromCharCode(parseInt(hex, 16));
      i += 2;
    } else throw new Error(`unknown escape \\${e} in ${JSON.stringify(field)}`);
  }
  return Buffer.from(out, 'latin1');
}

function parseBackendExpectation(text: string, where: string): IBackendExpectation {
  const tokens = text.trim().split(/\s+/);
  const first = tokens.shift() ?? '';
  let count: IBackendExpectation['count'];
  if (first === 'none') count = { kind: 'none' };
  else if (first === 'incomplete') count = { kind: 'incomplete' };
  else if (/^\d+$/.test(first)) count = { kind: 'exactly', n: Number(first) };
  else if (/^<=\d+$/.test(first)) count = { kind: 'atMost', n: Number(first.slice(2)) };
  else throw new Error(`${where}: backend outcome must start with none, incomplete, N or <=N (got ${JSON.stringify(first)})`);
  const result: IBackendExpectation = { count, xff: false, noauth: false, text: text.trim() };
  for (const token of tokens) {
    const eq = token.indexOf('=');
    const key = eq < 0 ? token : token.slice(0, eq);
    const value = eq < 0 ? '' : token.slice(eq + 1);
    if (key === 'xff') result.xff = true;
    else if (key === 'noauth') result.noauth = true;
    else if (key === 'host') result.host = value;
    else if (key === 'method') result.method = value;
    else if (key === 'target') result.target = value;
    else if (key === 'xff-not') result.xffNot = value;
    else throw new Error(`${where}: unknown backend assertion ${JSON.stringify(token)}`);
  }
  return result;
}

/** The lines of a corpus file that are cases, split on " | " into exactly `fields` fields. */
function corpusLines(file: string, fields: number): Array<{ line: number; parts: string[] }> {
  const result: Array<{ line: number; parts: string[] }> = [];
  readFileSync(file, 'utf8').split('\n').forEach((raw, i) => {
    const text = raw.replace(/\r$/, '');
    if (text.trim() === '' || text.trimStart().startsWith('#')) return;
    const parts = text.split(' | ');
    if (parts.length !== fields) throw new Error(`${path.basename(file)}:${i + 1}: expected ${fields} fields separated by " | ", got ${parts.length}`);
    result.push({ line: i + 1, parts: parts.map((p) => p.trim()) });
  });
  return result;
}

function loadH1Corpus(): IH1Case[] {
  const file = path.join(here, 'corpus', 'http1.txt');
  return corpusLines(file, 4).map(({ line, parts: [name, request, status, backend] }) => ({
    name,
    line,
    request: decodeBytes(request),
    statuses: status.split('|'),
    backend: parseBackendExpectation(backend, `http1.txt:${line}`),
  }));
}

function loadH2Corpus(): IH2Case[] {
  const file = path.join(here, 'corpus', 'http2.txt');
  return corpusLines(file, 5).map(({ line, parts: [name, headers, body, status, backend] }) => {
    const list = JSON.parse(headers) as Array<[string, string]>;
    if (!Array.isArray(list) || !list.every((h) => Array.isArray(h) && h.length === 2)) throw new Error(`http2.txt:${line}: headers must be [[name, value], ...]`);
    return {
      name,
      line,
      headers: list,
      body: body === '-' ? null : decodeBytes(body),
      statuses: status.split('|'),
      backend: parseBackendExpectation(backend, `http2.txt:${line}`),
    };
  });
}

const h1Cases = loadH1Corpus();
const h2Cases = loadH2Corpus();

// ---------------------------------------------------------------------------------------------
// HTTP/1 client: raw bytes out, responses parsed back
// ---------------------------------------------------------------------------------------------

interface IClientResult {
  /** First final response's status, or 'close' (closed without a response) / 'timeout' / 'garbage' / 'reset' / 'goaway'. */
  outcome: string;
  /** All statuses seen (HTTP/1: every complete response; HTTP/2: the one). */
  statuses: number[];
  /** The proxy closed the connection within the case's time. */
  closed: boolean;
  /** A short excerpt of what came back, for failure messages. */
  excerpt: string;
}

/** Parses as many complete HTTP/1.x responses as `buf` holds. */
function parseResponses(buf: Buffer, closed: boolean): { statuses: number[]; complete: number; garbage: boolean } {
  const statuses: number[] = [];
  let complete = 0;
  let rest = buf;
  while (rest.length > 0) {
    const end = rest.indexOf('\r\n\r\n');
    if (end < 0) {
      if (!/^HTTP\/1\.[01] /.test(rest.subarray(0, 9).toString('latin1')) && rest.length >= 9) return { statuses, complete, garbage: true };
      break;
    }
    const lines = rest.subarray(0, end).toString('latin1').split('\r\n');
    const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
    if (!m) return { statuses, complete, garbage: true };
    const status = Number(m[1]);
    const headers = new Map<string, string>();
    for (const l of lines.slice(1)) {
      const c = l.indexOf(':');
      if (c > 0) headers.set(l.slice(0, c).trim().toLowerCase(), l.slice(c + 1).trim());
    }
    rest = rest.subarray(end + 4);
    if (status >= 100 && status < 200) continue; // interim
    statuses.push(status);
    if (status === 204 || status === 304) {
      complete++;
      continue;
    }
    if ((headers.get('transfer-encoding') ?? '').toLowerCase().includes('chunked')) {
      let ok = false;
      while (true) {
        const nl = rest.indexOf('\r\n');
        if (nl < 0) break;
        const size = parseInt(rest.subarray(0, nl).toString('latin1'), 16);
        if (!Number.isFinite(size)) return { statuses, complete, garbage: true };
        if (size === 0) {
          const trailerEnd = rest.indexOf('\r\n\r\n', nl - 2 < 0 ? 0 : nl - 2);
          if (trailerEnd < 0) break;
          rest = rest.subarray(trailerEnd + 4);
          ok = true;
          break;
        }
        if (rest.length < nl + 2 + size + 2) break;
        rest = rest.subarray(nl + 2 + size + 2);
      }
      if (!ok) break;
      complete++;
    } else if (headers.has('content-length')) {
      const n = Number(headers.get('content-length'));
      if (rest.length < n) break;
      rest = rest.subarray(n);
      complete++;
    } else {
      // Delimited by the close.
      if (closed) complete++;
      rest = Buffer.alloc(0);
    }
  }
  return { statuses, complete, garbage: false };
}

function excerptOf(buf: Buffer): string {
  const text = buf.subarray(0, 120).toString('latin1');
  return JSON.stringify(text.split('\r\n')[0] ?? text);
}

/** Writes `request` on `socket` once it is connected and collects the answer (see IClientResult). */
function runH1(socket: net.Socket | tls.TLSSocket, connectEvent: 'connect' | 'secureConnect', request: Buffer): Promise<IClientResult> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let closed = false;
    let done = false;
    let quietTimer: NodeJS.Timeout | undefined;
    const finish = (): void => {
      if (done) return;
      done = true;
      clearTimeout(overall);
      clearTimeout(quietTimer);
      const buf = Buffer.concat(chunks);
      const parsed = parseResponses(buf, closed);
      let outcome: string;
      if (parsed.garbage) outcome = 'garbage';
      else if (parsed.statuses.length > 0) outcome = String(parsed.statuses[0]);
      else if (buf.length > 0) outcome = closed ? 'garbage' : 'timeout';
      else outcome = closed ? 'close' : 'timeout';
      socket.destroy();
      resolve({ outcome, statuses: parsed.statuses, closed, excerpt: excerptOf(buf) });
    };
    const overall = setTimeout(finish, CASE_TIMEOUT_MS);
    const check = (): void => {
      clearTimeout(quietTimer);
      const parsed = parseResponses(Buffer.concat(chunks), closed);
      if (parsed.garbage) return finish();
      // A response after which the proxy must close: wait for the close (or the overall timeout).
      if (parsed.complete > 0 && !CLOSING_STATUSES.has(parsed.statuses[0])) quietTimer = setTimeout(finish, QUIET_MS);
    };
    socket.on(connectEvent, () => socket.write(request));
    socket.on('data', (d: Buffer) => {
      chunks.push(d);
      check();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      closed = true;
      finish();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 client: raw frames, a tiny HPACK encoder (literal without indexing, no Huffman) and a
// decoder for the one field we need (:status, the first field of the first response block)
// ---------------------------------------------------------------------------------------------

const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');
const FRAME = { DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, PING: 6, GOAWAY: 7, CONTINUATION: 9 } as const;
const FLAG = { END_STREAM: 0x1, ACK: 0x1, END_HEADERS: 0x4, PADDED: 0x8, PRIORITY: 0x20 } as const;

function h2Frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(stream & 0x7fffffff, 5);
  return Buffer.concat([head, payload]);
}

/** HPACK integer with an N-bit prefix (RFC 7541 §5.1); `high` holds the bits above the prefix. */
function hpackInt(value: number, prefixBits: number, high = 0): number[] {
  const max = (1 << prefixBits) - 1;
  if (value < max) return [high | value];
  const out = [high | max];
  let v = value - max;
  while (v >= 128) {
    out.push((v % 128) + 128);
    v = Math.floor(v / 128);
  }
  out.push(v);
  return out;
}

function hpackString(s: string): Buffer {
  const bytes = Buffer.from(s, 'latin1');
  return Buffer.concat([Buffer.from(hpackInt(bytes.length, 7, 0)), bytes]);
}

/** A header block of literal fields without indexing, new names (0x00), no Huffman. */
function hpackEncode(headers: Array<[string, string]>): Buffer {
  return Buffer.concat(headers.map(([n, v]) => Buffer.concat([Buffer.from([0x00]), hpackString(n), hpackString(v)])));
}

function hpackReadInt(buf: Buffer, pos: number, prefixBits: number): { value: number; pos: number } {
  const max = (1 << prefixBits) - 1;
  let value = buf[pos] & max;
  pos++;
  if (value < max) return { value, pos };
  let shift = 0;
  while (pos < buf.length) {
    const b = buf[pos++];
    value += (b & 0x7f) * 2 ** shift;
    shift += 7;
    if ((b & 0x80) === 0) break;
  }
  return { value, pos };
}

/** Huffman-decodes a string of digits (RFC 7541 Appendix B: '0'-'2' are 5 bits, '3'-'9' are 6). */
function huffmanDigits(bytes: Buffer): string | null {
  let bits = '';
  for (const b of bytes) bits += b.toString(2).padStart(8, '0');
  let out = '';
  let i = 0;
  while (i < bits.length) {
    if (bits.length - i < 8 && /^1*$/.test(bits.slice(i))) break; // EOS padding
    const v5 = parseInt(bits.slice(i, i + 5), 2);
    if (bits.length - i >= 5 && v5 <= 2) {
      out += String(v5);
      i += 5;
      continue;
    }
    const v6 = parseInt(bits.slice(i, i + 6), 2);
    if (bits.length - i >= 6 && v6 >= 0x19 && v6 <= 0x1f) {
      out += String(v6 - 0x19 + 3);
      i += 6;
      continue;
    }
    return null;
  }
  return out;
}

const STATIC_STATUS: Record<number, number> = { 8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500 };

/** The :status of a response header block (the first field after any table size updates). */
function decodeStatus(block: Buffer): number | null {
  let pos = 0;
  while (pos < block.length && (block[pos] & 0xe0) === 0x20) pos = hpackReadInt(block, pos, 5).pos; // size update
  if (pos >= block.length) return null;
  const b = block[pos];
  if (b & 0x80) return STATIC_STATUS[hpackReadInt(block, pos, 7).value] ?? null;
  const prefix = (b & 0x40) ? 6 : 4;
  const name = hpackReadInt(block, pos, prefix);
  if (name.value < 8 || name.value > 14) return null;
  pos = name.pos;
  const huffman = (block[pos] & 0x80) !== 0;
  const len = hpackReadInt(block, pos, 7);
  const raw = block.subarray(len.pos, len.pos + len.value);
  const text = huffman ? huffmanDigits(raw) : raw.toString('latin1');
  return text !== null && /^\d{3}$/.test(text) ? Number(text) : null;
}

/** Sends one request on stream 1 and reports how the proxy answered it. */
function runH2(socket: net.Socket | tls.TLSSocket, connectEvent: 'connect' | 'secureConnect', headers: Array<[string, string]>, body: Buffer | null): Promise<IClientResult> {
  return new Promise((resolve) => {
    let buf = Buffer.alloc(0);
    let status: number | null = null;
    let reset: number | null = null;
    let goaway: number | null = null;
    let closed = false;
    let done = false;
    let headerBlock: Buffer | null = null;
    let blockEndsStream = false;
    let noH2 = false;
    const finish = (): void => {
      if (done) return;
      done = true;
      clearTimeout(overall);
      socket.destroy();
      let outcome: string;
      if (noH2) outcome = 'no-h2-alpn';
      else if (status !== null) outcome = String(status);
      else if (reset !== null) outcome = 'reset';
      else if (goaway !== null) outcome = 'goaway';
      else outcome = closed ? 'close' : 'timeout';
      const notes = [reset !== null ? `RST_STREAM code ${reset}` : '', goaway !== null ? `GOAWAY code ${goaway}` : ''].filter(Boolean).join(', ');
      resolve({ outcome, statuses: status === null ? [] : [status], closed, excerpt: notes || '(no frames of note)' });
    };
    const overall = setTimeout(finish, CASE_TIMEOUT_MS);
    const onBlock = (block: Buffer, endStream: boolean): void => {
      const s = decodeStatus(block);
      if (s !== null && s >= 200) status = s;
      else if (s === null) status = -1; // a response whose status we could not read
      if (endStream) finish();
    };
    socket.on(connectEvent, () => {
      if (socket instanceof tls.TLSSocket && socket.alpnProtocol !== 'h2') {
        noH2 = true;
        finish();
        return;
      }
      const frames = [H2_PREFACE, h2Frame(FRAME.SETTINGS, 0, 0, Buffer.alloc(0))];
      frames.push(h2Frame(FRAME.HEADERS, FLAG.END_HEADERS | (body === null ? FLAG.END_STREAM : 0), 1, hpackEncode(headers)));
      if (body !== null) frames.push(h2Frame(FRAME.DATA, FLAG.END_STREAM, 1, body));
      socket.write(Buffer.concat(frames));
    });
    socket.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 9) {
        const len = buf.readUIntBE(0, 3);
        if (buf.length < 9 + len) break;
        const type = buf[3];
        const flags = buf[4];
        const stream = buf.readUInt32BE(5) & 0x7fffffff;
        let payload = buf.subarray(9, 9 + len);
        buf = buf.subarray(9 + len);
        if (type === FRAME.SETTINGS && !(flags & FLAG.ACK)) socket.write(h2Frame(FRAME.SETTINGS, FLAG.ACK, 0, Buffer.alloc(0)));
        else if (type === FRAME.PING && !(flags & FLAG.ACK)) socket.write(h2Frame(FRAME.PING, FLAG.ACK, 0, payload));
        else if (type === FRAME.GOAWAY) {
          goaway = payload.readUInt32BE(4);
          if (goaway !== 0 && status === null) finish();
        } else if (stream === 1 && type === FRAME.RST_STREAM) {
          reset = payload.readUInt32BE(0);
          finish();
        } else if (stream === 1 && type === FRAME.HEADERS) {
          if (flags & FLAG.PADDED) payload = payload.subarray(1, payload.length - payload[0]);
          if (flags & FLAG.PRIORITY) payload = payload.subarray(5);
          blockEndsStream = (flags & FLAG.END_STREAM) !== 0;
          if (flags & FLAG.END_HEADERS) onBlock(payload, blockEndsStream);
          else headerBlock = payload;
        } else if (stream === 1 && type === FRAME.CONTINUATION && headerBlock !== null) {
          headerBlock = Buffer.concat([headerBlock, payload]);
          if (flags & FLAG.END_HEADERS) {
            const block = headerBlock;
            headerBlock = null;
            onBlock(block, blockEndsStream);
          }
        } else if (stream === 1 && type === FRAME.DATA && flags & FLAG.END_STREAM) finish();
        if (done) return;
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      closed = true;
      finish();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Checking what the backend received
// ---------------------------------------------------------------------------------------------

function describeRequests(backend: IRecordingBackend): string {
  if (backend.requests.length === 0) return 'backend saw nothing';
  return `backend saw ${backend.requests.length}: ` + backend.requests
    .map((r) => `${JSON.stringify(r.requestLine)}${r.complete ? '' : ' (incomplete)'}${backend.header(r, 'x-forwarded-for').length ? ' xff' : ' NO-xff'}`)
    .join(', ');
}

/** The first way `backend`'s record breaks `expect`, or null. */
function backendProblem(backend: IRecordingBackend, expect: IBackendExpectation): string | null {
  const reqs = backend.requests;
  const smuggled = reqs.find((r) => r.requestLine.includes('smuggled'));
  if (smuggled) return `a smuggled request reached the backend: ${JSON.stringify(smuggled.requestLine)}`;
  const complete = reqs.filter((r) => r.complete).length;
  switch (expect.count.kind) {
    case 'none':
      if (reqs.length !== 0) return 'expected no request at the backend';
      break;
    case 'incomplete':
      if (complete !== 0) return 'expected no complete request at the backend';
      break;
    case 'exactly':
      if (reqs.length !== expect.count.n || complete !== expect.count.n) return `expected exactly ${expect.count.n} complete request(s) at the backend`;
      break;
    case 'atMost':
      if (reqs.length > expect.count.n) return `expected at most ${expect.count.n} request(s) at the backend`;
      break;
  }
  const each = (test: (r: IRecordedRequest) => boolean, what: string): string | null => {
    const bad = reqs.find((r) => !test(r));
    return bad ? `${what} (request ${JSON.stringify(bad.requestLine)}, headers ${JSON.stringify(bad.headers.map(([n]) => n))})` : null;
  };
  return (
    (expect.xff ? each((r) => backend.header(r, 'x-forwarded-for').length > 0, 'expected X-Forwarded-For at the backend') : null) ??
    (expect.noauth ? each((r) => backend.header(r, 'authorization').length === 0, 'expected no Authorization at the backend') : null) ??
    (expect.host !== undefined
      ? each((r) => {
          const h = backend.header(r, 'host');
          return h.length === 1 && h[0].toLowerCase() === expect.host!.toLowerCase();
        }, `expected exactly one Host: ${expect.host} at the backend`)
      : null) ??
    (expect.method !== undefined ? each((r) => r.method === expect.method, `expected method ${expect.method} at the backend`) : null) ??
    (expect.target !== undefined ? each((r) => r.target === expect.target, `expected request-target ${expect.target} at the backend`) : null) ??
    (expect.xffNot !== undefined
      ? each((r) => !backend.header(r, 'x-forwarded-for').some((v) => v.includes(expect.xffNot!)), `expected X-Forwarded-For without ${expect.xffNot}`)
      : null)
  );
}

/**
 * The first way `result` breaks the expected statuses, or null. An alternative with commas
 * ("200,400") is the whole sequence of responses on the connection.
 */
function clientProblem(result: IClientResult, statuses: string[], mustCloseAfterReject: boolean): string | null {
  const sequence = result.statuses.join(',');
  const matches = (alternative: string): boolean => (alternative.includes(',') ? alternative === sequence : alternative === result.outcome);
  if (!statuses.includes('*') && !statuses.some(matches)) return 'wrong client answer';
  const status = statuses.some((alternative) => alternative.includes(',')) ? (result.statuses.at(-1) ?? Number(result.outcome)) : Number(result.outcome);
  if (mustCloseAfterReject && CLOSING_STATUSES.has(status) && !result.closed) return `answered ${status} but left the connection open`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Paths, proxy and the run
// ---------------------------------------------------------------------------------------------

interface IPath {
  name: string;
  h2name: string;
  port: number;
  tls: boolean;
  backend: IRecordingBackend;
}

interface IOutcome {
  path: string;
  caseName: string;
  line: string;
  expected: string;
  got: string;
  problem: string | null;
}

const ca = createTestCa();
const cert = ca.issue(['a.test']);
const paths: IPath[] = [];
const outcomes = new Map<string, IOutcome>();
let proxy: SmartProxy | null = null;

const basicAuth = { enabled: true, users: [{ username: 'u', password: 'p' }] };

function connect(p: IPath, alpn: string): { socket: net.Socket | tls.TLSSocket; event: 'connect' | 'secureConnect' } {
  if (!p.tls) return { socket: net.connect(p.port, '127.0.0.1'), event: 'connect' };
  const socket = tls.connect({ port: p.port, host: '127.0.0.1', servername: 'a.test', ca: ca.cert, ALPNProtocols: [alpn] });
  return { socket, event: 'secureConnect' };
}

async function record(key: string, p: IPath, c: { name: string; line: number; statuses: string[]; backend: IBackendExpectation }, file: string, result: IClientResult): Promise<void> {
  await sleep(SETTLE_MS);
  // HTTP/1: a 400/431/505 must close the connection. HTTP/2: a 400 answers one stream; the connection may stay.
  const problem = clientProblem(result, c.statuses, file === 'http1.txt') ?? backendProblem(p.backend, c.backend);
  outcomes.set(key, {
    path: key.slice(0, key.indexOf(': ')),
    caseName: c.name,
    line: `${file}:${c.line}`,
    expected: `${c.statuses.join('|')} / ${c.backend.text}`,
    got: `${result.outcome}${result.closed ? ' +close' : ''} (${result.excerpt}) / ${describeRequests(p.backend)}`,
    problem,
  });
}

async function runPath(p: IPath): Promise<void> {
  for (const c of h1Cases) {
    p.backend.reset();
    const { socket, event } = connect(p, 'http/1.1');
    const result = await runH1(socket, event, c.request);
    await record(`${p.name}: ${c.name}`, p, c, 'http1.txt', result);
  }
  for (const c of h2Cases) {
    p.backend.reset();
    const headers = c.headers.some(([n]) => n === ':scheme') ? c.headers : [[':scheme', p.tls ? 'https' : 'http'] as [string, string], ...c.headers];
    const { socket, event } = connect(p, 'h2');
    const result = await runH2(socket, event, headers, c.body);
    await record(`${p.h2name}: ${c.name}`, p, c, 'http2.txt', result);
  }
}

// ---------------------------------------------------------------------------------------------
// Self-tests of the harness (no proxy involved)
// ---------------------------------------------------------------------------------------------

tap.test('harness: the corpus parses, escapes and repeats decode', async () => {
  if (h1Cases.length < 40 || h2Cases.length < 15) throw new Error(`corpus too small: ${h1Cases.length} HTTP/1, ${h2Cases.length} HTTP/2 cases`);
  const names = new Set<string>();
  for (const c of [...h1Cases.map((x) => `1 ${x.name}`), ...h2Cases.map((x) => `2 ${x.name}`)]) {
    if (names.has(c)) throw new Error(`duplicate case name ${c}`);
    names.add(c);
  }
  const d = decodeBytes('a\\r\\n\\t\\0\\\\\\x41\\xff{ab\\r\\n*3}');
  if (!d.equals(Buffer.from('a\r\n\t\0\\A\xffab\r\nab\r\nab\r\n', 'latin1'))) throw new Error(`decodeBytes: ${JSON.stringify(d.toString('latin1'))}`);
  const big = h1Cases.find((c) => c.name === '70 KiB request head');
  if (!big || big.request.length < 70 * 1024) throw new Error('the 70 KiB case is not 70 KiB');
});

tap.test('harness: the recording backend answers pipelined CL and chunked requests and records each', async () => {
  const backend = await startRecordingBackend();
  try {
    const socket = net.connect(backend.port, '127.0.0.1');
    const result = await runH1(socket, 'connect', Buffer.from(
      'POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc' +
      'POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n' +
      'GET /c HTTP/1.1\r\nHost: x\r\n\r\n', 'latin1'));
    if (result.statuses.join(',') !== '200,200,200') throw new Error(`client saw ${result.statuses.join(',')}`);
    const lines = backend.requests.map((r) => `${r.requestLine}:${r.complete}:${r.body.toString()}`);
    if (lines.join('|') !== 'POST /a HTTP/1.1:true:abc|POST /b HTTP/1.1:true:abc|GET /c HTTP/1.1:true:') throw new Error(lines.join('|'));
  } finally {
    await backend.close();
  }
});

tap.test('harness: the raw HTTP/2 client reads statuses from node:http2 (Huffman and static table)', async () => {
  const server = http2.createServer();
  server.on('stream', (stream, headers) => {
    const status = Number(String(headers[':path']).slice(1));
    stream.respond({ ':status': status, 'x-path': String(headers[':path']) });
    stream.end('body');
  });
  server.on('error', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  try {
    for (const status of [200, 401, 421, 426, 431, 400, 404, 503, 507, 508, 599]) {
      const socket = net.connect(port, '127.0.0.1');
      const result = await runH2(socket, 'connect', [[':method', 'GET'], [':scheme', 'http'], [':path', `/${status}`], [':authority', 'x']], null);
      if (result.outcome !== String(status)) throw new Error(`status ${status}: got ${result.outcome} ${result.excerpt}`);
    }
    // An uppercase header name: node's nghttp2 resets the stream, which the client reports.
    const socket = net.connect(port, '127.0.0.1');
    const bad = await runH2(socket, 'connect', [[':method', 'GET'], [':scheme', 'http'], [':path', '/200'], [':authority', 'x'], ['X-Upper', '1']], null);
    if (bad.outcome !== 'reset' && bad.outcome !== 'goaway') throw new Error(`uppercase name: got ${bad.outcome}`);
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

// ---------------------------------------------------------------------------------------------
// The corpus through the proxy
// ---------------------------------------------------------------------------------------------

tap.test('setup: three recording backends and a proxy with a domain port, a no-domain port and a TLS port, all with basicAuth', async () => {
  const [domainPort, plainPort, tlsPort] = await freePorts(3);
  const backends = await Promise.all([startRecordingBackend(), startRecordingBackend(), startRecordingBackend()]);
  paths.push(
    { name: 'plain-domain', h2name: 'h2c plain-domain', port: domainPort, tls: false, backend: backends[0] },
    { name: 'plain-nodomain', h2name: 'h2c plain-nodomain', port: plainPort, tls: false, backend: backends[1] },
    { name: 'tls', h2name: 'h2 tls', port: tlsPort, tls: true, backend: backends[2] },
  );
  const target = (b: IRecordingBackend) => [{ host: '127.0.0.1', port: b.port }];
  const routes: IRouteConfig[] = [
    { name: 'corpus-domain', match: { ports: domainPort, domains: ['a.test'] }, action: { type: 'forward', targets: target(backends[0]) }, security: { basicAuth } },
    { name: 'corpus-nodomain', match: { ports: plainPort }, action: { type: 'forward', targets: target(backends[1]) }, security: { basicAuth } },
    {
      name: 'corpus-tls',
      match: { ports: tlsPort, domains: ['a.test'] },
      action: { type: 'forward', targets: target(backends[2]), tls: { mode: 'terminate', certificate: cert } },
      security: { basicAuth },
    },
  ];
  proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 300, connectionRateLimitPerMinute: 0, maxConnectionsPerIP: 0 });
  await proxy.start();
});

tap.test(`run: ${h1Cases.length} HTTP/1 and ${h2Cases.length} HTTP/2 cases on every path (checked one by one below)`, async () => {
  if (!proxy) throw new Error('the proxy did not start');
  const started = Date.now();
  await Promise.all(paths.map((p) => runPath(p)));
  console.log(`corpus ran in ${((Date.now() - started) / 1000).toFixed(1)} s`);
});

const pathNames = [
  { h1: 'plain-domain', h2: 'h2c plain-domain' },
  { h1: 'plain-nodomain', h2: 'h2c plain-nodomain' },
  { h1: 'tls', h2: 'h2 tls' },
];
const allKeys: string[] = [];
for (const { h1 } of pathNames) for (const c of h1Cases) allKeys.push(`${h1}: ${c.name}`);
for (const { h2 } of pathNames) for (const c of h2Cases) allKeys.push(`${h2}: ${c.name}`);

for (const key of allKeys) {
  tap.test(key, async () => {
    const o = outcomes.get(key);
    if (!o) throw new Error('not run');
    if (o.problem) throw new Error(`${o.problem}; expected ${o.expected}; got ${o.got} [${o.line}]`);
  });
}

tap.test('summary: failures by path and case', async () => {
  const failed = [...outcomes.values()].filter((o) => o.problem);
  console.log(`${outcomes.size - failed.length} of ${outcomes.size} (path, case) pairs as the API says; ${failed.length} not:`);
  for (const o of failed) console.log(`  ${o.path} | ${o.caseName} | expected ${o.expected} | got ${o.got}`);
  // EDGE_CORPUS_VERBOSE=1 prints what happened in every pair, passing or not.
  if (process.env.EDGE_CORPUS_VERBOSE) for (const o of outcomes.values()) console.log(`  ${o.problem ? 'FAIL' : 'pass'} ${o.path} | ${o.caseName} | got ${o.got}`);
});

tap.test('teardown', async () => {
  await proxy?.stop();
  await Promise.all(paths.map((p) => p.backend.close()));
});

tap.start({ throwOnError: true });
