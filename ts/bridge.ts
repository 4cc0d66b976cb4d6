// The JavaScript end of the engine's calls: socket handlers get a real net.Socket (the client's own
// descriptor, or a socket pair carrying terminated TLS's plaintext) with the bytes read to route it
// delivered first; datagram handlers get each datagram with a `reply` sending back through the
// engine; host/port functions are called with the route context and their answers checked; engine
// events become SmartProxy events. Functions are found by the ids the normalised config carries
// (FunctionRegistry).
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { EventEmitter } from 'node:events';

import type { DatagramCall, NativeEngine, RouteContext, SocketHandoff, SocketReport, TargetAnswer, TargetCall } from './native.js';
import type { IDatagramInfo, IRouteContext, TDatagramHandler, TSocketHandler } from './models/route-types.js';
import type { ILogEntry } from './models/options.js';
import { FunctionRegistry } from './utils/normalize-options.js';

/** An 'error' event's payload: an Error with where it happened. */
export interface ISmartProxyError extends Error {
  code: string;
  connectionId?: string;
  routeName?: string;
}

/** A log entry as the engine sends it (`fields` always present). */
interface INativeLogEntry {
  level: ILogEntry['level'];
  message: string;
  fields: Record<string, string | number | boolean>;
}

export class ScriptBridge {
  public readonly functions = new FunctionRegistry();
  /** Sockets given to handlers and not closed yet; `stop()` destroys what is left. */
  private readonly sockets = new Set<net.Socket>();
  /** What datagram handlers' replies go through; set once the engine exists (`attachEngine`). */
  private engine: Pick<NativeEngine, 'udpReply'> | undefined;

  constructor(
    private readonly events: EventEmitter,
    private readonly callTimeoutMs: () => number,
    private readonly logger: () => ((entry: ILogEntry) => void) | undefined,
  ) {}

  /** Never throws: whatever happens, the promise resolves once the socket is closed. */
  public readonly onSocket = (handoff: SocketHandoff): Promise<SocketReport> => {
    // Until a net.Socket owns the descriptor it is ours to close: Rust has let go of it, so a
    // throw here would leak it for the life of the process.
    let context: IRouteContext | undefined;
    let socket: net.Socket;
    try {
      context = routeContext(handoff.context);
      socket = new net.Socket({ fd: handoff.fd, readable: true, writable: true });
    } catch (err) {
      closeQuietly(handoff.fd);
      const what = context === undefined ? 'its route context could not be read' : 'the connection could not be opened as a socket';
      this.reportError('SOCKET_HANDOFF_FAILED', `${what}: ${messageOf(err)}`, context ?? fallbackContext(handoff), err);
      return Promise.resolve({ handlerFailed: true, bytesRead: 0, bytesWritten: 0 });
    }
    // An unhandled 'error' event would take the whole process down.
    socket.on('error', () => undefined);
    try {
      if (handoff.kind === 'pair') describePairSocket(socket, handoff, context);
      // Bytes read to route the connection come first, whenever the handler starts reading.
      if (handoff.initial.length > 0) socket.unshift(handoff.initial);
    } catch (err) {
      // The socket owns the descriptor now: destroying it closes it.
      socket.destroy();
      this.reportError('SOCKET_HANDOFF_FAILED', `the connection could not be prepared for its handler: ${messageOf(err)}`, context, err);
      return Promise.resolve({ handlerFailed: true, bytesRead: 0, bytesWritten: 0 });
    }
    this.sockets.add(socket);

    let handlerFailed = false;
    const closed = new Promise<SocketReport>((resolve) => {
      socket.once('close', () => {
        this.sockets.delete(socket);
        resolve({ handlerFailed, bytesRead: socket.bytesRead, bytesWritten: socket.bytesWritten });
      });
    });
    const fail = (reason: string, err?: unknown): void => {
      if (handlerFailed) return;
      handlerFailed = true;
      this.reportError('SOCKET_HANDLER_FAILED', `socket handler of route ${routeLabel(context)} ${reason}`, context, err);
      socket.destroy();
    };

    try {
      this.runHandler(handoff.handler, socket, context, fail);
    } catch (err) {
      // From here on the descriptor is the socket's: a failure destroys it, never throws to Rust.
      fail(`failed: ${messageOf(err)}`, err);
    }
    return closed;
  };

  private runHandler(id: number, socket: net.Socket, context: IRouteContext, fail: (reason: string, err?: unknown) => void): void {
    const handler = this.functions.get(id) as TSocketHandler | undefined;
    if (handler === undefined) {
      fail('is no longer registered');
      return;
    }
    let result: unknown;
    try {
      result = handler(socket, context);
    } catch (err) {
      fail(`threw: ${messageOf(err)}`, err);
      return;
    }
    if (isPromiseLike(result)) {
      let settled = false;
      // A handler still pending after jsCallTimeout that never took the socket (no reader, nothing
      // written) is stuck: its connection is closed. One that took the socket may run for as long
      // as the connection does.
      const timeoutMs = this.callTimeoutMs();
      const timer = setTimeout(() => {
        if (!settled && !tookSocket(socket)) fail(`did not settle within ${timeoutMs} ms (jsCallTimeout) and never used its socket`);
      }, timeoutMs);
      timer.unref();
      result.then(
        () => {
          settled = true;
          clearTimeout(timer);
        },
        (err: unknown) => {
          settled = true;
          clearTimeout(timer);
          fail(`rejected: ${messageOf(err)}`, err);
        },
      );
    }
  }

  /** The engine `reply` sends through: the bridge's callbacks are given to its constructor, so it comes after. */
  public attachEngine(engine: Pick<NativeEngine, 'udpReply'>): void {
    this.engine = engine;
  }

  /**
   * One datagram for a route's datagramHandler (fire and forget). Never throws: a handler that is
   * gone, throws or rejects is reported as an 'error' event, and the next datagram is served.
   */
  public readonly onDatagram = (call: DatagramCall): void => {
    const { port, clientIp, clientPort } = call;
    const routeName = call.routeName ?? undefined;
    const fail = (reason: string, err?: unknown): void => {
      const where = `datagram handler of route ${routeName !== undefined ? JSON.stringify(routeName) : '(unnamed)'}`;
      const client = net.isIPv6(clientIp) ? `[${clientIp}]:${clientPort}` : `${clientIp}:${clientPort}`;
      const message = `${where} ${reason} (client ${client}, port ${port})`;
      this.emitError(Object.assign(new Error(message, err === undefined ? undefined : { cause: err }), { code: 'DATAGRAM_HANDLER_FAILED', routeName }));
    };
    const handler = this.functions.get(call.handler) as TDatagramHandler | undefined;
    if (handler === undefined) {
      fail('is no longer registered');
      return;
    }
    const info: IDatagramInfo = routeName !== undefined ? { clientIp, clientPort, port, routeName } : { clientIp, clientPort, port };
    // Typed loosely: JavaScript callers may pass anything, and anything but bytes is a TypeError.
    const reply = (data: unknown): void => {
      if (!(data instanceof Uint8Array)) throw new TypeError(`reply() takes a Buffer or Uint8Array, got ${typeOf(data)}`);
      const buffer = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      // false: the client's flow is gone (idle past its sessionTimeout, or the proxy stopped), or the send failed.
      this.engine?.udpReply(port, clientIp, clientPort, buffer);
    };
    let result: unknown;
    try {
      result = handler(call.data, info, reply);
    } catch (err) {
      fail(`threw: ${messageOf(err)}`, err);
      return;
    }
    if (isPromiseLike(result)) result.then(undefined, (err: unknown) => fail(`rejected: ${messageOf(err)}`, err));
  };

  /** Calls the target's host and/or port function; a throw or a bad answer rejects the call. */
  public readonly resolveTarget = (call: TargetCall): TargetAnswer | Promise<TargetAnswer> => {
    const context = routeContext(call.context);
    const host = call.hostFunction != null ? this.callFunction(call.hostFunction, context) : undefined;
    let port: unknown;
    try {
      port = call.portFunction != null ? this.callFunction(call.portFunction, context) : undefined;
    } catch (err) {
      // The host's promise, if any, must not reject unhandled (that would end the process).
      if (isPromiseLike(host)) Promise.resolve(host).catch(() => undefined);
      throw err;
    }
    if (!isPromiseLike(host) && !isPromiseLike(port)) return checkedAnswer(call, host, port);
    return Promise.all([host, port]).then(([h, p]) => checkedAnswer(call, h, p));
  };

  public readonly onEvent = (message: { type: string; data: object }): void => {
    if (message.type === 'log') {
      this.deliverLog((message.data as { entries: INativeLogEntry[] }).entries);
      return;
    }
    if (message.type === 'error') {
      const data = message.data as { code: string; message: string; connectionId?: string; routeName?: string };
      this.emitError(Object.assign(new Error(data.message), { code: data.code, connectionId: data.connectionId, routeName: data.routeName ?? undefined }));
      return;
    }
    if (message.type.startsWith('certificate-')) {
      this.events.emit(message.type, certificateEvent(message.type, message.data as INativeCertificateEvent));
      return;
    }
    this.events.emit(message.type, withoutNulls(message.data));
  };

  private deliverLog(entries: INativeLogEntry[]): void {
    const logger = this.logger();
    if (logger === undefined) return;
    for (const { level, message, fields } of entries) {
      const entry: ILogEntry = Object.keys(fields).length > 0 ? { level, message, fields: { ...fields } } : { level, message };
      try {
        logger(entry);
      } catch {
        // The user's logger failed on this entry: the others still go to it.
      }
    }
  }

  /** Destroys the sockets handlers still hold (after the engine has stopped). */
  public closeAll(): void {
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  private callFunction(id: number, context: IRouteContext): unknown {
    const fn = this.functions.get(id) as ((ctx: IRouteContext) => unknown) | undefined;
    if (fn === undefined) throw new Error(`target function ${id} is no longer registered`);
    return fn({ ...context });
  }

  private reportError(code: string, message: string, context: IRouteContext, cause?: unknown): void {
    const error = Object.assign(new Error(message, cause === undefined ? undefined : { cause }), {
      code,
      connectionId: context.connectionId === '' ? undefined : context.connectionId,
      routeName: context.routeName,
    });
    this.emitError(error);
  }

  /** 'error' without a listener would throw; the failure has already been handled. */
  private emitError(error: ISmartProxyError): void {
    if (this.events.listenerCount('error') > 0) this.events.emit('error', error);
  }
}

function routeContext(raw: RouteContext): IRouteContext {
  return withoutNulls(raw) as IRouteContext;
}

/** What an error about a hand-off can still say when its context could not be read. */
function fallbackContext(handoff: SocketHandoff): IRouteContext {
  const read = <T>(get: () => T): T | undefined => {
    try {
      return get();
    } catch {
      return undefined;
    }
  };
  const raw = read(() => handoff.context);
  const text = (get: () => unknown): string | undefined => {
    const v = read(get);
    return typeof v === 'string' ? v : undefined;
  };
  return {
    port: 0,
    clientIp: '',
    serverIp: '',
    isTls: false,
    timestamp: Date.now(),
    connectionId: text(() => raw?.connectionId) ?? '',
    routeName: text(() => raw?.routeName),
  };
}

/** Optional fields arrive as null or undefined; the context has them absent. */
function withoutNulls<T extends object>(value: T): T {
  const copy: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value)) {
    if (v !== null && v !== undefined) copy[key] = v;
  }
  return copy as T;
}

/** A socket pair has no IP addresses of its own: it shows the client's and the listener's. */
function describePairSocket(socket: net.Socket, handoff: SocketHandoff, context: IRouteContext): void {
  const family = (ip: string): string => (net.isIPv6(ip) ? 'IPv6' : 'IPv4');
  Object.defineProperties(socket, {
    remoteAddress: { value: context.clientIp, configurable: true },
    remotePort: { value: handoff.clientPort, configurable: true },
    remoteFamily: { value: family(context.clientIp), configurable: true },
    localAddress: { value: context.serverIp, configurable: true },
    localPort: { value: context.port, configurable: true },
  });
}

function tookSocket(socket: net.Socket): boolean {
  return (
    socket.readableFlowing === true ||
    socket.listenerCount('data') > 0 ||
    socket.listenerCount('readable') > 0 ||
    socket.bytesWritten > 0 ||
    socket.destroyed
  );
}

function checkedAnswer(call: TargetCall, host: unknown, port: unknown): TargetAnswer {
  const answer: TargetAnswer = {};
  if (call.hostFunction != null) {
    const hosts = typeof host === 'string' ? [host] : host;
    if (!Array.isArray(hosts) || hosts.length === 0 || hosts.some((h) => typeof h !== 'string' || h.trim() === '')) {
      throw new Error(`the host function returned ${describe(host)}, expected a host name or a non-empty array of them`);
    }
    answer.hosts = hosts as string[];
  }
  if (call.portFunction != null) {
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
      throw new Error(`the port function returned ${describe(port)}, expected a port number (1-65535)`);
    }
    answer.port = port;
  }
  return answer;
}

function isPromiseLike(value: unknown): value is PromiseLike<unknown> {
  return (typeof value === 'object' || typeof value === 'function') && value !== null && typeof (value as PromiseLike<unknown>).then === 'function';
}

/** What a value is, for a TypeError: `null`, `a string`, `an object`, ... */
function typeOf(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  const type = typeof value;
  return `${/^[aeiou]/.test(type) ? 'an' : 'a'} ${type}`;
}

function describe(value: unknown): string {
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  return JSON.stringify(value) ?? String(value);
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function routeLabel(context: IRouteContext): string {
  return context.routeName !== undefined ? JSON.stringify(context.routeName) : context.routeId ?? '(unnamed)';
}

function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // Already closed: nothing to release.
  }
}

interface INativeCertificateEvent {
  routeName: string;
  domain: string;
  expiryDate: number | null;
  error: string | null;
}

const DAY_MS = 24 * 60 * 60 * 1000;

/** `{ routeName, domain, expiryDate: Date }`, `error` on failures, `daysRemaining` when expiring. */
function certificateEvent(type: string, data: INativeCertificateEvent): Record<string, unknown> {
  const event: Record<string, unknown> = { routeName: data.routeName, domain: data.domain };
  if (data.expiryDate !== null) event.expiryDate = new Date(data.expiryDate);
  if (data.error !== null) event.error = data.error;
  if (type === 'certificate-expiring' && data.expiryDate !== null) event.daysRemaining = Math.max(0, Math.floor((data.expiryDate - Date.now()) / DAY_MS));
  return event;
}
