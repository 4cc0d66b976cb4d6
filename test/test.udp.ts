// UDP forward routes (`match.transport: 'udp' | 'all'`): datagrams relayed per flow (client address
// and port ↔ one connected upstream socket), replies sent back from the proxy's port, idle flows
// reaped after `udp.sessionTimeout`, the route's IP lists, `maxSessionsPerIP` and `maxDatagramSize`,
// one route serving TCP and UDP on the same port, and stop() releasing the UDP port.
// The UDP echo backend answers each datagram with `${sender port}:` followed by the datagram, so a
// client sees which upstream socket (flow) carried its datagram.
// UDP socket-handler routes: a `datagramHandler` gets each datagram with the client's address, the
// port and the route's name, and answers through `reply` (several times, later too) while the
// client's flow lives; its failures are 'error' events; an 'all' route takes TCP connections with
// its socketHandler on the same port; handler flows follow the flow rules of forward routes.
import { tap, expect } from '@push.rocks/tapbundle';
import * as dgram from 'node:dgram';
import { randomBytes } from 'node:crypto';

import { SmartProxy, SmartProxyConfigError, createUdpHandlerRoute, validateRouteConfig } from '../ts/index.js';
import type { IDatagramInfo, IRouteConfig, TDatagramHandler, TSocketHandler } from '../ts/index.js';
import { exchange, freePort, sleep, startEchoServer, thrown, withCleanup, type TDefer } from './helpers/net.js';

type TOptions = ConstructorParameters<typeof SmartProxy>[0];

interface IUdpStats {
  udpSessions: number;
  udp: { sessionsTotal: number; datagramsIn: number; datagramsOut: number; bytesIn: number; bytesOut: number; dropped: number } | null;
}

/** The UDP part of `getStatistics()` (typed here until IStatistics declares it). */
function udpStats(proxy: SmartProxy): IUdpStats {
  const stats = proxy.getStatistics() as unknown as IUdpStats;
  return { udpSessions: stats.udpSessions, udp: stats.udp };
}

function dropped(proxy: SmartProxy): number {
  return udpStats(proxy).udp?.dropped ?? 0;
}

/** Polls `probe` every 20 ms until `ok` holds for its value; the error names the last value seen. */
async function eventually<T>(what: string, probe: () => T, ok: (value: T) => boolean, timeoutMs = 3000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (ok(value)) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last value: ${JSON.stringify(value)})`);
    await sleep(20);
  }
}

interface IUdpRouteOptions {
  name?: string;
  transport?: 'udp' | 'all';
  udp?: { sessionTimeout?: number; maxSessionsPerIP?: number; maxDatagramSize?: number };
  security?: { ipAllowList?: string[]; ipBlockList?: string[] };
}

/** A forward route on `port` with `transport: 'udp'` (or `opts.transport`) to 127.0.0.1:`backendPort`. */
function udpRoute(port: number, backendPort: number, opts: IUdpRouteOptions = {}) {
  return {
    name: opts.name ?? 'udp',
    match: { ports: port, transport: opts.transport ?? 'udp' },
    action: {
      type: 'forward' as const,
      targets: [{ host: '127.0.0.1', port: backendPort }],
      ...(opts.udp ? { udp: opts.udp } : {}),
    },
    ...(opts.security ? { security: opts.security } : {}),
  };
}

interface IProxyHandle {
  proxy: SmartProxy;
  /** Stops the proxy once; the deferred clean-up does nothing after an explicit stop. */
  stop(): Promise<void>;
}

async function startProxy(routes: unknown[], defer: TDefer): Promise<IProxyHandle> {
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 200, routes } as unknown as TOptions);
  let stopping: Promise<void> | undefined;
  const handle: IProxyHandle = { proxy, stop: () => (stopping ??= proxy.stop()) };
  await proxy.start();
  defer(() => handle.stop());
  return handle;
}

interface IUdpEcho {
  port: number;
  /** Source ports of the datagrams received, in order. */
  sourcePorts: number[];
  received: number;
  close(): Promise<void>;
}

/** A UDP backend on 127.0.0.1:`port` (0 = any) answering `${rinfo.port}:` + the datagram. */
function startUdpEcho(port = 0): Promise<IUdpEcho> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    const echo: IUdpEcho = {
      port: 0,
      sourcePorts: [],
      received: 0,
      close: () => new Promise<void>((done) => socket.close(() => done())),
    };
    socket.on('message', (msg, rinfo) => {
      echo.received++;
      echo.sourcePorts.push(rinfo.port);
      socket.send(Buffer.concat([Buffer.from(`${rinfo.port}:`), msg]), rinfo.port, rinfo.address);
    });
    socket.once('error', reject);
    socket.bind(port, '127.0.0.1', () => {
      socket.removeListener('error', reject);
      socket.on('error', () => undefined);
      echo.port = (socket.address() as { port: number }).port;
      resolve(echo);
    });
  });
}

interface IReply {
  data: Buffer;
  fromAddress: string;
  fromPort: number;
}

/** A client dgram socket on 127.0.0.1 (unconnected, so it also sees datagrams from unexpected sources). */
class UdpClient {
  private readonly socket = dgram.createSocket('udp4');
  private readonly queue: IReply[] = [];
  private waiter: ((reply: IReply) => void) | undefined;
  public port = 0;

  public static async open(defer: TDefer): Promise<UdpClient> {
    const client = new UdpClient();
    await new Promise<void>((resolve, reject) => {
      client.socket.once('error', reject);
      client.socket.bind(0, '127.0.0.1', () => {
        client.socket.removeListener('error', reject);
        resolve();
      });
    });
    client.socket.on('error', () => undefined);
    client.port = client.socket.address().port;
    client.socket.on('message', (data, rinfo) => {
      const reply = { data, fromAddress: rinfo.address, fromPort: rinfo.port };
      const waiter = client.waiter;
      client.waiter = undefined;
      if (waiter) waiter(reply);
      else client.queue.push(reply);
    });
    defer(() => client.close());
    return client;
  }

  public send(port: number, payload: Buffer | string): Promise<void> {
    return new Promise((resolve, reject) => this.socket.send(payload, port, '127.0.0.1', (err) => (err ? reject(err) : resolve())));
  }

  /** The next datagram received (queued or arriving within `timeoutMs`). */
  public next(timeoutMs = 2000): Promise<IReply> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new Error(`no datagram within ${timeoutMs} ms on client port ${this.port}`));
      }, timeoutMs);
      this.waiter = (reply) => {
        clearTimeout(timer);
        resolve(reply);
      };
    });
  }

  /** Sends `payload` to `port` and resolves with the next datagram received. */
  public async request(port: number, payload: Buffer | string, timeoutMs = 2000): Promise<IReply> {
    const reply = this.next(timeoutMs);
    await this.send(port, payload);
    return reply;
  }

  /** Resolves with the datagrams received during the next `ms` (plus any already queued). */
  public async collect(ms: number): Promise<IReply[]> {
    await sleep(ms);
    return this.queue.splice(0);
  }

  public close(): Promise<void> {
    return new Promise((resolve) => {
      try {
        this.socket.close(() => resolve());
      } catch {
        resolve();
      }
    });
  }
}

/** Splits an echo reply into the backend-seen source port and the echoed payload. */
function parseEcho(reply: IReply): { sourcePort: number; payload: Buffer } {
  const colon = reply.data.indexOf(0x3a);
  if (colon < 0) throw new Error(`not an echo reply: ${reply.data.subarray(0, 40).toString()}`);
  return { sourcePort: Number(reply.data.subarray(0, colon).toString()), payload: reply.data.subarray(colon + 1) };
}

/** Binds a dgram socket to `port` on 0.0.0.0 and closes it again; resolves with the bind error, if any. */
function tryBindUdp(port: number): Promise<Error | undefined> {
  return new Promise((resolve) => {
    const socket = dgram.createSocket('udp4');
    socket.once('error', (err) => {
      try {
        socket.close();
      } catch {
        // never bound
      }
      resolve(err);
    });
    socket.bind(port, '0.0.0.0', () => socket.close(() => resolve(undefined)));
  });
}

// ---------------------------------------------------------------------------------------------

tap.test('echo through a udp forward route: replies come back from the proxy port; 100 datagrams of 1000 bytes all return', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port)], defer);
    const client = await UdpClient.open(defer);

    const first = await client.request(port, 'hello udp');
    expect(first.fromAddress).toEqual('127.0.0.1');
    expect(first.fromPort).toEqual(port);
    const { sourcePort, payload } = parseEcho(first);
    expect(payload.toString()).toEqual('hello udp');
    // The backend sees the proxy's upstream socket, not the client.
    expect(sourcePort).not.toEqual(client.port);
    expect(first.data.toString()).toEqual(`${sourcePort}:hello udp`);

    for (let i = 0; i < 100; i++) {
      const sent = randomBytes(1000);
      const reply = await client.request(port, sent, 2000);
      expect(reply.fromPort).toEqual(port);
      const echoed = parseEcho(reply);
      expect(echoed.sourcePort).toEqual(sourcePort);
      expect(echoed.payload.equals(sent)).toBeTrue();
    }
    expect(echo.received).toEqual(101);
    // One client address and port is one flow: one upstream socket carried all 101 datagrams.
    expect(new Set(echo.sourcePorts).size).toEqual(1);

    const stats = udpStats(proxy);
    expect(stats.udpSessions).toEqual(1);
    expect(stats.udp).not.toEqual(null);
    expect(stats.udp!.sessionsTotal).toEqual(1);
    await eventually('datagram counters to reach 101', () => udpStats(proxy).udp!, (u) => u.datagramsIn >= 101 && u.datagramsOut >= 101);
    const udp = udpStats(proxy).udp!;
    expect(udp.bytesIn).toBeGreaterThanOrEqual(100 * 1000 + 'hello udp'.length);
    expect(udp.bytesOut).toBeGreaterThanOrEqual(100 * 1000 + 'hello udp'.length);
    expect(udp.dropped).toEqual(0);
  });
});

tap.test('two client flows are kept apart: each gets only its own replies over its own upstream socket', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port)], defer);
    const a = await UdpClient.open(defer);
    const b = await UdpClient.open(defer);

    const upstreamOf: Record<string, Set<number>> = { a: new Set(), b: new Set() };
    for (let i = 0; i < 10; i++) {
      for (const [tag, client] of [['a', a], ['b', b]] as const) {
        const reply = await client.request(port, `${tag}-${i}`);
        expect(reply.fromPort).toEqual(port);
        const { sourcePort, payload } = parseEcho(reply);
        expect(payload.toString()).toEqual(`${tag}-${i}`);
        upstreamOf[tag].add(sourcePort);
      }
    }
    // Nothing else arrived on either socket (no reply of the other flow leaked over).
    expect((await a.collect(100)).length).toEqual(0);
    expect((await b.collect(0)).length).toEqual(0);

    expect(upstreamOf.a.size).toEqual(1);
    expect(upstreamOf.b.size).toEqual(1);
    const [portA] = [...upstreamOf.a];
    const [portB] = [...upstreamOf.b];
    expect(portA).not.toEqual(portB);
    expect(new Set(echo.sourcePorts).size).toEqual(2);

    expect(udpStats(proxy).udpSessions).toEqual(2);
    expect(udpStats(proxy).udp!.sessionsTotal).toEqual(2);
  });
});

tap.test('bursts from three clients at once, from their first datagram on: each gets all of its own replies, in the order sent', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port)], defer);
    const clients = await Promise.all(['a', 'b', 'c'].map(async (tag) => ({ tag, client: await UdpClient.open(defer) })));
    const perClient = 60;
    // No waiting for replies: the first datagrams of each flow arrive while its upstream socket
    // is being opened (queued for the flow), the later ones while it is open (sent straight on),
    // and the port reads the three clients' datagrams interleaved, several per read.
    const sends: Promise<void>[] = [];
    for (let i = 0; i < perClient; i++) {
      for (const { tag, client } of clients) sends.push(client.send(port, `${tag}-${i}`));
    }
    await Promise.all(sends);
    for (const { tag, client } of clients) {
      const replies: IReply[] = [];
      while (replies.length < perClient) replies.push(await client.next(3000));
      const echoed = replies.map(parseEcho);
      expect(echoed.map(({ payload }) => payload.toString())).toEqual(Array.from({ length: perClient }, (_, i) => `${tag}-${i}`));
      expect(new Set(echoed.map(({ sourcePort }) => sourcePort)).size).toEqual(1);
      expect(replies.every((reply) => reply.fromPort === port)).toBeTrue();
    }
    expect(new Set(echo.sourcePorts).size).toEqual(3);
    const udp = udpStats(proxy).udp!;
    expect(udp.dropped).toEqual(0);
    expect(udp.datagramsIn).toEqual(3 * perClient);
    await eventually('datagramsOut to reach every reply', () => udpStats(proxy).udp!.datagramsOut, (out) => out === 3 * perClient);
  });
});

tap.test('the idle reaper ends a flow after sessionTimeout; a later datagram opens a new flow', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port, { udp: { sessionTimeout: 1000 } })], defer);
    const client = await UdpClient.open(defer);

    expect(parseEcho(await client.request(port, 'before')).payload.toString()).toEqual('before');
    expect(udpStats(proxy).udpSessions).toEqual(1);
    const started = Date.now();
    await eventually('the idle flow to be reaped', () => udpStats(proxy).udpSessions, (n) => n === 0, 3000);
    // Not reaped before its timeout (a little slack for timer granularity).
    expect(Date.now() - started).toBeGreaterThanOrEqual(900);
    expect(udpStats(proxy).udp!.sessionsTotal).toBeGreaterThanOrEqual(1);

    const reply = await client.request(port, 'after');
    expect(reply.fromPort).toEqual(port);
    expect(parseEcho(reply).payload.toString()).toEqual('after');
    expect(udpStats(proxy).udpSessions).toEqual(1);
    expect(udpStats(proxy).udp!.sessionsTotal).toBeGreaterThanOrEqual(2);
  });
});

tap.test("the route's IP block list drops the client's datagrams: no reply, dropped counted, no flow", async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const [blockedPort, allowPort] = [await freePort(), await freePort()];
    const { proxy } = await startProxy(
      [
        udpRoute(blockedPort, echo.port, { name: 'udp-blocked', security: { ipBlockList: ['127.0.0.1'] } }),
        udpRoute(allowPort, echo.port, { name: 'udp-allow-other', security: { ipAllowList: ['10.0.0.0/8'] } }),
      ],
      defer,
    );
    const client = await UdpClient.open(defer);

    await client.send(blockedPort, 'blocked');
    expect((await client.collect(500)).length).toEqual(0);
    await eventually('dropped to count the blocked datagram', () => dropped(proxy), (n) => n >= 1, 1000);

    // An allow list without the client drops it as well.
    const before = dropped(proxy);
    await client.send(allowPort, 'not allowed');
    expect((await client.collect(500)).length).toEqual(0);
    await eventually('dropped to count the unlisted datagram', () => dropped(proxy), (n) => n > before, 1000);

    expect(echo.received).toEqual(0);
    expect(udpStats(proxy).udpSessions).toEqual(0);
  });
});

tap.test('maxSessionsPerIP 1: a second flow from the same IP is dropped while the first lives, and works after it is reaped', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port, { udp: { sessionTimeout: 1000, maxSessionsPerIP: 1 } })], defer);
    const first = await UdpClient.open(defer);
    const second = await UdpClient.open(defer);

    expect(parseEcho(await first.request(port, 'first')).payload.toString()).toEqual('first');
    // The first flow is idle for at most ~500 ms below: well within its 1000 ms timeout.
    await second.send(port, 'second, too early');
    expect((await second.collect(500)).length).toEqual(0);
    expect(dropped(proxy)).toBeGreaterThanOrEqual(1);
    expect(udpStats(proxy).udpSessions).toEqual(1);
    expect(echo.received).toEqual(1);

    await eventually("the first client's flow to be reaped", () => udpStats(proxy).udpSessions, (n) => n === 0, 3000);
    const reply = await second.request(port, 'second, now');
    expect(parseEcho(reply).payload.toString()).toEqual('second, now');
    expect(udpStats(proxy).udpSessions).toEqual(1);
  });
});

tap.test("transport 'all': one route on one port relays TCP and UDP to the same backend port number", async () => {
  await withCleanup(async (defer) => {
    // A port number free for both a TCP listener and a UDP socket on 127.0.0.1.
    let udpEcho: IUdpEcho | undefined;
    let backendPort = 0;
    for (let attempt = 0; attempt < 20 && udpEcho === undefined; attempt++) {
      backendPort = await freePort();
      udpEcho = await startUdpEcho(backendPort).catch(() => undefined);
    }
    if (udpEcho === undefined) throw new Error('no port free for both TCP and UDP');
    const echoUdp = udpEcho;
    defer(() => echoUdp.close());
    const tcpEcho = await startEchoServer(backendPort);
    defer(() => tcpEcho.close());

    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, backendPort, { name: 'both', transport: 'all' })], defer);
    expect(proxy.getListeningPorts()).toContain(port);

    const tcpReply = await exchange(port, 'hello over tcp');
    expect(tcpReply.toString()).toEqual('hello over tcp');
    expect(tcpEcho.connections).toEqual(1);

    const client = await UdpClient.open(defer);
    const udpReply = await client.request(port, 'hello over udp');
    expect(udpReply.fromPort).toEqual(port);
    expect(parseEcho(udpReply).payload.toString()).toEqual('hello over udp');
    expect(echoUdp.received).toEqual(1);
    expect(udpStats(proxy).udpSessions).toEqual(1);
  });
});

tap.test('stop() releases the UDP port', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const handle = await startProxy([udpRoute(port, echo.port)], defer);
    const client = await UdpClient.open(defer);
    // A live flow while stopping.
    expect(parseEcho(await client.request(port, 'ping')).payload.toString()).toEqual('ping');
    // While started the port is taken (so the check below means something).
    expect(await tryBindUdp(port)).toBeInstanceOf(Error);

    await handle.stop();
    const error = await tryBindUdp(port);
    expect(error?.message).toBeUndefined();
    // And nothing answers there any more.
    await client.send(port, 'anyone?');
    expect((await client.collect(300)).length).toEqual(0);
  });
});

tap.test('updateRoutes binds a new UDP port and releases the old; a route\'s maxConnections counts flows', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const [first, second] = [await freePort(), await freePort()];
    const handle = await startProxy([udpRoute(first, echo.port)], defer);
    const client = await UdpClient.open(defer);
    expect(parseEcho(await client.request(first, 'one')).payload.toString()).toEqual('one');

    const limited = { ...udpRoute(second, echo.port), security: { maxConnections: 1 } };
    await handle.proxy.updateRoutes([limited] as never);
    expect(await tryBindUdp(first)).toBeUndefined();
    expect(parseEcho(await client.request(second, 'two')).payload.toString()).toEqual('two');
    // A second flow (another client socket) is one more than maxConnections allows.
    const other = await UdpClient.open(defer);
    const before = dropped(handle.proxy);
    await other.send(second, 'three');
    expect((await other.collect(300)).length).toEqual(0);
    expect(dropped(handle.proxy)).toBeGreaterThan(before);
  });
});

tap.test('maxSessionsPerIP counts a route\'s flows across all of its ports', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const [a, b] = [await freePort(), await freePort()];
    const route = { ...udpRoute(a, echo.port, { udp: { maxSessionsPerIP: 1 } }), match: { ports: [a, b], transport: 'udp' } };
    const handle = await startProxy([route], defer);
    const first = await UdpClient.open(defer);
    expect(parseEcho(await first.request(a, 'on a')).payload.toString()).toEqual('on a');
    const second = await UdpClient.open(defer);
    await second.send(b, 'on b');
    expect((await second.collect(300)).length).toEqual(0);
    // One flow in all: the second, on the route's other port, was refused.
    expect(handle.proxy.getStatistics().udpSessions).toEqual(1);
    expect(udpStats(handle.proxy).udp?.sessionsTotal).toEqual(1);
  });
});

tap.test('a datagram larger than maxDatagramSize is dropped while small ones pass', async () => {
  await withCleanup(async (defer) => {
    const echo = await startUdpEcho();
    defer(() => echo.close());
    const port = await freePort();
    const { proxy } = await startProxy([udpRoute(port, echo.port, { udp: { maxDatagramSize: 100 } })], defer);
    const client = await UdpClient.open(defer);

    expect(parseEcho(await client.request(port, 'small')).payload.toString()).toEqual('small');
    const before = dropped(proxy);

    await client.send(port, randomBytes(200));
    expect((await client.collect(500)).length).toEqual(0);
    await eventually('dropped to count the oversized datagram', () => dropped(proxy), (n) => n > before, 1000);
    expect(echo.received).toEqual(1);

    const small = Buffer.alloc(50, 'x');
    const reply = await client.request(port, small);
    expect(parseEcho(reply).payload.equals(small)).toBeTrue();
    expect(echo.received).toEqual(2);
  });
});

// ---------------------------------------------------------------------------------------------
// UDP socket-handler routes (datagramHandler)

/** A `socket-handler` route on `port` taking datagrams (`transport` 'udp' unless `opts.transport`). */
function handlerRoute(
  port: number,
  datagramHandler: TDatagramHandler,
  opts: { name?: string; transport?: 'udp' | 'all'; socketHandler?: TSocketHandler; udp?: IUdpRouteOptions['udp'] } = {},
) {
  return {
    ...(opts.name !== undefined ? { name: opts.name } : {}),
    match: { ports: port, transport: opts.transport ?? 'udp' },
    action: {
      type: 'socket-handler' as const,
      datagramHandler,
      ...(opts.socketHandler ? { socketHandler: opts.socketHandler } : {}),
      ...(opts.udp ? { udp: opts.udp } : {}),
    },
  };
}

/** A port number free for both a TCP listener and a UDP socket (the proxy binds both with 'all'). */
async function freeTcpAndUdpPort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await freePort();
    if ((await tryBindUdp(port)) === undefined) return port;
  }
  throw new Error('no port free for both TCP and UDP');
}

tap.test("datagramHandler: 'handled:' + the datagram comes back from the route port; two clients kept apart; info names the client, port and route", async () => {
  await withCleanup(async (defer) => {
    const port = await freePort();
    const seen: IDatagramInfo[] = [];
    const handler: TDatagramHandler = (datagram, info, reply) => {
      seen.push(info);
      reply(Buffer.concat([Buffer.from('handled:'), datagram]));
    };
    const { proxy } = await startProxy([createUdpHandlerRoute(port, handler, { name: 'handled' })], defer);
    const a = await UdpClient.open(defer);
    const b = await UdpClient.open(defer);

    for (let i = 0; i < 5; i++) {
      for (const [tag, client] of [['a', a], ['b', b]] as const) {
        const reply = await client.request(port, `${tag}-${i}`);
        expect(reply.fromAddress).toEqual('127.0.0.1');
        expect(reply.fromPort).toEqual(port);
        expect(reply.data.toString()).toEqual(`handled:${tag}-${i}`);
      }
    }
    // Nothing else arrived on either socket: each reply went to its own client only.
    expect((await a.collect(100)).length).toEqual(0);
    expect((await b.collect(0)).length).toEqual(0);

    expect(seen.length).toEqual(10);
    seen.forEach((info, i) => {
      const client = i % 2 === 0 ? a : b;
      expect(info).toEqual({ clientIp: '127.0.0.1', clientPort: client.port, port, routeName: 'handled' });
    });
    // Binary datagrams arrive and return byte for byte.
    const bytes = randomBytes(1200);
    const reply = await a.request(port, bytes);
    expect(reply.data.subarray('handled:'.length).equals(bytes)).toBeTrue();
    expect(udpStats(proxy).udpSessions).toEqual(2);
  });
});

tap.test('datagramHandler: several replies per datagram and one 50 ms later all arrive; reply() refuses what is not bytes', async () => {
  await withCleanup(async (defer) => {
    const port = await freePort();
    const infos: IDatagramInfo[] = [];
    const refusals: unknown[] = [];
    const handler: TDatagramHandler = (datagram, info, reply) => {
      infos.push(info);
      const text = datagram.toString();
      for (let i = 1; i <= 3; i++) reply(Buffer.from(`${text}#${i}`));
      // A Uint8Array is bytes too.
      reply(new TextEncoder().encode(`${text}#u8`) as Buffer);
      setTimeout(() => reply(Buffer.from(`${text}#later`)), 50);
      try {
        reply('not bytes' as unknown as Buffer);
      } catch (err) {
        refusals.push(err);
      }
    };
    // Unnamed: the info has no routeName.
    await startProxy([handlerRoute(port, handler)], defer);
    const client = await UdpClient.open(defer);

    for (const query of ['q1', 'q2']) {
      await client.send(port, query);
      const replies: IReply[] = [];
      for (let i = 0; i < 5; i++) replies.push(await client.next(2000));
      for (const reply of replies) expect(reply.fromPort).toEqual(port);
      const texts = replies.map((r) => r.data.toString());
      // The delayed one comes last; the others in any order.
      expect(texts[4]).toEqual(`${query}#later`);
      expect(texts.slice(0, 4).sort()).toEqual([`${query}#1`, `${query}#2`, `${query}#3`, `${query}#u8`]);
    }
    expect((await client.collect(150)).length).toEqual(0);

    expect(infos.length).toEqual(2);
    expect(infos[0]).toEqual({ clientIp: '127.0.0.1', clientPort: client.port, port });
    expect('routeName' in infos[0]).toBeFalse();
    expect(refusals.length).toEqual(2);
    for (const err of refusals) expect(err instanceof TypeError).toBeTrue();
  });
});

tap.test("a datagramHandler that throws or rejects: the proxy emits 'error' (DATAGRAM_HANDLER_FAILED) and keeps serving", async () => {
  await withCleanup(async (defer) => {
    const port = await freePort();
    const handler: TDatagramHandler = (datagram, _info, reply) => {
      const text = datagram.toString();
      if (text === 'throw') throw new Error('sync boom');
      if (text === 'reject') return sleep(10).then(() => Promise.reject(new Error('async boom')));
      reply(Buffer.from(`ok:${text}`));
      return undefined;
    };
    const { proxy } = await startProxy([handlerRoute(port, handler, { name: 'fragile' })], defer);
    const errors: Array<Error & { code?: string; routeName?: string }> = [];
    proxy.on('error', (err: Error & { code?: string; routeName?: string }) => errors.push(err));
    const client = await UdpClient.open(defer);
    const other = await UdpClient.open(defer);

    await client.send(port, 'throw');
    expect((await client.request(port, 'after throw')).data.toString()).toEqual('ok:after throw');
    await client.send(port, 'reject');
    expect((await client.request(port, 'after reject')).data.toString()).toEqual('ok:after reject');
    expect((await other.request(port, 'other')).data.toString()).toEqual('ok:other');
    await eventually('two error events', () => errors.length, (n) => n >= 2);
    // The failed datagrams got no answer (only the replies read above arrived).
    expect((await client.collect(100)).length).toEqual(0);

    expect(errors.length).toEqual(2);
    expect(errors.map((e) => e.code)).toEqual(['DATAGRAM_HANDLER_FAILED', 'DATAGRAM_HANDLER_FAILED']);
    expect(errors.map((e) => e.routeName)).toEqual(['fragile', 'fragile']);
    expect(errors[0].message).toEqual(`datagram handler of route "fragile" threw: sync boom (client 127.0.0.1:${client.port}, port ${port})`);
    expect(errors[1].message).toEqual(`datagram handler of route "fragile" rejected: async boom (client 127.0.0.1:${client.port}, port ${port})`);
    expect((errors[0].cause as Error).message).toEqual('sync boom');
  });
});

tap.test("transport 'all' socket-handler route: its socketHandler takes TCP connections and its datagramHandler datagrams, on one port", async () => {
  await withCleanup(async (defer) => {
    const port = await freeTcpAndUdpPort();
    const datagrams: IDatagramInfo[] = [];
    let connections = 0;
    const route = handlerRoute(
      port,
      (datagram, info, reply) => {
        datagrams.push(info);
        reply(Buffer.concat([Buffer.from('udp-ok:'), datagram]));
      },
      {
        name: 'both handlers',
        transport: 'all',
        socketHandler: (socket) => {
          connections++;
          socket.end('tcp-ok');
        },
      },
    );
    const { proxy } = await startProxy([route], defer);
    expect(proxy.getListeningPorts()).toContain(port);

    expect((await exchange(port, 'hello over tcp')).toString()).toEqual('tcp-ok');
    const client = await UdpClient.open(defer);
    const reply = await client.request(port, 'hello over udp');
    expect(reply.fromPort).toEqual(port);
    expect(reply.data.toString()).toEqual('udp-ok:hello over udp');
    // Once more each way: neither side took the other's traffic.
    expect((await exchange(port, 'again')).toString()).toEqual('tcp-ok');
    expect((await client.request(port, 'again')).data.toString()).toEqual('udp-ok:again');
    expect(connections).toEqual(2);
    expect(datagrams.map((d) => [d.port, d.routeName])).toEqual([[port, 'both handlers'], [port, 'both handlers']]);
    expect(udpStats(proxy).udpSessions).toEqual(1);
  });
});

tap.test('handler flows: getStatistics().udpSessions counts them and returns to 0 after sessionTimeout; a reply then goes nowhere', async () => {
  await withCleanup(async (defer) => {
    const port = await freePort();
    let lastReply: ((data: Buffer) => void) | undefined;
    const handler: TDatagramHandler = (datagram, _info, reply) => {
      lastReply = reply;
      reply(Buffer.concat([Buffer.from('handled:'), datagram]));
    };
    const { proxy } = await startProxy([handlerRoute(port, handler, { name: 'timed', udp: { sessionTimeout: 1000 } })], defer);
    const a = await UdpClient.open(defer);
    const b = await UdpClient.open(defer);
    expect(udpStats(proxy).udpSessions).toEqual(0);

    expect((await a.request(port, 'a1')).data.toString()).toEqual('handled:a1');
    expect(udpStats(proxy).udpSessions).toEqual(1);
    expect((await b.request(port, 'b1')).data.toString()).toEqual('handled:b1');
    expect(udpStats(proxy).udpSessions).toEqual(2);
    // A client's later datagrams stay in its flow.
    expect((await a.request(port, 'a2')).data.toString()).toEqual('handled:a2');
    expect(udpStats(proxy).udpSessions).toEqual(2);
    expect(udpStats(proxy).udp!.sessionsTotal).toEqual(2);

    const started = Date.now();
    await eventually('the idle handler flows to be reaped', () => udpStats(proxy).udpSessions, (n) => n === 0, 3000);
    // Not before the timeout of the flow used last (a little slack for timer granularity).
    expect(Date.now() - started).toBeGreaterThanOrEqual(900);

    // The last datagram was a's: its flow is gone, so a reply now reaches nobody.
    lastReply!(Buffer.from('too late'));
    expect((await a.collect(300)).length).toEqual(0);

    // A new datagram opens a new flow.
    expect((await a.request(port, 'a3')).data.toString()).toEqual('handled:a3');
    expect(udpStats(proxy).udpSessions).toEqual(1);
    expect(udpStats(proxy).udp!.sessionsTotal).toBeGreaterThanOrEqual(3);
  });
});

tap.test("validation: datagramHandler on a TCP route, socketHandler alone on a 'udp' route, and an 'all' route without both handlers are refused", async () => {
  const datagramHandler: TDatagramHandler = () => undefined;
  const socketHandler: TSocketHandler = () => undefined;
  const tcpOnly = `needs match.transport 'udp' or 'all' (this route takes TCP only)`;
  const socketOnUdp = `a 'socket-handler' route with match.transport 'udp' takes datagrams only: they go to its datagramHandler (a socketHandler takes TCP connections: match.transport 'tcp' or 'all')`;
  const cases: Array<[Record<string, unknown>, Record<string, unknown>, string, string]> = [
    [{}, { type: 'socket-handler', socketHandler, datagramHandler }, 'action.datagramHandler', tcpOnly],
    [{ transport: 'tcp' }, { type: 'forward', targets: [{ host: '127.0.0.1', port: 53 }], datagramHandler }, 'action.datagramHandler', tcpOnly],
    [{ transport: 'udp' }, { type: 'socket-handler', socketHandler }, 'action.socketHandler', socketOnUdp],
    [{ transport: 'udp' }, { type: 'socket-handler', socketHandler, datagramHandler }, 'action.socketHandler', socketOnUdp],
    [
      { transport: 'all' },
      { type: 'socket-handler', socketHandler },
      'action.datagramHandler',
      `a 'socket-handler' route with match.transport 'all' needs a datagramHandler function for its datagrams (its socketHandler takes the TCP connections), got undefined`,
    ],
    [{ transport: 'all' }, { type: 'socket-handler', datagramHandler }, 'action.socketHandler', `a 'socket-handler' route needs a socketHandler function, got undefined`],
  ];
  for (const [match, action, field, reason] of cases) {
    const route = { name: 'v', match: { ports: 5300, ...match }, action };
    const err = thrown(() => new SmartProxy({ routes: [route] } as unknown as TOptions));
    expect({ field, isConfigError: err instanceof SmartProxyConfigError, message: err?.message }).toEqual({ field, isConfigError: true, message: `routes[0] "v": ${field}: ${reason}` });
    expect({ field, first: validateRouteConfig(route as unknown as IRouteConfig).errors[0] }).toEqual({ field, first: `${field}: ${reason}` });
  }
  // Accepted: datagrams only on 'udp', both handlers on 'all' (constructed, not started).
  for (const route of [handlerRoute(5300, datagramHandler), handlerRoute(5300, datagramHandler, { transport: 'all', socketHandler })]) {
    expect(validateRouteConfig(route as unknown as IRouteConfig)).toEqual({ valid: true, errors: [] });
    expect(thrown(() => new SmartProxy({ routes: [route] } as unknown as TOptions))?.message).toBeUndefined();
  }
});

tap.start({ throwOnError: true });
