// The serialisable config handed to the Rust engine (deserialised there with deny_unknown_fields
// by src/config/mod.rs). Internal: not exported from the package.
export interface INativeConfig {
  routes: INativeRoute[];
  options: INativeOptions;
}

export interface INativeOptions {
  initialDataTimeoutMs: number;
  socketTimeoutMs: number;
  inactivityTimeoutMs: number;
  maxConnectionLifetimeMs: number;
  gracefulShutdownTimeoutMs: number;
  maxConnectionsPerIp: number;
  connectionRateLimitPerMinute: number;
  noDelay: boolean;
  keepAlive: boolean;
  keepAliveInitialDelayMs: number;
  maxPendingDataSize: number;
  workerThreads: number | null;
  enableDetailedLogging: boolean;
  /** A `logger` function receives the log (otherwise standard error does). */
  logger: boolean;
  maxHeaderSize: number;
  headerTimeoutMs: number;
  http2MaxConcurrentStreams: number;
  jsCallTimeoutMs: number;
  acceptProxyProtocol: boolean;
  proxyIps: string[];
  /** 0 = none, 1 = v1, 2 = v2. */
  sendProxyProtocol: number;
  /**
   * Shared state across replicas (affinity, certificates, ACME challenges, rate limits);
   * `keyPrefix` defaults to 'smartproxy:'. `encryptionKey` is canonical padded base64 of 32 bytes
   * (AES-256-GCM for private keys in Redis), null without one; `syncIntervalMs` defaults to 5000.
   */
  redis: { url: string; keyPrefix: string; encryptionKey: string | null; syncIntervalMs: number } | null;
  defaultSecurity: { ipAllowList: string[]; ipBlockList: string[] };
  /** Keep a client's own X-Forwarded-*, Forwarded and X-Real-IP when its peer is in proxyIps. */
  trustForwardedHeaders: boolean;
  /** Idle time allowed between HTTP requests on a client connection. */
  httpKeepAliveTimeoutMs: number;
  /** `metrics.prometheus`, with its defaults filled in. */
  prometheus: { port: number; host: string; path: string } | null;
  /** `admin`, with its default host. */
  admin: { port: number; host: string; token: string | null } | null;
  /** `accessLog` when enabled: `path` null for standard output. */
  accessLog: { path: string | null; format: 'json' | 'combined' } | null;
}

export interface INativeRoute {
  /** Position in the user's routes array (disabled routes keep their slot). */
  index: number;
  name: string | null;
  id: string | null;
  priority: number;
  match: {
    ports: number[];
    domains: string[];
    clientIp: string[];
    tlsVersion: string[];
    path: string | null;
    headers: INativeHeaderMatch[];
    /** Which traffic the route takes ('tcp' unless the route says otherwise). */
    transport: 'tcp' | 'udp' | 'all';
  };
  action: {
    tls: INativeTls | null;
    targets: INativeTarget[];
    connectTimeoutMs: number | null;
    responseTimeoutMs: number | null;
    websocket: boolean;
    /** `action.websocket` in milliseconds and bytes; all null: a plain byte tunnel. */
    websocketOptions: { pingIntervalMs: number | null; pingTimeoutMs: number | null; maxPayloadSize: number | null };
    backendProtocol: 'auto' | 'http1' | 'http2' | 'http3';
    raw: boolean;
    retry: INativeRetry | null;
    nativeResponse: INativeResponse | null;
    /** Registry id of the `socketHandler` function (type 'socket-handler' without a native equivalent). */
    socketHandler: number | null;
    /**
     * Registry id of the `datagramHandler` function of a 'socket-handler' route taking UDP
     * (`match.transport` 'udp' or 'all'); null for every other route.
     */
    datagramHandler: number | null;
    /** 0 = none, 1 = v1, 2 = v2, null = the option's. */
    sendProxyProtocol: number | null;
    loadBalancing: INativeLoadBalancing;
    /** Forward the normalised path (the one matching saw) instead of the path as sent. */
    normalizePath: boolean;
    /** `forwardingEngine: 'nftables'`: the kernel forwards the route's flows. */
    kernel: INativeKernel | null;
    /** `action.udp` with its defaults when `match.transport` is 'udp' or 'all'; null for TCP-only routes. */
    udp: INativeUdp | null;
    /** `action.http3` when enabled (the route's ports also take QUIC on UDP); null when absent or disabled. */
    http3: INativeHttp3 | null;
  };
  security: {
    ipAllowList: string[];
    ipBlockList: string[];
    maxConnections: number | null;
    rateLimit: INativeRateLimit | null;
    basicAuth: INativeBasicAuth | null;
    jwtAuth: INativeJwtAuth | null;
    forwardAuthorization: boolean;
  };
  headers: INativeHeaderTemplates;
}

/** How a route taking UDP keeps its flows (client address and port ↔ one upstream socket). */
export interface INativeUdp {
  /** A flow idle this long either way is closed (at least 1000). */
  sessionTimeoutMs: number;
  /** Flows one client IP may hold open on the route. */
  maxSessionsPerIp: number;
  /** Larger datagrams are dropped (1-65535). */
  maxDatagramSize: number;
}

/** HTTP/3 on a route whose TLS ends in the proxy: its ports also take QUIC (UDP). */
export interface INativeHttp3 {
  /** Alt-Svc ma= in seconds */
  altSvcMaxAge: number;
}

/** `action.nftables` of a kernel-forwarded route, with its defaults. */
export interface INativeKernel {
  protocol: 'tcp' | 'udp' | 'all';
  preserveSourceIp: boolean;
  /** `10mbps`, `5000pps`, … (checked by the engine). */
  maxRate: string | null;
  priority: number;
}

export interface INativeRateLimit {
  maxRequests: number;
  windowSeconds: number;
  keyBy: 'ip' | 'path' | 'header';
  headerName: string | null;
  errorMessage: string;
  /** Keys tracked at most (least recently used evicted first). */
  maxKeys: number;
}

export interface INativeBasicAuth {
  users: Array<{ username: string; password: string }>;
  realm: string;
  excludePaths: string[];
}

export interface INativeJwtAuth {
  secret: string;
  algorithm: string;
  issuer: string | null;
  audience: string | null;
  excludePaths: string[];
  leewaySeconds: number;
  /** A token without `exp` is refused unless this is false. */
  requireExp: boolean;
}

export interface INativeRetry {
  maxRetries: number;
  onConnectFailure: boolean;
  on5xx: boolean;
  onTimeout: boolean;
  backoffMs: number;
}

/** A response the engine writes itself (the native side of SocketHandlers.httpRedirect/httpResponse/httpBlock). */
export type INativeResponse =
  | { kind: 'redirect'; location: string; status: number }
  | { kind: 'response'; status: number; headers: INativeNameValue[]; body: string }
  | { kind: 'block'; status: number; message: string };

export interface INativeTls {
  mode: 'passthrough' | 'terminate' | 'terminate-and-reencrypt';
  certificate: { key: string; cert: string; ca: string | null } | null;
  versions: string[];
  rejectUnauthorized: boolean;
  /** `certificate: 'auto'`: the merged ACME settings (then `certificate` is null). */
  acme: INativeAcme | null;
}

export interface INativeAcme {
  /** The route's name (or first domain): its folder in the store, its status key. */
  certName: string;
  domains: string[];
  email: string;
  directoryUrl: string;
  directoryCaFile: string | null;
  /** Absolute. */
  certificateStore: string;
  port: number;
  renewThresholdDays: number;
  autoRenew: boolean;
  renewCheckIntervalSecs: number;
  customProvisioning: boolean;
}

/** A header name with a value: a template (rewriting) or a header of a response the engine writes. */
export interface INativeNameValue {
  name: string;
  value: string;
}

/** One `match.headers` entry: exactly one of an exact `value` and a RegExp (`source`, `flags`). */
export interface INativeHeaderMatch {
  name: string;
  value: string | null;
  regex: { source: string; flags: string } | null;
}

/**
 * A target's own `tls`: the proxy's connection to that target only, replacing the route's
 * settings whole. 'terminate-and-reencrypt': TLS to the target; 'terminate': plain.
 */
export interface INativeTargetTls {
  mode: 'terminate' | 'terminate-and-reencrypt';
  /** Trusted for the target besides the system roots (`certificate.ca`). */
  ca: string | null;
  versions: string[];
  rejectUnauthorized: boolean;
}

export interface INativeHeaderTemplates {
  request: INativeNameValue[];
  response: INativeNameValue[];
}

export interface INativeTarget {
  /** Empty when `hostFunction` chooses. */
  hosts: string[];
  /** Registry id of a `host` function. */
  hostFunction: number | null;
  /** `{ function: id }`: a `port` function chooses. */
  port: number | 'preserve' | { function: number };
  matchPorts: number[] | null;
  matchPath: string | null;
  matchHeaders: INativeHeaderMatch[];
  matchMethods: string[] | null;
  priority: number;
  headers: INativeHeaderTemplates;
  /** Share of picks under load balancing (1 to 1000). */
  weight: number;
  /** Null: the route's TLS towards its targets. */
  tls: INativeTargetTls | null;
  /** 0 = none, 1 = v1, 2 = v2, null = the route's. */
  sendProxyProtocol: number | null;
}

export interface INativeLoadBalancing {
  algorithm: 'round-robin' | 'least-connections' | 'ip-hash';
  healthCheck: { path: string; intervalMs: number; timeoutMs: number; unhealthyThreshold: number; healthyThreshold: number } | null;
  /** `maxKeys`: bindings kept in memory at most (least recently used evicted first). */
  affinity: { key: string; ttlSeconds: number; rejectUnknown: boolean; maxKeys: number } | null;
}
