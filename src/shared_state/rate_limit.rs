//! A route's `rateLimit` counted across replicas: one atomic GCRA update per request, a Lua script
//! sent with `EVALSHA` over the pipelined connection (so requests that arrive together share a
//! write), on Redis's clock so that replicas with skewed clocks agree. The script answers as the
//! in-memory limiter does: a fresh key may send `maxRequests` at once, then one more every
//! `window / maxRequests`. After a Redis restart the script cache is empty: the `NOSCRIPT` answer
//! is followed by one `EVAL`, which loads it again.

use std::sync::OnceLock;
use std::time::Duration;

use super::pipeline::CallError;
use super::resp::encode_command;
use super::SharedRedis;

/// KEYS[1]: the key; ARGV[1]: the period, ARGV[2]: the burst, both in microseconds. Answers "0"
/// when admitted, else the microseconds to wait. Numbers are formatted with `%.0f`, since Redis
/// would turn a Lua number of 16 digits into exponent notation.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local nxt = tat + period
if nxt > now + burst then
  return string.format('%.0f', nxt - burst - now)
end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000))
return '0'
"#;

fn script_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(GCRA).get_hash().to_string())
}

/// What Redis decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDecision {
    Admitted,
    /// Refused; the request may come back after this long.
    Wait(Duration),
}

impl SharedRedis {
    /// One GCRA update of `<prefix>ratelimit:<namespace><key>`.
    pub async fn rate_limit(&self, namespace: &str, key: &[u8], period: Duration, burst: Duration) -> Result<SharedDecision, CallError> {
        let period_us = period.as_micros().max(1).to_string();
        let burst_us = burst.as_micros().max(1).to_string();
        let prefix = self.prefix();
        let encode = |out: &mut Vec<u8>, by_hash: bool| {
            let mut redis_key = Vec::with_capacity(prefix.len() + 10 + namespace.len() + key.len());
            redis_key.extend_from_slice(prefix.as_bytes());
            redis_key.extend_from_slice(b"ratelimit:");
            redis_key.extend_from_slice(namespace.as_bytes());
            redis_key.extend_from_slice(key);
            let (command, body): (&[u8], &[u8]) = if by_hash { (b"EVALSHA", script_sha().as_bytes()) } else { (b"EVAL", GCRA.as_bytes()) };
            encode_command(out, &[command, body, b"1", &redis_key, period_us.as_bytes(), burst_us.as_bytes()]);
        };
        let pipeline = self.pipeline();
        let mut answer = pipeline.call(|out| encode(out, true)).await;
        if matches!(&answer, Err(CallError::Refused(why)) if why.starts_with("NOSCRIPT")) {
            answer = pipeline.call(|out| encode(out, false)).await;
        }
        self.answered(!matches!(answer, Err(CallError::Unreachable(_) | CallError::TimedOut | CallError::Broken(_) | CallError::Stopped)));
        let text = answer?.ok_or_else(|| CallError::Refused("the rate-limit script answered nil".to_string()))?;
        match text.parse::<u64>() {
            Ok(0) => Ok(SharedDecision::Admitted),
            Ok(wait_us) => Ok(SharedDecision::Wait(Duration::from_micros(wait_us))),
            Err(_) => Err(CallError::Refused(format!("the rate-limit script answered {text:?}"))),
        }
    }
}
