// Route helpers (API.md "Helpers"): pure functions that build IRouteConfig objects. They never
// mutate their inputs and return fresh objects: plain objects and arrays are deep-copied, while
// functions (socket handlers, host/port functions) are kept by reference.
import type {
  IRouteAction,
  IRouteConfig,
  IRouteContext,
  IRouteHttp3,
  IRouteMatch,
  IRouteSecurity,
  IRouteTarget,
  IRouteTls,
  IRouteUdp,
  TDatagramHandler,
  TPortRange,
  TSocketHandler,
} from '../models/route-types.js';
import { SocketHandlers } from './socket-handlers.js';
import { ACTION_SCHEMA, objectFields } from '../models/option-schema.js';

/** One domain or several (`'*.example.com'`, `['a.com', 'b.com']`). */
export type TDomains = string | string[];

/** What the helpers forward to: `{ host, port }`, optionally with the other target fields. */
export type THelperTarget = IRouteTarget;

/** A certificate for the TLS helpers: `'auto'` (ACME) or PEM text. */
export type THelperCertificate = 'auto' | { key: string; cert: string; ca?: string };

/**
 * What `options` of the helpers (and `mergeRouteConfigs`) may override: any route field, with
 * `match` and `action` partial, since they are merged field by field into the helper's result.
 */
export type TRouteOverrides = Omit<Partial<IRouteConfig>, 'match' | 'action'> & {
  match?: Partial<IRouteMatch>;
  action?: Partial<IRouteAction>;
};

export interface IHttpsTerminateRouteOptions extends TRouteOverrides {
  certificate?: THelperCertificate;
  /** `terminate-and-reencrypt` instead of `terminate`. */
  reencrypt?: boolean;
  /** Default 443. */
  httpsPort?: number;
  /** Used by createCompleteHttpsServer (the redirect's port, default 80); ignored by createHttpsTerminateRoute. */
  httpPort?: number;
  /**
   * (ext) HTTP/3 on the same port (UDP) beside HTTP/1.1 and HTTP/2: `action.http3` (`true` is
   * `{ enabled: true }`, with the default `altSvcMaxAge`; `false` sets `{ enabled: false }`).
   */
  http3?: boolean | IRouteHttp3;
}

export type ICompleteHttpsServerOptions = IHttpsTerminateRouteOptions;

export interface IApiRouteOptions extends TRouteOverrides {
  /** Terminate TLS (port `httpsPort`, 443) instead of plain HTTP (port `httpPort`, 80). */
  useTls?: boolean;
  certificate?: THelperCertificate;
  /** Adds permissive CORS response headers. */
  addCorsHeaders?: boolean;
  httpPort?: number;
  httpsPort?: number;
}

export interface IWebSocketRouteOptions extends TRouteOverrides {
  useTls?: boolean;
  certificate?: THelperCertificate;
  pingInterval?: number;
  pingTimeout?: number;
  httpPort?: number;
  httpsPort?: number;
}

export interface ISocketHandlerRouteOptions extends TRouteOverrides {
  /** `match.path` of the route. */
  path?: string;
}

export interface IPortMappingRouteOptions extends TRouteOverrides {
  sourcePortRange: TPortRange;
  targetHost: IRouteTarget['host'];
  portMapper: (context: IRouteContext) => number | Promise<number>;
  domains?: TDomains;
}

export interface IOffsetPortMappingRouteOptions extends TRouteOverrides {
  ports: TPortRange;
  targetHost: IRouteTarget['host'];
  /** Port P is forwarded to P + offset. */
  offset: number;
  domains?: TDomains;
}

export interface IDynamicRouteOptions extends TRouteOverrides {
  ports: TPortRange;
  targetHost: (context: IRouteContext) => string | string[] | Promise<string | string[]>;
  portMapper: (context: IRouteContext) => number | Promise<number>;
  domains?: TDomains;
  path?: string;
  clientIp?: string[];
}

/** `action.udp` settings (set only those given), and any route field to override. */
export interface IUdpForwardRouteOptions extends IRouteUdp, TRouteOverrides {}

export interface IUdpHandlerRouteOptions extends IRouteUdp, TRouteOverrides {}

export interface INfTablesRouteOptions {
  /** Default 80 (443 for the terminate variant). */
  ports?: TPortRange;
  protocol?: 'tcp' | 'udp' | 'all';
  preserveSourceIP?: boolean;
  ipAllowList?: string[];
  ipBlockList?: string[];
  maxRate?: string;
  /** The nftables rule priority (`action.nftables.priority`). */
  priority?: number;
  /** Pass TLS through (`action.tls.mode: 'passthrough'`). */
  useTls?: boolean;
}

export interface INfTablesTerminateRouteOptions extends Omit<INfTablesRouteOptions, 'useTls'> {
  certificate?: THelperCertificate;
}

export interface ICompleteNfTablesHttpsServerOptions extends Omit<INfTablesTerminateRouteOptions, 'ports'> {
  httpPort?: number;
  httpsPort?: number;
}

export interface IRateLimitOptions {
  maxRequests: number;
  /** Seconds. */
  window: number;
  keyBy?: 'ip' | 'path' | 'header';
  headerName?: string;
  errorMessage?: string;
  /** (ext) Keys tracked in memory at most (default 100000). */
  maxKeys?: number;
}

export interface IBasicAuthOptions {
  users: Array<{ username: string; password: string }>;
  realm?: string;
  excludePaths?: string[];
}

export interface IJwtAuthOptions {
  secret: string;
  algorithm?: string;
  issuer?: string;
  audience?: string;
  excludePaths?: string[];
  /** (ext) Refuse tokens without `exp` (default true). */
  requireExp?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Copying and merging

type TRecord = Record<string, unknown>;

function isPlainObject(value: unknown): value is TRecord {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false;
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** Deep copy of plain objects, arrays and RegExps; functions and other instances by reference. */
function cloneDeep<T>(value: T): T {
  if (Array.isArray(value)) return value.map((item: unknown) => cloneDeep(item)) as T;
  if (value instanceof RegExp) return new RegExp(value.source, value.flags) as T;
  if (isPlainObject(value)) {
    const out: TRecord = {};
    for (const key of Object.keys(value)) out[key] = cloneDeep(value[key]);
    return out as T;
  }
  return value;
}

/** `{ ...base, ...over }` with `over`'s undefined values skipped and everything copied. */
function mergeFields(base: unknown, over: TRecord): TRecord {
  const out: TRecord = isPlainObject(base) ? cloneDeep(base) : {};
  for (const [key, value] of Object.entries(over)) {
    if (value !== undefined) out[key] = cloneDeep(value);
  }
  return out;
}

/**
 * Action fields that are objects themselves: an override sets their fields one by one. (`target`
 * is among them but never merges: targets given in either form replace the base's first.)
 */
const NESTED_ACTION_FIELDS = new Set(objectFields(ACTION_SCHEMA));

function mergeAction(base: unknown, over: TRecord): TRecord {
  // Another action type is another action: nothing of the old one carries over.
  if (isPlainObject(base) && over.type !== undefined && base.type !== undefined && over.type !== base.type) {
    return mergeFields({}, over);
  }
  const out: TRecord = isPlainObject(base) ? cloneDeep(base) : {};
  // Targets given in either form replace the base's targets in both forms.
  if (over.targets !== undefined || over.target !== undefined) {
    delete out.targets;
    delete out.target;
  }
  for (const [key, value] of Object.entries(over)) {
    if (value === undefined) continue;
    out[key] = NESTED_ACTION_FIELDS.has(key) && isPlainObject(value) && isPlainObject(out[key]) ? mergeFields(out[key], value) : cloneDeep(value);
  }
  return out;
}

/**
 * `base` with `override` applied: `match`, `action` and `security` are merged field by field (an
 * action of another `type` replaces the whole action; targets replace targets), every other field
 * is replaced. Undefined values in `override` are ignored. Neither input is changed.
 */
export function mergeRouteConfigs(base: IRouteConfig, override: TRouteOverrides = {}): IRouteConfig {
  const merged = cloneDeep(base) as unknown as TRecord;
  for (const [key, value] of Object.entries(override)) {
    if (value === undefined) continue;
    if ((key === 'match' || key === 'security') && isPlainObject(value)) merged[key] = mergeFields(merged[key], value);
    else if (key === 'action' && isPlainObject(value)) merged[key] = mergeAction(merged[key], value);
    else merged[key] = cloneDeep(value);
  }
  return merged as unknown as IRouteConfig;
}

// ---------------------------------------------------------------------------------------------
// Small pieces

function describeDomains(domains: TDomains | undefined): string {
  if (domains === undefined) return '*';
  return Array.isArray(domains) ? domains.join(', ') : domains;
}

function describePorts(ports: TPortRange): string {
  return (Array.isArray(ports) ? ports : [ports]).map((p) => (typeof p === 'number' ? String(p) : `${p.from}-${p.to}`)).join(', ');
}

/** `api` → `/api`; `/api/` stays. */
function leadingSlash(path: string): string {
  return path.startsWith('/') ? path : `/${path}`;
}

/** `/api` or `/api/` → `/api/*`. */
function prefixPattern(path: string): string {
  const normalized = leadingSlash(path);
  return normalized.endsWith('/') ? `${normalized}*` : `${normalized}/*`;
}

function copyTarget(target: THelperTarget): IRouteTarget {
  return cloneDeep(target);
}

function matchOf(ports: TPortRange, domains: TDomains | undefined, extra: Partial<IRouteMatch> = {}): IRouteMatch {
  const match: IRouteMatch = { ports: cloneDeep(ports) };
  if (domains !== undefined) match.domains = cloneDeep(domains);
  for (const [key, value] of Object.entries(extra)) {
    if (value !== undefined) (match as unknown as TRecord)[key] = cloneDeep(value);
  }
  return match;
}

function terminateTls(certificate: THelperCertificate | undefined, reencrypt = false): IRouteTls {
  return { mode: reencrypt ? 'terminate-and-reencrypt' : 'terminate', certificate: cloneDeep(certificate ?? 'auto') };
}

const CORS_HEADERS: Readonly<Record<string, string>> = {
  'Access-Control-Allow-Origin': '*',
  'Access-Control-Allow-Methods': 'GET, POST, PUT, DELETE, PATCH, OPTIONS',
  'Access-Control-Allow-Headers': 'Content-Type, Authorization',
  'Access-Control-Max-Age': '86400',
};

// ---------------------------------------------------------------------------------------------
// Helpers

/** Plain HTTP on port 80 to `target`. */
export function createHttpRoute(domains: TDomains, target: THelperTarget, options: TRouteOverrides = {}): IRouteConfig {
  const base: IRouteConfig = {
    name: `HTTP: ${describeDomains(domains)}`,
    match: matchOf(80, domains),
    action: { type: 'forward', targets: [copyTarget(target)] },
  };
  return mergeRouteConfigs(base, options);
}

/**
 * TLS terminated on port 443 (`certificate` defaults to `'auto'`), plain HTTP (or TLS with
 * `reencrypt`) to `target`; with `http3`, HTTP/3 on the same port too (`action.http3`).
 */
export function createHttpsTerminateRoute(domains: TDomains, target: THelperTarget, options: IHttpsTerminateRouteOptions = {}): IRouteConfig {
  const { certificate, reencrypt, httpsPort, httpPort: _redirectPort, http3, ...overrides } = options;
  const base: IRouteConfig = {
    name: `HTTPS: ${describeDomains(domains)}`,
    match: matchOf(httpsPort ?? 443, domains),
    action: { type: 'forward', targets: [copyTarget(target)], tls: terminateTls(certificate, reencrypt) },
  };
  if (http3 !== undefined) base.action.http3 = typeof http3 === 'boolean' ? { enabled: http3 } : cloneDeep(http3);
  return mergeRouteConfigs(base, overrides);
}

/** TLS passed through untouched on port 443, routed by SNI. */
export function createHttpsPassthroughRoute(domains: TDomains, target: THelperTarget, options: TRouteOverrides = {}): IRouteConfig {
  const base: IRouteConfig = {
    name: `HTTPS passthrough: ${describeDomains(domains)}`,
    match: matchOf(443, domains),
    action: { type: 'forward', targets: [copyTarget(target)], tls: { mode: 'passthrough' } },
  };
  return mergeRouteConfigs(base, options);
}

function redirectRoute(domains: TDomains | undefined, httpsPort: number, httpPort: number): IRouteConfig {
  const template = httpsPort === 443 ? 'https://{domain}{path}' : `https://{domain}:${httpsPort}{path}`;
  return {
    name: `HTTP to HTTPS redirect: ${describeDomains(domains)}`,
    match: matchOf(httpPort, domains),
    action: { type: 'socket-handler', socketHandler: SocketHandlers.httpRedirect(template, 301) },
  };
}

/**
 * Port 80 answers every request with `301` to `https://{domain}{path}` (or
 * `https://{domain}:{httpsPort}{path}` when `httpsPort` is not 443), served natively.
 */
export function createHttpToHttpsRedirect(domains: TDomains, httpsPort = 443, options: TRouteOverrides = {}): IRouteConfig {
  return mergeRouteConfigs(redirectRoute(domains, httpsPort, 80), options);
}

/** `[HTTPS terminate route, HTTP-to-HTTPS redirect route]`; other options apply to the HTTPS route. */
export function createCompleteHttpsServer(domains: TDomains, target: THelperTarget, options: ICompleteHttpsServerOptions = {}): IRouteConfig[] {
  const { httpPort, ...httpsOptions } = options;
  return [createHttpsTerminateRoute(domains, target, httpsOptions), redirectRoute(domains, httpsOptions.httpsPort ?? 443, httpPort ?? 80)];
}

/**
 * One route balancing over `backends` (round-robin unless `options.action.loadBalancing` says
 * otherwise). Backends sharing one port become one target with a host list, others one target each.
 * Port 80, or 443 when `options.action.tls` is set. The 19.x form `(domains, hosts, port, options)`
 * is accepted too.
 */
export function createLoadBalancerRoute(domains: TDomains, backends: Array<{ host: string; port: number }>, options?: TRouteOverrides): IRouteConfig;
export function createLoadBalancerRoute(domains: TDomains, hosts: string[], port: number, options?: TRouteOverrides): IRouteConfig;
export function createLoadBalancerRoute(
  domains: TDomains,
  backendsOrHosts: Array<{ host: string; port: number }> | string[],
  portOrOptions?: number | TRouteOverrides,
  legacyOptions?: TRouteOverrides,
): IRouteConfig {
  let backends: Array<{ host: string; port: number }>;
  let options: TRouteOverrides;
  if (typeof portOrOptions === 'number') {
    backends = (backendsOrHosts as unknown[]).map((host) => ({ host: String(host), port: portOrOptions }));
    options = legacyOptions ?? {};
  } else {
    backends = (backendsOrHosts as unknown[]).map((b) =>
      typeof b === 'string' ? { host: b, port: NaN } : { host: (b as { host: string }).host, port: (b as { port: number }).port },
    );
    options = portOrOptions ?? {};
  }
  if (backends.length === 0) throw new TypeError('createLoadBalancerRoute: at least one backend is required');
  const ports = new Set(backends.map((b) => b.port));
  const targets: IRouteTarget[] =
    ports.size === 1 ? [{ host: backends.map((b) => b.host), port: backends[0].port }] : backends.map((b) => ({ host: b.host, port: b.port }));
  const base: IRouteConfig = {
    name: `Load balancer: ${describeDomains(domains)}`,
    match: matchOf(options.action?.tls !== undefined ? 443 : 80, domains),
    action: { type: 'forward', targets, loadBalancing: { algorithm: 'round-robin' } },
  };
  return mergeRouteConfigs(base, options);
}

function apiLikeRoute(kind: string, domains: TDomains, apiPath: string, target: THelperTarget, options: IApiRouteOptions): IRouteConfig {
  const { useTls, certificate, addCorsHeaders, httpPort, httpsPort, ...overrides } = options;
  const pattern = prefixPattern(apiPath);
  const base: IRouteConfig = {
    name: `${kind} ${leadingSlash(apiPath)}: ${describeDomains(domains)}`,
    priority: 100,
    match: matchOf(useTls === true ? (httpsPort ?? 443) : (httpPort ?? 80), domains, { path: pattern }),
    action: { type: 'forward', targets: [copyTarget(target)] },
  };
  if (useTls === true) base.action.tls = terminateTls(certificate);
  if (addCorsHeaders === true) base.headers = { response: { ...CORS_HEADERS } };
  return mergeRouteConfigs(base, overrides);
}

/**
 * Requests under `apiPath` (`/api` → `match.path: '/api/*'`), priority 100, port 80 or with
 * `useTls` 443 (TLS terminated); `addCorsHeaders` adds permissive CORS response headers.
 */
export function createApiRoute(domains: TDomains, apiPath: string, target: THelperTarget, options: IApiRouteOptions = {}): IRouteConfig {
  return apiLikeRoute('API', domains, apiPath, target, options);
}

/** As createApiRoute, named as an API gateway route. */
export function createApiGatewayRoute(domains: TDomains, apiBasePath: string, target: THelperTarget, options: IApiRouteOptions = {}): IRouteConfig {
  return apiLikeRoute('API gateway', domains, apiBasePath, target, options);
}

/** WebSocket upgrades on exactly `wsPath`, priority 100, port 80 or with `useTls` 443. */
export function createWebSocketRoute(domains: TDomains, wsPath: string, target: THelperTarget, options: IWebSocketRouteOptions = {}): IRouteConfig {
  const { useTls, certificate, pingInterval, pingTimeout, httpPort, httpsPort, ...overrides } = options;
  const path = leadingSlash(wsPath);
  const websocket: NonNullable<IRouteAction['websocket']> = { enabled: true };
  if (pingInterval !== undefined) websocket.pingInterval = pingInterval;
  if (pingTimeout !== undefined) websocket.pingTimeout = pingTimeout;
  const base: IRouteConfig = {
    name: `WebSocket ${path}: ${describeDomains(domains)}`,
    priority: 100,
    match: matchOf(useTls === true ? (httpsPort ?? 443) : (httpPort ?? 80), domains, { path }),
    action: { type: 'forward', targets: [copyTarget(target)], websocket },
  };
  if (useTls === true) base.action.tls = terminateTls(certificate);
  return mergeRouteConfigs(base, overrides);
}

/** A `socket-handler` route: `handler` gets every matching connection. */
export function createSocketHandlerRoute(
  domains: TDomains,
  ports: TPortRange,
  handler: TSocketHandler,
  options: ISocketHandlerRouteOptions = {},
): IRouteConfig {
  const { path, ...overrides } = options;
  const base: IRouteConfig = {
    name: `Socket handler: ${describeDomains(domains)}`,
    match: matchOf(ports, domains, { path }),
    action: { type: 'socket-handler', socketHandler: handler },
  };
  return mergeRouteConfigs(base, overrides);
}

/** Forwards each port of `sourcePortRange` to `targetHost` on the port `portMapper` picks. */
export function createPortMappingRoute(options: IPortMappingRouteOptions): IRouteConfig {
  const { sourcePortRange, targetHost, portMapper, domains, ...overrides } = options;
  const base: IRouteConfig = {
    name: `Port mapping: ${describePorts(sourcePortRange)}`,
    match: matchOf(sourcePortRange, domains),
    action: { type: 'forward', targets: [{ host: cloneDeep(targetHost), port: portMapper }] },
  };
  return mergeRouteConfigs(base, overrides);
}

/** Forwards port P of `ports` to `targetHost` port P + `offset`. */
export function createOffsetPortMappingRoute(options: IOffsetPortMappingRouteOptions): IRouteConfig {
  const { ports, targetHost, offset, domains, ...overrides } = options;
  const portMapper = (context: IRouteContext): number => context.port + offset;
  const base: IRouteConfig = {
    name: `Port offset ${offset >= 0 ? '+' : ''}${offset}: ${describePorts(ports)}`,
    match: matchOf(ports, domains),
    action: { type: 'forward', targets: [{ host: cloneDeep(targetHost), port: portMapper }] },
  };
  return mergeRouteConfigs(base, overrides);
}

/** Host and port chosen per connection by functions of the route context. */
export function createDynamicRoute(options: IDynamicRouteOptions): IRouteConfig {
  const { ports, targetHost, portMapper, domains, path, clientIp, ...overrides } = options;
  const base: IRouteConfig = {
    name: `Dynamic route: ${describePorts(ports)}`,
    match: matchOf(ports, domains, { path, clientIp }),
    action: { type: 'forward', targets: [{ host: targetHost, port: portMapper }] },
  };
  return mergeRouteConfigs(base, overrides);
}

/**
 * (ext) UDP datagrams on `ports` relayed to `target` per flow (`match.transport: 'udp'`); the
 * `sessionTimeout`, `maxSessionsPerIP` and `maxDatagramSize` given go to `action.udp` (the engine's
 * defaults otherwise), other options override the route's fields.
 */
export function createUdpForwardRoute(ports: TPortRange, target: THelperTarget, options: IUdpForwardRouteOptions = {}): IRouteConfig {
  const { sessionTimeout, maxSessionsPerIP, maxDatagramSize, ...overrides } = options;
  const udp = definedFields<IRouteUdp>({ sessionTimeout, maxSessionsPerIP, maxDatagramSize });
  const action: IRouteAction = { type: 'forward', targets: [copyTarget(target)] };
  if (Object.keys(udp).length > 0) action.udp = udp;
  const base: IRouteConfig = {
    name: `UDP: ${describePorts(ports)}`,
    match: matchOf(ports, undefined, { transport: 'udp' }),
    action,
  };
  return mergeRouteConfigs(base, overrides);
}

/**
 * (ext) UDP datagrams on `ports` handed to `datagramHandler` (`match.transport: 'udp'`, a
 * `socket-handler` action), which answers through its `reply`; the `sessionTimeout`,
 * `maxSessionsPerIP` and `maxDatagramSize` given go to `action.udp` (the engine's defaults
 * otherwise), other options override the route's fields.
 */
export function createUdpHandlerRoute(ports: TPortRange, datagramHandler: TDatagramHandler, options: IUdpHandlerRouteOptions = {}): IRouteConfig {
  const { sessionTimeout, maxSessionsPerIP, maxDatagramSize, ...overrides } = options;
  const udp = definedFields<IRouteUdp>({ sessionTimeout, maxSessionsPerIP, maxDatagramSize });
  const action: IRouteAction = { type: 'socket-handler', datagramHandler };
  if (Object.keys(udp).length > 0) action.udp = udp;
  const base: IRouteConfig = {
    name: `UDP handler: ${describePorts(ports)}`,
    match: matchOf(ports, undefined, { transport: 'udp' }),
    action,
  };
  return mergeRouteConfigs(base, overrides);
}

/** A name without a dot names the route; anything else (or an array) is the route's domains. */
function nameOrDomainsOf(nameOrDomains: string | string[], kind: string): { name: string; domains: TDomains | undefined } {
  if (Array.isArray(nameOrDomains) || nameOrDomains.includes('.')) {
    return { name: `${kind}: ${describeDomains(nameOrDomains)}`, domains: nameOrDomains };
  }
  return { name: nameOrDomains, domains: undefined };
}

function nfTablesRoute(kind: string, nameOrDomains: string | string[], target: THelperTarget, defaultPort: number, options: INfTablesRouteOptions): IRouteConfig {
  const { name, domains } = nameOrDomainsOf(nameOrDomains, kind);
  const nftables: NonNullable<IRouteAction['nftables']> = { protocol: options.protocol ?? 'tcp' };
  if (options.preserveSourceIP !== undefined) nftables.preserveSourceIP = options.preserveSourceIP;
  if (options.maxRate !== undefined) nftables.maxRate = options.maxRate;
  if (options.priority !== undefined) nftables.priority = options.priority;
  const route: IRouteConfig = {
    name,
    match: matchOf(options.ports ?? defaultPort, domains),
    action: { type: 'forward', targets: [copyTarget(target)], forwardingEngine: 'nftables', nftables },
  };
  if (options.ipAllowList !== undefined || options.ipBlockList !== undefined) {
    const security: IRouteSecurity = {};
    if (options.ipAllowList !== undefined) security.ipAllowList = [...options.ipAllowList];
    if (options.ipBlockList !== undefined) security.ipBlockList = [...options.ipBlockList];
    route.security = security;
  }
  return route;
}

/**
 * A route the kernel forwards (`forwardingEngine: 'nftables'`: DNAT in the engine's nftables table;
 * the Rust core relays it where the kernel cannot), port 80 by default. Domains name the route only:
 * the kernel sees ports.
 */
export function createNfTablesRoute(nameOrDomains: string | string[], target: THelperTarget, options: INfTablesRouteOptions = {}): IRouteConfig {
  const route = nfTablesRoute('NFTables', nameOrDomains, target, 80, options);
  if (options.useTls === true) route.action.tls = { mode: 'passthrough' };
  return route;
}

/**
 * As createNfTablesRoute with TLS terminated (`certificate` defaults to `'auto'`), port 443 by
 * default. The kernel cannot terminate TLS, so the route is the Rust core's: the nftables settings
 * are left out.
 */
export function createNfTablesTerminateRoute(
  nameOrDomains: string | string[],
  target: THelperTarget,
  options: INfTablesTerminateRouteOptions = {},
): IRouteConfig {
  const { certificate, ...rest } = options;
  const route = nfTablesRoute('NFTables HTTPS', nameOrDomains, target, 443, rest);
  const { forwardingEngine: _engine, nftables: _settings, ...action } = route.action;
  return { ...route, action: { ...action, tls: terminateTls(certificate) } };
}

/** `[nftables TLS-terminating route on httpsPort (443), HTTP-to-HTTPS redirect on httpPort (80)]`. */
export function createCompleteNfTablesHttpsServer(
  nameOrDomains: string | string[],
  target: THelperTarget,
  options: ICompleteNfTablesHttpsServerOptions = {},
): IRouteConfig[] {
  const { httpPort, httpsPort, ...rest } = options;
  const https = createNfTablesTerminateRoute(nameOrDomains, target, { ...rest, ports: httpsPort ?? 443 });
  const { domains } = nameOrDomainsOf(nameOrDomains, 'NFTables');
  const redirect = redirectRoute(domains, httpsPort ?? 443, httpPort ?? 80);
  if (domains === undefined) redirect.name = `HTTP to HTTPS redirect: ${nameOrDomains as string}`;
  return [https, redirect];
}

/** A copy of `route` with `security[kind]` set (where the route keeps its security). */
function withSecurity<K extends 'rateLimit' | 'basicAuth' | 'jwtAuth'>(route: IRouteConfig, kind: K, value: IRouteSecurity[K]): IRouteConfig {
  const copy = cloneDeep(route);
  // A route whose security lives only under `action.security` keeps it there (route-level would hide it).
  if (copy.security === undefined && copy.action?.security !== undefined) {
    copy.action.security = { ...copy.action.security, [kind]: value };
  } else {
    copy.security = { ...(copy.security ?? {}), [kind]: value };
  }
  return copy;
}

function definedFields<T extends object>(value: T): T {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined).map(([k, v]) => [k, cloneDeep(v)])) as T;
}

/** A copy of `route` with `security.rateLimit` set and enabled. */
export function addRateLimiting(route: IRouteConfig, config: IRateLimitOptions): IRouteConfig {
  return withSecurity(route, 'rateLimit', { enabled: true, ...definedFields(config) });
}

/** A copy of `route` with `security.basicAuth` set and enabled. */
export function addBasicAuth(route: IRouteConfig, config: IBasicAuthOptions): IRouteConfig {
  return withSecurity(route, 'basicAuth', { enabled: true, ...definedFields(config) });
}

/** A copy of `route` with `security.jwtAuth` set and enabled. */
export function addJwtAuth(route: IRouteConfig, config: IJwtAuthOptions): IRouteConfig {
  return withSecurity(route, 'jwtAuth', { enabled: true, ...definedFields(config) });
}
