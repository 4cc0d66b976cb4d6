// Validates user options and turns them into the engine's serialisable config. Pure: the input is
// never mutated. The first problem throws a SmartProxyConfigError naming the route and field;
// string patterns (domains, IPs) are checked by the engine itself, in the same message format.
import type { IRouteConfig, IRouteSecurity, IRouteTarget } from '../models/route-types.js';
import type { ISmartProxyOptions } from '../models/options.js';
import type {
  INativeConfig,
  INativeHeaderMatch,
  INativeHeaderTemplates,
  INativeNameValue,
  INativeOptions,
  INativeRoute,
  INativeTarget,
  INativeTargetTls,
  INativeBasicAuth,
  INativeJwtAuth,
  INativeRateLimit,
  INativeKernel,
  INativeResponse,
  INativeRetry,
  INativeTls,
  INativeAcme,
  INativeLoadBalancing,
} from '../models/native-config.js';
import { resolve as pathResolve } from 'node:path';
import {
  AFFINITY_KEY,
  BACKEND_PROTOCOLS,
  DEFAULT_MAX_KEYS,
  LB_ALGORITHMS,
  OPTIONS_SCHEMA,
  RATE_LIMIT_KEYS_BY,
  ROUTE_SCHEMA,
  TARGET_SCHEMA,
  TLS_MODES,
  TLS_VERSIONS,
  keyProblems,
} from '../models/option-schema.js';
import type { IObjectSchema } from '../models/option-schema.js';
import { expandPortRange, isValidPortNumber } from './port-range.js';
import { headerRegExpProblem, nativeHeaderMatch } from './header-match.js';
import { nativeSpecOf } from './socket-handlers.js';
import { checkUdpRoute } from './udp-route.js';
import { checkHttp3Route } from './http3-route.js';
import { checkHttp3Backend } from './http3-backend.js';
import type { TNativeSocketHandlerSpec } from './socket-handlers.js';

/** A JavaScript function the engine may call, by the id the config carries instead of it. */
export type TRegisteredFunction = (...args: never[]) => unknown;

/**
 * Ids for the functions of a config (socket and datagram handlers, host and port functions): the
 * same function keeps its id across route updates. The engine only ever sees the ids.
 */
export class FunctionRegistry {
  private readonly idsByFunction = new Map<TRegisteredFunction, number>();
  private readonly functionsById = new Map<number, TRegisteredFunction>();
  private nextId = 1;

  public idOf(fn: TRegisteredFunction): number {
    let id = this.idsByFunction.get(fn);
    if (id === undefined) {
      id = this.nextId++;
      this.idsByFunction.set(fn, id);
      this.functionsById.set(id, fn);
    }
    return id;
  }

  public get(id: number): TRegisteredFunction | undefined {
    return this.functionsById.get(id);
  }

  /** Forgets every function whose id is not in `live`. */
  public retain(live: ReadonlySet<number>): void {
    for (const [id, fn] of this.functionsById) {
      if (!live.has(id)) {
        this.functionsById.delete(id);
        this.idsByFunction.delete(fn);
      }
    }
  }
}

export class SmartProxyConfigError extends Error {
  public readonly code = 'ERR_SMARTPROXY_CONFIG';
  /** `routes[2] "api"` or `options`: where the problem is. */
  public readonly path: string;

  constructor(message: string, path: string) {
    super(message);
    this.name = 'SmartProxyConfigError';
    this.path = path;
  }
}

export interface INormalizedOptions {
  config: INativeConfig;
  warnings: string[];
  /** Ids (in the registry passed in) of the functions this config refers to. */
  functionIds: Set<number>;
}

type TRecord = Record<string, unknown>;

/** API.md: tokens are accepted up to 30 s past `exp` and before `nbf` (clock skew). */
const JWT_LEEWAY_SECONDS = 30;

const isRecord = (v: unknown): v is TRecord => typeof v === 'object' && v !== null && !Array.isArray(v);
const show = (v: unknown): string => {
  if (typeof v === 'function') return 'a function';
  // JSON would print NaN and Infinity as null.
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  return JSON.stringify(v) ?? String(v);
};

/** Raises errors for one place (`routes[2] "api"` or `options`), with the field path relative to it. */
class Place {
  constructor(private readonly where: string) {}

  fail(field: string, reason: string): never {
    throw new SmartProxyConfigError(`${this.where}: ${field}: ${reason}`, this.where);
  }

  notYet(field: string, why: string): never {
    this.fail(field, `not supported yet (${why})`);
  }
}

/** Tracks the functions of one normalisation: each gets its registry id, recorded as used. */
class FunctionIds {
  public readonly used = new Set<number>();

  constructor(private readonly registry: FunctionRegistry) {}

  public idOf(fn: TRegisteredFunction): number {
    const id = this.registry.idOf(fn);
    this.used.add(id);
    return id;
  }
}

export function normalizeOptions(options: ISmartProxyOptions, registry: FunctionRegistry = new FunctionRegistry()): INormalizedOptions {
  const functions = new FunctionIds(registry);
  const root: Place = new Place('options');
  if (!isRecord(options)) {
    throw new SmartProxyConfigError(`options: expected an object, got ${show(options)}`, 'options');
  }
  const raw = options as unknown as TRecord;
  if (!Array.isArray(raw.routes)) root.fail('routes', `expected an array of routes, got ${show(raw.routes)}`);
  const warnings: string[] = [];
  // Options of other versions are ignored with a warning; inside routes unknown keys are errors.
  const unknown = keyProblems(raw, OPTIONS_SCHEMA).filter((p) => p.kind === 'unknown').map((p) => p.field);
  if (unknown.length > 0) warnings.push(`unknown options ignored: ${unknown.join(', ')}`);

  const nativeOptions = normalizeEngineOptions(raw, root, warnings);
  const defaults = isRecord(raw.defaults) ? raw.defaults : {};
  if (raw.defaults !== undefined && !isRecord(raw.defaults)) root.fail('defaults', `expected an object, got ${show(raw.defaults)}`);
  if (defaults.preserveSourceIP === true) warnings.push('defaults.preserveSourceIP is not supported yet and is ignored');
  const defaultSecurity = defaults.security === undefined ? {} : defaults.security;
  if (!isRecord(defaultSecurity)) root.fail('defaults.security', `expected an object, got ${show(defaultSecurity)}`);
  const defaultLists = securityLists(defaultSecurity, root, 'defaults.security');
  nativeOptions.defaultSecurity = { ipAllowList: defaultLists.ipAllowList, ipBlockList: defaultLists.ipBlockList };
  const defaultMaxConnections = optionalPositiveInt(defaultSecurity.maxConnections, root, 'defaults.security.maxConnections');

  const acmeContext: IAcmeContext = { global: isRecord(raw.acme) ? raw.acme : {}, customProvisioning: typeof raw.certProvisionFunction === 'function' };
  const routes: INativeRoute[] = [];
  (raw.routes as unknown[]).forEach((route, index) => {
    const normalized = normalizeRoute(route, index, defaults.target, defaultMaxConnections, warnings, functions, acmeContext);
    if (normalized !== null) routes.push(normalized);
  });
  // The kernel counts no connections per client: limits the user set on them apply to relayed
  // traffic only (their defaults are not worth a warning).
  const kernelRoutes = routes.filter((r) => r.action.kernel !== null).map((r) => describe(r.index, r.name ?? undefined));
  const perClient = ['maxConnectionsPerIP', 'connectionRateLimitPerMinute'].filter((key) => raw[key] !== undefined);
  if (kernelRoutes.length > 0 && perClient.length > 0) {
    warnings.push(`${perClient.join(' and ')} ${perClient.length > 1 ? 'do' : 'does'} not apply to kernel-forwarded routes (${kernelRoutes.join(', ')})`);
  }
  return { config: { routes, options: nativeOptions }, warnings, functionIds: functions.used };
}

/**
 * `redis.encryptionKey`: standard base64 (padding optional) of exactly 32 bytes, passed on in its
 * canonical padded form. The key itself never appears in an error message.
 */
function redisEncryptionKey(value: unknown, root: Place): string {
  const expected = 'expected base64 of 32 bytes (AES-256)';
  if (typeof value !== 'string') root.fail('redis.encryptionKey', `${expected}, got ${value === null ? 'null' : `a value of type ${typeof value}`}`);
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(value) || value.length % 4 === 1 || (value.includes('=') && value.length % 4 !== 0)) {
    root.fail('redis.encryptionKey', `${expected}, got a string that is not base64`);
  }
  const bytes = Buffer.from(value, 'base64');
  if (bytes.length !== 32) root.fail('redis.encryptionKey', `${expected}, got ${bytes.length} bytes`);
  return bytes.toString('base64');
}

/** `redis.syncIntervalMs`: an integer from 100 ms to a day; default 5000. */
function redisSyncInterval(value: unknown, root: Place): number {
  if (value === undefined) return 5000;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 100 || value > 86_400_000) {
    root.fail('redis.syncIntervalMs', `expected an integer number of milliseconds from 100 to 86400000, got ${show(value)}`);
  }
  return value;
}

function normalizeEngineOptions(raw: TRecord, root: Place, warnings: string[]): INativeOptions {
  const ms = (key: string, fallback: number): number => {
    const v = raw[key];
    if (v === undefined) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) root.fail(key, `expected a non-negative number, got ${show(v)}`);
    return Math.floor(v);
  };
  const flag = (key: string, fallback: boolean): boolean => {
    const v = raw[key];
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') root.fail(key, `expected true or false, got ${show(v)}`);
    return v;
  };
  // A timeout of 0 would close every connection at once: only positive durations make sense.
  const positiveMs = (key: string, fallback: number): number => {
    const v = raw[key];
    if (v === undefined) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) root.fail(key, `expected a positive number of milliseconds, got ${show(v)}`);
    return Math.max(1, Math.floor(v));
  };
  if (raw.proxyIPs !== undefined && !(Array.isArray(raw.proxyIPs) && raw.proxyIPs.every((x) => typeof x === 'string'))) {
    root.fail('proxyIPs', `expected an array of strings, got ${show(raw.proxyIPs)}`);
  }
  const acceptProxyProtocol = flag('acceptProxyProtocol', false);
  const proxyIps = [...((raw.proxyIPs as string[] | undefined) ?? [])];
  if (acceptProxyProtocol && proxyIps.length === 0) {
    warnings.push('acceptProxyProtocol is set but proxyIPs is empty: no peer is trusted to send a PROXY header');
  }
  const sendProxyProtocol = proxyProtocolVersion(raw.sendProxyProtocol, root, 'sendProxyProtocol') ?? 0;
  const trustForwardedHeaders = flag('trustForwardedHeaders', false);
  if (trustForwardedHeaders && proxyIps.length === 0) {
    warnings.push('trustForwardedHeaders is set but proxyIPs is empty: no client\'s forwarded headers are kept');
  }
  for (const key of ['acme', 'metrics', 'redis', 'admin', 'accessLog'] as const) {
    if (raw[key] !== undefined && !isRecord(raw[key])) root.fail(key, `expected an object, got ${show(raw[key])}`);
  }
  if (raw.logger !== undefined && typeof raw.logger !== 'function') root.fail('logger', `expected a function, got ${show(raw.logger)}`);
  if (raw.certProvisionFunction !== undefined && typeof raw.certProvisionFunction !== 'function') {
    root.fail('certProvisionFunction', `expected a function, got ${show(raw.certProvisionFunction)}`);
  }
  flag('certProvisionFallbackToAcme', true);
  let redis: INativeOptions['redis'] = null;
  if (raw.redis !== undefined) {
    const r = raw.redis as TRecord;
    if (typeof r.url !== 'string' || !/^rediss?:\/\//.test(r.url)) root.fail('redis.url', `expected a redis:// or rediss:// URL, got ${show(r.url)}`);
    if (r.keyPrefix !== undefined && typeof r.keyPrefix !== 'string') root.fail('redis.keyPrefix', `expected a string, got ${show(r.keyPrefix)}`);
    redis = {
      url: r.url,
      keyPrefix: (r.keyPrefix as string | undefined) ?? 'smartproxy:',
      encryptionKey: r.encryptionKey === undefined ? null : redisEncryptionKey(r.encryptionKey, root),
      syncIntervalMs: redisSyncInterval(r.syncIntervalMs, root),
    };
  }
  /** An operator listener's address: `port` (required) and `host` (default loopback). */
  const listenerAddress = (field: string, value: TRecord): { port: number; host: string } => {
    const { port, host = '127.0.0.1' } = value;
    if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
      root.fail(`${field}.port`, `expected a port number (1-65535), got ${show(port)}`);
    }
    if (typeof host !== 'string' || host.length === 0) root.fail(`${field}.host`, `expected a host name or address, got ${show(host)}`);
    return { port, host };
  };
  let prometheus: INativeOptions['prometheus'] = null;
  const prometheusRaw = isRecord(raw.metrics) ? raw.metrics.prometheus : undefined;
  if (prometheusRaw !== undefined) {
    if (!isRecord(prometheusRaw)) root.fail('metrics.prometheus', `expected an object, got ${show(prometheusRaw)}`);
    const { path = '/metrics' } = prometheusRaw;
    if (typeof path !== 'string' || !path.startsWith('/') || /[\s?#]/.test(path)) {
      root.fail('metrics.prometheus.path', `expected a path beginning with '/' (no spaces, query or fragment), got ${show(path)}`);
    }
    prometheus = { ...listenerAddress('metrics.prometheus', prometheusRaw), path };
  }
  let admin: INativeOptions['admin'] = null;
  if (isRecord(raw.admin)) {
    const { token } = raw.admin;
    if (token !== undefined && (typeof token !== 'string' || token.length === 0 || /[\s]/.test(token))) {
      root.fail('admin.token', `expected a non-empty token without spaces, got ${token === undefined ? 'undefined' : typeof token}`);
    }
    admin = { ...listenerAddress('admin', raw.admin), token: token ?? null };
  }
  let accessLog: INativeOptions['accessLog'] = null;
  if (isRecord(raw.accessLog)) {
    const { enabled, path, format = 'json' } = raw.accessLog;
    if (typeof enabled !== 'boolean') root.fail('accessLog.enabled', `expected true or false, got ${show(enabled)}`);
    if (path !== undefined && (typeof path !== 'string' || path.length === 0)) root.fail('accessLog.path', `expected a file path, got ${show(path)}`);
    if (format !== 'json' && format !== 'combined') root.fail('accessLog.format', `expected 'json' or 'combined', got ${show(format)}`);
    if (enabled) accessLog = { path: path ?? null, format };
  }
  let workerThreads: number | null = null;
  if (raw.workerThreads !== undefined) {
    const w = raw.workerThreads;
    if (typeof w !== 'number' || !Number.isInteger(w) || w < 1) root.fail('workerThreads', `expected a positive integer, got ${show(w)}`);
    workerThreads = w;
  }
  return {
    initialDataTimeoutMs: ms('initialDataTimeout', 120000),
    socketTimeoutMs: ms('socketTimeout', 3600000),
    inactivityTimeoutMs: ms('inactivityTimeout', 14400000),
    maxConnectionLifetimeMs: ms('maxConnectionLifetime', 86400000),
    gracefulShutdownTimeoutMs: ms('gracefulShutdownTimeout', 30000),
    maxConnectionsPerIp: ms('maxConnectionsPerIP', 100),
    connectionRateLimitPerMinute: ms('connectionRateLimitPerMinute', 300),
    noDelay: flag('noDelay', true),
    keepAlive: flag('keepAlive', true),
    keepAliveInitialDelayMs: ms('keepAliveInitialDelay', 10000),
    maxPendingDataSize: ms('maxPendingDataSize', 10 * 1024 * 1024),
    workerThreads,
    enableDetailedLogging: flag('enableDetailedLogging', false),
    logger: raw.logger !== undefined,
    maxHeaderSize: ms('maxHeaderSize', 64 * 1024),
    headerTimeoutMs: ms('headerTimeout', 30000),
    http2MaxConcurrentStreams: Math.max(1, ms('http2MaxConcurrentStreams', 256)),
    jsCallTimeoutMs: Math.max(1, ms('jsCallTimeout', 30000)),
    httpKeepAliveTimeoutMs: positiveMs('httpKeepAliveTimeout', 120000),
    trustForwardedHeaders,
    acceptProxyProtocol,
    proxyIps,
    sendProxyProtocol,
    defaultSecurity: { ipAllowList: [], ipBlockList: [] },
    redis,
    prometheus,
    admin,
    accessLog,
  };
}

function normalizeRoute(
  route: unknown,
  index: number,
  defaultTarget: unknown,
  defaultMaxConnections: number | null,
  warnings: string[],
  functions: FunctionIds,
  acme: IAcmeContext,
): INativeRoute | null {
  const bare: Place = new Place(`routes[${index}]`);
  if (!isRecord(route)) bare.fail('.', `expected a route object, got ${show(route)}`);
  const name = route.name;
  if (name !== undefined && typeof name !== 'string') bare.fail('name', `expected a string, got ${show(name)}`);
  const at: Place = new Place(name === undefined ? `routes[${index}]` : `routes[${index}] ${JSON.stringify(name)}`);
  rejectKeyProblems(route, ROUTE_SCHEMA, at, '');
  if (route.enabled === false) return null;
  if (route.id !== undefined && typeof route.id !== 'string') at.fail('id', `expected a string, got ${show(route.id)}`);
  const priority = route.priority ?? 0;
  if (typeof priority !== 'number' || !Number.isFinite(priority)) at.fail('priority', `expected a number, got ${show(priority)}`);
  const headers = headerTemplates(route.headers, at, 'headers');

  const matched = normalizeMatch(route.match, at);
  const action = route.action;
  if (!isRecord(action)) at.fail('action', `expected an object, got ${show(action)}`);
  if (action.type !== 'forward' && action.type !== 'socket-handler') {
    at.fail('action.type', `expected 'forward' or 'socket-handler', got ${show(action.type)}`);
  }
  // `action.http3`, and what a route serving HTTP/3 must be (TLS ending here, TCP transport, forward).
  // Before the UDP checks: a route taking UDP that enables HTTP/3 is told why about HTTP/3 first.
  const http3Check = checkHttp3Route(route.match, action);
  const [http3Problem] = http3Check.problems;
  if (http3Problem !== undefined) at.fail(http3Problem.field, http3Problem.reason);
  // `match.transport` and `action.udp`, and what a route taking UDP cannot have (TLS, domains, ...).
  const udpCheck = checkUdpRoute(route.match, action);
  const [udpProblem] = udpCheck.problems;
  if (udpProblem !== undefined) at.fail(udpProblem.field, udpProblem.reason);
  const match: INativeRoute['match'] = { ...matched, transport: udpCheck.transport ?? 'tcp' };
  const certName = typeof name === 'string' && name !== '' ? name : match.domains[0] ?? `route-${index}`;
  const tls = normalizeTls(action.tls, at, warnings, describe(index, name), { ...acme, certName, domains: match.domains });
  rejectLaterActionFeatures(action, at);
  const kernel = normalizeKernel(route, action, match, tls, at, warnings, describe(index, name));

  let targetList: unknown[];
  let socketHandler: number | null = null;
  let datagramHandler: number | null = null;
  let nativeResponse: INativeResponse | null = null;
  if (action.type === 'socket-handler') {
    // checkUdpRoute has seen to the handlers a route taking UDP needs (a datagramHandler; no
    // socketHandler on a 'udp' route) and to a TCP route having no datagramHandler.
    if (match.transport !== 'udp') {
      const handler = action.socketHandler;
      if (typeof handler !== 'function') {
        at.fail('action.socketHandler', `a 'socket-handler' route needs a socketHandler function, got ${show(handler)}`);
      }
      // Redirects, fixed responses and blocks are HTTP answers the engine writes itself, except
      // where it does not see HTTP (TLS passed through).
      const spec = tls?.mode === 'passthrough' ? undefined : nativeSpecOf(handler);
      if (spec !== undefined) nativeResponse = nativeResponseOf(spec);
      else socketHandler = functions.idOf(handler as TRegisteredFunction);
    }
    if (typeof action.datagramHandler === 'function') datagramHandler = functions.idOf(action.datagramHandler as TRegisteredFunction);
    if (action.targets !== undefined || action.target !== undefined) {
      warnings.push(`${describe(index, name)}: the targets of a 'socket-handler' route are ignored`);
    }
    targetList = [];
  } else if (action.targets !== undefined) {
    if (!Array.isArray(action.targets)) at.fail('action.targets', `expected an array of targets, got ${show(action.targets)}`);
    if (action.target !== undefined) warnings.push(`${describe(index, name)}: both action.targets and action.target are set; action.target is ignored`);
    targetList = action.targets;
  } else if (action.target !== undefined) {
    targetList = [action.target];
  } else if (defaultTarget !== undefined) {
    rejectKeyProblems(defaultTarget, TARGET_SCHEMA, at, 'defaults.target.');
    targetList = [defaultTarget];
  } else {
    at.fail('action.targets', 'a forward route needs at least one target');
  }
  if (targetList.length === 0 && action.type === 'forward') at.fail('action.targets', 'a forward route needs at least one target');
  const field = action.targets !== undefined ? 'action.targets' : action.target !== undefined ? 'action.target' : 'defaults.target';
  const targets = targetList.map((t, i) => normalizeTarget(t, at, field === 'action.targets' ? `${field}[${i}]` : field, functions, warnings, describe(index, name)));
  // `backendProtocol: 'http3'`: QUIC (TLS) to every target, none with a PROXY header of its own.
  const [http3BackendProblem] = checkHttp3Backend(action, defaultTarget).problems;
  if (http3BackendProblem !== undefined) at.fail(http3BackendProblem.field, http3BackendProblem.reason);

  const { security, field: securityField } = pickSecurity(route.security, action.security, at, index, name, warnings);
  const lists = securityLists(security, at, securityField);
  const maxConnections = optionalPositiveInt(security.maxConnections, at, `${securityField}.maxConnections`) ?? defaultMaxConnections;
  const httpSecurity = normalizeHttpSecurity(security, at, securityField);
  const timeouts = isRecord(action.timeouts) ? action.timeouts : {};
  const connectTimeoutMs = optionalPositiveInt(timeouts.connectMs, at, 'action.timeouts.connectMs');
  const responseTimeoutMs = optionalPositiveInt(timeouts.responseMs, at, 'action.timeouts.responseMs');
  const options = isRecord(action.options) ? action.options : {};
  const ws = isRecord(action.websocket) ? action.websocket : {};
  const websocket = ws.enabled !== false;
  const websocketOptions = {
    pingIntervalMs: optionalPositiveInt(ws.pingInterval, at, 'action.websocket.pingInterval'),
    pingTimeoutMs: optionalPositiveInt(ws.pingTimeout, at, 'action.websocket.pingTimeout'),
    maxPayloadSize: optionalPositiveInt(ws.maxPayloadSize, at, 'action.websocket.maxPayloadSize'),
  };
  return {
    index,
    name: name ?? null,
    id: (route.id as string | undefined) ?? null,
    priority,
    match,
    action: {
      tls,
      targets,
      connectTimeoutMs,
      responseTimeoutMs,
      websocket,
      websocketOptions,
      backendProtocol: (options.backendProtocol as INativeRoute['action']['backendProtocol'] | undefined) ?? 'auto',
      raw: options.raw === true,
      retry: normalizeRetry(action.retry, at),
      nativeResponse,
      socketHandler,
      datagramHandler,
      sendProxyProtocol: proxyProtocolVersion(action.sendProxyProtocol, at, 'action.sendProxyProtocol'),
      loadBalancing: normalizeLoadBalancing(action.loadBalancing, at),
      normalizePath: optionalFlag(action.normalizePath, at, 'action.normalizePath') ?? false,
      kernel,
      udp: udpCheck.udp,
      http3: http3Check.http3,
    },
    security: { ...lists, maxConnections, ...httpSecurity },
    headers,
  };
}

/**
 * `forwardingEngine: 'nftables'`: the kernel forwards the route's flows, so the route may ask for
 * nothing the kernel cannot see or do (TLS termination, HTTP facts, per-request security).
 */
function normalizeKernel(
  route: TRecord,
  action: TRecord,
  match: INativeRoute['match'],
  tls: INativeTls | null,
  at: Place,
  warnings: string[],
  where: string,
): INativeKernel | null {
  if (action.forwardingEngine !== 'nftables') {
    if (action.nftables !== undefined) warnings.push(`${where}: action.nftables is ignored without forwardingEngine: 'nftables'`);
    return null;
  }
  const cannot = (field: string, what: string): never => at.fail(field, `kernel forwarding (forwardingEngine: 'nftables') ${what}`);
  if (action.type !== 'forward') cannot('action.type', 'takes forward routes only');
  if (tls !== null && tls.mode !== 'passthrough') cannot('action.tls', 'does not terminate TLS: use passthrough, or the default engine');
  // The original's kernel routes carried domains as names only: the kernel sees ports.
  if (match.domains.length > 0) warnings.push(`${where}: match.domains is not seen by kernel forwarding: every flow to the route's ports is forwarded`);
  if (match.path !== null || match.headers.length > 0) cannot(match.path !== null ? 'match.path' : 'match.headers', 'sees no HTTP requests');
  if (match.clientIp.length > 0) cannot('match.clientIp', 'takes client addresses from security.ipAllowList');
  if (match.tlsVersion.length > 0) cannot('match.tlsVersion', 'sees no TLS handshakes');
  if (action.sendProxyProtocol !== undefined) cannot('action.sendProxyProtocol', 'writes no PROXY header: the backend sees the client itself with preserveSourceIP');
  const security = isRecord(route.security) ? route.security : isRecord(action.security) ? action.security : {};
  for (const key of ['rateLimit', 'basicAuth', 'jwtAuth', 'maxConnections'] as const) {
    if (security[key] !== undefined) cannot(`security.${key}`, `cannot apply ${key}: use action.nftables.maxRate to bound the traffic`);
  }
  const options = action.nftables === undefined ? {} : action.nftables;
  if (!isRecord(options)) return at.fail('action.nftables', `expected an object, got ${show(options)}`);
  const protocol = options.protocol ?? 'tcp';
  if (protocol !== 'tcp' && protocol !== 'udp' && protocol !== 'all') at.fail('action.nftables.protocol', `expected 'tcp', 'udp' or 'all', got ${show(protocol)}`);
  const preserveSourceIp = optionalFlag(options.preserveSourceIP, at, 'action.nftables.preserveSourceIP') ?? false;
  if (options.maxRate !== undefined && typeof options.maxRate !== 'string') at.fail('action.nftables.maxRate', `expected a rate like '10mbps', got ${show(options.maxRate)}`);
  const priority = options.priority ?? 0;
  if (typeof priority !== 'number' || !Number.isInteger(priority)) at.fail('action.nftables.priority', `expected an integer, got ${show(priority)}`);
  return { protocol: protocol as INativeKernel['protocol'], preserveSourceIp, maxRate: (options.maxRate as string | undefined) ?? null, priority: priority as number };
}

function nativeResponseOf(spec: TNativeSocketHandlerSpec): INativeResponse {
  switch (spec.kind) {
    case 'redirect':
      return { kind: 'redirect', location: spec.location, status: spec.status };
    case 'response':
      return { kind: 'response', status: spec.status, headers: Object.entries(spec.headers).map(([name, value]) => ({ name, value })), body: spec.body };
    case 'block':
      return { kind: 'block', status: spec.status, message: spec.message };
  }
}

function describe(index: number, name: unknown): string {
  return typeof name === 'string' ? `routes[${index}] ${JSON.stringify(name)}` : `routes[${index}]`;
}

/** The first key of `value` the schema does not know (or the engine refuses for now) fails. */
function rejectKeyProblems(value: unknown, schema: IObjectSchema, at: Place, prefix: string): void {
  const [problem] = keyProblems(value, schema, prefix);
  if (problem !== undefined) at.fail(problem.field, problem.reason);
}

/** `match` without its transport (checkUdpRoute's). */
function normalizeMatch(match: unknown, at: Place): Omit<INativeRoute['match'], 'transport'> {
  if (!isRecord(match)) at.fail('match', `expected an object with ports, got ${show(match)}`);
  if (match.ports === undefined) at.fail('match.ports', 'required');
  const ports = normalizePorts(match.ports, at, 'match.ports');
  const domains = match.domains === undefined ? [] : stringList(match.domains, at, 'match.domains', true);
  const clientIp = match.clientIp === undefined ? [] : stringList(match.clientIp, at, 'match.clientIp', false);
  const tlsVersion = match.tlsVersion === undefined ? [] : stringList(match.tlsVersion, at, 'match.tlsVersion', false);
  tlsVersion.forEach((v, i) => {
    if (!TLS_VERSIONS.includes(v)) at.fail(`match.tlsVersion[${i}]`, `${show(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
  });
  const path = optionalPath(match.path, at, 'match.path');
  const headers = headerMatches(match.headers, at, 'match.headers');
  return { ports, domains, clientIp, tlsVersion, path, headers };
}

function normalizePorts(spec: unknown, at: Place, field: string): number[] {
  const items = Array.isArray(spec) ? spec : [spec];
  if (items.length === 0) at.fail(field, 'at least one port is required');
  items.forEach((item, i) => {
    const itemField = Array.isArray(spec) ? `${field}[${i}]` : field;
    if (isRecord(item)) {
      if (!isValidPortNumber(item.from)) at.fail(`${itemField}.from`, `${show(item.from)} is not a valid port`);
      if (!isValidPortNumber(item.to)) at.fail(`${itemField}.to`, `${show(item.to)} is not a valid port`);
      if (item.from > item.to) at.fail(itemField, `range from ${item.from} to ${item.to} is empty (from > to)`);
    } else if (!isValidPortNumber(item)) {
      at.fail(itemField, `${show(item)} is not a valid port`);
    }
  });
  return expandPortRange(items as Array<number | { from: number; to: number }>);
}

function stringList(value: unknown, at: Place, field: string, allowSingle: boolean): string[] {
  const items = allowSingle && typeof value === 'string' ? [value] : value;
  if (!Array.isArray(items)) at.fail(field, `expected ${allowSingle ? 'a string or ' : ''}an array of strings, got ${show(value)}`);
  items.forEach((item, i) => {
    if (typeof item !== 'string' || item.length === 0) at.fail(`${field}[${i}]`, `expected a non-empty string, got ${show(item)}`);
  });
  return [...(items as string[])];
}

/** What an 'auto' certificate needs beyond the route's own tls block. */
interface IAcmeContext {
  /** The global `acme` options. */
  global: TRecord;
  /** `certProvisionFunction` is set. */
  customProvisioning: boolean;
}

const LETS_ENCRYPT_PRODUCTION = 'https://acme-v02.api.letsencrypt.org/directory';
const LETS_ENCRYPT_STAGING = 'https://acme-staging-v02.api.letsencrypt.org/directory';

/** The global `acme` options merged with the route's `tls.acme` (the route wins), with defaults. */
function acmeSettings(routeAcme: unknown, context: IAcmeContext & { certName: string; domains: string[] }, at: Place): INativeAcme {
  if (routeAcme !== undefined && !isRecord(routeAcme)) at.fail('action.tls.acme', `expected an object, got ${show(routeAcme)}`);
  const own = (routeAcme ?? {}) as TRecord;
  const pick = (...keys: string[]): unknown => {
    for (const source of [own, context.global]) {
      for (const key of keys) if (source[key] !== undefined) return source[key];
    }
    return undefined;
  };
  const text = (value: unknown, field: string): string | null => {
    if (value === undefined) return null;
    if (typeof value !== 'string' || value === '') at.fail(field, `expected a non-empty string, got ${show(value)}`);
    return value;
  };
  const positive = (value: unknown, field: string, fallback: number): number => {
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) at.fail(field, `expected a positive number, got ${show(value)}`);
    return value;
  };
  const email = text(pick('email', 'accountEmail'), 'acme.email');
  if (email === null) at.fail('action.tls.certificate', `'auto' needs an ACME account email: set acme.email (or the route's tls.acme.email)`);
  const domains = context.domains.filter((d) => !d.includes('*')).map((d) => d.toLowerCase().replace(/\.$/, ''));
  if (domains.length === 0) {
    at.fail('action.tls.certificate', `'auto' needs match.domains with at least one name without wildcards (HTTP-01 cannot validate wildcards)`);
  }
  const port = pick('challengePort', 'port') ?? 80;
  if (!isValidPortNumber(port)) at.fail('acme.port', `expected a port number, got ${show(port)}`);
  const production = pick('useProduction') === true || pick('environment') === 'production';
  const autoRenew = pick('autoRenew');
  if (autoRenew !== undefined && typeof autoRenew !== 'boolean') at.fail('acme.autoRenew', `expected true or false, got ${show(autoRenew)}`);
  return {
    certName: context.certName,
    domains: [...new Set(domains)],
    email,
    directoryUrl: text(pick('directoryUrl'), 'acme.directoryUrl') ?? (production ? LETS_ENCRYPT_PRODUCTION : LETS_ENCRYPT_STAGING),
    directoryCaFile: text(pick('directoryCaFile'), 'acme.directoryCaFile'),
    certificateStore: pathResolve(text(pick('certificateStore'), 'acme.certificateStore') ?? './certs'),
    port: port as number,
    renewThresholdDays: Math.ceil(positive(pick('renewBeforeDays', 'renewThresholdDays'), 'acme.renewThresholdDays', 30)),
    autoRenew: autoRenew !== false,
    renewCheckIntervalSecs: Math.ceil(positive(pick('renewCheckIntervalHours'), 'acme.renewCheckIntervalHours', 24) * 3600),
    customProvisioning: context.customProvisioning,
  };
}

function normalizeTls(tls: unknown, at: Place, warnings: string[], who: string, acme: IAcmeContext & { certName: string; domains: string[] }): INativeTls | null {
  if (tls === undefined || tls === null) return null;
  if (!isRecord(tls)) at.fail('action.tls', `expected an object, got ${show(tls)}`);
  const mode = tls.mode as INativeTls['mode'];
  if (!TLS_MODES.includes(mode)) at.fail('action.tls.mode', `expected one of ${TLS_MODES.join(', ')}, got ${show(tls.mode)}`);
  const versions = tls.versions === undefined ? [] : stringList(tls.versions, at, 'action.tls.versions', false);
  versions.forEach((v, i) => {
    if (!TLS_VERSIONS.includes(v)) at.fail(`action.tls.versions[${i}]`, `${show(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
  });
  if (tls.rejectUnauthorized !== undefined && typeof tls.rejectUnauthorized !== 'boolean') {
    at.fail('action.tls.rejectUnauthorized', `expected true or false, got ${show(tls.rejectUnauthorized)}`);
  }
  const rejectUnauthorized = tls.rejectUnauthorized !== false;
  if (mode === 'passthrough') {
    const ignored = ['certificate', 'acme', 'versions'].filter((k) => tls[k] !== undefined);
    if (ignored.length > 0) warnings.push(`${who}: action.tls.${ignored.join(', ')} ignored: a passthrough route does not terminate TLS`);
    return { mode, certificate: null, versions: [], rejectUnauthorized, acme: null };
  }
  if (tls.certificate === 'auto') {
    return { mode, certificate: null, versions, rejectUnauthorized, acme: acmeSettings(tls.acme, acme, at) };
  }
  if (tls.acme !== undefined) warnings.push(`${who}: action.tls.acme ignored: the route has its own certificate`);
  if (tls.certificate === undefined) at.fail('action.tls.certificate', `a '${mode}' route needs a certificate { key, cert } (PEM)`);
  const cert = tls.certificate;
  if (!isRecord(cert)) at.fail('action.tls.certificate', `expected 'auto' or { key, cert, ca? } with PEM text, got ${show(cert)}`);
  for (const key of ['key', 'cert'] as const) {
    if (typeof cert[key] !== 'string' || cert[key] === '') at.fail(`action.tls.certificate.${key}`, `expected PEM text, got ${show(cert[key])}`);
  }
  if (cert.ca !== undefined && typeof cert.ca !== 'string') at.fail('action.tls.certificate.ca', `expected PEM text, got ${show(cert.ca)}`);
  return {
    mode,
    certificate: { key: cert.key as string, cert: cert.cert as string, ca: (cert.ca as string | undefined) ?? null },
    versions,
    rejectUnauthorized,
    acme: null,
  };
}

function rejectLaterActionFeatures(action: TRecord, at: Place): void {
  if (action.websocket !== undefined) {
    if (!isRecord(action.websocket)) at.fail('action.websocket', `expected an object, got ${show(action.websocket)}`);
    const ws = action.websocket;
    if (ws.enabled !== undefined && typeof ws.enabled !== 'boolean') at.fail('action.websocket.enabled', `expected true or false, got ${show(ws.enabled)}`);
  }
  if (isRecord(action.options)) {
    const protocol = action.options.backendProtocol;
    if (protocol !== undefined && !BACKEND_PROTOCOLS.includes(protocol as string)) {
      at.fail('action.options.backendProtocol', `expected 'auto', 'http1', 'http2' or 'http3', got ${show(protocol)}`);
    }
    if (action.options.raw !== undefined && typeof action.options.raw !== 'boolean') {
      at.fail('action.options.raw', `expected true or false, got ${show(action.options.raw)}`);
    }
  } else if (action.options !== undefined) {
    at.fail('action.options', `expected an object, got ${show(action.options)}`);
  }
  if (action.timeouts !== undefined) {
    if (!isRecord(action.timeouts)) at.fail('action.timeouts', `expected an object, got ${show(action.timeouts)}`);
  }
}

function normalizeTarget(target: unknown, at: Place, field: string, functions: FunctionIds, warnings: string[], who: string): INativeTarget {
  if (!isRecord(target)) at.fail(field, `expected a target object, got ${show(target)}`);
  const t = target as unknown as IRouteTarget;
  const hostFunction = typeof t.host === 'function' ? functions.idOf(t.host) : null;
  const hosts = hostFunction !== null ? [] : typeof t.host === 'string' ? [t.host] : t.host;
  if (hostFunction === null && (!Array.isArray(hosts) || hosts.length === 0 || hosts.some((h) => typeof h !== 'string' || h.trim() === ''))) {
    at.fail(`${field}.host`, `expected a host name, a non-empty array of them or a function, got ${show(t.host)}`);
  }
  let port: INativeTarget['port'];
  if (typeof t.port === 'function') port = { function: functions.idOf(t.port) };
  else if (t.port === 'preserve' || isValidPortNumber(t.port)) port = t.port;
  else at.fail(`${field}.port`, `${show(t.port)} is not a valid port (or 'preserve', or a function)`);
  let matchPorts: number[] | null = null;
  let matchPath: string | null = null;
  let matchHeaders: INativeHeaderMatch[] = [];
  let matchMethods: string[] | null = null;
  if (t.match !== undefined) {
    if (!isRecord(t.match)) at.fail(`${field}.match`, `expected an object, got ${show(t.match)}`);
    if (t.match.ports !== undefined) {
      if (!Array.isArray(t.match.ports)) at.fail(`${field}.match.ports`, `expected an array of ports, got ${show(t.match.ports)}`);
      matchPorts = normalizePorts(t.match.ports, at, `${field}.match.ports`);
    }
    matchPath = optionalPath(t.match.path, at, `${field}.match.path`);
    matchHeaders = headerMatches(t.match.headers, at, `${field}.match.headers`);
    if (t.match.method !== undefined) {
      matchMethods = stringList(t.match.method, at, `${field}.match.method`, false).map((m) => m.toUpperCase());
    }
  }
  const priority = t.priority ?? 0;
  if (typeof priority !== 'number' || !Number.isFinite(priority)) at.fail(`${field}.priority`, `expected a number, got ${show(priority)}`);
  const weight = t.weight ?? 1;
  if (typeof weight !== 'number' || !Number.isInteger(weight) || weight < 1 || weight > 1000) {
    at.fail(`${field}.weight`, `expected an integer from 1 to 1000, got ${show(t.weight)}`);
  }
  const headers = headerTemplates(t.headers, at, `${field}.headers`);
  return {
    hosts: [...(hosts as string[])],
    hostFunction,
    port,
    matchPorts,
    matchPath,
    matchHeaders,
    matchMethods,
    priority,
    headers,
    weight,
    tls: targetTls(t.tls, at, `${field}.tls`, warnings, who),
    sendProxyProtocol: proxyProtocolVersion(t.sendProxyProtocol, at, `${field}.sendProxyProtocol`),
  };
}

/**
 * A target's `tls`: how the proxy connects to that target, replacing the route's settings whole
 * (what it leaves out takes the defaults, not the route's). The client-facing TLS stays the
 * route's, so only the mode, `certificate.ca`, `versions` and `rejectUnauthorized` mean anything.
 */
function targetTls(tls: unknown, at: Place, field: string, warnings: string[], who: string): INativeTargetTls | null {
  if (tls === undefined) return null;
  if (!isRecord(tls)) at.fail(field, `expected an object with a mode, got ${show(tls)}`);
  const mode = tls.mode;
  if (mode === 'passthrough') {
    at.fail(`${field}.mode`, `a target cannot pass TLS through: the route decides what reaches its targets; use 'terminate-and-reencrypt' (TLS to this target) or 'terminate' (plain)`);
  }
  if (mode !== 'terminate' && mode !== 'terminate-and-reencrypt') {
    at.fail(`${field}.mode`, `expected 'terminate' or 'terminate-and-reencrypt', got ${show(mode)}`);
  }
  if (tls.certificate === 'auto') at.fail(`${field}.certificate`, `a target obtains no certificate: the route's certificate is the one clients see`);
  if (tls.certificate !== undefined && !isRecord(tls.certificate)) at.fail(`${field}.certificate`, `expected { ca } with PEM text, got ${show(tls.certificate)}`);
  const cert = (tls.certificate ?? {}) as TRecord;
  if (cert.ca !== undefined && typeof cert.ca !== 'string') at.fail(`${field}.certificate.ca`, `expected PEM text, got ${show(cert.ca)}`);
  const versions = tls.versions === undefined ? [] : stringList(tls.versions, at, `${field}.versions`, false);
  versions.forEach((v, i) => {
    if (!TLS_VERSIONS.includes(v)) at.fail(`${field}.versions[${i}]`, `${show(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
  });
  if (tls.rejectUnauthorized !== undefined && typeof tls.rejectUnauthorized !== 'boolean') {
    at.fail(`${field}.rejectUnauthorized`, `expected true or false, got ${show(tls.rejectUnauthorized)}`);
  }
  const ignored = mode === 'terminate'
    ? ['certificate', 'acme', 'versions', 'rejectUnauthorized'].filter((k) => tls[k] !== undefined)
    : [...(cert.key !== undefined || cert.cert !== undefined ? ['certificate.key/cert'] : []), ...(tls.acme !== undefined ? ['acme'] : [])];
  if (ignored.length > 0) {
    const why = mode === 'terminate' ? `'terminate' speaks plain HTTP to this target` : 'the proxy presents no certificate to a target';
    warnings.push(`${who}: ${field}.${ignored.join(', ')} ignored: ${why}`);
  }
  return { mode, ca: (cert.ca as string | undefined) ?? null, versions, rejectUnauthorized: tls.rejectUnauthorized !== false };
}

/** `action.loadBalancing`: the algorithm (default round-robin) and the active health check. */
function normalizeLoadBalancing(lb: unknown, at: Place): INativeLoadBalancing {
  if (lb === undefined) return { algorithm: 'round-robin', healthCheck: null, affinity: null };
  if (!isRecord(lb)) at.fail('action.loadBalancing', `expected an object, got ${show(lb)}`);
  const algorithm = (lb.algorithm ?? 'round-robin') as INativeLoadBalancing['algorithm'];
  if (!LB_ALGORITHMS.includes(algorithm)) at.fail('action.loadBalancing.algorithm', `expected one of ${LB_ALGORITHMS.join(', ')}, got ${show(lb.algorithm)}`);
  const affinity = normalizeAffinity(lb.affinity, at);
  if (lb.healthCheck === undefined) return { algorithm, healthCheck: null, affinity };
  const check = lb.healthCheck;
  if (!isRecord(check)) at.fail('action.loadBalancing.healthCheck', `expected an object, got ${show(check)}`);
  const count = (key: string, fallback: number): number => {
    const v = check[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) at.fail(`action.loadBalancing.healthCheck.${key}`, `expected a positive integer, got ${show(check[key])}`);
    return v;
  };
  const path = check.path ?? '/';
  if (typeof path !== 'string' || !path.startsWith('/')) at.fail('action.loadBalancing.healthCheck.path', `expected a path starting with '/', got ${show(check.path)}`);
  return {
    algorithm,
    healthCheck: {
      path,
      intervalMs: count('interval', 10000),
      timeoutMs: count('timeout', 5000),
      unhealthyThreshold: count('unhealthyThreshold', 3),
      healthyThreshold: count('healthyThreshold', 2),
    },
    affinity,
  };
}

/** `loadBalancing.affinity`: `{ key: 'ip' | 'header:NAME' | 'cookie:NAME', ttlSeconds = 3600, onUnknown = 'assign' }`. */
function normalizeAffinity(affinity: unknown, at: Place): INativeLoadBalancing['affinity'] {
  if (affinity === undefined) return null;
  if (!isRecord(affinity)) at.fail('action.loadBalancing.affinity', `expected an object, got ${show(affinity)}`);
  const key = affinity.key;
  if (typeof key !== 'string' || !AFFINITY_KEY.test(key)) {
    at.fail('action.loadBalancing.affinity.key', `expected 'ip', 'header:NAME' or 'cookie:NAME', got ${show(key)}`);
  }
  const ttl = affinity.ttlSeconds ?? 3600;
  if (typeof ttl !== 'number' || !Number.isInteger(ttl) || ttl < 1) at.fail('action.loadBalancing.affinity.ttlSeconds', `expected a positive integer, got ${show(affinity.ttlSeconds)}`);
  const onUnknown = affinity.onUnknown ?? 'assign';
  if (onUnknown !== 'assign' && onUnknown !== 'reject') at.fail('action.loadBalancing.affinity.onUnknown', `expected 'assign' or 'reject', got ${show(affinity.onUnknown)}`);
  return { key, ttlSeconds: ttl, rejectUnknown: onUnknown === 'reject', maxKeys: maxKeys(affinity.maxKeys, at, 'action.loadBalancing.affinity.maxKeys') };
}

/** The route's security settings and the field they came from (`security` or `action.security`). */
function pickSecurity(
  routeLevel: unknown,
  actionLevel: unknown,
  at: Place,
  index: number,
  name: unknown,
  warnings: string[],
): { security: TRecord & IRouteSecurity; field: string } {
  if (routeLevel !== undefined && actionLevel !== undefined) {
    warnings.push(`${describe(index, name)}: both security and action.security are set; action.security is ignored`);
  }
  const chosen = routeLevel ?? actionLevel ?? {};
  const field = routeLevel !== undefined ? 'security' : 'action.security';
  if (!isRecord(chosen)) at.fail(field, `expected an object, got ${show(chosen)}`);
  return { security: chosen as TRecord & IRouteSecurity, field };
}

/** `rateLimit`, `basicAuth`, `jwtAuth` (each null when absent or `enabled: false`) and `forwardAuthorization`. */
function normalizeHttpSecurity(
  security: TRecord,
  at: Place,
  field: string,
): Pick<INativeRoute['security'], 'rateLimit' | 'basicAuth' | 'jwtAuth' | 'forwardAuthorization'> {
  const section = (key: string): TRecord | null => {
    const value = security[key];
    if (value === undefined) return null;
    if (!isRecord(value)) at.fail(`${field}.${key}`, `expected an object, got ${show(value)}`);
    if (value.enabled !== undefined && typeof value.enabled !== 'boolean') at.fail(`${field}.${key}.enabled`, `expected true or false, got ${show(value.enabled)}`);
    return value.enabled === false ? null : value;
  };
  const text = (value: unknown, name: string, fallback?: string): string => {
    if (value === undefined && fallback !== undefined) return fallback;
    if (typeof value !== 'string' || value === '') at.fail(name, `expected a non-empty string, got ${show(value)}`);
    return value;
  };
  const optionalText = (value: unknown, name: string): string | null => (value === undefined ? null : text(value, name));
  const paths = (value: unknown, name: string): string[] => {
    const list = value === undefined ? [] : stringList(value, at, name, false);
    return list.map((p, i) => optionalPath(p, at, `${name}[${i}]`) as string);
  };

  const rate = section('rateLimit');
  let rateLimit: INativeRateLimit | null = null;
  if (rate !== null) {
    const f = `${field}.rateLimit`;
    const maxRequests = optionalPositiveInt(rate.maxRequests, at, `${f}.maxRequests`);
    if (maxRequests === null) at.fail(`${f}.maxRequests`, 'required');
    const window = rate.window;
    if (typeof window !== 'number' || !Number.isFinite(window) || window <= 0) at.fail(`${f}.window`, `expected a positive number of seconds, got ${show(window)}`);
    const keyBy = (rate.keyBy ?? 'ip') as INativeRateLimit['keyBy'];
    if (!RATE_LIMIT_KEYS_BY.includes(keyBy)) at.fail(`${f}.keyBy`, `expected 'ip', 'path' or 'header', got ${show(rate.keyBy)}`);
    const headerName = keyBy === 'header' ? text(rate.headerName, `${f}.headerName`) : optionalText(rate.headerName, `${f}.headerName`);
    rateLimit = {
      maxRequests,
      windowSeconds: Math.ceil(window),
      keyBy,
      headerName,
      errorMessage: text(rate.errorMessage, `${f}.errorMessage`, 'Too Many Requests'),
      maxKeys: maxKeys(rate.maxKeys, at, `${f}.maxKeys`),
    };
  }

  const basic = section('basicAuth');
  let basicAuth: INativeBasicAuth | null = null;
  if (basic !== null) {
    const f = `${field}.basicAuth`;
    if (!Array.isArray(basic.users)) at.fail(`${f}.users`, `expected an array of { username, password }, got ${show(basic.users)}`);
    const users = (basic.users as unknown[]).map((user, i) => {
      if (!isRecord(user)) at.fail(`${f}.users[${i}]`, `expected { username, password }, got ${show(user)}`);
      const username = text(user.username, `${f}.users[${i}].username`);
      if (username.includes(':')) at.fail(`${f}.users[${i}].username`, `may not contain ':'`);
      if (typeof user.password !== 'string') at.fail(`${f}.users[${i}].password`, `expected a string, got ${show(user.password)}`);
      return { username, password: user.password };
    });
    basicAuth = { users, realm: text(basic.realm, `${f}.realm`, 'Restricted'), excludePaths: paths(basic.excludePaths, `${f}.excludePaths`) };
  }

  const jwt = section('jwtAuth');
  let jwtAuth: INativeJwtAuth | null = null;
  if (jwt !== null) {
    const f = `${field}.jwtAuth`;
    jwtAuth = {
      secret: text(jwt.secret, `${f}.secret`),
      algorithm: text(jwt.algorithm, `${f}.algorithm`, 'HS256'),
      issuer: optionalText(jwt.issuer, `${f}.issuer`),
      audience: optionalText(jwt.audience, `${f}.audience`),
      excludePaths: paths(jwt.excludePaths, `${f}.excludePaths`),
      leewaySeconds: JWT_LEEWAY_SECONDS,
      requireExp: optionalFlag(jwt.requireExp, at, `${f}.requireExp`) ?? true,
    };
  }

  const forward = security.forwardAuthorization;
  if (forward !== undefined && typeof forward !== 'boolean') at.fail(`${field}.forwardAuthorization`, `expected true or false, got ${show(forward)}`);
  return { rateLimit, basicAuth, jwtAuth, forwardAuthorization: forward === true };
}

/** `true`/`1` → 1, `2` → 2, `false` → 0 (none), absent → null (inherit). */
function proxyProtocolVersion(value: unknown, at: Place, field: string): number | null {
  if (value === undefined) return null;
  if (value === false) return 0;
  if (value === true || value === 1) return 1;
  if (value === 2) return 2;
  return at.fail(field, `expected true, false, 1 or 2, got ${show(value)}`);
}

function securityLists(security: TRecord, at: Place, field: string): { ipAllowList: string[]; ipBlockList: string[] } {
  return {
    ipAllowList: security.ipAllowList === undefined ? [] : stringList(security.ipAllowList, at, `${field}.ipAllowList`, false),
    ipBlockList: security.ipBlockList === undefined ? [] : stringList(security.ipBlockList, at, `${field}.ipBlockList`, false),
  };
}

function optionalFlag(value: unknown, at: Place, field: string): boolean | null {
  if (value === undefined) return null;
  if (typeof value !== 'boolean') at.fail(field, `expected true or false, got ${show(value)}`);
  return value;
}

/** `maxKeys` (affinity, rate limit): a count of entries, so an integer the engine can hold. */
function maxKeys(value: unknown, at: Place, field: string): number {
  if (value === undefined) return DEFAULT_MAX_KEYS;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) at.fail(field, `expected a positive integer, got ${show(value)}`);
  return value;
}

function optionalPositiveInt(value: unknown, at: Place, field: string): number | null {
  if (value === undefined) return null;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) at.fail(field, `expected a positive integer, got ${show(value)}`);
  return value;
}

function optionalPath(value: unknown, at: Place, field: string): string | null {
  if (value === undefined) return null;
  if (typeof value !== 'string' || !(value.startsWith('/') || value === '*')) {
    at.fail(field, `expected a path pattern starting with '/', got ${show(value)}`);
  }
  return value;
}

/** `{ 'X-Api': 'v2', 'X-Version': /^v2/i }` → exact values and RegExps (`source`, `flags`) for the engine. */
function headerMatches(value: unknown, at: Place, field: string): INativeHeaderMatch[] {
  if (value === undefined) return [];
  if (!isRecord(value)) at.fail(field, `expected an object of header names to values, got ${show(value)}`);
  return Object.entries(value).map(([name, v]) => {
    if (v instanceof RegExp) {
      const problem = headerRegExpProblem(v);
      if (problem !== undefined) at.fail(`${field}.${name}`, problem);
      return nativeHeaderMatch(name, v);
    }
    if (typeof v !== 'string') at.fail(`${field}.${name}`, `expected a string or a RegExp, got ${show(v)}`);
    return nativeHeaderMatch(name, v);
  });
}

function headerTemplates(value: unknown, at: Place, field: string): INativeHeaderTemplates {
  if (value === undefined) return { request: [], response: [] };
  if (!isRecord(value)) at.fail(field, `expected { request?, response? }, got ${show(value)}`);
  const list = (kind: 'request' | 'response'): INativeNameValue[] => {
    const items = value[kind];
    if (items === undefined) return [];
    if (!isRecord(items)) at.fail(`${field}.${kind}`, `expected an object of header names to values, got ${show(items)}`);
    return Object.entries(items).map(([name, v]) => {
      if (typeof v !== 'string') at.fail(`${field}.${kind}.${name}`, `expected a string, got ${show(v)}`);
      return { name, value: v };
    });
  };
  return { request: list('request'), response: list('response') };
}

/** `action.retry` with its defaults: 2 retries on connect failure, 100 ms base backoff. */
function normalizeRetry(value: unknown, at: Place): INativeRetry | null {
  if (value === undefined) return null;
  if (!isRecord(value)) at.fail('action.retry', `expected an object, got ${show(value)}`);
  const flag = (key: string, fallback: boolean): boolean => {
    const v = value[key];
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') at.fail(`action.retry.${key}`, `expected true or false, got ${show(v)}`);
    return v;
  };
  const count = (key: string, fallback: number): number => {
    const v = value[key];
    if (v === undefined) return fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) at.fail(`action.retry.${key}`, `expected a non-negative integer, got ${show(v)}`);
    return v;
  };
  return {
    maxRetries: count('maxRetries', 2),
    onConnectFailure: flag('onConnectFailure', true),
    on5xx: flag('on5xx', false),
    onTimeout: flag('onTimeout', false),
    backoffMs: count('backoffMs', 100),
  };
}
