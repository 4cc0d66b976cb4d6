// HTTP/3 to the backends (API.md "HTTP/3, QUIC and UDP"): `action.options.backendProtocol: 'http3'`
// speaks QUIC, which is always TLS, to the route's targets. Both validators run this check
// (normalizeOptions fails on the first problem, validateRouteConfig lists them all), so they refuse
// the same routes in the same words as the engine does.
import { isRecord, type TRecord } from './check-values.js';

export interface IHttp3BackendCheck {
  /** Each problem with the field it is about (`action.options.backendProtocol`, `action.targets[1].sendProxyProtocol`, ...), in the order found. */
  problems: Array<{ field: string; reason: string }>;
}

/**
 * Whether the proxy speaks TLS to a target: the target's own `tls` wins over the route's
 * ('terminate-and-reencrypt' = TLS to it, 'terminate' = plain); without one, the route's
 * `action.tls.mode` 'terminate-and-reencrypt' means TLS to the targets, anything else plain. null
 * when a `tls` of the wrong shape or an unknown mode decides it: the TLS checks report those.
 */
function tlsToTarget(target: TRecord, routeTls: unknown): boolean | null {
  if (target.tls !== undefined) {
    if (!isRecord(target.tls)) return null;
    if (target.tls.mode === 'terminate-and-reencrypt') return true;
    if (target.tls.mode === 'terminate') return false;
    return null;
  }
  if (routeTls === undefined) return false;
  if (!isRecord(routeTls)) return null;
  if (routeTls.mode === 'terminate-and-reencrypt') return true;
  if (routeTls.mode === 'terminate' || routeTls.mode === 'passthrough') return false;
  return null;
}

/**
 * The problems of a route speaking HTTP/3 to its targets (`action.options.backendProtocol`
 * 'http3'): a target reached in plain (QUIC is TLS), and a target's own `sendProxyProtocol` (a
 * PROXY header goes first on a TCP connection; QUIC has none). `action` is the route's as the user
 * wrote it (never changed); `defaultTarget` the `defaults.target` a forward route without targets
 * takes (normalizeOptions only). Values of the wrong shape are left to the other checks.
 */
export function checkHttp3Backend(action: unknown, defaultTarget?: unknown): IHttp3BackendCheck {
  const problems: IHttp3BackendCheck['problems'] = [];
  const a = isRecord(action) ? action : {};
  const options = isRecord(a.options) ? a.options : {};
  // A 'socket-handler' route's targets are ignored: it has no upstream to speak HTTP/3 to.
  if (options.backendProtocol !== 'http3' || a.type === 'socket-handler') return { problems };
  const targets: Array<[unknown, string]> = Array.isArray(a.targets)
    ? a.targets.map((t: unknown, i: number): [unknown, string] => [t, `action.targets[${i}]`])
    : a.target !== undefined
      ? [[a.target, 'action.target']]
      : defaultTarget !== undefined && a.targets === undefined
        ? [[defaultTarget, 'defaults.target']]
        : [];
  for (const [t, field] of targets) {
    if (!isRecord(t)) continue;
    if (tlsToTarget(t, a.tls) === false) {
      problems.push({
        field: 'action.options.backendProtocol',
        reason: `'http3' speaks QUIC, which is TLS, to the targets: ${field} is plain (use action.tls.mode 'terminate-and-reencrypt', or the target's tls)`,
      });
    }
    // `false` writes no header; values other than true, 1 and 2 are the PROXY protocol check's.
    if (t.sendProxyProtocol === true || t.sendProxyProtocol === 1 || t.sendProxyProtocol === 2) {
      problems.push({ field: `${field}.sendProxyProtocol`, reason: 'a PROXY header goes first on a TCP connection: HTTP/3 targets have none' });
    }
  }
  return { problems };
}
