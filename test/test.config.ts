// Option normalisation (ts/utils/normalize-options.ts, ts/utils/port-range.ts): defaults, port forms,
// the 19.x `action.target` form, purity (inputs never mutated), refused later-issue features,
// warnings, and config errors surfacing through `new SmartProxy(...)` and `updateRoutes(...)`.
import { tap, expect } from '@push.rocks/tapbundle';
import path from 'node:path';
import * as net from 'node:net';

import { SmartProxy, SmartProxyConfigError } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { normalizeOptions } from '../ts/utils/normalize-options.js';
import { expandPortRange, isValidPort } from '../ts/utils/port-range.js';
import { connectAndRead, startTaggedServer, thrown } from './helpers/net.js';

type TOptions = Parameters<typeof normalizeOptions>[0];

/** Freezes an object graph (objects, arrays, and the properties of functions) in place. */
function deepFreeze<T>(value: T, seen = new Set<unknown>()): T {
  if ((typeof value === 'object' && value !== null) || typeof value === 'function') {
    if (seen.has(value)) return value;
    seen.add(value);
    for (const key of Reflect.ownKeys(value as object)) {
      const child = (value as Record<string | symbol, unknown>)[key];
      if (typeof value === 'function' && (key === 'caller' || key === 'arguments')) continue;
      deepFreeze(child, seen);
    }
    Object.freeze(value);
  }
  return value;
}

/**
 * The part of `actual` that `expected` describes: objects keep only the keys `expected` has, arrays
 * are compared element by element (their length included). Lets the assertions below pin the fields
 * they are about while the native config grows new ones.
 */
function subset(actual: unknown, expected: unknown): unknown {
  if (Array.isArray(expected) && Array.isArray(actual)) return actual.map((a, i) => (i < expected.length ? subset(a, expected[i]) : a));
  if (typeof expected === 'object' && expected !== null && !Array.isArray(expected) && typeof actual === 'object' && actual !== null && !Array.isArray(actual)) {
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(expected)) {
      out[key] = key in actual ? subset((actual as Record<string, unknown>)[key], (expected as Record<string, unknown>)[key]) : '<missing>';
    }
    return out;
  }
  return actual;
}

function expectSubset(actual: unknown, expected: unknown): void {
  expect(subset(actual, expected)).toEqual(expected);
}


async function rejected(promise: Promise<unknown>): Promise<Error | undefined> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  return undefined;
}

/** Normalises deep-frozen options, so any attempt to mutate the input throws a TypeError. */
function normalize(options: unknown) {
  return normalizeOptions(deepFreeze(options) as TOptions);
}

/** The config error for deep-frozen `options`; fails the test if there is none or another kind. */
function configError(options: unknown): SmartProxyConfigError {
  const err = thrown(() => normalize(options));
  if (!(err instanceof SmartProxyConfigError)) {
    throw new Error(`expected a SmartProxyConfigError for ${JSON.stringify(options)}, got ${String(err)}`);
  }
  expect(err.code).toEqual('ERR_SMARTPROXY_CONFIG');
  expect(err.name).toEqual('SmartProxyConfigError');
  return err;
}

const target = { host: '127.0.0.1', port: 9000 };

function route(ports: unknown, name?: string, extra: Record<string, unknown> = {}) {
  return { ...(name === undefined ? {} : { name }), match: { ports }, action: { type: 'forward', target }, ...extra };
}

/** Connects through the proxy, reads the backend's first line, and closes the connection. */
async function readLine(port: number): Promise<string> {
  const { data, socket } = await connectAndRead(port);
  socket.destroy();
  return data;
}

/** A free port chosen at random in 20000-40000 (probed by binding it on every interface). */
async function randomFreePort(): Promise<number> {
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 20001);
    const server = net.createServer();
    const ok = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, () => resolve(true));
    });
    if (ok) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      return port;
    }
  }
  throw new Error('no free port found in 20000-40000');
}

// ---------------------------------------------------------------------------------------------
// Defaults

tap.test('engine options get the documented defaults', async () => {
  const { config, warnings } = normalize({ routes: [] });
  expect(config.routes).toEqual([]);
  expect(warnings).toEqual([]);
  expect(config.options).toEqual({
    initialDataTimeoutMs: 120000,
    socketTimeoutMs: 3600000,
    inactivityTimeoutMs: 14400000,
    maxConnectionLifetimeMs: 86400000,
    gracefulShutdownTimeoutMs: 30000,
    maxConnectionsPerIp: 100,
    connectionRateLimitPerMinute: 300,
    noDelay: true,
    keepAlive: true,
    keepAliveInitialDelayMs: 10000,
    maxPendingDataSize: 10 * 1024 * 1024,
    workerThreads: null,
    enableDetailedLogging: false,
    logger: false,
    maxHeaderSize: 65536,
    headerTimeoutMs: 30000,
    http2MaxConcurrentStreams: 256,
    jsCallTimeoutMs: 30000,
    acceptProxyProtocol: false,
    proxyIps: [],
    sendProxyProtocol: 0,
    defaultSecurity: { ipAllowList: [], ipBlockList: [] },
    redis: null,
    trustForwardedHeaders: false,
    httpKeepAliveTimeoutMs: 120000,
    prometheus: null,
    admin: null,
    accessLog: null,
  });
});

tap.test('explicit engine options are carried over (ms values floored)', async () => {
  const { config } = normalize({
    routes: [],
    initialDataTimeout: 5000,
    socketTimeout: 1500.9,
    inactivityTimeout: 0,
    maxConnectionLifetime: 60000,
    gracefulShutdownTimeout: 250,
    maxConnectionsPerIP: 7,
    connectionRateLimitPerMinute: 42,
    noDelay: false,
    keepAlive: false,
    keepAliveInitialDelay: 1234,
    maxPendingDataSize: 4096,
    enableDetailedLogging: true,
    logger: () => undefined,
    workerThreads: 2,
    maxHeaderSize: 8192,
    headerTimeout: 2500,
    http2MaxConcurrentStreams: 16,
    jsCallTimeout: 1500.5,
    acceptProxyProtocol: true,
    proxyIPs: ['10.0.0.0/8'],
    sendProxyProtocol: 2,
    trustForwardedHeaders: true,
    httpKeepAliveTimeout: 5000.7,
    metrics: { prometheus: { port: 9100 } },
    admin: { port: 9101, host: '0.0.0.0', token: 'op-token' },
    accessLog: { enabled: true, path: '/var/log/smartproxy/access.log', format: 'combined' },
  });
  expect(config.options).toEqual({
    initialDataTimeoutMs: 5000,
    socketTimeoutMs: 1500,
    inactivityTimeoutMs: 0,
    maxConnectionLifetimeMs: 60000,
    gracefulShutdownTimeoutMs: 250,
    maxConnectionsPerIp: 7,
    connectionRateLimitPerMinute: 42,
    noDelay: false,
    keepAlive: false,
    keepAliveInitialDelayMs: 1234,
    maxPendingDataSize: 4096,
    workerThreads: 2,
    enableDetailedLogging: true,
    logger: true,
    maxHeaderSize: 8192,
    headerTimeoutMs: 2500,
    http2MaxConcurrentStreams: 16,
    jsCallTimeoutMs: 1500,
    acceptProxyProtocol: true,
    proxyIps: ['10.0.0.0/8'],
    sendProxyProtocol: 2,
    defaultSecurity: { ipAllowList: [], ipBlockList: [] },
    redis: null,
    trustForwardedHeaders: true,
    httpKeepAliveTimeoutMs: 5000,
    prometheus: { port: 9100, host: '127.0.0.1', path: '/metrics' },
    admin: { port: 9101, host: '0.0.0.0', token: 'op-token' },
    accessLog: { path: '/var/log/smartproxy/access.log', format: 'combined' },
  });
});

tap.test('a minimal route gets priority 0, null name/id, empty match lists and no tls', async () => {
  const { config, warnings } = normalize({ routes: [route(8080)] });
  expect(warnings).toEqual([]);
  expect(config.routes).toHaveLength(1);
  expectSubset(config.routes, [
    {
      index: 0,
      name: null,
      id: null,
      priority: 0,
      match: { ports: [8080], domains: [], clientIp: [], tlsVersion: [], transport: 'tcp' },
      action: { tls: null, targets: [{ hosts: ['127.0.0.1'], port: 9000, matchPorts: null, priority: 0 }], connectTimeoutMs: null, udp: null },
      security: { ipAllowList: [], ipBlockList: [], maxConnections: null },
    },
  ]);
});

tap.test('route fields are carried over: id, name, priority, domains, clientIp, tlsVersion, security, connectMs', async () => {
  const { config } = normalize({
    routes: [
      {
        id: 'r1',
        name: 'full',
        description: 'ignored by the engine',
        tags: ['a'],
        priority: 5,
        enabled: true,
        match: { ports: 443, domains: 'example.com', clientIp: ['10.0.0.0/8'], tlsVersion: ['TLSv1.3'] },
        action: { type: 'forward', tls: { mode: 'passthrough' }, targets: [target], timeouts: { connectMs: 1500 } },
        security: { ipAllowList: ['10.0.0.1'], ipBlockList: ['10.0.0.2'], maxConnections: 3 },
      },
    ],
  });
  const [r] = config.routes;
  expect(r.id).toEqual('r1');
  expect(r.name).toEqual('full');
  expect(r.priority).toEqual(5);
  // A single domain string becomes a list.
  expectSubset(r.match, { ports: [443], domains: ['example.com'], clientIp: ['10.0.0.0/8'], tlsVersion: ['TLSv1.3'] });
  expect(r.action.tls).toEqual({ mode: 'passthrough', certificate: null, versions: [], rejectUnauthorized: true, acme: null });
  expect(r.action.connectTimeoutMs).toEqual(1500);
  expect(r.security).toEqual({ ipAllowList: ['10.0.0.1'], ipBlockList: ['10.0.0.2'], maxConnections: 3, rateLimit: null, basicAuth: null, jwtAuth: null, forwardAuthorization: false });
});

tap.test('enabled: false drops the route, and the remaining routes keep their array index', async () => {
  const { config } = normalize({
    routes: [route(81, 'a'), route(82, 'off', { enabled: false }), route(83, 'c', { enabled: true })],
  });
  expect(config.routes.map((r) => [r.index, r.name, r.match.ports])).toEqual([
    [0, 'a', [81]],
    [2, 'c', [83]],
  ]);
});

tap.test('defaults.target and defaults.security apply to routes', async () => {
  const { config } = normalize({
    defaults: { target: { host: 'fallback.local', port: 7000 }, security: { ipAllowList: ['10.0.0.0/8'], ipBlockList: ['1.2.3.4'], maxConnections: 5 } },
    routes: [
      { name: 'uses-defaults', match: { ports: 80 }, action: { type: 'forward' } },
      { name: 'own', match: { ports: 81 }, action: { type: 'forward', target }, security: { maxConnections: 9 } },
    ],
  });
  expect(config.options.defaultSecurity).toEqual({ ipAllowList: ['10.0.0.0/8'], ipBlockList: ['1.2.3.4'] });
  const [withDefaults, own] = config.routes;
  expectSubset(withDefaults.action.targets, [{ hosts: ['fallback.local'], port: 7000, matchPorts: null, priority: 0 }]);
  expect(withDefaults.security.maxConnections).toEqual(5);
  expect(own.action.targets[0].hosts).toEqual(['127.0.0.1']);
  expect(own.security.maxConnections).toEqual(9);
});

// ---------------------------------------------------------------------------------------------
// Ports

tap.test('port-range helpers: isValidPort and expandPortRange', async () => {
  for (const good of [1, 80, 65535]) expect(isValidPort(good)).toBeTrue();
  for (const bad of [0, -1, 65536, 70000, 80.5, NaN, Infinity, '80', null, undefined, [], { from: 10, to: 5 }]) {
    expect(isValidPort(bad)).toBeFalse();
  }
  // A spec as match.ports takes it: ranges and lists too (the original 21.x helper).
  for (const good of [[80, { from: 8000, to: 8010 }], { from: 1, to: 2 }, [443]]) expect(isValidPort(good)).toBeTrue();
  expect(expandPortRange(80)).toEqual([80]);
  expect(expandPortRange([443, 80])).toEqual([80, 443]);
  expect(expandPortRange([{ from: 8000, to: 8003 }])).toEqual([8000, 8001, 8002, 8003]);
  expect(expandPortRange([9000, { from: 8001, to: 8002 }, 8002, { from: 8000, to: 8001 }])).toEqual([8000, 8001, 8002, 9000]);
  expect(expandPortRange([{ from: 5, to: 5 }])).toEqual([5]);
  // The input is not touched.
  const spec = deepFreeze([3, { from: 1, to: 2 }]);
  expect(expandPortRange(spec)).toEqual([1, 2, 3]);
});

tap.test('port forms: a number, an array, a {from,to} range and mixes become sorted unique ports', async () => {
  const cases: Array<[unknown, number[]]> = [
    [80, [80]],
    [65535, [65535]],
    [[443, 80, 8080], [80, 443, 8080]],
    [[80, 80], [80]],
    [[{ from: 3000, to: 3003 }], [3000, 3001, 3002, 3003]],
    [[{ from: 10, to: 10 }], [10]],
    [[8443, { from: 8000, to: 8002 }, 8001, { from: 7999, to: 8000 }], [7999, 8000, 8001, 8002, 8443]],
  ];
  for (const [ports, expected] of cases) {
    const { config } = normalize({ routes: [route(ports)] });
    expect(config.routes[0].match.ports).toEqual(expected);
  }
});

tap.test('invalid ports: errors name the route index, the route name and the field', async () => {
  const ok = route(80, 'ok');
  const cases: Array<[unknown[], string]> = [
    [[ok, ok, route(70000, 'api')], 'routes[2] "api": match.ports: 70000 is not a valid port'],
    [[route(0, 'zero')], 'routes[0] "zero": match.ports: 0 is not a valid port'],
    [[route(-1, 'neg')], 'routes[0] "neg": match.ports: -1 is not a valid port'],
    [[route(80.5, 'frac')], 'routes[0] "frac": match.ports: 80.5 is not a valid port'],
    [[route('80', 'str')], 'routes[0] "str": match.ports: "80" is not a valid port'],
    [[ok, route([80, 65536], 'arr')], 'routes[1] "arr": match.ports[1]: 65536 is not a valid port'],
    [[route([{ from: 9000, to: 8000 }], 'rev')], 'routes[0] "rev": match.ports[0]: range from 9000 to 8000 is empty (from > to)'],
    [[route([80, { from: 0, to: 5 }], 'lo')], 'routes[0] "lo": match.ports[1].from: 0 is not a valid port'],
    [[route([{ from: 1, to: 70000 }], 'hi')], 'routes[0] "hi": match.ports[0].to: 70000 is not a valid port'],
    [[route([{ from: 1.5, to: 3 }], 'fr')], 'routes[0] "fr": match.ports[0].from: 1.5 is not a valid port'],
    [[route([], 'empty')], 'routes[0] "empty": match.ports: at least one port is required'],
    [[{ name: 'none', match: {}, action: { type: 'forward', target } }], 'routes[0] "none": match.ports: required'],
    // Without a name, the route is named by its index alone.
    [[ok, route(70000)], 'routes[1]: match.ports: 70000 is not a valid port'],
  ];
  for (const [routes, message] of cases) {
    const err = configError({ routes });
    expect(err.message).toEqual(message);
    expect(err.path).toEqual(message.slice(0, message.indexOf(': ')));
  }
});

tap.test('invalid target ports and target match ports name the target field', async () => {
  const t1 = configError({ routes: [{ name: 'x', match: { ports: 80 }, action: { type: 'forward', target: { host: 'h', port: 0 } } }] });
  expect(t1.message).toStartWith(`routes[0] "x": action.target.port: 0 is not a valid port`);
  const t2 = configError({
    routes: [{ name: 'y', match: { ports: 80 }, action: { type: 'forward', targets: [target, { host: 'h', port: 70000 }] } }],
  });
  expect(t2.message).toStartWith(`routes[0] "y": action.targets[1].port: 70000 is not a valid port`);
  const t3 = configError({
    routes: [{ name: 'z', match: { ports: 80 }, action: { type: 'forward', targets: [{ host: 'h', port: 1, match: { ports: [80, 0] } }] } }],
  });
  expect(t3.message).toEqual(`routes[0] "z": action.targets[0].match.ports[1]: 0 is not a valid port`);
  // A valid target match.ports (ranges allowed) is expanded like match.ports.
  const { config } = normalize({
    routes: [{ match: { ports: [80, 81, 82] }, action: { type: 'forward', targets: [{ host: 'h', port: 1, match: { ports: [82, { from: 80, to: 81 }] } }, target] } }],
  });
  expect(config.routes[0].action.targets[0].matchPorts).toEqual([80, 81, 82]);
  expect(config.routes[0].action.targets[1].matchPorts).toBeNull();
});

// ---------------------------------------------------------------------------------------------
// The 19.x target form

tap.test('the 19.x action.target form becomes the 21.x action.targets form', async () => {
  const legacy = normalize({ routes: [{ name: 'r', match: { ports: 80 }, action: { type: 'forward', target: { host: 'backend', port: 8080 } } }] });
  const modern = normalize({ routes: [{ name: 'r', match: { ports: 80 }, action: { type: 'forward', targets: [{ host: 'backend', port: 8080 }] } }] });
  expectSubset(legacy.config.routes[0].action.targets, [{ hosts: ['backend'], port: 8080, matchPorts: null, priority: 0 }]);
  expect(legacy.config).toEqual(modern.config);
  expect(legacy.warnings).toEqual([]);

  // Host arrays and 'preserve' survive the conversion.
  const arr = normalize({ routes: [{ match: { ports: 80 }, action: { type: 'forward', target: { host: ['a', 'b'], port: 'preserve' } } }] });
  expectSubset(arr.config.routes[0].action.targets, [{ hosts: ['a', 'b'], port: 'preserve', matchPorts: null, priority: 0 }]);
});

tap.test('action.targets wins over action.target, with a warning naming the route', async () => {
  const { config, warnings } = normalize({
    routes: [{ name: 'both', match: { ports: 80 }, action: { type: 'forward', targets: [{ host: 'new', port: 2 }], target: { host: 'old', port: 1 } } }],
  });
  expectSubset(config.routes[0].action.targets, [{ hosts: ['new'], port: 2, matchPorts: null, priority: 0 }]);
  expect(warnings).toEqual(['routes[0] "both": both action.targets and action.target are set; action.target is ignored']);
});

tap.test('a forward route without any target is an error naming the route', async () => {
  const none = configError({ routes: [{ name: 'nt', match: { ports: 80 }, action: { type: 'forward' } }] });
  expect(none.message).toEqual('routes[0] "nt": action.targets: a forward route needs at least one target');
  const empty = configError({ routes: [{ name: 'et', match: { ports: 80 }, action: { type: 'forward', targets: [] } }] });
  expect(empty.message).toEqual('routes[0] "et": action.targets: a forward route needs at least one target');
  const badHost = configError({ routes: [{ name: 'bh', match: { ports: 80 }, action: { type: 'forward', target: { host: [], port: 1 } } }] });
  expect(badHost.message).toStartWith('routes[0] "bh": action.target.host: ');
});

// ---------------------------------------------------------------------------------------------
// Purity

tap.test('inputs are never mutated: deep-frozen options normalise, and a snapshot is unchanged', async () => {
  const options = {
    unknownOption: true,
    socketTimeout: 1000.5,
    defaults: { target: { host: 'd', port: 1 }, security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 4 } },
    routes: [
      { name: 'a', priority: 3, match: { ports: [{ from: 8002, to: 8003 }, 8000, 8000], domains: 'a.example.com' }, action: { type: 'forward', target: { host: ['x', 'y'], port: 1 } } },
      { name: 'b', match: { ports: 81 }, action: { type: 'forward', targets: [{ host: 'z', port: 2, match: { ports: [81] } }], target: { host: 'ignored', port: 3 } }, security: { ipBlockList: ['1.1.1.1'] } },
      { name: 'c', match: { ports: 82 }, action: { type: 'forward', security: { maxConnections: 2 } } },
      { name: 'off', enabled: false, match: { ports: 83 }, action: { type: 'forward', target } },
      { name: 'pt', match: { ports: 443, domains: ['*.example.com'] }, action: { type: 'forward', tls: { mode: 'passthrough', versions: ['TLSv1.3'] }, forwardingEngine: 'nftables', target } },
    ],
  };
  const jsonBefore = JSON.stringify(options);
  const cloneBefore = structuredClone(options);
  deepFreeze(options);
  const first = normalizeOptions(options as unknown as TOptions);
  expect(JSON.stringify(options)).toEqual(jsonBefore);
  expect(options).toEqual(cloneBefore);

  // The result shares no arrays with the input: changing it leaves the input alone.
  const a = first.config.routes[0];
  expect(a.match.ports).toEqual([8000, 8002, 8003]);
  expect(a.action.targets[0].hosts === (options.routes[0].action.target as { host: string[] }).host).toBeFalse();
  expect(first.config.options.defaultSecurity.ipAllowList === options.defaults.security.ipAllowList).toBeFalse();
  a.action.targets[0].hosts.push('mutated');
  first.config.options.defaultSecurity.ipAllowList.push('mutated');
  expect(first.config.routes.map((r) => r.name)).toEqual(['a', 'b', 'c', 'pt']);
  first.config.routes[3].match.domains.push('mutated');
  expect(JSON.stringify(options)).toEqual(jsonBefore);

  // Normalising twice gives the same result (nothing was consumed or cached from the input).
  const second = normalizeOptions(options as unknown as TOptions);
  const third = normalizeOptions(options as unknown as TOptions);
  expect(second).toEqual(third);
  expect(second.config.routes[0].action.targets[0].hosts).toEqual(['x', 'y']);
  expect(JSON.stringify(options)).toEqual(jsonBefore);
});

tap.test('inputs are not mutated when normalisation fails either', async () => {
  const options = { routes: [route(80, 'good'), route([80, { from: 5, to: 1 }], 'bad')] };
  const before = structuredClone(options);
  const err = configError(options); // deep-frozen inside
  expect(err.message).toEqual('routes[1] "bad": match.ports[1]: range from 5 to 1 is empty (from > to)');
  expect(options).toEqual(before);
});

// ---------------------------------------------------------------------------------------------
// Refused features

tap.test('features of later issues are refused with an error naming the route and the field', async () => {
  const base = (action: Record<string, unknown> = {}, rest: Record<string, unknown> = {}, match: Record<string, unknown> = {}) => ({
    routes: [route(80, 'ok'), { name: 'later', match: { ports: 80, ...match }, action: { type: 'forward', target, ...action }, ...rest }],
  });
  const cases: Array<[string, unknown]> = [
    ['action.timeouts.idleMs', base({ timeouts: { idleMs: 100 } })],
  ];
  for (const [field, options] of cases) {
    // `undefined` spread values are dropped so the route looks as a user would write it.
    const cleaned = options as { routes: Array<{ action: Record<string, unknown> }> };
    for (const r of cleaned.routes) for (const k of Object.keys(r.action)) if (r.action[k] === undefined) delete r.action[k];
    const err = configError(options);
    expect(err.message).toStartWith(`routes[1] "later": ${field}: `);
    expect(err.message).toInclude('not supported yet');
    expect(err.path).toEqual('routes[1] "later"');
  }
  // What stays accepted: plain round-robin, backendProtocol 'auto', sendProxyProtocol false, weight 1, connectMs.
  const accepted = normalize(base({ loadBalancing: { algorithm: 'round-robin' }, options: { backendProtocol: 'auto' }, sendProxyProtocol: false, timeouts: { connectMs: 10 } }));
  expect(accepted.config.routes[1].action.connectTimeoutMs).toEqual(10);
  const weightOne = normalize({ routes: [{ match: { ports: 80 }, action: { type: 'forward', targets: [{ host: 'h', port: 1, weight: 1 }] } }] });
  expect(weightOne.config.routes[0].action.targets).toHaveLength(1);
});

tap.test("backendProtocol 'http3': TLS to every target (the route's or the target's own), no PROXY header; emitted as 'http3'", async () => {
  const PEM = { key: 'K', cert: 'C' };
  const h3 = (action: Record<string, unknown>) => ({ routes: [{ name: 'h3b', match: { ports: 443 }, action: { type: 'forward', options: { backendProtocol: 'http3' }, ...action } }] });
  const plain = (field: string) => `'http3' speaks QUIC, which is TLS, to the targets: ${field} is plain (use action.tls.mode 'terminate-and-reencrypt', or the target's tls)`;
  // A plain target: no TLS on the route, TLS ending at the proxy ('terminate'), or the target's own 'terminate'.
  const refused: Array<[Record<string, unknown>, string]> = [
    [{ target }, `action.options.backendProtocol: ${plain('action.target')}`],
    [{ targets: [{ host: 'a', port: 1 }] }, `action.options.backendProtocol: ${plain('action.targets[0]')}`],
    [{ tls: { mode: 'terminate', certificate: PEM }, target }, `action.options.backendProtocol: ${plain('action.target')}`],
    [
      { tls: { mode: 'terminate-and-reencrypt', certificate: PEM }, targets: [{ host: 'a', port: 1 }, { host: 'b', port: 1, tls: { mode: 'terminate' } }] },
      `action.options.backendProtocol: ${plain('action.targets[1]')}`,
    ],
    // A PROXY header goes first on a TCP connection: QUIC has none.
    [
      { tls: { mode: 'terminate-and-reencrypt', certificate: PEM }, targets: [{ host: 'a', port: 1, sendProxyProtocol: 2 }] },
      'action.targets[0].sendProxyProtocol: a PROXY header goes first on a TCP connection: HTTP/3 targets have none',
    ],
    [
      { targets: [{ host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt' }, sendProxyProtocol: true }] },
      'action.targets[0].sendProxyProtocol: a PROXY header goes first on a TCP connection: HTTP/3 targets have none',
    ],
    [
      { tls: { mode: 'terminate-and-reencrypt', certificate: PEM }, target: { ...target, sendProxyProtocol: 1 } },
      'action.target.sendProxyProtocol: a PROXY header goes first on a TCP connection: HTTP/3 targets have none',
    ],
  ];
  for (const [action, message] of refused) {
    const err = configError(h3(action));
    expect({ action: JSON.stringify(action), message: err.message }).toEqual({ action: JSON.stringify(action), message: `routes[0] "h3b": ${message}` });
    expect(err.path).toEqual('routes[0] "h3b"');
  }
  // defaults.target is checked as the route's own target.
  const fromDefaults = configError({ defaults: { target }, routes: [{ name: 'h3b', match: { ports: 80 }, action: { type: 'forward', options: { backendProtocol: 'http3' } } }] });
  expect(fromDefaults.message).toEqual(`routes[0] "h3b": action.options.backendProtocol: ${plain('defaults.target')}`);

  // Accepted, and emitted as 'http3': the route re-encrypts, or each target has its own TLS.
  const reencrypt = normalize(h3({ tls: { mode: 'terminate-and-reencrypt', certificate: PEM }, targets: [{ host: 'a', port: 1, sendProxyProtocol: false }] }));
  expect(reencrypt.config.routes[0].action.backendProtocol).toEqual('http3');
  expect(reencrypt.config.routes[0].action.targets[0].sendProxyProtocol).toEqual(0);
  const ownTls = normalize(h3({ targets: [{ host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt' } }] }));
  expect(ownTls.config.routes[0].action.backendProtocol).toEqual('http3');
  expect(ownTls.config.routes[0].action.targets[0].tls?.mode).toEqual('terminate-and-reencrypt');
  // The target's own tls wins over the route's: TLS to it although the route's TLS ends at the proxy.
  const terminated = normalize(h3({ tls: { mode: 'terminate', certificate: PEM }, targets: [{ host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt' } }] }));
  expect(terminated.config.routes[0].action.backendProtocol).toEqual('http3');
  // Other protocols are emitted as given, 'auto' by default.
  expect(normalize(h3({ target, options: { backendProtocol: 'http2' } })).config.routes[0].action.backendProtocol).toEqual('http2');
  expect(normalize(h3({ target, options: {} })).config.routes[0].action.backendProtocol).toEqual('auto');
  // A 'socket-handler' route has no targets to speak HTTP/3 to.
  expect(normalize(h3({ type: 'socket-handler', socketHandler: () => undefined })).config.routes[0].action.backendProtocol).toEqual('http3');

  // The engine takes the native form as the normaliser writes it (not started).
  const engine = thrown(() => new SmartProxy({
    routes: [{ name: 'h3b', match: { ports: 8443 }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: 9443, tls: { mode: 'terminate-and-reencrypt' } }], options: { backendProtocol: 'http3' } } }],
  }));
  expect(engine?.message).toBeUndefined();
});

tap.test('match.headers: strings stay exact, RegExps go to the engine as source and flags; refused ones name the field', async () => {
  const { config } = normalize({
    routes: [{
      name: 'h',
      match: { ports: 80, headers: { 'x-exact': '^v2$', 'x-version': /^v2\//gi } },
      action: { type: 'forward', targets: [{ host: 'h', port: 1, match: { headers: { 'x-channel': /beta/ } } }] },
    }],
  });
  expect(config.routes[0].match.headers).toEqual([
    { name: 'x-exact', value: '^v2$', regex: null },
    { name: 'x-version', value: null, regex: { source: '^v2\\/', flags: 'gi' } },
  ]);
  expect(config.routes[0].action.targets[0].matchHeaders).toEqual([{ name: 'x-channel', value: null, regex: { source: 'beta', flags: '' } }]);
  const withHeaders = (headers: unknown) => ({ routes: [{ name: 'h', match: { ports: 80, headers }, action: { type: 'forward', target } }] });
  expect(configError(withHeaders({ 'x-a': /^(?=a)/ })).message).toEqual(
    `routes[0] "h": match.headers.x-a: /^(?=a)/ is not supported by the engine's regex matcher: lookaround ((?=, (?!, (?<=, (?<!) is not supported`,
  );
  expect(configError(withHeaders({ 'x-a': /(a)\1/ })).message).toStartWith('routes[0] "h": match.headers.x-a: /(a)\\1/ is not supported by the engine');
  // Inside a class, or escaped, these are ordinary characters.
  expect(normalize(withHeaders({ 'x-a': /[(?=]\(?!/ })).config.routes[0].match.headers[0].regex).toEqual({ source: '[(?=]\\(?!', flags: '' });
  expect(configError(withHeaders({ 'x-a': 5 })).message).toEqual('routes[0] "h": match.headers.x-a: expected a string or a RegExp, got 5');
});

tap.test('target tls and sendProxyProtocol: the native form, defaults, warnings and errors naming the target', async () => {
  const targets = (...list: unknown[]) => ({ routes: [{ name: 't', match: { ports: 443 }, action: { type: 'forward', targets: list } }] });
  const { config, warnings } = normalize(targets(
    { host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt', certificate: { key: 'K', cert: 'C', ca: 'A' }, versions: ['TLSv1.3'], rejectUnauthorized: false }, sendProxyProtocol: 2 },
    { host: 'b', port: 1, tls: { mode: 'terminate' }, sendProxyProtocol: false },
    { host: 'c', port: 1, sendProxyProtocol: true },
    { host: 'd', port: 1 },
  ));
  const [a, b, c, d] = config.routes[0].action.targets;
  expect([a.tls, a.sendProxyProtocol]).toEqual([{ mode: 'terminate-and-reencrypt', ca: 'A', versions: ['TLSv1.3'], rejectUnauthorized: false }, 2]);
  expect([b.tls, b.sendProxyProtocol]).toEqual([{ mode: 'terminate', ca: null, versions: [], rejectUnauthorized: true }, 0]);
  expect([c.tls, c.sendProxyProtocol, d.tls, d.sendProxyProtocol]).toEqual([null, 1, null, null]);
  // A target presents no certificate of its own: key and cert are ignored, with a warning.
  expect(warnings).toEqual(['routes[0] "t": action.targets[0].tls.certificate.key/cert ignored: the proxy presents no certificate to a target']);
  const plainWarnings = normalize(targets({ host: 'a', port: 1, tls: { mode: 'terminate', rejectUnauthorized: false } })).warnings;
  expect(plainWarnings).toEqual([`routes[0] "t": action.targets[0].tls.rejectUnauthorized ignored: 'terminate' speaks plain HTTP to this target`]);
  const cases: Array<[unknown, string]> = [
    [{ mode: 'passthrough' }, 'action.targets[0].tls.mode: a target cannot pass TLS through'],
    [{ mode: 'reencrypt' }, `action.targets[0].tls.mode: expected 'terminate' or 'terminate-and-reencrypt', got "reencrypt"`],
    [{ mode: 'terminate-and-reencrypt', certificate: 'auto' }, 'action.targets[0].tls.certificate: a target obtains no certificate'],
    [{ mode: 'terminate-and-reencrypt', versions: ['SSLv3'] }, 'action.targets[0].tls.versions[0]: "SSLv3" is not one of'],
    [{ mode: 'terminate-and-reencrypt', rejectUnauthorized: 'no' }, 'action.targets[0].tls.rejectUnauthorized: expected true or false'],
    [{ mode: 'terminate-and-reencrypt', bogus: 1 }, 'action.targets[0].tls.bogus: unknown field'],
  ];
  for (const [tls, message] of cases) expect(configError(targets({ host: 'a', port: 1, tls })).message).toStartWith(`routes[0] "t": ${message}`);
  expect(configError(targets({ host: 'a', port: 1, sendProxyProtocol: 3 })).message).toEqual('routes[0] "t": action.targets[0].sendProxyProtocol: expected true, false, 1 or 2, got 3');
  // defaults.target takes them too.
  const fromDefaults = normalize({ defaults: { target: { host: 'h', port: 1, sendProxyProtocol: 2 } }, routes: [{ match: { ports: 80 }, action: { type: 'forward' } }] });
  expect(fromDefaults.config.routes[0].action.targets[0].sendProxyProtocol).toEqual(2);
  // What the engine refuses, it refuses at construction, naming the target.
  const engineError = (route: IRouteConfig): string => (thrown(() => new SmartProxy({ routes: [route] })) as Error).message;
  expect(engineError({ name: 'p', match: { ports: 443 }, action: { type: 'forward', targets: [{ host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt' } }], tls: { mode: 'passthrough' } } }))
    .toStartWith(`routes[0] "p": action.targets[0].tls: a passthrough route relays the client's own TLS`);
  expect(engineError({ name: 'r', match: { ports: 80 }, action: { type: 'forward', targets: [{ host: 'a', port: 1, tls: { mode: 'terminate-and-reencrypt', versions: ['TLSv1.1'] } }] } }))
    .toStartWith('routes[0] "r": action.targets[0].tls: TLSv1.0 and TLSv1.1 are not supported');
});

tap.test('loadBalancing and target weights: defaults, health-check defaults, and errors naming the field', async () => {
  const lb = (loadBalancing: unknown, targets: unknown[] = [{ host: 'a', port: 1 }, { host: 'b', port: 1, weight: 3 }]) =>
    ({ routes: [{ name: 'lb', match: { ports: 80 }, action: { type: 'forward', targets, loadBalancing } }] });
  const plain = normalize(lb(undefined)).config.routes[0].action;
  expect(plain.loadBalancing).toEqual({ algorithm: 'round-robin', healthCheck: null, affinity: null });
  expect(plain.targets.map((t) => t.weight)).toEqual([1, 3]);
  const checked = normalize(lb({ algorithm: 'least-connections', healthCheck: { path: '/health', interval: 200 } })).config.routes[0].action.loadBalancing;
  expect(checked).toEqual({ algorithm: 'least-connections', healthCheck: { path: '/health', intervalMs: 200, timeoutMs: 5000, unhealthyThreshold: 3, healthyThreshold: 2 }, affinity: null });
  expect(normalize(lb({ algorithm: 'ip-hash' })).config.routes[0].action.loadBalancing.algorithm).toEqual('ip-hash');
  expect(configError(lb({ algorithm: 'random' })).message).toStartWith('routes[0] "lb": action.loadBalancing.algorithm: ');
  expect(configError(lb({ healthCheck: { path: 'health' } })).message).toStartWith('routes[0] "lb": action.loadBalancing.healthCheck.path: ');
  expect(configError(lb({ healthCheck: { interval: 0 } })).message).toStartWith('routes[0] "lb": action.loadBalancing.healthCheck.interval: ');
  expect(configError(lb({ healthCheck: { every: 5 } })).message).toStartWith('routes[0] "lb": action.loadBalancing.healthCheck.every: ');
  expect(configError(lb(undefined, [{ host: 'a', port: 1, weight: 0 }])).message).toStartWith('routes[0] "lb": action.targets[0].weight: ');
  expect(configError(lb(undefined, [{ host: 'a', port: 1, weight: 1.5 }])).message).toStartWith('routes[0] "lb": action.targets[0].weight: ');
  // Affinity: defaults, and each field's errors.
  expect(normalize(lb({ affinity: { key: 'header:Mcp-Session-Id' } })).config.routes[0].action.loadBalancing.affinity).toEqual({ key: 'header:Mcp-Session-Id', ttlSeconds: 3600, rejectUnknown: false, maxKeys: 100000 });
  expect(normalize(lb({ affinity: { key: 'cookie:sid', ttlSeconds: 60, onUnknown: 'reject' } })).config.routes[0].action.loadBalancing.affinity).toEqual({ key: 'cookie:sid', ttlSeconds: 60, rejectUnknown: true, maxKeys: 100000 });
  expect(configError(lb({ affinity: { key: 'path' } })).message).toStartWith('routes[0] "lb": action.loadBalancing.affinity.key: ');
  expect(configError(lb({ affinity: { key: 'ip', ttlSeconds: 0 } })).message).toStartWith('routes[0] "lb": action.loadBalancing.affinity.ttlSeconds: ');
  expect(configError(lb({ affinity: { key: 'ip', onUnknown: 'drop' } })).message).toStartWith('routes[0] "lb": action.loadBalancing.affinity.onUnknown: ');
  expect(configError({ routes: [], redis: { url: 'http://x' } }).message).toStartWith('options: redis.url: ');
  expect(normalize(lb({ affinity: { key: 'ip', maxKeys: 10 } })).config.routes[0].action.loadBalancing.affinity?.maxKeys).toEqual(10);
  expect(configError(lb({ affinity: { key: 'ip', maxKeys: 0 } })).message).toStartWith('routes[0] "lb": action.loadBalancing.affinity.maxKeys: ');
});

tap.test('Edge hygiene keys reach the native config with their defaults (always sent)', async () => {
  const plain = { name: 'p', match: { ports: 80 }, action: { type: 'forward', target } };
  const secured = {
    name: 's',
    match: { ports: 81 },
    action: { type: 'forward', target, loadBalancing: { affinity: { key: 'ip' } } },
    security: { rateLimit: { enabled: true, maxRequests: 5, window: 1 }, jwtAuth: { enabled: true, secret: 'k' } },
  };
  const defaults = normalize({ routes: [plain, secured] }).config;
  expectSubset(defaults.options, { trustForwardedHeaders: false, httpKeepAliveTimeoutMs: 120000 });
  expect(defaults.routes[0].action.normalizePath).toEqual(false);
  expect(defaults.routes[1].action.loadBalancing.affinity?.maxKeys).toEqual(100000);
  expect(defaults.routes[1].security.rateLimit?.maxKeys).toEqual(100000);
  expect(defaults.routes[1].security.jwtAuth?.requireExp).toEqual(true);

  const explicit = normalize({
    trustForwardedHeaders: true,
    proxyIPs: ['10.0.0.1'],
    httpKeepAliveTimeout: 1500,
    routes: [
      {
        ...secured,
        action: { ...secured.action, normalizePath: true, loadBalancing: { affinity: { key: 'ip', maxKeys: 7 } } },
        security: { rateLimit: { enabled: true, maxRequests: 5, window: 1, maxKeys: 9 }, jwtAuth: { enabled: true, secret: 'k', requireExp: false } },
      },
    ],
  });
  expectSubset(explicit.config.options, { trustForwardedHeaders: true, httpKeepAliveTimeoutMs: 1500 });
  expect(explicit.warnings).toEqual([]);
  const [r] = explicit.config.routes;
  expect(r.action.normalizePath).toEqual(true);
  expect(r.action.loadBalancing.affinity?.maxKeys).toEqual(7);
  expect(r.security.rateLimit?.maxKeys).toEqual(9);
  expect(r.security.jwtAuth?.requireExp).toEqual(false);

  // Trusting forwarded headers with nobody trusted does nothing: said once.
  expect(normalize({ routes: [], trustForwardedHeaders: true }).warnings).toEqual([
    "trustForwardedHeaders is set but proxyIPs is empty: no client's forwarded headers are kept",
  ]);
  expect(configError({ routes: [], httpKeepAliveTimeout: 0 }).message).toEqual('options: httpKeepAliveTimeout: expected a positive number of milliseconds, got 0');
  expect(configError({ routes: [plain], trustForwardedHeaders: 1 }).message).toEqual('options: trustForwardedHeaders: expected true or false, got 1');
});

tap.test("certificate 'auto': global acme merged with the route's tls.acme, defaults, aliases and errors", async () => {
  const auto = (tls: Record<string, unknown>, extra: Record<string, unknown> = {}, domains: unknown = ['A.example.com.', '*.example.com', 'b.example.com']) =>
    ({ routes: [{ name: 'site', match: { ports: 443, domains }, action: { type: 'forward', target, tls: { mode: 'terminate', certificate: 'auto', ...tls } } }], ...extra });
  const { config } = normalize(auto({}, { acme: { email: 'ops@example.com' } }));
  expect(config.routes[0].action.tls).toEqual({
    mode: 'terminate', certificate: null, versions: [], rejectUnauthorized: true,
    acme: {
      certName: 'site', domains: ['a.example.com', 'b.example.com'], email: 'ops@example.com',
      directoryUrl: 'https://acme-staging-v02.api.letsencrypt.org/directory', directoryCaFile: null,
      certificateStore: path.resolve('./certs'), port: 80, renewThresholdDays: 30, autoRenew: true, renewCheckIntervalSecs: 86400,
      customProvisioning: false,
    },
  });
  const merged = normalize(auto(
    { acme: { email: 'route@example.com', challengePort: 8080, renewBeforeDays: 10 } },
    { acme: { accountEmail: 'global@example.com', useProduction: true, certificateStore: '/var/certs', renewCheckIntervalHours: 0.5, autoRenew: false }, certProvisionFunction: async () => 'http01' as const },
  )).config.routes[0].action.tls?.acme;
  expect(merged?.email).toEqual('route@example.com');
  expect(merged?.port).toEqual(8080);
  expect(merged?.renewThresholdDays).toEqual(10);
  expect(merged?.directoryUrl).toEqual('https://acme-v02.api.letsencrypt.org/directory');
  expect(merged?.certificateStore).toEqual('/var/certs');
  expect(merged?.renewCheckIntervalSecs).toEqual(1800);
  expect(merged?.autoRenew).toBeFalse();
  expect(merged?.customProvisioning).toBeTrue();
  const own = normalize(auto({}, { acme: { email: 'e@x', directoryUrl: 'https://127.0.0.1:14000/dir', directoryCaFile: '/tmp/ca.pem' } })).config.routes[0].action.tls?.acme;
  expect(own?.directoryUrl).toEqual('https://127.0.0.1:14000/dir');
  expect(own?.directoryCaFile).toEqual('/tmp/ca.pem');

  expect(configError(auto({})).message).toStartWith(`routes[0] "site": action.tls.certificate: 'auto' needs an ACME account email`);
  expect(configError(auto({}, { acme: { email: 'e@x' } }, '*.example.com')).message).toInclude('at least one name without wildcards');
  expect(configError(auto({}, { acme: { email: 'e@x', port: 0 } })).message).toStartWith('routes[0] "site": acme.port: ');
  expect(configError(auto({ acme: { email: 'e@x', bogus: 1 } })).message).toStartWith('routes[0] "site": action.tls.acme.bogus: ');
  // An unnamed route's certificate is named by its first domain.
  const unnamed = normalize({ acme: { email: 'e@x' }, routes: [{ match: { ports: 443, domains: 'c.example.com' }, action: { type: 'forward', target, tls: { mode: 'terminate', certificate: 'auto' } } }] });
  expect(unnamed.config.routes[0].action.tls?.acme?.certName).toEqual('c.example.com');
});

tap.test('terminating TLS routes carry their certificate; a missing or bad certificate names the field', async () => {
  const { config } = normalize({
    routes: [{ name: 'tls', match: { ports: 443 }, action: { type: 'forward', target, tls: { mode: 'terminate-and-reencrypt', certificate: { key: 'K', cert: 'C', ca: 'A' }, versions: ['TLSv1.3'], rejectUnauthorized: false } } }],
  });
  expect(config.routes[0].action.tls).toEqual({ mode: 'terminate-and-reencrypt', certificate: { key: 'K', cert: 'C', ca: 'A' }, versions: ['TLSv1.3'], rejectUnauthorized: false, acme: null });
  const noCert = configError({ routes: [{ name: 't', match: { ports: 443 }, action: { type: 'forward', target, tls: { mode: 'terminate' } } }] });
  expect(noCert.message).toStartWith('routes[0] "t": action.tls.certificate: ');
  const badVersion = configError({ routes: [{ name: 't', match: { ports: 443 }, action: { type: 'forward', target, tls: { mode: 'terminate', certificate: { key: 'K', cert: 'C' }, versions: ['SSLv3'] } } }] });
  expect(badVersion.message).toStartWith('routes[0] "t": action.tls.versions[0]: ');
  // PEM that does not parse is refused by the engine, with the same route-naming format.
  let engineError: unknown;
  try {
    new SmartProxy({ routes: [{ name: 't', match: { ports: 443 }, action: { type: 'forward', target, tls: { mode: 'terminate', certificate: { key: 'K', cert: 'C' } } } }] });
  } catch (err) {
    engineError = err;
  }
  expect((engineError as Error).message).toStartWith('routes[0] "t": action.tls.certificate: cert:');
});

tap.test('options-level features and type errors are named "options"', async () => {
  const cases: Array<[unknown, string]> = [
    [null, 'options: expected an object, got null'],
    [{}, 'options: routes: expected an array of routes, got undefined'],
    [{ routes: {} }, 'options: routes: expected an array of routes, got {}'],
    [{ routes: [], socketTimeout: -1 }, 'options: socketTimeout: expected a non-negative number, got -1'],
    [{ routes: [], initialDataTimeout: '5s' }, 'options: initialDataTimeout: expected a non-negative number, got "5s"'],
    [{ routes: [], noDelay: 'yes' }, 'options: noDelay: expected true or false, got "yes"'],
    [{ routes: [], workerThreads: 0 }, 'options: workerThreads: expected a positive integer, got 0'],
    [{ routes: [], proxyIPs: '1.2.3.4' }, 'options: proxyIPs: expected an array of strings, got "1.2.3.4"'],
    [{ routes: [], defaults: 5 }, 'options: defaults: expected an object, got 5'],
  ];
  for (const [options, message] of cases) {
    const err = configError(options);
    expect(err.message).toEqual(message);
    expect(err.path).toEqual('options');
  }
  for (const [key, value, message] of [
    ['acceptProxyProtocol', 'yes', 'options: acceptProxyProtocol: expected true or false, got "yes"'],
    ['sendProxyProtocol', 3, 'options: sendProxyProtocol: expected true, false, 1 or 2, got 3'],
  ] as const) {
    expect(configError({ routes: [], [key]: value }).message).toEqual(message);
  }
});

tap.test('unknown fields: an error inside routes, a single warning at the top level', async () => {
  const routeKey = configError({ routes: [route(80, 'u', { bogus: 1 })] });
  expect(routeKey.message).toStartWith('routes[0] "u": bogus: unknown field');
  const actionKey = configError({ routes: [{ name: 'u', match: { ports: 80 }, action: { type: 'forward', target, bogus: 1 } }] });
  expect(actionKey.message).toStartWith('routes[0] "u": action.bogus: unknown field');
  const matchKey = configError({ routes: [{ name: 'u', match: { ports: 80, sni: 'x' }, action: { type: 'forward', target } }] });
  expect(matchKey.message).toStartWith('routes[0] "u": match.sni: unknown field');
  const targetKey = configError({ routes: [{ name: 'u', match: { ports: 80 }, action: { type: 'forward', targets: [target, { host: 'h', port: 1, hots: 'x' }] } }] });
  expect(targetKey.message).toStartWith('routes[0] "u": action.targets[1].hots: unknown field');
  const securityKey = configError({ routes: [route(80, 'u', { security: { allow: [] } })] });
  expect(securityKey.message).toStartWith('routes[0] "u": security.allow: unknown field');

  const { warnings, config } = normalize({ routes: [route(80)], foo: 1, bar: 'x' });
  expect(warnings).toEqual(['unknown options ignored: foo, bar']);
  expect(config.routes).toHaveLength(1);
});

tap.test('other route-level errors name the route and the field', async () => {
  const cases: Array<[unknown, string]> = [
    [{ routes: [route(80, 'a'), 'nope'] }, 'routes[1]: .: expected a route object, got "nope"'],
    [{ routes: [{ ...route(80), name: 5 }] }, 'routes[0]: name: expected a string, got 5'],
    [{ routes: [route(80, 'p', { priority: 'high' })] }, 'routes[0] "p": priority: expected a number, got "high"'],
    [{ routes: [route(80, 'i', { id: 7 })] }, 'routes[0] "i": id: expected a string, got 7'],
    [{ routes: [{ name: 'm', action: { type: 'forward', target } }] }, 'routes[0] "m": match: expected an object with ports, got undefined'],
    [{ routes: [{ name: 't', match: { ports: 80 }, action: { type: 'proxy', target } }] }, `routes[0] "t": action.type: expected 'forward' or 'socket-handler', got "proxy"`],
    [{ routes: [route(80, 'tv', { match: { ports: 80, tlsVersion: ['TLSv1.4'] } })] }, 'routes[0] "tv": match.tlsVersion[0]: "TLSv1.4" is not one of TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3'],
    [{ routes: [route(80, 'd', { match: { ports: 80, domains: [''] } })] }, 'routes[0] "d": match.domains[0]: expected a non-empty string, got ""'],
    [{ routes: [route(80, 'mc', { security: { maxConnections: 0 } })] }, 'routes[0] "mc": security.maxConnections: expected a positive integer, got 0'],
    [{ routes: [route(80, 'mn', { security: { maxConnections: NaN } })] }, 'routes[0] "mn": security.maxConnections: expected a positive integer, got NaN'],
    [{ routes: [route(80, 'wp', { action: { type: 'forward', target, websocket: { pingInterval: -5 } } })] }, 'routes[0] "wp": action.websocket.pingInterval: expected a positive integer, got -5'],
    [{ routes: [route(80, 'wm', { action: { type: 'forward', target, websocket: { maxPayloadSize: 1.5 } } })] }, 'routes[0] "wm": action.websocket.maxPayloadSize: expected a positive integer, got 1.5'],
    [{ routes: [route(80, 'as', { action: { type: 'forward', target, security: { maxConnections: Infinity } } })] }, 'routes[0] "as": action.security.maxConnections: expected a positive integer, got Infinity'],
    [{ routes: [route(80, 'al', { action: { type: 'forward', target, security: { ipAllowList: 'x' } } })] }, 'routes[0] "al": action.security.ipAllowList: expected an array of strings, got "x"'],
    [{ routes: [route(80, 'sh', { action: { type: 'socket-handler' } })] }, `routes[0] "sh": action.socketHandler: a 'socket-handler' route needs a socketHandler function, got undefined`],
    [{ routes: [route(80, 'hf', { action: { type: 'forward', target: { host: 5, port: 1 } } })] }, 'routes[0] "hf": action.target.host: expected a host name, a non-empty array of them or a function, got 5'],
    [{ routes: [route(80, 'tm', { action: { type: 'forward', target, tls: { mode: 'bogus' } } })] }, 'routes[0] "tm": action.tls.mode: expected one of passthrough, terminate, terminate-and-reencrypt, got "bogus"'],
  ];
  for (const [options, message] of cases) {
    expect(configError(options).message).toEqual(message);
  }
});

// ---------------------------------------------------------------------------------------------
// Warnings

tap.test('normalizeOptions returns { config, warnings, functionIds }; a clean config has no warnings', async () => {
  const result = normalize({ routes: [route(80, 'clean')] });
  expect(Object.keys(result).sort()).toEqual(['config', 'functionIds', 'warnings']);
  expect(result.functionIds.size).toEqual(0);
  expect(Object.keys(result.config).sort()).toEqual(['options', 'routes']);
  expect(Array.isArray(result.warnings)).toBeTrue();
  expect(result.warnings).toEqual([]);
});

tap.test('warnings: ignored options, nftables, ignored passthrough tls settings, preserveSourceIP; redis is carried over', async () => {
  const { warnings, config } = normalize({
    routes: [
      { name: 'nft', match: { ports: 80 }, action: { type: 'forward', nftables: { protocol: 'tcp' }, target } },
      { name: 'pt', match: { ports: 443 }, action: { type: 'forward', tls: { mode: 'passthrough', certificate: { key: 'k', cert: 'c' }, versions: ['TLSv1.3'] }, target } },
      { name: 'sec', match: { ports: 81 }, action: { type: 'forward', target, security: { maxConnections: 2 } }, security: { maxConnections: 3 } },
    ],
    defaults: { preserveSourceIP: true },
    redis: { url: 'redis://localhost' },
    surprise: true,
  });
  expect(warnings).toContain('unknown options ignored: surprise');
  expect(warnings).toContain('routes[0] "nft": action.nftables is ignored without forwardingEngine: \'nftables\'');
  expect(warnings).toContain('routes[1] "pt": action.tls.certificate, versions ignored: a passthrough route does not terminate TLS');
  expect(warnings).toContain('routes[2] "sec": both security and action.security are set; action.security is ignored');
  expect(warnings).toContain('defaults.preserveSourceIP is not supported yet and is ignored');
  expect(warnings).toHaveLength(5);
  expect(config.options.redis).toEqual({ url: 'redis://localhost', keyPrefix: 'smartproxy:', encryptionKey: null, syncIntervalMs: 5000 });
  // The warned-about routes are still normalised; route-level security wins over action.security.
  expect(config.routes).toHaveLength(3);
  expect(config.routes[1].action.tls).toEqual({ mode: 'passthrough', certificate: null, versions: [], rejectUnauthorized: true, acme: null });
  expect(config.routes[2].security.maxConnections).toEqual(3);
});

tap.test('kernel forwarding: settings with their defaults; what the kernel cannot do is refused naming the route', async () => {
  const { config, warnings } = normalize({
    routes: [
      { name: 'k', match: { ports: [2222, 2223] }, action: { type: 'forward', forwardingEngine: 'nftables', target } },
      { name: 'k2', match: { ports: 80, domains: 'a.example.com' }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { protocol: 'all', preserveSourceIP: true, maxRate: '10mbps', priority: 3 }, target } },
    ],
  });
  expect(config.routes[0].action.kernel).toEqual({ protocol: 'tcp', preserveSourceIp: false, maxRate: null, priority: 0 });
  expect(config.routes[1].action.kernel).toEqual({ protocol: 'all', preserveSourceIp: true, maxRate: '10mbps', priority: 3 });
  expect(warnings).toContain('routes[1] "k2": match.domains is not seen by kernel forwarding: every flow to the route\'s ports is forwarded');
  const limited = normalize({ maxConnectionsPerIP: 5, routes: [{ name: 'k', match: { ports: 2222 }, action: { type: 'forward', forwardingEngine: 'nftables', target } }] });
  expect(limited.warnings).toContain('maxConnectionsPerIP does not apply to kernel-forwarded routes (routes[0] "k")');
  expect(warnings.some((w) => w.includes('not apply to kernel-forwarded routes'))).toEqual(false);
  const refused = (route: object): string => {
    try {
      normalize({ routes: [{ name: 'bad', match: { ports: 443 }, ...route }] });
      return '';
    } catch (err) {
      return (err as Error).message;
    }
  };
  const kernel = { type: 'forward', forwardingEngine: 'nftables', target };
  expect(refused({ action: { ...kernel, tls: { mode: 'terminate', certificate: { key: 'k', cert: 'c' } } } })).toInclude('action.tls');
  expect(refused({ match: { ports: 80, path: '/api/*' }, action: kernel })).toInclude('match.path');
  expect(refused({ action: kernel, security: { rateLimit: { enabled: true, maxRequests: 1, window: 1 } } })).toInclude('security.rateLimit');
  expect(refused({ action: { ...kernel, nftables: { protocol: 'sctp' } } })).toInclude('action.nftables.protocol');
  expect(refused({ action: { ...kernel, sendProxyProtocol: 2 } })).toInclude('action.sendProxyProtocol');
  expect(refused({ action: { ...kernel, tls: { mode: 'terminate', certificate: { key: 'k', cert: 'c' } } } })).toInclude('"bad"');
});

tap.test('action.security is used when route.security is absent', async () => {
  const { config, warnings } = normalize({
    routes: [{ name: 's', match: { ports: 80 }, action: { type: 'forward', target, security: { ipAllowList: ['10.1.0.0/16'], maxConnections: 2 } } }],
  });
  expect(warnings).toEqual([]);
  expect(config.routes[0].security).toEqual({ ipAllowList: ['10.1.0.0/16'], ipBlockList: [], maxConnections: 2, rateLimit: null, basicAuth: null, jwtAuth: null, forwardAuthorization: false });
});

// ---------------------------------------------------------------------------------------------
// UDP routes

tap.test('UDP routes: match.transport is always sent; action.udp only for routes taking UDP, with its defaults', async () => {
  const udpRoute = (name: string, transport: unknown, udp?: unknown) =>
    ({ name, match: { ports: 53, transport }, action: { type: 'forward', target, ...(udp === undefined ? {} : { udp }) } });
  const { config, warnings } = normalize({
    routes: [
      route(80, 'plain'),
      udpRoute('tcp', 'tcp'),
      udpRoute('udp', 'udp'),
      udpRoute('all', 'all', { maxDatagramSize: 1200 }),
      udpRoute('tuned', 'udp', { sessionTimeout: 1000, maxSessionsPerIP: 1, maxDatagramSize: 65535 }),
      udpRoute('empty', 'udp', {}),
    ],
  });
  expect(warnings).toEqual([]);
  expect(config.routes.map((r) => [r.name, r.match.transport, r.action.udp])).toEqual([
    ['plain', 'tcp', null],
    ['tcp', 'tcp', null],
    ['udp', 'udp', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 }],
    ['all', 'all', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 1200 }],
    ['tuned', 'udp', { sessionTimeoutMs: 1000, maxSessionsPerIp: 1, maxDatagramSize: 65535 }],
    ['empty', 'udp', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 }],
  ]);
  // The rest of a UDP route is normalised as any forward route's: targets, IP lists, maxConnections.
  const secured = normalize({
    routes: [{ name: 's', match: { ports: [53, 5353], transport: 'udp', clientIp: ['10.0.0.0/8'] }, action: { type: 'forward', targets: [target, { host: 'b', port: 53 }] }, security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 50 } }],
  }).config.routes[0];
  expectSubset(secured, {
    match: { ports: [53, 5353], domains: [], clientIp: ['10.0.0.0/8'], tlsVersion: [], path: null, headers: [], transport: 'udp' },
    action: { tls: null, targets: [{ hosts: ['127.0.0.1'], port: 9000 }, { hosts: ['b'], port: 53 }] },
    security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 50 },
  });
});

tap.test('UDP routes: what they cannot have is refused, naming the route and the field', async () => {
  const t = { type: 'forward', target };
  const cases: Array<[Record<string, unknown>, Record<string, unknown>, string]> = [
    [{ transport: 'bogus' }, t, `match.transport: expected 'tcp', 'udp' or 'all', got "bogus"`],
    [{ transport: 7 }, t, `match.transport: expected 'tcp', 'udp' or 'all', got 7`],
    [{}, { ...t, udp: { sessionTimeout: 5000 } }, `action.udp: needs match.transport 'udp' or 'all' (this route takes TCP only)`],
    [{ transport: 'tcp' }, { ...t, udp: {} }, `action.udp: needs match.transport 'udp' or 'all' (this route takes TCP only)`],
    [{ transport: 'udp', domains: 'dns.example.com' }, t, `match.domains: UDP routes relay datagrams: they carry no domain unless the route passes QUIC through by SNI: set action.tls.mode 'passthrough'`],
    [{ transport: 'all', domains: ['a.example.com'] }, t, `match.domains: UDP routes relay datagrams (match.transport 'all' takes UDP too): they carry no domain unless the route passes QUIC through by SNI: set action.tls.mode 'passthrough'`],
    [{ transport: 'udp', path: '/api/*' }, t, 'match.path: UDP routes relay datagrams: they carry no HTTP path to match'],
    [{ transport: 'udp', headers: { 'x-a': 'b' } }, t, 'match.headers: UDP routes relay datagrams: they carry no HTTP headers to match'],
    [{ transport: 'udp', tlsVersion: ['TLSv1.3'] }, t, 'match.tlsVersion: UDP routes relay datagrams: they carry no TLS handshake to match'],
    [{ transport: 'udp', domains: 'a.example.com' }, { ...t, tls: { mode: 'terminate', certificate: { key: 'K', cert: 'C' } } }, `match.domains: UDP routes relay datagrams: they carry no domain unless the route passes QUIC through by SNI: set action.tls.mode 'passthrough'`],
    [{ transport: 'udp' }, { ...t, tls: { mode: 'terminate-and-reencrypt', certificate: 'auto' } }, `action.tls: UDP routes relay datagrams: the proxy does not terminate TLS on them (only 'passthrough', routing QUIC by SNI); HTTP/3 termination is action.http3 on a TCP route`],
    [{ transport: 'all' }, { ...t, tls: { mode: 'terminate', certificate: { key: 'K', cert: 'C' } } }, `action.tls: UDP routes relay datagrams (match.transport 'all' takes UDP too): the proxy does not terminate TLS on them (only 'passthrough', routing QUIC by SNI); HTTP/3 termination is action.http3 on a TCP route`],
    [{ transport: 'udp' }, { type: 'socket-handler' }, `action.datagramHandler: a 'socket-handler' route with match.transport 'udp' needs a datagramHandler function, got undefined`],
    [{ transport: 'udp' }, { type: 'socket-handler', datagramHandler: 42 }, `action.datagramHandler: a 'socket-handler' route with match.transport 'udp' needs a datagramHandler function, got 42`],
    [{ transport: 'all' }, { type: 'socket-handler', socketHandler: () => undefined }, `action.datagramHandler: a 'socket-handler' route with match.transport 'all' needs a datagramHandler function for its datagrams (its socketHandler takes the TCP connections), got undefined`],
    [{ transport: 'all' }, { type: 'socket-handler', datagramHandler: () => undefined }, `action.socketHandler: a 'socket-handler' route needs a socketHandler function, got undefined`],
    [{ transport: 'udp' }, { type: 'socket-handler', socketHandler: () => undefined }, `action.socketHandler: a 'socket-handler' route with match.transport 'udp' takes datagrams only: they go to its datagramHandler (a socketHandler takes TCP connections: match.transport 'tcp' or 'all')`],
    [{ transport: 'udp' }, { ...t, datagramHandler: () => undefined }, `action.datagramHandler: a 'forward' route relays datagrams to its targets: only a 'socket-handler' route takes a datagramHandler`],
    [{ transport: 'udp' }, { type: 'forward' }, 'action.targets: a forward route needs at least one target'],
    [{ transport: 'udp' }, { type: 'forward', target: { host: () => 'h', port: 53 } }, 'action.target.host: UDP routes relay datagrams: a target host is a name or address (or a list of them), not a function'],
    [{ transport: 'udp' }, { type: 'forward', target: { host: 'h', port: 'preserve' } }, `action.target.port: UDP routes relay datagrams: a target port is a number, not 'preserve'`],
    [{ transport: 'udp' }, { ...t, forwardingEngine: 'nftables' }, 'action.forwardingEngine: UDP routes relay datagrams: kernel forwarding takes UDP by action.nftables.protocol, not match.transport'],
    [{ transport: 'udp' }, { ...t, udp: 'fast' }, 'action.udp: expected an object, got "fast"'],
    [{ transport: 'udp' }, { ...t, udp: { sessionTimeout: 500 } }, 'action.udp.sessionTimeout: expected an integer number of milliseconds, at least 1000, got 500'],
    [{ transport: 'udp' }, { ...t, udp: { maxSessionsPerIP: 0 } }, 'action.udp.maxSessionsPerIP: expected a positive integer (at most 4294967295), got 0'],
    [{ transport: 'udp' }, { ...t, udp: { maxDatagramSize: 0 } }, 'action.udp.maxDatagramSize: expected an integer from 1 to 65535, got 0'],
    [{ transport: 'udp' }, { ...t, udp: { maxDatagramSize: 70000 } }, 'action.udp.maxDatagramSize: expected an integer from 1 to 65535, got 70000'],
    [{ transport: 'udp' }, { ...t, udp: { maxDatagramSize: 1500, burst: 2 } }, 'action.udp.burst: unknown field (expected one of sessionTimeout, maxSessionsPerIP, maxDatagramSize)'],
    [{ transport: 'udp' }, { ...t, loadBalancing: { healthCheck: { path: '/', interval: 1000, timeout: 500, unhealthyThreshold: 2, healthyThreshold: 2 } } }, 'action.loadBalancing.healthCheck: UDP routes relay datagrams: health checks probe over TCP or HTTP, which a UDP backend may not answer'],
  ];
  for (const [match, action, message] of cases) {
    const err = configError({ routes: [route(80, 'ok'), { name: 'udp', match: { ports: 53, ...match }, action }] });
    expect(err.message).toEqual(`routes[1] "udp": ${message}`);
    expect(err.path).toEqual('routes[1] "udp"');
  }
  // An empty list asks for nothing: no refusal.
  expect(() => new SmartProxy({ routes: [{ name: 'udp', match: { ports: 53, transport: 'udp', domains: [] }, action: t }] } as never)).not.toThrow();
  // A datagramHandler is refused on a route taking TCP only, in the words of action.udp.
  expect(configError({ routes: [{ match: { ports: 80 }, action: { type: 'socket-handler', socketHandler: () => undefined, datagramHandler: () => undefined } }] }).message)
    .toEqual(`routes[0]: action.datagramHandler: needs match.transport 'udp' or 'all' (this route takes TCP only)`);
});

tap.test('UDP handler routes: the native config carries the datagramHandler id (and the socketHandler id with transport all)', async () => {
  const datagrams = (): void => undefined;
  const connections = (): void => undefined;
  const { config, warnings, functionIds } = normalize({
    routes: [
      { name: 'udp', match: { ports: 53, transport: 'udp' }, action: { type: 'socket-handler', datagramHandler: datagrams, udp: { sessionTimeout: 1000 } }, security: { ipAllowList: ['127.0.0.1'], maxConnections: 4 } },
      { name: 'all', match: { ports: 54, transport: 'all' }, action: { type: 'socket-handler', socketHandler: connections, datagramHandler: datagrams } },
      { name: 'tcp', match: { ports: 55 }, action: { type: 'socket-handler', socketHandler: connections } },
      route(56, 'forward'),
    ],
  });
  expect(warnings).toEqual([]);
  const [udp, all, tcp, forward] = config.routes;
  expect(typeof udp.action.datagramHandler).toEqual('number');
  expectSubset(udp, {
    match: { ports: [53], transport: 'udp' },
    action: { targets: [], socketHandler: null, nativeResponse: null, udp: { sessionTimeoutMs: 1000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 } },
    security: { ipAllowList: ['127.0.0.1'], maxConnections: 4 },
  });
  // The same function keeps its id; the TCP side of 'all' has its own.
  expect(all.action.datagramHandler).toEqual(udp.action.datagramHandler);
  expect(typeof all.action.socketHandler).toEqual('number');
  expect(all.action.socketHandler).not.toEqual(all.action.datagramHandler);
  expect(tcp.action.socketHandler).toEqual(all.action.socketHandler);
  expect([tcp.action.datagramHandler, forward.action.datagramHandler]).toEqual([null, null]);
  // Both are functions of the config: registered, and released with the routes that use them.
  expect([...functionIds].sort()).toEqual([udp.action.datagramHandler!, all.action.socketHandler!].sort());
});

// ---------------------------------------------------------------------------------------------
// Through SmartProxy

tap.test('new SmartProxy throws the route-naming config error synchronously (not started)', async () => {
  const ok = route(80, 'ok');
  const err = thrown(() => new SmartProxy(deepFreeze({ routes: [ok, ok, route(70000, 'api')] }) as unknown as TOptions));
  expect(err instanceof SmartProxyConfigError).toBeTrue();
  expect(err?.message).toEqual('routes[2] "api": match.ports: 70000 is not a valid port');
  expect((err as SmartProxyConfigError).path).toEqual('routes[2] "api"');

  const refused = thrown(() => new SmartProxy({ routes: [route(80, 'tt', { action: { type: 'forward', target, tls: { mode: 'terminate', certificate: 'auto' } } })] } as unknown as TOptions));
  expect(refused instanceof SmartProxyConfigError).toBeTrue();
  expect(refused?.message ?? '').toStartWith(`routes[0] "tt": action.tls.certificate: 'auto' needs an ACME account email`);

  // Patterns are checked by the engine; its errors surface as the same config error type and format.
  const domain = thrown(() => new SmartProxy({ routes: [route(80, 'dom', { match: { ports: 80, domains: ['bad domain'] } })] } as unknown as TOptions));
  expect(domain instanceof SmartProxyConfigError).toBeTrue();
  expect(domain?.message ?? '').toStartWith('routes[0] "dom": match.domains[0]: ');
  expect((domain as SmartProxyConfigError).path).toEqual('routes[0] "dom"');

  const cidr = thrown(() => new SmartProxy({ routes: [route(80, undefined, { security: { ipAllowList: ['10.0.0.0/33'] } })] } as unknown as TOptions));
  expect(cidr instanceof SmartProxyConfigError).toBeTrue();
  expect(cidr?.message ?? '').toStartWith('routes[0]: security.ipAllowList[0]: ');
  expect((cidr as SmartProxyConfigError).path).toEqual('routes[0]');
});

tap.test('new SmartProxy: a UDP route is refused synchronously when bad, and accepted by the engine when good (not started)', async () => {
  const bad = thrown(() => new SmartProxy({ routes: [{ name: 'u', match: { ports: 53 }, action: { type: 'forward', target, udp: { maxDatagramSize: 512 } } }] } as unknown as TOptions));
  expect(bad instanceof SmartProxyConfigError).toBeTrue();
  expect(bad?.message).toEqual(`routes[0] "u": action.udp: needs match.transport 'udp' or 'all' (this route takes TCP only)`);
  expect((bad as SmartProxyConfigError).path).toEqual('routes[0] "u"');
  const handler = thrown(() => new SmartProxy({ routes: [{ name: 'd', match: { ports: 53, transport: 'udp' }, action: { type: 'socket-handler', socketHandler: () => undefined } }] } as unknown as TOptions));
  expect(handler instanceof SmartProxyConfigError).toBeTrue();
  expect(handler?.message).toEqual(
    `routes[0] "d": action.socketHandler: a 'socket-handler' route with match.transport 'udp' takes datagrams only: they go to its datagramHandler (a socketHandler takes TCP connections: match.transport 'tcp' or 'all')`,
  );
  // The engine takes the native form (transport, udp, datagramHandler) as the normaliser writes it.
  const good = thrown(() => new SmartProxy({
    routes: [
      { name: 'dns', match: { ports: 53, transport: 'udp' }, action: { type: 'forward', target, udp: { sessionTimeout: 5000 } } },
      { name: 'both', match: { ports: 8443, transport: 'all' }, action: { type: 'forward', target } },
      { name: 'handled', match: { ports: 5353, transport: 'udp' }, action: { type: 'socket-handler', datagramHandler: () => undefined, udp: { sessionTimeout: 1000 } } },
      { name: 'handled both', match: { ports: 5354, transport: 'all' }, action: { type: 'socket-handler', socketHandler: () => undefined, datagramHandler: () => undefined } },
    ],
  }));
  expect(good?.message).toBeUndefined();
});

tap.test('redis.encryptionKey and redis.syncIntervalMs: checked at construction, the key never echoed', async () => {
  const url = 'redis://127.0.0.1:6379';
  const key16 = Buffer.alloc(16, 1).toString('base64');
  const key32 = Buffer.alloc(32, 2).toString('base64');
  const construct = (redis: unknown) => thrown(() => new SmartProxy({ routes: [route(80, 'r')], redis } as unknown as TOptions));

  const short = construct({ url, encryptionKey: key16 });
  expect(short instanceof SmartProxyConfigError).toBeTrue();
  expect(short?.message).toEqual('options: redis.encryptionKey: expected base64 of 32 bytes (AES-256), got 16 bytes');
  expect(short?.message ?? '').not.toInclude(key16);

  const notBase64 = construct({ url, encryptionKey: 'this is not base64!' });
  expect(notBase64 instanceof SmartProxyConfigError).toBeTrue();
  expect(notBase64?.message ?? '').toStartWith('options: redis.encryptionKey: ');
  expect(notBase64?.message ?? '').not.toInclude('this is not base64!');
  expect(configError({ routes: [], redis: { url, encryptionKey: key32.slice(0, -2) + '=A' } }).message).toStartWith('options: redis.encryptionKey: ');
  expect(configError({ routes: [], redis: { url, encryptionKey: 32 } }).message).toEqual('options: redis.encryptionKey: expected base64 of 32 bytes (AES-256), got a value of type number');

  expect(construct({ url, encryptionKey: key32 })).toBeUndefined();
  expect(construct({ url, encryptionKey: key32.replace(/=+$/, ''), syncIntervalMs: 100 })).toBeUndefined();
  // Unpadded input reaches the engine in its canonical padded form; syncIntervalMs defaults to 5000.
  expect(normalize({ routes: [], redis: { url, encryptionKey: key32.replace(/=+$/, '') } }).config.options.redis)
    .toEqual({ url, keyPrefix: 'smartproxy:', encryptionKey: key32, syncIntervalMs: 5000 });

  const fast = construct({ url, syncIntervalMs: 50 });
  expect(fast instanceof SmartProxyConfigError).toBeTrue();
  expect(fast?.message).toEqual('options: redis.syncIntervalMs: expected an integer number of milliseconds from 100 to 86400000, got 50');
  expect(configError({ routes: [], redis: { url, syncIntervalMs: 1500.5 } }).message).toStartWith('options: redis.syncIntervalMs: ');
  expect(configError({ routes: [], redis: { url, syncIntervalMs: 86_400_001 } }).message).toStartWith('options: redis.syncIntervalMs: ');
  expect(configError({ routes: [], redis: { url, syncIntervalMs: '5s' } }).message).toStartWith('options: redis.syncIntervalMs: ');
});

tap.test('new SmartProxy accepts deep-frozen options and emits normalisation warnings as process warnings', async () => {
  const seen: Array<{ message: string; code?: string }> = [];
  const onWarning = (w: Error & { code?: string }) => seen.push({ message: w.message, code: w.code });
  process.on('warning', onWarning);
  try {
    const options = deepFreeze({ routes: [route(20001, 'frozen')], someUnknownOption: 1 });
    const before = JSON.stringify(options);
    const proxy = new SmartProxy(options as unknown as TOptions);
    expect(JSON.stringify(options)).toEqual(before);
    expect(proxy.getListeningPorts()).toEqual([]);
    await new Promise((resolve) => setImmediate(resolve));
    expect(seen).toContainEqual({ message: 'unknown options ignored: someUnknownOption', code: 'SMARTPROXY_CONFIG' });
  } finally {
    process.off('warning', onWarning);
  }
});

tap.test('updateRoutes on a proxy never started rejects a bad route and keeps the previous routes', async () => {
  const backend = await startTaggedServer('before-start');
  const port = await randomFreePort();
  const good = { name: 'good', match: { ports: port }, action: { type: 'forward' as const, target: { host: '127.0.0.1', port: backend.port } } };
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 500, routes: [good] });
  try {
    const err = await rejected(proxy.updateRoutes([good, route(70000, 'api')] as never));
    expect(err instanceof SmartProxyConfigError).toBeTrue();
    expect(err?.message).toEqual('routes[1] "api": match.ports: 70000 is not a valid port');
    const engineErr = await rejected(proxy.updateRoutes([route(port, 'dom', { match: { ports: port, domains: ['bad domain'] } })] as never));
    expect(engineErr instanceof SmartProxyConfigError).toBeTrue();
    expect(engineErr?.message ?? '').toStartWith('routes[0] "dom": match.domains[0]: ');
    expect(proxy.settings.routes).toEqual([good]);

    await proxy.start();
    expect(proxy.getListeningPorts()).toEqual([port]);
    expect((await readLine(port))).toEqual('before-start\n');
  } finally {
    await proxy.stop();
    await backend.close();
  }
});

tap.test('updateRoutes on a started proxy rejects a bad route; the previous routes keep serving', async () => {
  const oldBackend = await startTaggedServer('old');
  const newBackend = await startTaggedServer('new');
  const port = await randomFreePort();
  const fwd = (backendPort: number, name: string) => ({ name, match: { ports: port }, action: { type: 'forward' as const, target: { host: '127.0.0.1', port: backendPort } } });
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 500, routes: [fwd(oldBackend.port, 'old')] });
  try {
    await proxy.start();
    expect((await readLine(port))).toEqual('old\n');

    const bad = await rejected(proxy.updateRoutes([fwd(newBackend.port, 'new'), route([{ from: 9000, to: 8000 }], 'api')] as never));
    expect(bad instanceof SmartProxyConfigError).toBeTrue();
    expect(bad?.message).toEqual('routes[1] "api": match.ports[0]: range from 9000 to 8000 is empty (from > to)');
    const refused = await rejected(
      proxy.updateRoutes([{ ...fwd(newBackend.port, 'p'), action: { type: 'socket-handler', socketHandler: 'not a function' } }] as never),
    );
    expect(refused instanceof SmartProxyConfigError).toBeTrue();
    expect(refused?.message ?? '').toStartWith(`routes[0] "p": action.socketHandler: a 'socket-handler' route needs a socketHandler function`);
    const engineErr = await rejected(proxy.updateRoutes([{ ...fwd(newBackend.port, 'ip'), security: { ipBlockList: ['300.1.1.1'] } }]));
    expect(engineErr instanceof SmartProxyConfigError).toBeTrue();
    expect(engineErr?.message ?? '').toStartWith('routes[0] "ip": security.ipBlockList[0]: ');

    // Nothing changed: same settings, same ports, same backend.
    expect(proxy.settings.routes.map((r) => r.name)).toEqual(['old']);
    expect(proxy.getListeningPorts()).toEqual([port]);
    expect((await readLine(port))).toEqual('old\n');

    // A failed update does not poison later ones.
    await proxy.updateRoutes([fwd(newBackend.port, 'new')]);
    expect(proxy.settings.routes.map((r) => r.name)).toEqual(['new']);
    expect((await readLine(port))).toEqual('new\n');
  } finally {
    await proxy.stop();
    await oldBackend.close();
    await newBackend.close();
  }
});

tap.start({ throwOnError: true });
