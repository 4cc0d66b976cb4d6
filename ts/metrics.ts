// IMetrics over the native engine: every call reads live counters from Rust (no caching), and
// throughput windows are computed there from once-a-second samples.
import type { NativeEngine } from './native.js';
import type { IMetrics } from './models/options.js';

interface IRate {
  in: number;
  out: number;
}

interface INativeMetrics {
  active: number;
  total: number;
  activeByRoute: Record<string, number>;
  activeByIp: Record<string, number>;
  throughput: IRate;
  throughputByRoute: Record<string, IRate>;
  throughputByIp: Record<string, IRate>;
  requestsPerSecond: number;
  requestsPerMinute: number;
  requestsTotal: number;
  bytesIn: number;
  bytesOut: number;
}

const INSTANT_SECONDS = 1;
const RECENT_SECONDS = 10;
const AVERAGE_SECONDS = 60;

export function createMetrics(engine: NativeEngine): IMetrics {
  const read = (windowSeconds: number): INativeMetrics => engine.metrics(windowSeconds) as INativeMetrics;
  const rate = (windowSeconds: number): IRate => {
    const { throughput } = read(windowSeconds);
    return { in: throughput.in, out: throughput.out };
  };
  return {
    connections: {
      active: () => read(INSTANT_SECONDS).active,
      total: () => read(INSTANT_SECONDS).total,
      byRoute: () => new Map(Object.entries(read(INSTANT_SECONDS).activeByRoute)),
      byIP: () => new Map(Object.entries(read(INSTANT_SECONDS).activeByIp)),
      topIPs: (limit = 10) =>
        Object.entries(read(INSTANT_SECONDS).activeByIp)
          .map(([ip, count]) => ({ ip, count }))
          .sort((a, b) => b.count - a.count)
          .slice(0, limit),
    },
    throughput: {
      instant: () => rate(INSTANT_SECONDS),
      recent: () => rate(RECENT_SECONDS),
      average: () => rate(AVERAGE_SECONDS),
      custom: (seconds: number) => rate(seconds),
      history: (seconds: number) => engine.history(seconds) as Array<{ timestamp: number; in: number; out: number }>,
      byRoute: (windowSeconds = INSTANT_SECONDS) => new Map(Object.entries(read(windowSeconds).throughputByRoute)),
      byIP: (windowSeconds = INSTANT_SECONDS) => new Map(Object.entries(read(windowSeconds).throughputByIp)),
    },
    requests: {
      perSecond: () => read(INSTANT_SECONDS).requestsPerSecond,
      perMinute: () => read(AVERAGE_SECONDS).requestsPerMinute,
      total: () => read(INSTANT_SECONDS).requestsTotal,
    },
    totals: {
      bytesIn: () => read(INSTANT_SECONDS).bytesIn,
      bytesOut: () => read(INSTANT_SECONDS).bytesOut,
      connections: () => read(INSTANT_SECONDS).total,
    },
  };
}
