// Socket handlers in JavaScript with a real net.Socket: the client's own descriptor on plain TCP,
// a socket pair carrying the plaintext where TLS ends in the proxy. Every SocketHandler end to end,
// bytes read to route a connection delivered first (even to a handler that waits before reading),
// the context built in Rust, throwing / rejecting / stuck handlers, natively served HTTP handlers
// (no JavaScript call), and stop() with handler sockets still open.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import * as tls from 'node:tls';

import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';

import { SmartProxy, SocketHandlers, createSocketHandlerRoute, createHttpToHttpsRedirect } from '../ts/index.js';
import type { IRouteConfig, IRouteContext } from '../ts/index.js';
import { ScriptBridge } from '../ts/bridge.js';
import type { RouteContext, SocketHandoff } from '../ts/native.js';
import { exchange, freePorts, sleep, startEchoServer, waitFor, waitForClose } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';

const ca = createTestCa();
const cert = ca.issue(['sh.example.com', 'other.example.com']);

/** Connects, writes, and collects everything until the proxy closes (the client never half-closes). */
function talk(port: number, payload: string, opts: { endAfterMs?: number } = {}): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(payload));
    let data = '';
    socket.on('data', (d: Buffer) => (data += d.toString()));
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(data));
    if (opts.endAfterMs !== undefined) setTimeout(() => socket.end(), opts.endAfterMs);
  });
}

const negotiatedAlpn: Array<string | false | null> = [];

/** Same over TLS, verifying the proxy's certificate for `servername`. */
function talkTls(port: number, servername: string, payload: string, opts: { endAfterMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    // Offers h2: a socket handler's TLS must not agree to it (the handler speaks no HTTP/2).
    const socket = tls.connect({ port, host: '127.0.0.1', servername, ca: ca.cert, ALPNProtocols: ['h2', 'http/1.1'] }, () => {
      negotiatedAlpn.push(socket.alpnProtocol);
      socket.write(payload);
    });
    let data = '';
    socket.on('data', (d: Buffer) => (data += d.toString()));
    socket.on('error', reject);
    socket.on('close', () => resolve(data));
    if (opts.endAfterMs !== undefined) setTimeout(() => socket.end(), opts.endAfterMs);
  });
}

function httpGet(port: number, path: string, host: string): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ port, host: '127.0.0.1', path, headers: { host }, agent: false }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
  });
}

async function withProxy(routes: IRouteConfig[], run: (proxy: SmartProxy) => Promise<void>, extra: Record<string, unknown> = {}): Promise<void> {
  const proxy = new SmartProxy({ routes, gracefulShutdownTimeout: 300, ...extra });
  await proxy.start();
  try {
    await run(proxy);
  } finally {
    await proxy.stop();
  }
}

const tlsTerminate = { mode: 'terminate' as const, certificate: { key: cert.key, cert: cert.cert } };

tap.test('echo over the client socket itself: a real TCP net.Socket with the client address', async () => {
  const [port] = await freePorts(1);
  let seen: { remote?: string; handle?: string; ctx?: IRouteContext } = {};
  await withProxy(
    [
      {
        name: 'echo',
        match: { ports: port },
        action: {
          type: 'socket-handler',
          socketHandler: (socket, ctx) => {
            seen = { remote: socket.remoteAddress, handle: (socket as unknown as { _handle: { constructor: { name: string } } })._handle.constructor.name, ctx };
            SocketHandlers.echo(socket, ctx);
          },
        },
      },
    ],
    async (proxy) => {
      const back = await exchange(port, 'hello handler');
      expect(back.toString()).toEqual('hello handler');
      expect(seen.handle).toEqual('TCP');
      expect(seen.remote?.endsWith('127.0.0.1')).toBeTrue();
      expect(seen.ctx?.clientIp).toEqual('127.0.0.1');
      expect(seen.ctx?.port).toEqual(port);
      expect(seen.ctx?.isTls).toBeFalse();
      expect(seen.ctx?.routeName).toEqual('echo');
      expect(typeof seen.ctx?.connectionId).toEqual('string');
      expect(seen.ctx?.serverIp?.endsWith('127.0.0.1')).toBeTrue();
      expect(Math.abs(Date.now() - (seen.ctx?.timestamp ?? 0)) < 10_000).toBeTrue();
      await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'the hand-off to end');
      const stats = proxy.getStatistics();
      expect(stats.jsCalls).toEqual(1);
      expect(stats.terminationReasons.handed_to_script).toEqual(1);
      // Bytes JavaScript read and wrote are counted for the connection.
      expect(stats.bytesIn).toEqual('hello handler'.length);
      expect(stats.bytesOut).toEqual('hello handler'.length);
    },
  );
});

tap.test('a handler that waits 200 ms before reading still gets the first bytes (sniffed and later ones)', async () => {
  const [port] = await freePorts(1);
  await withProxy(
    [
      // Domains make the proxy read the request head to route: those bytes must come first.
      createSocketHandlerRoute('sh.example.com', port, async (socket) => {
        await sleep(200);
        let got = '';
        socket.on('data', (d: Buffer) => {
          got += d.toString();
          if (got.includes('END')) socket.end(`received ${got.length} bytes: ${JSON.stringify(got)}`);
        });
      }),
    ],
    async () => {
      const head = 'GET /x HTTP/1.1\r\nHost: sh.example.com\r\n\r\n';
      const answer = await new Promise<string>((resolve) => {
        const socket = net.connect(port, '127.0.0.1', () => {
          socket.write(head);
          setTimeout(() => socket.write('more-END'), 50);
        });
        let data = '';
        socket.on('data', (d: Buffer) => (data += d.toString()));
        socket.on('close', () => resolve(data));
      });
      expect(answer).toEqual(`received ${head.length + 8} bytes: ${JSON.stringify(head + 'more-END')}`);
    },
  );
});

tap.test('TLS terminated in Rust: the handler reads plaintext from a socket pair that shows the client address', async () => {
  const [port] = await freePorts(1);
  let seen: { remote?: string; remotePort?: number; ctx?: IRouteContext } = {};
  await withProxy(
    [
      {
        name: 'tls-echo',
        match: { ports: port, domains: 'sh.example.com' },
        action: {
          type: 'socket-handler',
          tls: tlsTerminate,
          socketHandler: (socket, ctx) => {
            seen = { remote: socket.remoteAddress, remotePort: socket.remotePort, ctx };
            socket.on('data', (d: Buffer) => socket.write(`echo:${d.toString()}`));
            socket.on('end', () => socket.end());
          },
        },
      },
    ],
    async () => {
      const back = await talkTls(port, 'sh.example.com', 'secret', { endAfterMs: 300 });
      expect(back).toEqual('echo:secret');
      expect(seen.remote).toEqual('127.0.0.1');
      expect(typeof seen.remotePort).toEqual('number');
      expect(seen.ctx?.domain).toEqual('sh.example.com');
      expect(seen.ctx?.isTls).toBeTrue();
      expect(seen.ctx?.tlsVersion).toEqual('TLSv1.3');
      expect(negotiatedAlpn).toEqual([false]);
    },
  );
});

tap.test('SocketHandlers over real sockets: proxy, lineProtocol, block, httpServer (plain and over TLS)', async () => {
  const echoBackend = await startEchoServer();
  const ports = await freePorts(5);
  try {
    await withProxy(
      [
        createSocketHandlerRoute(undefined as never, ports[0], SocketHandlers.proxy('127.0.0.1', echoBackend.port), { name: 'proxy' }),
        createSocketHandlerRoute(undefined as never, ports[1], SocketHandlers.lineProtocol((line, socket) => socket.write(`<${line}>\n`)), { name: 'lines' }),
        createSocketHandlerRoute(undefined as never, ports[2], SocketHandlers.block('go away\n'), { name: 'block' }),
        createSocketHandlerRoute(undefined as never, ports[3], SocketHandlers.httpServer((req, res) => {
          res.status(201).header('x-path', req.url).send(`hi ${req.method} ${req.headers['x-who']}`);
        }), { name: 'server' }),
        {
          name: 'server-tls',
          match: { ports: ports[4], domains: 'sh.example.com' },
          action: { type: 'socket-handler', tls: tlsTerminate, socketHandler: SocketHandlers.httpServer((req, res) => res.send(`tls ${req.url}`)) },
        },
      ],
      async () => {
        // As from a net.Server (allowHalfOpen false): the client stays open until it has its answer.
        expect(await talk(ports[0], 'through the proxy handler', { endAfterMs: 300 })).toEqual('through the proxy handler');
        expect(await talk(ports[1], 'one\ntwo\n', { endAfterMs: 300 })).toEqual('<one>\n<two>\n');
        expect(await talk(ports[2], 'anything')).toEqual('go away\n');
        const res = await httpGet(ports[3], '/p?q=1', 'whatever');
        expect(res.status).toEqual(201);
        expect(res.headers['x-path']).toEqual('/p?q=1');
        const tlsAnswer = await talkTls(ports[4], 'sh.example.com', 'GET /secure HTTP/1.1\r\nHost: sh.example.com\r\n\r\n');
        expect(tlsAnswer.startsWith('HTTP/1.1 200')).toBeTrue();
        expect(tlsAnswer.endsWith('tls /secure')).toBeTrue();
      },
    );
  } finally {
    await echoBackend.close();
  }
});

tap.test('httpRedirect, httpResponse and httpBlock are served natively: no call into JavaScript', async () => {
  const [port] = await freePorts(1);
  await withProxy(
    [
      createHttpToHttpsRedirect('sh.example.com', 8443, { match: { ports: port } as never }),
      {
        name: 'fixed',
        match: { ports: port, domains: 'other.example.com', path: '/fixed' },
        action: { type: 'socket-handler', socketHandler: SocketHandlers.httpResponse({ statusCode: 418, headers: { 'x-kind': 'teapot' }, body: 'short and stout' }) },
      },
      { name: 'blocked', match: { ports: port, domains: 'other.example.com' }, action: { type: 'socket-handler', socketHandler: SocketHandlers.httpBlock(451, 'not here') } },
    ],
    async (proxy) => {
      const redirect = await httpGet(port, '/a/b?c=d', 'sh.example.com');
      expect(redirect.status).toEqual(301);
      expect(redirect.headers.location).toEqual('https://sh.example.com:8443/a/b?c=d');
      const fixed = await httpGet(port, '/fixed', 'other.example.com');
      expect(fixed.status).toEqual(418);
      expect(fixed.headers['x-kind']).toEqual('teapot');
      expect(fixed.body).toEqual('short and stout');
      const blocked = await httpGet(port, '/else', 'other.example.com');
      expect(blocked.status).toEqual(451);
      expect(blocked.body.includes('not here')).toBeTrue();
      expect(proxy.getStatistics().jsCalls).toEqual(0);
    },
  );
});

tap.test('every SocketHandler behind TLS terminated in the proxy (one port, chosen by SNI)', async () => {
  const names = ['echo', 'proxy', 'lines', 'block', 'server', 'response', 'redirect', 'httpblock'];
  const multi = ca.issue(names.map((n) => `${n}.tls.test`));
  const echoBackend = await startEchoServer();
  const [port] = await freePorts(1);
  const terminate = { mode: 'terminate' as const, certificate: { key: multi.key, cert: multi.cert } };
  const route = (name: string, socketHandler: IRouteConfig['action']['socketHandler']): IRouteConfig => ({
    name,
    match: { ports: port, domains: `${name}.tls.test` },
    action: { type: 'socket-handler', tls: terminate, socketHandler },
  });
  const request = (name: string, path = '/'): string => `GET ${path} HTTP/1.1\r\nHost: ${name}.tls.test\r\nConnection: close\r\n\r\n`;
  try {
    await withProxy(
      [
        route('echo', SocketHandlers.echo),
        route('proxy', SocketHandlers.proxy('127.0.0.1', echoBackend.port)),
        route('lines', SocketHandlers.lineProtocol((line, socket) => socket.write(`[${line}]\n`))),
        route('block', SocketHandlers.block('blocked over tls\n')),
        route('server', SocketHandlers.httpServer((req, res) => res.status(202).send(`served ${req.url}`))),
        route('response', SocketHandlers.httpResponse({ statusCode: 200, headers: { 'x-native': 'yes' }, body: 'native body' })),
        route('redirect', SocketHandlers.httpRedirect('https://elsewhere.test{path}', 302)),
        route('httpblock', SocketHandlers.httpBlock(403, 'nope')),
      ],
      async (proxy) => {
        const ask = (name: string, payload: string, endAfterMs?: number): Promise<string> => talkTls(port, `${name}.tls.test`, payload, { endAfterMs });
        expect(await ask('echo', 'ping', 300)).toEqual('ping');
        expect(await ask('proxy', 'via backend', 300)).toEqual('via backend');
        expect(await ask('lines', 'a\nb\n', 300)).toEqual('[a]\n[b]\n');
        expect(await ask('block', 'x')).toEqual('blocked over tls\n');
        const served = await ask('server', request('server', '/s?x=1'));
        expect(served.startsWith('HTTP/1.1 202')).toBeTrue();
        expect(served.endsWith('served /s?x=1')).toBeTrue();
        const callsBeforeNative = proxy.getStatistics().jsCalls;
        const native = await ask('response', request('response'));
        expect(native.startsWith('HTTP/1.1 200')).toBeTrue();
        expect(native.toLowerCase().includes('x-native: yes')).toBeTrue();
        expect(native.endsWith('native body')).toBeTrue();
        const redirect = await ask('redirect', request('redirect', '/p?q=2'));
        expect(redirect.startsWith('HTTP/1.1 302')).toBeTrue();
        expect(redirect.toLowerCase().includes('location: https://elsewhere.test/p?q=2')).toBeTrue();
        expect((await ask('httpblock', request('httpblock'))).startsWith('HTTP/1.1 403')).toBeTrue();
        // The three HTTP answers were written by the engine itself.
        expect(proxy.getStatistics().jsCalls).toEqual(callsBeforeNative);
      },
    );
  } finally {
    await echoBackend.close();
  }
});

tap.test('throwing and rejecting handlers close their connection, emit error, and leave the others alone', async () => {
  const ports = await freePorts(3);
  const errors: Array<{ code: string; message: string; routeName?: string }> = [];
  await withProxy(
    [
      createSocketHandlerRoute(undefined as never, ports[0], () => {
        throw new Error('sync boom');
      }, { name: 'throws' }),
      createSocketHandlerRoute(undefined as never, ports[1], async (socket) => {
        socket.write('partial');
        await sleep(20);
        throw new Error('async boom');
      }, { name: 'rejects' }),
      createSocketHandlerRoute(undefined as never, ports[2], SocketHandlers.echo, { name: 'fine' }),
    ],
    async (proxy) => {
      proxy.on('error', (err: Error & { code: string; routeName?: string }) => errors.push({ code: err.code, message: err.message, routeName: err.routeName }));
      expect(await talk(ports[0], 'x')).toEqual('');
      expect(await talk(ports[1], 'x')).toEqual('partial');
      expect((await exchange(ports[2], 'still fine')).toString()).toEqual('still fine');
      await waitFor(() => errors.length === 2, 5000, 'two error events');
      expect(errors.map((e) => e.code)).toEqual(['SOCKET_HANDLER_FAILED', 'SOCKET_HANDLER_FAILED']);
      expect(errors[0].message).toEqual('socket handler of route "throws" threw: sync boom');
      expect(errors[1].message).toEqual('socket handler of route "rejects" rejected: async boom');
      await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
      expect(proxy.getStatistics().terminationReasons.handler_failed).toEqual(2);
    },
  );
});

tap.test('a handler stuck before using its socket is closed after jsCallTimeout; one that uses it may run on', async () => {
  const ports = await freePorts(2);
  const errors: string[] = [];
  await withProxy(
    [
      createSocketHandlerRoute(undefined as never, ports[0], () => new Promise<void>(() => undefined), { name: 'stuck' }),
      createSocketHandlerRoute(undefined as never, ports[1], async (socket) => {
        socket.on('data', (d: Buffer) => socket.write(d));
        await new Promise<void>((resolve) => socket.on('close', () => resolve()));
      }, { name: 'long-lived' }),
    ],
    async (proxy) => {
      proxy.on('error', (err: Error) => errors.push(err.message));
      const started = Date.now();
      expect(await talk(ports[0], 'x')).toEqual('');
      const took = Date.now() - started;
      expect(took >= 250 && took < 5000).toBeTrue();
      expect(errors[0]).toEqual('socket handler of route "stuck" did not settle within 300 ms (jsCallTimeout) and never used its socket');
      // Well past the timeout, the working handler still echoes.
      const socket = net.connect(ports[1], '127.0.0.1');
      await new Promise((resolve) => socket.once('connect', resolve));
      await sleep(600);
      socket.write('late');
      const [echoed] = await Promise.race([
        new Promise<Buffer[]>((resolve) => socket.once('data', (d: Buffer) => resolve([d]))),
        sleep(3000).then(() => [Buffer.from('nothing')]),
      ]);
      expect(echoed.toString()).toEqual('late');
      socket.destroy();
      expect(errors.length).toEqual(1);
    },
    { jsCallTimeout: 300 },
  );
});

tap.test('a socket handler route takes the whole connection when its first request matches; later requests elsewhere get 421', async () => {
  const [port] = await freePorts(1);
  const backend = http.createServer((req, res) => res.end(`backend ${req.url}`));
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  const backendPort = (backend.address() as net.AddressInfo).port;
  try {
    await withProxy(
      [
        { name: 'api', match: { ports: port, domains: 'sh.example.com', path: '/api/*' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } },
        createSocketHandlerRoute('sh.example.com', port, SocketHandlers.httpServer((req, res) => res.send(`handler ${req.url}`)), { name: 'handler' }),
      ],
      async () => {
        expect((await httpGet(port, '/api/x', 'sh.example.com')).body).toEqual('backend /api/x');
        expect((await httpGet(port, '/page', 'sh.example.com')).body).toEqual('handler /page');
        // Keep-alive: the first request went to the backend; the second belongs to the handler.
        const answer = await talk(port, 'GET /api/y HTTP/1.1\r\nHost: sh.example.com\r\n\r\nGET /page HTTP/1.1\r\nHost: sh.example.com\r\n\r\n');
        expect(answer.includes('backend /api/y')).toBeTrue();
        expect(answer.includes('HTTP/1.1 421')).toBeTrue();
      },
    );
  } finally {
    backend.closeAllConnections();
    await new Promise<void>((resolve) => backend.close(() => resolve()));
  }
});

tap.test('stop() completes with handler sockets still open, and closes them', async () => {
  const [port] = await freePorts(1);
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    routes: [createSocketHandlerRoute(undefined as never, port, (socket) => socket.on('data', () => undefined), { name: 'holder' })],
  });
  await proxy.start();
  const clients = await Promise.all(
    [1, 2, 3].map(
      () =>
        new Promise<net.Socket>((resolve) => {
          const socket = net.connect(port, '127.0.0.1', () => resolve(socket));
        }),
    ),
  );
  await waitFor(() => proxy.getStatistics().activeConnections === 3, 5000, 'three handed-off connections');
  const closed = clients.map((c) => waitForClose(c));
  const started = Date.now();
  await proxy.stop();
  expect(Date.now() - started < 5000).toBeTrue();
  await Promise.race([Promise.all(closed), sleep(3000).then(() => Promise.reject(new Error('clients were not closed')))]);
  expect(proxy.getStatistics().activeConnections).toEqual(0);
});

// The engine gives up the descriptor when it hands a connection over; the wrapper must close it
// on every path where no net.Socket comes to own it. Driven directly: the engine's own contexts
// are always well formed.
tap.test('a hand-off that fails before a socket owns the descriptor closes it and reports the failure', async () => {
  const events = new EventEmitter();
  const errors: Array<Error & { code?: string; routeName?: string }> = [];
  events.on('error', (err: Error & { code?: string }) => errors.push(err));
  const bridge = new ScriptBridge(events, () => 1000);
  const isOpen = (fd: number): boolean => {
    try {
      fs.fstatSync(fd);
      return true;
    } catch {
      return false;
    }
  };
  const goodContext = { port: 1, clientIp: '127.0.0.1', serverIp: '127.0.0.1', isTls: false, timestamp: Date.now(), connectionId: 'c-2', routeName: 'r' };
  const handoff = (fd: number, context: unknown): SocketHandoff => ({
    handler: 1,
    fd,
    kind: 'tcp',
    initial: Buffer.alloc(0),
    clientPort: 40000,
    context: context as RouteContext,
  });

  // A context the wrapper cannot convert.
  const fd1 = fs.openSync('/dev/null', 'r');
  let report1: unknown;
  try {
    report1 = await bridge.onSocket(handoff(fd1, null));
  } finally {
    if (isOpen(fd1)) {
      fs.closeSync(fd1);
      throw new Error('the descriptor of a hand-off with an unreadable context was left open');
    }
  }
  expect(report1).toEqual({ handlerFailed: true, bytesRead: 0, bytesWritten: 0 });
  // A context whose fields throw when read gets the same treatment.
  const fd2 = fs.openSync('/dev/null', 'r');
  const hostile = new Proxy({}, { ownKeys: () => { throw new Error('no keys'); } });
  const report2 = await bridge.onSocket(handoff(fd2, hostile));
  const fd2Open = isOpen(fd2);
  if (fd2Open) fs.closeSync(fd2);
  expect(fd2Open).toBeFalse();
  expect(report2).toEqual({ handlerFailed: true, bytesRead: 0, bytesWritten: 0 });
  // A descriptor that is no socket (a file): net.Socket refuses it.
  const fd3 = fs.openSync('/dev/null', 'r');
  const report3 = await bridge.onSocket(handoff(fd3, goodContext));
  const fd3Open = isOpen(fd3);
  if (fd3Open) fs.closeSync(fd3);
  expect(fd3Open).toBeFalse();
  expect(report3).toEqual({ handlerFailed: true, bytesRead: 0, bytesWritten: 0 });

  expect(errors.map((e) => e.code)).toEqual(['SOCKET_HANDOFF_FAILED', 'SOCKET_HANDOFF_FAILED', 'SOCKET_HANDOFF_FAILED']);
  expect(errors[0].message).toInclude('route context');
  expect(errors[2].message).toInclude('could not be opened as a socket');
  expect(errors[2].routeName).toEqual('r');
});

tap.start();
