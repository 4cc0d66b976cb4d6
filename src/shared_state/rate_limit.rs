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
        // The burst as a whole number of periods, as in memory: rounding each to microseconds
        // apart would let a few more requests through.
        let period_us = period.as_micros().max(1);
        let burst_us = (period_us * (burst.as_nanos() / period.as_nanos().max(1)).max(1)).to_string();
        let period_us = period_us.to_string();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_state::test_redis::local_redis;

    #[tokio::test]
    async fn the_script_admits_the_burst_then_one_per_period_and_survives_a_flushed_script_cache() {
        let (_server, redis) = local_redis().await;
        let period = Duration::from_millis(200);
        let burst = period * 3;
        for n in 0..3 {
            assert_eq!(redis.rate_limit("r:", b"k", period, burst).await, Ok(SharedDecision::Admitted), "request {n} of the burst");
        }
        match redis.rate_limit("r:", b"k", period, burst).await {
            Ok(SharedDecision::Wait(wait)) => assert!(wait > Duration::from_millis(100) && wait <= period, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(redis.rate_limit("r:", b"other key\r\n", period, burst).await, Ok(SharedDecision::Admitted), "keys are apart, and binary-safe");
        tokio::time::sleep(period).await;
        assert_eq!(redis.rate_limit("r:", b"k", period, burst).await, Ok(SharedDecision::Admitted), "one more after a period");
        // Redis restarted (or flushed): the script is loaded again by the first call.
        redis.call::<()>(&redis::cmd("SCRIPT").arg("FLUSH").clone()).await.unwrap();
        assert!(matches!(redis.rate_limit("r:", b"k", period, burst).await, Ok(SharedDecision::Wait(_))));
        let mut ttl = redis::cmd("PTTL");
        ttl.arg("t:ratelimit:r:k");
        let left: i64 = redis.call(&ttl).await.unwrap();
        assert!(left > 0 && left <= burst.as_millis() as i64, "the key expires when its state is fresh again: {left}");
    }
}
