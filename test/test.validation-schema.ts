// One schema of option keys (ts/models/option-schema.ts) behind both validators: normalizeOptions
// (what `new SmartProxy()` runs) and validateRouteConfig / validateRoutes. A route using every key
// the schema accepts passes both; an unknown key at any level is reported by both with its path;
// keys the engine refuses for now are refused by both in the same words; the (ext) keys of API.md
// "Edge hygiene" are checked by both, naming the field; so are UDP routes (`match.transport`,
// `action.udp`) and HTTP/3 (`action.http3`). Pure TypeScript: no engine needed.
import { tap, expect } from '@push.rocks/tapbundle';

import { normalizeOptions, SmartProxyConfigError } from '../ts/utils/normalize-options.js';
import { validateRouteConfig, validateRoutes } from '../ts/utils/route-utils.js';
import { OPTIONS_SCHEMA, ROUTE_SCHEMA } from '../ts/models/option-schema.js';
import type { IObjectSchema } from '../ts/models/option-schema.js';
import type { IRouteConfig } from '../ts/models/route-types.js';
import type { ISmartProxyOptions } from '../ts/models/options.js';

type TRecord = Record<string, unknown>;
const isRecord = (v: unknown): v is TRecord => typeof v === 'object' && v !== null && !Array.isArray(v);

const PEM = { key: '-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n', cert: '-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n' };
const handler = (): void => undefined;
const security = {
  ipAllowList: ['10.0.0.0/8', '127.0.0.1'],
  ipBlockList: ['10.0.0.9'],
  maxConnections: 100,
  rateLimit: { enabled: true, maxRequests: 10, window: 60, keyBy: 'header', headerName: 'x-api-key', errorMessage: 'slow down', maxKeys: 5000 },
  basicAuth: { enabled: true, users: [{ username: 'u', password: 'p' }], realm: 'R', excludePaths: ['/health'] },
  jwtAuth: { enabled: true, secret: 's3cret', algorithm: 'HS256', issuer: 'me', audience: 'you', excludePaths: ['/public/*'], requireExp: false },
  forwardAuthorization: true,
};

/** A route that sets every key the schema accepts (and the engine does not refuse), at every level. */
function everyKeyRoute(): TRecord {
  const target = {
    host: ['10.0.0.1', '10.0.0.2'],
    port: 8080,
    match: { ports: [443], path: '/api/*', headers: { 'x-v': '2', 'x-channel': /^beta/i }, method: ['GET'] },
    priority: 1,
    weight: 2,
    tls: { mode: 'terminate-and-reencrypt', certificate: { ca: PEM.cert }, versions: ['TLSv1.3'], rejectUnauthorized: false },
    headers: { request: { 'x-client': '{clientIp}' }, response: { 'x-served-by': 'proxy' } },
    sendProxyProtocol: 1,
  };
  return {
    id: 'every-key',
    name: 'every key',
    description: 'uses every key',
    tags: ['a', 'b'],
    priority: 5,
    enabled: true,
    match: {
      ports: [443, { from: 8443, to: 8444 }],
      domains: ['example.com', '*.example.com'],
      path: '/api/*',
      clientIp: ['10.0.0.0/8'],
      tlsVersion: ['TLSv1.2', 'TLSv1.3'],
      headers: { 'x-tenant': 'a', 'x-version': /^v2/ },
      transport: 'tcp',
    },
    action: {
      type: 'forward',
      targets: [target, { host: 'fallback.local', port: 'preserve' }],
      target: { host: 'legacy.local', port: 1 },
      tls: {
        mode: 'terminate',
        certificate: { ...PEM, ca: PEM.cert },
        acme: { email: 'ops@example.com', challengePort: 80, renewBeforeDays: 20 },
        versions: ['TLSv1.2', 'TLSv1.3'],
        rejectUnauthorized: true,
      },
      socketHandler: handler,
      websocket: { enabled: true, pingInterval: 30000, pingTimeout: 10000, maxPayloadSize: 65536 },
      loadBalancing: {
        algorithm: 'least-connections',
        healthCheck: { path: '/health', interval: 1000, timeout: 500, unhealthyThreshold: 3, healthyThreshold: 2 },
        affinity: { key: 'header:Mcp-Session-Id', ttlSeconds: 600, onUnknown: 'reject', maxKeys: 2000 },
      },
      forwardingEngine: 'node',
      nftables: { preserveSourceIP: true, protocol: 'tcp', maxRate: '10mbps', priority: 1 },
      options: { backendProtocol: 'auto', raw: false },
      sendProxyProtocol: 2,
      retry: { maxRetries: 3, onConnectFailure: true, on5xx: true, onTimeout: false, backoffMs: 50 },
      timeouts: { connectMs: 1000, responseMs: 5000 },
      security,
      normalizePath: true,
      http3: { enabled: true, altSvcMaxAge: 3600 },
    },
    security,
    headers: { request: { 'x-route': '{routeName}' }, response: { 'x-domain': '{domain}' } },
  };
}

/**
 * A UDP route setting every key a route taking UDP may have (no domains, path, headers, TLS
 * version or TLS: datagrams carry none), `action.udp` included.
 */
function everyUdpKeyRoute(): TRecord {
  return {
    name: 'every udp key',
    match: { ports: [53, { from: 5000, to: 5001 }], clientIp: ['10.0.0.0/8'], transport: 'udp' },
    action: {
      type: 'forward',
      targets: [{ host: '10.0.0.53', port: 53 }],
      udp: { sessionTimeout: 30000, maxSessionsPerIP: 10, maxDatagramSize: 1500 },
    },
    security: { ipAllowList: ['10.0.0.0/8'], ipBlockList: ['10.0.0.9'], maxConnections: 100 },
  };
}

/** A `socket-handler` route taking TCP and UDP: a socketHandler for connections, a datagramHandler for datagrams. */
function everyUdpHandlerKeyRoute(): TRecord {
  return {
    name: 'every udp handler key',
    match: { ports: 5353, transport: 'all' },
    action: {
      type: 'socket-handler',
      socketHandler: handler,
      datagramHandler: handler,
      udp: { sessionTimeout: 5000, maxSessionsPerIP: 2, maxDatagramSize: 512 },
    },
    security: { ipAllowList: ['127.0.0.1'], maxConnections: 10 },
  };
}

/** Options that set every option key (routes included). */
function everyOption(routes: unknown[]): TRecord {
  return {
    routes,
    defaults: { target: { host: 'default.local', port: 80 }, security: { ipAllowList: ['127.0.0.1'], ipBlockList: [], maxConnections: 10 }, preserveSourceIP: false },
    acceptProxyProtocol: true,
    proxyIPs: ['10.0.0.1'],
    sendProxyProtocol: 1,
    initialDataTimeout: 1000,
    socketTimeout: 1000,
    inactivityTimeout: 1000,
    maxConnectionLifetime: 1000,
    gracefulShutdownTimeout: 1000,
    maxConnectionsPerIP: 10,
    connectionRateLimitPerMinute: 10,
    noDelay: true,
    keepAlive: true,
    keepAliveInitialDelay: 1000,
    maxPendingDataSize: 1024,
    enableDetailedLogging: false,
    logger: () => undefined,
    acme: {
      email: 'ops@example.com', accountEmail: 'ops@example.com', port: 80, challengePort: 80, useProduction: false, environment: 'staging',
      renewThresholdDays: 30, renewBeforeDays: 30, autoRenew: true, certificateStore: './certs', renewCheckIntervalHours: 24,
      directoryUrl: 'https://acme.invalid/directory', directoryCaFile: '/dev/null', enabled: true, skipConfiguredCerts: false,
    },
    certProvisionFunction: async () => 'http01' as const,
    certProvisionFallbackToAcme: true,
    metrics: { enabled: true, sampleIntervalMs: 1000, retentionSeconds: 60, prometheus: { port: 9100, host: '127.0.0.1', path: '/metrics' } },
    admin: { port: 9101, host: '127.0.0.1', token: 't' },
    accessLog: { enabled: true, path: '/tmp/access.log', format: 'json' },
    workerThreads: 1,
    redis: { url: 'redis://127.0.0.1:6379', keyPrefix: 'x:', encryptionKey: Buffer.alloc(32, 7).toString('base64'), syncIntervalMs: 1000 },
    jsCallTimeout: 1000,
    maxHeaderSize: 8192,
    headerTimeout: 1000,
    http2MaxConcurrentStreams: 16,
    trustForwardedHeaders: true,
    httpKeepAliveTimeout: 5000,
  };
}

/** For each object schema, the keys `value` sets somewhere (an object schema met at several places counts once). */
function collectUsed(value: unknown, schema: IObjectSchema, used: Map<IObjectSchema, Set<string>>): void {
  if (!isRecord(value)) return;
  const keys = used.get(schema) ?? new Set<string>();
  used.set(schema, keys);
  for (const [key, field] of Object.entries(schema.fields)) {
    const child = value[key];
    if (child === undefined) continue;
    keys.add(key);
    if (field.object !== undefined && isRecord(child)) collectUsed(child, field.object, used);
    if (field.each !== undefined && Array.isArray(child)) child.forEach((item) => collectUsed(item, field.each as IObjectSchema, used));
  }
}

/**
 * Keys the schema accepts (the engine's refusals excepted) that no fixture sets anywhere, each
 * named by the first path the schema reaches it at: the fixtures must keep up with the schema.
 */
function unusedKeys(schema: IObjectSchema, used: Map<IObjectSchema, Set<string>>, prefix: string, seen = new Set<IObjectSchema>(), out: string[] = []): string[] {
  if (seen.has(schema)) return out;
  seen.add(schema);
  for (const [key, field] of Object.entries(schema.fields)) {
    if (field.notYet !== undefined) continue;
    if (!(used.get(schema)?.has(key) ?? false)) out.push(`${prefix}${key}`);
    if (field.object !== undefined) unusedKeys(field.object, used, `${prefix}${key}.`, seen, out);
    if (field.each !== undefined) unusedKeys(field.each, used, `${prefix}${key}[].`, seen, out);
  }
  return out;
}

/** The path (`action.targets[0].`) of every object in `value` that the schema describes. */
function objectPaths(value: unknown, schema: IObjectSchema, prefix = '', out: Array<{ path: string; schema: IObjectSchema }> = []) {
  if (!isRecord(value)) return out;
  out.push({ path: prefix, schema });
  for (const [key, field] of Object.entries(schema.fields)) {
    const child = value[key];
    if (field.object !== undefined && isRecord(child)) objectPaths(child, field.object, `${prefix}${key}.`, out);
    if (field.each !== undefined && Array.isArray(child)) {
      child.forEach((item, i) => objectPaths(item, field.each as IObjectSchema, `${prefix}${key}[${i}].`, out));
    }
  }
  return out;
}

/** `value` with `key: 'x'` added to the object at `path` (copied, the original untouched). */
function withKeyAt(value: TRecord, path: string, key: string, extra: unknown): TRecord {
  const copy = structuredCloneWithFunctions(value) as TRecord;
  let at: unknown = copy;
  for (const step of path.split('.').filter((s) => s !== '')) {
    const m = /^([^[]+)(?:\[(\d+)\])?$/.exec(step)!;
    at = (at as TRecord)[m[1]];
    if (m[2] !== undefined) at = (at as unknown[])[Number(m[2])];
  }
  (at as TRecord)[key] = extra;
  return copy;
}

function structuredCloneWithFunctions(value: unknown): unknown {
  if (value instanceof RegExp) return value;
  if (Array.isArray(value)) return value.map(structuredCloneWithFunctions);
  if (isRecord(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, structuredCloneWithFunctions(v)]));
  return value;
}

/** What normalizeOptions throws for these routes (undefined when it accepts them). */
function normalizerError(routes: unknown[], extra: TRecord = {}): SmartProxyConfigError | undefined {
  try {
    normalizeOptions({ routes, ...extra } as unknown as ISmartProxyOptions);
  } catch (err) {
    if (err instanceof SmartProxyConfigError) return err;
    throw err;
  }
  return undefined;
}

const ROUTE_PREFIX = 'routes[0] "every key": ';

// ---------------------------------------------------------------------------------------------

tap.test('the fixtures use every key the schema accepts', async () => {
  const used = new Map<IObjectSchema, Set<string>>();
  collectUsed(everyKeyRoute(), ROUTE_SCHEMA, used);
  collectUsed(everyUdpKeyRoute(), ROUTE_SCHEMA, used);
  collectUsed(everyUdpHandlerKeyRoute(), ROUTE_SCHEMA, used);
  collectUsed(everyOption([]), OPTIONS_SCHEMA, used);
  const unused = [...unusedKeys(ROUTE_SCHEMA, used, ''), ...unusedKeys(OPTIONS_SCHEMA, used, 'options.')];
  if (unused.length > 0) throw new Error(`keys the fixtures do not set: ${unused.join(', ')}`);
});

tap.test('a route using every accepted key passes both validators', async () => {
  const route = everyKeyRoute();
  expect(validateRouteConfig(route as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
  expect(validateRoutes([route as unknown as IRouteConfig])).toEqual({ valid: true, errors: [] });
  expect(normalizerError([route])).toBeUndefined();
  // The keys the two used to disagree on.
  const { config } = normalizeOptions({ routes: [route] } as unknown as ISmartProxyOptions);
  expect(config.routes[0].security.forwardAuthorization).toBeTrue();
  expect(config.routes[0].action.sendProxyProtocol).toEqual(2);
  expect(config.routes[0].match.transport).toEqual('tcp');
  expect(config.routes[0].action.udp).toBeNull();
  expect(config.routes[0].action.http3).toEqual({ altSvcMaxAge: 3600 });

  const udp = everyUdpKeyRoute();
  expect(validateRouteConfig(udp as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
  expect(normalizerError([udp])).toBeUndefined();
  const native = normalizeOptions({ routes: [udp] } as unknown as ISmartProxyOptions).config.routes[0];
  expect(native.match.transport).toEqual('udp');
  expect(native.action.udp).toEqual({ sessionTimeoutMs: 30000, maxSessionsPerIp: 10, maxDatagramSize: 1500 });
  expect(native.action.http3).toBeNull();
  expect(native.action.datagramHandler).toBeNull();

  const handlers = everyUdpHandlerKeyRoute();
  expect(validateRouteConfig(handlers as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
  expect(normalizerError([handlers])).toBeUndefined();
  const both = normalizeOptions({ routes: [handlers] } as unknown as ISmartProxyOptions).config.routes[0];
  expect(both.match.transport).toEqual('all');
  expect(both.action.udp).toEqual({ sessionTimeoutMs: 5000, maxSessionsPerIp: 2, maxDatagramSize: 512 });
  // The same function: one registry id for both handlers.
  expect(typeof both.action.socketHandler).toEqual('number');
  expect(both.action.datagramHandler).toEqual(both.action.socketHandler);
});

tap.test('options using every option key: no error, and no "unknown options" warning', async () => {
  const { warnings } = normalizeOptions(everyOption([everyKeyRoute()]) as unknown as ISmartProxyOptions);
  expect(warnings.filter((w) => w.startsWith('unknown options'))).toEqual([]);
  // Unknown options anywhere outside routes are a warning with their path, not an error.
  const odd = everyOption([]);
  odd.someUnknownOption = 1;
  (odd.acme as TRecord).bogus = true;
  (odd.defaults as TRecord).bogus = true;
  const result = normalizeOptions(odd as unknown as ISmartProxyOptions);
  expect(result.warnings).toContain('unknown options ignored: someUnknownOption, defaults.bogus, acme.bogus');
});

tap.test('an unknown key at any level of a route is reported by both validators, with its path', async () => {
  const everyKeyPaths = objectPaths(everyKeyRoute(), ROUTE_SCHEMA);
  // Every level of a route is visited, each with its own object.
  expect(everyKeyPaths.length > 25).toBeTrue();
  for (const [route, prefix] of [
    [everyKeyRoute(), ROUTE_PREFIX],
    [everyUdpKeyRoute(), 'routes[0] "every udp key": '],
    [everyUdpHandlerKeyRoute(), 'routes[0] "every udp handler key": '],
  ] as const) {
    for (const { path, schema } of objectPaths(route, ROUTE_SCHEMA)) {
      const bad = withKeyAt(route, path, 'bogusKey', 1);
      const field = `${path}bogusKey`;
      const errors = validateRouteConfig(bad as unknown as IRouteConfig).errors;
      const thrown = normalizerError([bad]);
      if (schema.open) {
        // Compatibility blocks of the original: extra settings are accepted and ignored by both.
        expect({ field, errors, thrown: thrown?.message }).toEqual({ field, errors: [], thrown: undefined });
        continue;
      }
      const expected = `${field}: unknown field (expected one of ${Object.keys(schema.fields).join(', ')})`;
      expect({ field, errors }).toEqual({ field, errors: [expected] });
      expect({ field, thrown: thrown?.message }).toEqual({ field, thrown: `${prefix}${expected}` });
      expect(validateRoutes([bad as unknown as IRouteConfig]).errors).toEqual([`${prefix}${expected}`]);
    }
  }
  // The same for a target the route takes from options.defaults.
  const plain = { name: 'd', match: { ports: 80 }, action: { type: 'forward' } };
  expect(normalizerError([plain], { defaults: { target: { host: 'h', port: 1, hots: 'x' } } })?.message).toStartWith('routes[0] "d": defaults.target.hots: unknown field');
});

tap.test('keys the engine refuses for now are refused by both validators in the same words', async () => {
  const cases: Array<[string, TRecord]> = [
    ['action.timeouts.idleMs', { targets: [{ host: 'h', port: 1 }], timeouts: { idleMs: 100 } }],
  ];
  for (const [field, action] of cases) {
    const route = { name: 'later', match: { ports: 80 }, action: { type: 'forward', ...action } };
    const errors = validateRouteConfig(route as unknown as IRouteConfig).errors;
    expect(errors).toHaveLength(1);
    expect(errors[0]).toStartWith(`${field}: not supported yet (`);
    expect(normalizerError([route])?.message).toEqual(`routes[0] "later": ${errors[0]}`);
  }
});

tap.test("backendProtocol 'http3': a plain target and a target's own sendProxyProtocol are refused by both validators in the same words", async () => {
  const plain = (field: string) => `action.options.backendProtocol: 'http3' speaks QUIC, which is TLS, to the targets: ${field} is plain (use action.tls.mode 'terminate-and-reencrypt', or the target's tls)`;
  const noProxyHeader = (field: string) => `${field}.sendProxyProtocol: a PROXY header goes first on a TCP connection: HTTP/3 targets have none`;
  const reencrypt = { mode: 'terminate-and-reencrypt', certificate: PEM };
  const h3 = (action: TRecord): TRecord => ({ name: 'h3b', match: { ports: 443 }, action: { type: 'forward', options: { backendProtocol: 'http3' }, ...action } });
  // [action, every problem validateRouteConfig lists (normalizeOptions throws the first)]
  const refused: Array<[TRecord, string[]]> = [
    [{ targets: [{ host: 'h', port: 1 }] }, [plain('action.targets[0]')]],
    [{ target: { host: 'h', port: 1 } }, [plain('action.target')]],
    [{ tls: { mode: 'terminate', certificate: PEM }, targets: [{ host: 'h', port: 1 }] }, [plain('action.targets[0]')]],
    [{ tls: { mode: 'passthrough' }, targets: [{ host: 'h', port: 1 }] }, [plain('action.targets[0]')]],
    // The target's own 'terminate' wins over the route's re-encryption.
    [{ tls: reencrypt, targets: [{ host: 'a', port: 1 }, { host: 'b', port: 1, tls: { mode: 'terminate' } }] }, [plain('action.targets[1]')]],
    [{ tls: reencrypt, targets: [{ host: 'h', port: 1, sendProxyProtocol: 2 }] }, [noProxyHeader('action.targets[0]')]],
    [{ tls: reencrypt, target: { host: 'h', port: 1, sendProxyProtocol: true } }, [noProxyHeader('action.target')]],
    [
      { targets: [{ host: 'a', port: 1, sendProxyProtocol: 1 }, { host: 'b', port: 1, tls: { mode: 'terminate-and-reencrypt' }, sendProxyProtocol: 2 }] },
      [plain('action.targets[0]'), noProxyHeader('action.targets[0]'), noProxyHeader('action.targets[1]')],
    ],
  ];
  for (const [action, expected] of refused) {
    const route = h3(action);
    const errors = validateRouteConfig(route as unknown as IRouteConfig).errors;
    expect({ action: JSON.stringify(action), errors }).toEqual({ action: JSON.stringify(action), errors: expected });
    expect({ action: JSON.stringify(action), thrown: normalizerError([route])?.message }).toEqual({ action: JSON.stringify(action), thrown: `routes[0] "h3b": ${expected[0]}` });
  }
  // Accepted by both: TLS to every target, by the route's re-encryption or the target's own tls.
  const accepted: TRecord[] = [
    { tls: reencrypt, targets: [{ host: 'a', port: 1 }, { host: 'b', port: 1, sendProxyProtocol: false }] },
    { targets: [{ host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt' } }] },
    { tls: { mode: 'terminate', certificate: PEM }, target: { host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt', rejectUnauthorized: false } } },
    // A 'socket-handler' route has no targets to speak HTTP/3 to.
    { type: 'socket-handler', socketHandler: handler },
  ];
  for (const action of accepted) {
    const route = h3(action);
    expect({ action: JSON.stringify(action), result: validateRouteConfig(route as unknown as IRouteConfig) }).toEqual({ action: JSON.stringify(action), result: { valid: true, errors: [] } });
    expect({ action: JSON.stringify(action), thrown: normalizerError([route])?.message }).toEqual({ action: JSON.stringify(action), thrown: undefined });
    expect(normalizeOptions({ routes: [route] } as unknown as ISmartProxyOptions).config.routes[0].action.backendProtocol).toEqual('http3');
  }
  // Other protocols ask nothing of the targets.
  for (const backendProtocol of ['auto', 'http1', 'http2']) {
    const route = h3({ options: { backendProtocol }, targets: [{ host: 'h', port: 1, sendProxyProtocol: 2 }] });
    expect(validateRouteConfig(route as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
    expect(normalizerError([route])).toBeUndefined();
  }
  // A target taken from options.defaults is checked by normalizeOptions, naming it.
  const bare = { name: 'h3b', match: { ports: 80 }, action: { type: 'forward', options: { backendProtocol: 'http3' } } };
  expect(normalizerError([bare], { defaults: { target: { host: 'h', port: 1 } } })?.message).toEqual(`routes[0] "h3b": ${plain('defaults.target')}`);
});

tap.test('RegExp header values and target tls/sendProxyProtocol: what one validator refuses, the other refuses in the same words', async () => {
  const cases: Array<[string, TRecord, TRecord]> = [
    ['match.headers.x-a', { headers: { 'x-a': /^(?!v1)/ } }, { targets: [{ host: 'h', port: 1 }] }],
    ['match.headers.x-a', { headers: { 'x-a': /(?<=a)b/ } }, { targets: [{ host: 'h', port: 1 }] }],
    ['action.targets[0].match.headers.x-a', {}, { targets: [{ host: 'h', port: 1, match: { headers: { 'x-a': /(?<v>a)\k<v>/ } } }] }],
    ['match.headers.x-a', { headers: { 'x-a': 7 } }, { targets: [{ host: 'h', port: 1 }] }],
    ['action.targets[0].tls.mode', {}, { targets: [{ host: 'h', port: 1, tls: { mode: 'passthrough' } }] }],
    ['action.targets[0].tls.certificate', {}, { targets: [{ host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt', certificate: 'auto' } }] }],
    ['action.targets[0].tls.versions[0]', {}, { targets: [{ host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt', versions: ['TLSv9'] } }] }],
    ['action.targets[0].sendProxyProtocol', {}, { targets: [{ host: 'h', port: 1, sendProxyProtocol: 'v2' }] }],
  ];
  for (const [field, match, action] of cases) {
    const route = { name: 'r', match: { ports: 80, ...match }, action: { type: 'forward', ...action } };
    const errors = validateRouteConfig(route as unknown as IRouteConfig).errors;
    expect({ field, count: errors.length }).toEqual({ field, count: 1 });
    expect(errors[0]).toStartWith(`${field}: `);
    expect(normalizerError([route])?.message).toEqual(`routes[0] "r": ${errors[0]}`);
  }
  // Accepted by both: a RegExp with flags, lookaround characters that are literal, target TLS.
  const fine = {
    name: 'r',
    match: { ports: 80, headers: { 'x-a': /^v[2-9]\(?=\)$/imsu, 'x-b': /[(?=]/ } },
    action: { type: 'forward', targets: [{ host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt' }, sendProxyProtocol: 2 }] },
  };
  expect(validateRouteConfig(fine as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
  expect(normalizerError([fine])).toBeUndefined();
  // A passthrough or raw route opens no TLS to its targets: the validator says so (the engine too, at construction).
  const passthrough = { name: 'p', match: { ports: 443 }, action: { type: 'forward', tls: { mode: 'passthrough' }, target: { host: 'h', port: 1, tls: { mode: 'terminate-and-reencrypt' } } } };
  expect(validateRouteConfig(passthrough as unknown as IRouteConfig).errors).toEqual([
    `action.target.tls: a passthrough route relays the client's own TLS: the proxy opens no TLS of its own to the target`,
  ]);
  const raw = { name: 'r', match: { ports: 80 }, action: { type: 'forward', options: { raw: true }, targets: [{ host: 'h', port: 1, tls: { mode: 'terminate' } }] } };
  expect(validateRouteConfig(raw as unknown as IRouteConfig).errors).toEqual([
    'action.targets[0].tls: a raw route relays bytes as they come: the proxy opens no TLS of its own to the target',
  ]);
});

tap.test('the (ext) Edge hygiene keys: bad values are refused by both validators, naming the field', async () => {
  const base = (): TRecord => ({
    name: 'e',
    match: { ports: 80 },
    action: { type: 'forward', targets: [{ host: 'h', port: 1 }], loadBalancing: { affinity: { key: 'ip' } } },
    security: { rateLimit: { enabled: true, maxRequests: 1, window: 1 }, jwtAuth: { enabled: true, secret: 's' } },
  });
  const cases: Array<[string, unknown, string]> = [
    ['action.normalizePath', 'yes', 'expected true or false, got "yes"'],
    ['security.jwtAuth.requireExp', 1, 'expected true or false, got 1'],
    ['security.rateLimit.maxKeys', 0, 'expected a positive integer, got 0'],
    ['security.rateLimit.maxKeys', 1.5, 'expected a positive integer, got 1.5'],
    ['security.rateLimit.maxKeys', '10', 'expected a positive integer, got "10"'],
    ['action.loadBalancing.affinity.maxKeys', 0, 'expected a positive integer, got 0'],
    ['action.loadBalancing.affinity.maxKeys', 2 ** 60, `expected a positive integer, got ${2 ** 60}`],
  ];
  for (const [field, value, reason] of cases) {
    const dot = field.lastIndexOf('.');
    const route = withKeyAt(base(), field.slice(0, dot + 1), field.slice(dot + 1), value);
    expect(validateRouteConfig(route as unknown as IRouteConfig).errors).toEqual([`${field}: ${reason}`]);
    expect(normalizerError([route])?.message).toEqual(`routes[0] "e": ${field}: ${reason}`);
  }
  // Good values pass both.
  const good = base();
  (good.action as TRecord).normalizePath = false;
  const sec = good.security as { rateLimit: TRecord; jwtAuth: TRecord };
  sec.rateLimit.maxKeys = 1;
  sec.jwtAuth.requireExp = true;
  expect(validateRouteConfig(good as unknown as IRouteConfig).errors).toEqual([]);
  expect(normalizerError([good])).toBeUndefined();

  // Options (validated by normalizeOptions only: validateRouteConfig sees routes).
  const optionCases: Array<[TRecord, string]> = [
    [{ trustForwardedHeaders: 'yes' }, 'options: trustForwardedHeaders: expected true or false, got "yes"'],
    [{ httpKeepAliveTimeout: 0 }, 'options: httpKeepAliveTimeout: expected a positive number of milliseconds, got 0'],
    [{ httpKeepAliveTimeout: -5 }, 'options: httpKeepAliveTimeout: expected a positive number of milliseconds, got -5'],
    [{ httpKeepAliveTimeout: '2m' }, 'options: httpKeepAliveTimeout: expected a positive number of milliseconds, got "2m"'],
    [{ httpKeepAliveTimeout: Infinity }, 'options: httpKeepAliveTimeout: expected a positive number of milliseconds, got Infinity'],
  ];
  for (const [extra, message] of optionCases) {
    expect(normalizerError([], extra)?.message).toEqual(message);
  }
});

tap.test('UDP routes: transport, action.udp and what datagrams do not carry are refused by both validators in the same words', async () => {
  const t = [{ host: 'h', port: 53 }];
  const noDomain = `they carry no domain unless the route passes QUIC through by SNI: set action.tls.mode 'passthrough'`;
  const noTerminate = `the proxy does not terminate TLS on them (only 'passthrough', routing QUIC by SNI); HTTP/3 termination is action.http3 on a TCP route`;
  const tcpOnly = `needs match.transport 'udp' or 'all' (this route takes TCP only)`;
  const socketOnUdp = `a 'socket-handler' route with match.transport 'udp' takes datagrams only: they go to its datagramHandler (a socketHandler takes TCP connections: match.transport 'tcp' or 'all')`;
  const needsDatagramHandler = (transport: string) => `a 'socket-handler' route with match.transport '${transport}' needs a datagramHandler function`;
  const cases: Array<[string, TRecord, TRecord, string]> = [
    ['match.transport', { transport: 'bogus' }, { type: 'forward', targets: t }, `expected 'tcp', 'udp' or 'all', got "bogus"`],
    ['match.transport', { transport: 'UDP' }, { type: 'forward', targets: t }, `expected 'tcp', 'udp' or 'all', got "UDP"`],
    ['action.udp', {}, { type: 'forward', targets: t, udp: { sessionTimeout: 5000 } }, `needs match.transport 'udp' or 'all' (this route takes TCP only)`],
    ['action.udp', { transport: 'tcp' }, { type: 'forward', targets: t, udp: {} }, `needs match.transport 'udp' or 'all' (this route takes TCP only)`],
    ['action.udp', { transport: 'udp' }, { type: 'forward', targets: t, udp: 60000 }, 'expected an object, got 60000'],
    ['action.udp.sessionTimeout', { transport: 'udp' }, { type: 'forward', targets: t, udp: { sessionTimeout: 999 } }, 'expected an integer number of milliseconds, at least 1000, got 999'],
    ['action.udp.sessionTimeout', { transport: 'all' }, { type: 'forward', targets: t, udp: { sessionTimeout: 1500.5 } }, 'expected an integer number of milliseconds, at least 1000, got 1500.5'],
    ['action.udp.maxSessionsPerIP', { transport: 'udp' }, { type: 'forward', targets: t, udp: { maxSessionsPerIP: 0 } }, 'expected a positive integer (at most 4294967295), got 0'],
    ['action.udp.maxSessionsPerIP', { transport: 'udp' }, { type: 'forward', targets: t, udp: { maxSessionsPerIP: 2 ** 32 } }, `expected a positive integer (at most 4294967295), got ${2 ** 32}`],
    ['action.udp.maxDatagramSize', { transport: 'udp' }, { type: 'forward', targets: t, udp: { maxDatagramSize: 65536 } }, 'expected an integer from 1 to 65535, got 65536'],
    ['action.udp.maxDatagramSize', { transport: 'udp' }, { type: 'forward', targets: t, udp: { maxDatagramSize: '1500' } }, 'expected an integer from 1 to 65535, got "1500"'],
    ['match.domains', { transport: 'udp', domains: 'a.example.com' }, { type: 'forward', targets: t }, `UDP routes relay datagrams: ${noDomain}`],
    ['match.domains', { transport: 'all', domains: ['a.example.com'] }, { type: 'forward', targets: t }, `UDP routes relay datagrams (match.transport 'all' takes UDP too): ${noDomain}`],
    ['match.path', { transport: 'udp', path: '/x' }, { type: 'forward', targets: t }, 'UDP routes relay datagrams: they carry no HTTP path to match'],
    ['match.headers', { transport: 'udp', headers: { 'x-a': 'b' } }, { type: 'forward', targets: t }, 'UDP routes relay datagrams: they carry no HTTP headers to match'],
    ['match.tlsVersion', { transport: 'all', tlsVersion: ['TLSv1.3'] }, { type: 'forward', targets: t }, `UDP routes relay datagrams (match.transport 'all' takes UDP too): they carry no TLS handshake to match`],
    ['action.tls', { transport: 'udp' }, { type: 'forward', targets: t, tls: { mode: 'terminate', certificate: PEM } }, `UDP routes relay datagrams: ${noTerminate}`],
    ['action.tls', { transport: 'all' }, { type: 'forward', targets: t, tls: { mode: 'terminate-and-reencrypt', certificate: 'auto' } }, `UDP routes relay datagrams (match.transport 'all' takes UDP too): ${noTerminate}`],
    ['action.socketHandler', { transport: 'udp' }, { type: 'socket-handler', socketHandler: handler, datagramHandler: handler }, socketOnUdp],
    ['action.datagramHandler', { transport: 'udp' }, { type: 'socket-handler' }, `${needsDatagramHandler('udp')}, got undefined`],
    ['action.datagramHandler', { transport: 'udp' }, { type: 'socket-handler', datagramHandler: 'echo' }, `${needsDatagramHandler('udp')}, got "echo"`],
    ['action.datagramHandler', { transport: 'all' }, { type: 'socket-handler', socketHandler: handler }, `${needsDatagramHandler('all')} for its datagrams (its socketHandler takes the TCP connections), got undefined`],
    ['action.socketHandler', { transport: 'all' }, { type: 'socket-handler', datagramHandler: handler }, `a 'socket-handler' route needs a socketHandler function, got undefined`],
    ['action.datagramHandler', { transport: 'tcp' }, { type: 'socket-handler', socketHandler: handler, datagramHandler: handler }, tcpOnly],
    ['action.datagramHandler', { transport: 'udp' }, { type: 'forward', targets: t, datagramHandler: handler }, `a 'forward' route relays datagrams to its targets: only a 'socket-handler' route takes a datagramHandler`],
    ['action.targets[1].host', { transport: 'udp' }, { type: 'forward', targets: [t[0], { host: handler, port: 53 }] }, 'UDP routes relay datagrams: a target host is a name or address (or a list of them), not a function'],
    ['action.target.port', { transport: 'udp' }, { type: 'forward', target: { host: 'h', port: 'preserve' } }, `UDP routes relay datagrams: a target port is a number, not 'preserve'`],
    ['action.targets[0].port', { transport: 'all' }, { type: 'forward', targets: [{ host: 'h', port: handler }] }, `UDP routes relay datagrams (match.transport 'all' takes UDP too): a target port is a number, not a function`],
    ['action.forwardingEngine', { transport: 'udp' }, { type: 'forward', targets: t, forwardingEngine: 'nftables' }, 'UDP routes relay datagrams: kernel forwarding takes UDP by action.nftables.protocol, not match.transport'],
    ['action.datagramHandler', {}, { type: 'forward', targets: t, datagramHandler: handler }, tcpOnly],
  ];
  for (const [field, match, action, reason] of cases) {
    const route = { name: 'u', match: { ports: 53, ...match }, action };
    expect({ field, errors: validateRouteConfig(route as unknown as IRouteConfig).errors }).toEqual({ field, errors: [`${field}: ${reason}`] });
    expect({ field, thrown: normalizerError([route])?.message }).toEqual({ field, thrown: `routes[0] "u": ${field}: ${reason}` });
  }
  // Accepted by both: each transport, explicit settings at their bounds, client IPs and IP lists.
  const fine: TRecord[] = [
    { match: { ports: 53, transport: 'udp' }, action: { type: 'forward', targets: t } },
    { match: { ports: 53, transport: 'all', clientIp: ['10.0.0.0/8'] }, action: { type: 'forward', targets: t, udp: { sessionTimeout: 1000, maxSessionsPerIP: 1, maxDatagramSize: 1 } } },
    { match: { ports: 53, transport: 'udp' }, action: { type: 'forward', targets: t, udp: { maxSessionsPerIP: 4294967295, maxDatagramSize: 65535 } }, security: { ipBlockList: ['10.0.0.9'], maxConnections: 5 } },
    { match: { ports: 443, transport: 'tcp', domains: 'a.example.com' }, action: { type: 'forward', targets: t, tls: { mode: 'passthrough' } } },
    // QUIC passthrough: routed by the SNI of the client's Initial packets ('all': TLS over TCP too).
    { match: { ports: 443, transport: 'udp', domains: 'a.example.com' }, action: { type: 'forward', targets: t, tls: { mode: 'passthrough' } } },
    { match: { ports: 443, transport: 'all', domains: ['a.example.com', '*.b.example.com'] }, action: { type: 'forward', targets: t, tls: { mode: 'passthrough' }, udp: { sessionTimeout: 30000 } } },
    { match: { ports: 443, transport: 'udp' }, action: { type: 'forward', targets: t, tls: { mode: 'passthrough' } } },
    // Handler routes: datagrams to the datagramHandler; with 'all', TCP connections to the socketHandler.
    { match: { ports: 53, transport: 'udp' }, action: { type: 'socket-handler', datagramHandler: handler, udp: { sessionTimeout: 1000 } }, security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 5 } },
    { match: { ports: 53, transport: 'all' }, action: { type: 'socket-handler', socketHandler: handler, datagramHandler: handler } },
  ];
  for (const route of fine) {
    expect({ route: JSON.stringify(route), errors: validateRouteConfig(route as unknown as IRouteConfig).errors }).toEqual({ route: JSON.stringify(route), errors: [] });
    expect({ route: JSON.stringify(route), thrown: normalizerError([route])?.message }).toEqual({ route: JSON.stringify(route), thrown: undefined });
  }
  // A socketHandler alone on a 'udp' route: it is refused, and the datagramHandler is missing.
  const socketOnly = { name: 'u', match: { ports: 53, transport: 'udp' }, action: { type: 'socket-handler', socketHandler: handler } };
  expect(validateRouteConfig(socketOnly as unknown as IRouteConfig).errors).toEqual([
    `action.socketHandler: ${socketOnUdp}`,
    `action.datagramHandler: ${needsDatagramHandler('udp')}, got undefined`,
  ]);
  expect(normalizerError([socketOnly])?.message).toEqual(`routes[0] "u": action.socketHandler: ${socketOnUdp}`);
  // Domains with TLS that is not passed through: both problems, domains first.
  const terminated = { name: 'u', match: { ports: 443, transport: 'udp', domains: 'a.example.com' }, action: { type: 'forward', targets: t, tls: { mode: 'terminate', certificate: PEM } } };
  expect(validateRouteConfig(terminated as unknown as IRouteConfig).errors).toEqual([
    `match.domains: UDP routes relay datagrams: ${noDomain}`,
    `action.tls: UDP routes relay datagrams: ${noTerminate}`,
  ]);
  expect(normalizerError([terminated])?.message).toEqual(`routes[0] "u": match.domains: UDP routes relay datagrams: ${noDomain}`);
  // An unknown mode is the TLS checks' (and then the domains have no passthrough either).
  const bogus = { name: 'u', match: { ports: 443, transport: 'udp' }, action: { type: 'forward', targets: t, tls: { mode: 'quic' } } };
  expect(validateRouteConfig(bogus as unknown as IRouteConfig).errors).toEqual([`action.tls.mode: expected one of passthrough, terminate, terminate-and-reencrypt, got "quic"`]);
  expect(normalizerError([bogus])?.message).toEqual(`routes[0] "u": action.tls.mode: expected one of passthrough, terminate, terminate-and-reencrypt, got "quic"`);
});

tap.test('QUIC passthrough routes: the native config has the domains, passthrough TLS and UDP settings', async () => {
  const t = [{ host: '10.0.0.5', port: 443 }];
  const routes: TRecord[] = [
    { name: 'quic', match: { ports: 443, transport: 'udp', domains: 'a.example.com' }, action: { type: 'forward', targets: t, tls: { mode: 'passthrough' } } },
    {
      name: 'both',
      match: { ports: [443, 8443], transport: 'all', domains: ['b.example.com', '*.c.example.com'] },
      action: { type: 'forward', targets: t, tls: { mode: 'passthrough' }, udp: { sessionTimeout: 30000, maxSessionsPerIP: 10, maxDatagramSize: 1500 } },
    },
  ];
  const { config, warnings } = normalizeOptions({ routes } as unknown as ISmartProxyOptions);
  expect(warnings).toEqual([]);
  const [quic, both] = config.routes;
  expect(quic.match.transport).toEqual('udp');
  expect(quic.match.domains).toEqual(['a.example.com']);
  expect(quic.action.tls).toEqual({ mode: 'passthrough', certificate: null, versions: [], rejectUnauthorized: true, acme: null });
  expect(quic.action.udp).toEqual({ sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 });
  expect(quic.action.http3).toBeNull();
  expect(both.match.transport).toEqual('all');
  expect(both.match.domains).toEqual(['b.example.com', '*.c.example.com']);
  expect(both.action.tls?.mode).toEqual('passthrough');
  expect(both.action.udp).toEqual({ sessionTimeoutMs: 30000, maxSessionsPerIp: 10, maxDatagramSize: 1500 });
  // The same shape as a TCP passthrough route's, apart from the transport and the UDP settings.
  const tcp = normalizeOptions({ routes: [{ ...routes[0], match: { ports: 443, domains: 'a.example.com' } }] } as unknown as ISmartProxyOptions).config.routes[0];
  expect({ ...quic, match: { ...quic.match, transport: 'tcp' }, action: { ...quic.action, udp: null } }).toEqual(tcp);
  // A certificate on a passthrough route is what the TLS checks say of it: ignored, with a warning.
  const withCert = { ...routes[0], action: { type: 'forward', targets: t, tls: { mode: 'passthrough', certificate: PEM } } };
  expect(validateRouteConfig(withCert as unknown as IRouteConfig).errors).toEqual([]);
  const result = normalizeOptions({ routes: [withCert] } as unknown as ISmartProxyOptions);
  expect(result.warnings).toEqual(['routes[0] "quic": action.tls.certificate ignored: a passthrough route does not terminate TLS']);
  expect(result.config.routes[0].action.tls?.certificate).toBeNull();
});

/** A route serving HTTPS on 443 (TLS terminated with PEM), with `action` fields added or replaced. */
function http3Route(match: TRecord, action: TRecord): TRecord {
  return {
    name: 'h3',
    match: { ports: 443, domains: 'a.example.com', ...match },
    action: { type: 'forward', targets: [{ host: 'h', port: 8080 }], tls: { mode: 'terminate', certificate: PEM }, ...action },
  };
}

tap.test('HTTP/3 routes: action.http3 in the native config (altSvcMaxAge 86400 by default), null when disabled or absent', async () => {
  const routes: TRecord[] = [
    http3Route({}, { http3: { enabled: true } }),
    http3Route({}, { http3: { enabled: true, altSvcMaxAge: 600 } }),
    http3Route({ transport: 'tcp' }, { tls: { mode: 'terminate-and-reencrypt', certificate: PEM }, http3: { enabled: true, altSvcMaxAge: 0 } }),
    http3Route({}, { http3: { enabled: true, altSvcMaxAge: 4294967295 } }),
    http3Route({}, { http3: { enabled: false } }),
    http3Route({}, { http3: { enabled: false, altSvcMaxAge: 60 } }),
    http3Route({}, {}),
    http3Route({}, { http3: undefined }),
    // Disabled, HTTP/3 asks nothing of the route: passthrough, no TLS, UDP and socket-handler routes may carry it.
    http3Route({}, { tls: { mode: 'passthrough' }, http3: { enabled: false } }),
    http3Route({}, { tls: undefined, http3: { enabled: false } }),
    { name: 'h3', match: { ports: 443, transport: 'udp' }, action: { type: 'forward', targets: [{ host: 'h', port: 443 }], http3: { enabled: false } } },
    http3Route({}, { type: 'socket-handler', socketHandler: handler, targets: undefined, http3: { enabled: false } }),
  ];
  for (const route of routes) {
    expect({ route: JSON.stringify(route), errors: validateRouteConfig(route as unknown as IRouteConfig).errors }).toEqual({ route: JSON.stringify(route), errors: [] });
  }
  const { config } = normalizeOptions({ routes } as unknown as ISmartProxyOptions);
  expect(config.routes.map((r) => r.action.http3)).toEqual([
    { altSvcMaxAge: 86400 },
    { altSvcMaxAge: 600 },
    { altSvcMaxAge: 0 },
    { altSvcMaxAge: 4294967295 },
    null,
    null,
    null,
    null,
    null,
    null,
    null,
    null,
  ]);
  // The route's other settings are untouched by HTTP/3: still a TCP route with its TLS.
  expect(config.routes[0].match.transport).toEqual('tcp');
  expect(config.routes[0].action.udp).toBeNull();
  expect(config.routes[0].action.tls?.mode).toEqual('terminate');
  // The input is never changed.
  const frozen = http3Route({}, { http3: Object.freeze({ enabled: true }) });
  const before = JSON.stringify(frozen);
  normalizeOptions({ routes: [frozen] } as unknown as ISmartProxyOptions);
  validateRouteConfig(frozen as unknown as IRouteConfig);
  expect(JSON.stringify(frozen)).toEqual(before);
});

tap.test('HTTP/3 routes: bad action.http3 values, and routes that cannot serve HTTP/3, are refused by both validators naming the same field', async () => {
  const needsTerminate = `HTTP/3 ends QUIC, and its TLS, in the proxy: the route needs action.tls.mode 'terminate' or 'terminate-and-reencrypt'`;
  const noTerminate = `the proxy does not terminate TLS on them (only 'passthrough', routing QUIC by SNI); HTTP/3 termination is action.http3 on a TCP route`;
  const udpTls = `UDP routes relay datagrams: ${noTerminate}`;
  const on = { enabled: true };
  // [field, match, action, reason, the other problems validateRouteConfig lists after it]
  const cases: Array<[string, TRecord, TRecord, string, string[]]> = [
    ['action.http3', {}, { tls: undefined, http3: on }, `${needsTerminate} (this route has no action.tls)`, []],
    // TLS only towards the target: the client's side is plain, nothing ends QUIC.
    ['action.http3', {}, { tls: undefined, targets: [{ host: 'h', port: 8443, tls: { mode: 'terminate-and-reencrypt' } }], http3: on }, `${needsTerminate} (this route has no action.tls)`, []],
    ['action.http3', {}, { tls: { mode: 'passthrough' }, http3: on }, `${needsTerminate}, not 'passthrough'`, []],
    [
      'action.http3',
      { transport: 'udp', domains: undefined },
      { http3: on },
      `HTTP/3 takes the route's UDP ports for QUIC, which match.transport 'udp' would relay as datagrams: enable it on a route with match.transport 'tcp' (the default)`,
      [`action.tls: ${udpTls}`],
    ],
    [
      'action.http3',
      { transport: 'all', domains: undefined },
      { http3: { enabled: true, altSvcMaxAge: 60 } },
      `HTTP/3 takes the route's UDP ports for QUIC, which match.transport 'all' would relay as datagrams: enable it on a route with match.transport 'tcp' (the default)`,
      [`action.tls: UDP routes relay datagrams (match.transport 'all' takes UDP too): ${noTerminate}`],
    ],
    [
      'action.http3',
      {},
      { type: 'socket-handler', socketHandler: handler, targets: undefined, http3: on },
      `HTTP/3 requests go to the route's targets: a 'socket-handler' route hands connections to a function instead (use action.type 'forward')`,
      [],
    ],
    ['action.http3', {}, { options: { raw: true }, http3: on }, 'HTTP/3 carries HTTP requests, which a raw route (action.options.raw) does not read: it relays bytes as they come', []],
    ['action.http3', {}, { forwardingEngine: 'nftables', http3: on }, `HTTP/3 is served by the proxy itself: kernel forwarding (forwardingEngine: 'nftables') only moves packets`, []],
    ['action.http3', {}, { http3: true }, 'expected an object with enabled (true or false), got true', []],
    ['action.http3', {}, { http3: null }, 'expected an object with enabled (true or false), got null', []],
    ['action.http3.enabled', {}, { http3: {} }, 'required (true or false)', []],
    ['action.http3.enabled', {}, { http3: { enabled: 'yes' } }, 'expected true or false, got "yes"', []],
    ['action.http3.enabled', {}, { http3: { enabled: 1, altSvcMaxAge: 60 } }, 'expected true or false, got 1', []],
    ['action.http3.altSvcMaxAge', {}, { http3: { enabled: true, altSvcMaxAge: -1 } }, 'expected an integer number of seconds from 0 to 4294967295, got -1', []],
    ['action.http3.altSvcMaxAge', {}, { http3: { enabled: true, altSvcMaxAge: 1.5 } }, 'expected an integer number of seconds from 0 to 4294967295, got 1.5', []],
    ['action.http3.altSvcMaxAge', {}, { http3: { enabled: true, altSvcMaxAge: '60' } }, 'expected an integer number of seconds from 0 to 4294967295, got "60"', []],
    ['action.http3.altSvcMaxAge', {}, { http3: { enabled: false, altSvcMaxAge: 2 ** 32 } }, `expected an integer number of seconds from 0 to 4294967295, got ${2 ** 32}`, []],
    ['action.http3.altSvcMaxAge', {}, { http3: { enabled: true, altSvcMaxAge: Infinity } }, 'expected an integer number of seconds from 0 to 4294967295, got Infinity', []],
    ['action.http3.maxAge', {}, { http3: { enabled: true, maxAge: 60 } }, 'unknown field (expected one of enabled, altSvcMaxAge)', []],
  ];
  for (const [field, match, action, reason, others] of cases) {
    const route = http3Route(match, action);
    const errors = validateRouteConfig(route as unknown as IRouteConfig).errors;
    expect({ field, action: JSON.stringify(action), errors }).toEqual({ field, action: JSON.stringify(action), errors: [`${field}: ${reason}`, ...others] });
    expect({ field, action: JSON.stringify(action), thrown: normalizerError([route])?.message }).toEqual({
      field,
      action: JSON.stringify(action),
      thrown: `routes[0] "h3": ${field}: ${reason}`,
    });
  }
  // Every reason at once: validateRouteConfig lists them all, normalizeOptions names the first.
  const worst = http3Route({ transport: 'all', domains: undefined }, { type: 'socket-handler', socketHandler: handler, targets: undefined, tls: { mode: 'passthrough' }, options: { raw: true }, http3: on });
  const errors = validateRouteConfig(worst as unknown as IRouteConfig).errors.filter((e) => e.startsWith('action.http3: '));
  expect(errors).toHaveLength(4);
  expect(normalizerError([worst])?.message).toEqual(`routes[0] "h3": ${errors[0]}`);
});

tap.start();
