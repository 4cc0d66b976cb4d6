// The route types of the public API (API.md "Routes"): what users write in `routes`.
import type * as net from 'node:net';
import type { IAcmeOptions } from './options.js';

/** A port, a list of ports, or ranges (`{ from, to }`, inclusive). */
export type TPortRange = number | Array<number | { from: number; to: number }>;

export type TTlsMode = 'passthrough' | 'terminate' | 'terminate-and-reencrypt';

/** What a connection or request is known by when a route's functions and handlers run. */
export interface IRouteContext {
  port: number;
  domain?: string;
  clientIp: string;
  serverIp: string;
  /** HTTP only. */
  path?: string;
  query?: string;
  headers?: Record<string, string>;
  isTls: boolean;
  tlsVersion?: string;
  routeName?: string;
  routeId?: string;
  targetHost?: string | string[];
  targetPort?: number;
  timestamp: number;
  connectionId: string;
}

export type TSocketHandler = (socket: net.Socket, context: IRouteContext) => void | Promise<void>;

/** Which traffic a route takes: TCP connections, UDP datagrams, or both on the same ports. */
export type TTransport = 'tcp' | 'udp' | 'all';

/** What a `datagramHandler` is told about a datagram. */
export interface IDatagramInfo {
  clientIp: string;
  clientPort: number;
  /** The port the datagram arrived on. */
  port: number;
  routeName?: string;
}

/**
 * A `socket-handler` route's handler of UDP datagrams (API.md "HTTP/3, QUIC and UDP"), called for
 * every datagram a client sends to the route's ports. `reply` sends a datagram back to that client
 * from the port it arrived on, now or later, as often as needed, while the client's flow lives
 * (`action.udp.sessionTimeout` without a datagram either way ends it; a reply then goes nowhere).
 * `reply` takes a Buffer (or Uint8Array) and throws a TypeError for anything else. A handler that
 * throws or rejects is reported as an `'error'` event (code `DATAGRAM_HANDLER_FAILED`); the route
 * goes on serving.
 */
export type TDatagramHandler = (datagram: Buffer, info: IDatagramInfo, reply: (data: Buffer) => void) => void | Promise<void>;

/** (ext) `action.udp`: how a UDP route keeps its flows (client address and port ↔ one upstream socket). */
export interface IRouteUdp {
  /** ms a flow may go without a datagram either way before it is closed; default 60000, at least 1000. */
  sessionTimeout?: number;
  /** Flows one client IP may hold open on this route; default 1000. */
  maxSessionsPerIP?: number;
  /** Largest datagram relayed, in bytes (1-65535); larger ones are dropped. Default 65535. */
  maxDatagramSize?: number;
}

/**
 * (ext) `action.http3`: HTTP/3 (QUIC) beside HTTP/1.1 and HTTP/2 on a route whose TLS ends in the
 * proxy (`tls.mode` 'terminate' or 'terminate-and-reencrypt'). The engine also listens on UDP on
 * the route's ports, with the route's certificate, and routes HTTP/3 requests as it routes the
 * others; HTTP/1.1 and HTTP/2 responses of the route advertise it (`Alt-Svc: h3=":<port>"`).
 */
export interface IRouteHttp3 {
  /** Serve HTTP/3 on the route's ports (UDP). */
  enabled: boolean;
  /** Seconds clients may remember the `Alt-Svc` advertisement (its `ma=`); default 86400. */
  altSvcMaxAge?: number;
}

export interface IRouteMatch {
  /** Required: the ports this route listens on. */
  ports: TPortRange;
  /** `'*.example.com'`, `'example.*'`, `'*'`; case-insensitive, trailing dot ignored. */
  domains?: string | string[];
  /** `/api` (exact), `/api/*` or `/api/` (prefix), `/users/:id` (parameter). */
  path?: string;
  /** Exact, glob `'192.168.*'`, CIDR `'10.0.0.0/8'`, IPv6; `::ffff:a.b.c.d` equals `a.b.c.d`. */
  clientIp?: string[];
  /** `'TLSv1.2'` | `'TLSv1.3'`. */
  tlsVersion?: string[];
  /**
   * Case-insensitive names. A string value must equal the header's value; a RegExp is tested
   * against it (flags `i`, `m`, `s`, `u` as in JavaScript; no lookaround or backreferences).
   * A header sent more than once fits when one of its values does.
   */
  headers?: Record<string, string | RegExp>;
  /**
   * (ext) `'tcp'` (default): connections; `'udp'`: datagrams, relayed per flow by a `forward`
   * route or handed to a `socket-handler` route's `datagramHandler`; `'all'`: both on the route's ports. UDP carries no domain, path, headers or TLS version
   * to match, so a route taking UDP sets none of those, except `domains` on a route with
   * `action.tls.mode` 'passthrough': it routes QUIC by the SNI of the client's Initial packets,
   * untouched (and, with 'all', TLS over TCP by its ClientHello).
   */
  transport?: TTransport;
}

export interface IRouteTls {
  mode: TTlsMode;
  certificate?: 'auto' | { key: string; cert: string; ca?: string };
  /** Per-route ACME: the global `acme` options for this route, plus the original's spellings. */
  acme?: Omit<IAcmeOptions, 'email'> & {
    email: string;
    /** Alias of `port`. */
    challengePort?: number;
    /** Alias of `renewThresholdDays`. */
    renewBeforeDays?: number;
  };
  versions?: string[];
  /** Upstream verification on re-encrypt (default true). (ext) */
  rejectUnauthorized?: boolean;
}

export interface IRouteTarget {
  host: string | string[] | ((context: IRouteContext) => string | string[] | Promise<string | string[]>);
  port: number | 'preserve' | ((context: IRouteContext) => number | Promise<number>);
  match?: { ports?: number[]; path?: string; headers?: Record<string, string | RegExp>; method?: string[] };
  /** Among targets: the highest-priority matching target wins, else the one without `match`. */
  priority?: number;
  /** (ext) Share of new connections or requests under load balancing (default 1). */
  weight?: number;
  /**
   * The proxy's connection to this target, instead of the route's settings (replaced whole: what
   * is left out takes its default, not the route's). `'terminate-and-reencrypt'`: TLS to this
   * target, verified unless `rejectUnauthorized: false`, trusting `certificate.ca` besides the
   * system roots, offering `versions`; `'terminate'`: plain. The TLS clients see stays the route's;
   * `'passthrough'` is refused, and so is any target `tls` on a passthrough or raw route. On a
   * plain route, a re-encrypting target makes the route serve HTTP (its requests go out over TLS).
   */
  tls?: IRouteTls | { mode: 'terminate' | 'terminate-and-reencrypt'; certificate?: { ca: string }; versions?: string[]; rejectUnauthorized?: boolean };
  headers?: { request?: Record<string, string>; response?: Record<string, string> };
  /** PROXY header towards this target; overrides the route's and the option's. */
  sendProxyProtocol?: boolean | 1 | 2;
}

export interface IRouteSecurity {
  ipAllowList?: string[];
  ipBlockList?: string[];
  /** Concurrent connections on this route. */
  maxConnections?: number;
  rateLimit?: {
    enabled: boolean;
    maxRequests: number;
    /** Seconds. */
    window: number;
    keyBy?: 'ip' | 'path' | 'header';
    headerName?: string;
    errorMessage?: string;
    /** (ext) Keys (clients, paths or header values) tracked in memory at most, least recently used evicted first; default 100000. */
    maxKeys?: number;
  };
  basicAuth?: {
    enabled: boolean;
    users: Array<{ username: string; password: string }>;
    realm?: string;
    excludePaths?: string[];
  };
  jwtAuth?: {
    enabled: boolean;
    secret: string;
    algorithm?: string;
    issuer?: string;
    audience?: string;
    excludePaths?: string[];
    /** (ext) Refuse tokens without `exp` (default true). */
    requireExp?: boolean;
  };
  /** (ext) Pass the `Authorization` header basicAuth/jwtAuth checked on to the backend (default false). */
  forwardAuthorization?: boolean;
}

export interface IRouteAction {
  type: 'forward' | 'socket-handler';
  /** 21.x form. */
  targets?: IRouteTarget[];
  /** 19.x form: normalised to `targets: [target]`. */
  target?: IRouteTarget;
  tls?: IRouteTls;
  /** TCP connections of a `socket-handler` route: needed unless `match.transport` is 'udp' (where it is refused). */
  socketHandler?: TSocketHandler;
  /**
   * UDP datagrams of a `socket-handler` route: needed when `match.transport` is 'udp' (instead of
   * `socketHandler`) or 'all' (beside it); refused on routes taking TCP only.
   */
  datagramHandler?: TDatagramHandler;
  /** (ext) Flow settings of a route whose `match.transport` is 'udp' or 'all' (refused on a TCP-only route). */
  udp?: IRouteUdp;
  /**
   * (ext) HTTP/3 on the route's ports (UDP) beside its TCP listener. Needs `tls.mode` 'terminate'
   * or 'terminate-and-reencrypt', a `forward` route, and `match.transport` 'tcp' (the default).
   */
  http3?: IRouteHttp3;
  /**
   * WebSocket upgrades, proxied unless `enabled` is false. `pingInterval` (ms): the proxy pings the
   * client between the backend's frames, and closes it (status 1001) when no pong comes within
   * `pingTimeout` (ms, default 10000). `maxPayloadSize` (bytes): a client message larger than this
   * (its frames' payloads, as sent) closes the tunnel with status 1009.
   */
  websocket?: { enabled?: boolean; pingInterval?: number; pingTimeout?: number; maxPayloadSize?: number };
  loadBalancing?: {
    algorithm?: 'round-robin' | 'least-connections' | 'ip-hash';
    healthCheck?: { path: string; interval: number; timeout: number; unhealthyThreshold: number; healthyThreshold: number };
    /** (ext) Sticky sessions; `maxKeys` bindings at most in memory (default 100000), least recently used evicted first. */
    affinity?: { key: 'ip' | `header:${string}` | `cookie:${string}`; ttlSeconds?: number; onUnknown?: 'assign' | 'reject'; maxKeys?: number };
  };
  /**
   * `'nftables'`: the kernel forwards the route's flows (DNAT in a table the engine owns); where it
   * cannot (no nft, no CAP_NET_ADMIN) the Rust core relays them, after one warning.
   */
  forwardingEngine?: 'node' | 'nftables';
  nftables?: { preserveSourceIP?: boolean; protocol?: 'tcp' | 'udp' | 'all'; maxRate?: string; priority?: number };
  /**
   * `backendProtocol`: what the proxy speaks to the targets. `'auto'` (default) HTTP/2 where TLS
   * to the target negotiates it by ALPN, HTTP/1.1 otherwise; `'http1'`; `'http2'` (h2c on plain
   * targets). `'http3'`: HTTP/3 over QUIC to the target's port over UDP, so TLS is required to
   * every target (`tls.mode` 'terminate-and-reencrypt' on the route, or the target's own `tls`;
   * a plain target, or a target's own `sendProxyProtocol`, is a config error); WebSocket upgrades
   * still use HTTP/1.1 (over TCP). `raw`: (ext) relay bytes as they come, even HTTP traffic.
   */
  options?: { backendProtocol?: 'auto' | 'http1' | 'http2' | 'http3'; raw?: boolean };
  sendProxyProtocol?: boolean | 1 | 2;
  /** (ext) */
  retry?: { maxRetries?: number; onConnectFailure?: boolean; on5xx?: boolean; onTimeout?: boolean; backoffMs?: number };
  /** (ext) */
  timeouts?: { connectMs?: number; responseMs?: number; idleMs?: number };
  /**
   * (ext) Send the backend the normalised path (dot segments removed, unreserved characters
   * decoded, slashes merged: the path matching saw) instead of the path as the client sent it.
   * Default false.
   */
  normalizePath?: boolean;
  /** Also accepted here; `route.security` wins. */
  security?: IRouteSecurity;
}

export interface IRouteConfig {
  id?: string;
  name?: string;
  description?: string;
  tags?: string[];
  /** Higher first; default 0; equal priority keeps array order. */
  priority?: number;
  /** `false`: the route is ignored. */
  enabled?: boolean;
  match: IRouteMatch;
  action: IRouteAction;
  security?: IRouteSecurity;
  headers?: { request?: Record<string, string>; response?: Record<string, string> };
}
