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
  maxHeaderSize: number;
  headerTimeoutMs: number;
  http2MaxConcurrentStreams: number;
  defaultSecurity: { ipAllowList: string[]; ipBlockList: string[] };
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
    headers: INativeNameValue[];
  };
  action: {
    tls: INativeTls | null;
    targets: INativeTarget[];
    connectTimeoutMs: number | null;
    responseTimeoutMs: number | null;
    websocket: boolean;
    backendProtocol: 'auto' | 'http1' | 'http2';
    raw: boolean;
    retry: INativeRetry | null;
    nativeResponse: INativeResponse | null;
  };
  security: { ipAllowList: string[]; ipBlockList: string[]; maxConnections: number | null };
  headers: INativeHeaderTemplates;
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
}

/** A header name with an exact value (matching) or a template (rewriting). */
export interface INativeNameValue {
  name: string;
  value: string;
}

export interface INativeHeaderTemplates {
  request: INativeNameValue[];
  response: INativeNameValue[];
}

export interface INativeTarget {
  hosts: string[];
  port: number | 'preserve';
  matchPorts: number[] | null;
  matchPath: string | null;
  matchHeaders: INativeNameValue[];
  matchMethods: string[] | null;
  priority: number;
  headers: INativeHeaderTemplates;
}
