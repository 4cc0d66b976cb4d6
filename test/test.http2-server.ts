// The HTTP/2 side towards clients (src/http/h2): streams served inside their connection's task,
// request bodies handed on under flow control, response bodies written as the client's windows
// allow, resets in the middle of a request, HEAD answers without a body, trailers, and a drain
// that lets the streams in flight finish. Real sockets: node:http2 clients over h2c, a node:http
// backend speaking HTTP/1.1.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as http2 from 'node:http2';
import { createHash } from 'node:crypto';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { freePorts, sleep, waitFor } from './helpers/net.js';

const MiB = 1024 * 1024;
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
function patterned(size: number): Buffer {
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i++) buf[i] = (i * 7 + (i >> 10)) & 0xff;
  return buf;
}
const BIG = patterned(6 * MiB);

let proxy: SmartProxy;
let port = 0;
let backend: http.Server;
/** Requests held open by the backend (`/hold`), and those whose client side went away. */
const held: http.ServerResponse[] = [];
let holdsSeen = 0;
let holdsAborted = 0;

interface IAnswer {
  status: number;
  headers: http2.IncomingHttpHeaders;
  body: Buffer;
  trailers: http2.IncomingHttpHeaders | null;
}

function ask(client: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders, body?: Buffer, slowReader = false): Promise<IAnswer> {
  return new Promise((resolve, reject) => {
    const stream = client.request({ ':authority': 'app.test', ...headers });
    let status = 0;
    let responseHeaders: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders | null = null;
    const chunks: Buffer[] = [];
    stream.on('response', (h) => {
      status = Number(h[':status']);
      responseHeaders = h;
    });
    stream.on('trailers', (t) => (trailers = t));
    stream.on('data', (d: Buffer) => {
      chunks.push(d);
      if (slowReader) {
        // Reading in small steps keeps the client's window nearly shut: the proxy must wait.
        stream.pause();
        setTimeout(() => stream.resume(), 2);
      }
    });
    stream.on('end', () => resolve({ status, headers: responseHeaders, body: Buffer.concat(chunks), trailers }));
    stream.on('error', reject);
    if (body) stream.end(body);
    else stream.end();
  });
}

function connect(): http2.ClientHttp2Session {
  const client = http2.connect(`http://127.0.0.1:${port}`);
  client.on('error', () => undefined);
  return client;
}

tap.test('setup: a proxy on an HTTP route, an HTTP/1.1 backend', async () => {
  [port] = await freePorts(1);
  backend = http.createServer((req, res) => {
    if (req.url === '/upload') {
      const hash = createHash('sha256');
      let length = 0;
      req.on('data', (d: Buffer) => {
        hash.update(d);
        length += d.length;
      });
      req.on('end', () => res.end(JSON.stringify({ length, sha: hash.digest('hex'), contentLength: req.headers['content-length'] ?? null })));
      return;
    }
    if (req.url === '/big') {
      res.setHeader('content-length', BIG.length);
      res.end(BIG);
      return;
    }
    if (req.url === '/trailers') {
      res.writeHead(200, { 'content-type': 'text/plain', trailer: 'x-checksum' });
      res.write('part one, ');
      res.write('part two');
      res.addTrailers({ 'x-checksum': 'abc123' });
      res.end();
      return;
    }
    if (req.url === '/hold') {
      holdsSeen++;
      res.on('close', () => {
        if (!res.writableEnded) holdsAborted++;
      });
      held.push(res);
      return;
    }
    res.end(`ok ${req.method} ${req.url}`);
  });
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  proxy = new SmartProxy({
    routes: [
      { name: 'app', match: { ports: port, domains: 'app.test' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: (backend.address() as AddressInfo).port }] } },
      {
        name: 'timed',
        match: { ports: port, domains: 'timed.test' },
        action: { type: 'forward', targets: [{ host: '127.0.0.1', port: (backend.address() as AddressInfo).port }], timeouts: { responseMs: 300 } },
      },
    ],
  });
  await proxy.start();
});

tap.test('a request body larger than every flow-control window reaches the backend whole', async () => {
  const client = connect();
  try {
    const body = patterned(3 * MiB + 123);
    const answer = await ask(client, { ':method': 'POST', ':path': '/upload', 'content-length': String(body.length) }, body);
    expect(answer.status).toEqual(200);
    const seen = JSON.parse(answer.body.toString());
    expect(seen.length).toEqual(body.length);
    expect(seen.sha).toEqual(sha256(body));
    expect(seen.contentLength).toEqual(String(body.length));
    // Without a Content-Length the body still arrives whole (chunked towards the backend).
    const unsized = await ask(client, { ':method': 'POST', ':path': '/upload' }, body);
    expect(JSON.parse(unsized.body.toString()).sha).toEqual(sha256(body));
  } finally {
    client.destroy();
  }
});

tap.test('a response larger than the client window arrives whole, to a fast and to a slow reader, beside other streams', async () => {
  const client = connect();
  try {
    const [fast, slow, small] = await Promise.all([
      ask(client, { ':path': '/big' }),
      ask(client, { ':path': '/big' }, undefined, true),
      ask(client, { ':path': '/small' }),
    ]);
    for (const big of [fast, slow]) {
      expect(big.status).toEqual(200);
      expect(big.headers['content-length']).toEqual(String(BIG.length));
      expect(big.body.length).toEqual(BIG.length);
      expect(sha256(big.body)).toEqual(sha256(BIG));
    }
    expect(small.body.toString()).toEqual('ok GET /small');
  } finally {
    client.destroy();
  }
});

tap.test('trailers from the backend reach the HTTP/2 client after the body', async () => {
  const client = connect();
  try {
    const answer = await ask(client, { ':path': '/trailers' });
    expect(answer.status).toEqual(200);
    expect(answer.body.toString()).toEqual('part one, part two');
    expect(answer.trailers?.['x-checksum']).toEqual('abc123');
  } finally {
    client.destroy();
  }
});

tap.test('HEAD: the answer has a head and no body, also where the proxy answers itself', async () => {
  const client = connect();
  try {
    const proxied = await ask(client, { ':method': 'HEAD', ':path': '/big' });
    expect(proxied.status).toEqual(200);
    expect(proxied.headers['content-length']).toEqual(String(BIG.length));
    expect(proxied.body.length).toEqual(0);
    // No route for this host: the proxy's own 404, whose body a GET would get.
    const refused = await ask(client, { ':method': 'HEAD', ':path': '/', ':authority': 'nowhere.test' });
    expect(refused.status).toEqual(404);
    expect(refused.body.length).toEqual(0);
    expect(typeof refused.headers['date']).toEqual('string');
    const get = await ask(client, { ':path': '/', ':authority': 'nowhere.test' });
    expect(get.status).toEqual(404);
    expect(get.body.length > 0).toBeTrue();
  } finally {
    client.destroy();
  }
});

tap.test('a stream the client resets while its request waits upstream ends that exchange; the connection serves on', async () => {
  const client = connect();
  try {
    const stream = client.request({ ':authority': 'app.test', ':path': '/hold' });
    stream.on('error', () => undefined);
    stream.end();
    await waitFor(() => holdsSeen === 1, 5000, 'the held request upstream');
    stream.close(http2.constants.NGHTTP2_CANCEL);
    // The upstream exchange is dropped with the stream: the backend sees its client go.
    await waitFor(() => holdsAborted === 1, 5000, 'the upstream exchange to end');
    await waitFor(() => (proxy.getStatistics().backends.app ?? []).every((b) => b.inFlight === 0), 5000, 'no request in flight');
    const after = await ask(client, { ':path': '/after-reset' });
    expect(after.body.toString()).toEqual('ok GET /after-reset');
  } finally {
    client.destroy();
    held.splice(0).forEach((res) => res.destroy());
  }
});

tap.test('a storm of streams reset at every stage leaves nothing behind', async () => {
  const before = holdsSeen;
  const clients = Array.from({ length: 4 }, () => connect());
  try {
    const streams: http2.ClientHttp2Stream[] = [];
    for (const client of clients) {
      for (let i = 0; i < 10; i++) {
        const path = i % 3 === 0 ? '/hold' : i % 3 === 1 ? '/big' : '/upload';
        const stream = client.request({ ':authority': 'app.test', ':path': path, ':method': path === '/upload' ? 'POST' : 'GET' });
        stream.on('error', () => undefined);
        stream.on('data', () => undefined);
        if (path === '/upload') stream.write(patterned(200_000));
        else stream.end();
        streams.push(stream);
      }
    }
    await sleep(50);
    streams.forEach((s, i) => (i % 2 === 0 ? s.close(http2.constants.NGHTTP2_CANCEL) : undefined));
    await sleep(50);
    // The rest go with their connections.
    clients.forEach((c) => c.destroy());
    await waitFor(() => holdsSeen > before, 5000, 'held requests upstream');
    await waitFor(() => proxy.getStatistics().httpConnections === 0, 5000, 'HTTP connections to close');
    await waitFor(() => (proxy.getStatistics().backends.app ?? []).every((b) => b.inFlight === 0), 5000, 'no request in flight');
    await waitFor(() => held.every((res) => res.destroyed), 5000, 'every held exchange to end');
  } finally {
    clients.forEach((c) => c.destroy());
    held.splice(0).forEach((res) => res.destroy());
  }
  // And the proxy still answers.
  const client = connect();
  try {
    expect((await ask(client, { ':path': '/still' })).body.toString()).toEqual('ok GET /still');
  } finally {
    client.destroy();
  }
});

tap.test('responseMs holds for every request of a pooled upstream connection, also after its timer ran out while idle', async () => {
  const client = connect();
  try {
    for (let round = 0; round < 2; round++) {
      const fast = await ask(client, { ':path': `/fast/${round}`, ':authority': 'timed.test' });
      expect(fast.body.toString()).toEqual(`ok GET /fast/${round}`);
      // Idle past the timeout: the connection's timer expires with nothing waiting on it.
      await sleep(450);
      const started = Date.now();
      const slow = await ask(client, { ':path': '/hold', ':authority': 'timed.test' });
      const took = Date.now() - started;
      expect(slow.status).toEqual(504);
      expect(took).toBeGreaterThanOrEqual(250);
      expect(took).toBeLessThan(3000);
    }
    // A request answered in time on a connection whose earlier deadline has passed is not cut.
    const answered = await ask(client, { ':path': '/after-timeouts', ':authority': 'timed.test' });
    expect(answered.status).toEqual(200);
  } finally {
    client.destroy();
    held.splice(0).forEach((res) => res.destroy());
  }
});

tap.test('stop() while a stream is in flight: that stream finishes, the connection gets a GOAWAY', async () => {
  const client = connect();
  let goaway = false;
  client.on('goaway', () => (goaway = true));
  const pending = ask(client, { ':path': '/hold' });
  await waitFor(() => held.length === 1, 5000, 'the held request upstream');
  const stopping = proxy.stop();
  await waitFor(() => goaway, 5000, 'a GOAWAY');
  held.shift()!.end('finished late');
  const answer = await pending;
  expect(answer.status).toEqual(200);
  expect(answer.body.toString()).toEqual('finished late');
  await stopping;
  client.destroy();
  backend.closeAllConnections();
  await new Promise<void>((resolve) => backend.close(() => resolve()));
});

tap.start({ throwOnError: true });
