// A backend that records every byte it receives, per connection, and the requests it parsed out of
// them. It is a raw `net` server with its own small HTTP/1.x parser, so that what the proxy sends is
// seen exactly as sent (no Node `http` normalisation, no merging of duplicate headers): each request
// head is recorded as soon as it is complete, the request is marked complete once its body
// (Content-Length or chunked) has arrived, and only then is it answered with
// `HTTP/1.1 200 OK` + Content-Length, so keep-alive and pipelining work and a smuggled second request
// shows up as a second recorded request.
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';

export interface IRecordedRequest {
  /** Index of the backend connection it arrived on. */
  connection: number;
  requestLine: string;
  method: string;
  target: string;
  version: string;
  /** Header fields in arrival order, names as sent. */
  headers: Array<[string, string]>;
  /** The request's body arrived whole (and the request was answered). */
  complete: boolean;
  /** The body as received (de-chunked). */
  body: Buffer;
}

export interface IRecordingBackend {
  port: number;
  /** Every request head parsed so far (complete or not), in arrival order. */
  requests: IRecordedRequest[];
  /** Raw bytes received, one entry per accepted connection. */
  connections: Buffer[];
  /** Bytes the parser could not understand, per connection (a framing error stops parsing it). */
  parseErrors: string[];
  /** Forgets everything recorded so far (live connections keep being recorded, into new slots). */
  reset(): void;
  /** The values of header `name` (case-insensitive) of a request. */
  header(req: IRecordedRequest, name: string): string[];
  close(): Promise<void>;
}

const CRLF = Buffer.from('\r\n');

/** Index of the end of a head (the byte after the blank line) or -1; accepts CRLF and bare LF. */
function headEnd(buf: Buffer): number {
  for (let i = 0; i < buf.length; i++) {
    if (buf[i] !== 0x0a) continue;
    if (buf[i + 1] === 0x0a) return i + 2;
    if (buf[i + 1] === 0x0d && buf[i + 2] === 0x0a) return i + 3;
  }
  return -1;
}

export async function startRecordingBackend(): Promise<IRecordingBackend> {
  const sockets = new Set<net.Socket>();
  let generation = 0;
  const backend: IRecordingBackend = {
    port: 0,
    requests: [],
    connections: [],
    parseErrors: [],
    reset() {
      generation++;
      backend.requests = [];
      backend.connections = [];
      backend.parseErrors = [];
    },
    header(req, name) {
      const lower = name.toLowerCase();
      return req.headers.filter(([n]) => n.toLowerCase() === lower).map(([, v]) => v);
    },
    close: async () => undefined,
  };

  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    let myGeneration = generation;
    let index = backend.connections.push(Buffer.alloc(0)) - 1;
    let buf = Buffer.alloc(0);
    let current: IRecordedRequest | null = null;
    // Body state of `current`.
    let mode: 'none' | 'length' | 'chunked' = 'none';
    let remaining = 0;
    let chunkState: 'size' | 'data' | 'data-crlf' | 'trailers' = 'size';
    const bodyParts: Buffer[] = [];
    let broken = false;

    const fail = (why: string): void => {
      broken = true;
      backend.parseErrors.push(`conn ${index}: ${why}`);
    };

    const finish = (): void => {
      current!.complete = true;
      current!.body = Buffer.concat(bodyParts);
      bodyParts.length = 0;
      const n = backend.requests.indexOf(current!);
      const body = `backend saw request ${n} ${current!.method} ${current!.target}\n`;
      socket.write(`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(body)}\r\nX-Recording-Backend: 1\r\n\r\n${body}`);
      current = null;
      mode = 'none';
    };

    const parse = (): void => {
      while (!broken) {
        if (current === null) {
          // Leading empty lines between requests are skipped, as RFC 9112 §2.2 allows.
          while (buf.length > 0 && (buf[0] === 0x0d || buf[0] === 0x0a)) {
            if (buf[0] === 0x0a || (buf.length > 1 && buf[1] === 0x0a)) buf = buf.subarray(buf[0] === 0x0a ? 1 : 2);
            else break;
          }
          const end = headEnd(buf);
          if (end < 0) return;
          const head = buf.subarray(0, end).toString('latin1');
          buf = buf.subarray(end);
          const lines = head.split(/\r?\n/);
          const requestLine = lines.shift() ?? '';
          const parts = requestLine.split(' ');
          const headers: Array<[string, string]> = [];
          for (const line of lines) {
            if (line === '') continue;
            const colon = line.indexOf(':');
            if (colon < 0) headers.push([line, '']);
            else headers.push([line.slice(0, colon), line.slice(colon + 1).trim()]);
          }
          current = {
            connection: index,
            requestLine,
            method: parts[0] ?? '',
            target: parts[1] ?? '',
            version: parts[2] ?? '',
            headers,
            complete: false,
            body: Buffer.alloc(0),
          };
          backend.requests.push(current);
          const te = backend.header(current, 'transfer-encoding').join(',').toLowerCase();
          const cl = backend.header(current, 'content-length');
          if (te.includes('chunked')) {
            mode = 'chunked';
            chunkState = 'size';
          } else if (cl.length > 0) {
            mode = 'length';
            remaining = Number(cl[0]);
            if (!Number.isSafeInteger(remaining) || remaining < 0) return fail(`bad content-length ${cl[0]}`);
          } else {
            mode = 'none';
          }
          if (mode === 'none' || (mode === 'length' && remaining === 0)) finish();
          continue;
        }
        if (mode === 'length') {
          if (buf.length === 0) return;
          const take = Math.min(remaining, buf.length);
          bodyParts.push(buf.subarray(0, take));
          buf = buf.subarray(take);
          remaining -= take;
          if (remaining === 0) finish();
          continue;
        }
        // chunked
        if (chunkState === 'size' || chunkState === 'trailers') {
          const nl = buf.indexOf(0x0a);
          if (nl < 0) return;
          const line = buf.subarray(0, nl).toString('latin1').replace(/\r$/, '');
          buf = buf.subarray(nl + 1);
          if (chunkState === 'trailers') {
            if (line === '') finish();
            continue;
          }
          const size = parseInt(line.split(';')[0].trim(), 16);
          if (!Number.isFinite(size) || !/^[0-9a-fA-F]+$/.test(line.split(';')[0].trim())) return fail(`bad chunk size line ${JSON.stringify(line)}`);
          if (size === 0) chunkState = 'trailers';
          else {
            remaining = size;
            chunkState = 'data';
          }
          continue;
        }
        if (chunkState === 'data') {
          if (buf.length === 0) return;
          const take = Math.min(remaining, buf.length);
          bodyParts.push(buf.subarray(0, take));
          buf = buf.subarray(take);
          remaining -= take;
          if (remaining === 0) chunkState = 'data-crlf';
          continue;
        }
        // data-crlf
        if (buf.length < 2) return;
        if (!buf.subarray(0, 2).equals(CRLF)) return fail('chunk data not followed by CRLF');
        buf = buf.subarray(2);
        chunkState = 'size';
      }
    };

    socket.on('data', (d: Buffer) => {
      if (myGeneration !== generation) {
        // A connection that outlived a reset() is recorded into the current generation from here on.
        myGeneration = generation;
        index = backend.connections.push(Buffer.alloc(0)) - 1;
      }
      backend.connections[index] = Buffer.concat([backend.connections[index], d]);
      buf = Buffer.concat([buf, d]);
      parse();
    });
  });
  server.on('connection', () => undefined);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  backend.port = (server.address() as AddressInfo).port;
  backend.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return backend;
}
