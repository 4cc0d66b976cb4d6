// Runs our proxy for the benchmark with one tokio worker thread.
// Usage: node bench/proxy-smartproxy.mjs <listenPort> <backendPort> [mode] [certFile keyFile]
//   tcp:          a plain forward route (raw TCP relay);
//   http:         the same route with `domains: '*'`, so every request goes through the HTTP engine
//                 (per-request routing, header rewriting, pooled upstream keep-alive);
//   tcp-sync-fn:  the tcp route with host and port given by synchronous functions of the context;
//   tcp-async-fn: the same with async functions (one JavaScript call per connection either way);
//   http-ratelimit: the http route with a rate limit per client IP that the run never reaches;
//   http-jwt:     the http route with HS256 JWT authentication (secret `bench-secret`);
//   https:        a route on the port alone (no `domains`: a `domains: '*'` route refuses TLS clients
//                 that send no SNI, as h2load and openssl s_time do for 127.0.0.1) with TLS terminated in the proxy (`action.tls: { mode: 'terminate',
//                 certificate: { key, cert } }`, PEM read from certFile/keyFile or the environment
//                 variables BENCH_TLS_CERT/BENCH_TLS_KEY), plain HTTP/1.1 to the backend; ALPN h2 and
//                 http/1.1 offered to clients.
//   https-h3:     the https route plus `action.http3: { enabled: true }`: HTTP/3 (QUIC) on the same
//                 port over UDP, beside HTTP/1.1 and HTTP/2 over TLS on TCP, with the same certificate.
import { readFileSync } from 'node:fs';
import { SmartProxy } from '../dist_ts/index.js';

const [listenPort, backendPort] = process.argv.slice(2, 4).map(Number);
const mode = process.argv[4] ?? 'tcp';
const [certFile = process.env.BENCH_TLS_CERT, keyFile = process.env.BENCH_TLS_KEY] = process.argv.slice(5, 7);
const terminatesTls = mode === 'https' || mode === 'https-h3';
if (terminatesTls && (!certFile || !keyFile)) throw new Error(`${mode} mode needs certFile keyFile (or BENCH_TLS_CERT/BENCH_TLS_KEY)`);
const tls = terminatesTls
  ? { tls: { mode: 'terminate', certificate: { key: readFileSync(keyFile, 'utf8'), cert: readFileSync(certFile, 'utf8') } } }
  : {};
const http3 = mode === 'https-h3' ? { http3: { enabled: true } } : {};
const match = mode.startsWith('http') && !terminatesTls ? { ports: listenPort, domains: '*' } : { ports: listenPort };
//   http-affinity: the http route with affinity on the `X-Session` header (in memory);
//   http-affinity-redis: the same with `options.redis` at BENCH_REDIS_URL;
//   http-ratelimit-redis: the http-ratelimit route with `options.redis` at BENCH_REDIS_URL, so the
//                 limit is counted across replicas (one GCRA script call per request);
//   http-proxyproto: the http route with acceptProxyProtocol from 127.0.0.1 (a PROXY-sending front);
//   http-observed: the http route with the access log on (JSON lines to BENCH_ACCESS_LOG) and the
//                  Prometheus listener on BENCH_METRICS_PORT.
//   tcp-kernel:   the tcp route with forwardingEngine 'nftables': the kernel forwards the flows
//                 (needs root and nft; else the Rust core relays them, with a warning).
//   udp:          the forward route with `match.transport: 'all'`: UDP datagrams on the port relayed
//                 per client flow (a connected upstream socket each), and TCP connections as in tcp
//                 (iperf3's UDP test keeps its TCP control connection on the same port).
const affinity = mode.startsWith('http-affinity') ? { loadBalancing: { affinity: { key: 'header:X-Session' } } } : {};
const scaleOut = {
  ...(mode === 'http-affinity-redis' || mode === 'http-ratelimit-redis' ? { redis: { url: process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379', keyPrefix: 'bench:' } } : {}),
  ...(mode === 'http-proxyproto' ? { acceptProxyProtocol: true, proxyIPs: ['127.0.0.1'] } : {}),
};
const observed = mode === 'http-observed'
  ? { accessLog: { enabled: true, path: process.env.BENCH_ACCESS_LOG }, metrics: { prometheus: { port: Number(process.env.BENCH_METRICS_PORT) } } }
  : {};
const security = {
  'http-ratelimit': { rateLimit: { enabled: true, maxRequests: 1_000_000_000, window: 1 } },
  'http-ratelimit-redis': { rateLimit: { enabled: true, maxRequests: 1_000_000_000, window: 1 } },
  'http-jwt': { jwtAuth: { enabled: true, secret: 'bench-secret' } },
}[mode];
const targets = {
  'tcp-sync-fn': { host: (ctx) => (ctx.port > 0 ? '127.0.0.1' : 'unreachable'), port: () => backendPort },
  'tcp-async-fn': { host: async (ctx) => (ctx.port > 0 ? '127.0.0.1' : 'unreachable'), port: async () => backendPort },
};
const proxy = new SmartProxy({
  workerThreads: 1,
  // Every load generator connects from 127.0.0.1: per-IP limits (0 = none) would measure themselves.
  maxConnectionsPerIP: 0,
  connectionRateLimitPerMinute: 0,
  ...scaleOut,
  ...observed,
  routes: [mode === 'udp'
    ? {
      name: 'bench-udp',
      match: { ports: listenPort, transport: 'all' },
      action: { type: 'forward', targets: [{ host: '127.0.0.1', port: backendPort }] },
    }
    : {
      name: `bench-${mode}`,
      match,
      action: { type: 'forward', target: targets[mode] ?? { host: '127.0.0.1', port: backendPort }, ...tls, ...http3, ...affinity, ...(mode === 'tcp-kernel' ? { forwardingEngine: 'nftables' } : {}) },
      ...(security ? { security } : {}),
    }],
});
await proxy.start();
if (mode === 'tcp-kernel' && proxy.getStatistics().kernelForwarding?.active !== true) {
  throw new Error(`kernel forwarding is unavailable: ${proxy.getStatistics().kernelForwarding?.unavailable}`);
}
console.log('ready');
process.on('SIGTERM', async () => {
  await proxy.stop();
  process.exit(0);
});
