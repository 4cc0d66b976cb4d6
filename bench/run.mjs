#!/usr/bin/env node
// `pnpm bench`: our proxy side by side with direct loopback and HAProxy (mode tcp), interleaved
// over several rounds, on 127.0.0.1 only. The proxy under test is pinned to CPU 0 with one worker
// thread (HAProxy: nbthread 1); the load generator and the backend to CPU 1. Prints one table of
// medians (min–max) with ratios, and writes it to bench/RESULTS.md with versions and commands.
//
// Scenarios: raw TCP 1 GiB upload and download (iperf3) against direct, ours and HAProxy mode tcp;
// HTTP/1.1 keep-alive small GETs (wrk, 32 connections) against direct, ours, HAProxy mode http and
// nginx proxy_pass with upstream keep-alive, the backend an nginx `return 200` (one worker).
// Scenarios a proxy cannot run print n/a. Environment: BENCH_ROUNDS (default 3), BENCH_BYTES
// (default 1G), BENCH_HTTP_SECONDS (default 8), BENCH_ONLY (substring of scenario names).
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync, existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const work = path.join(root, 'bench', 'work');
mkdirSync(work, { recursive: true });
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const bytes = process.env.BENCH_BYTES ?? '1G';
const httpSeconds = Number(process.env.BENCH_HTTP_SECONDS ?? 8);
const only = process.env.BENCH_ONLY;
const PROXY_CPU = '0';
const LOAD_CPU = '1';

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

function ensureTools() {
  const missing = [['iperf3', 'iperf3'], ['haproxy', 'haproxy'], ['taskset', 'util-linux'], ['wrk', 'wrk'], ['nginx', 'nginx']].filter(([c]) => !have(c));
  if (missing.length === 0) return;
  const pkgs = missing.map(([, p]) => p);
  console.log(`installing ${pkgs.join(' ')} ...`);
  const sudo = process.getuid?.() === 0 ? [] : ['sudo'];
  spawnSync([...sudo, 'apt-get', 'install', '-y', '-qq', ...pkgs].join(' '), { shell: true, stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
}

async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

async function waitForPort(port, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`port ${port} did not open`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function startPinned(cpu, cmd, args, opts = {}) {
  const child = spawn('taskset', ['-c', cpu, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  child.stdout.on('data', () => undefined);
  child.stderr.on('data', (d) => process.env.BENCH_VERBOSE && process.stderr.write(d));
  return child;
}

async function stop(child) {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

// The proxies. Each start() returns { port, stop }. `direct` is the backend itself.
const proxies = {
  direct: {
    label: 'direct',
    async start(backendPort) {
      return { port: backendPort, stop: async () => undefined };
    },
  },
  smartproxy: {
    label: 'smartproxy (ours)',
    async start(backendPort, kind) {
      const port = await freePort();
      const child = startPinned(PROXY_CPU, process.execPath, [path.join(root, 'bench', 'proxy-smartproxy.mjs'), String(port), String(backendPort), kind]);
      await waitForPort(port);
      return { port, stop: () => stop(child) };
    },
  },
  haproxy: {
    label: 'HAProxy',
    async start(backendPort, kind) {
      const port = await freePort();
      const cfg = path.join(work, 'haproxy.cfg');
      writeFileSync(cfg, [
        'global', '  nbthread 1', '  maxconn 4096',
        'defaults', `  mode ${kind}`, '  timeout connect 5s', '  timeout client 60s', '  timeout server 60s',
        ...(kind === 'http' ? ['  option http-keep-alive', '  http-reuse always'] : []),
        `frontend bench`, `  bind 127.0.0.1:${port}`, '  default_backend be',
        'backend be', `  server s1 127.0.0.1:${backendPort}`, '',
      ].join('\n'));
      const child = startPinned(PROXY_CPU, 'haproxy', ['-db', '-f', cfg]);
      await waitForPort(port);
      return { port, stop: () => stop(child) };
    },
  },
  nginx: {
    label: 'nginx',
    async start(backendPort, kind) {
      if (kind !== 'http') return null;
      const port = await freePort();
      const dir = path.join(work, `nginx-proxy`);
      mkdirSync(path.join(dir, 'logs'), { recursive: true });
      writeFileSync(path.join(dir, 'nginx.conf'), [
        'worker_processes 1;', 'daemon off;', 'pid nginx.pid;', 'error_log logs/error.log crit;',
        'events { worker_connections 4096; }',
        'http {', '  access_log off;',
        `  upstream be { server 127.0.0.1:${backendPort}; keepalive 64; }`,
        `  server { listen 127.0.0.1:${port};`,
        '    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }',
        '  }', '}', '',
      ].join('\n'));
      const child = startPinned(PROXY_CPU, 'nginx', ['-p', dir, '-c', 'nginx.conf']);
      await waitForPort(port);
      return { port, stop: () => stop(child) };
    },
  },
};

// The scenarios. Each run(port) returns a number (higher is better) or null when not applicable.
const scenarios = [
  {
    name: `TCP upload ${bytes} (MB/s)`,
    kind: 'tcp',
    setup: startIperfServer,
    run: (port) => iperf(port, false),
  },
  {
    name: `TCP download ${bytes} (MB/s)`,
    kind: 'tcp',
    setup: startIperfServer,
    run: (port) => iperf(port, true),
  },
  {
    name: 'HTTP/1.1 keep-alive small GET (req/s)',
    kind: 'http',
    setup: startNginxBackend,
    run: (port) => wrk(port),
  },
].filter((s) => !only || s.name.includes(only));

/** An nginx answering every request with a fixed 2-byte body: a backend as fast as it gets. */
async function startNginxBackend() {
  const port = await freePort();
  const dir = path.join(work, 'nginx-backend');
  mkdirSync(path.join(dir, 'logs'), { recursive: true });
  writeFileSync(path.join(dir, 'nginx.conf'), [
    'worker_processes 1;', 'daemon off;', 'pid nginx.pid;', 'error_log logs/error.log crit;',
    'events { worker_connections 4096; }',
    'http {', '  access_log off;', '  keepalive_requests 1000000;',
    `  server { listen 127.0.0.1:${port}; location / { return 200 "ok"; } }`, '}', '',
  ].join('\n'));
  const child = startPinned(LOAD_CPU, 'nginx', ['-p', dir, '-c', 'nginx.conf']);
  await waitForPort(port);
  return { port, stop: () => stop(child) };
}

/** Requests per second (and p99 latency, kept for the table) of wrk over keep-alive. */
const latencies = {};
function wrk(port) {
  const out = execFileSync('taskset', ['-c', LOAD_CPU, 'wrk', '-t1', '-c32', `-d${httpSeconds}s`, '--latency', '-H', 'Host: bench.test', `http://127.0.0.1:${port}/`], { encoding: 'utf8' });
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1] ?? NaN);
  const p99 = /\s99%\s+([\d.]+)(us|ms|s)/.exec(out);
  const p99ms = p99 ? Number(p99[1]) * ({ us: 0.001, ms: 1, s: 1000 })[p99[2]] : NaN;
  const errors = /Non-2xx or 3xx responses: (\d+)/.exec(out);
  if (errors) throw new Error(`wrk saw ${errors[1]} non-2xx answers through port ${port}`);
  latencies[port] = p99ms;
  lastP99 = p99ms;
  return rps;
}
let lastP99 = NaN;

async function startIperfServer() {
  const port = await freePort();
  const child = startPinned(LOAD_CPU, 'iperf3', ['-s', '-p', String(port), '-B', '127.0.0.1']);
  await waitForPort(port);
  return { port, stop: () => stop(child) };
}

function iperf(port, reverse) {
  const args = ['-c', LOAD_CPU, 'iperf3', '-c', '127.0.0.1', '-p', String(port), '-n', bytes, '-J', ...(reverse ? ['-R'] : [])];
  const out = execFileSync('taskset', args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  const result = JSON.parse(out);
  const bitsPerSecond = reverse ? result.end.sum_received.bits_per_second : result.end.sum_sent.bits_per_second;
  return bitsPerSecond / 8 / 1e6;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

function version(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return `${r.stdout}${r.stderr}`.split('\n')[0].trim();
}

async function main() {
  ensureTools();
  if (!existsSync(path.join(root, 'dist_ts', 'index.js'))) {
    throw new Error('build first: pnpm build');
  }
  const names = Object.keys(proxies);
  const results = {};
  const p99s = {};
  for (const scenario of scenarios) {
    results[scenario.name] = Object.fromEntries(names.map((n) => [n, []]));
    p99s[scenario.name] = Object.fromEntries(names.map((n) => [n, []]));
    const backend = await scenario.setup();
    try {
      for (let round = 0; round < rounds; round++) {
        for (const name of names) {
          const proxy = await proxies[name].start(backend.port, scenario.kind);
          if (proxy === null) continue;
          try {
            lastP99 = NaN;
            const value = await scenario.run(proxy.port);
            if (value !== null) results[scenario.name][name].push(value);
            if (!Number.isNaN(lastP99)) p99s[scenario.name][name].push(lastP99);
            const p99 = Number.isNaN(lastP99) ? '' : ` p99 ${lastP99.toFixed(2)} ms`;
            console.log(`${scenario.name} round ${round + 1} ${name}: ${value === null ? 'n/a' : value.toFixed(1)}${p99}`);
          } finally {
            await proxy.stop();
          }
        }
      }
    } finally {
      await backend.stop();
    }
  }

  const header = ['scenario', ...names.map((n) => proxies[n].label), 'ours / direct', 'ours / HAProxy', 'ours / nginx'];
  const rows = scenarios.map((s) => {
    const cell = (n) => {
      const xs = results[s.name][n];
      if (xs.length === 0) return 'n/a';
      const lat = p99s[s.name][n];
      const p99 = lat.length ? `, p99 ${median(lat).toFixed(2)} ms` : '';
      return `${median(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}${p99})`;
    };
    const ratio = (a, b) => {
      const xa = results[s.name][a];
      const xb = results[s.name][b];
      return xa.length && xb.length ? (median(xa) / median(xb)).toFixed(2) : 'n/a';
    };
    return [s.name, ...names.map(cell), ratio('smartproxy', 'direct'), ratio('smartproxy', 'haproxy'), ratio('smartproxy', 'nginx')];
  });
  const table = [header, header.map(() => '---'), ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n');
  const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).stdout.trim();
  const doc = `# Benchmark results

${table}

Medians of ${rounds} interleaved rounds, min–max in parentheses. Higher is better.

- Machine: ${version('uname', ['-srm'])}, ${spawnSync('nproc').stdout.toString().trim()} CPUs; proxy pinned to CPU ${PROXY_CPU} with one worker thread (HAProxy \`nbthread 1\`, nginx \`worker_processes 1\`); load generator and backend pinned to CPU ${LOAD_CPU}; 127.0.0.1 only.
- Versions: smartproxy ${commit || 'working tree'} (release build), ${version('haproxy', ['-v'])}, ${version('nginx', ['-v'])}, ${version('iperf3', ['--version'])}, ${version('wrk', ['-v'])}, Node ${process.version}.
- TCP: \`iperf3 -c 127.0.0.1 -p PORT -n ${bytes} -J\` (upload) and the same with \`-R\` (download); HAProxy \`mode tcp\`; ours a plain forward route.
- HTTP: \`wrk -t1 -c32 -d${httpSeconds}s --latency\` against an nginx \`return 200 "ok"\` backend; HAProxy \`mode http\` with \`http-reuse always\`; nginx \`proxy_pass\` with \`keepalive 64\`; ours a route with \`domains: '*'\` so every request goes through the HTTP engine (bench/proxy-smartproxy.mjs). No logging anywhere.
- Run: \`pnpm bench\` (BENCH_ROUNDS, BENCH_BYTES to change the defaults).
`;
  writeFileSync(path.join(root, 'bench', 'RESULTS.md'), doc);
  console.log(`\n${table}\n\nwritten to bench/RESULTS.md`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
