// Ready-made socket handlers for `action.type: 'socket-handler'` routes (API.md, `SocketHandlers`).
// Each factory returns a TSocketHandler that works on any Node net.Socket. The three that only
// answer HTTP with fixed bytes (httpRedirect, httpResponse, httpBlock) also carry a native spec
// under NATIVE_SOCKET_HANDLER, so the Rust core can serve them without calling into JavaScript.
import * as net from 'node:net';
import { STATUS_CODES } from 'node:http';
import { StringDecoder } from 'node:string_decoder';

import type { IRouteContext, TSocketHandler } from '../models/route-types.js';

/** The property key under which a handler carries its native spec (non-enumerable). */
export const NATIVE_SOCKET_HANDLER: unique symbol = Symbol.for('smartproxy.nativeSocketHandler');

/** What the Rust core needs to serve a built-in HTTP handler itself. */
export type TNativeSocketHandlerSpec =
  | { kind: 'redirect'; location: string; status: number }
  | { kind: 'response'; status: number; headers: Record<string, string>; body: string }
  | { kind: 'block'; status: number; message: string };

/** The native spec a handler carries, or undefined for handlers that must run in JavaScript. */
export function nativeSpecOf(handler: unknown): TNativeSocketHandlerSpec | undefined {
  if (typeof handler !== 'function') return undefined;
  const descriptor = Object.getOwnPropertyDescriptor(handler, NATIVE_SOCKET_HANDLER);
  return descriptor === undefined ? undefined : (descriptor.value as TNativeSocketHandlerSpec);
}

function withNativeSpec(handler: TSocketHandler, spec: TNativeSocketHandlerSpec): TSocketHandler {
  Object.defineProperty(handler, NATIVE_SOCKET_HANDLER, {
    value: Object.freeze(spec),
    enumerable: false,
    writable: false,
    configurable: false,
  });
  return handler;
}

/** The response to a request `httpServer` handlers write through. */
export interface IHttpServerRequest {
  method: string;
  /** The request target as sent (`/path?query`). */
  url: string;
  /** Lower-cased names; repeated headers joined with `, `. */
  headers: Record<string, string>;
  body: string;
}

export interface IHttpServerResponse {
  status(code: number): IHttpServerResponse;
  header(name: string, value: string): IHttpServerResponse;
  /** Sends the response with this body and closes the connection. */
  send(body: string | Buffer): void;
  /** Sends the response (status and headers so far, empty body) and closes the connection. */
  end(): void;
}

export type THttpServerHandler = (req: IHttpServerRequest, res: IHttpServerResponse) => void | Promise<void>;
export type TLineHandler = (line: string, socket: net.Socket) => void;

/** Largest request head the HTTP handlers read (as the engine's `maxHeaderSize` default). */
const MAX_HEAD_BYTES = 64 * 1024;
/** Largest request body `httpServer` buffers. */
const MAX_BODY_BYTES = 10 * 1024 * 1024;

function reasonPhrase(status: number): string {
  return STATUS_CODES[status] ?? 'Unknown';
}

/** Control characters (CR, LF, NUL...) never reach a header line. */
function headerSafe(value: string): string {
  return value.replace(/[\u0000-\u001f\u007f]/g, '');
}

function ignoreErrors(socket: net.Socket): void {
  socket.on('error', () => socket.destroy());
}

/** Writes a complete HTTP/1.1 response and half-closes; whatever the client still sends is drained. */
function writeResponse(socket: net.Socket, status: number, headers: Array<[string, string]>, body: string | Buffer): void {
  const payload = typeof body === 'string' ? Buffer.from(body, 'utf8') : body;
  const lines = [`HTTP/1.1 ${status} ${reasonPhrase(status)}`];
  for (const [name, value] of headers) {
    const lower = name.toLowerCase();
    if (lower === 'content-length' || lower === 'connection' || lower === 'transfer-encoding') continue;
    lines.push(`${headerSafe(name)}: ${headerSafe(value)}`);
  }
  lines.push(`Content-Length: ${payload.length}`, 'Connection: close', '', '');
  if (!socket.destroyed) socket.end(Buffer.concat([Buffer.from(lines.join('\r\n'), 'latin1'), payload]));
  socket.resume();
}

interface IRequestHead {
  method: string;
  target: string;
  headers: Record<string, string>;
  /** Bytes after the head (the start of a body). */
  rest: Buffer;
}

function findHeadEnd(buffer: Buffer): { end: number; sep: number } | undefined {
  const crlf = buffer.indexOf('\r\n\r\n');
  const lf = buffer.indexOf('\n\n');
  if (crlf >= 0 && (lf < 0 || crlf < lf)) return { end: crlf, sep: 4 };
  if (lf >= 0) return { end: lf, sep: 2 };
  return undefined;
}

function parseHead(head: string, rest: Buffer): IRequestHead {
  const lines = head.split(/\r?\n/);
  const [method = '', target = '/'] = (lines[0] ?? '').split(' ').filter((part) => part !== '');
  const headers: Record<string, string> = {};
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
  }
  return { method, target, headers, rest };
}

/**
 * Reads one request head from the socket. Calls `onHead` once with it, or with undefined when the
 * connection ended or the head grew past MAX_HEAD_BYTES (then the caller decides what to answer).
 */
function readRequestHead(socket: net.Socket, onHead: (head: IRequestHead | undefined, tooLarge: boolean) => void): void {
  let buffer = Buffer.alloc(0);
  let done = false;
  const finish = (head: IRequestHead | undefined, tooLarge: boolean): void => {
    if (done) return;
    done = true;
    socket.off('data', onData);
    socket.off('end', onEnd);
    onHead(head, tooLarge);
  };
  const onData = (chunk: Buffer | string): void => {
    buffer = Buffer.concat([buffer, typeof chunk === 'string' ? Buffer.from(chunk) : chunk]);
    const found = findHeadEnd(buffer);
    if (found !== undefined && found.end <= MAX_HEAD_BYTES) {
      finish(parseHead(buffer.subarray(0, found.end).toString('latin1'), buffer.subarray(found.end + found.sep)), false);
    } else if (buffer.length > MAX_HEAD_BYTES) {
      finish(undefined, true);
    }
  };
  const onEnd = (): void => {
    // A head cut short still has its request line; answer it rather than nothing.
    const text = buffer.toString('latin1');
    finish(/^\S+ \S+/.test(text) ? parseHead(text, Buffer.alloc(0)) : undefined, false);
  };
  socket.on('data', onData);
  socket.on('end', onEnd);
}

/** `host[:port]` or `[v6][:port]` → the host without its port. */
function stripPort(host: string): string {
  if (host.startsWith('[')) {
    const close = host.indexOf(']');
    return close >= 0 ? host.slice(0, close + 1) : host;
  }
  const colon = host.indexOf(':');
  return colon >= 0 && host.indexOf(':', colon + 1) < 0 ? host.slice(0, colon) : host;
}

/** The origin-form `/path?query` of a request target (absolute-form targets lose scheme and host). */
function originForm(target: string): string {
  const absolute = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i.exec(target);
  const rest = absolute === null ? target : target.slice(absolute[0].length);
  if (rest === '' || rest.startsWith('?')) return `/${rest}`;
  return rest;
}

function fillTemplate(template: string, values: Record<string, string>): string {
  return template.replace(/\{(domain|port|path|query|clientIp|routeName|connectionId)\}/g, (_, key: string) => values[key] ?? '');
}

// ---------------------------------------------------------------------------------------------

/** Writes back every byte it receives; half-closes when the client does. */
const echo: TSocketHandler = (socket) => {
  ignoreErrors(socket);
  socket.pipe(socket);
};

/** Relays the connection to `host:port` as raw TCP. */
function proxy(host: string, port: number): TSocketHandler {
  return (socket) => {
    ignoreErrors(socket);
    const upstream = net.connect({ host, port });
    upstream.on('error', () => {
      upstream.destroy();
      socket.destroy();
    });
    socket.on('close', () => upstream.destroy());
    upstream.on('close', () => socket.destroy());
    socket.pipe(upstream);
    upstream.pipe(socket);
  };
}

/** Calls `handler` with every line the client sends (UTF-8, without its `\n` or `\r\n`). */
function lineProtocol(handler: TLineHandler): TSocketHandler {
  return (socket) => {
    ignoreErrors(socket);
    const decoder = new StringDecoder('utf8');
    let pending = '';
    socket.on('data', (chunk: Buffer | string) => {
      pending += typeof chunk === 'string' ? chunk : decoder.write(chunk);
      let newline: number;
      while ((newline = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        handler(line.endsWith('\r') ? line.slice(0, -1) : line, socket);
        if (socket.destroyed) return;
      }
    });
  };
}

/** Answers every connection with this HTTP response, then closes it. Served natively. */
function httpResponse(response: { statusCode: number; headers?: Record<string, string>; body: string }): TSocketHandler {
  const status = response.statusCode;
  const headers = { ...(response.headers ?? {}) };
  const body = response.body ?? '';
  const handler: TSocketHandler = (socket) => {
    ignoreErrors(socket);
    writeResponse(socket, status, Object.entries(headers), body);
  };
  return withNativeSpec(handler, { kind: 'response', status, headers: { ...headers }, body });
}

/** Writes `message` (when given) and closes the connection. */
function block(message?: string): TSocketHandler {
  return (socket) => {
    ignoreErrors(socket);
    if (message !== undefined && message !== '') socket.end(message);
    else socket.end();
    socket.resume();
  };
}

/** Answers `status` (403) with `message` (the status's reason phrase) as a text body. Served natively. */
function httpBlock(status = 403, message?: string): TSocketHandler {
  const text = message ?? reasonPhrase(status);
  const handler: TSocketHandler = (socket) => {
    ignoreErrors(socket);
    writeResponse(socket, status, [['Content-Type', 'text/plain; charset=utf-8']], text);
  };
  return withNativeSpec(handler, { kind: 'block', status, message: text });
}

/**
 * Reads the request head and redirects it to `template` with `status` (301). `{domain}` is the
 * Host without its port, `{port}` the port the client connected to, `{path}` the path with its
 * query; `{query}`, `{clientIp}`, `{routeName}` and `{connectionId}` are filled too. Served natively.
 */
function httpRedirect(template: string, status = 301): TSocketHandler {
  const handler: TSocketHandler = (socket, context: IRouteContext) => {
    ignoreErrors(socket);
    readRequestHead(socket, (head, tooLarge) => {
      if (tooLarge) {
        writeResponse(socket, 431, [], '');
        return;
      }
      if (head === undefined) {
        socket.end();
        return;
      }
      const path = originForm(head.target);
      const queryAt = path.indexOf('?');
      const host = head.headers.host;
      const domain = host !== undefined && host !== '' ? stripPort(host) : (context.domain ?? 'localhost');
      const location = fillTemplate(template, {
        domain,
        port: String(context.port),
        path,
        query: queryAt >= 0 ? path.slice(queryAt + 1) : '',
        clientIp: context.clientIp,
        routeName: context.routeName ?? '',
        connectionId: context.connectionId,
      });
      writeResponse(socket, status, [['Location', location]], '');
    });
  };
  return withNativeSpec(handler, { kind: 'redirect', location: template, status });
}

/**
 * A minimal HTTP/1.1 server on the connection: reads one request (Content-Length or chunked
 * body), calls `handler`, writes its response and closes. A handler that throws gets a 500.
 */
function httpServer(handler: THttpServerHandler): TSocketHandler {
  return (socket) => {
    ignoreErrors(socket);
    readRequestHead(socket, (head, tooLarge) => {
      if (tooLarge) {
        writeResponse(socket, 431, [], '');
        return;
      }
      if (head === undefined) {
        socket.end();
        return;
      }
      readBody(socket, head, (body) => {
        if (body === undefined) {
          writeResponse(socket, 400, [['Content-Type', 'text/plain; charset=utf-8']], 'Bad Request');
          return;
        }
        serve(socket, handler, { method: head.method, url: head.target, headers: head.headers, body: body.toString('utf8') });
      });
    });
  };
}

function serve(socket: net.Socket, handler: THttpServerHandler, req: IHttpServerRequest): void {
  let statusCode = 200;
  const headers: Array<[string, string]> = [];
  let sent = false;
  const send = (body: string | Buffer): void => {
    if (sent) return;
    sent = true;
    writeResponse(socket, statusCode, headers, body);
  };
  const res: IHttpServerResponse = {
    status(code) {
      statusCode = code;
      return res;
    },
    header(name, value) {
      headers.push([name, String(value)]);
      return res;
    },
    send,
    end() {
      send('');
    },
  };
  const fail = (): void => {
    if (!sent) {
      sent = true;
      writeResponse(socket, 500, [['Content-Type', 'text/plain; charset=utf-8']], 'Internal Server Error');
    }
  };
  try {
    const result = handler(req, res);
    if (result instanceof Promise) result.catch(fail);
  } catch {
    fail();
  }
}

/** The request body: Content-Length bytes, a decoded chunked body, or nothing; undefined if malformed. */
function readBody(socket: net.Socket, head: IRequestHead, onBody: (body: Buffer | undefined) => void): void {
  const chunked = /\bchunked\b/i.test(head.headers['transfer-encoding'] ?? '');
  const lengthHeader = head.headers['content-length'];
  const length = lengthHeader === undefined ? 0 : Number(lengthHeader);
  if (!chunked && (!Number.isInteger(length) || length < 0 || length > MAX_BODY_BYTES)) {
    onBody(undefined);
    return;
  }
  let buffer = head.rest;
  let done = false;
  const finish = (body: Buffer | undefined): void => {
    if (done) return;
    done = true;
    socket.off('data', onData);
    socket.off('end', onEnd);
    onBody(body);
  };
  const check = (): void => {
    if (chunked) {
      const decoded = decodeChunked(buffer);
      if (decoded === null) finish(undefined);
      else if (decoded !== undefined) finish(decoded);
      else if (buffer.length > MAX_BODY_BYTES) finish(undefined);
    } else if (buffer.length >= length) {
      finish(buffer.subarray(0, length));
    }
  };
  const onData = (chunk: Buffer | string): void => {
    buffer = Buffer.concat([buffer, typeof chunk === 'string' ? Buffer.from(chunk) : chunk]);
    check();
  };
  const onEnd = (): void => finish(chunked ? undefined : buffer.length >= length ? buffer.subarray(0, length) : undefined);
  socket.on('data', onData);
  socket.on('end', onEnd);
  check();
}

/** A complete chunked body decoded; undefined while incomplete; null when malformed. */
function decodeChunked(buffer: Buffer): Buffer | undefined | null {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const lineEnd = buffer.indexOf('\r\n', at);
    if (lineEnd < 0) return undefined;
    const sizeText = buffer.subarray(at, lineEnd).toString('latin1').split(';')[0].trim();
    if (!/^[0-9a-f]+$/i.test(sizeText)) return null;
    const size = parseInt(sizeText, 16);
    if (size === 0) {
      // The last chunk is followed by optional trailers and an empty line.
      const noTrailers = buffer.subarray(lineEnd + 2, lineEnd + 4).toString('latin1') === '\r\n';
      if (!noTrailers && buffer.indexOf('\r\n\r\n', lineEnd) < 0) return undefined;
      return Buffer.concat(parts);
    }
    const dataStart = lineEnd + 2;
    if (buffer.length < dataStart + size + 2) return undefined;
    parts.push(buffer.subarray(dataStart, dataStart + size));
    at = dataStart + size + 2;
  }
}

/**
 * The built-in socket handlers. `echo` is a handler; the others are factories returning one.
 * `httpRedirect`, `httpResponse` and `httpBlock` are served by the Rust core without calling JS.
 */
export const SocketHandlers = {
  echo,
  proxy,
  lineProtocol,
  httpResponse,
  block,
  httpBlock,
  httpRedirect,
  httpServer,
} as const;
