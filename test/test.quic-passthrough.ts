// QUIC passthrough by SNI (a `passthrough` route with `transport: 'udp'` and `domains`): the proxy
// reads the SNI from the client's Initial packets (decrypting them with the keys derived from the
// connection ID, RFC 9001 §5.2) and relays the flow untouched to that domain's backend, so the
// client verifies each backend's own certificate. Real QUIC on both sides: aioquic's HTTP/3
// client (test/helpers/h3-client.py) and two aioquic HTTP/3 servers (test/helpers/h3-server.py).
import { tap, expect } from '@push.rocks/tapbundle';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { SmartProxy } from '../ts/index.js';
import { freePort, withCleanup, type TDefer } from './helpers/net.js';
import { createTestCa } from './helpers/tls.js';
import { h3ClientAvailable, h3Header, h3Request, h3RequestOk, startH3Server, certSha256, h3Answer } from './helpers/h3.js';

type TOptions = ConstructorParameters<typeof SmartProxy>[0];
type TRoute = TOptions['routes'][number];

const ca = createTestCa();
const certA = ca.issue(['a.test']);
const certB = ca.issue(['b.test']);
const workDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-quic-pt-'));
process.on('exit', () => rmSync(workDir, { recursive: true, force: true }));
const caFile = path.join(workDir, 'ca.pem');
writeFileSync(caFile, ca.cert);

function passthrough(name: string, domain: string, port: number, backendPort: number, transport: 'udp' | 'all' = 'udp'): TRoute {
  return {
    name,
    match: { ports: port, domains: domain, transport },
    action: { type: 'forward', tls: { mode: 'passthrough' }, targets: [{ host: '127.0.0.1', port: backendPort }] },
  } as TRoute;
}

async function twoBackends(defer: TDefer): Promise<{ port: number; proxy: SmartProxy }> {
  const a = await startH3Server({ tag: 'A', cert: certA.cert, key: certA.key });
  defer(() => a.close());
  const b = await startH3Server({ tag: 'B', cert: certB.cert, key: certB.key });
  defer(() => b.close());
  const port = await freePort();
  const proxy = new SmartProxy({ routes: [passthrough('quic-a', 'a.test', port, a.port), passthrough('quic-b', 'b.test', port, b.port)] });
  await proxy.start();
  defer(() => proxy.stop());
  return { port, proxy };
}

function quicTest(name: string, body: () => Promise<void>): void {
  tap.test(name, async () => {
    if (!h3ClientAvailable()) throw new Error('the HTTP/3 test client is missing: run .ci/run (it makes .venv-h3 with aioquic)');
    await body();
  });
}

quicTest("each SNI reaches its own backend, and the client verifies that backend's own certificate", async () => {
  await withCleanup(async (defer) => {
    const { port, proxy } = await twoBackends(defer);
    for (const [domain, cert, tag] of [['a.test', certA.cert, 'A'], ['b.test', certB.cert, 'B']] as const) {
      const result = await h3RequestOk({ port, serverName: domain, caFile, requests: [{ path: '/x' }, { method: 'POST', path: '/echo', body: `hello ${domain}` }] });
      expect(result.peerCertSha256).toEqual(certSha256(cert));
      const get = h3Answer(result.responses[0]);
      expect(get.bodyText).toEqual(`${tag} ${domain} /x`);
      expect(h3Header(get.headers, 'x-h3-tag')).toEqual(tag);
      expect(h3Answer(result.responses[1]).bodyText).toEqual(`hello ${domain}`);
    }
    const udp = proxy.getStatistics().udp;
    expect(udp?.sessionsTotal).toEqual(2);
  });
});

quicTest('a ClientHello spanning several Initial packets is reassembled before the route is chosen', async () => {
  await withCleanup(async (defer) => {
    const { port } = await twoBackends(defer);
    // ALPN names enough to push the hello over one datagram's worth of Initial packets.
    const alpn = ['h3', ...Array.from({ length: 150 }, (_, i) => `padding-protocol-name-${String(i).padStart(4, '0')}`)];
    const result = await h3RequestOk({ port, serverName: 'b.test', caFile, alpn, requests: [{ path: '/big-hello' }] });
    expect(result.alpn).toEqual('h3');
    expect(result.peerCertSha256).toEqual(certSha256(certB.cert));
    expect(h3Answer(result.responses[0]).bodyText).toEqual('B b.test /big-hello');
  });
});

quicTest('an SNI no route takes, and datagrams that are not QUIC Initials, open no flow', async () => {
  await withCleanup(async (defer) => {
    const { port, proxy } = await twoBackends(defer);
    const unknown = await h3Request({ port, serverName: 'c.test', insecure: true, timeoutMs: 1500, requests: [{ path: '/' }] });
    expect(unknown.ok).toBeFalse();
    const stats = proxy.getStatistics();
    expect(stats.udp?.sessionsTotal).toEqual(0);
    expect(stats.udp?.dropped).toBeGreaterThan(0);
    // Plain bytes on the port: no route without TLS takes them.
    const dgram = await import('node:dgram');
    const socket = dgram.createSocket('udp4');
    await new Promise<void>((resolve, reject) => socket.send(Buffer.from('not quic'), port, '127.0.0.1', (err) => (err ? reject(err) : resolve())));
    socket.close();
    expect(proxy.getStatistics().udp?.sessionsTotal).toEqual(0);
  });
});

quicTest("the route's IP block list refuses the flow once its SNI chose the route", async () => {
  await withCleanup(async (defer) => {
    const a = await startH3Server({ tag: 'A', cert: certA.cert, key: certA.key });
    defer(() => a.close());
    const port = await freePort();
    const blocked = { ...passthrough('quic-a', 'a.test', port, a.port), security: { ipBlockList: ['127.0.0.1'] } } as TRoute;
    const proxy = new SmartProxy({ routes: [blocked] });
    await proxy.start();
    defer(() => proxy.stop());
    const result = await h3Request({ port, serverName: 'a.test', caFile, timeoutMs: 1500, requests: [{ path: '/' }] });
    expect(result.ok).toBeFalse();
    expect(proxy.getStatistics().refusals['quic-a']?.forbidden).toBeGreaterThan(0);
    expect(proxy.getStatistics().udp?.sessionsTotal).toEqual(0);
  });
});

quicTest('config: a UDP route may have domains only with tls passthrough', async () => {
  const port = await freePort();
  const terminate = {
    name: 'udp-terminate',
    match: { ports: port, domains: 'a.test', transport: 'udp' },
    action: { type: 'forward', tls: { mode: 'terminate', certificate: { key: certA.key, cert: certA.cert } }, targets: [{ host: '127.0.0.1', port: 1 }] },
  } as TRoute;
  expect(() => new SmartProxy({ routes: [terminate] })).toThrow();
  const domainsOnly = { name: 'udp-domains', match: { ports: port, domains: 'a.test', transport: 'udp' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: 1 }] } } as TRoute;
  expect(() => new SmartProxy({ routes: [domainsOnly] })).toThrow();
  expect(() => new SmartProxy({ routes: [passthrough('ok', 'a.test', port, 1)] })).not.toThrow();
});

export default tap.start();
