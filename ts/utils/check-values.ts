// What the shared route checks (udp-route, http3-route, http3-backend) need to look at values a
// user wrote: whether one is a plain object, and how to show one in a refusal.

export type TRecord = Record<string, unknown>;

/** A plain object (not null, not an array). */
export const isRecord = (v: unknown): v is TRecord => typeof v === 'object' && v !== null && !Array.isArray(v);

/** A value as a refusal quotes it. */
export const show = (v: unknown): string => {
  if (typeof v === 'function') return 'a function';
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  return JSON.stringify(v) ?? String(v);
};

/** The engine holds these settings as u32. */
export const U32_MAX = 4294967295;
