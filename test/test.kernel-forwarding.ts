// forwardingEngine: 'nftables': the kernel forwards the route's flows (DNAT in the engine's own
// nftables table). Each scenario runs in a child process inside a network namespace of its own
// (`unshare -n`), so that its rules and its loopback are not the machine's: a backend, our proxy,
// clients; the child prints what it saw as one JSON line (test/helpers/kernel-forwarding-child.mjs).
import { tap, expect } from '@push.rocks/tapbundle';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const child = path.join(here, 'helpers', 'kernel-forwarding-child.mjs');
const has = (tool: string): boolean => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
const root = process.getuid?.() === 0;
const missing = ['nft', 'ip', 'unshare', 'nsenter', 'setpriv'].filter((tool) => !has(tool));
// Namespaces and nftables need root (tests run as root here; .ci/run installs the tools), and a
// machine that lets root make network namespaces (a container may not).
const namespaces = root && missing.length === 0 && spawnSync('unshare', ['-n', 'true']).status === 0;
const canTest = namespaces;
const why = !root ? 'not root' : missing.length > 0 ? `missing: ${missing.join(', ')}` : 'network namespaces cannot be made here';

interface IForward {
  tablesWhileRunning: string[];
  answer: string;
  activeWhileOpen: number;
  kernel: { active: boolean; table: string; unavailable: string | null; routes: Record<string, { packets: number; bytes: number; bytesIn: number; bytesOut: number }> } | null;
  engineBytes: { in: number; out: number };
  answersDuringUpdate: number;
  failuresDuringUpdate: string[];
  lastAnswer: string;
  relayedTotal: number;
  tablesAfterStop: string[];
}

function run<T>(command: string[]): T {
  const result = spawnSync(command[0], command.slice(1), { encoding: 'utf8', timeout: 60_000 });
  const line = result.stdout.trim().split('\n').at(-1) ?? '';
  if (result.status !== 0 || !line.startsWith('{')) {
    throw new Error(`${command.join(' ')} failed (${result.status}): ${result.stderr.slice(-2000)}`);
  }
  return JSON.parse(line) as T;
}

const test = canTest ? tap.test.bind(tap) : (name: string, _fn: () => Promise<void>) => tap.skip.test(`${name} (${why})`, async () => {});

tap.test('a port the kernel forwards belongs to its route alone: sharing it is a config error naming the route', async () => {
  const { SmartProxy } = await import('../dist_ts/index.js');
  const target = { host: '127.0.0.1', port: 9 };
  const shared = (second: object): string => {
    try {
      new SmartProxy({ routes: [{ name: 'kernel', match: { ports: 7000 }, action: { type: 'forward', forwardingEngine: 'nftables', target } }, { name: 'other', ...second }] });
      return '';
    } catch (err) {
      return (err as Error).message;
    }
  };
  const relayed = shared({ match: { ports: [6999, 7000] }, action: { type: 'forward', target } });
  expect(relayed).toInclude('"other"');
  expect(relayed).toInclude('match.ports');
  expect(relayed).toInclude('port 7000 is forwarded by the kernel for route "kernel"');
  expect(shared({ match: { ports: 7000 }, action: { type: 'forward', forwardingEngine: 'nftables', target } })).toInclude('port 7000');
  // The kernel's TCP and UDP on one port are two things: a route for each is fine.
  expect(shared({ match: { ports: 7000 }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { protocol: 'udp' }, target } })).toEqual('');
  expect(shared({ match: { ports: 7000 }, action: { type: 'forward', forwardingEngine: 'nftables', nftables: { protocol: 'all' }, target } })).toInclude('port 7000');
  expect(shared({ match: { ports: 7001 }, action: { type: 'forward', target } })).toEqual('');
});

// One run of the forward scenario serves the first two tests.
let forwarded: IForward | undefined;
const forward = (): IForward => (forwarded ??= run<IForward>(['unshare', '-n', process.execPath, child, 'forward']));

test('the kernel forwards the flows: the proxy holds no connection, the route counters grow, stop() removes the table', async () => {
  const seen = forward();
  expect(seen.answer).toEqual('one:hello');
  expect(seen.tablesWhileRunning.length).toEqual(1);
  expect(seen.kernel?.active).toEqual(true);
  expect(seen.kernel?.unavailable).toEqual(null);
  expect(seen.kernel?.table).toEqual(seen.tablesWhileRunning[0]);
  // The connection was open when asked, and it never reached the proxy's own sockets.
  expect(seen.activeWhileOpen).toEqual(0);
  expect(seen.relayedTotal).toEqual(0);
  const counted = seen.kernel!.routes.kernel;
  expect(counted.packets).toBeGreaterThan(0);
  // Both ways (IP packets, headers included): more than the 5 bytes of payload each way.
  expect(counted.bytesIn).toBeGreaterThan(5);
  expect(counted.bytesOut).toBeGreaterThan(5);
  expect(counted.bytes).toEqual(counted.bytesIn + counted.bytesOut);
  // The engine's byte totals include what the kernel carried (nothing was relayed).
  expect(seen.engineBytes.in).toEqual(counted.bytesIn);
  expect(seen.engineBytes.out).toEqual(counted.bytesOut);
  expect(seen.tablesAfterStop).toEqual([]);
});

test('updateRoutes replaces the rules in one transaction: clients connecting in a loop through the change all get answers', async () => {
  const seen = forward();
  expect(seen.failuresDuringUpdate).toEqual([]);
  expect(seen.answersDuringUpdate).toBeGreaterThan(10);
  expect(seen.lastAnswer).toEqual('two:x');
});

test('preserveSourceIP: a backend in another namespace sees the client; without it, the proxy host; IP lists drop in the kernel', async () => {
  // Client 10.77.1.2 and backend 10.77.2.2 in namespaces of their own, routed through the proxy's.
  const seen = run<{
    preserved: string;
    masqueraded: string;
    blockedByBlockList: boolean;
    blockedByAllowList: boolean;
    allowed: string;
    relayedTotal: number;
    defaultsBlocked: boolean;
    defaultsRelayed: number;
    limits: Array<{ name: string; rate: number; rate_unit: string; inv: boolean }>;
  }>([
    'unshare', '-n', process.execPath, child, 'preserve',
  ]);
  expect(seen.preserved).toEqual('10.77.1.2');
  // maxRate '1gbps': one named bucket of 125,000,000 bytes a second for the route.
  expect(seen.limits.map((l) => [l.name, l.rate, l.rate_unit, l.inv])).toEqual([['route_0_rate', 125_000_000, 'bytes', true]]);
  expect(seen.masqueraded).toEqual('10.77.2.1');
  expect(seen.blockedByBlockList).toEqual(true);
  expect(seen.blockedByAllowList).toEqual(true);
  expect(seen.allowed).toEqual('10.77.2.1');
  // Nothing reached the relay: a dropped client does not fall through to it either.
  expect(seen.relayedTotal).toEqual(0);
  // defaults.security's block list drops in the kernel as well.
  expect(seen.defaultsBlocked).toEqual(true);
  expect(seen.defaultsRelayed).toEqual(0);
});

test("protocol 'udp': datagrams go through the kernel both ways and are counted", async () => {
  const seen = run<{ answer: string; packets: number; relayedFlows: number }>(['unshare', '-n', process.execPath, child, 'udp']);
  expect(seen.answer).toEqual('udp:ping');
  expect(seen.relayedFlows).toEqual(0);
  // The datagram and its answer.
  expect(seen.packets).toEqual(2);
});

test("a table left by a process that is gone is removed at the next start; other namespaces' and programs' tables stay", async () => {
  const seen = run<{ before: string[]; stale: string; foreign: string[]; during: string[] }>(['unshare', '-n', process.execPath, child, 'stale']);
  expect(seen.before).toContain(seen.stale);
  expect(seen.during.includes(seen.stale)).toEqual(false);
  for (const table of seen.foreign) expect(seen.during).toContain(table);
  // Those and the running engine's own.
  expect(seen.during.length).toEqual(seen.foreign.length + 1);
});

test("without CAP_NET_ADMIN the relay serves the route, its TCP and (protocol 'all') its UDP, and one warning says why", async () => {
  const script = `ip link set lo up && exec setpriv --reuid=65534 --regid=65534 --clear-groups ${process.execPath} ${child} fallback`;
  const seen = run<{ answer: string; udpAnswer: string; udpSessions: number; answerAfterUpdate: string; kernel: IForward['kernel']; relayedTotal: number; warnings: string[] }>(['unshare', '-n', 'sh', '-c', script]);
  expect(seen.answer).toEqual('one:hello');
  expect(seen.udpAnswer).toEqual('udp:ping');
  expect(seen.udpSessions).toEqual(1);
  expect(seen.answerAfterUpdate).toEqual('one:again');
  expect(seen.relayedTotal).toEqual(2);
  expect(seen.kernel?.active).toEqual(false);
  expect(seen.kernel?.unavailable ?? '').toInclude('Operation not permitted');
  // Once, though updateRoutes met the same reason again.
  expect(seen.warnings).toEqual(['kernel forwarding is unavailable: these routes are relayed by the Rust core']);
});

tap.start({ throwOnError: true });
