// The public SmartProxy class: validates and normalises options (synchronously, in the
// constructor), drives the native engine, and keeps the Node process alive while started.
import { EventEmitter } from 'node:events';

import { NativeEngine } from './native.js';
import { createMetrics } from './metrics.js';
import type { IMetrics, ISmartProxyOptions, IStatistics } from './models/options.js';
import type { IRouteConfig } from './models/route-types.js';
import type { INativeConfig } from './models/native-config.js';
import { normalizeOptions, SmartProxyConfigError } from './utils/normalize-options.js';

// A timer this long never fires; it only holds the event loop open while the proxy runs, because
// the engine's own threads do not.
const KEEP_ALIVE_INTERVAL_MS = 2 ** 30;

export class SmartProxy extends EventEmitter {
  public settings: ISmartProxyOptions;
  private readonly engine: NativeEngine;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  /** Serialises route updates: each waits for the previous one. */
  private routeUpdates: Promise<void> = Promise.resolve();

  constructor(options: ISmartProxyOptions) {
    super();
    const config = normalizeAndWarn(options);
    this.settings = options;
    this.engine = createEngine(config);
  }

  /** Binds every route port (all or none) and starts proxying. */
  public async start(): Promise<void> {
    try {
      await this.engine.start();
    } catch (err) {
      throw withErrnoCode(err);
    }
    this.keepAliveTimer ??= setInterval(() => undefined, KEEP_ALIVE_INTERVAL_MS);
  }

  /** Stops accepting, lets open connections finish within `gracefulShutdownTimeout`, then closes. */
  public async stop(): Promise<void> {
    try {
      await this.routeUpdates;
      await this.engine.stop();
    } finally {
      if (this.keepAliveTimer !== undefined) {
        clearInterval(this.keepAliveTimer);
        this.keepAliveTimer = undefined;
      }
    }
  }

  /** Swaps the routes atomically; calls are applied one after another in call order. */
  public updateRoutes(routes: IRouteConfig[]): Promise<void> {
    const next = this.routeUpdates.then(async () => {
      const options = { ...this.settings, routes };
      const config = normalizeAndWarn(options);
      try {
        await this.engine.updateRoutes(config);
      } catch (err) {
        throw withErrnoCode(asConfigError(err));
      }
      this.settings = options;
    });
    // A failed update must not poison the ones queued after it.
    this.routeUpdates = next.catch(() => undefined);
    return next;
  }

  public async addListeningPort(port: number): Promise<void> {
    try {
      await this.engine.addListeningPort(port);
    } catch (err) {
      throw withErrnoCode(err);
    }
  }

  public async removeListeningPort(port: number): Promise<void> {
    await this.engine.removeListeningPort(port);
  }

  public getListeningPorts(): number[] {
    return this.engine.listeningPorts();
  }

  public getStatistics(): IStatistics {
    return this.engine.statistics() as IStatistics;
  }

  public getMetrics(): IMetrics {
    return createMetrics(this.engine);
  }
}

function normalizeAndWarn(options: ISmartProxyOptions): INativeConfig {
  const { config, warnings } = normalizeOptions(options);
  for (const warning of warnings) {
    process.emitWarning(warning, { code: 'SMARTPROXY_CONFIG' });
  }
  return config;
}

function createEngine(config: INativeConfig): NativeEngine {
  try {
    return new NativeEngine(config);
  } catch (err) {
    throw asConfigError(err);
  }
}

/** The engine's own config checks (patterns, ports) surface as the wrapper's config errors. */
function asConfigError(err: unknown): unknown {
  if (err instanceof Error && (err as NodeJS.ErrnoException).code === 'InvalidArg') {
    const routePath = /^(routes\[\d+\](?: "[^"]*")?|options)/.exec(err.message);
    return new SmartProxyConfigError(err.message, routePath?.[1] ?? '');
  }
  return err;
}

/** `EADDRINUSE: port 80 is already in use` gets `code: 'EADDRINUSE'` and `port: 80`, as Node's own. */
function withErrnoCode(err: unknown): unknown {
  if (err instanceof Error) {
    const match = /^(E[A-Z]+): .*?port (\d+)/.exec(err.message);
    if (match) {
      const errno = err as NodeJS.ErrnoException & { port?: number };
      errno.code = match[1];
      errno.port = Number(match[2]);
    }
  }
  return err;
}
