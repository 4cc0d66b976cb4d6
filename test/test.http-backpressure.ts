// Backpressure and fairness at the HTTP edge: one HTTP/2 client cannot hold more than its share of
// upstream exchanges (http2MaxConcurrentStreams / 4), so its stalled streams leave the backend's
// pool to everyone else. Real sockets: node:http2 clients over h2c, a node:http backend.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePorts, sleep, waitFor } from './helpers/net.js';

tap.test('an HTTP/2 client gets at most http2MaxConcurrentStreams / 4 upstream exchanges at once; another client is served meanwhile', async () => {
  const [port] = await freePorts(1);
  let slowSeen = 0;
  const held: http.ServerResponse[] = [];
  const backend = http.createServer((req, res) => {
    if (req.url === '/slow') {
      slowSeen++;
      held.push(res);
      return;
    }
    res.end('fast');
  });
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  const proxy = new SmartProxy({
    http2MaxConcurrentStreams: 8,
    routes: [{ name: 'h2', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: (backend.address() as AddressInfo).port }] } }],
  });
  await proxy.start();
  const greedy = http2.connect(`http://127.0.0.1:${port}`);
  const other = http2.connect(`http://127.0.0.1:${port}`);
  greedy.on('error', () => undefined);
  other.on('error', () => undefined);
  try {
    for (let i = 0; i < 6; i++) {
      const stream = greedy.request({ ':path': '/slow', ':authority': 'app.test' });
      stream.on('error', () => undefined);
      stream.end();
    }
    await waitFor(() => slowSeen >= 2, 5000, 'two slow requests upstream');
    await sleep(300);
    // 8 / 4 = 2: the other four streams wait for one of the two to finish.
    expect(slowSeen).toEqual(2);
    const answer = await new Promise<string>((resolve, reject) => {
      const stream = other.request({ ':path': '/fast', ':authority': 'app.test' });
      let body = '';
      stream.setEncoding('utf8');
      stream.on('data', (d: string) => (body += d));
      stream.on('end', () => resolve(body));
      stream.on('error', reject);
      stream.end();
    });
    expect(answer).toEqual('fast');
    // One slow exchange finishes: one waiting stream takes its place.
    held.shift()!.end('done');
    await waitFor(() => slowSeen === 3, 5000, 'a third slow request upstream');
  } finally {
    greedy.destroy();
    other.destroy();
    for (const res of held) res.destroy();
    await proxy.stop();
    backend.closeAllConnections();
    await new Promise<void>((resolve) => backend.close(() => resolve()));
  }
});

tap.start({ throwOnError: true });
