#!/usr/bin/env node
// `pnpm bench`: our proxy side by side with direct loopback, HAProxy, nginx and node http-proxy,
// interleaved over several rounds, on 127.0.0.1 only. Every proxy runs one worker thread/process
// (ours `workerThreads: 1`, HAProxy `nbthread 1`, nginx `worker_processes 1`, http-proxy one Node
// process), reuses upstream keep-alive connections and logs nothing; it is pinned to CPU 0, the
// load generator and the backend to CPU 1 (taskset). Prints one table of medians (min–max) with
// ratios, and writes it to bench/RESULTS.md with versions, pinning and the exact commands.
//
// Scenarios (BENCH_ONLY picks those whose name contains the given text):
//   TCP upload / download 1 GiB (iperf3) and a 64-byte echo round trip (bench/echo.mjs) through each
//   proxy's raw TCP mode (ours a plain forward route, HAProxy `mode tcp`, nginx `stream`);
//   HTTP/1.1 keep-alive small GETs (wrk -c32, and a sweep at -c8, -c64 and -c512, each plus the
//   proxy's CPU time per request; measured in 1 s slices taken through every proxy in turn), a new
//   connection per request (wrk `Connection: close`, sliced the same way, with the proxy's CPU per
//   connection), 1 MiB responses (wrk) through each proxy's HTTP mode against an nginx backend (`return 200 "ok"`, a
//   1 MiB static file);
//   HTTPS keep-alive (wrk), full TLS handshakes (`openssl s_time -new`, which never resumes a session;
//   plus handshakes per CPU-second of the proxy) and HTTP/2 over TLS (h2load -c16 -m10), TLS
//   terminated in the proxy, plain HTTP/1.1 to the backend;
//   RSS per idle keep-alive client connection, plain HTTP and TLS (bench/idle-conns.mjs holding
//   10,000 of them, with --tls each after a TLS handshake and one HTTPS GET).
// Tables of ours alone: "TCP streams across CPUs" (direct on one CPU, direct across CPUs, ours),
// "HTTP security overhead", "Scale-out" (affinity in memory and through Redis, the PROXY protocol),
// "Function targets: new connections" and "UDP datagrams (64-byte, per second)" (iperf3 -u -b 0
// -l 64 direct and through our relay with a `transport: 'all'` route: datagrams received and sent
// per second, loss, and the proxy's CPU seconds per million received datagrams) and "HTTP/3 beside
// HTTP/2" (small GETs to one route serving both: h2load, and examples/h3load.rs for HTTP/3, at 16
// connections x 10 streams and 1 x 10, with the proxy's and the client's CPU per request).
// Scenarios a proxy cannot run print n/a. Environment: BENCH_ROUNDS (default 3), BENCH_BYTES
// (default 1G), BENCH_HTTP_SECONDS (default 5, each timed measurement;
// also the UDP runs' iperf3 -t, there default 4), BENCH_ONLY, BENCH_IDLE_CONNS
// (default 10000, or 9000 when a hard file descriptor limit below ~21,000 keeps HAProxy from that many; both idle rows), BENCH_ECHO_ROUNDTRIPS (default 20000), BENCH_TLS_KEY (ec = P-256, default; rsa =
// RSA 2048), BENCH_HANDSHAKE_CLIENTS (parallel s_time processes, default 8), BENCH_SCALE_OUT_ROUNDS
// (default the larger of BENCH_ROUNDS and 6), BENCH_STEAL_LIMIT (default 0.03: a measurement during
// which the VM's host took more of the CPUs is repeated, up to 3 tries), BENCH_SLICES (default 5:
// the keep-alive rows' slices per round), BENCH_VERBOSE.
// Time budget of a default run: 3 rounds x (64 proxy/scenario pairs: 44 of them timed at 5 s; 16
// iperf3 1 GiB, 20,000 echo round trips or opening the plain idle connections, ~1-4 s each; 4 opening
// the idle TLS connections, ~16 s each), the TCP layout table (3 x 3 x 2 iperf3 runs) and the tables
// of ours alone (3 x 7 runs of 5 s, 6 x 5 for scale-out, 3 x 4 UDP iperf3 runs of 4 s): ~21.5 min
// measured, ~26 min estimated with 1 s of proxy start/stop per run, more when the host's steal
// forces repeats (printed at the start and written to RESULTS.md with the real duration).
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdirSync, writeFileSync, readFileSync, readdirSync, existsSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import http from 'node:http';
import https from 'node:https';
import tls from 'node:tls';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const work = path.join(root, 'bench', 'work');
mkdirSync(work, { recursive: true });
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const bytes = process.env.BENCH_BYTES ?? '1G';
const httpSeconds = Number(process.env.BENCH_HTTP_SECONDS ?? 5);
// The keep-alive rows' measurement in as many slices (of httpSeconds / SLICES s), interleaved.
const SLICES = Number(process.env.BENCH_SLICES ?? 5);
const SLICE_SECONDS = Math.max(1, Math.round(httpSeconds / SLICES));
const only = process.env.BENCH_ONLY;
const echoTrips = Number(process.env.BENCH_ECHO_ROUNDTRIPS ?? 20000);
const tlsKeyType = process.env.BENCH_TLS_KEY === 'rsa' ? 'rsa' : 'ec';
const handshakeClients = Number(process.env.BENCH_HANDSHAKE_CLIENTS ?? 8);
const PROXY_CPU = '0';
const LOAD_CPU = '1';
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// The file descriptor limit the proxies may use: without CAP_SYS_RESOURCE (containers) nobody can
// raise the hard limit, so HAProxy and nginx are told this one instead of computing a larger one.
const NOFILE = Number(spawnSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).stdout.trim()) || 65536;
// HAProxy reserves two descriptors per connection of its global maxconn (client and server side) and
// refuses to start when they do not fit, so the idle-connection count is 10,000 only when the hard
// limit allows HAProxy that many (it does not under a 20,000 limit: then 9,000, the same for all).
const HAPROXY_MAXCONN = Math.floor((NOFILE - 100) / 2);
const idleConns = Number(process.env.BENCH_IDLE_CONNS ?? Math.min(10000, Math.floor((HAPROXY_MAXCONN - 500) / 1000) * 1000));
// This runs on a VM whose host also runs other guests: the time it takes from our vCPUs shows as
// "steal" in /proc/stat. A measurement during which the host took more than BENCH_STEAL_LIMIT
// (default 3 %) of the CPUs' time measured the neighbours, not the proxies, so it is repeated, up to
// STEAL_TRIES times in all; the last try counts whatever its steal. Repeats stop once they have
// taken STEAL_REPEAT_SECONDS in all, so a run stays within its time budget. RESULTS.md gives the tally.
const STEAL_LIMIT = Number(process.env.BENCH_STEAL_LIMIT ?? 0.03);
const STEAL_TRIES = 3;
const STEAL_REPEAT_SECONDS = 40;
const stealTally = { measurements: 0, repeated: 0, keptOverLimit: 0, worst: 0, repeatSeconds: 0 };

/** Steal and total jiffies of all CPUs so far (/proc/stat: user nice system idle iowait irq softirq steal). */
function cpuJiffies() {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1, 9).map(Number);
  return { steal: fields[7] ?? 0, total: fields.reduce((a, b) => a + b, 0) };
}

/** `measure()`, repeated while the host stole more than STEAL_LIMIT of the CPUs during it. */
async function undisturbed(measure) {
  for (let attempt = 1; ; attempt++) {
    const before = cpuJiffies();
    const started = Date.now();
    const result = await measure();
    const after = cpuJiffies();
    const seconds = (Date.now() - started) / 1000;
    if (attempt > 1) stealTally.repeatSeconds += seconds;
    const steal = (after.steal - before.steal) / Math.max(1, after.total - before.total);
    if (steal <= STEAL_LIMIT || attempt === STEAL_TRIES || stealTally.repeatSeconds + seconds > STEAL_REPEAT_SECONDS) {
      stealTally.measurements++;
      if (attempt > 1) stealTally.repeated++;
      if (steal > STEAL_LIMIT) stealTally.keptOverLimit++;
      stealTally.worst = Math.max(stealTally.worst, steal);
      return result;
    }
    console.log(`  the host stole ${(steal * 100).toFixed(1)} % of the CPUs during that measurement: repeating it`);
  }
}

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** Path of nginx's stream module (Debian libnginx-mod-stream), or null. */
function streamModule() {
  const listed = spawnSync('dpkg', ['-L', 'libnginx-mod-stream'], { encoding: 'utf8' }).stdout ?? '';
  const found = listed.split('\n').find((l) => l.endsWith('/ngx_stream_module.so'));
  if (found && existsSync(found)) return found;
  return existsSync('/usr/lib/nginx/modules/ngx_stream_module.so') ? '/usr/lib/nginx/modules/ngx_stream_module.so' : null;
}

const requireFromRoot = createRequire(path.join(root, 'package.json'));
function httpProxyVersion() {
  try {
    return JSON.parse(readFileSync(requireFromRoot.resolve('http-proxy/package.json'), 'utf8')).version;
  } catch {
    return null;
  }
}

function ensureTools() {
  const needs = [
    ['iperf3', () => have('iperf3')], ['haproxy', () => have('haproxy')], ['util-linux', () => have('taskset')],
    ['wrk', () => have('wrk')], ['nginx', () => have('nginx')], ['libnginx-mod-stream', () => streamModule() !== null],
    ['nghttp2-client', () => have('h2load')], ['openssl', () => have('openssl')], ['redis-server', () => have('redis-server') && have('redis-cli')],
  ];
  const missing = needs.filter(([, ok]) => !ok()).map(([p]) => p);
  if (missing.length > 0) {
    console.log(`installing ${missing.join(' ')} ...`);
    const sudo = process.getuid?.() === 0 ? '' : 'sudo ';
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    const install = () => spawnSync(`${sudo}apt-get install -y -qq ${missing.join(' ')}`, { shell: true, stdio: 'inherit', env }).status;
    if (install() !== 0) {
      spawnSync(`${sudo}apt-get update -qq`, { shell: true, stdio: 'inherit', env });
      install();
    }
    const still = needs.filter(([, ok]) => !ok()).map(([p]) => p);
    if (still.length) throw new Error(`could not install ${still.join(' ')}`);
  }
  if (!httpProxyVersion()) {
    console.log('installing the npm devDependencies (http-proxy) ...');
    spawnSync(have('pnpm') ? 'pnpm install' : 'npm install --no-save http-proxy@1', { shell: true, cwd: root, stdio: 'inherit' });
    if (!httpProxyVersion()) console.warn('http-proxy could not be installed: its column will say "not installed"');
  }
}

/** A self-signed certificate for bench.test and 127.0.0.1 (P-256 or RSA 2048), made once. */
function ensureCert() {
  const dir = path.join(work, 'tls');
  mkdirSync(dir, { recursive: true });
  const cert = path.join(dir, `${tlsKeyType}-cert.pem`);
  const key = path.join(dir, `${tlsKeyType}-key.pem`);
  const combined = path.join(dir, `${tlsKeyType}-combined.pem`);
  if (!existsSync(cert) || !existsSync(key)) {
    const keyArgs = tlsKeyType === 'rsa' ? ['-newkey', 'rsa:2048'] : ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'];
    execFileSync('openssl', ['req', '-x509', ...keyArgs, '-nodes', '-keyout', key, '-out', cert, '-days', '3650',
      '-subj', '/CN=bench.test', '-addext', 'subjectAltName=DNS:bench.test,IP:127.0.0.1'], { stdio: 'ignore' });
  }
  writeFileSync(combined, readFileSync(cert, 'utf8') + readFileSync(key, 'utf8'));
  return { cert, key, combined };
}
let certs;

async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

async function waitForPort(port, child, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child && child.exitCode !== null) throw new Error(`${child.spawnargs.slice(3).join(' ')} exited (${child.exitCode}): ${child.stderrTail}`);
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`port ${port} did not open`);
    await sleep(50);
  }
}

// Every long-lived child (proxies, backends, idle clients), stopped when the bench is interrupted.
const children = new Set();
function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const child of children) child.kill('SIGTERM');
    process.exit(130);
  });
}

function startPinned(cpu, cmd, args, opts = {}) {
  const child = track(spawn('taskset', ['-c', cpu, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], ...opts }));
  child.stderrTail = '';
  child.stdout.on('data', () => undefined);
  child.stderr.on('data', (d) => {
    child.stderrTail = (child.stderrTail + d).slice(-2000);
    if (process.env.BENCH_VERBOSE) process.stderr.write(d);
  });
  return child;
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/** A process and all its descendants (nginx: master and worker), read from /proc. */
function processTree(pid) {
  const children = new Map();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid).push(Number(entry));
    } catch { /* gone meanwhile */ }
  }
  const out = [pid];
  for (let i = 0; i < out.length; i++) out.push(...(children.get(out[i]) ?? []));
  return out;
}

/** utime + stime in seconds of a process tree (/proc/PID/stat fields 14 and 15). */
function cpuSeconds(pid) {
  let ticks = 0;
  for (const p of processTree(pid)) {
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch { /* gone meanwhile */ }
  }
  return ticks / CLK_TCK;
}

/** VmRSS in KiB of a process tree. */
function rssKiB(pid) {
  let kib = 0;
  for (const p of processTree(pid)) {
    try {
      kib += Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0);
    } catch { /* gone meanwhile */ }
  }
  return kib;
}

// The proxies. Each start(backend, kind) returns { port, pid, stop } (pid: the proxy process, null for
// direct) or null when it cannot run that kind. Kinds: tcp (raw relay), http, https (TLS terminated in
// the proxy, plain HTTP/1.1 upstream). `backend` is { port, tlsPort? }.
const proxies = {
  direct: {
    label: 'direct',
    kinds: ['tcp', 'http', 'https'],
    h2: true,
    async start(backend, kind) {
      const port = kind === 'https' ? backend.tlsPort : backend.port;
      return port ? { port, pid: null, stop: async () => undefined } : null;
    },
  },
  smartproxy: {
    label: 'smartproxy (ours)',
    kinds: ['tcp', 'http', 'https'],
    h2: true,
    async start(backend, kind, env = {}) {
      const port = await freePort();
      const tlsArgs = kind === 'https' || kind === 'https-h3' ? [certs.cert, certs.key] : [];
      const child = startPinned(PROXY_CPU, process.execPath, [path.join(root, 'bench', 'proxy-smartproxy.mjs'), String(port), String(backend.port), kind, ...tlsArgs], { env: { ...process.env, ...env } });
      await waitForPort(port, child);
      return { port, pid: child.pid, stop: () => stop(child) };
    },
  },
  haproxy: {
    label: 'HAProxy',
    kinds: ['tcp', 'http', 'https'],
    h2: true,
    async start(backend, kind) {
      const port = await freePort();
      const cfg = path.join(work, `haproxy-${kind}.cfg`);
      const bind = kind === 'https' ? ` ssl crt ${certs.combined} alpn h2,http/1.1` : '';
      writeFileSync(cfg, [
        'global', '  nbthread 1', `  maxconn ${Math.min(idleConns + 1000, HAPROXY_MAXCONN)}`, `  ulimit-n ${NOFILE}`,
        'defaults', `  mode ${kind === 'tcp' ? 'tcp' : 'http'}`, '  timeout connect 5s', '  timeout client 60s', '  timeout server 60s',
        ...(kind === 'tcp' ? [] : ['  option http-keep-alive', '  option forwardfor', '  http-reuse always']),
        'frontend bench', `  bind 127.0.0.1:${port}${bind}`, '  default_backend be',
        'backend be', `  server s1 127.0.0.1:${backend.port}`, '',
      ].join('\n'));
      const child = startPinned(PROXY_CPU, 'haproxy', ['-db', '-f', cfg]);
      await waitForPort(port, child);
      return { port, pid: child.pid, stop: () => stop(child) };
    },
  },
  nginx: {
    label: 'nginx',
    kinds: ['tcp', 'http', 'https'],
    h2: true,
    async start(backend, kind) {
      const port = await freePort();
      const dir = path.join(work, `nginx-proxy-${kind}`);
      mkdirSync(path.join(dir, 'logs'), { recursive: true });
      const main = [
        'worker_processes 1;', 'daemon off;', 'pid nginx.pid;', 'error_log logs/error.log crit;',
        `worker_rlimit_nofile ${NOFILE};`, `events { worker_connections ${Math.min(NOFILE, idleConns + 4096)}; }`,
      ];
      const conf = kind === 'tcp'
        ? [`load_module ${streamModule()};`, ...main,
          'stream {', `  upstream be { server 127.0.0.1:${backend.port}; }`, `  server { listen 127.0.0.1:${port}; proxy_pass be; }`, '}']
        : [...main,
          'http {', '  access_log off;', '  keepalive_requests 1000000;', '  keepalive_timeout 75s;',
          // keepalive 1024: idle upstream connections kept, above the sweep's 512 clients (with 64,
          // nginx closed ~40 % of its upstream connections after one request at -c512).
          `  upstream be { server 127.0.0.1:${backend.port}; keepalive 1024; keepalive_requests 1000000; }`,
          // server_name: what $host falls back to for a request without Host (s_time's HTTP/1.0 GET).
          `  server { listen 127.0.0.1:${port}${kind === 'https' ? ' ssl http2' : ''}; server_name bench.test;`,
          ...(kind === 'https' ? [`    ssl_certificate ${certs.cert};`, `    ssl_certificate_key ${certs.key};`] : []),
          // proxy_max_temp_file_size 0: stream large answers through the memory buffers, never via disk.
          '    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_max_temp_file_size 0; }',
          '  }', '}'];
      writeFileSync(path.join(dir, 'nginx.conf'), `${conf.join('\n')}\n`);
      const child = startPinned(PROXY_CPU, 'nginx', ['-p', dir, '-c', 'nginx.conf']);
      await waitForPort(port, child);
      return { port, pid: child.pid, stop: () => stop(child) };
    },
  },
  httpProxy: {
    label: 'node http-proxy',
    kinds: ['http', 'https'],
    h2: false,
    async start(backend, kind) {
      if (!httpProxyVersion()) throw new Error('http-proxy is not installed');
      const port = await freePort();
      const tlsArgs = kind === 'https' ? [certs.cert, certs.key] : [];
      const child = startPinned(PROXY_CPU, process.execPath, [path.join(root, 'bench', 'proxy-node-http-proxy.mjs'), String(port), String(backend.port), kind, ...tlsArgs]);
      await waitForPort(port, child);
      return { port, pid: child.pid, stop: () => stop(child) };
    },
  },
};

// The scenarios. run({ port, pid }) returns { value, notes?, extra? }: notes are latencies shown in
// the cell ([label, value, unit]); extra gives the values of the scenario's extra rows (null = n/a).
// `seconds` is the expected length of one measurement, for the time budget.
const cpuRow = 'CPU time of the proxy per keep-alive request (µs, lower is better)';
const handshakeCpuRow = 'HTTPS full handshakes per CPU-second of the proxy';
// Client connections of the keep-alive sweep, beside the main keep-alive row's wrk -c32.
const keepAliveSweep = [8, 64, 512];
const sweepCpuRow = (conns) => `CPU time of the proxy per keep-alive request, ${conns} conns (µs, lower is better)`;

const newConnCpuRow = 'CPU time of the proxy per new connection (µs, lower is better)';

/**
 * Small GETs with wrk -c`conns` (and `headers`: `Connection: close` for a new connection per
 * request), plus the proxy's CPU time per request in row `cpuRowName`.
 */
function smallGetScenario(name, cpuRowName, conns, headers = []) {
  return {
    name,
    kind: 'http',
    setup: startNginxBackend,
    seconds: httpSeconds,
    extraRows: [cpuRowName],
    // Measured in slices, every proxy's in turn (runSlicedRound): req/s and CPU per request are
    // what the host lets a proxy do, and its slow spells last seconds, so a 5 s run each, one
    // proxy after another, compared the host's moods as much as the proxies.
    sliced: true,
    run: ({ port, pid }, seconds = httpSeconds) => {
      const cpu0 = pid ? cpuSeconds(pid) : 0;
      const r = wrk(port, { conns, seconds, headers });
      return { requests: r.requests, seconds: r.requests / r.rps, cpuSeconds: pid ? cpuSeconds(pid) - cpu0 : null, p50: r.p50, p99: r.p99 };
    },
  };
}

/**
 * Once the process tree of `pid` has used no CPU for 100 ms (at most 2 s): a proxy still working
 * off the requests of its slice (node http-proxy, for a tenth of a second after 512 connections)
 * would otherwise share the CPU with the next proxy's slice.
 */
async function settled(pid) {
  const deadline = Date.now() + 2000;
  let last = cpuSeconds(pid);
  while (Date.now() < deadline) {
    await sleep(100);
    const now = cpuSeconds(pid);
    if (now === last) return;
    last = now;
  }
}

/**
 * One round of a sliced scenario: every applicable proxy started at once (each idle while another
 * is measured), then SLICES slices of httpSeconds / SLICES seconds each, every slice through every
 * proxy in turn, the order rotating from slice to slice. A proxy's round: its requests over its
 * measured seconds, its process tree's CPU over its requests, the medians of its slices' latency
 * percentiles.
 */
async function runSlicedRound(scenario, backend, round, names, results, notes, failures) {
  const rows = [scenario.name, ...(scenario.extraRows ?? [])];
  const running = [];
  try {
    for (const name of names) {
      if (!applicable(proxies[name], scenario)) continue;
      try {
        const proxy = await proxies[name].start(backend, scenario.kind);
        if (proxy !== null) running.push({ name, proxy, requests: 0, seconds: 0, cpu: 0, p50: [], p99: [], failed: null });
      } catch (err) {
        for (const row of rows) failures[row][name].push(err.message);
        console.log(`${scenario.name} round ${round + 1} ${name}: FAILED ${err.message}`);
      }
    }
    for (let slice = 0; slice < SLICES; slice++) {
      for (let i = 0; i < running.length; i++) {
        const r = running[(slice + i) % running.length];
        if (r.failed) continue;
        try {
          const m = await undisturbed(() => scenario.run(r.proxy, SLICE_SECONDS));
          r.requests += m.requests;
          r.seconds += m.seconds;
          r.cpu = m.cpuSeconds === null ? null : r.cpu + m.cpuSeconds;
          r.p50.push(m.p50);
          r.p99.push(m.p99);
          if (r.proxy.pid) await settled(r.proxy.pid);
        } catch (err) {
          r.failed = err.message;
        }
      }
    }
  } finally {
    for (const r of running) await r.proxy.stop();
  }
  for (const r of running) {
    if (r.failed) {
      for (const row of rows) failures[row][r.name].push(r.failed);
      console.log(`${scenario.name} round ${round + 1} ${r.name}: FAILED ${r.failed}`);
      continue;
    }
    const rps = r.requests / r.seconds;
    results[scenario.name][r.name].push(rps);
    for (const [label, xs] of [['p50', r.p50], ['p99', r.p99]]) {
      if (!notes[scenario.name][r.name][label]) notes[scenario.name][r.name][label] = { unit: 'ms', xs: [] };
      notes[scenario.name][r.name][label].xs.push(median(xs));
    }
    const cpuUs = r.cpu === null ? null : (r.cpu * 1e6) / r.requests;
    // The scenario's one extra row is its CPU per request.
    const [cpuRow] = scenario.extraRows;
    if (cpuUs !== null) results[cpuRow][r.name].push(cpuUs);
    console.log(`${scenario.name} round ${round + 1} ${r.name}: ${fmt(rps)}, p50 ${median(r.p50).toFixed(2)} ms, p99 ${median(r.p99).toFixed(2)} ms${cpuUs === null ? '' : `; ${cpuRow.split(' (')[0]}: ${fmt(cpuUs)}`}`);
  }
}

const scenarios = [
  {
    name: `TCP upload ${bytes} (MB/s)`,
    kind: 'tcp',
    setup: startIperfServer,
    seconds: 1.5,
    run: ({ port }) => ({ value: iperf(port, false) }),
  },
  {
    name: `TCP download ${bytes} (MB/s)`,
    kind: 'tcp',
    setup: startIperfServer,
    seconds: 1.5,
    run: ({ port }) => ({ value: iperf(port, true) }),
  },
  {
    name: 'TCP 64-byte echo round trip (µs p50, lower is better)',
    kind: 'tcp',
    setup: startEchoServer,
    seconds: 2,
    run: ({ port }) => {
      const r = echoClient(port);
      return { value: r.p50us, notes: [['p99', r.p99us, 'µs']] };
    },
  },
  smallGetScenario('HTTP/1.1 keep-alive small GET (req/s)', cpuRow, 32),
  // The same at other numbers of client connections (the 32-connection row above keeps its name).
  ...keepAliveSweep.map((conns) => smallGetScenario(`HTTP/1.1 keep-alive small GET, ${conns} conns (req/s)`, sweepCpuRow(conns), conns)),
  // Sliced like the keep-alive rows: one 5 s run per proxy in turn let the host's slow spells
  // decide it, and the client's own CPU bounds the conn/s, so the CPU row is the proxy's figure.
  smallGetScenario('HTTP/1.1 new connection per request (conn/s)', newConnCpuRow, 32, ['Connection: close']),
  {
    name: 'HTTP/1.1 1 MiB responses (MB/s)',
    kind: 'http',
    setup: startNginxBackend,
    seconds: httpSeconds,
    run: ({ port }) => {
      const r = wrk(port, { conns: 8, urlPath: '/1m.bin' });
      return { value: r.transferPerSec / 1e6, notes: [['p50', r.p50, 'ms']] };
    },
  },
  {
    name: 'HTTPS keep-alive small GET (req/s)',
    kind: 'https',
    setup: startNginxBackend,
    seconds: httpSeconds,
    run: ({ port }) => {
      const r = wrk(port, { tls: true });
      return { value: r.rps, notes: [['p50', r.p50, 'ms'], ['p99', r.p99, 'ms']] };
    },
  },
  {
    name: 'HTTPS full handshake + GET per connection (conn/s)',
    kind: 'https',
    setup: startNginxBackend,
    seconds: httpSeconds + 0.5,
    extraRows: [handshakeCpuRow],
    run: async ({ port, pid }) => {
      await checkTlsAnswer(port);
      const cpu0 = pid ? cpuSeconds(pid) : 0;
      const r = await sTime(port);
      const perCpuSecond = pid ? r.connections / (cpuSeconds(pid) - cpu0) : null;
      return { value: r.rate, extra: { [handshakeCpuRow]: perCpuSecond } };
    },
  },
  {
    name: 'HTTP/2 over TLS small GET, 16 conns x 10 streams (req/s)',
    kind: 'https',
    h2: true,
    setup: startNginxBackend,
    seconds: httpSeconds,
    run: ({ port }) => ({ value: h2load(port) }),
  },
  {
    name: `RSS per idle keep-alive client connection, ${idleConns} open (KiB, lower is better)`,
    kind: 'http',
    needsProcess: true,
    repeatable: false,
    setup: startNginxBackend,
    seconds: 4,
    run: (proxy) => idleMemory(proxy),
  },
  {
    name: `RSS per idle keep-alive TLS client connection, ${idleConns} open (KiB, lower is better)`,
    kind: 'https',
    needsProcess: true,
    repeatable: false,
    setup: startNginxBackend,
    seconds: 16,
    run: (proxy) => idleMemory(proxy, { tls: true }),
  },
].filter((s) => !only || s.name.includes(only) || (s.extraRows ?? []).some((r) => r.includes(only)));
const lowerIsBetter = (row) => row.includes('lower is better');

/** Our TCP route with each kind of target, one new connection per request. */
const targetKinds = [
  ['tcp', 'static target'],
  ['tcp-sync-fn', 'sync function target'],
  ['tcp-async-fn', 'async function target'],
];
const connectionScenario = 'new TCP connections (conn/s)';
const securityScenario = 'HTTP security overhead (req/s)';
const runSecurity = !only || securityScenario.includes(only);
const runConnections = !only || connectionScenario.includes(only);

/** An HS256 token for the bench's JWT route (secret `bench-secret`, valid for a day). */
function benchToken() {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: 'bench', exp: Math.floor(Date.now() / 1000) + 86400 })}`;
  return `${body}.${createHmac('sha256', 'bench-secret').update(body).digest('base64url')}`;
}

/** Keep-alive req/s of the same HTTP route plain, with a rate limit never reached, and with JWT. */
async function securityRows() {
  const backend = await startNginxBackend();
  const kinds = [['http', 'no security', []], ['http-ratelimit', 'rateLimit (not reached)', []], ['http-jwt', 'jwtAuth HS256', [`Authorization: Bearer ${benchToken()}`]]];
  const runs = Object.fromEntries(kinds.map(([k]) => [k, []]));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [kind, , headers] of kinds) {
        const proxy = await proxies.smartproxy.start(backend, kind);
        try {
          const { rps } = await undisturbed(() => wrk(proxy.port, { headers }));
          runs[kind].push(rps);
          console.log(`${securityScenario} round ${round + 1} ${kind}: ${rps.toFixed(0)}`);
        } finally {
          await proxy.stop();
        }
      }
    }
  } finally {
    await backend.stop();
  }
  const base = median(runs.http);
  return kinds.map(([kind, label]) => {
    const xs = runs[kind];
    return `| ${label} | ${spread(xs, whole)} | ${(median(xs) / base).toFixed(2)} |`;
  });
}

const scaleOutScenario = 'scale-out features (req/s)';
const runScaleOut = !only || scaleOutScenario.includes(only);
// Feature against baseline differences of a few percent need more rounds than the main table.
const scaleOutRounds = Number(process.env.BENCH_SCALE_OUT_ROUNDS ?? Math.max(rounds, 6));

/** redis-server on a free port (pinned with the load), for the shared affinity store. */
async function startRedis() {
  const port = await freePort();
  const child = startPinned(LOAD_CPU, 'redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
  await waitForPort(port, child);
  return { port, url: `redis://127.0.0.1:${port}`, stop: () => stop(child) };
}

/** Calls of one Redis command so far (INFO commandstats). */
function redisCalls(port, command) {
  const out = execFileSync('redis-cli', ['-p', String(port), 'info', 'commandstats'], { encoding: 'utf8' });
  return Number(new RegExp(`cmdstat_${command}:calls=(\\d+)`).exec(out)?.[1] ?? 0);
}

/** HAProxy `mode tcp` in front of `target` (pinned with the load), with or without send-proxy-v2. */
async function startTcpFront(targetPort, sendProxy) {
  const port = await freePort();
  const cfg = path.join(work, `haproxy-front-${sendProxy ? 'pp' : 'plain'}.cfg`);
  writeFileSync(cfg, [
    'global', '  nbthread 1', '  maxconn 4096',
    'defaults', '  mode tcp', '  timeout connect 5s', '  timeout client 60s', '  timeout server 60s',
    'frontend front', `  bind 127.0.0.1:${port}`, '  default_backend be',
    'backend be', `  server s1 127.0.0.1:${targetPort}${sendProxy ? ' send-proxy-v2' : ''}`, '',
  ].join('\n'));
  const child = startPinned(LOAD_CPU, 'haproxy', ['-db', '-f', cfg]);
  await waitForPort(port, child);
  return { port, stop: () => stop(child) };
}

/**
 * Keep-alive req/s of the HTTP route plain, with affinity (memory, and Redis on loopback: Redis
 * GETEX calls per request counted by redis-server itself), and behind an L4 HAProxy with and
 * without a PROXY v2 header to a route that accepts it.
 */
async function scaleOutRows() {
  const backend = await startNginxBackend();
  const redis = await startRedis();
  const session = ['X-Session: bench-session'];
  const kinds = [
    // The baseline sends the affinity rows' header too, so they differ by the feature alone (parsing
    // and forwarding that header is ~3 % of a request's instructions by itself).
    ['http', 'no affinity, no PROXY header (X-Session header sent)', { headers: session }],
    ['http-affinity', 'affinity header:X-Session, in memory', { headers: session }],
    ['http-affinity-redis', 'affinity header:X-Session, Redis on loopback', { headers: session, redis: true }],
    ['http', 'behind HAProxy mode tcp, no PROXY header', { front: 'plain' }],
    ['http-proxyproto', 'behind HAProxy mode tcp send-proxy-v2, acceptProxyProtocol', { front: 'pp', base: 3 }],
    ['http-ratelimit', 'rateLimit per IP (never reached), in memory', { headers: session, base: 0 }],
    ['http-ratelimit-redis', 'rateLimit per IP (never reached), shared through Redis on loopback', { headers: session, redis: true, base: 5 }],
  ];
  const runs = kinds.map(() => []);
  // The proxy's own CPU time per request: what the feature costs the proxy itself, whichever side
  // (the proxy's CPU, or the load CPU shared by wrk, HAProxy, Redis and nginx) limits req/s.
  const cpuRuns = kinds.map(() => []);
  // Redis calls per request, counted by redis-server itself: GETEX (affinity), EVALSHA (rate limit).
  const redisCounts = { getex: { calls: 0, requests: 0 }, evalsha: { calls: 0, requests: 0 } };
  try {
    for (let round = 0; round < scaleOutRounds; round++) {
      for (const [i, [kind, label, how]] of kinds.entries()) {
        const proxy = await proxies.smartproxy.start(backend, kind, { BENCH_REDIS_URL: redis.url });
        const front = how.front ? await startTcpFront(proxy.port, how.front === 'pp') : null;
        try {
          const command = kind.startsWith('http-ratelimit') ? 'evalsha' : 'getex';
          const { rps, cpuUs } = await undisturbed(() => {
            const before = how.redis ? redisCalls(redis.port, command) : 0;
            const cpu0 = cpuSeconds(proxy.pid);
            const run = wrk(front ? front.port : proxy.port, { headers: how.headers ?? [] });
            const cpuUs = ((cpuSeconds(proxy.pid) - cpu0) * 1e6) / run.requests;
            if (how.redis) {
              redisCounts[command].calls += redisCalls(redis.port, command) - before;
              redisCounts[command].requests += run.requests;
            }
            return { ...run, cpuUs };
          });
          runs[i].push(rps);
          cpuRuns[i].push(cpuUs);
          console.log(`${scaleOutScenario} round ${round + 1} ${label}: ${rps.toFixed(0)} req/s, ${cpuUs.toFixed(2)} µs of proxy CPU per request`);
        } finally {
          await front?.stop();
          await proxy.stop();
        }
      }
    }
  } finally {
    await redis.stop();
    await backend.stop();
  }
  // Each run against its baseline's run of the same round, a minute apart at most: the machine's
  // speed drifts over a run by more than the differences measured here.
  const rows = kinds.map(([, label, how], i) => {
    const baseOf = (xs) => xs[how.base ?? (i < 3 ? 0 : i)];
    const ratios = runs[i].map((rps, round) => rps / baseOf(runs)[round]);
    // Baseline over feature, so that below 1 means slower here too.
    const cpuRatios = cpuRuns[i].map((us, round) => baseOf(cpuRuns)[round] / us);
    const twoDecimals = (r) => r.toFixed(2);
    return `| ${label} | ${spread(runs[i], whole)} | ${spread(ratios, twoDecimals)} | ${spread(cpuRuns[i], twoDecimals)} | ${spread(cpuRatios, twoDecimals)} |`;
  });
  const perRequest = ({ calls, requests }) => (calls / Math.max(1, requests)).toFixed(3);
  rows.push(`| Redis GETEX calls per request (affinity, Redis) | ${perRequest(redisCounts.getex)} | | | |`);
  rows.push(`| Redis EVALSHA calls per request (rate limit, Redis) | ${perRequest(redisCounts.evalsha)} | | | |`);
  return rows;
}

/** The body of a GET to 127.0.0.1:port. */
function httpGet(port, urlPath) {
  return new Promise((resolve, reject) => {
    http
      .get({ port, host: '127.0.0.1', path: urlPath, agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => (body += chunk));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

const operationsScenario = 'operations overhead (req/s)';
const runOperations = !only || operationsScenario.includes(only);

/**
 * Keep-alive req/s of the HTTP route plain, and with the access log on (JSON lines to a file) while
 * a client (one Node process, pinned with the load) scrapes the Prometheus listener every second.
 */
async function operationsRows() {
  const backend = await startNginxBackend();
  const kinds = [
    ['http', 'no access log, no Prometheus listener', false],
    ['http-observed', 'access log to a file (JSON) + Prometheus scraped every second', true],
  ];
  const runs = kinds.map(() => []);
  const cpuRuns = kinds.map(() => []);
  let written = 0;
  let dropped = 0;
  const logFile = path.join(work, 'access.log');
  try {
    for (let round = 0; round < scaleOutRounds; round++) {
      for (const [i, [kind, label, observed]] of kinds.entries()) {
        const metricsPort = await freePort();
        rmSync(logFile, { force: true });
        const proxy = await proxies.smartproxy.start(backend, kind, { BENCH_ACCESS_LOG: logFile, BENCH_METRICS_PORT: String(metricsPort) });
        // One scraping process for the run (wrk blocks this one): a client spawned every second
        // would take the load's CPU.
        const scrape = `setInterval(() => require('http').get({ port: ${metricsPort}, host: '127.0.0.1', path: '/metrics', agent: false }, (r) => r.resume()).on('error', () => {}), 1000)`;
        const scraper = observed ? startPinned(LOAD_CPU, process.execPath, ['-e', scrape]) : null;
        try {
          const { rps, cpuUs } = await undisturbed(() => {
            const cpu0 = cpuSeconds(proxy.pid);
            const run = wrk(proxy.port);
            return { ...run, cpuUs: ((cpuSeconds(proxy.pid) - cpu0) * 1e6) / run.requests };
          });
          runs[i].push(rps);
          cpuRuns[i].push(cpuUs);
          console.log(`${operationsScenario} round ${round + 1} ${label}: ${rps.toFixed(0)} req/s, ${cpuUs.toFixed(2)} µs of proxy CPU per request`);
          if (observed) {
            const text = await httpGet(metricsPort, '/metrics');
            written += Number(/^smartproxy_access_log_lines_total (\d+)$/m.exec(text)?.[1] ?? NaN);
            dropped += Number(/^smartproxy_access_log_dropped_total (\d+)$/m.exec(text)?.[1] ?? NaN);
          }
        } finally {
          if (scraper) await stop(scraper);
          await proxy.stop();
        }
      }
    }
  } finally {
    rmSync(logFile, { force: true });
    await backend.stop();
  }
  const twoDecimals = (r) => r.toFixed(2);
  const rows = kinds.map(([, label], i) => {
    const ratios = runs[i].map((rps, round) => rps / runs[0][round]);
    const cpuRatios = cpuRuns[i].map((us, round) => cpuRuns[0][round] / us);
    return `| ${label} | ${spread(runs[i], whole)} | ${spread(ratios, twoDecimals)} | ${spread(cpuRuns[i], twoDecimals)} | ${spread(cpuRatios, twoDecimals)} |`;
  });
  rows.push(`| access log lines over all observed runs: written / dropped (buffer full) | ${written} / ${dropped} | | | |`);
  return rows;
}

const tcpLayoutScenario = 'TCP streams across CPUs (MB/s)';
const runTcpLayout = !only || tcpLayoutScenario.includes(only);

/**
 * What a relay on another CPU costs by itself: a 1 GiB stream each way direct with both iperf3 ends
 * on CPU 1 (the main table's "direct"), direct with the server on CPU 0 (the bytes cross CPUs once),
 * and through ours on CPU 0 with both ends on CPU 1 (they cross twice), in interleaved rounds.
 */
async function tcpLayoutRows() {
  const serverHere = await startIperfServer(LOAD_CPU);
  const serverThere = await startIperfServer(PROXY_CPU);
  const layouts = [
    [`direct, client and server on CPU ${LOAD_CPU}`, () => proxies.direct.start(serverHere, 'tcp')],
    [`direct, client on CPU ${LOAD_CPU}, server on CPU ${PROXY_CPU}`, () => proxies.direct.start(serverThere, 'tcp')],
    [`ours on CPU ${PROXY_CPU}, client and server on CPU ${LOAD_CPU}`, () => proxies.smartproxy.start(serverHere, 'tcp')],
  ];
  const runs = layouts.map(() => ({ up: [], down: [] }));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [i, [label, start]] of layouts.entries()) {
        const target = await start();
        try {
          runs[i].up.push(await undisturbed(() => iperf(target.port, false)));
          runs[i].down.push(await undisturbed(() => iperf(target.port, true)));
          console.log(`${tcpLayoutScenario} round ${round + 1} ${label}: up ${fmt(runs[i].up.at(-1))}, down ${fmt(runs[i].down.at(-1))}`);
        } finally {
          await target.stop();
        }
      }
    }
  } finally {
    await serverHere.stop();
    await serverThere.stop();
  }
  return layouts.map(([label], i) => {
    const vs = (dir) => (median(runs[i][dir]) / median(runs[0][dir])).toFixed(2);
    return `| ${label} | ${spread(runs[i].up, fmt)} | ${spread(runs[i].down, fmt)} | ${vs('up')} / ${vs('down')} |`;
  });
}

const udpScenario = 'UDP datagrams (64-byte, per second)';
const runUdp = !only || udpScenario.includes(only);
// Seconds of each UDP run (iperf3 -t): BENCH_HTTP_SECONDS when given, else 4.
const udpSeconds = Number(process.env.BENCH_HTTP_SECONDS ?? 4);
// Client flows of the second pair of UDP rows (iperf3 -P: a socket, so a relay flow, each).
const udpFlows = 4;

/**
 * 64-byte UDP datagrams as fast as iperf3 sends them, direct and through our relay (a route with
 * transport 'all': iperf3's UDP test keeps its TCP control connection on the same port), both iperf3
 * ends on CPU 1 and the proxy on CPU 0, in interleaved rounds, with the proxy process's CPU time.
 */
async function udpRows() {
  const server = await startIperfServer(LOAD_CPU);
  // [label, start, client flows (iperf3 -P), the row its ratio is over]
  const kinds = [
    [`direct (iperf3 client to server, both on CPU ${LOAD_CPU}), 1 flow`, () => proxies.direct.start(server, 'tcp'), 1, 0],
    [`ours relaying (on CPU ${PROXY_CPU}), 1 flow`, () => proxies.smartproxy.start(server, 'udp'), 1, 0],
    [`direct, ${udpFlows} flows`, () => proxies.direct.start(server, 'tcp'), udpFlows, 2],
    [`ours relaying, ${udpFlows} flows`, () => proxies.smartproxy.start(server, 'udp'), udpFlows, 2],
  ];
  const runs = kinds.map(() => ({ received: [], sent: [], loss: [], cpu: [] }));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [i, [label, start, flows]] of kinds.entries()) {
        const target = await start();
        try {
          // The CPU time is read inside the measurement, so a repeated one counts its own try only.
          const r = await undisturbed(() => {
            const cpu0 = target.pid ? cpuSeconds(target.pid) : 0;
            const run = iperfUdp(target.port, flows);
            return { ...run, cpu: target.pid ? cpuSeconds(target.pid) - cpu0 : null };
          });
          runs[i].received.push(r.receivedPerSecond);
          runs[i].sent.push(r.sentPerSecond);
          runs[i].loss.push(r.lossPercent);
          if (r.cpu !== null) runs[i].cpu.push(r.cpu / (r.received / 1e6));
          const cpu = r.cpu !== null ? `, ${fmt(runs[i].cpu.at(-1))} s of proxy CPU per million` : '';
          console.log(`${udpScenario} round ${round + 1} ${label}: received ${whole(r.receivedPerSecond)}/s, sent ${whole(r.sentPerSecond)}/s, loss ${r.lossPercent.toFixed(1)} %${cpu}`);
        } finally {
          await target.stop();
        }
      }
    }
  } finally {
    await server.stop();
  }
  const percent = (v) => `${v.toFixed(1)} %`;
  return kinds.map(([label, , , over], i) => {
    const r = runs[i];
    const vs = (median(r.received) / median(runs[over].received)).toFixed(2);
    const cpu = r.cpu.length > 0 ? spread(r.cpu, fmt) : 'n/a';
    return `| ${label} | ${spread(r.received, whole)} | ${spread(r.sent, whole)} | ${spread(r.loss, percent)} | ${vs} | ${cpu} |`;
  });
}

const http3Scenario = 'HTTP/3 small GET beside HTTP/2 on the same route (req/s)';
const runHttp3 = !only || http3Scenario.includes(only);
// Our own HTTP/3 load generator (examples/h3load.rs: quinn + h3, one thread): Debian's h2load is
// built without QUIC (not linked to ngtcp2), so it cannot speak HTTP/3.
const h3loadBin = path.join(root, 'target', 'release', 'examples', 'h3load');
// Client connections x concurrent streams of each pair of rows (HTTP/2 and HTTP/3 alike).
const http3Shapes = [[16, 10], [1, 10]];

/** target/release/examples/h3load, built with cargo when missing; throws with the reason when it cannot be. */
function ensureH3load() {
  if (existsSync(h3loadBin)) return h3loadBin;
  if (!have('cargo')) throw new Error(`${path.relative(root, h3loadBin)} is missing and cargo is not installed to build it (cargo build --release --example h3load)`);
  console.log('building the HTTP/3 load generator: cargo build --release --example h3load ...');
  const r = spawnSync('cargo', ['build', '--release', '--example', 'h3load'], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0 || !existsSync(h3loadBin)) throw new Error(`cargo build --release --example h3load failed (exit ${r.status}): ${path.relative(root, h3loadBin)} is missing`);
  return h3loadBin;
}

/** `h3load 127.0.0.1 port bench.test / conns streams seconds` pinned to the load CPU: req/s, requests and the client's CPU seconds. */
function h3loadRun(port, { conns = 16, streams = 10, seconds = httpSeconds } = {}) {
  const { out, cpuSeconds: clientCpu } = timedLoad([h3loadBin, '127.0.0.1', String(port), 'bench.test', '/', String(conns), String(streams), String(seconds)]);
  const line = out.split('\n').find((l) => l.startsWith('{'));
  const r = line ? JSON.parse(line) : null;
  if (!r || !(r.requests > 0)) throw new Error(`h3load through port ${port}: ${out.slice(-400)}`);
  if (r.failed > 0) throw new Error(`h3load through port ${port}: ${r.failed} of ${r.requests + r.failed} requests failed`);
  return { rps: r.rps, requests: r.requests, clientCpu };
}

/**
 * Small GETs over HTTP/2 (h2load, TLS on TCP) and HTTP/3 (h3load, QUIC on UDP) to the same route of
 * ours (https-h3: TLS terminated, `http3: { enabled: true }`), each protocol at 16 connections x 10
 * streams and 1 x 10, a fresh proxy for every run, in interleaved rounds: req/s, the proxy's and the
 * client's CPU per request, and HTTP/3 over HTTP/2 per round.
 */
async function http3Rows() {
  ensureH3load();
  const backend = await startNginxBackend();
  const kinds = http3Shapes.flatMap(([conns, streams]) => [
    ['HTTP/2', conns, streams, (port) => h2loadRun(port, { conns, streams, clientCpu: true })],
    ['HTTP/3', conns, streams, (port) => h3loadRun(port, { conns, streams })],
  ]);
  const runs = kinds.map(() => ({ rps: [], cpu: [], client: [] }));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [i, [protocol, conns, streams, load]] of kinds.entries()) {
        const proxy = await proxies.smartproxy.start(backend, 'https-h3');
        try {
          // A first exchange outside the measurement (the TCP port is open once the proxy is up; this
          // also shows the route answers over UDP): HTTP/3 for 0.2 s, or one HTTPS GET.
          if (protocol === 'HTTP/3') h3loadRun(proxy.port, { conns: 1, streams: 1, seconds: 0.2 });
          else await warmUp(proxy.port, true);
          const r = await undisturbed(() => {
            const cpu0 = cpuSeconds(proxy.pid);
            const run = load(proxy.port);
            return { ...run, cpuUs: ((cpuSeconds(proxy.pid) - cpu0) * 1e6) / run.requests };
          });
          runs[i].rps.push(r.rps);
          runs[i].cpu.push(r.cpuUs);
          runs[i].client.push((r.clientCpu * 1e6) / r.requests);
          console.log(`${http3Scenario} round ${round + 1} ${protocol} ${conns}x${streams}: ${whole(r.rps)} req/s, ${r.cpuUs.toFixed(2)} µs of proxy CPU and ${runs[i].client.at(-1).toFixed(2)} µs of client CPU per request`);
        } finally {
          await proxy.stop();
        }
      }
    }
  } finally {
    await backend.stop();
  }
  const twoDecimals = (r) => r.toFixed(2);
  return kinds.map(([protocol, conns, streams], i) => {
    const r = runs[i];
    // HTTP/3 against the HTTP/2 run of the same shape in the same round.
    const h2 = runs[i - (i % 2)];
    const rpsRatio = protocol === 'HTTP/3' ? spread(r.rps.map((v, round) => v / h2.rps[round]), twoDecimals) : '1.00';
    const cpuRatio = protocol === 'HTTP/3' ? spread(r.cpu.map((v, round) => v / h2.cpu[round]), twoDecimals) : '1.00';
    const client = protocol === 'HTTP/3' ? 'h3load' : 'h2load';
    return `| ${protocol} (${client}), ${conns} conn${conns > 1 ? 's' : ''} x ${streams} streams | ${spread(r.rps, whole)} | ${rpsRatio} | ${spread(r.cpu, twoDecimals)} | ${cpuRatio} | ${spread(r.client, twoDecimals)} |`;
  });
}

const kernelScenario = 'kernel forwarding (MB/s)';
const runKernel = (!only || kernelScenario.includes(only)) && process.getuid?.() === 0 && have('nft');

/**
 * A 1 GiB stream each way direct, through our relay and through the kernel (forwardingEngine
 * 'nftables'), both ends on CPU 1 and the proxy on CPU 0, with the proxy process's CPU time.
 */
async function kernelRows() {
  const server = await startIperfServer(LOAD_CPU);
  const kinds = [
    ['direct (no proxy)', () => proxies.direct.start(server, 'tcp')],
    [`ours relaying (on CPU ${PROXY_CPU})`, () => proxies.smartproxy.start(server, 'tcp')],
    ['ours, the kernel forwarding (forwardingEngine: \'nftables\')', () => proxies.smartproxy.start(server, 'tcp-kernel')],
  ];
  const runs = kinds.map(() => ({ up: [], down: [], cpu: [] }));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [i, [label, start]] of kinds.entries()) {
        const target = await start();
        try {
          const cpu0 = target.pid ? cpuSeconds(target.pid) : 0;
          runs[i].up.push(await undisturbed(() => iperf(target.port, false)));
          runs[i].down.push(await undisturbed(() => iperf(target.port, true)));
          if (target.pid) runs[i].cpu.push(cpuSeconds(target.pid) - cpu0);
          console.log(`${kernelScenario} round ${round + 1} ${label}: up ${fmt(runs[i].up.at(-1))}, down ${fmt(runs[i].down.at(-1))}`);
        } finally {
          await target.stop();
        }
      }
    }
  } finally {
    await server.stop();
  }
  return kinds.map(([label], i) => {
    const vs = (dir) => (median(runs[i][dir]) / median(runs[0][dir])).toFixed(2);
    const cpu = runs[i].cpu.length > 0 ? spread(runs[i].cpu, (s) => s.toFixed(2)) : 'n/a';
    return `| ${label} | ${spread(runs[i].up, fmt)} | ${spread(runs[i].down, fmt)} | ${vs('up')} / ${vs('down')} | ${cpu} |`;
  });
}

/** Rows of the new-connections table: direct and each target kind, medians over the rounds. */
async function connectionRows() {
  const backend = await startNginxBackend();
  const runs = Object.fromEntries([['direct'], ...targetKinds].map(([k]) => [k, { rate: [], p50: [], p99: [] }]));
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [kind] of [['direct'], ...targetKinds]) {
        const proxy = kind === 'direct' ? await proxies.direct.start(backend, 'tcp') : await proxies.smartproxy.start(backend, kind);
        try {
          const r = await undisturbed(() => wrk(proxy.port, { headers: ['Connection: close'] }));
          runs[kind].rate.push(r.rps);
          runs[kind].p50.push(r.p50);
          runs[kind].p99.push(r.p99);
          console.log(`${connectionScenario} round ${round + 1} ${kind}: ${r.rps.toFixed(0)} p50 ${r.p50.toFixed(3)} ms p99 ${r.p99.toFixed(2)} ms`);
        } finally {
          await proxy.stop();
        }
      }
    }
  } finally {
    await backend.stop();
  }
  const staticP50 = median(runs.tcp.p50);
  return [['direct', 'direct (no proxy)'], ...targetKinds].map(([kind, label]) => {
    const r = runs[kind];
    const added = kind === 'direct' || kind === 'tcp' ? '' : ` (+${((median(r.p50) - staticP50) * 1000).toFixed(0)} µs over static)`;
    return `| ${label} | ${spread(r.rate, whole)} | ${median(r.p50).toFixed(3)} ms${added} | ${median(r.p99).toFixed(2)} ms |`;
  });
}

/**
 * An nginx (one worker) answering every request with a fixed 2-byte body — a backend as fast as it
 * gets — and /1m.bin with a 1 MiB file; plain HTTP on `port`, and TLS (HTTP/1.1 and h2, the bench
 * certificate) on `tlsPort` for the direct HTTPS rows.
 */
async function startNginxBackend() {
  const port = await freePort();
  const tlsPort = await freePort();
  const dir = path.join(work, 'nginx-backend');
  mkdirSync(path.join(dir, 'logs'), { recursive: true });
  mkdirSync(path.join(dir, 'html'), { recursive: true });
  const big = path.join(dir, 'html', '1m.bin');
  if (!existsSync(big)) writeFileSync(big, Buffer.alloc(1 << 20, 'x'), { mode: 0o644 });
  writeFileSync(path.join(dir, 'nginx.conf'), [
    'worker_processes 1;', 'daemon off;', 'pid nginx.pid;', 'error_log logs/error.log crit;',
    'worker_rlimit_nofile 16384;', 'events { worker_connections 8192; }',
    'http {', '  access_log off;', '  keepalive_requests 1000000;', '  sendfile on;',
    `  server { listen 127.0.0.1:${port}; listen 127.0.0.1:${tlsPort} ssl http2;`,
    `    ssl_certificate ${certs.cert}; ssl_certificate_key ${certs.key};`,
    `    location / { return 200 "ok"; }`, `    location = /1m.bin { root ${path.join(dir, 'html')}; }`,
    '  }', '}', '',
  ].join('\n'));
  const child = startPinned(LOAD_CPU, 'nginx', ['-p', dir, '-c', 'nginx.conf']);
  await waitForPort(port, child);
  await waitForPort(tlsPort, child);
  return { port, tlsPort, stop: () => stop(child) };
}

async function startIperfServer(cpu = LOAD_CPU) {
  const port = await freePort();
  const child = startPinned(cpu, 'iperf3', ['-s', '-p', String(port), '-B', '127.0.0.1']);
  await waitForPort(port, child);
  return { port, stop: () => stop(child) };
}

async function startEchoServer() {
  const port = await freePort();
  const child = startPinned(LOAD_CPU, process.execPath, [path.join(root, 'bench', 'echo.mjs'), 'server', String(port)]);
  await waitForPort(port, child);
  return { port, stop: () => stop(child) };
}

function latencyMs(match) {
  return match ? Number(match[1]) * ({ us: 0.001, ms: 1, s: 1000 })[match[2]] : NaN;
}

/** wrk -t1 for BENCH_HTTP_SECONDS: req/s, p50/p99 ms, requests done, bytes/s transferred. */
function wrk(port, { headers = [], conns = 32, urlPath = '/', tls: useTls = false, seconds = httpSeconds } = {}) {
  const hs = ['Host: bench.test', ...headers].flatMap((h) => ['-H', h]);
  const url = `${useTls ? 'https' : 'http'}://127.0.0.1:${port}${urlPath}`;
  const out = execFileSync('taskset', ['-c', LOAD_CPU, 'wrk', '-t1', `-c${conns}`, `-d${seconds}s`, '--latency', ...hs, url], { encoding: 'utf8' });
  const errors = /Non-2xx or 3xx responses: (\d+)/.exec(out);
  if (errors) throw new Error(`wrk saw ${errors[1]} non-2xx answers through port ${port}`);
  const socketErrors = /Socket errors: (.*)/.exec(out);
  if (socketErrors && process.env.BENCH_VERBOSE) console.log(`  wrk socket errors: ${socketErrors[1]}`);
  const transfer = /Transfer\/sec:\s+([\d.]+)([KMGT]?B)/.exec(out);
  const unit = { B: 1, KB: 1024, MB: 1024 ** 2, GB: 1024 ** 3, TB: 1024 ** 4 };
  const requests = Number(/(\d+) requests in/.exec(out)?.[1] ?? NaN);
  if (!(requests > 0)) throw new Error(`wrk did no request through port ${port}: ${out}`);
  return {
    rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1] ?? NaN),
    p50: latencyMs(/\s50%\s+([\d.]+)(us|ms|s)/.exec(out)),
    p99: latencyMs(/\s99%\s+([\d.]+)(us|ms|s)/.exec(out)),
    requests,
    transferPerSec: transfer ? Number(transfer[1]) * unit[transfer[2]] : NaN,
  };
}

/** `iperf3 -c 127.0.0.1 -p port ...args -J` pinned to the load CPU: its JSON report. */
function iperf3Client(port, args, timeoutMs = 0) {
  const out = execFileSync('taskset', ['-c', LOAD_CPU, 'iperf3', '-c', '127.0.0.1', '-p', String(port), ...args, '-J'], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024, timeout: timeoutMs });
  return JSON.parse(out);
}

/**
 * A section's table: its header lines and the rows `rows()` measures; or, should the section fail,
 * a line saying why, so that one failed section does not lose the tables measured before it.
 */
async function sectionTable(name, header, rows) {
  try {
    return [...header, ...(await rows())].join('\n');
  } catch (err) {
    console.log(`${name}: FAILED ${err.message}`);
    return `(failed: ${err.message})`;
  }
}

function iperf(port, reverse) {
  const result = iperf3Client(port, ['-n', bytes, ...(reverse ? ['-R'] : [])]);
  const bitsPerSecond = reverse ? result.end?.sum_received?.bits_per_second : result.end?.sum_sent?.bits_per_second;
  // iperf3 reports a failed test (a reset stream, a refused control connection) in its JSON.
  if (typeof bitsPerSecond !== 'number') throw new Error(`iperf3 through port ${port} reported no result: ${result.error ?? 'no summary'}`);
  return bitsPerSecond / 8 / 1e6;
}

/**
 * `iperf3 -u -b 0 -l 64 -t udpSeconds`: 64-byte datagrams as fast as the client sends them. Received:
 * the server's own count (end.sum_received: the highest sequence number it saw minus the gaps, which
 * equals its bytes / 64; end.sum's packets are the client's count, which would also count the
 * datagrams lost after the server's last one as received), per second of the test; sent:
 * end.sum_sent; loss: the share of the sent datagrams never received.
 */
function iperfUdp(port, flows = 1) {
  const { end } = iperf3Client(port, ['-u', '-b', '0', '-l', '64', '-t', String(udpSeconds), '-P', String(flows)], (udpSeconds + 30) * 1000);
  const received = end.sum_received.packets - end.sum_received.lost_packets;
  const sent = end.sum_sent.packets;
  if (!(received > 0)) throw new Error(`iperf3 -u through port ${port}: no datagram received (${JSON.stringify(end.sum_received)})`);
  return {
    received,
    receivedPerSecond: received / end.sum_received.seconds,
    sentPerSecond: sent / end.sum_sent.seconds,
    lossPercent: (100 * (sent - received)) / sent,
  };
}

/** BENCH_ECHO_ROUNDTRIPS sequential 64-byte round trips over one connection (bench/echo.mjs). */
function echoClient(port) {
  const out = execFileSync('taskset', ['-c', LOAD_CPU, process.execPath, path.join(root, 'bench', 'echo.mjs'), 'client', String(port), String(echoTrips), String(2 * httpSeconds)], { encoding: 'utf8' });
  const r = JSON.parse(out);
  if (r.count < 1000) throw new Error(`only ${r.count} echo round trips`);
  return r;
}

/** One `GET / HTTP/1.0` over TLS without SNI or ALPN, as s_time sends it: the answer must be a 200. */
async function checkTlsAnswer(port) {
  const answer = await new Promise((resolve, reject) => {
    const socket = tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false }, () => socket.write('GET / HTTP/1.0\r\n\r\n'));
    let data = '';
    socket.setEncoding('latin1');
    socket.on('data', (d) => { data += d; });
    socket.on('end', () => resolve(data));
    socket.on('error', reject);
    socket.setTimeout(5000, () => socket.destroy(new Error('timeout')));
  });
  if (!/^HTTP\/1\.[01] 200/.test(answer)) throw new Error(`TLS check through port ${port}: ${answer.split('\r\n')[0] || 'no answer'}`);
}

/**
 * BENCH_HANDSHAKE_CLIENTS parallel `openssl s_time -new` (a full handshake for every connection: it
 * never offers a session to resume), each connection sending `GET / HTTP/1.0`. Connections per
 * wall-clock second over all of them.
 */
async function sTime(port) {
  const started = Date.now();
  const outs = await Promise.all(Array.from({ length: handshakeClients }, () => new Promise((resolve, reject) => {
    const child = track(spawn('taskset', ['-c', LOAD_CPU, 'openssl', 's_time', '-connect', `127.0.0.1:${port}`, '-new', '-time', String(httpSeconds), '-www', '/'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    child.on('error', reject);
    child.on('exit', () => resolve(out));
  })));
  const seconds = (Date.now() - started) / 1000;
  let connections = 0;
  for (const out of outs) {
    const m = /(\d+) connections in \d+ real seconds, (\d+) bytes read per connection/.exec(out);
    if (!m) throw new Error(`s_time through port ${port}: ${out.trim().split('\n').slice(-3).join(' / ')}`);
    if (Number(m[2]) < 20) throw new Error(`s_time read only ${m[2]} bytes per connection through port ${port}`);
    connections += Number(m[1]);
  }
  return { connections, rate: connections / seconds };
}

/** h2load over TLS (ALPN h2), 16 connections with 10 concurrent streams each: req/s. */
function h2load(port) {
  return h2loadRun(port).rps;
}

/** `h2load -t1 -c<conns> -m<streams> -D BENCH_HTTP_SECONDS` over TLS (ALPN h2): req/s and requests that succeeded. */
function h2loadRun(port, { conns = 16, streams = 10, clientCpu = false } = {}) {
  const args = ['h2load', '-t1', `-c${conns}`, `-m${streams}`, '-D', String(httpSeconds), `https://127.0.0.1:${port}/`];
  const { out, cpuSeconds: client } = clientCpu ? timedLoad(args) : { out: execFileSync('taskset', ['-c', LOAD_CPU, ...args], { encoding: 'utf8' }), cpuSeconds: null };
  if (!/Application protocol: h2/.test(out)) throw new Error(`h2load did not negotiate h2 through port ${port}: ${out.slice(-400)}`);
  const done = /requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out);
  const ok2xx = Number(/status codes: (\d+) 2xx/.exec(out)?.[1] ?? 0);
  if (!done || Number(done[1]) === 0 || ok2xx < Number(done[1])) throw new Error(`h2load through port ${port}: ${out.slice(-400)}`);
  return { rps: Number(/finished in [\d.]+m?s, ([\d.]+) req\/s/.exec(out)?.[1] ?? NaN), requests: Number(done[1]), clientCpu: client };
}

/**
 * A load generator pinned to the load CPU under bash, whose `times` builtin then prints the user and
 * system CPU time of its finished children (getrusage RUSAGE_CHILDREN: the load generator alone):
 * the generator's stdout and its CPU seconds.
 */
function timedLoad(args) {
  const out = execFileSync('taskset', ['-c', LOAD_CPU, 'bash', '-c', '"$@"; status=$?; times; exit $status', 'load', ...args], { encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 });
  const m = /(\d+)m([\d.]+)s (\d+)m([\d.]+)s\s*$/.exec(out);
  if (!m) throw new Error(`no CPU times after ${args[0]}: ${out.slice(-400)}`);
  return { out, cpuSeconds: Number(m[1]) * 60 + Number(m[2]) + Number(m[3]) * 60 + Number(m[4]) };
}

/** One keep-alive GET, over TLS with `useTls` (so lazily created state exists before the baseline). */
function warmUp(port, useTls = false) {
  return new Promise((resolve, reject) => {
    const get = useTls ? https.get : http.get;
    get({ host: '127.0.0.1', port, path: '/', headers: { host: 'bench.test' }, agent: false, rejectUnauthorized: false }, (res) => {
      res.resume();
      res.on('end', resolve);
    }).on('error', reject);
  });
}

/** Line of a child's stdout matching `re`, or an error after `ms`. */
function waitForLine(child, re, ms) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`timeout waiting for ${re}`)), ms);
    const onData = (d) => {
      buf += d;
      const m = re.exec(buf);
      if (m) { clearTimeout(timer); child.stdout.off('data', onData); resolve(m); }
    };
    child.stdout.on('data', onData);
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`exited with ${code} before ${re}: ${child.stderrTail ?? ''}`)); });
  });
}

/**
 * RSS growth of the proxy's process tree over BENCH_IDLE_CONNS idle keep-alive connections, KiB each;
 * with `tls`, each connection a completed TLS handshake and one HTTPS request (idle-conns.mjs --tls).
 */
async function idleMemory({ port, pid }, { tls: useTls = false } = {}) {
  await warmUp(port, useTls);
  await sleep(500);
  const before = rssKiB(pid);
  const args = [path.join(root, 'bench', 'idle-conns.mjs'), String(port), String(idleConns), ...(useTls ? ['--tls'] : [])];
  const client = track(spawn('taskset', ['-c', LOAD_CPU, process.execPath, ...args], { stdio: ['pipe', 'pipe', 'pipe'] }));
  client.stderrTail = '';
  client.stderr.on('data', (d) => { client.stderrTail = (client.stderrTail + d).slice(-2000); });
  try {
    const ready = await waitForLine(client, /ready (\d+)/, 120000);
    await sleep(1000);
    const after = rssKiB(pid);
    client.stdin.write('close\n');
    const open = Number((await waitForLine(client, /open (\d+)/, 10000))[1]);
    if (Number(ready[1]) < idleConns || open < idleConns) throw new Error(`only ${Math.min(open, Number(ready[1]))} of ${idleConns} idle connections stayed open`);
    return { value: (after - before) / idleConns, notes: [['idle RSS', before / 1024, 'MiB']] };
  } finally {
    client.kill('SIGTERM');
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
/** `median (min–max)`, each shown by `show`. */
const spread = (xs, show) => `${show(median(xs))} (${show(Math.min(...xs))}–${show(Math.max(...xs))})`;
const whole = (v) => v.toFixed(0);
const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));
const fmtNote = ([label, v, unit]) => `${label} ${unit === 'ms' ? v.toFixed(v < 10 ? 2 : 1) : fmt(v)} ${unit}`;

function version(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return `${r.stdout ?? ''}${r.stderr ?? ''}`.split('\n')[0].trim();
}

const applicable = (proxy, scenario) => proxy.kinds.includes(scenario.kind) && (!scenario.h2 || proxy.h2) && (!scenario.needsProcess || proxy !== proxies.direct);

/** Expected seconds of the whole run: one proxy start/stop (~1 s) plus the measurement for each pair. */
function budgetSeconds() {
  let total = 0;
  for (const s of scenarios) {
    for (const p of Object.values(proxies)) if (applicable(p, s)) total += rounds * (s.seconds + 1);
    total += 1; // backend
  }
  if (runSecurity) total += rounds * 3 * (httpSeconds + 1);
  if (runConnections) total += rounds * 4 * (httpSeconds + 1);
  if (runScaleOut) total += scaleOutRounds * 5 * (httpSeconds + 1.5);
  if (runOperations) total += scaleOutRounds * 2 * (httpSeconds + 1.5);
  if (runTcpLayout) total += rounds * 3 * 4;
  if (runKernel) total += rounds * 3 * 4;
  if (runUdp) total += rounds * 4 * (udpSeconds + 1.5);
  if (runHttp3) total += rounds * 2 * http3Shapes.length * (httpSeconds + 1.5);
  return total;
}

async function main() {
  const t0 = Date.now();
  ensureTools();
  if (!existsSync(path.join(root, 'dist_ts', 'index.js'))) {
    throw new Error('build first: pnpm build');
  }
  certs = ensureCert();
  const budget = budgetSeconds();
  console.log(`estimated duration: ${(budget / 60).toFixed(1)} min (${rounds} rounds, ${httpSeconds} s per timed measurement)`);
  const names = Object.keys(proxies);
  const rowNames = scenarios.flatMap((s) => [s.name, ...(s.extraRows ?? [])]);
  const results = Object.fromEntries(rowNames.map((r) => [r, Object.fromEntries(names.map((n) => [n, []]))]));
  const notes = Object.fromEntries(rowNames.map((r) => [r, Object.fromEntries(names.map((n) => [n, {}]))]));
  const failures = Object.fromEntries(rowNames.map((r) => [r, Object.fromEntries(names.map((n) => [n, []]))]));
  for (const scenario of scenarios) {
    const backend = await scenario.setup();
    try {
      for (let round = 0; round < rounds; round++) {
        if (scenario.sliced) {
          await runSlicedRound(scenario, backend, round, names, results, notes, failures);
          continue;
        }
        for (const name of names) {
          if (!applicable(proxies[name], scenario)) continue;
          let proxy = null;
          try {
            proxy = await proxies[name].start(backend, scenario.kind);
            if (proxy === null) continue;
            // A repeat of the idle-memory measurement would count the first try's connections too.
            const r = scenario.repeatable === false ? await scenario.run(proxy) : await undisturbed(() => scenario.run(proxy));
            results[scenario.name][name].push(r.value);
            for (const [label, v, unit] of r.notes ?? []) {
              if (!notes[scenario.name][name][label]) notes[scenario.name][name][label] = { unit, xs: [] };
              notes[scenario.name][name][label].xs.push(v);
            }
            for (const [row, v] of Object.entries(r.extra ?? {})) if (v !== null && Number.isFinite(v)) results[row][name].push(v);
            const extra = Object.entries(r.extra ?? {}).filter(([, v]) => v !== null).map(([row, v]) => `; ${row.split(' (')[0]}: ${fmt(v)}`).join('');
            console.log(`${scenario.name} round ${round + 1} ${name}: ${fmt(r.value)}${(r.notes ?? []).map((n) => `, ${fmtNote(n)}`).join('')}${extra}`);
          } catch (err) {
            for (const row of [scenario.name, ...(scenario.extraRows ?? [])]) failures[row][name].push(err.message);
            console.log(`${scenario.name} round ${round + 1} ${name}: FAILED ${err.message}`);
          } finally {
            await proxy?.stop();
          }
        }
      }
    } finally {
      await backend.stop();
    }
  }

  const others = [['direct', 'direct'], ['haproxy', 'HAProxy'], ['nginx', 'nginx'], ['httpProxy', 'http-proxy']];
  const header = ['scenario', ...names.map((n) => proxies[n].label), ...others.map(([, l]) => `ours / ${l}`)];
  const rows = rowNames.map((row) => {
    const scenario = scenarios.find((s) => s.name === row || (s.extraRows ?? []).includes(row));
    const cell = (n) => {
      const xs = results[row][n];
      if (xs.length === 0) {
        if (failures[row][n].length) return 'failed';
        if (n === 'httpProxy' && !httpProxyVersion() && applicable(proxies[n], scenario)) return 'not installed';
        return 'n/a';
      }
      const lat = Object.entries(notes[row][n]).map(([label, { unit, xs: ls }]) => `, ${fmtNote([label, median(ls), unit])}`).join('');
      const failed = failures[row][n].length ? `, ${failures[row][n].length} failed` : '';
      return `${fmt(median(xs))} (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}${lat}${failed})`;
    };
    const ratio = (a, b) => {
      const xa = results[row][a];
      const xb = results[row][b];
      return xa.length && xb.length ? (median(xa) / median(xb)).toFixed(2) : 'n/a';
    };
    return [row, ...names.map(cell), ...others.map(([n]) => ratio('smartproxy', n))];
  });
  const table = rows.length ? [header, header.map(() => '---'), ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n') : '(not run)';
  const connectionTable = runConnections
    ? await sectionTable(connectionScenario, ['| route target | connections/s | p50 latency | p99 latency |', '| --- | --- | --- | --- |'], connectionRows)
    : '(not run)';
  const securityTable = runSecurity ? await sectionTable(securityScenario, ['| route security | req/s | vs none |', '| --- | --- | --- |'], securityRows) : '(not run)';
  const tcpLayoutTable = runTcpLayout
    ? await sectionTable(tcpLayoutScenario, ['| 1 GiB stream | upload | download | vs the first row (up / down) |', '| --- | --- | --- | --- |'], tcpLayoutRows)
    : '(not run)';
  const kernelTable = runKernel
    ? await sectionTable(kernelScenario, ['| 1 GiB stream | upload | download | vs direct (up / down) | proxy CPU seconds (both runs) |', '| --- | --- | --- | --- | --- |'], kernelRows)
    : '(not run: needs root and nft)';
  const udpTable = runUdp
    ? await sectionTable(udpScenario, ['| path | received datagrams/s | sent datagrams/s | loss | vs direct (received) | proxy CPU per million datagrams (s) |', '| --- | --- | --- | --- | --- | --- |'], udpRows)
    : '(not run)';
  const http3Table = runHttp3
    ? await sectionTable(http3Scenario, ['| protocol (client), connections x streams | req/s | HTTP/3 / HTTP/2 (req/s) | proxy CPU per request (µs) | HTTP/3 / HTTP/2 (proxy CPU) | client CPU per request (µs) |', '| --- | --- | --- | --- | --- | --- |'], http3Rows)
    : '(not run)';
  const scaleOutTable = runScaleOut
    ? await sectionTable(scaleOutScenario, ['| setup | req/s | vs its baseline | proxy CPU per request (µs) | baseline CPU / this CPU |', '| --- | --- | --- | --- | --- |'], scaleOutRows)
    : '(not run)';
  const operationsTable = runOperations
    ? await sectionTable(operationsScenario, ['| setup | req/s | vs the first row | proxy CPU per request (µs) | first row CPU / this CPU |', '| --- | --- | --- | --- | --- |'], operationsRows)
    : '(not run)';
  const elapsed = (Date.now() - t0) / 1000;
  const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).stdout.trim();
  const wrkCmd = `taskset -c ${LOAD_CPU} wrk -t1 -c32 -d${httpSeconds}s --latency -H 'Host: bench.test'`;
  const doc = `# Benchmark results

${table}

Medians of ${rounds} interleaved rounds (scenario by scenario, each round every proxy in turn), min–max in parentheses, then the medians of the latency percentiles. Ratios are ours' median divided by the other's: above 1 favours ours in the rows where higher is better, below 1 in the rows marked "lower is better". n/a: the proxy does not do that (http-proxy has no raw TCP mode and no HTTP/2; "direct" has no proxy process to measure); failed: every round of it failed (the log says why).
Run of ${new Date().toISOString().slice(0, 10)}: ${(elapsed / 60).toFixed(1)} min (estimated beforehand: ${(budget / 60).toFixed(1)} min)${only ? `, BENCH_ONLY='${only}'` : ''}.

- Machine: ${version('uname', ['-srm'])}, ${spawnSync('nproc').stdout.toString().trim()} CPUs. The proxy is pinned to CPU ${PROXY_CPU} (\`taskset -c ${PROXY_CPU}\`) with one worker thread or process: ours \`workerThreads: 1\` (bench/proxy-smartproxy.mjs, a Node process), HAProxy \`nbthread 1\`, nginx \`worker_processes 1\`, http-proxy one Node process (bench/proxy-node-http-proxy.mjs). Load generators and backends are pinned to CPU ${LOAD_CPU}. 127.0.0.1 only. No access logging anywhere.
- Versions: smartproxy ${commit || 'working tree'} (release build), ${version('haproxy', ['-v'])}, ${version('nginx', ['-v'])}, node http-proxy ${httpProxyVersion() ?? 'not installed'}, ${version('iperf3', ['--version'])}, ${version('wrk', ['-v'])}, ${version('h2load', ['--version'])}, ${version('openssl', ['version'])}, Node ${process.version}.
- Upstream: ours pools keep-alive connections to the backend (its default: at most 1,024 per upstream, idle or busy); HAProxy \`option http-keep-alive\`, \`http-reuse always\`, \`option forwardfor\`; nginx \`proxy_pass\` to an upstream with \`keepalive 1024\`, \`proxy_http_version 1.1\`, \`proxy_set_header Connection ""\`, X-Forwarded-For, \`proxy_max_temp_file_size 0\` (large answers stream through memory, not disk), \`keepalive_requests 1000000\`; http-proxy an \`http.Agent({ keepAlive: true, maxSockets: 64 })\` with \`xfwd: true\`. Raw TCP: ours a plain forward route, HAProxy \`mode tcp\`, nginx \`stream { proxy_pass }\` (\`load_module ${streamModule()}\`).
- TLS: a self-signed ${tlsKeyType === 'rsa' ? 'RSA 2048' : 'ECDSA P-256'} certificate (openssl req -x509, bench/work/tls), TLS 1.3 negotiated everywhere; ours a route without \`domains\` with \`action.tls: { mode: 'terminate', certificate: { key, cert } }\` (a \`domains: '*'\` route refuses a TLS client that sends no SNI with an unrecognized_name alert, and h2load, openssl s_time and curl send none to 127.0.0.1); HAProxy \`bind … ssl crt … alpn h2,http/1.1\`; nginx \`listen … ssl http2\`; http-proxy behind node:https (no HTTP/2). "direct" is the backend nginx terminating TLS itself.
- Backends: nginx, one worker, \`return 200 "ok"\` and a 1 MiB static file (\`sendfile on\`), \`keepalive_requests 1000000\`; iperf3 -s; a Node echo server (bench/echo.mjs).
- Commands (PORT = the proxy's port, or the backend's for direct):
  - TCP upload/download: \`taskset -c ${LOAD_CPU} iperf3 -c 127.0.0.1 -p PORT -n ${bytes} -J\` and the same with \`-R\`.
  - TCP echo: \`taskset -c ${LOAD_CPU} node bench/echo.mjs client PORT ${echoTrips} ${2 * httpSeconds}\`: one connection, ${echoTrips} sequential 64-byte write-then-read-back round trips after 1,000 unmeasured ones, TCP_NODELAY.
  - HTTP/1.1 keep-alive: \`${wrkCmd.replace(`-d${httpSeconds}s`, `-d${SLICE_SECONDS}s`)} http://127.0.0.1:PORT/\` ${SLICES} times per round, in slices interleaved across the proxies: each round starts every proxy at once (those not being measured sit idle), then runs slice 1 through each proxy in turn, then slice 2, and so on, the order rotating by one from slice to slice, and each slice followed by a wait until its proxy has used no CPU for 100 ms; this VM's host has slow spells lasting seconds, and a 5 s run per proxy one after another let them fall on one proxy and not the next. A proxy's round: its requests over its slices' seconds; the CPU row: the utime+stime delta of the proxy's process tree (/proc/PID/stat, ${CLK_TCK} Hz ticks) over its slices divided by their requests; latency: the medians of its slices' p50 and p99.
  - HTTP/1.1 keep-alive at ${keepAliveSweep.join(', ')} connections: the same with \`-c${keepAliveSweep.join('`, `-c')}\` instead of \`-c32\` (one wrk thread drives them all), each with its CPU row.
  - New connection per request: \`${wrkCmd.replace(`-d${httpSeconds}s`, `-d${SLICE_SECONDS}s`)} -H 'Connection: close' http://127.0.0.1:PORT/\` in slices like the keep-alive rows, with its CPU row (the proxy's CPU per connection: wrk's own CPU on the load core bounds the conn/s of every proxy alike).
  - 1 MiB responses: \`taskset -c ${LOAD_CPU} wrk -t1 -c8 -d${httpSeconds}s --latency -H 'Host: bench.test' http://127.0.0.1:PORT/1m.bin\`, wrk's Transfer/sec in 10^6 bytes/s.
  - HTTPS keep-alive: \`${wrkCmd} https://127.0.0.1:PORT/\`.
  - HTTPS full handshakes: ${handshakeClients} parallel \`taskset -c ${LOAD_CPU} openssl s_time -connect 127.0.0.1:PORT -new -time ${httpSeconds} -www /\` (\`-new\`: a full handshake for every connection, no session resumption; one \`GET / HTTP/1.0\` each); connections of all of them per wall-clock second. These clients are the bottleneck on a 2-core machine (OpenSSL 3.0 spends 0.7–1 ms of client CPU per connection), so the conn/s row is mostly a client figure; the row below it, connections divided by the proxy process's CPU seconds over the run, is what one proxy core would sustain.
  - HTTP/2: \`taskset -c ${LOAD_CPU} h2load -t1 -c16 -m10 -D ${httpSeconds} https://127.0.0.1:PORT/\` (ALPN h2).
  - Idle memory: one GET, 0.5 s, then VmRSS of the proxy's process tree (/proc/PID/status: ours the Node process holding the addon, nginx master + worker); then \`taskset -c ${LOAD_CPU} node bench/idle-conns.mjs PORT ${idleConns}\` opens ${idleConns} connections (100 being set up at a time), one keep-alive GET on each, and leaves them idle; 1 s later VmRSS again: (after − before) / ${idleConns}. The note gives the RSS before. The TLS row: the same against each proxy's HTTPS port, with one HTTPS GET before the first reading and \`node bench/idle-conns.mjs PORT ${idleConns} --tls\`, whose every connection completes a TLS handshake (no SNI, no ALPN, like wrk and s_time, so HTTP/1.1) and one GET over it before it idles (http-proxy: node:https).${idleConns < 10000 && !process.env.BENCH_IDLE_CONNS ? ` (${idleConns}, not 10,000: the hard file descriptor limit here is ${NOFILE} and cannot be raised, and HAProxy reserves two descriptors per connection of its maxconn.)` : ''}
- Host interference: this is a VM, and the host's other guests take time from its CPUs (steal in /proc/stat). A measurement during which the host took more than ${(STEAL_LIMIT * 100).toFixed(0)} % of the CPUs' time was repeated, up to ${STEAL_TRIES} tries and ${STEAL_REPEAT_SECONDS} s of repeats per run. This run: ${stealTally.measurements} measurements, ${stealTally.repeated} of them repeated (${stealTally.repeatSeconds.toFixed(0)} s), ${stealTally.keptOverLimit} kept above the limit; the worst kept steal ${(stealTally.worst * 100).toFixed(1)} %. The idle-memory measurement is never repeated (a repeat would count the first try's connections).
- Run: \`pnpm bench\` (= \`node bench/run.mjs\`; installs the Debian packages nginx, libnginx-mod-stream, haproxy, wrk, nghttp2-client, iperf3 and the npm devDependency http-proxy when missing). Environment: BENCH_ROUNDS (${rounds}), BENCH_HTTP_SECONDS (${httpSeconds}), BENCH_BYTES (${bytes}), BENCH_ONLY (substring of the scenario names), BENCH_IDLE_CONNS, BENCH_ECHO_ROUNDTRIPS, BENCH_TLS_KEY (ec|rsa), BENCH_HANDSHAKE_CLIENTS, BENCH_SCALE_OUT_ROUNDS (${scaleOutRounds}), BENCH_STEAL_LIMIT (${STEAL_LIMIT}), BENCH_SLICES (${SLICES}).

## TCP: what crossing CPUs costs by itself

${tcpLayoutTable}

\`iperf3 -c 127.0.0.1 -p PORT -n ${bytes} -J\` (and \`-R\`), the client always pinned to CPU ${LOAD_CPU}. Medians of ${rounds} interleaved rounds. Direct with both ends on one CPU is what the main table's TCP ratios divide by: the bytes never leave that CPU's caches, and one CPU does all the work. Through a relay on the other CPU, CPU ${LOAD_CPU}'s processes make the same writes and reads, but every byte crosses CPUs twice (copied into one CPU's cache and out of it on the other, with a cross-CPU wakeup at each hand-off), and each side waits for the other; the second row is what one crossing costs with no proxy at all.

## Kernel forwarding: a 1 GiB stream through the kernel instead of the relay

${kernelTable}

\`iperf3 -c 127.0.0.1 -p PORT -n ${bytes} -J\` (and \`-R\`), client and server pinned to CPU ${LOAD_CPU}, our proxy process on CPU ${PROXY_CPU}. Medians of ${rounds} interleaved rounds. The kernel route (bench/proxy-smartproxy.mjs mode tcp-kernel) is destination NAT in the proxy's nftables table: the bytes go from client to server inside the kernel, on the CPU that sends them, and the proxy process does nothing for them. Its CPU column is the process's utime+stime over the upload and the download together.

## UDP: 64-byte datagrams through the relay

${udpTable}

\`taskset -c ${LOAD_CPU} iperf3 -c 127.0.0.1 -p PORT -u -b 0 -l 64 -t ${udpSeconds} -J\` (64-byte datagrams, \`-b 0\`: as fast as the client can send them, for ${udpSeconds} s) against \`taskset -c ${LOAD_CPU} iperf3 -s -p PORT -B 127.0.0.1\`: client and server both pinned to CPU ${LOAD_CPU}; ours, on CPU ${PROXY_CPU} with one worker thread, relays with the route \`{ match: { ports: PORT, transport: 'all' }, action: { type: 'forward', targets: [{ host: '127.0.0.1', port: SERVER_PORT }] } }\` (bench/proxy-smartproxy.mjs mode udp; \`'all'\` because iperf3's UDP test keeps its TCP control connection on the same port, and the same route relays it). The first pair of rows has one client flow per run, so one upstream socket; the second the same with \`-P ${udpFlows}\`: ${udpFlows} client sockets, so ${udpFlows} flows read from the one port socket and sent on ${udpFlows} upstream sockets, its ratio over the direct row with as many flows. Medians of ${rounds} interleaved rounds (direct, then ours, each round), min–max in parentheses. Received: the datagrams the server counted (\`end.sum_received\` of the client's JSON, the server's report: packets − lost_packets) per second; sent: \`end.sum_sent.packets\` per second; loss: the share of the sent datagrams that never reached the server. The ratio is ours' median received rate over direct's. The CPU column is the proxy process's utime+stime (/proc/PID/stat) over the run divided by the millions of datagrams the server received. With both iperf3 ends on one CPU the sender and the receiver compete for it, so the direct row is bounded by that CPU too: the client sends with the CPU time the server leaves it, and the datagrams the server cannot read in time overflow its socket receive buffer (the direct row's loss: the kernel's RcvbufErrors counter in /proc/net/snmp grows by as many). Through ours, the datagrams the relay does not take in time are dropped on the way as well (a full socket buffer, or the relay's shallow queues, as a network would), and CPU ${LOAD_CPU} is still shared by the sender and the receiver: the sent and loss columns describe the whole path under that contention, not the relay alone, and the received column (and its ratio) is the one to compare.

## HTTP/3: small GET beside HTTP/2 on the same route

${http3Table}

Ours only: HAProxy 2.6 and nginx 1.22 as Debian ships them have no HTTP/3. One route of ours (bench/proxy-smartproxy.mjs mode https-h3: the HTTPS route of the main table, TLS terminated with the bench certificate, no \`domains\`, plus \`action.http3: { enabled: true }\`, so QUIC on the same port over UDP), on CPU ${PROXY_CPU} with one worker thread, plain HTTP/1.1 to the nginx backend of the other HTTP rows (\`return 200 "ok"\`, pinned with the load on CPU ${LOAD_CPU}). HTTP/2: \`taskset -c ${LOAD_CPU} h2load -t1 -c16 -m10 -D ${httpSeconds} https://127.0.0.1:PORT/\` (ALPN h2: the main table's HTTP/2 command, which there runs against the route without \`http3\`) and the same with \`-c1\`. HTTP/3: \`taskset -c ${LOAD_CPU} target/release/examples/h3load 127.0.0.1 PORT bench.test / 16 10 ${httpSeconds}\` and the same with \`1 10\`: Debian's h2load is built without QUIC (not linked to ngtcp2), so this is our own client, examples/h3load.rs (quinn 0.11 + h3 0.0.8 + h3-quinn 0.0.10 over rustls 0.23 with ring, TLS 1.3, certificates not verified; one tokio thread; C QUIC connections with M request streams each, every stream sending its next GET as soon as the previous answer's body is read, for D seconds; \`cargo build --release --example h3load\`, which this bench runs when the binary is missing). A fresh proxy for every run (before the measurement, 0.2 s of h3load at 1 x 1 ahead of an HTTP/3 run, one HTTPS GET ahead of an HTTP/2 run), ${rounds} interleaved rounds, medians with min–max in parentheses; the ratio columns are the median (min–max) of each round's HTTP/3 run over the HTTP/2 run of the same shape in that round. Proxy CPU: the proxy process's utime+stime (/proc/PID/stat) over the run divided by the requests the client completed. Client CPU: the load generator's own user+system time (bash's \`times\` after it exits: getrusage of the finished child) divided by the same requests. The two clients are different programs, so the req/s rows compare the pair (client and proxy), not the proxy alone: the client runs on CPU ${LOAD_CPU} beside nginx, and where its CPU per request plus nginx's approaches that CPU's time, the client bounds the rate; the proxy CPU per request is the proxy's side alone.

## HTTP security: keep-alive requests through the same route with and without checks

${securityTable}

\`${wrkCmd}\` as above, through ours only; the route of the HTTP row with a per-IP \`rateLimit\` that the run never reaches, and with \`jwtAuth\` (HS256, every request carrying a valid token).

## Scale-out: affinity, shared rate limits and the PROXY protocol on the keep-alive route

${scaleOutTable}

\`${wrkCmd}\` through ours only. Affinity rows: the HTTP route with \`loadBalancing.affinity: { key: 'header:X-Session' }\`, every request carrying the same bound value (one lookup per request), compared with the first row, whose requests carry the same header; with \`options.redis\` a redis-server on loopback (pinned with the load), GETEX calls counted by \`redis-cli info commandstats\`. PROXY rows: wrk → HAProxy \`mode tcp\` (pinned with the load) → ours, once with \`send-proxy-v2\` to a route with \`acceptProxyProtocol\` and \`proxyIPs: ['127.0.0.1']\`, compared with the same chain without it. Rate-limit rows: the route with a per-IP \`rateLimit\` the run never reaches, in memory (compared with the first row), and with \`options.redis\` (compared with the in-memory limiter), where every request is one GCRA script call (\`EVALSHA\`, counted by \`redis-cli info commandstats\`). ${scaleOutRounds} interleaved rounds; the ratio columns are the median (min–max) of each round's ratio to its baseline's run in the same round, since the machine's speed drifts over a run by more than the differences measured here. The CPU columns are the proxy process's utime+stime (/proc/PID/stat) over the run divided by the requests wrk completed: the proxy is pinned alone on CPU ${PROXY_CPU}, while wrk, HAProxy, Redis and the backend share CPU ${LOAD_CPU}, so req/s also moves with the load side's CPU and with the host's steal, and CPU per request shows what the feature costs the proxy itself.

## Operations: the access log and Prometheus scrapes on the keep-alive route

${operationsTable}

\`${wrkCmd}\` through ours only: the HTTP route plain, and with \`accessLog: { enabled: true, path }\` (JSON lines to a file in bench/work, removed after each run) and \`metrics.prometheus\` scraped once a second by a Node client (one process, pinned with the load) for the whole run. ${scaleOutRounds} interleaved rounds; ratios per round, as in the scale-out table. The log's writer is a thread of the proxy process, so its work is in the CPU column.

## Function targets: new connections through a raw TCP route

${connectionTable}

\`${wrkCmd} -H 'Connection: close'\` (one TCP connection per request) against the nginx backend, through our plain forward route with a static target, with \`host\`/\`port\` as synchronous functions, and as async functions (one JavaScript call per connection either way; bench/proxy-smartproxy.mjs).
`;
  writeFileSync(path.join(root, 'bench', 'RESULTS.md'), doc);
  console.log(`\n${table}\n\n${tcpLayoutTable}\n\n${kernelTable}\n\n${udpTable}\n\n${http3Table}\n\n${securityTable}\n\n${scaleOutTable}\n\n${operationsTable}\n\n${connectionTable}\n\ntook ${(elapsed / 60).toFixed(1)} min (estimated ${(budget / 60).toFixed(1)} min); written to bench/RESULTS.md`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
