// RegExp header matchers end to end (API.md "Matching": "Headers: case-insensitive names; string
// values exact; RegExp values tested"): on routes and on targets, with JavaScript flags, next to
// exact strings that stay exact; RegExps the engine cannot run are constructor errors naming the
// route and the field, and refused by updateRoutes with the old routes kept.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

import { SmartProxy, SmartProxyConfigError } from '../ts/index.js';
import type { IRouteConfig } from '../ts/index.js';
import { freePorts, thrown } from './helpers/net.js';

/** A backend answering every request with its name. */
async function namedBackend(name: string): Promise<{ port: number; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    req.resume();
    res.end(name);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** GET / through the proxy with these headers (arrays are sent as repeated headers): status and body. */
function get(port: number, headers: Record<string, string | string[]>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: '/', headers: { host: 'app.test', ...headers }, agent: false }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}


const backends: Record<string, { port: number; close(): Promise<void> }> = {};
let proxy: SmartProxy;
let routePort: number;
let targetPort: number;

tap.test('start: routes and targets chosen by RegExp header values', async () => {
  for (const name of ['v2', 'loud', 'exact', 'fallback', 'beta', 'stable']) backends[name] = await namedBackend(name);
  [routePort, targetPort] = await freePorts(2);
  const to = (name: string) => ({ host: '127.0.0.1', port: backends[name].port });
  const routes: IRouteConfig[] = [
    { name: 'v2', match: { ports: routePort, headers: { 'X-Version': /^v2(\.\d+)*$/ } }, action: { type: 'forward', target: to('v2') } },
    { name: 'loud', match: { ports: routePort, headers: { 'x-mode': /^loud$/gi } }, action: { type: 'forward', target: to('loud') } },
    // A string is compared as it is, never as a pattern.
    { name: 'exact', match: { ports: routePort, headers: { 'x-mode': '^quiet$' } }, action: { type: 'forward', target: to('exact') } },
    { name: 'fallback', match: { ports: routePort, path: '/*' }, action: { type: 'forward', target: to('fallback') } },
    {
      name: 'channels',
      match: { ports: targetPort },
      action: { type: 'forward', targets: [{ ...to('beta'), match: { headers: { 'x-channel': /^beta\b/i } } }, to('stable')] },
    },
  ];
  proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 200 });
  await proxy.start();
});

tap.test('a route with a RegExp header match takes the requests whose header value it matches', async () => {
  expect((await get(routePort, { 'x-version': 'v2' })).body).toEqual('v2');
  expect((await get(routePort, { 'x-version': 'v2.1.7' })).body).toEqual('v2');
  expect((await get(routePort, { 'x-version': 'v3' })).body).toEqual('fallback');
  // Anchors hold: the pattern is tested, not searched for past them.
  expect((await get(routePort, { 'x-version': 'av2' })).body).toEqual('fallback');
  expect((await get(routePort, {})).body).toEqual('fallback');
  // A header sent twice fits when one of its values does.
  expect((await get(routePort, { 'x-version': ['v1', 'v2'] })).body).toEqual('v2');
});

tap.test('flag i makes the RegExp case-insensitive (g is ignored); header names are case-insensitive', async () => {
  expect((await get(routePort, { 'x-mode': 'LOUD' })).body).toEqual('loud');
  expect((await get(routePort, { 'X-MODE': 'Loud' })).body).toEqual('loud');
  // Repeated requests give the same answer: a global RegExp keeps no lastIndex between tests.
  for (let i = 0; i < 3; i++) expect((await get(routePort, { 'x-mode': 'loud' })).body).toEqual('loud');
});

tap.test('exact string values stay exact next to RegExps', async () => {
  expect((await get(routePort, { 'x-mode': '^quiet$' })).body).toEqual('exact');
  expect((await get(routePort, { 'x-mode': 'quiet' })).body).toEqual('fallback');
});

tap.test('a target with a RegExp header match wins for the requests it matches, else the target without match', async () => {
  expect((await get(targetPort, { 'x-channel': 'Beta-7' })).body).toEqual('beta');
  expect((await get(targetPort, { 'x-channel': 'beta' })).body).toEqual('beta');
  expect((await get(targetPort, { 'x-channel': 'betamax' })).body).toEqual('stable');
  expect((await get(targetPort, {})).body).toEqual('stable');
});

tap.test('a RegExp the engine cannot run is a constructor error naming the route and the field', async () => {
  const withHeaders = (headers: Record<string, string | RegExp>, targetHeaders?: Record<string, string | RegExp>): IRouteConfig => ({
    name: 'x',
    match: { ports: routePort, headers },
    action: { type: 'forward', targets: [{ host: '127.0.0.1', port: 1, ...(targetHeaders ? { match: { headers: targetHeaders } } : {}) }] },
  });
  const lookahead = thrown(() => new SmartProxy({ routes: [withHeaders({ 'x-version': /^(?=v)v2/ })] }));
  expect(lookahead).toBeInstanceOf(SmartProxyConfigError);
  expect(lookahead!.message).toEqual(
    `routes[0] "x": match.headers.x-version: /^(?=v)v2/ is not supported by the engine's regex matcher: lookaround ((?=, (?!, (?<=, (?<!) is not supported`,
  );
  const backref = thrown(() => new SmartProxy({ routes: [withHeaders({}, { 'x-a': /(a)\1/ })] }));
  expect(backref!.message).toStartWith('routes[0] "x": action.targets[0].match.headers.x-a: /(a)\\1/ is not supported by the engine');
  // What only the engine knows it cannot compile, it refuses at construction in the same form.
  const engineOnly = thrown(() => new SmartProxy({ routes: [withHeaders({ 'x-version': /a{/ })] }));
  expect(engineOnly).toBeDefined();
  expect(engineOnly!.message).toStartWith(`routes[0] "x": match.headers.x-version: /a{/ is not supported by the engine's regex matcher: `);
  expect(engineOnly!.message.includes('\n')).toBeFalse();
});

tap.test('updateRoutes refuses a RegExp the engine cannot run and keeps serving the old routes', async () => {
  const bad: IRouteConfig = { name: 'bad', match: { ports: routePort, headers: { 'x-version': /a{/ } }, action: { type: 'forward', target: { host: '127.0.0.1', port: 1 } } };
  let error: unknown;
  try {
    await proxy.updateRoutes([bad]);
  } catch (err) {
    error = err;
  }
  expect(String((error as Error).message)).toStartWith('routes[0] "bad": match.headers.x-version: /a{/ is not supported');
  expect((await get(routePort, { 'x-version': 'v2' })).body).toEqual('v2');
});

tap.test('stop', async () => {
  await proxy.stop();
  for (const backend of Object.values(backends)) await backend.close();
});

tap.start();
