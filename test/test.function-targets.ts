// Function targets: `target.host` / `target.port` as (sync or async) functions of the route
// context, called once per connection on TCP routes and once per request on HTTP routes. Backends
// chosen by domain, client IP, local port, path and headers; the route helpers built on them;
// functions that throw, reject, answer nonsense or never settle; no JavaScript call at all for
// static routes; the 'connection' / 'route-matched' events; and a child process that exits by
// itself after stop().
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import path from 'node:path';

import { SmartProxy, createDynamicRoute, createPortMappingRoute, createOffsetPortMappingRoute } from '../ts/index.js';
import type { IRouteConfig, IRouteContext, ISmartProxyOptions } from '../ts/index.js';
import {
  connectAndRead,
  exchange,
  freePorts,
  sleep,
  startEchoServer,
  startTaggedServer,
  waitFor,
  waitForClose,
  type ITestServer,
} from './helpers/net.js';

interface ITargetError extends Error {
  code: string;
  routeName?: string;
  connectionId?: string;
}

async function withProxy(
  routes: IRouteConfig[],
  run: (proxy: SmartProxy) => Promise<void>,
  extra: Partial<ISmartProxyOptions> = {},
): Promise<void> {
  const proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 300, ...extra });
  await proxy.start();
  try {
    await run(proxy);
  } finally {
    await proxy.stop();
  }
}

async function closeAll(servers: Array<{ close(): Promise<void> } | undefined>): Promise<void> {
  await Promise.all(servers.map((s) => s?.close()));
}

/** A node http server answering `<tag> <url>`. */
async function startHttpBackend(tag: string, port = 0, host = '127.0.0.1'): Promise<ITestServer> {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => res.end(`${tag} ${req.url}`));
  });
  await new Promise<void>((resolve) => server.listen(port, host, resolve));
  const result: ITestServer = {
    port: (server.address() as net.AddressInfo).port,
    connections: 0,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  server.on('connection', () => result.connections++);
  return result;
}

function httpGet(
  port: number,
  urlPath: string,
  headers: Record<string, string> = {},
  agent: http.Agent | false = false,
  host = '127.0.0.1',
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ port, host, path: urlPath, headers, agent }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
}

/** The first line a tagged backend sends, reached through the proxy (`closed` when nothing came). */
async function tagOf(port: number, opts: { host?: string; localAddress?: string } = {}): Promise<{ data: string; closed: boolean }> {
  const head = opts.host !== undefined ? `GET / HTTP/1.1\r\nHost: ${opts.host}\r\n\r\n` : undefined;
  const result = await connectAndRead(port, head, opts.localAddress);
  result.socket.destroy();
  // The backend echoes the request head too; it may arrive in the same chunk as the tag line.
  const newline = result.data.indexOf('\n');
  return { data: newline >= 0 ? result.data.slice(0, newline + 1) : result.data, closed: result.closed };
}

function targetHostsOf(ctx: IRouteContext | undefined): string[] {
  const host = ctx?.targetHost;
  return host === undefined ? [] : ([] as string[]).concat(host);
}

/** Rejects when `promise` takes longer than `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// 1. Choosing backends
// ---------------------------------------------------------------------------------------------

tap.test('TCP: a host function chooses the backend by domain (Host header read, raw relay), once per connection', async () => {
  // Two tagged backends on the same port number, one on 127.0.0.1 and one on 127.0.0.2: only the
  // host the function answers tells them apart.
  const backA = await startTaggedServer('backend-a', 0, '127.0.0.1');
  let backB: ITestServer | undefined;
  const [port] = await freePorts(1);
  const calls: IRouteContext[] = [];
  try {
    backB = await startTaggedServer('backend-b', backA.port, '127.0.0.2');
    await withProxy(
      [
        {
          name: 'by-domain',
          id: 'by-domain-id',
          match: { ports: port, domains: ['a.example.com', 'b.example.com'] },
          action: {
            type: 'forward',
            options: { raw: true },
            target: {
              host: (ctx) => {
                calls.push(ctx);
                return ctx.domain === 'b.example.com' ? '127.0.0.2' : '127.0.0.1';
              },
              port: backA.port,
            },
          },
        },
      ],
      async (proxy) => {
        expect((await tagOf(port, { host: 'a.example.com' })).data).toEqual('backend-a\n');
        expect((await tagOf(port, { host: 'b.example.com' })).data).toEqual('backend-b\n');
        expect((await tagOf(port, { host: 'A.Example.com' })).data).toEqual('backend-a\n');
        expect((await tagOf(port, { host: 'b.example.com' })).data).toEqual('backend-b\n');
        expect(calls.length).toEqual(4);
        expect(proxy.getStatistics().jsCalls).toEqual(4);
        expect(backA.connections).toEqual(2);
        expect(backB!.connections).toEqual(2);

        const ctx = calls[1];
        expect(ctx.domain).toEqual('b.example.com');
        expect(ctx.port).toEqual(port);
        expect(ctx.clientIp).toEqual('127.0.0.1');
        expect(ctx.serverIp).toEqual('127.0.0.1');
        expect(ctx.isTls).toBeFalse();
        expect(ctx.routeName).toEqual('by-domain');
        expect(ctx.routeId).toEqual('by-domain-id');
        // The static port of the target is in the context; a TCP connection has no request.
        expect(ctx.targetPort).toEqual(backA.port);
        expect(ctx.path).toEqual(undefined);
        expect(ctx.headers).toEqual(undefined);
        expect(typeof ctx.connectionId).toEqual('string');
        expect(Math.abs(Date.now() - ctx.timestamp) < 60_000).toBeTrue();
        expect(new Set(calls.map((c) => c.connectionId)).size).toEqual(4);
      },
    );
  } finally {
    await closeAll([backA, backB]);
  }
});

tap.test('TCP: an async port function chooses the backend by client IP (127.0.0.1 vs 127.0.0.2)', async () => {
  const back1 = await startTaggedServer('from-one');
  const back2 = await startTaggedServer('from-two');
  const [port] = await freePorts(1);
  const seen: IRouteContext[] = [];
  try {
    await withProxy(
      [
        {
          name: 'by-ip',
          match: { ports: port },
          action: {
            type: 'forward',
            target: {
              host: '127.0.0.1',
              port: async (ctx) => {
                seen.push(ctx);
                await sleep(10);
                return ctx.clientIp === '127.0.0.2' ? back2.port : back1.port;
              },
            },
          },
        },
      ],
      async (proxy) => {
        expect((await tagOf(port, { localAddress: '127.0.0.1' })).data).toEqual('from-one\n');
        expect((await tagOf(port, { localAddress: '127.0.0.2' })).data).toEqual('from-two\n');
        expect((await tagOf(port, { localAddress: '127.0.0.2' })).data).toEqual('from-two\n');
        expect(seen.map((c) => c.clientIp)).toEqual(['127.0.0.1', '127.0.0.2', '127.0.0.2']);
        expect(targetHostsOf(seen[0])).toEqual(['127.0.0.1']);
        expect(seen[0].targetPort).toEqual(undefined);
        expect(seen[0].domain).toEqual(undefined);
        expect(proxy.getStatistics().jsCalls).toEqual(3);
      },
    );
  } finally {
    await closeAll([back1, back2]);
  }
});

tap.test('TCP: one route on two ports, host and port functions map ctx.port to a backend', async () => {
  const back1 = await startTaggedServer('port-one');
  const back2 = await startTaggedServer('port-two');
  const [p1, p2] = await freePorts(2);
  const hostCalls: IRouteContext[] = [];
  const portCalls: IRouteContext[] = [];
  try {
    await withProxy(
      [
        {
          name: 'by-port',
          match: { ports: [p1, p2] },
          action: {
            type: 'forward',
            target: {
              // An array answer is accepted as well as a single host.
              host: async (ctx) => {
                hostCalls.push(ctx);
                return ['127.0.0.1'];
              },
              port: (ctx) => {
                portCalls.push(ctx);
                return ctx.port === p1 ? back1.port : back2.port;
              },
            },
          },
        },
      ],
      async (proxy) => {
        expect((await tagOf(p1)).data).toEqual('port-one\n');
        expect((await tagOf(p2)).data).toEqual('port-two\n');
        expect((await tagOf(p1)).data).toEqual('port-one\n');
        expect(hostCalls.map((c) => c.port)).toEqual([p1, p2, p1]);
        expect(portCalls.map((c) => c.port)).toEqual([p1, p2, p1]);
        // Both functions of a target see the same connection; one call into JavaScript each time.
        expect(portCalls.map((c) => c.connectionId)).toEqual(hostCalls.map((c) => c.connectionId));
        expect(proxy.getStatistics().jsCalls).toEqual(3);
        // A data exchange through a function-chosen backend works both ways.
        expect((await exchange(p2, 'round trip')).toString()).toEqual('port-two\nround trip');
      },
    );
  } finally {
    await closeAll([back1, back2]);
  }
});

tap.test('HTTP: a domain route on a plain port is served per request; the port function picks by Host', async () => {
  const backA = await startHttpBackend('http-a');
  const backB = await startHttpBackend('http-b');
  const [port] = await freePorts(1);
  const seen: IRouteContext[] = [];
  try {
    await withProxy(
      [
        {
          name: 'http-by-domain',
          match: { ports: port, domains: ['a.example.com', 'b.example.com'] },
          action: {
            type: 'forward',
            target: {
              host: '127.0.0.1',
              port: (ctx) => {
                seen.push(ctx);
                return ctx.domain === 'b.example.com' ? backB.port : backA.port;
              },
            },
          },
        },
      ],
      async () => {
        expect(await httpGet(port, '/x', { host: 'a.example.com' })).toEqual({ status: 200, body: 'http-a /x' });
        expect(await httpGet(port, '/y', { host: 'b.example.com' })).toEqual({ status: 200, body: 'http-b /y' });
        expect(seen.map((c) => c.domain)).toEqual(['a.example.com', 'b.example.com']);
        expect(seen[1].path).toEqual('/y');
      },
    );
  } finally {
    await closeAll([backA, backB]);
  }
});

tap.test('HTTP: path route, functions see path/query/headers and are called once per request on a keep-alive connection', async () => {
  const one = await startHttpBackend('one');
  const two = await startHttpBackend('two');
  const [port] = await freePorts(1);
  const hostCalls: IRouteContext[] = [];
  const portCalls: IRouteContext[] = [];
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await withProxy(
      [
        {
          name: 'api',
          match: { ports: port, path: '/api/*' },
          action: {
            type: 'forward',
            target: {
              host: async (ctx) => {
                hostCalls.push(ctx);
                await sleep(5);
                return '127.0.0.1';
              },
              port: (ctx) => {
                portCalls.push(ctx);
                return ctx.path?.startsWith('/api/two') || ctx.headers?.['x-backend'] === 'two' ? two.port : one.port;
              },
            },
          },
        },
      ],
      async (proxy) => {
        const first = await httpGet(port, '/api/one?q=1', { 'x-test': 'hello' }, agent);
        const second = await httpGet(port, '/api/two?q=2&r=3', { 'x-test': 'again' }, agent);
        const third = await httpGet(port, '/api/three', { 'x-backend': 'two' }, agent);
        expect(first).toEqual({ status: 200, body: 'one /api/one?q=1' });
        expect(second).toEqual({ status: 200, body: 'two /api/two?q=2&r=3' });
        expect(third).toEqual({ status: 200, body: 'two /api/three' });

        expect(hostCalls.length).toEqual(3);
        expect(portCalls.length).toEqual(3);
        expect(proxy.getStatistics().jsCalls).toEqual(3);
        // One client connection carried all three requests: one call per request, not per connection.
        expect(new Set(hostCalls.map((c) => c.connectionId)).size).toEqual(1);
        expect(portCalls.map((c) => c.connectionId)).toEqual(hostCalls.map((c) => c.connectionId));

        expect(hostCalls[0].path).toEqual('/api/one');
        expect(hostCalls[0].query).toEqual('q=1');
        expect(hostCalls[0].headers?.['x-test']).toEqual('hello');
        expect(hostCalls[0].headers?.host).toEqual(`127.0.0.1:${port}`);
        expect(hostCalls[0].routeName).toEqual('api');
        expect(hostCalls[0].port).toEqual(port);
        expect(hostCalls[0].clientIp).toEqual('127.0.0.1');
        // Asked of the client's socket on the first request that needs it, kept for the next.
        expect(hostCalls.map((c) => c.serverIp)).toEqual(['127.0.0.1', '127.0.0.1', '127.0.0.1']);
        expect(hostCalls[0].isTls).toBeFalse();
        expect(hostCalls[1].path).toEqual('/api/two');
        expect(hostCalls[1].query).toEqual('q=2&r=3');
        expect(hostCalls[1].headers?.['x-test']).toEqual('again');
        expect(portCalls[2].headers?.['x-backend']).toEqual('two');

        // A request no route takes costs no call.
        const miss = await httpGet(port, '/elsewhere', {}, agent);
        expect(miss.status).toEqual(404);
        expect(hostCalls.length).toEqual(3);
        expect(proxy.getStatistics().jsCalls).toEqual(3);

        // A connection to another local address sees that address.
        expect((await httpGet(port, '/api/one', {}, false, '127.0.0.2')).status).toEqual(200);
        expect(hostCalls[3].serverIp).toEqual('127.0.0.2');
      },
    );
  } finally {
    agent.destroy();
    await closeAll([one, two]);
  }
});

tap.test('route helpers end to end: createDynamicRoute, createPortMappingRoute, createOffsetPortMappingRoute', async () => {
  const backA = await startTaggedServer('helper-a');
  const backB = await startTaggedServer('helper-b');
  const [dynPort, mapPort1, mapPort2, offsetPort] = await freePorts(4);
  const dynamicSeen: IRouteContext[] = [];
  const mapperSeen: number[] = [];
  try {
    await withProxy(
      [
        createDynamicRoute({
          ports: dynPort,
          targetHost: (ctx) => {
            dynamicSeen.push(ctx);
            return '127.0.0.1';
          },
          portMapper: async (ctx) => (ctx.clientIp === '127.0.0.2' ? backB.port : backA.port),
          name: 'dynamic',
        }),
        createPortMappingRoute({
          sourcePortRange: [mapPort1, mapPort2],
          targetHost: '127.0.0.1',
          portMapper: (ctx) => {
            mapperSeen.push(ctx.port);
            return ctx.port === mapPort1 ? backA.port : backB.port;
          },
        }),
        createOffsetPortMappingRoute({ ports: offsetPort, targetHost: '127.0.0.1', offset: backB.port - offsetPort }),
      ],
      async (proxy) => {
        expect((await tagOf(dynPort)).data).toEqual('helper-a\n');
        expect((await tagOf(dynPort, { localAddress: '127.0.0.2' })).data).toEqual('helper-b\n');
        expect(dynamicSeen.map((c) => c.routeName)).toEqual(['dynamic', 'dynamic']);
        expect((await tagOf(mapPort1)).data).toEqual('helper-a\n');
        expect((await tagOf(mapPort2)).data).toEqual('helper-b\n');
        expect(mapperSeen).toEqual([mapPort1, mapPort2]);
        expect((await tagOf(offsetPort)).data).toEqual('helper-b\n');
        expect(proxy.getStatistics().jsCalls).toEqual(5);
      },
    );
  } finally {
    await closeAll([backA, backB]);
  }
});

// ---------------------------------------------------------------------------------------------
// 2. Failures
// ---------------------------------------------------------------------------------------------

tap.test('TCP failures: throw, reject, "" host, port 0, port 70000 close the connection without data and emit TARGET_FUNCTION_FAILED', async () => {
  const good = await startTaggedServer('still-good');
  const ports = await freePorts(7);
  const [throwsPort, rejectsPort, emptyPort, zeroPort, bigPort, arrayPort, okPort] = ports;
  const errors: ITargetError[] = [];
  const fnRoute = (name: string, p: number, target: { host: unknown; port: unknown }): IRouteConfig => ({
    name,
    match: { ports: p },
    action: { type: 'forward', target: target as IRouteConfig['action']['target'] },
  });
  try {
    await withProxy(
      [
        fnRoute('throws-host', throwsPort, { host: () => { throw new Error('sync boom'); }, port: good.port }),
        fnRoute('rejects-host', rejectsPort, { host: async () => { await sleep(10); throw new Error('async boom'); }, port: good.port }),
        fnRoute('empty-host', emptyPort, { host: () => '', port: good.port }),
        fnRoute('zero-port', zeroPort, { host: '127.0.0.1', port: () => 0 }),
        fnRoute('big-port', bigPort, { host: '127.0.0.1', port: async () => 70000 }),
        fnRoute('empty-array', arrayPort, { host: () => [], port: good.port }),
        fnRoute('fine', okPort, { host: () => '127.0.0.1', port: () => good.port }),
      ],
      async (proxy) => {
        proxy.on('error', (err: ITargetError) => errors.push(err));
        // A connection through the working route stays open across all the failures.
        const live = net.connect(okPort, '127.0.0.1');
        live.on('error', () => undefined);
        const greeting = await new Promise<string>((resolve) => live.once('data', (d: Buffer) => resolve(d.toString())));
        expect(greeting).toEqual('still-good\n');

        const names = ['throws-host', 'rejects-host', 'empty-host', 'zero-port', 'big-port', 'empty-array'];
        for (const p of ports.slice(0, 6)) {
          const answer = await within(tagOf(p), 5000, `a failed connection on port ${p} to close`);
          expect(answer).toEqual({ data: '', closed: true });
        }
        await waitFor(() => errors.length >= 6, 5000, 'six error events');
        await sleep(50);
        expect(errors.length).toEqual(6);
        for (let i = 0; i < names.length; i++) {
          expect(errors[i].code).toEqual('TARGET_FUNCTION_FAILED');
          expect(errors[i].message).toInclude(names[i]);
          expect(errors[i].routeName).toEqual(names[i]);
          expect(typeof errors[i].connectionId).toEqual('string');
        }
        expect(errors[0].message).toInclude('sync boom');
        expect(errors[1].message).toInclude('async boom');

        await waitFor(() => (proxy.getStatistics().terminationReasons.script_failed ?? 0) >= 6, 5000, 'script_failed to count');
        expect(proxy.getStatistics().terminationReasons.script_failed).toEqual(6);

        // The live connection still echoes, and new connections to the working route are served.
        const echoed = await new Promise<string>((resolve) => {
          live.once('data', (d: Buffer) => resolve(d.toString()));
          live.write('after the failures');
        });
        expect(echoed).toEqual('after the failures');
        live.destroy();
        expect((await tagOf(okPort)).data).toEqual('still-good\n');
        expect(errors.length).toEqual(6);
      },
    );
  } finally {
    await good.close();
  }
});

tap.test('HTTP failures: throw, reject and a bad port answer 502 with TARGET_FUNCTION_FAILED; other requests are served', async () => {
  const backend = await startHttpBackend('http-ok');
  const [port] = await freePorts(1);
  const errors: ITargetError[] = [];
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await withProxy(
      [
        { name: 'http-throws', match: { ports: port, path: '/throws' }, action: { type: 'forward', target: { host: () => { throw new Error('http sync boom'); }, port: backend.port } } },
        { name: 'http-rejects', match: { ports: port, path: '/rejects' }, action: { type: 'forward', target: { host: async () => Promise.reject(new Error('http async boom')), port: backend.port } } },
        { name: 'http-bad-port', match: { ports: port, path: '/bad-port' }, action: { type: 'forward', target: { host: '127.0.0.1', port: () => 70000 } } },
        { name: 'http-fine', match: { ports: port, path: '/ok' }, action: { type: 'forward', target: { host: () => '127.0.0.1', port: backend.port } } },
      ],
      async (proxy) => {
        proxy.on('error', (err: ITargetError) => errors.push(err));
        expect((await httpGet(port, '/throws', {}, agent)).status).toEqual(502);
        expect(await httpGet(port, '/ok', {}, agent)).toEqual({ status: 200, body: 'http-ok /ok' });
        expect((await httpGet(port, '/rejects', {}, agent)).status).toEqual(502);
        expect((await httpGet(port, '/bad-port')).status).toEqual(502);
        expect(await httpGet(port, '/ok')).toEqual({ status: 200, body: 'http-ok /ok' });
        await waitFor(() => errors.length >= 3, 5000, 'three error events');
        await sleep(50);
        expect(errors.map((e) => e.code)).toEqual(['TARGET_FUNCTION_FAILED', 'TARGET_FUNCTION_FAILED', 'TARGET_FUNCTION_FAILED']);
        expect(errors[0].message).toInclude('http-throws');
        expect(errors[0].message).toInclude('http sync boom');
        expect(errors[1].message).toInclude('http-rejects');
        expect(errors[1].message).toInclude('http async boom');
        expect(errors[2].message).toInclude('http-bad-port');
        expect(errors.map((e) => e.routeName)).toEqual(['http-throws', 'http-rejects', 'http-bad-port']);
      },
    );
  } finally {
    agent.destroy();
    await backend.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 3. A function that never settles
// ---------------------------------------------------------------------------------------------

tap.test('a never-settling target function: the connection closes after jsCallTimeout, and stop() still completes', async () => {
  const backend = await startTaggedServer('never-reached');
  const httpBackend = await startHttpBackend('never-reached-http');
  const [tcpPort, httpPort] = await freePorts(2);
  const errors: ITargetError[] = [];
  let calls = 0;
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 300,
    jsCallTimeout: 300,
    routes: [
      {
        name: 'stuck',
        match: { ports: tcpPort },
        action: { type: 'forward', target: { host: () => { calls++; return new Promise<string>(() => undefined); }, port: backend.port } },
      },
      {
        name: 'stuck-http',
        match: { ports: httpPort, path: '/stuck' },
        action: { type: 'forward', target: { host: '127.0.0.1', port: () => { calls++; return new Promise<number>(() => undefined); } } },
      },
    ],
  });
  proxy.on('error', (err: ITargetError) => errors.push(err));
  let stopped = false;
  try {
    await proxy.start();
    const socket = net.connect(tcpPort, '127.0.0.1');
    socket.on('error', () => undefined);
    let received = '';
    socket.on('data', (d: Buffer) => (received += d.toString()));
    await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
    const tookMs = await within(waitForClose(socket), 3000, 'the stuck connection to be closed');
    expect(socket.destroyed).toBeTrue();
    expect(received).toEqual('');
    console.log(`stuck TCP connection closed after ${tookMs} ms`);

    const started = Date.now();
    const answer = await within(httpGet(httpPort, '/stuck'), 3000, 'the stuck request to be answered');
    expect(answer.status).toEqual(502);
    console.log(`stuck HTTP request answered after ${Date.now() - started} ms`);

    await waitFor(() => errors.length >= 2, 3000, 'two timeout errors');
    expect(errors.map((e) => e.code)).toEqual(['TARGET_FUNCTION_FAILED', 'TARGET_FUNCTION_FAILED']);
    expect(errors[0].message).toInclude('stuck');
    expect(errors[0].message).toInclude('jsCallTimeout');
    expect(errors[1].message).toInclude('stuck-http');
    expect(backend.connections).toEqual(0);
    expect(httpBackend.connections).toEqual(0);
    await waitFor(() => (proxy.getStatistics().terminationReasons.script_failed ?? 0) >= 1, 3000, 'script_failed');

    // One more stuck call pending while stop() runs.
    const pending = net.connect(tcpPort, '127.0.0.1');
    pending.on('error', () => undefined);
    await new Promise<void>((resolve) => pending.once('connect', () => resolve()));
    await waitFor(() => calls === 3, 3000, 'the third call');
    const pendingClosed = waitForClose(pending);
    const stopStarted = Date.now();
    stopped = true;
    await within(proxy.stop(), 5000, 'stop() with a target call pending');
    console.log(`stop() took ${Date.now() - stopStarted} ms`);
    await within(pendingClosed, 3000, 'the pending connection to be closed');
  } finally {
    if (!stopped) await within(proxy.stop(), 5000, 'stop()');
    await closeAll([backend, httpBackend]);
  }
});

// ---------------------------------------------------------------------------------------------
// 4. No JavaScript call for static routes
// ---------------------------------------------------------------------------------------------

tap.test('300 connections through a static forward route make zero JS calls; a function route then counts 5', async () => {
  const echo = await startEchoServer();
  const tagged = await startTaggedServer('counted');
  const [staticPort, fnPort] = await freePorts(2);
  const staticRoute: IRouteConfig = { name: 'static', match: { ports: staticPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: echo.port } } };
  try {
    await withProxy(
      [staticRoute],
      async (proxy) => {
        const total = 300;
        const parallel = 30;
        let next = 0;
        let ok = 0;
        const worker = async (): Promise<void> => {
          while (next < total) {
            const i = next++;
            const payload = `payload-${i}-${'x'.repeat(i % 50)}`;
            const back = await exchange(staticPort, payload);
            if (back.toString() === payload) ok++;
          }
        };
        await within(Promise.all(Array.from({ length: parallel }, worker)), 60_000, '300 exchanges');
        expect(ok).toEqual(total);
        await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'the connections to close');
        const stats = proxy.getStatistics();
        expect(stats.totalConnections >= total).toBeTrue();
        expect(stats.jsCalls).toEqual(0);

        await proxy.updateRoutes([
          staticRoute,
          { name: 'fn', match: { ports: fnPort }, action: { type: 'forward', target: { host: () => '127.0.0.1', port: async () => tagged.port } } },
        ]);
        for (let i = 0; i < 5; i++) expect((await tagOf(fnPort)).data).toEqual('counted\n');
        // The static route still costs nothing.
        expect((await exchange(staticPort, 'one more')).toString()).toEqual('one more');
        expect(proxy.getStatistics().jsCalls).toEqual(5);
      },
      { connectionRateLimitPerMinute: 100_000, maxConnectionsPerIP: 1000 },
    );
  } finally {
    await closeAll([echo, tagged]);
  }
});

// ---------------------------------------------------------------------------------------------
// 5. Events
// ---------------------------------------------------------------------------------------------

tap.test("'connection' and 'route-matched' events carry the connection's facts, and stop once unlistened", async () => {
  const backend = await startTaggedServer('evented');
  const [port] = await freePorts(1);
  const connections: Array<Record<string, unknown>> = [];
  const matched: Array<Record<string, unknown>> = [];
  const fnContexts: IRouteContext[] = [];
  try {
    await withProxy(
      [
        {
          name: 'ev-route',
          id: 'ev-id',
          match: { ports: port, domains: 'ev.example.com' },
          action: {
            type: 'forward',
            options: { raw: true },
            target: {
              host: (ctx) => {
                fnContexts.push(ctx);
                return '127.0.0.1';
              },
              port: backend.port,
            },
          },
        },
      ],
      async (proxy) => {
        const onConnection = (e: Record<string, unknown>): void => void connections.push(e);
        const onMatched = (e: Record<string, unknown>): void => void matched.push(e);
        proxy.on('connection', onConnection);
        proxy.on('route-matched', onMatched);

        expect((await tagOf(port, { host: 'ev.example.com' })).data).toEqual('evented\n');
        expect((await tagOf(port, { host: 'ev.example.com', localAddress: '127.0.0.2' })).data).toEqual('evented\n');
        await waitFor(() => connections.length >= 2 && matched.length >= 2, 5000, 'two events of each kind');
        await sleep(100);
        expect(connections.length).toEqual(2);
        expect(matched.length).toEqual(2);

        expect(connections[0]).toEqual({ connectionId: fnContexts[0].connectionId, clientIp: '127.0.0.1', port, domain: 'ev.example.com' });
        expect(connections[1]).toEqual({ connectionId: fnContexts[1].connectionId, clientIp: '127.0.0.2', port, domain: 'ev.example.com' });
        expect(matched[0]).toEqual({
          connectionId: fnContexts[0].connectionId,
          routeName: 'ev-route',
          routeId: 'ev-id',
          clientIp: '127.0.0.1',
          port,
          domain: 'ev.example.com',
        });
        expect(matched[1].clientIp).toEqual('127.0.0.2');
        expect(matched[1].routeName).toEqual('ev-route');
        expect(matched[1].connectionId).toEqual(fnContexts[1].connectionId);

        // A connection to no route is a 'connection' but no 'route-matched'.
        expect((await tagOf(port, { host: 'nowhere.example.com' })).closed).toBeTrue();
        await waitFor(() => connections.length >= 3, 5000, 'a third connection event');
        await sleep(100);
        expect(matched.length).toEqual(2);
        expect(connections[2].domain).toEqual('nowhere.example.com');

        proxy.removeAllListeners('connection');
        proxy.off('route-matched', onMatched);
        for (let i = 0; i < 3; i++) expect((await tagOf(port, { host: 'ev.example.com' })).data).toEqual('evented\n');
        await sleep(200);
        expect(connections.length).toEqual(3);
        expect(matched.length).toEqual(2);
        expect(fnContexts.length).toEqual(5);

        // Listening again brings them back.
        proxy.on('route-matched', onMatched);
        expect((await tagOf(port, { host: 'ev.example.com' })).data).toEqual('evented\n');
        await waitFor(() => matched.length === 3, 5000, 'route-matched after listening again');
        expect(connections.length).toEqual(3);
      },
    );
  } finally {
    await backend.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 6. Lifecycle
// ---------------------------------------------------------------------------------------------

tap.test('a keep-alive connection keeps calling the functions of the table it began under, across route updates', async () => {
  const one = await startHttpBackend('one');
  const two = await startHttpBackend('two');
  const [port] = await freePorts(1);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const route = (name: string, backend: ITestServer): IRouteConfig => ({
    name,
    match: { ports: port, path: '/api/*' },
    // A fresh closure per route object: the wrapper cannot keep it alive by identity.
    action: { type: 'forward', target: { host: () => '127.0.0.1', port: () => backend.port } },
  });
  try {
    await withProxy([route('old', one)], async (proxy) => {
      expect((await httpGet(port, '/api/a', {}, agent)).body).toEqual('one /api/a');
      await proxy.updateRoutes([route('new-1', two)]);
      await proxy.updateRoutes([route('new-2', two)]);
      // Same connection: still the old table, whose functions must still be registered.
      expect((await httpGet(port, '/api/b', {}, agent)).body).toEqual('one /api/b');
      // A new connection takes the newest table.
      expect((await httpGet(port, '/api/c')).body).toEqual('two /api/c');
    });
  } finally {
    agent.destroy();
    await closeAll([one, two]);
  }
});

tap.test('an async host function rejecting while the port function throws does not take the process down', async () => {
  const [port] = await freePorts(1);
  const errors: ITargetError[] = [];
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown): void => {
    unhandled.push(reason);
  };
  process.on('unhandledRejection', onUnhandled);
  try {
    await withProxy(
      [{ name: 'both-fail', match: { ports: port }, action: { type: 'forward', target: { host: async () => Promise.reject(new Error('host says no')), port: () => { throw new Error('port says no'); } } } }],
      async (proxy) => {
        proxy.on('error', (err: ITargetError) => errors.push(err));
        const result = await connectAndRead(port, 'x');
        expect(result.closed).toBeTrue();
        await waitFor(() => errors.length === 1, 3000, 'the error event');
        expect(errors[0].message.includes('port says no')).toBeTrue();
        await sleep(100);
        expect(unhandled).toEqual([]);
      },
    );
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
});

tap.test("removeAllListeners() does not stop later 'connection' listeners from hearing events", async () => {
  const backend = await startEchoServer();
  const [port] = await freePorts(1);
  try {
    await withProxy([{ name: 'echo', match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port } } }], async (proxy) => {
      proxy.removeAllListeners();
      const seen: unknown[] = [];
      proxy.on('connection', (event: unknown) => seen.push(event));
      await exchange(port, 'hi');
      await waitFor(() => seen.length === 1, 3000, "a 'connection' event");
    });
  } finally {
    await backend.close();
  }
});

tap.test('a child process with a socket-handler route and a function-target route exits by itself after stop()', async () => {
  const backend = await startTaggedServer('child-backend');
  const [echoPort, fnPort] = await freePorts(2);
  const script = `
    import * as net from 'node:net';
    import { SmartProxy, SocketHandlers } from './ts/index.js';
    const proxy = new SmartProxy({
      gracefulShutdownTimeout: 300,
      routes: [
        { name: 'echo', match: { ports: ${echoPort} }, action: { type: 'socket-handler', socketHandler: SocketHandlers.echo } },
        { name: 'fn', match: { ports: ${fnPort} }, action: { type: 'forward', target: { host: async () => '127.0.0.1', port: (ctx) => ${backend.port} } } },
      ],
    });
    await proxy.start();
    const talk = (port, payload) => new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => socket.end(payload));
      let data = '';
      socket.on('data', (d) => (data += d));
      socket.on('error', reject);
      socket.on('close', () => resolve(data));
    });
    console.log('echo=' + JSON.stringify(await talk(${echoPort}, 'ping')));
    console.log('fn=' + JSON.stringify(await talk(${fnPort}, 'pong')));
    console.log('jsCalls=' + proxy.getStatistics().jsCalls);
    await proxy.stop();
    console.log('stopped');
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: path.resolve(import.meta.dirname, '..'),
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let output = '';
  let stoppedAt = 0;
  child.stdout!.on('data', (d: Buffer) => {
    output += d.toString();
    if (stoppedAt === 0 && output.includes('stopped')) stoppedAt = Date.now();
  });
  const exited = new Promise<{ code: number | null; at: number }>((resolve) => child.on('exit', (code) => resolve({ code, at: Date.now() })));
  const killer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  try {
    await waitFor(() => stoppedAt > 0 || child.exitCode !== null, 45_000, "the child to print 'stopped'");
    expect(output).toInclude('stopped');
    const exit = await within(exited, 10_000, 'the child to exit after stop()');
    console.log(`child exited ${exit.at - stoppedAt} ms after printing 'stopped'`);
    expect(exit.code).toEqual(0);
    expect(exit.at - stoppedAt < 5000).toBeTrue();
    expect(output).toInclude('echo="ping"');
    expect(output).toInclude('fn="child-backend\\npong"');
    expect(output).toInclude('jsCalls=2');
  } finally {
    clearTimeout(killer);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await backend.close();
  }
});

tap.start();
