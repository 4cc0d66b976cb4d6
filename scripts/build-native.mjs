// Builds the addon into the repository root: `napi build --platform --esm` with the arguments given
// (`--release`, `--profile fastrel`, ...). Release builds for x86_64 Linux are optimised with the
// committed profile (profile-guided: pgo/x86_64-unknown-linux-gnu.profdata, made by bench/pgo.sh);
// rustc needs its absolute path, which a cargo config file cannot give for every crate.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const profile = join(root, 'pgo', 'x86_64-unknown-linux-gnu.profdata');
const env = { ...process.env };
if (args.includes('--release') && existsSync(profile)) {
  const key = 'CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS';
  env[key] = [env[key], `-Cprofile-use=${profile}`].filter(Boolean).join(' ');
}
const napi = join(root, 'node_modules', '.bin', 'napi');
const built = spawnSync(napi, ['build', '--platform', '--esm', ...args], { cwd: root, env, stdio: 'inherit' });
if (built.error) throw built.error;
process.exit(built.status ?? 1);
