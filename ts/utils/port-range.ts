// Port helpers shared by validation and the route helpers.
import type { TPortRange } from '../models/route-types.js';

export function isValidPort(port: unknown): port is number {
  return typeof port === 'number' && Number.isInteger(port) && port >= 1 && port <= 65535;
}

/** Every port of a range spec, unique and ascending. Assumes a valid spec (see validation). */
export function expandPortRange(range: TPortRange): number[] {
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
