// `match.headers` values (API.md "Matching": string values exact, RegExp values tested) as the
// engine takes them. The engine compiles a RegExp with Rust's regex crate, which has no lookaround
// and no backreferences: both validators refuse those here in one wording, and the engine refuses
// anything else it cannot compile when the proxy is constructed.
import type { INativeHeaderMatch } from '../models/native-config.js';

/** Why the engine cannot run `re`, when this can tell without the engine; else undefined. */
export function headerRegExpProblem(re: RegExp): string | undefined {
  const source = re.source;
  let inClass = false;
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (c === '\\') {
      const next = source[i + 1] ?? '';
      if (!inClass && (/[1-9]/.test(next) || (next === 'k' && source[i + 2] === '<'))) {
        return `${String(re)} is not supported by the engine's regex matcher: backreferences (\\1, \\k<name>) are not supported`;
      }
      i++;
    } else if (inClass) {
      if (c === ']') inClass = false;
    } else if (c === '[') {
      inClass = true;
    } else if (c === '(' && source[i + 1] === '?') {
      const kind = source.slice(i + 2, i + 4);
      if (kind.startsWith('=') || kind.startsWith('!') || kind === '<=' || kind === '<!') {
        return `${String(re)} is not supported by the engine's regex matcher: lookaround ((?=, (?!, (?<=, (?<!) is not supported`;
      }
    }
  }
  return undefined;
}

/** The engine's form of one header matcher (the value already checked to be a string or a RegExp). */
export function nativeHeaderMatch(name: string, value: string | RegExp): INativeHeaderMatch {
  return typeof value === 'string'
    ? { name, value, regex: null }
    : { name, value: null, regex: { source: value.source, flags: value.flags } };
}
