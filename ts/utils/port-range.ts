// Port helpers shared by validation and the route helpers.
import type { TPortRange } from '../models/route-types.js';

/** One `{ from, to }` range of `match.ports` (inclusive). */
export interface IPortRangeItem {
  from: number;
  to: number;
}

/** One port number, an integer from 1 to 65535: what every single-port field takes. */
export function isValidPortNumber(port: unknown): port is number {
  return typeof port === 'number' && Number.isInteger(port) && port >= 1 && port <= 65535;
}

function isValidRange(item: unknown): item is IPortRangeItem {
  if (typeof item !== 'object' || item === null || Array.isArray(item)) return false;
  const { from, to } = item as Partial<Record<'from' | 'to', unknown>>;
  return isValidPortNumber(from) && isValidPortNumber(to) && from <= to;
}

/**
 * A port spec as `match.ports` takes it (the original 21.x helper): a port number, a `{ from, to }`
 * range, or a non-empty array of them. Ranges need valid ends with `from <= to`. Not a type guard:
 * narrowing a `TPortRange` argument would leave `never` on the invalid branch.
 */
export function isValidPort(port: unknown): boolean {
  if (Array.isArray(port)) return port.length > 0 && port.every((item) => isValidPortNumber(item) || isValidRange(item));
  return isValidPortNumber(port) || isValidRange(port);
}

/** Every port of a range spec, unique and ascending. Assumes a valid spec (see validation). */
export function expandPortRange(range: TPortRange | IPortRangeItem): number[] {
  const ports = new Set<number>();
  for (const item of Array.isArray(range) ? range : [range]) {
    if (typeof item === 'number') {
      ports.add(item);
    } else {
      for (let p = item.from; p <= item.to; p++) ports.add(p);
    }
  }
  return [...ports].sort((a, b) => a - b);
}
