// Runs inside a network namespace of its own (`unshare -n`, from test.kernel-forwarding.ts): a
// backend, our proxy with a kernel-forwarded route, clients; prints one JSON line of what it saw.
// Its own namespace keeps the rules it makes, and its loopback, away from the machine's.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import dgram from 'node:dgram';
import { readlinkSync } from 'node:fs';
import net from 'node:net';
import { SmartProxy } from '../../dist_ts/index.js';

const scenario = process.argv[2];
// The fallback scenario runs unprivileged: its namespace's loopback was brought up before.
if (scenario !== 'fallback') execFileSync('ip', ['link', 'set', 'lo', 'up']);
const tables = () => JSON.parse(execFileSync('nft', ['-j', 'list', 'tables'], { encoding: 'utf8' })).nftables.filter((i) => i.table).map((i) => i.table.name);

function backend(tag) {
  const seen = [];
  const server = net.createServer((socket) => {
    seen.push(socket.remoteAddress);
    socket.on('data', (d) => socket.write(`${tag}:${d}`));
    socket.on('error', () => {});
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port, seen })));
}

/** Connects, writes `text`, resolves with the answer (the socket left open when `keep`). */
function exchange(port, text, keep = false) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(text));
    socket.once('data', (d) => {
      if (!keep) socket.end();
      resolve({ answer: String(d), socket });
    });
    socket.on('error', reject);
    setTimeout(() => reject(new Error(`no answer through port ${port}`)), 5000).unref();
  });
}

const freePort = () => new Promise((resolve) => { const s = net.createServer().listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); }); });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const warnings = [];
process.on('warning', (w) => warnings.push(String(w.message)));

const out = { scenario };
if (scenario === 'forward') {
  const one = await backend('one');
  const two = await backend('two');
  const port = await freePort();
  const route = (target) => ({ name: 'kernel', match: { ports: port }, action: { type: 'forward', forwardingEngine: 'nftables', target: { host: '127.0.0.1', port: target } } });
  const logs = [];
  const proxy = new SmartProxy({ routes: [route(one.port)], logger: (entry) => logs.push(entry) });
  await proxy.start();
  out.tablesWhileRunning = tables().filter((t) => t.startsWith('smartproxy_'));
  const open = await exchange(port, 'hello', true);
  out.answer = open.answer;
  out.activeWhileOpen = proxy.getStatistics().activeConnections;
  // Once the exchange's packets are counted (its last ACK may be a reading later), one reading of
  // both: the kernel's bytes are the engine's too.
  let stats = null;
  for (let i = 0; i < 50; i++) {
    await sleep(100);
    stats = proxy.getStatistics();
    if ((stats.kernelForwarding?.routes.kernel?.bytesOut ?? 0) > 0 && i >= 12) break;
  }
  out.kernel = stats.kernelForwarding;
  out.engineBytes = { in: stats.bytesIn, out: stats.bytesOut };
  open.socket.end();
  // The target changes while clients keep connecting: every one of them is answered.
  let running = true;
  const answers = [];
  const failures = [];
  const loop = (async () => {
    while (running) {
      try {
        answers.push((await exchange(port, 'x')).answer);
      } catch (err) {
        failures.push(String(err));
      }
    }
  })();
  await sleep(200);
  await proxy.updateRoutes([route(two.port)]);
  await sleep(300);
  running = false;
  await loop;
  out.answersDuringUpdate = answers.length;
  out.failuresDuringUpdate = failures;
  out.lastAnswer = answers.at(-1);
  out.relayedTotal = proxy.getStatistics().totalConnections;
  await proxy.stop();
  out.tablesAfterStop = tables().filter((t) => t.startsWith('smartproxy_'));
  out.logs = logs.filter((l) => /kernel/.test(l.message)).map((l) => `${l.level} ${l.message}`);
  one.server.close();
  two.server.close();
} else if (scenario === 'stale') {
  // A table such as a killed engine leaves: its pid is of a process that has exited.
  const gone = spawnSync('true').pid;
  const pidNamespace = readlinkSync('/proc/self/ns/pid').replace(/^pid:\[(\d+)\]$/, '$1');
  const stale = `smartproxy_${pidNamespace}_${gone}_0`;
  // Tables this engine cannot judge: another PID namespace's (its pid means nothing here), and
  // another program's.
  const foreign = [`smartproxy_${Number(pidNamespace) + 1}_${gone}_0`, 'someone_else'];
  for (const table of [stale, ...foreign]) execFileSync('nft', ['add', 'table', 'inet', table]);
  out.before = tables();
  out.foreign = foreign;
  const one = await backend('one');
  const port = await freePort();
  const proxy = new SmartProxy({ routes: [{ name: 'kernel', match: { ports: port }, action: { type: 'forward', forwardingEngine: 'nftables', target: { host: '127.0.0.1', port: one.port } } }] });
  await proxy.start();
  out.stale = stale;
  out.during = tables();
  await proxy.stop();
  one.server.close();
} else if (scenario === 'preserve') {
  // Three namespaces: this one (the proxy's), a client's and a backend's, each joined to this one by
  // a veth pair; this one routes between them. The backend answers with the address it saw.
  const holders = [];
  const namespace = () => {
    const holder = spawn('unshare', ['-n', 'sleep', '60'], { stdio: 'ignore' });
    holders.push(holder);
    return holder.pid;
  };
  const client = namespace();
  const server = namespace();
  await sleep(200);
  const sh = (command) => execFileSync('sh', ['-c', command]);
  const inside = (pid, command) => sh(`nsenter -t ${pid} -n sh -c '${command}'`);
  sh('echo 1 > /proc/sys/net/ipv4/ip_forward');
  for (const [pid, net, ours, theirs] of [[client, '10.77.1', 'kc0', 'kc1'], [server, '10.77.2', 'ks0', 'ks1']]) {
    sh(`ip link add ${ours} type veth peer name ${theirs} netns ${pid}`);
    sh(`ip addr add ${net}.1/24 dev ${ours} && ip link set ${ours} up`);
    inside(pid, `ip link set lo up && ip addr add ${net}.2/24 dev ${theirs} && ip link set ${theirs} up && ip route add default via ${net}.1`);
  }
  const echoSource = "require('net').createServer((s) => { s.on('error', () => {}); s.end(s.remoteAddress); }).listen(7001, '10.77.2.2', () => console.log('up'))";
  const backendProcess = spawn('nsenter', ['-t', String(server), '-n', process.execPath, '-e', echoSource], { stdio: ['ignore', 'pipe', 'inherit'] });
  holders.push(backendProcess);
  await new Promise((resolve) => backendProcess.stdout.once('data', resolve));
  const ask = (timeout = 10000) => String(execFileSync('nsenter', ['-t', String(client), '-n', process.execPath, '-e',
    "const s = require('net').connect(7000, '10.77.1.1'); let d = ''; s.on('data', (c) => (d += c)); s.on('end', () => process.stdout.write(d)); s.on('error', (e) => { console.error(String(e)); process.exit(1); });"], { timeout }));
  // A rate far above what the test sends: the kernel takes the route's named limit.
  const route = (preserveSourceIP) => ({ name: 'kernel', match: { ports: 7000 }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { preserveSourceIP, maxRate: '1gbps' }, target: { host: '10.77.2.2', port: 7001 } } });
  const proxy = new SmartProxy({ routes: [route(true)] });
  await proxy.start();
  out.preserved = ask();
  out.limits = JSON.parse(execFileSync('nft', ['-j', 'list', 'limits'], { encoding: 'utf8' })).nftables.filter((i) => i.limit).map((i) => i.limit);
  await proxy.updateRoutes([route(false)]);
  out.masqueraded = ask();
  // The client's address on the block list, then off the allow list: its packets are dropped.
  const blocked = async (security) => {
    await proxy.updateRoutes([{ ...route(false), security }]);
    try {
      execFileSync('nsenter', ['-t', String(client), '-n', process.execPath, '-e',
        "const s = require('net').connect(7000, '10.77.1.1'); s.on('data', () => process.exit(0)); s.on('error', () => process.exit(1));"], { timeout: 1500 });
      return false;
    } catch {
      return true;
    }
  };
  out.blockedByBlockList = await blocked({ ipBlockList: ['10.77.1.2'] });
  out.blockedByAllowList = await blocked({ ipAllowList: ['10.77.9.0/24'] });
  await proxy.updateRoutes([{ ...route(false), security: { ipAllowList: ['10.77.1.0/24'] } }]);
  out.allowed = ask();
  out.relayedTotal = proxy.getStatistics().totalConnections;
  await proxy.stop();
  // The engine's own lists (defaults.security) hold on kernel routes too.
  const guarded = new SmartProxy({ defaults: { security: { ipBlockList: ['10.77.1.2'] } }, routes: [route(false)] });
  await guarded.start();
  try {
    out.defaultsBlocked = false;
    ask(1500);
  } catch {
    out.defaultsBlocked = true;
  }
  out.defaultsRelayed = guarded.getStatistics().totalConnections;
  await guarded.stop();
  for (const holder of holders) holder.kill();
} else if (scenario === 'udp') {
  // Datagrams: the kernel forwards UDP (protocol 'udp'), which the relay does not carry at all.
  const backendSocket = dgram.createSocket('udp4');
  await new Promise((resolve) => backendSocket.bind(0, '127.0.0.1', resolve));
  backendSocket.on('message', (message, from) => backendSocket.send(`udp:${message}`, from.port, from.address));
  const port = await freePort();
  const proxy = new SmartProxy({
    routes: [{ name: 'kernel-udp', match: { ports: port }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { protocol: 'udp' }, target: { host: '127.0.0.1', port: backendSocket.address().port } } }],
  });
  await proxy.start();
  const client = dgram.createSocket('udp4');
  out.answer = await new Promise((resolve, reject) => {
    client.once('message', (message) => resolve(String(message)));
    client.send('ping', port, '127.0.0.1');
    setTimeout(() => reject(new Error('no datagram back')), 5000).unref();
  });
  let kernel = null;
  for (let i = 0; i < 50; i++) {
    kernel = proxy.getStatistics().kernelForwarding;
    if ((kernel?.routes['kernel-udp']?.packets ?? 0) >= 2) break;
    await sleep(100);
  }
  out.packets = kernel?.routes['kernel-udp']?.packets ?? 0;
  // The relay holds the port's UDP socket too (for when the kernel cannot forward): it saw nothing.
  out.relayedFlows = proxy.getStatistics().udp?.sessionsTotal ?? 0;
  client.close();
  backendSocket.close();
  await proxy.stop();
} else if (scenario === 'fallback') {
  // No nftables for this process (run without CAP_NET_ADMIN): the relay serves, with one warning,
  // TCP and (protocol 'all') UDP alike; the UDP backend answers on the TCP backend's port number.
  const one = await backend('one');
  const udpBackend = dgram.createSocket('udp4');
  await new Promise((resolve) => udpBackend.bind(one.port, '127.0.0.1', resolve));
  udpBackend.on('message', (message, from) => udpBackend.send(`udp:${message}`, from.port, from.address));
  const port = await freePort();
  const logs = [];
  const route = { name: 'kernel', match: { ports: port }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { protocol: 'all' }, target: { host: '127.0.0.1', port: one.port } } };
  const proxy = new SmartProxy({ routes: [route], logger: (entry) => logs.push(entry) });
  await proxy.start();
  out.answer = (await exchange(port, 'hello')).answer;
  const client = dgram.createSocket('udp4');
  out.udpAnswer = await new Promise((resolve, reject) => {
    client.once('message', (message) => resolve(String(message)));
    client.send('ping', port, '127.0.0.1');
    setTimeout(() => reject(new Error('no datagram back through the relay')), 5000).unref();
  });
  client.close();
  out.udpSessions = proxy.getStatistics().udpSessions;
  await proxy.updateRoutes([route]);
  out.answerAfterUpdate = (await exchange(port, 'again')).answer;
  udpBackend.close();
  await sleep(200);
  out.kernel = proxy.getStatistics().kernelForwarding;
  out.relayedTotal = proxy.getStatistics().totalConnections;
  await proxy.stop();
  await sleep(100);
  out.warnings = logs.filter((l) => l.level === 'warn' && /kernel forwarding/.test(l.message)).map((l) => l.message);
  one.server.close();
}
process.stdout.write(`${JSON.stringify(out)}\n`);
process.exit(0);
