//! A route's `rateLimit` counted across replicas: one atomic GCRA update per request, a Lua script
//! sent with `EVALSHA` over the pipelined connection (so requests that arrive together share a
//! write), on Redis's clock so that replicas with skewed clocks agree. The script answers as the
//! in-memory limiter does: a fresh key may send `maxRequests` at once, then one more every
//! `window / maxRequests`. After a Redis restart the script cache is empty: the `NOSCRIPT` answer
//! is followed by one `EVAL`, which loads it again.

use std::sync::OnceLock;
use std::time::Duration;

use super::pipeline::CallError;
use super::resp::encode_command_of_parts;
use super::SharedRedis;

/// KEYS[1]: the key; ARGV[1]: the period, ARGV[2]: the burst, both in microseconds. Answers nil
/// when admitted (no reply text to allocate for the common case), else the microseconds to wait.
/// Numbers are formatted with `%.0f`, since Redis would turn a Lua number of 16 digits into
/// exponent notation.
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
return false
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

/// A limit's period and burst as the script takes them, formatted once per route table.
#[derive(Debug, Clone)]
pub struct GcraArgs {
    period_us: String,
    burst_us: String,
}

impl GcraArgs {
    /// The burst stays a whole number of periods, as in memory: rounding each to microseconds
    /// apart would let a few more requests through. A period under a microsecond (a billion
    /// requests a second) is counted as one.
    pub fn new(period: Duration, burst: Duration) -> GcraArgs {
        let period_us = period.as_micros();
        let burst_us = if period_us >= 1 { period_us * (burst.as_nanos() / period.as_nanos()) } else { burst.as_micros() };
        GcraArgs { period_us: period_us.max(1).to_string(), burst_us: burst_us.max(1).to_string() }
    }
}

impl SharedRedis {
    /// One GCRA update of `<prefix>ratelimit:<namespace><key>`.
    pub async fn rate_limit(&self, namespace: &str, key: &[u8], args: &GcraArgs) -> Result<SharedDecision, CallError> {
        let prefix = self.prefix().as_bytes();
        let encode = |out: &mut Vec<u8>, by_hash: bool| {
            let (command, body): (&[u8], &[u8]) = if by_hash { (b"EVALSHA", script_sha().as_bytes()) } else { (b"EVAL", GCRA.as_bytes()) };
            let redis_key: &[&[u8]] = &[prefix, b"ratelimit:", namespace.as_bytes(), key];
            encode_command_of_parts(out, &[&[command], &[body], &[b"1"], redis_key, &[args.period_us.as_bytes()], &[args.burst_us.as_bytes()]]);
        };
        let pipeline = self.pipeline();
        let mut answer = pipeline.call(|out| encode(out, true)).await;
        if matches!(&answer, Err(CallError::Refused(why)) if why.starts_with("NOSCRIPT")) {
            answer = pipeline.call(|out| encode(out, false)).await;
        }
        self.answered(!matches!(answer, Err(CallError::Unreachable(_) | CallError::TimedOut | CallError::Broken(_) | CallError::Stopped)));
        match answer? {
            None => Ok(SharedDecision::Admitted),
            Some(text) => match text.parse::<u64>() {
                Ok(wait_us) => Ok(SharedDecision::Wait(Duration::from_micros(wait_us))),
                Err(_) => Err(CallError::Refused(format!("the rate-limit script answered {text:?}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_state::test_redis::local_redis;

    #[tokio::test]
    async fn the_script_admits_the_burst_then_one_per_period_and_survives_a_flushed_script_cache() {
        let (_server, redis) = local_redis().await;
        let period = Duration::from_millis(200);
        let burst = period * 3;
        let args = GcraArgs::new(period, burst);
        for n in 0..3 {
            assert_eq!(redis.rate_limit("r:", b"k", &args).await, Ok(SharedDecision::Admitted), "request {n} of the burst");
        }
        match redis.rate_limit("r:", b"k", &args).await {
            Ok(SharedDecision::Wait(wait)) => assert!(wait > Duration::from_millis(100) && wait <= period, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(redis.rate_limit("r:", b"other key\r\n", &args).await, Ok(SharedDecision::Admitted), "keys are apart, and binary-safe");
        tokio::time::sleep(period).await;
        assert_eq!(redis.rate_limit("r:", b"k", &args).await, Ok(SharedDecision::Admitted), "one more after a period");
        // Redis restarted (or flushed): the script is loaded again by the first call.
        redis.call::<()>(&redis::cmd("SCRIPT").arg("FLUSH").clone()).await.unwrap();
        assert!(matches!(redis.rate_limit("r:", b"k", &args).await, Ok(SharedDecision::Wait(_))));
        let mut ttl = redis::cmd("PTTL");
        ttl.arg("t:ratelimit:r:k");
        let left: i64 = redis.call(&ttl).await.unwrap();
        assert!(left > 0 && left <= burst.as_millis() as i64, "the key expires when its state is fresh again: {left}");
    }
}
