#!/usr/bin/env node
// `node scripts/pack.mjs [outDir]`: the npm tarballs as napi-rs projects publish them. One package
// per platform (npm/<platform>/: its package.json and README, plus the `smartproxy.<platform>.node`
// built into the repository root by `napi build --platform [--target …]`), and the main package,
// whose package.json gains `optionalDependencies` on every platform package of `napi.targets` at its
// own version (what `napi pre-publish` adds at publish time): npm installs the one whose os, cpu and
// libc match, and the generated loader (index.js) requires it. Platforms without a built binary are
// skipped and named. Prints one JSON line: { main, platforms: { <platform>: tarball }, missing }.
// Nothing in the repository is modified: everything is staged under outDir (default target/pack).
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const outDir = path.resolve(process.argv[2] ?? path.join(root, 'target', 'pack'));
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
const binaryName = pkg.napi.binaryName;

rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });

/** `npm pack` of a staged directory into outDir; the tarball's path. */
function pack(dir) {
  const out = execFileSync('npm', ['pack', '--json', '--pack-destination', outDir], { cwd: dir, encoding: 'utf8' });
  const [{ filename }] = JSON.parse(out);
  return path.join(outDir, filename);
}

const platforms = {};
const missing = [];
const optionalDependencies = {};
for (const platform of readdirSync(path.join(root, 'npm')).sort()) {
  const dir = path.join(root, 'npm', platform);
  const manifest = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8'));
  if (manifest.version !== pkg.version) throw new Error(`npm/${platform}/package.json is at ${manifest.version}, the package at ${pkg.version}: run napi version`);
  optionalDependencies[manifest.name] = pkg.version;
  const binary = path.join(root, `${binaryName}.${platform}.node`);
  if (!existsSync(binary)) {
    missing.push(platform);
    continue;
  }
  const staged = path.join(outDir, 'stage', platform);
  mkdirSync(staged, { recursive: true });
  for (const file of readdirSync(dir)) cpSync(path.join(dir, file), path.join(staged, file));
  cpSync(binary, path.join(staged, path.basename(binary)));
  platforms[platform] = pack(staged);
}

const staged = path.join(outDir, 'stage', 'main');
mkdirSync(staged, { recursive: true });
for (const entry of [...pkg.files, 'README.md']) {
  const from = path.join(root, entry);
  if (!existsSync(from)) throw new Error(`${entry} is missing: build first (pnpm build)`);
  cpSync(from, path.join(staged, entry), { recursive: true });
}
const { devDependencies, scripts, ...published } = pkg;
writeFileSync(path.join(staged, 'package.json'), `${JSON.stringify({ ...published, optionalDependencies }, null, 2)}\n`);
const main = pack(staged);
rmSync(path.join(outDir, 'stage'), { recursive: true, force: true });
console.log(JSON.stringify({ main, platforms, missing }));
