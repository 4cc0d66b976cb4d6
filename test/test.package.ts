// Packaging as napi-rs projects ship: `scripts/pack.mjs` packs the main package (no binary in it,
// `optionalDependencies` on every platform package) and the platform package of each built binary;
// the tarballs install into a fresh project with npm, offline, and that project imports the
// package, proxies a request through it, and runs the `smartproxy` command. Binaries cross-built
// for the other platforms (scripts/cross-build.mjs, run by .ci/run) are checked for their machine
// and C library with readelf.
import { tap, expect } from '@push.rocks/tapbundle';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

import { freePorts } from './helpers/net.js';

const root = path.join(import.meta.dirname, '..');
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string; napi: { binaryName: string } };
const work = mkdtempSync(path.join(tmpdir(), 'smartproxy-package-'));
process.on('exit', () => rmSync(work, { recursive: true, force: true }));

interface IPacked {
  main: string;
  platforms: Record<string, string>;
  missing: string[];
}

let packed: IPacked;

const tarList = (tarball: string): string[] => execFileSync('tar', ['-tzf', tarball], { encoding: 'utf8' }).trim().split('\n');

tap.test('pack: the main package carries no binary and depends optionally on every platform package', async () => {
  packed = JSON.parse(execFileSync(process.execPath, [path.join(root, 'scripts', 'pack.mjs'), path.join(work, 'pack')], { encoding: 'utf8' })) as IPacked;
  expect(Object.keys(packed.platforms)).toContain('linux-x64-gnu');
  const files = tarList(packed.main);
  expect(files).toContain('package/dist_ts/index.js');
  expect(files).toContain('package/index.js');
  expect(files).toContain('package/cli.js');
  expect(files.some((f) => f.endsWith('.node'))).toBeFalse();
  const manifest = JSON.parse(execFileSync('tar', ['-xzOf', packed.main, 'package/package.json'], { encoding: 'utf8' })) as {
    optionalDependencies: Record<string, string>;
    devDependencies?: object;
  };
  expect(manifest.optionalDependencies).toEqual({
    '@push.rocks/smartproxy-linux-arm64-gnu': pkg.version,
    '@push.rocks/smartproxy-linux-arm64-musl': pkg.version,
    '@push.rocks/smartproxy-linux-x64-gnu': pkg.version,
    '@push.rocks/smartproxy-linux-x64-musl': pkg.version,
  });
  expect(manifest.devDependencies).toBeUndefined();
  expect(tarList(packed.platforms['linux-x64-gnu'])).toContain(`package/${pkg.napi.binaryName}.linux-x64-gnu.node`);
});

tap.test('install into a fresh project (npm, offline): the loader takes the platform package, a request goes through', async () => {
  const project = path.join(work, 'consumer');
  mkdirSync(project, { recursive: true });
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }));
  const install = spawnSync('npm', ['install', '--offline', '--no-audit', '--no-fund', packed.main, packed.platforms['linux-x64-gnu']], { cwd: project, encoding: 'utf8' });
  expect(install.status === 0 ? 'installed' : `${install.stdout}\n${install.stderr}`).toEqual('installed');
  const installed = path.join(project, 'node_modules', '@push.rocks');
  expect(existsSync(path.join(installed, 'smartproxy-linux-x64-gnu', `${pkg.napi.binaryName}.linux-x64-gnu.node`))).toBeTrue();
  expect(existsSync(path.join(installed, 'smartproxy', `${pkg.napi.binaryName}.linux-x64-gnu.node`))).toBeFalse();
  writeFileSync(
    path.join(project, 'app.mjs'),
    `import http from 'node:http';
import { SmartProxy } from '@push.rocks/smartproxy';
const backend = http.createServer((req, res) => res.end('through the installed package ' + req.url));
await new Promise((resolve) => backend.listen(0, '127.0.0.1', resolve));
const proxy = new SmartProxy({ routes: [{ name: 'app', match: { ports: Number(process.argv[2]), domains: 'localhost' }, action: { type: 'forward', target: { host: '127.0.0.1', port: backend.address().port } } }] });
await proxy.start();
const body = await new Promise((resolve, reject) => {
  http.get({ port: Number(process.argv[2]), path: '/hello' }, (res) => { let b = ''; res.on('data', (c) => (b += c)); res.on('end', () => resolve(b)); }).on('error', reject);
});
await proxy.stop();
backend.close();
console.log(body);
`,
  );
  const [port] = await freePorts(1);
  const run = spawnSync(process.execPath, ['app.mjs', String(port)], { cwd: project, encoding: 'utf8', timeout: 60_000 });
  expect(run.stdout.trim() || run.stderr).toEqual('through the installed package /hello');
  writeFileSync(path.join(project, 'config.json'), JSON.stringify({ routes: [{ match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: 1 } } }] }));
  const check = spawnSync(path.join(project, 'node_modules', '.bin', 'smartproxy'), ['--check', 'config.json'], { cwd: project, encoding: 'utf8' });
  expect(check.status).toEqual(0);
});

/** What readelf says of a binary: its machine and the C library it links. */
function elf(file: string): { machine: string; libc: string[] } {
  const header = execFileSync('readelf', ['-h', file], { encoding: 'utf8' });
  const dynamic = execFileSync('readelf', ['-d', file], { encoding: 'utf8' });
  const machine = /Machine:\s+(.*)/.exec(header)?.[1]?.trim() ?? '';
  const libc = [...dynamic.matchAll(/\(NEEDED\)\s+Shared library: \[(libc[^\]]*)\]/g)].map((m) => m[1]);
  return { machine, libc };
}

const expected: Record<string, { machine: string; libc: RegExp }> = {
  'linux-x64-gnu': { machine: 'Advanced Micro Devices X86-64', libc: /^libc\.so\.6$/ },
  'linux-arm64-gnu': { machine: 'AArch64', libc: /^libc\.so\.6$/ },
  'linux-x64-musl': { machine: 'Advanced Micro Devices X86-64', libc: /^libc\.so$|^libc\.musl-x86_64\.so\.1$/ },
  'linux-arm64-musl': { machine: 'AArch64', libc: /^libc\.so$|^libc\.musl-aarch64\.so\.1$/ },
};
// .ci/run cross-builds every target and sets this: then a missing binary is a failure, not a skip.
const requireAll = process.env.SMARTPROXY_EXPECT_ALL_TARGETS === '1';

for (const [platform, want] of Object.entries(expected)) {
  const file = path.join(root, `${pkg.napi.binaryName}.${platform}.node`);
  const present = existsSync(file);
  const title = `${platform}: a shared object for ${want.machine}, linked against ${platform.endsWith('musl') ? 'musl' : 'glibc'} (readelf)`;
  if (!present && !requireAll) {
    tap.skip.test(`${title}: not built here (scripts/cross-build.mjs)`, async () => undefined);
    continue;
  }
  tap.test(title, async () => {
    expect(present).toBeTrue();
    const { machine, libc } = elf(file);
    expect(machine).toEqual(want.machine);
    expect(libc).toHaveLength(1);
    expect(libc[0]).toMatch(want.libc);
    // A shared object has no program interpreter of its own; Node's loads it.
    expect(execFileSync('readelf', ['-l', file], { encoding: 'utf8' }).includes('Requesting program interpreter')).toBeFalse();
  });
}

export default tap.start();
