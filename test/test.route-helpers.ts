// Route helpers, matchers, validators and socket handlers (ts/utils/route-helpers.ts,
// route-utils.ts, socket-handlers.ts; API.md "Helpers"): every helper's shape and defaults, purity
// (deep-frozen inputs, snapshots), mergeRouteConfigs, the matching semantics, validation messages,
// and the built-in socket handlers on real sockets.
import { tap, expect } from '@push.rocks/tapbundle';
import * as net from 'node:net';

import {
  SmartProxyConfigError,
  SocketHandlers,
  NATIVE_SOCKET_HANDLER,
  nativeSpecOf,
  createHttpRoute,
  createHttpsTerminateRoute,
  createHttpsPassthroughRoute,
  createHttpToHttpsRedirect,
  createCompleteHttpsServer,
  createLoadBalancerRoute,
  createApiRoute,
  createWebSocketRoute,
  createSocketHandlerRoute,
  createPortMappingRoute,
  createOffsetPortMappingRoute,
  createDynamicRoute,
  createUdpForwardRoute,
  createUdpHandlerRoute,
  createApiGatewayRoute,
  createNfTablesRoute,
  createNfTablesTerminateRoute,
  createCompleteNfTablesHttpsServer,
  addRateLimiting,
  addBasicAuth,
  addJwtAuth,
  mergeRouteConfigs,
  routeMatchesDomain,
  routeMatchesPort,
  routeMatchesPath,
  findMatchingRoutes,
  findBestMatchingRoute,
  isValidDomain,
  isValidPort,
  validateRouteConfig,
  validateRoutes,
  assertValidRoute,
} from '../ts/index.js';
import type { IRouteConfig, IRouteContext, TDatagramHandler, TSocketHandler } from '../ts/index.js';
import { normalizeOptions } from '../ts/utils/normalize-options.js';
import { startEchoServer, waitFor, thrown } from './helpers/net.js';

// ---------------------------------------------------------------------------------------------
// Tools

/** Freezes an object graph (objects, arrays, and the properties of functions) in place. */
function deepFreeze<T>(value: T, seen = new Set<unknown>()): T {
  if ((typeof value === 'object' && value !== null) || typeof value === 'function') {
    if (seen.has(value)) return value;
    seen.add(value);
    for (const key of Reflect.ownKeys(value as object)) {
      if (typeof value === 'function' && (key === 'caller' || key === 'arguments')) continue;
      deepFreeze((value as Record<string | symbol, unknown>)[key], seen);
    }
    Object.freeze(value);
  }
  return value;
}

/** A structural snapshot (functions by identity) to compare an input before and after a call. */
function snapshot(value: unknown): string {
  const functions: unknown[] = [];
  return JSON.stringify(value, (_key, v: unknown) => {
    if (typeof v === 'function') {
      if (!functions.includes(v)) functions.push(v);
      return `<function #${functions.indexOf(v)}>`;
    }
    if (v instanceof RegExp) return `<regexp ${String(v)}>`;
    if (v === undefined) return '<undefined>';
    return v;
  });
}

/** Every object and array reachable from `value` (functions are not entered). */
function objectsIn(value: unknown, out = new Set<object>()): Set<object> {
  if (typeof value === 'object' && value !== null && !out.has(value)) {
    out.add(value);
    for (const child of Object.values(value)) objectsIn(child, out);
  }
  return out;
}

/** Calls `fn` on deep-frozen `inputs`; checks they are unchanged and share no object with the result. */
function pure<R>(inputs: unknown[], fn: (...args: never[]) => R): R {
  const before = inputs.map(snapshot);
  inputs.forEach((input) => deepFreeze(input));
  const result = (fn as (...args: unknown[]) => R)(...inputs);
  expect(inputs.map(snapshot)).toEqual(before);
  const inInputs = objectsIn(inputs);
  inInputs.delete(inputs);
  for (const obj of objectsIn(result)) {
    if (inInputs.has(obj)) throw new Error(`the result shares an object with the inputs: ${snapshot(obj)}`);
  }
  return result;
}


const context = (overrides: Partial<IRouteContext> = {}): IRouteContext => ({
  port: 8080,
  domain: 'example.com',
  clientIp: '127.0.0.1',
  serverIp: '127.0.0.1',
  isTls: false,
  timestamp: Date.now(),
  connectionId: 'conn-1',
  routeName: 'test-route',
  ...overrides,
});

const target = { host: 'backend.local', port: 3000 };
const PEM = { key: '-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n', cert: '-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n' };

function expectValid(route: IRouteConfig): void {
  expect(validateRouteConfig(route)).toEqual({ valid: true, errors: [] });
}

// ---------------------------------------------------------------------------------------------
// Helper shapes and defaults

tap.test('createHttpRoute: port 80, "HTTP: a, b", one forward target; options merge field by field', async () => {
  const route = pure([['a.com', 'b.com'], { host: 'localhost', port: 3000 }], createHttpRoute);
  expect(route).toEqual({
    name: 'HTTP: a.com, b.com',
    match: { ports: 80, domains: ['a.com', 'b.com'] },
    action: { type: 'forward', targets: [{ host: 'localhost', port: 3000 }] },
  });
  expectValid(route);

  const custom = pure(['a.com', target, { match: { ports: 8080 }, name: 'web', priority: 5, security: { ipAllowList: ['10.0.0.0/8'] } }], createHttpRoute);
  expect(custom).toEqual({
    name: 'web',
    priority: 5,
    match: { ports: 8080, domains: 'a.com' },
    action: { type: 'forward', targets: [target] },
    security: { ipAllowList: ['10.0.0.0/8'] },
  });
  // The 19.x `target` form in options replaces the targets rather than sitting next to them.
  const other = createHttpRoute('a.com', target, { action: { target: { host: 'x', port: 1 } } });
  expect(other.action).toEqual({ type: 'forward', target: { host: 'x', port: 1 } });
});

tap.test('createHttpsTerminateRoute: 443, terminate with certificate auto; reencrypt, httpsPort, certificate, name', async () => {
  const route = pure(['a.com', target], createHttpsTerminateRoute);
  expect(route).toEqual({
    name: 'HTTPS: a.com',
    match: { ports: 443, domains: 'a.com' },
    action: { type: 'forward', targets: [target], tls: { mode: 'terminate', certificate: 'auto' } },
  });
  expectValid(route);
  const custom = pure([['a.com'], target, { reencrypt: true, httpsPort: 8443, certificate: PEM, name: 'secure', priority: 3 }], createHttpsTerminateRoute);
  expect(custom).toEqual({
    name: 'secure',
    priority: 3,
    match: { ports: 8443, domains: ['a.com'] },
    action: { type: 'forward', targets: [target], tls: { mode: 'terminate-and-reencrypt', certificate: PEM } },
  });
  expectValid(custom);
  // `httpPort` (an option of createCompleteHttpsServer) is accepted and ignored.
  expect(createHttpsTerminateRoute('a.com', target, { httpPort: 8080 })).toEqual(route);
});

tap.test('createHttpsTerminateRoute / createCompleteHttpsServer: http3 sets action.http3 (true is { enabled: true })', async () => {
  const on = pure(['a.com', target, { http3: true }], createHttpsTerminateRoute);
  expect(on).toEqual({
    name: 'HTTPS: a.com',
    match: { ports: 443, domains: 'a.com' },
    action: { type: 'forward', targets: [target], tls: { mode: 'terminate', certificate: 'auto' }, http3: { enabled: true } },
  });
  expectValid(on);
  const tuned = pure([['a.com'], target, { http3: { enabled: true, altSvcMaxAge: 600 }, reencrypt: true, certificate: PEM, httpsPort: 8443 }], createHttpsTerminateRoute);
  expect(tuned.match.ports).toEqual(8443);
  expect(tuned.action.tls).toEqual({ mode: 'terminate-and-reencrypt', certificate: PEM });
  expect(tuned.action.http3).toEqual({ enabled: true, altSvcMaxAge: 600 });
  expectValid(tuned);
  expect(pure(['a.com', target, { http3: false }], createHttpsTerminateRoute).action.http3).toEqual({ enabled: false });
  // Without the option the route has no http3 at all; `action.http3` overrides merge field by field.
  expect('http3' in createHttpsTerminateRoute('a.com', target).action).toBeFalse();
  expect(createHttpsTerminateRoute('a.com', target, { http3: true, action: { http3: { enabled: true, altSvcMaxAge: 60 } } }).action.http3).toEqual({ enabled: true, altSvcMaxAge: 60 });
  // createCompleteHttpsServer passes it to the HTTPS route only.
  const complete = pure(['a.com', target, { http3: true, certificate: PEM }], createCompleteHttpsServer);
  expect(complete[0].action.http3).toEqual({ enabled: true });
  expect('http3' in complete[1].action).toBeFalse();
  complete.forEach(expectValid);
  // The normaliser fills in the default Alt-Svc max age.
  const { config } = normalizeOptions({ routes: deepFreeze([complete[0], { ...tuned, action: { ...tuned.action, tls: { mode: 'terminate', certificate: PEM } } }]) });
  expect(config.routes.map((r) => r.action.http3)).toEqual([{ altSvcMaxAge: 86400 }, { altSvcMaxAge: 600 }]);
});

tap.test('createHttpsPassthroughRoute: 443, passthrough', async () => {
  const route = pure(['*.a.com', target], createHttpsPassthroughRoute);
  expect(route).toEqual({
    name: 'HTTPS passthrough: *.a.com',
    match: { ports: 443, domains: '*.a.com' },
    action: { type: 'forward', targets: [target], tls: { mode: 'passthrough' } },
  });
  expectValid(route);
  expect(createHttpsPassthroughRoute('a.com', target, { match: { ports: [443, 8443] } }).match).toEqual({ ports: [443, 8443], domains: 'a.com' });
});

tap.test('createHttpToHttpsRedirect: port 80 socket handler redirecting 301 natively', async () => {
  const route = pure([['a.com', 'b.com']], createHttpToHttpsRedirect);
  expect(route.name).toEqual('HTTP to HTTPS redirect: a.com, b.com');
  expect(route.match).toEqual({ ports: 80, domains: ['a.com', 'b.com'] });
  expect(route.action.type).toEqual('socket-handler');
  expect(typeof route.action.socketHandler).toEqual('function');
  expect(Object.keys(route.action)).toEqual(['type', 'socketHandler']);
  expect(nativeSpecOf(route.action.socketHandler)).toEqual({ kind: 'redirect', location: 'https://{domain}{path}', status: 301 });
  expectValid(route);

  const other = createHttpToHttpsRedirect('a.com', 8443, { match: { ports: 8080 }, priority: 9 });
  expect(other.match).toEqual({ ports: 8080, domains: 'a.com' });
  expect(other.priority).toEqual(9);
  expect(nativeSpecOf(other.action.socketHandler)).toEqual({ kind: 'redirect', location: 'https://{domain}:8443{path}', status: 301 });
});

tap.test('createCompleteHttpsServer: [terminate on httpsPort, redirect on httpPort]', async () => {
  const routes = pure(['a.com', target], createCompleteHttpsServer);
  expect(routes.length).toEqual(2);
  expect(routes[0]).toEqual(createHttpsTerminateRoute('a.com', target));
  expect(routes[1].match).toEqual({ ports: 80, domains: 'a.com' });
  expect(nativeSpecOf(routes[1].action.socketHandler)).toEqual({ kind: 'redirect', location: 'https://{domain}{path}', status: 301 });

  const custom = pure([['a.com'], target, { certificate: PEM, httpPort: 8080, httpsPort: 8443, name: 'site' }], createCompleteHttpsServer);
  expect(custom[0].name).toEqual('site');
  expect(custom[0].match.ports).toEqual(8443);
  expect(custom[0].action.tls).toEqual({ mode: 'terminate', certificate: PEM });
  expect(custom[1].match).toEqual({ ports: 8080, domains: ['a.com'] });
  expect(custom[1].name).toEqual('HTTP to HTTPS redirect: a.com');
  expect(nativeSpecOf(custom[1].action.socketHandler)).toEqual({ kind: 'redirect', location: 'https://{domain}:8443{path}', status: 301 });
  custom.forEach(expectValid);
});

tap.test('createLoadBalancerRoute: round-robin over backends; one host list per shared port', async () => {
  const backends = [{ host: '10.0.0.1', port: 8080 }, { host: '10.0.0.2', port: 8080 }];
  const route = pure(['lb.com', backends], createLoadBalancerRoute);
  expect(route).toEqual({
    name: 'Load balancer: lb.com',
    match: { ports: 80, domains: 'lb.com' },
    action: { type: 'forward', targets: [{ host: ['10.0.0.1', '10.0.0.2'], port: 8080 }], loadBalancing: { algorithm: 'round-robin' } },
  });
  expectValid(route);

  const mixed = createLoadBalancerRoute('lb.com', [{ host: 'a', port: 1 }, { host: 'b', port: 2 }]);
  expect(mixed.action.targets).toEqual([{ host: 'a', port: 1 }, { host: 'b', port: 2 }]);

  const tuned = pure(
    ['lb.com', backends, { action: { loadBalancing: { algorithm: 'ip-hash' }, tls: { mode: 'terminate', certificate: 'auto' } } }],
    createLoadBalancerRoute,
  );
  expect(tuned.match.ports).toEqual(443);
  expect(tuned.action.loadBalancing).toEqual({ algorithm: 'ip-hash' });
  expect(tuned.action.tls).toEqual({ mode: 'terminate', certificate: 'auto' });
  expect(tuned.action.targets).toEqual(route.action.targets);

  // The 19.x positional form.
  expect(createLoadBalancerRoute('lb.com', ['10.0.0.1', '10.0.0.2'], 8080)).toEqual(route);
  expect((thrown(() => createLoadBalancerRoute('lb.com', []))?.message ?? '').includes('at least one backend')).toBeTrue();
});

tap.test('createApiRoute / createApiGatewayRoute: prefix path, priority 100, TLS and CORS options', async () => {
  const route = pure(['api.com', 'v1', target], createApiRoute);
  expect(route).toEqual({
    name: 'API /v1: api.com',
    priority: 100,
    match: { ports: 80, domains: 'api.com', path: '/v1/*' },
    action: { type: 'forward', targets: [target] },
  });
  expectValid(route);

  const tls = pure(['api.com', '/v1/', target, { useTls: true, addCorsHeaders: true, httpsPort: 8443, priority: 7 }], createApiRoute);
  expect(tls.match).toEqual({ ports: 8443, domains: 'api.com', path: '/v1/*' });
  expect(tls.priority).toEqual(7);
  expect(tls.action.tls).toEqual({ mode: 'terminate', certificate: 'auto' });
  expect(tls.headers?.response?.['Access-Control-Allow-Origin']).toEqual('*');
  expect(Object.keys(tls.headers?.response ?? {}).sort()).toEqual([
    'Access-Control-Allow-Headers',
    'Access-Control-Allow-Methods',
    'Access-Control-Allow-Origin',
    'Access-Control-Max-Age',
  ]);
  expectValid(tls);
  expect(createApiRoute('api.com', '/v1', target, { httpPort: 8080 }).match.ports).toEqual(8080);

  const gateway = pure(['api.com', '/gw', target], createApiGatewayRoute);
  expect(gateway).toEqual({
    name: 'API gateway /gw: api.com',
    priority: 100,
    match: { ports: 80, domains: 'api.com', path: '/gw/*' },
    action: { type: 'forward', targets: [target] },
  });
});

tap.test('createWebSocketRoute: exact path, websocket enabled, ping options only when given', async () => {
  const route = pure(['ws.com', 'socket', target], createWebSocketRoute);
  expect(route).toEqual({
    name: 'WebSocket /socket: ws.com',
    priority: 100,
    match: { ports: 80, domains: 'ws.com', path: '/socket' },
    action: { type: 'forward', targets: [target], websocket: { enabled: true } },
  });
  expectValid(route);
  const tls = pure(['ws.com', '/ws', target, { useTls: true, certificate: PEM, pingInterval: 15000, pingTimeout: 3000, name: 'live' }], createWebSocketRoute);
  expect(tls.name).toEqual('live');
  expect(tls.match.ports).toEqual(443);
  expect(tls.action.websocket).toEqual({ enabled: true, pingInterval: 15000, pingTimeout: 3000 });
  expect(tls.action.tls).toEqual({ mode: 'terminate', certificate: PEM });
});

tap.test('createSocketHandlerRoute: handler kept by reference; name, priority, path', async () => {
  const handler: TSocketHandler = (socket) => {
    socket.end();
  };
  const route = pure(['s.com', [9000, { from: 9100, to: 9110 }], handler], createSocketHandlerRoute);
  expect(route).toEqual({
    name: 'Socket handler: s.com',
    match: { ports: [9000, { from: 9100, to: 9110 }], domains: 's.com' },
    action: { type: 'socket-handler', socketHandler: handler },
  });
  expect(route.action.socketHandler === handler).toBeTrue();
  expectValid(route);
  const custom = pure(['s.com', 9000, handler, { name: 'h', priority: 50, path: '/x' }], createSocketHandlerRoute);
  expect(custom).toEqual({
    name: 'h',
    priority: 50,
    match: { ports: 9000, domains: 's.com', path: '/x' },
    action: { type: 'socket-handler', socketHandler: handler },
  });
});

tap.test('createPortMappingRoute / createOffsetPortMappingRoute / createDynamicRoute: function targets', async () => {
  const portMapper = (ctx: IRouteContext): number => ctx.port + 1;
  const mapping = pure([{ sourcePortRange: [{ from: 8000, to: 8010 }], targetHost: 'inner', portMapper, domains: 'm.com', priority: 2 }], createPortMappingRoute);
  expect(mapping).toEqual({
    name: 'Port mapping: 8000-8010',
    priority: 2,
    match: { ports: [{ from: 8000, to: 8010 }], domains: 'm.com' },
    action: { type: 'forward', targets: [{ host: 'inner', port: portMapper }] },
  });
  expectValid(mapping);

  const offset = pure([{ ports: [8001, 8002], targetHost: ['h1', 'h2'], offset: 1000 }], createOffsetPortMappingRoute);
  expect(offset.name).toEqual('Port offset +1000: 8001, 8002');
  expect(offset.match).toEqual({ ports: [8001, 8002] });
  const offsetTarget = offset.action.targets![0];
  expect(offsetTarget.host).toEqual(['h1', 'h2']);
  expect(typeof offsetTarget.port).toEqual('function');
  expect((offsetTarget.port as (c: IRouteContext) => number)(context({ port: 8002 }))).toEqual(9002);
  expect(createOffsetPortMappingRoute({ ports: 9000, targetHost: 'h', offset: -10, name: 'down' }).name).toEqual('down');
  expect(createOffsetPortMappingRoute({ ports: 9000, targetHost: 'h', offset: -10 }).name).toEqual('Port offset -10: 9000');
  expectValid(offset);

  const hostFn = (ctx: IRouteContext): string => `${ctx.domain ?? 'x'}.internal`;
  const dynamic = pure([{ ports: 7000, targetHost: hostFn, portMapper, domains: ['d.com'], path: '/app/*', clientIp: ['10.0.0.0/8'] }], createDynamicRoute);
  expect(dynamic).toEqual({
    name: 'Dynamic route: 7000',
    match: { ports: 7000, domains: ['d.com'], path: '/app/*', clientIp: ['10.0.0.0/8'] },
    action: { type: 'forward', targets: [{ host: hostFn, port: portMapper }] },
  });
  expectValid(dynamic);
});

tap.test('createNfTablesRoute family: name vs domains, nftables settings, security lists', async () => {
  const named = pure(['ssh', { host: '10.0.0.5', port: 22 }, { ports: 2222, protocol: 'tcp', preserveSourceIP: true, maxRate: '100mbps', priority: 5, ipAllowList: ['10.0.0.0/8'] }], createNfTablesRoute);
  expect(named).toEqual({
    name: 'ssh',
    match: { ports: 2222 },
    action: {
      type: 'forward',
      targets: [{ host: '10.0.0.5', port: 22 }],
      forwardingEngine: 'nftables',
      nftables: { protocol: 'tcp', preserveSourceIP: true, maxRate: '100mbps', priority: 5 },
    },
    security: { ipAllowList: ['10.0.0.0/8'] },
  });
  expectValid(named);

  const byDomain = pure(['nf.example.com', target], createNfTablesRoute);
  expect(byDomain).toEqual({
    name: 'NFTables: nf.example.com',
    match: { ports: 80, domains: 'nf.example.com' },
    action: { type: 'forward', targets: [target], forwardingEngine: 'nftables', nftables: { protocol: 'tcp' } },
  });
  expect(createNfTablesRoute(['a.com', 'b.com'], target).match.domains).toEqual(['a.com', 'b.com']);
  expect(createNfTablesRoute('tls', target, { useTls: true }).action.tls).toEqual({ mode: 'passthrough' });

  const terminate = pure(['nf.example.com', target, { ipBlockList: ['1.2.3.4'] }], createNfTablesTerminateRoute);
  expect(terminate).toEqual({
    name: 'NFTables HTTPS: nf.example.com',
    match: { ports: 443, domains: 'nf.example.com' },
    // TLS is terminated in user space: the route is the Rust core's, without nftables settings.
    action: {
      type: 'forward',
      targets: [target],
      tls: { mode: 'terminate', certificate: 'auto' },
    },
    security: { ipBlockList: ['1.2.3.4'] },
  });
  expectValid(terminate);

  const complete = pure(['nf.example.com', target, { httpPort: 8080, httpsPort: 8443, certificate: PEM }], createCompleteNfTablesHttpsServer);
  expect(complete.length).toEqual(2);
  expect(complete[0].match).toEqual({ ports: 8443, domains: 'nf.example.com' });
  expect(complete[0].action.tls).toEqual({ mode: 'terminate', certificate: PEM });
  expect(complete[1].match).toEqual({ ports: 8080, domains: 'nf.example.com' });
  expect(nativeSpecOf(complete[1].action.socketHandler)).toEqual({ kind: 'redirect', location: 'https://{domain}:8443{path}', status: 301 });
  const completeNamed = createCompleteNfTablesHttpsServer('site', target);
  expect(completeNamed[0].name).toEqual('site');
  expect(completeNamed[1].name).toEqual('HTTP to HTTPS redirect: site');
  expect(completeNamed[1].match).toEqual({ ports: 80 });
});

tap.test('createUdpForwardRoute: transport udp, one forward target, action.udp only when settings are given', async () => {
  const plain = pure([53, { host: '10.0.0.53', port: 53 }], createUdpForwardRoute);
  expect(plain).toEqual({
    name: 'UDP: 53',
    match: { ports: 53, transport: 'udp' },
    action: { type: 'forward', targets: [{ host: '10.0.0.53', port: 53 }] },
  });
  expectValid(plain);

  const tuned = pure(
    [[5000, { from: 6000, to: 6001 }], target, { sessionTimeout: 5000, maxDatagramSize: 1200, maxSessionsPerIP: undefined, name: 'game', priority: 3, security: { ipAllowList: ['10.0.0.0/8'] } }],
    createUdpForwardRoute,
  );
  expect(tuned).toEqual({
    name: 'game',
    match: { ports: [5000, { from: 6000, to: 6001 }], transport: 'udp' },
    action: { type: 'forward', targets: [target], udp: { sessionTimeout: 5000, maxDatagramSize: 1200 } },
    priority: 3,
    security: { ipAllowList: ['10.0.0.0/8'] },
  });
  expectValid(tuned);
  // Overrides merge field by field, action.udp included.
  const both = createUdpForwardRoute(443, target, { maxSessionsPerIP: 5, match: { transport: 'all' }, action: { udp: { sessionTimeout: 2000 } } });
  expect(both.match).toEqual({ ports: 443, transport: 'all' });
  expect(both.action.udp).toEqual({ maxSessionsPerIP: 5, sessionTimeout: 2000 });
  // The normaliser fills in the defaults the helper left out.
  const { config } = normalizeOptions({ routes: deepFreeze([plain, tuned]) });
  expect(config.routes.map((r) => [r.match.transport, r.action.udp])).toEqual([
    ['udp', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 }],
    ['udp', { sessionTimeoutMs: 5000, maxSessionsPerIp: 1000, maxDatagramSize: 1200 }],
  ]);
});

tap.test('createUdpHandlerRoute: transport udp, a socket-handler with the datagramHandler, action.udp only when settings are given', async () => {
  const handler: TDatagramHandler = (datagram, _info, reply) => reply(datagram);
  const plain = pure([53, handler], createUdpHandlerRoute);
  expect(plain).toEqual({
    name: 'UDP handler: 53',
    match: { ports: 53, transport: 'udp' },
    action: { type: 'socket-handler', datagramHandler: handler },
  });
  // The function is kept by reference.
  expect(plain.action.datagramHandler === handler).toBeTrue();
  expectValid(plain);

  const tuned = pure(
    [[5000, { from: 6000, to: 6001 }], handler, { sessionTimeout: 5000, maxSessionsPerIP: 2, maxDatagramSize: undefined, name: 'game', security: { ipAllowList: ['10.0.0.0/8'] } }],
    createUdpHandlerRoute,
  );
  expect(tuned).toEqual({
    name: 'game',
    match: { ports: [5000, { from: 6000, to: 6001 }], transport: 'udp' },
    action: { type: 'socket-handler', datagramHandler: handler, udp: { sessionTimeout: 5000, maxSessionsPerIP: 2 } },
    security: { ipAllowList: ['10.0.0.0/8'] },
  });
  expectValid(tuned);
  // 'all' takes TCP connections too: the override adds their socketHandler.
  const socketHandler: TSocketHandler = (socket) => {
    socket.end();
  };
  const both = createUdpHandlerRoute(7000, handler, { match: { transport: 'all' }, action: { socketHandler } });
  expect(both.match).toEqual({ ports: 7000, transport: 'all' });
  expect(both.action.socketHandler === socketHandler && both.action.datagramHandler === handler).toBeTrue();
  expectValid(both);
  // The normaliser sends the handler's id and the defaults the helper left out.
  const { config, functionIds } = normalizeOptions({ routes: deepFreeze([plain, tuned, both]) });
  expect(config.routes.map((r) => [r.match.transport, r.action.udp, r.action.socketHandler === null, r.action.datagramHandler !== null])).toEqual([
    ['udp', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 }, true, true],
    ['udp', { sessionTimeoutMs: 5000, maxSessionsPerIp: 2, maxDatagramSize: 65535 }, true, true],
    ['all', { sessionTimeoutMs: 60000, maxSessionsPerIp: 1000, maxDatagramSize: 65535 }, false, true],
  ]);
  // One function, one id.
  expect(new Set(config.routes.map((r) => r.action.datagramHandler)).size).toEqual(1);
  expect(functionIds.has(config.routes[0].action.datagramHandler!)).toBeTrue();
  expect(functionIds.has(config.routes[2].action.socketHandler!)).toBeTrue();
});

tap.test('addRateLimiting / addBasicAuth / addJwtAuth: copies with security.<kind> enabled', async () => {
  const base = createHttpRoute('a.com', target, { security: { ipAllowList: ['10.0.0.0/8'] } });
  const limited = pure([base, { maxRequests: 10, window: 60, keyBy: 'header', headerName: 'X-Key', errorMessage: 'slow down' }], addRateLimiting);
  expect(limited.security).toEqual({
    ipAllowList: ['10.0.0.0/8'],
    rateLimit: { enabled: true, maxRequests: 10, window: 60, keyBy: 'header', headerName: 'X-Key', errorMessage: 'slow down' },
  });
  expect(base.security).toEqual({ ipAllowList: ['10.0.0.0/8'] });
  expectValid(limited);

  const users = [{ username: 'u', password: 'p' }];
  const basic = pure([createHttpRoute('a.com', target), { users, realm: 'r', excludePaths: ['/health'] }], addBasicAuth);
  expect(basic.security).toEqual({ basicAuth: { enabled: true, users, realm: 'r', excludePaths: ['/health'] } });
  expectValid(basic);

  const jwt = pure([basic, { secret: 's3cret', algorithm: 'HS256', issuer: 'me', audience: 'you' }], addJwtAuth);
  expect(jwt.security).toEqual({
    basicAuth: { enabled: true, users, realm: 'r', excludePaths: ['/health'] },
    jwtAuth: { enabled: true, secret: 's3cret', algorithm: 'HS256', issuer: 'me', audience: 'you' },
  });
  expectValid(jwt);

  // A route keeping its security under action.security gets the addition there.
  const legacy: IRouteConfig = { match: { ports: 80 }, action: { type: 'forward', targets: [target], security: { ipBlockList: ['1.1.1.1'] } } };
  const legacyLimited = addRateLimiting(legacy, { maxRequests: 1, window: 1 });
  expect(legacyLimited.security).toBeUndefined();
  expect(legacyLimited.action.security).toEqual({ ipBlockList: ['1.1.1.1'], rateLimit: { enabled: true, maxRequests: 1, window: 1 } });

  // HTTP security on a passthrough route is a validation error naming the field.
  const passthrough = addBasicAuth(createHttpsPassthroughRoute('a.com', target), { users });
  expect(validateRouteConfig(passthrough).errors).toEqual(['security.basicAuth: needs HTTP, but this route passes TLS through']);
});

tap.test('mergeRouteConfigs: match, action and security field by field; others replaced', async () => {
  const handler: TSocketHandler = () => undefined;
  const base: IRouteConfig = {
    name: 'base',
    priority: 1,
    tags: ['a'],
    match: { ports: 80, domains: ['a.com'], path: '/x' },
    action: { type: 'forward', targets: [target], tls: { mode: 'terminate', certificate: 'auto' }, websocket: { enabled: true } },
    security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 5 },
    headers: { request: { 'X-A': '1' } },
  };
  const merged = pure(
    [base, {
      name: 'merged',
      tags: ['b'],
      match: { ports: 8080 },
      action: { tls: { mode: 'terminate', certificate: PEM } },
      security: { maxConnections: 10 },
      headers: { response: { 'X-B': '2' } },
    }],
    mergeRouteConfigs,
  );
  expect(merged).toEqual({
    name: 'merged',
    priority: 1,
    tags: ['b'],
    match: { ports: 8080, domains: ['a.com'], path: '/x' },
    action: { type: 'forward', targets: [target], tls: { mode: 'terminate', certificate: PEM }, websocket: { enabled: true } },
    security: { ipAllowList: ['10.0.0.0/8'], maxConnections: 10 },
    headers: { response: { 'X-B': '2' } },
  });

  // Undefined values are ignored; an empty override is a deep copy.
  const same = mergeRouteConfigs(base, { name: undefined, match: { domains: undefined } });
  expect(same).toEqual(base);
  expect(same === base || same.match === base.match || same.action.targets === base.action.targets).toBeFalse();
  expect(mergeRouteConfigs(base)).toEqual(base);

  // Another action type replaces the whole action.
  const switched = mergeRouteConfigs(base, { action: { type: 'socket-handler', socketHandler: handler } });
  expect(switched.action).toEqual({ type: 'socket-handler', socketHandler: handler });
  expect(switched.action.socketHandler === handler).toBeTrue();

  // Targets replace targets (in either form); the route-level security can be created.
  const retargeted = mergeRouteConfigs({ match: { ports: 1 }, action: { type: 'forward', target } }, { action: { targets: [{ host: 'y', port: 2 }] }, security: { maxConnections: 1 } });
  expect(retargeted.action).toEqual({ type: 'forward', targets: [{ host: 'y', port: 2 }] });
  expect(retargeted.security).toEqual({ maxConnections: 1 });
});

tap.test('helpers are pure: fresh objects every call, functions kept by reference', async () => {
  const t = { host: ['a', 'b'], port: 1 };
  const r1 = createHttpRoute(['x.com'], t);
  const r2 = createHttpRoute(['x.com'], t);
  expect(r1).toEqual(r2);
  (r1.action.targets![0].host as string[]).push('c');
  (r1.match.domains as string[]).push('y.com');
  expect(r2.action.targets![0].host).toEqual(['a', 'b']);
  expect(t.host).toEqual(['a', 'b']);
  expect(r2.match.domains).toEqual(['x.com']);

  const withRegExp = mergeRouteConfigs(r2, { match: { headers: { 'x-v': /^v\d$/ } } });
  const again = mergeRouteConfigs(withRegExp, {});
  expect(again.match.headers).toEqual({ 'x-v': /^v\d$/ });
  expect(again.match.headers!['x-v'] === withRegExp.match.headers!['x-v']).toBeFalse();

  // Each redirect route gets its own handler function carrying the spec.
  const a = createHttpToHttpsRedirect('a.com');
  const b = createHttpToHttpsRedirect('a.com');
  expect(a.action.socketHandler === b.action.socketHandler).toBeFalse();
  expect(nativeSpecOf(a.action.socketHandler)).toEqual(nativeSpecOf(b.action.socketHandler));
});

tap.test('helper routes are accepted by the option normaliser (no stray fields)', async () => {
  const routes = [
    createHttpRoute('a.com', { host: '127.0.0.1', port: 3000 }),
    createHttpsPassthroughRoute('a.com', { host: '127.0.0.1', port: 3443 }),
    createHttpsTerminateRoute('a.com', { host: '127.0.0.1', port: 3000 }, { certificate: PEM }),
    createHttpsTerminateRoute('b.com', { host: '127.0.0.1', port: 3000 }, { certificate: PEM, httpsPort: 8443, http3: { enabled: true, altSvcMaxAge: 60 } }),
    createLoadBalancerRoute('a.com', [{ host: '127.0.0.1', port: 3000 }, { host: '127.0.0.2', port: 3000 }]),
    createApiRoute('a.com', '/api', { host: '127.0.0.1', port: 3000 }, { addCorsHeaders: true }),
    createWebSocketRoute('a.com', '/ws', { host: '127.0.0.1', port: 3000 }),
    createNfTablesRoute('a.example.com', { host: '127.0.0.1', port: 3000 }, { ipAllowList: ['127.0.0.1'] }),
    createUdpForwardRoute(5353, { host: '127.0.0.1', port: 53 }, { maxDatagramSize: 512 }),
    createUdpHandlerRoute(5354, () => undefined, { maxDatagramSize: 512 }),
  ];
  const { config } = normalizeOptions({ routes: deepFreeze(routes) });
  expect(config.routes.length).toEqual(routes.length);
  expect(validateRoutes(routes)).toEqual({ valid: true, errors: [] });
});

// ---------------------------------------------------------------------------------------------
// Matching

const withDomains = (domains: string | string[] | undefined): IRouteConfig => ({
  match: domains === undefined ? { ports: 80 } : { ports: 80, domains },
  action: { type: 'forward', targets: [target] },
});
const withPath = (path: string): IRouteConfig => ({ match: { ports: 80, path }, action: { type: 'forward', targets: [target] } });

tap.test('routeMatchesDomain: wildcards, case, trailing dots, apex, no domains', async () => {
  const cases: Array<[string | string[] | undefined, string | undefined, boolean]> = [
    ['example.com', 'example.com', true],
    ['Example.COM', 'example.com', true],
    ['example.com', 'EXAMPLE.com.', true],
    ['example.com.', 'example.com', true],
    ['example.com', 'www.example.com', false],
    ['example.com', 'example.co', false],
    ['*.example.com', 'a.example.com', true],
    ['*.example.com', 'a.b.example.com', true],
    ['*.example.com', 'A.EXAMPLE.COM.', true],
    ['*.example.com', 'example.com', false],
    ['*.example.com', 'aexample.com', false],
    ['*.example.com', 'a.example.com.evil', false],
    ['example.*', 'example.co.uk', true],
    ['example.*', 'www.example.com', false],
    ['api-*.example.com', 'api-1.example.com', true],
    ['api-*.example.com', 'api.example.com', false],
    ['*.com', 'a.com.b.com', true],
    ['*', 'anything.example', true],
    ['*', undefined, false],
    [['a.com', '*.b.com'], 'x.b.com', true],
    [['a.com', '*.b.com'], 'c.com', false],
    ['example.com', undefined, false],
    ['example.com', '', false],
    [undefined, 'anything.com', true],
    [undefined, undefined, true],
    [[], 'anything.com', true],
  ];
  for (const [domains, domain, expected] of cases) {
    const actual = routeMatchesDomain(withDomains(domains), domain);
    if (actual !== expected) throw new Error(`routeMatchesDomain(${JSON.stringify(domains)}, ${JSON.stringify(domain)}) = ${actual}, expected ${expected}`);
  }
});

tap.test('routeMatchesPath: exact, prefix, glob, params, query ignored', async () => {
  const cases: Array<[string, string | undefined, boolean]> = [
    ['/api', '/api', true],
    ['/api', '/api?x=1', true],
    ['/api', '/api/', false],
    ['/api', '/api/users', false],
    ['/api', '/apix', false],
    ['/api', '/API', false],
    ['/', '/', true],
    ['/', '/x', false],
    ['/api/', '/api/', true],
    ['/api/', '/api/users/1', true],
    ['/api/', '/api', false],
    ['/api/*', '/api/users/1', true],
    ['/api/*', '/api/', true],
    ['/api/*', '/apix', false],
    ['/api/*', '/api', false],
    ['/static*', '/static.css', true],
    ['*', '/anything/at/all', true],
    ['/*', '/', true],
    ['/api/*/users', '/api/v1/users', true],
    ['/api/*/users', '/api/v1/beta/users', true],
    ['/api/*/users', '/api/v1/users/2', false],
    ['/*.png', '/img/a.b.png', true],
    ['/*.png', '/img/a.png.txt', false],
    ['/users/:id', '/users/42', true],
    ['/users/:id', '/users/', false],
    ['/users/:id', '/users/42/posts', false],
    ['/users/:id/posts', '/users/42/posts', true],
    ['/users/:id/*', '/users/42/posts/7', true],
    ['/:a/:b', '/x/y', true],
    ['/:a/:b', '/x', false],
    ['/a:b', '/a:b', true],
    ['/api', undefined, false],
    ['not-a-pattern', '/not-a-pattern', false],
  ];
  for (const [pattern, path, expected] of cases) {
    const actual = routeMatchesPath(withPath(pattern), path);
    if (actual !== expected) throw new Error(`routeMatchesPath(${JSON.stringify(pattern)}, ${JSON.stringify(path)}) = ${actual}, expected ${expected}`);
  }
  // No match.path: every path, and no path, match.
  expect(routeMatchesPath(withDomains(undefined), '/x')).toBeTrue();
  expect(routeMatchesPath(withDomains(undefined), undefined)).toBeTrue();
});

tap.test('routeMatchesPort: numbers, lists and ranges', async () => {
  const route = (ports: IRouteConfig['match']['ports']): IRouteConfig => ({ match: { ports }, action: { type: 'forward', targets: [target] } });
  expect(routeMatchesPort(route(80), 80)).toBeTrue();
  expect(routeMatchesPort(route(80), 81)).toBeFalse();
  expect(routeMatchesPort(route([80, 443]), 443)).toBeTrue();
  expect(routeMatchesPort(route([{ from: 8000, to: 8010 }]), 8000)).toBeTrue();
  expect(routeMatchesPort(route([{ from: 8000, to: 8010 }]), 8010)).toBeTrue();
  expect(routeMatchesPort(route([{ from: 8000, to: 8010 }]), 8011)).toBeFalse();
  expect(routeMatchesPort(route([22, { from: 8000, to: 8010 }]), 22)).toBeTrue();
});

tap.test('findMatchingRoutes / findBestMatchingRoute: priority, array order, disabled, client IPs', async () => {
  const r = (name: string, extra: Partial<IRouteConfig> & { domains?: string | string[]; path?: string; clientIp?: string[]; ports?: number } = {}): IRouteConfig => {
    const { domains, path, clientIp, ports, ...rest } = extra;
    const match: IRouteConfig['match'] = { ports: ports ?? 80 };
    if (domains !== undefined) match.domains = domains;
    if (path !== undefined) match.path = path;
    if (clientIp !== undefined) match.clientIp = clientIp;
    return { name, match, action: { type: 'forward', targets: [target] }, ...rest };
  };
  const routes = deepFreeze([
    r('catch-all'),
    r('wild', { domains: '*.a.com' }),
    r('exact', { domains: 'www.a.com', priority: 10 }),
    r('exact-later', { domains: 'www.a.com', priority: 10 }),
    r('api', { domains: 'www.a.com', path: '/api/*', priority: 20 }),
    r('disabled', { domains: 'www.a.com', priority: 100, enabled: false }),
    r('office', { clientIp: ['10.0.0.0/8', '192.168.*', '::ffff:172.16.0.1', '2001:db8::/32'], priority: 5 }),
    r('other-port', { ports: 443, priority: 1000 }),
  ]);
  const names = (query: Parameters<typeof findMatchingRoutes>[1]): string[] => findMatchingRoutes(routes, query).map((x) => x.name ?? '');
  expect(names({ port: 80, domain: 'www.a.com' })).toEqual(['exact', 'exact-later', 'catch-all', 'wild']);
  expect(names({ port: 80, domain: 'www.a.com', path: '/api/v1' })).toEqual(['api', 'exact', 'exact-later', 'catch-all', 'wild']);
  expect(names({ port: 80, domain: 'x.a.com' })).toEqual(['catch-all', 'wild']);
  expect(names({ port: 80 })).toEqual(['catch-all']);
  expect(names({ port: 80, clientIp: '10.1.2.3' })).toEqual(['office', 'catch-all']);
  expect(names({ port: 80, clientIp: '::ffff:10.1.2.3' })).toEqual(['office', 'catch-all']);
  expect(names({ port: 80, clientIp: '192.168.7.7' })).toEqual(['office', 'catch-all']);
  expect(names({ port: 80, clientIp: '172.16.0.1' })).toEqual(['office', 'catch-all']);
  expect(names({ port: 80, clientIp: '2001:db8:0:0::1' })).toEqual(['office', 'catch-all']);
  expect(names({ port: 80, clientIp: '2001:db9::1' })).toEqual(['catch-all']);
  expect(names({ port: 80, clientIp: '11.0.0.1' })).toEqual(['catch-all']);
  expect(names({ port: 443, domain: 'www.a.com' })).toEqual(['other-port']);
  expect(names({ port: 8080 })).toEqual([]);

  expect(findBestMatchingRoute(routes, { port: 80, domain: 'www.a.com', path: '/api/x' })?.name).toEqual('api');
  expect(findBestMatchingRoute(routes, { port: 80, domain: 'www.a.com', path: '/other' })?.name).toEqual('exact');
  expect(findBestMatchingRoute(routes, { port: 80, domain: 'b.com' })?.name).toEqual('catch-all');
  expect(findBestMatchingRoute(routes, { port: 9 })).toBeUndefined();
  expect(findBestMatchingRoute([], { port: 80 })).toBeUndefined();

  // Transport: a query is a TCP connection unless it says 'udp'; 'all' routes take both.
  const transports = deepFreeze([
    { name: 'udp', match: { ports: 53, transport: 'udp' }, action: { type: 'forward', targets: [target] } },
    { name: 'tcp', match: { ports: 53 }, action: { type: 'forward', targets: [target] } },
    { name: 'all', match: { ports: 53, transport: 'all' }, action: { type: 'forward', targets: [target] } },
  ] as IRouteConfig[]);
  expect(findMatchingRoutes(transports, { port: 53 }).map((x) => x.name)).toEqual(['tcp', 'all']);
  expect(findMatchingRoutes(transports, { port: 53, transport: 'tcp' }).map((x) => x.name)).toEqual(['tcp', 'all']);
  expect(findMatchingRoutes(transports, { port: 53, transport: 'udp' }).map((x) => x.name)).toEqual(['udp', 'all']);
  expect(findBestMatchingRoute(transports, { port: 53, transport: 'udp' })?.name).toEqual('udp');
});

// ---------------------------------------------------------------------------------------------
// Validation

tap.test('isValidDomain / isValidPort', async () => {
  for (const ok of ['example.com', '*.example.com', 'example.*', '*', 'localhost', 'a-b_c.example.com', 'example.com.', 'EXAMPLE.COM', '127.0.0.1']) {
    if (!isValidDomain(ok)) throw new Error(`${ok} should be a valid domain`);
  }
  for (const bad of ['', '.', 'a..b', '.a.com', 'exa mple.com', 'ex@mple.com', 'bücher.de', 'a/b', 'x'.repeat(254), 42, undefined, null]) {
    if (isValidDomain(bad)) throw new Error(`${JSON.stringify(bad)} should not be a valid domain`);
  }
  expect([1, 80, 65535].every((p) => isValidPort(p))).toBeTrue();
  expect([0, 65536, -1, 1.5, '80', NaN, undefined].some((p) => isValidPort(p))).toBeFalse();
  // Every form match.ports takes, as the original 21.x helper accepts it.
  for (const ok of [[80, 443], [80, { from: 8000, to: 8010 }], [{ from: 1, to: 65535 }], { from: 5, to: 5 }, { from: 8000, to: 8010 }]) {
    if (!isValidPort(ok)) throw new Error(`${JSON.stringify(ok)} should be a valid port spec`);
  }
  for (const bad of [[], [0], [80, '443'], [80, { from: 10, to: 5 }], { from: 10, to: 5 }, { from: 0, to: 5 }, { from: 1, to: 65536 }, { from: 1 }, [[80]], null, {}]) {
    if (isValidPort(bad)) throw new Error(`${JSON.stringify(bad)} should not be a valid port spec`);
  }
});

tap.test('validateRouteConfig: every problem, each naming its field', async () => {
  const bad = {
    name: 7,
    priority: 'high',
    match: { ports: [80, 70000, { from: 10, to: 5 }], domains: ['ok.com', 'a..b'], path: 'api', clientIp: ['10.0.0.0/33', 'nope'] },
    action: { type: 'forward', targets: [{ host: '', port: 'x' }], tls: { mode: 'bogus' } },
    security: { maxConnections: 0, ipBlockList: ['1.2.3.4'] },
  } as unknown as IRouteConfig;
  const result = validateRouteConfig(bad);
  expect(result.valid).toBeFalse();
  expect(result.errors).toEqual([
    'name: expected a string, got 7',
    'priority: expected a number, got "high"',
    'match.ports[1]: 70000 is not a valid port (1-65535)',
    'match.ports[2]: range from 10 to 5 is empty (from > to)',
    'match.domains[1]: "a..b" is not a valid domain pattern: it has an empty label',
    `match.path: "api" is not a path pattern: it must start with '/'`,
    'match.clientIp[0]: "10.0.0.0/33": prefix length 33 is larger than 32',
    'match.clientIp[1]: "nope" is not an IP address, CIDR range (10.0.0.0/8) or glob (192.168.*)',
    'action.targets[0].host: expected a host name, a non-empty array of them or a function, got ""',
    `action.targets[0].port: "x" is not a valid port (1-65535), 'preserve' or a function`,
    'action.tls.mode: expected one of passthrough, terminate, terminate-and-reencrypt, got "bogus"',
    'security.maxConnections: expected a positive integer, got 0',
  ]);

  expect(validateRouteConfig({ action: { type: 'forward' } } as unknown as IRouteConfig).errors).toEqual([
    'match: required (an object with at least ports)',
    'action.targets: a forward route needs at least one target',
  ]);
  expect(validateRouteConfig({ match: {}, action: { type: 'socket-handler' } } as unknown as IRouteConfig).errors).toEqual([
    'match.ports: required',
    `action.socketHandler: a 'socket-handler' route needs a socketHandler function, got undefined`,
  ]);
  expect(validateRouteConfig({ match: { ports: 80 }, action: { type: 'redirect' } } as unknown as IRouteConfig).errors).toEqual([
    `action.type: expected 'forward' or 'socket-handler', got "redirect"`,
  ]);
  expect(validateRouteConfig({ match: { ports: 443 }, action: { type: 'forward', targets: [target], tls: { mode: 'terminate' } } }).errors).toEqual([
    `action.tls.certificate: a 'terminate' route needs a certificate ('auto' or { key, cert })`,
  ]);
  expect(validateRouteConfig(null as unknown as IRouteConfig)).toEqual({ valid: false, errors: ['route: expected a route object, got null'] });
  // Fields the engine does not know are reported (the engine refuses them too).
  const typos = { nmae: 'x', match: { ports: 80, domain: 'a.com' }, action: { type: 'forward', targets: [{ host: 'h', port: 1, hots: 'x' }], redirect: {} } };
  expect(validateRouteConfig(typos as unknown as IRouteConfig).errors).toEqual([
    'nmae: unknown field (expected one of id, name, description, tags, priority, enabled, match, action, security, headers)',
    'match.domain: unknown field (expected one of ports, domains, path, clientIp, tlsVersion, headers, transport)',
    'action.redirect: unknown field (expected one of type, targets, target, tls, socketHandler, datagramHandler, udp, http3, websocket, loadBalancing, forwardingEngine, nftables, options, sendProxyProtocol, retry, timeouts, security, normalizePath)',
    'action.targets[0].hots: unknown field (expected one of host, port, match, priority, weight, tls, headers, sendProxyProtocol)',
  ]);
  // The 19.x target form and 'preserve' are fine.
  expectValid({ match: { ports: [{ from: 1000, to: 1010 }] }, action: { type: 'forward', target: { host: 'h', port: 'preserve' } } });
});

tap.test('validateRoutes / assertValidRoute: errors prefixed with the route; throws a config error', async () => {
  const good = createHttpRoute('a.com', target, { id: 'one' });
  const bad = { name: 'broken', match: { ports: 0 }, action: { type: 'forward', targets: [target] } } as IRouteConfig;
  const dup = createHttpRoute('b.com', target, { id: 'one' });
  expect(validateRoutes([good, bad, dup])).toEqual({
    valid: false,
    errors: ['routes[1] "broken": match.ports: 0 is not a valid port (1-65535)', 'routes[2] "HTTP: b.com": id: "one" is already used by routes[0]'],
  });
  expect(validateRoutes([good])).toEqual({ valid: true, errors: [] });

  expect(thrown(() => assertValidRoute(good))).toBeUndefined();
  const err = thrown(() => assertValidRoute(bad));
  expect(err instanceof SmartProxyConfigError).toBeTrue();
  expect(err?.message).toEqual('route "broken": match.ports: 0 is not a valid port (1-65535)');
});

// ---------------------------------------------------------------------------------------------
// Socket handlers on real sockets

/** A TCP server handing every connection to `handler` with a complete fake context. */
async function serveHandler(handler: TSocketHandler, ctx: IRouteContext = context()): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    void handler(socket, ctx);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * Connects, writes `chunks` one by one (a pause between them), half-closes only when `end` is set,
 * and resolves with everything received until the server closes the connection.
 */
function talk(port: number, chunks: string[], end = false, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    const received: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no close within ${timeoutMs} ms; got ${JSON.stringify(Buffer.concat(received).toString())}`));
    }, timeoutMs);
    socket.on('connect', async () => {
      for (const [i, chunk] of chunks.entries()) {
        if (i > 0) await new Promise((r) => setTimeout(r, 30));
        socket.write(chunk);
      }
      if (end) socket.end();
    });
    socket.on('data', (d: Buffer) => received.push(d));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(received).toString());
    });
  });
}

function parseResponse(raw: string): { status: number; reason: string; headers: Record<string, string>; body: string } {
  const headEnd = raw.indexOf('\r\n\r\n');
  if (headEnd < 0) throw new Error(`not an HTTP response: ${JSON.stringify(raw)}`);
  const [statusLine, ...lines] = raw.slice(0, headEnd).split('\r\n');
  const match = /^HTTP\/1\.1 (\d{3}) (.*)$/.exec(statusLine);
  if (match === null) throw new Error(`bad status line: ${JSON.stringify(statusLine)}`);
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
  }
  return { status: Number(match[1]), reason: match[2], headers, body: raw.slice(headEnd + 4) };
}

tap.test('SocketHandlers.echo echoes bytes back', async () => {
  const server = await serveHandler(SocketHandlers.echo);
  try {
    expect(await talk(server.port, ['hello ', 'world\n'], true)).toEqual('hello world\n');
  } finally {
    await server.close();
  }
});

tap.test('SocketHandlers.httpRedirect answers 301 with Host (port stripped) and path with query', async () => {
  const server = await serveHandler(SocketHandlers.httpRedirect('https://{domain}{path}'));
  try {
    // The client keeps its side open, as HTTP clients do: the handler must answer and close.
    const raw = await talk(server.port, ['GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: t\r\n\r\n']);
    expect(raw).toEqual('HTTP/1.1 301 Moved Permanently\r\nLocation: https://example.com/a?b=1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
    // A head split over several segments.
    const split = parseResponse(await talk(server.port, ['GET /deep/pa', 'th HTTP/1.1\r\nHo', 'st: Other.example\r\n\r\n']));
    expect(split.status).toEqual(301);
    expect(split.headers.location).toEqual('https://Other.example/deep/path');
  } finally {
    await server.close();
  }

  const custom = await serveHandler(SocketHandlers.httpRedirect('https://{domain}:8443{path}?from={port}&c={clientIp}&r={routeName}', 302), context({ port: 8080 }));
  try {
    const response = parseResponse(await talk(custom.port, ['GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n']));
    expect(response.status).toEqual(302);
    expect(response.reason).toEqual('Found');
    expect(response.headers.location).toEqual('https://[::1]:8443/?from=8080&c=127.0.0.1&r=test-route');
    // No Host header: the context's domain.
    const noHost = parseResponse(await talk(custom.port, ['GET /x HTTP/1.0\r\n\r\n']));
    expect(noHost.headers.location).toEqual('https://example.com:8443/x?from=8080&c=127.0.0.1&r=test-route');
  } finally {
    await custom.close();
  }
});

tap.test('SocketHandlers.httpResponse writes status, headers and body', async () => {
  const server = await serveHandler(SocketHandlers.httpResponse({ statusCode: 200, headers: { 'Content-Type': 'text/plain', 'X-Test': 'yes' }, body: 'héllo' }));
  try {
    const response = parseResponse(await talk(server.port, ['GET / HTTP/1.1\r\nHost: a\r\n\r\n']));
    expect(response.status).toEqual(200);
    expect(response.reason).toEqual('OK');
    expect(response.headers['content-type']).toEqual('text/plain');
    expect(response.headers['x-test']).toEqual('yes');
    expect(response.headers['content-length']).toEqual(String(Buffer.byteLength('héllo')));
    expect(response.headers.connection).toEqual('close');
    expect(response.body).toEqual('héllo');
  } finally {
    await server.close();
  }
});

tap.test('SocketHandlers.httpBlock: 403 Forbidden by default, custom status and message', async () => {
  const server = await serveHandler(SocketHandlers.httpBlock());
  try {
    const response = parseResponse(await talk(server.port, ['GET / HTTP/1.1\r\nHost: a\r\n\r\n']));
    expect(response.status).toEqual(403);
    expect(response.reason).toEqual('Forbidden');
    expect(response.body).toEqual('Forbidden');
    expect(response.headers['content-length']).toEqual('9');
  } finally {
    await server.close();
  }
  const custom = await serveHandler(SocketHandlers.httpBlock(451, 'not here'));
  try {
    const response = parseResponse(await talk(custom.port, ['GET / HTTP/1.1\r\nHost: a\r\n\r\n']));
    expect(response.status).toEqual(451);
    expect(response.body).toEqual('not here');
  } finally {
    await custom.close();
  }
});

tap.test('SocketHandlers.block writes its message (or nothing) and closes', async () => {
  const withMessage = await serveHandler(SocketHandlers.block('go away\n'));
  const silent = await serveHandler(SocketHandlers.block());
  try {
    expect(await talk(withMessage.port, ['hi'])).toEqual('go away\n');
    expect(await talk(silent.port, [])).toEqual('');
  } finally {
    await withMessage.close();
    await silent.close();
  }
});

tap.test('SocketHandlers.lineProtocol gets each line without its newline', async () => {
  const lines: string[] = [];
  const server = await serveHandler(
    SocketHandlers.lineProtocol((line, socket) => {
      lines.push(line);
      socket.write(`got:${line}\n`);
    }),
  );
  try {
    const reply = await talk(server.port, ['one\ntwo\r\nthr', 'ee\n', 'caf\u00e9\n'], true);
    expect(lines).toEqual(['one', 'two', 'three', 'café']);
    expect(reply).toEqual('got:one\ngot:two\ngot:three\ngot:café\n');
  } finally {
    await server.close();
  }
});

tap.test('SocketHandlers.proxy relays to host:port', async () => {
  const backend = await startEchoServer();
  const server = await serveHandler(SocketHandlers.proxy('127.0.0.1', backend.port));
  try {
    // An HTTP-like client: it keeps its side open until it has the answer.
    const reply = await new Promise<string>((resolve, reject) => {
      const socket = net.connect({ port: server.port, host: '127.0.0.1' }, () => socket.write('through the proxy'));
      let data = '';
      socket.on('data', (d: Buffer) => {
        data += d.toString();
        if (data.length >= 'through the proxy'.length) {
          socket.end();
          resolve(data);
        }
      });
      socket.on('error', reject);
    });
    expect(reply).toEqual('through the proxy');
    await waitFor(() => backend.connections === 1, 2000, 'the backend connection');
  } finally {
    await server.close();
    await backend.close();
  }
});

tap.test('SocketHandlers.httpServer: request in, response out; a throwing handler gets a 500', async () => {
  const seen: Array<{ method: string; url: string; host: string | undefined; body: string }> = [];
  const server = await serveHandler(
    SocketHandlers.httpServer((req, res) => {
      seen.push({ method: req.method, url: req.url, host: req.headers.host, body: req.body });
      if (req.url === '/boom') throw new Error('boom');
      res.status(201).header('Content-Type', 'application/json');
      res.send(JSON.stringify({ echoed: req.body }));
    }),
  );
  try {
    const response = parseResponse(await talk(server.port, ['POST /items?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab', 'cde']));
    expect(response.status).toEqual(201);
    expect(response.headers['content-type']).toEqual('application/json');
    expect(JSON.parse(response.body)).toEqual({ echoed: 'abcde' });
    const chunked = parseResponse(await talk(server.port, ['PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n']));
    expect(JSON.parse(chunked.body)).toEqual({ echoed: 'abcde' });
    const failed = parseResponse(await talk(server.port, ['GET /boom HTTP/1.1\r\nHost: h\r\n\r\n']));
    expect(failed.status).toEqual(500);
    expect(seen).toEqual([
      { method: 'POST', url: '/items?x=1', host: 'h', body: 'abcde' },
      { method: 'PUT', url: '/c', host: 'h', body: 'abcde' },
      { method: 'GET', url: '/boom', host: 'h', body: '' },
    ]);
  } finally {
    await server.close();
  }
});

tap.test('nativeSpecOf: specs for httpRedirect, httpResponse and httpBlock only; non-enumerable', async () => {
  const redirect = SocketHandlers.httpRedirect('https://{domain}:{port}{path}', 308);
  const response = SocketHandlers.httpResponse({ statusCode: 204, headers: { 'X-A': 'b' }, body: '' });
  const blocked = SocketHandlers.httpBlock();
  expect(nativeSpecOf(redirect)).toEqual({ kind: 'redirect', location: 'https://{domain}:{port}{path}', status: 308 });
  expect(nativeSpecOf(SocketHandlers.httpRedirect('https://x{path}'))).toEqual({ kind: 'redirect', location: 'https://x{path}', status: 301 });
  expect(nativeSpecOf(response)).toEqual({ kind: 'response', status: 204, headers: { 'X-A': 'b' }, body: '' });
  expect(nativeSpecOf(blocked)).toEqual({ kind: 'block', status: 403, message: 'Forbidden' });
  expect(nativeSpecOf(SocketHandlers.httpBlock(404))).toEqual({ kind: 'block', status: 404, message: 'Not Found' });
  expect(nativeSpecOf(SocketHandlers.httpBlock(429, 'slow'))).toEqual({ kind: 'block', status: 429, message: 'slow' });

  expect(nativeSpecOf(SocketHandlers.echo)).toBeUndefined();
  expect(nativeSpecOf(SocketHandlers.block('x'))).toBeUndefined();
  expect(nativeSpecOf(SocketHandlers.proxy('h', 1))).toBeUndefined();
  expect(nativeSpecOf(SocketHandlers.lineProtocol(() => undefined))).toBeUndefined();
  expect(nativeSpecOf(SocketHandlers.httpServer(() => undefined))).toBeUndefined();
  expect(nativeSpecOf(() => undefined)).toBeUndefined();
  expect(nativeSpecOf(undefined)).toBeUndefined();
  expect(nativeSpecOf({ [NATIVE_SOCKET_HANDLER]: { kind: 'block', status: 403, message: 'x' } })).toBeUndefined();

  expect(NATIVE_SOCKET_HANDLER === Symbol.for('smartproxy.nativeSocketHandler')).toBeTrue();
  expect(Object.keys(redirect)).toEqual([]);
  expect(Object.getOwnPropertyDescriptor(redirect, NATIVE_SOCKET_HANDLER)?.enumerable).toBeFalse();
  // The spec is frozen: a caller cannot change what the core will serve.
  expect(Object.isFrozen(nativeSpecOf(response))).toBeTrue();
  // The headers given are copied, not shared.
  const headers: Record<string, string> = { 'X-A': 'b' };
  const handler = SocketHandlers.httpResponse({ statusCode: 200, headers, body: 'x' });
  headers['X-A'] = 'changed';
  expect(nativeSpecOf(handler)).toEqual({ kind: 'response', status: 200, headers: { 'X-A': 'b' }, body: 'x' });
});

tap.start({ throwOnError: true });
