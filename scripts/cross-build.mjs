#!/usr/bin/env node
// `node scripts/cross-build.mjs [--release | --profile <name>]`: builds the addon for every `napi.targets` entry of
// package.json other than this machine's, in one `cargo zigbuild` run (zig as the C compiler and
// linker of each target, so ring's and mimalloc's C sources build too; the build scripts and
// procedural macros are compiled once for all targets), and puts each library where
// `napi build --platform` would: `smartproxy.<platform>.node` in the repository root, for
// scripts/pack.mjs. musl targets link musl dynamically (`-crt-static` off): Node on musl loads the
// addon into its own process. Needs the targets' Rust standard libraries (`rustup target add`),
// cargo-zigbuild and zig (`pip install ziglang cargo-zigbuild`, as .ci/run does). Profile: fastrel
// (optimised, no LTO: what the tests build) by default, release (what is published) with
// --release; CI checks only what the binaries are, and builds the dev profile (fastest to build).
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
const profileAt = process.argv.indexOf('--profile');
const profile = process.argv.includes('--release') ? 'release' : profileAt > 0 ? process.argv[profileAt + 1] : 'fastrel';
// Cargo builds the dev profile into `debug/`.
const profileDir = profile === 'dev' ? 'debug' : profile;
const host = /host: (\S+)/.exec(spawnSync('rustc', ['-vV'], { encoding: 'utf8' }).stdout)?.[1];
const targets = pkg.napi.targets.filter((t) => t !== host);

/** `aarch64-unknown-linux-musl` → `linux-arm64-musl`, as napi-rs names platforms. */
function platformOf(triple) {
  const [arch, , os, abi] = triple.split('-');
  const cpu = { x86_64: 'x64', aarch64: 'arm64' }[arch];
  if (!cpu || os !== 'linux' || !['gnu', 'musl'].includes(abi)) throw new Error(`no platform name for ${triple}`);
  return `${os}-${cpu}-${abi}`;
}

const env = { ...process.env };
if (profile === 'dev') {
  // Checked, not shipped: without debug information it builds faster and packs small.
  env.CARGO_PROFILE_DEV_DEBUG ??= '0';
  env.CARGO_PROFILE_DEV_STRIP ??= 'symbols';
}
for (const triple of targets.filter((t) => t.endsWith('-musl'))) {
  env[`CARGO_TARGET_${triple.toUpperCase().replaceAll('-', '_')}_RUSTFLAGS`] = '-C target-feature=-crt-static';
}
const args = ['zigbuild', '--lib', '--profile', profile, ...targets.flatMap((t) => ['--target', t])];
console.log(`cargo ${args.join(' ')}`);
const started = Date.now();
const build = spawnSync('cargo', args, { cwd: root, env, stdio: 'inherit' });
if (build.status !== 0) {
  console.error(`cross build failed (${build.signal ?? `exit ${build.status}`})`);
  process.exit(1);
}
const metadata = JSON.parse(spawnSync('cargo', ['metadata', '--no-deps', '--format-version', '1'], { cwd: root, env, encoding: 'utf8' }).stdout);
const lib = `lib${metadata.packages[0].targets.find((t) => t.kind.includes('cdylib')).name.replaceAll('-', '_')}.so`;
for (const triple of targets) {
  const to = path.join(root, `${pkg.napi.binaryName}.${platformOf(triple)}.node`);
  copyFileSync(path.join(metadata.target_directory, triple, profileDir, lib), to);
  console.log(`${triple} -> ${path.basename(to)}`);
}
console.log(`built ${targets.length} targets in ${((Date.now() - started) / 1000).toFixed(0)} s`);
