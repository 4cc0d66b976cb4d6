// The one description of which option and route keys exist, at every level (API.md "Routes",
// "ISmartProxyOptions", "Edge hygiene"). Both validators walk it: normalizeOptions (behind
// `new SmartProxy()`) and validateRouteConfig / validateRoutes. A key added here is known to both,
// a key missing here is unknown to both; neither keeps a list of its own.
//
// Value checks (types, ranges) stay with each validator; this module only says which keys exist,
// which nested values have keys of their own, which known keys the engine refuses for now, and the
// enumerations both validators compare values against.

/** The keys of one object. */
export interface IObjectSchema {
  readonly fields: Readonly<Record<string, IFieldSchema>>;
  /**
   * Compatibility blocks of the original whose extra settings this engine does not use: keys not
   * listed are accepted (and ignored) instead of refused.
   */
  readonly open?: true;
}

/** One key: what its value holds, when it is an object or an array of objects. */
export interface IFieldSchema {
  /** The value's keys, when it is an object. */
  readonly object?: IObjectSchema;
  /** The keys of each element that is an object, when the value is an array. */
  readonly each?: IObjectSchema;
  /** A key the engine knows but refuses for now: why, in the words both validators report. */
  readonly notYet?: string;
  /** The whole reason both validators give for a `notYet` key, when `not supported yet (<notYet>)` is not it. */
  readonly notYetMessage?: string;
}

/** A key one of the validators must report. `field` is the path from the walk's start. */
export interface IKeyProblem {
  field: string;
  kind: 'unknown' | 'not-yet';
  reason: string;
}

const leaf: IFieldSchema = {};
const keys = (fields: Record<string, IFieldSchema>, open?: true): IObjectSchema => (open ? { fields, open } : { fields });
const nested = (object: IObjectSchema): IFieldSchema => ({ object });
const leaves = (...names: string[]): Record<string, IFieldSchema> => Object.fromEntries(names.map((name) => [name, leaf]));

// ---------------------------------------------------------------------------------------------
// Enumerations

export const TLS_MODES: readonly string[] = ['passthrough', 'terminate', 'terminate-and-reencrypt'];
export const TLS_VERSIONS: readonly string[] = ['TLSv1.0', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'];
export const LB_ALGORITHMS: readonly string[] = ['round-robin', 'least-connections', 'ip-hash'];
export const RATE_LIMIT_KEYS_BY: readonly string[] = ['ip', 'path', 'header'];
/** `loadBalancing.affinity.key`: the client IP, a request header (a token) or a cookie name. */
export const AFFINITY_KEY = /^(?:ip|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s=;,]+)$/;
/** Every spelling of `action.options.backendProtocol` ('http3' needs TLS to every target: ts/utils/http3-backend.ts). */
export const BACKEND_PROTOCOLS: readonly string[] = ['auto', 'http1', 'http2', 'http3'];

/** `match.transport`: the default, 'tcp', takes connections; 'udp' datagrams; 'all' both. */
export const TRANSPORTS: readonly string[] = ['tcp', 'udp', 'all'];

/** `action.udp` defaults (API.md "HTTP/3, QUIC and UDP"). */
export const UDP_DEFAULTS = { sessionTimeout: 60000, maxSessionsPerIP: 1000, maxDatagramSize: 65535 } as const;

/** `action.http3.altSvcMaxAge` default, in seconds: the `ma=` of the `Alt-Svc` the route's HTTP/1.1 and HTTP/2 responses carry. */
export const HTTP3_ALT_SVC_MAX_AGE = 86400;

/** API.md "Edge hygiene": how many affinity or rate-limit keys a route keeps in memory by default. */
export const DEFAULT_MAX_KEYS = 100000;

// ---------------------------------------------------------------------------------------------
// Routes

const PORT_RANGE = keys(leaves('from', 'to'));
const HEADER_TEMPLATES = keys(leaves('request', 'response'));
const CERTIFICATE = keys(leaves('key', 'cert', 'ca'));

/** Global `acme`, and a route's `tls.acme` (which also takes the original's spellings). */
export const ACME_SCHEMA = keys(
  leaves(
    'email', 'accountEmail', 'port', 'challengePort', 'useProduction', 'environment', 'renewThresholdDays', 'renewBeforeDays',
    'autoRenew', 'certificateStore', 'renewCheckIntervalHours', 'directoryUrl', 'directoryCaFile', 'enabled', 'skipConfiguredCerts',
  ),
);

export const TLS_SCHEMA = keys({
  mode: leaf,
  certificate: nested(CERTIFICATE),
  acme: nested(ACME_SCHEMA),
  versions: leaf,
  rejectUnauthorized: leaf,
});

export const TARGET_SCHEMA = keys({
  host: leaf,
  port: leaf,
  match: nested(keys(leaves('ports', 'path', 'headers', 'method'))),
  priority: leaf,
  weight: leaf,
  // The connection to this target (TLS or plain, its verification); the client-facing TLS is the route's.
  tls: nested(TLS_SCHEMA),
  headers: nested(HEADER_TEMPLATES),
  sendProxyProtocol: leaf,
});

export const SECURITY_SCHEMA = keys({
  ipAllowList: leaf,
  ipBlockList: leaf,
  maxConnections: leaf,
  rateLimit: nested(keys(leaves('enabled', 'maxRequests', 'window', 'keyBy', 'headerName', 'errorMessage', 'maxKeys'))),
  basicAuth: nested(keys({ enabled: leaf, users: { each: keys(leaves('username', 'password')) }, realm: leaf, excludePaths: leaf })),
  jwtAuth: nested(keys(leaves('enabled', 'secret', 'algorithm', 'issuer', 'audience', 'excludePaths', 'requireExp'))),
  forwardAuthorization: leaf,
});

export const ACTION_SCHEMA = keys({
  type: leaf,
  targets: { each: TARGET_SCHEMA },
  target: nested(TARGET_SCHEMA),
  tls: nested(TLS_SCHEMA),
  socketHandler: leaf,
  // A function (checked with the transport it needs by checkUdpRoute, in both validators).
  datagramHandler: leaf,
  udp: nested(keys(leaves('sessionTimeout', 'maxSessionsPerIP', 'maxDatagramSize'))),
  http3: nested(keys(leaves('enabled', 'altSvcMaxAge'))),
  // The original's WebSocket, nftables and options blocks carry settings this engine has no use
  // for; refusing them would break drop-in configs.
  websocket: nested(keys(leaves('enabled', 'pingInterval', 'pingTimeout', 'maxPayloadSize'), true)),
  loadBalancing: nested(
    keys({
      algorithm: leaf,
      healthCheck: nested(keys(leaves('path', 'interval', 'timeout', 'unhealthyThreshold', 'healthyThreshold'))),
      affinity: nested(keys(leaves('key', 'ttlSeconds', 'onUnknown', 'maxKeys'))),
    }),
  ),
  forwardingEngine: leaf,
  nftables: nested(keys(leaves('preserveSourceIP', 'protocol', 'maxRate', 'priority'), true)),
  options: nested(keys(leaves('backendProtocol', 'raw'), true)),
  sendProxyProtocol: leaf,
  retry: nested(keys(leaves('maxRetries', 'onConnectFailure', 'on5xx', 'onTimeout', 'backoffMs'))),
  timeouts: nested(keys({ connectMs: leaf, responseMs: leaf, idleMs: { notYet: 'per-route idle timeouts are not implemented yet' } })),
  security: nested(SECURITY_SCHEMA),
  normalizePath: leaf,
});

export const MATCH_SCHEMA = keys({
  ports: { object: PORT_RANGE, each: PORT_RANGE },
  domains: leaf,
  path: leaf,
  clientIp: leaf,
  tlsVersion: leaf,
  headers: leaf,
  transport: leaf,
});

export const ROUTE_SCHEMA = keys({
  ...leaves('id', 'name', 'description', 'tags', 'priority', 'enabled'),
  match: nested(MATCH_SCHEMA),
  action: nested(ACTION_SCHEMA),
  security: nested(SECURITY_SCHEMA),
  headers: nested(HEADER_TEMPLATES),
});

// ---------------------------------------------------------------------------------------------
// Options

/** `ISmartProxyOptions`. `routes` are walked one by one with ROUTE_SCHEMA. */
export const OPTIONS_SCHEMA = keys({
  routes: leaf,
  defaults: nested(keys({ target: nested(TARGET_SCHEMA), security: nested(SECURITY_SCHEMA), preserveSourceIP: leaf })),
  ...leaves(
    'acceptProxyProtocol', 'proxyIPs', 'sendProxyProtocol', 'initialDataTimeout', 'socketTimeout', 'inactivityTimeout',
    'maxConnectionLifetime', 'gracefulShutdownTimeout', 'maxConnectionsPerIP', 'connectionRateLimitPerMinute', 'noDelay',
    'keepAlive', 'keepAliveInitialDelay', 'maxPendingDataSize', 'enableDetailedLogging', 'logger',
  ),
  acme: nested(ACME_SCHEMA),
  certProvisionFunction: leaf,
  certProvisionFallbackToAcme: leaf,
  metrics: nested(keys({ ...leaves('enabled', 'sampleIntervalMs', 'retentionSeconds'), prometheus: nested(keys(leaves('port', 'host', 'path'))) })),
  admin: nested(keys(leaves('port', 'host', 'token'))),
  accessLog: nested(keys(leaves('enabled', 'path', 'format'))),
  workerThreads: leaf,
  redis: nested(keys(leaves('url', 'keyPrefix', 'encryptionKey', 'syncIntervalMs'))),
  ...leaves('jsCallTimeout', 'maxHeaderSize', 'headerTimeout', 'http2MaxConcurrentStreams', 'trustForwardedHeaders', 'httpKeepAliveTimeout'),
});

// ---------------------------------------------------------------------------------------------
// The walk

type TRecord = Record<string, unknown>;
const isRecord = (v: unknown): v is TRecord => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Every key of `value` the schema does not know, and every known key the engine refuses for now,
 * with its path (`prefix` + `action.targets[0].hots`). An object's own keys are reported before
 * those of the values inside it. Values of the wrong type are left to the value checks.
 */
export function keyProblems(value: unknown, schema: IObjectSchema, prefix = ''): IKeyProblem[] {
  const problems: IKeyProblem[] = [];
  walk(value, schema, prefix, problems);
  return problems;
}

function walk(value: unknown, schema: IObjectSchema, prefix: string, problems: IKeyProblem[]): void {
  if (!isRecord(value)) return;
  const known = Object.keys(schema.fields);
  const inner: Array<[unknown, IFieldSchema, string]> = [];
  for (const [key, child] of Object.entries(value)) {
    const field = Object.prototype.hasOwnProperty.call(schema.fields, key) ? schema.fields[key] : undefined;
    if (field === undefined) {
      if (!schema.open) problems.push({ field: `${prefix}${key}`, kind: 'unknown', reason: `unknown field (expected one of ${known.join(', ')})` });
      continue;
    }
    // An explicit `undefined` is the same as leaving the key out.
    if (child === undefined) continue;
    if (field.notYet !== undefined) {
      problems.push({ field: `${prefix}${key}`, kind: 'not-yet', reason: field.notYetMessage ?? `not supported yet (${field.notYet})` });
      continue;
    }
    inner.push([child, field, `${prefix}${key}`]);
  }
  for (const [child, field, path] of inner) {
    if (field.object !== undefined && isRecord(child)) walk(child, field.object, `${path}.`, problems);
    if (field.each !== undefined && Array.isArray(child)) {
      child.forEach((item, i) => walk(item, field.each as IObjectSchema, `${path}[${i}].`, problems));
    }
  }
}

/** The keys of `schema` whose values are objects with keys of their own (merged field by field). */
export function objectFields(schema: IObjectSchema): string[] {
  return Object.entries(schema.fields)
    .filter(([, field]) => field.object !== undefined)
    .map(([key]) => key);
}
