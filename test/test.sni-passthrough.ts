// TLS routed by SNI without decrypting: the backend's own certificate is verified by the client
// end to end, so any byte the proxy changed would fail the handshake.
import { tap, expect } from '@push.rocks/tapbundle';
import * as net from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePort } from './helpers/net.js';
import { createTestCa, startTlsBackend, tlsFirstLine } from './helpers/tls.js';

const ca = createTestCa();
const alpha = await startTlsBackend('alpha', ca.issue(['alpha.example.com', '*.alpha.example.com', 'x.y.alpha.example.com']));
const beta = await startTlsBackend('beta', ca.issue(['beta.example.com', 'special.example.com', '*.example.com']));
const port = await freePort();

const proxy = new SmartProxy({
  routes: [
    {
      name: 'wildcard',
      match: { ports: port, domains: ['*.example.com'] },
      action: { type: 'forward', target: { host: '127.0.0.1', port: beta.port }, tls: { mode: 'passthrough' } },
    },
    {
      name: 'alpha',
      priority: 10,
      match: { ports: port, domains: ['alpha.example.com', '*.alpha.example.com'] },
      action: { type: 'forward', target: { host: '127.0.0.1', port: alpha.port }, tls: { mode: 'passthrough' } },
    },
  ],
});

tap.test('start the proxy', async () => {
  await proxy.start();
});

tap.test('the higher-priority route wins for its own domain', async () => {
  expect(await tlsFirstLine(port, 'alpha.example.com', ca.cert)).toEqual('alpha:alpha.example.com');
});

tap.test('a wildcard matches deeper subdomains too', async () => {
  expect(await tlsFirstLine(port, 'x.y.alpha.example.com', ca.cert)).toEqual('alpha:x.y.alpha.example.com');
});

tap.test('other subdomains fall through to the wildcard route', async () => {
  expect(await tlsFirstLine(port, 'special.example.com', ca.cert)).toEqual('beta:special.example.com');
});

tap.test('SNI is matched case-insensitively', async () => {
  // Node lowercases nothing on its own: the SNI goes out as written.
  expect(await tlsFirstLine(port, 'Beta.Example.COM', ca.cert)).toMatch(/^beta:/);
});

tap.test('an unknown domain gets a TLS alert and is closed', async () => {
  let error: Error | undefined;
  try {
    await tlsFirstLine(port, 'unknown.test', ca.cert);
  } catch (err) {
    error = err as Error;
  }
  expect(error?.message ?? '').toMatch(/unrecognized name|alert number 112/i);
});

tap.test('a ClientHello without SNI gets an unrecognized_name alert when every route needs a domain', async () => {
  let error: Error | undefined;
  try {
    await tlsFirstLine(port, undefined, ca.cert);
  } catch (err) {
    error = err as Error;
  }
  expect(error?.message ?? '').toMatch(/unrecognized name|alert number 112/i);
  expect(proxy.getStatistics().terminationReasons.no_route).toBeGreaterThan(0);
});

tap.test('a ClientHello split over many small TCP segments is still routed', async () => {
  // Capture a real ClientHello by sending it to a plain server, then replay it one byte a write.
  const captured = await new Promise<Buffer>((resolve) => {
    const server = net.createServer((socket) => {
      socket.once('data', (d: Buffer) => {
        resolve(d);
        socket.destroy();
        server.close();
      });
    });
    server.listen(0, '127.0.0.1', async () => {
      const { port: capturePort } = server.address() as net.AddressInfo;
      tlsFirstLine(capturePort, 'alpha.example.com', ca.cert).catch(() => undefined);
    });
  });
  const reply = await new Promise<Buffer>((resolve) => {
    const socket = net.connect(port, '127.0.0.1', async () => {
      socket.setNoDelay(true);
      for (let i = 0; i < captured.length; i += 7) {
        socket.write(captured.subarray(i, i + 7));
        await new Promise((r) => setTimeout(r, 1));
      }
    });
    socket.once('data', (d: Buffer) => {
      socket.destroy();
      resolve(d);
    });
  });
  // The alpha backend answers with a ServerHello (handshake record, type 22).
  expect(reply[0]).toEqual(22);
});

tap.test('TLS connections are counted as TLS while open', async () => {
  const stats = proxy.getStatistics();
  expect(stats.totalConnections).toBeGreaterThan(5);
  expect(stats.activeConnections).toBeLessThan(2);
});

tap.test('stop the proxy and backends', async () => {
  await proxy.stop();
  await alpha.close();
  await beta.close();
});

tap.start({ throwOnError: true });
