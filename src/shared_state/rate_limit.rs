//! A route's `rateLimit` counted across replicas: one atomic GCRA update per key per round trip,
//! a Lua script sent with `EVALSHA` over the pipelined connection (so requests that arrive together
//! share a write), on Redis's clock so that replicas with skewed clocks agree. A check of a key
//! whose script call is still waiting to be written (a busy client's connections, a route-wide
//! key) joins that call, which then asks for as many admissions as it has checks: the script
//! admits them in arrival order as it would have one by one at that instant, so the answers are
//! the in-memory limiter's, for a fraction of Redis's work and of the proxy's. The script answers as the in-memory limiter does: a fresh key may send
//! `maxRequests` at once, then one more every `window / maxRequests`. After a Redis restart the
//! script cache is empty: the `NOSCRIPT` answer is followed by one `EVAL`, which loads it again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::pipeline::{CallError, CountField, PendingAnswer, COUNT_DIGITS};
use super::resp::encode_command_of_parts;
use super::SharedRedis;

/// KEYS[1]: the key; ARGV[1]: the period, ARGV[2]: the burst, both in microseconds; ARGV[3]: how
/// many checks ask at once. Answers nil when all are admitted (no reply text to allocate for the
/// common case), else "<admitted> <microseconds to wait>" for the rest. Numbers are formatted with
/// `%.0f`, since Redis would turn a Lua number of 16 digits into exponent notation; every value
/// stays an integer below 2^53, so the arithmetic is exact, and the division's rounding is
/// corrected by the two loops.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local asked = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local limit = now + burst
local admitted = math.floor((limit - tat) / period)
if admitted > asked then admitted = asked end
if admitted < 0 then admitted = 0 end
while admitted > 0 and tat + admitted * period > limit do admitted = admitted - 1 end
while admitted < asked and tat + (admitted + 1) * period <= limit do admitted = admitted + 1 end
if admitted > 0 then
  tat = tat + admitted * period
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
if admitted == asked then return false end
return string.format('%d %.0f', admitted, tat + period - burst - now)
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

type Answer = Result<SharedDecision, CallError>;

/// The checks of one key that joined a queued script call, after its first.
type Followers = Arc<Mutex<Vec<oneshot::Sender<Answer>>>>;

/// The script call of each key that is queued and not yet written, by full Redis key. An entry
/// lives until its call is answered, or until a later check finds the call written and queues the
/// next, so the map holds no more entries than there are requests in flight.
#[derive(Default)]
pub struct RateLimitBatches {
    open: Mutex<HashMap<Box<[u8]>, OpenBatch, foldhash::fast::RandomState>>,
}

struct OpenBatch {
    /// The call's count of checks, raised by each check that joins it.
    count: CountField,
    followers: Followers,
}

/// The first check of a batch, waiting for the batch's answer. Dropped before it (its client
/// left), it leaves a task to hand the answer to the checks that joined.
struct Leader<'a> {
    batches: &'a RateLimitBatches,
    key: &'a [u8],
    followers: Followers,
    pending: Option<PendingAnswer>,
}

impl Leader<'_> {
    /// Closes the batch to new checks; those that joined, in order.
    fn close(&self) -> Vec<oneshot::Sender<Answer>> {
        let mut open = self.batches.open.lock();
        if open.get(self.key).is_some_and(|batch| Arc::ptr_eq(&batch.followers, &self.followers)) {
            open.remove(self.key);
        }
        // Under the map's lock: a check that raised the count has also joined the list.
        std::mem::take(&mut *self.followers.lock())
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        let followers = self.close();
        if followers.is_empty() {
            return;
        }
        let asked = 1 + followers.len() as u64;
        tokio::spawn(async move {
            match pending.await {
                // The script did not run: the checks that joined are asked alone (dropping their
                // senders tells them so), and the first of those loads the script again.
                Err(CallError::Refused(why)) if why.starts_with("NOSCRIPT") => drop(followers),
                answer => BatchAnswer::hand_out(&BatchAnswer::of(answer, asked), followers),
            }
        });
    }
}

impl SharedRedis {
    /// One GCRA check of `<prefix>ratelimit:<namespace><key>`. While the script call of an
    /// earlier check of the key waits to be written, this check joins it (its count is raised);
    /// otherwise it queues the next call.
    pub async fn rate_limit(&self, namespace: &str, key: &[u8], args: &GcraArgs) -> Answer {
        let parts: [&[u8]; 4] = [self.prefix().as_bytes(), b"ratelimit:", namespace.as_bytes(), key];
        let mut stack = [0u8; 256];
        let heap: Vec<u8>;
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let redis_key: &[u8] = if len <= stack.len() {
            let mut at = 0;
            for part in parts {
                stack[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            &stack[..len]
        } else {
            heap = parts.concat();
            &heap
        };
        let pipeline = self.pipeline();
        let leading = {
            let mut open = self.rate_batches.open.lock();
            let joined = open.get_mut(redis_key).and_then(|batch| {
                if !pipeline.add_to_count(&batch.count) {
                    return None;
                }
                let (sender, answer) = oneshot::channel();
                batch.followers.lock().push(sender);
                Some(answer)
            });
            match joined {
                Some(answer) => Err(answer),
                None => {
                    self.counters.rate_limit_script_calls.fetch_add(1, Ordering::Relaxed);
                    let (count, pending) = match pipeline.queue_counted(|out| encode_gcra(out, true, redis_key, args, None)) {
                        Ok(queued) => queued,
                        Err(err) => return Err(self.failed(err)),
                    };
                    let followers = Followers::default();
                    open.insert(redis_key.into(), OpenBatch { count, followers: followers.clone() });
                    Ok((followers, pending))
                }
            }
        };
        let (followers, pending) = match leading {
            Ok(leading) => leading,
            Err(answer) => {
                // A leader dropped before its answer hands it out from a task; gone without
                // one (the runtime stopping), the check is asked alone.
                return match answer.await {
                    Ok(answer) => answer,
                    Err(_) => BatchAnswer::of(self.gcra_call(redis_key, args, 1).await, 1).map(|answered| answered.decision(0)),
                };
            }
        };
        let mut leader = Leader { batches: &self.rate_batches, key: redis_key, followers, pending: Some(pending) };
        let answer = match leader.pending.as_mut() {
            Some(pending) => pending.await,
            None => Err(CallError::Stopped),
        };
        leader.pending = None;
        let followers = leader.close();
        let asked = 1 + followers.len() as u64;
        let answer = match answer {
            // Redis restarted (or flushed its scripts): one EVAL loads the script again.
            Err(CallError::Refused(why)) if why.starts_with("NOSCRIPT") => self.gcra_call(redis_key, args, asked).await,
            answer => answer,
        };
        self.answered(redis_answered(&answer));
        let answer = BatchAnswer::of(answer, asked);
        BatchAnswer::hand_out(&answer, followers);
        answer.map(|answered| answered.decision(0))
    }

    /// One script call asking for `asked` admissions, with the script's text (`EVAL`), so that
    /// it is loaded again where Redis lost it.
    async fn gcra_call(&self, redis_key: &[u8], args: &GcraArgs, asked: u64) -> Result<Option<String>, CallError> {
        self.counters.rate_limit_script_calls.fetch_add(1, Ordering::Relaxed);
        let answer = self.pipeline().call(|out| encode_gcra(out, false, redis_key, args, Some(asked))).await;
        self.answered(redis_answered(&answer));
        answer
    }

    /// A call that could not be queued (Redis paused after a failure, or the engine stopping).
    fn failed(&self, err: CallError) -> CallError {
        self.answered(false);
        err
    }
}

/// Whether Redis answered (an error it sent is an answer).
fn redis_answered<T>(answer: &Result<T, CallError>) -> bool {
    !matches!(answer, Err(CallError::Unreachable(_) | CallError::TimedOut | CallError::Broken(_) | CallError::Stopped))
}

/// The script call: `EVALSHA` (or `EVAL` with the text), the key, the period, the burst, and the
/// count of checks asked for (`None`: 1 in a field that `add_to_count` raises).
fn encode_gcra(out: &mut Vec<u8>, by_hash: bool, redis_key: &[u8], args: &GcraArgs, asked: Option<u64>) {
    let (command, body): (&[u8], &[u8]) = if by_hash { (b"EVALSHA", script_sha().as_bytes()) } else { (b"EVAL", GCRA.as_bytes()) };
    let mut count = itoa::Buffer::new();
    let count: &[u8] = match asked {
        Some(asked) => count.format(asked).as_bytes(),
        None => &b"0000000001"[..COUNT_DIGITS],
    };
    encode_command_of_parts(out, &[&[command], &[body], &[b"1"], &[redis_key], &[args.period_us.as_bytes()], &[args.burst_us.as_bytes()], &[count]]);
}

/// How many of a script call's checks were admitted (the first ones, in arrival order), and how
/// long the rest must wait.
struct BatchAnswer {
    admitted: u64,
    wait: Duration,
}

impl BatchAnswer {
    /// The script's reply to a call that asked for `asked` admissions.
    fn of(reply: Result<Option<String>, CallError>, asked: u64) -> Result<BatchAnswer, CallError> {
        match reply? {
            None => Ok(BatchAnswer { admitted: asked, wait: Duration::ZERO }),
            Some(text) => BatchAnswer::parse(&text).ok_or_else(|| CallError::Refused(format!("the rate-limit script answered {text:?}"))),
        }
    }

    /// Each joined check's decision: the first of the batch was the leader's.
    fn hand_out(answer: &Result<BatchAnswer, CallError>, followers: Vec<oneshot::Sender<Answer>>) {
        for (position, follower) in (1..).zip(followers) {
            let _ = follower.send(answer.as_ref().map(|answered| answered.decision(position)).map_err(CallError::clone));
        }
    }

    /// "<admitted> <wait in microseconds>".
    fn parse(text: &str) -> Option<BatchAnswer> {
        let (admitted, wait_us) = text.split_once(' ')?;
        Some(BatchAnswer { admitted: admitted.parse().ok()?, wait: Duration::from_micros(wait_us.parse().ok()?) })
    }

    /// The decision for the check at `position` of the batch (0: the leader).
    fn decision(&self, position: u64) -> SharedDecision {
        if position < self.admitted {
            SharedDecision::Admitted
        } else {
            SharedDecision::Wait(self.wait)
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

    /// `INFO commandstats`' call count of `command` (lowercase).
    async fn calls_of(redis: &SharedRedis, command: &str) -> u64 {
        let info: String = redis.call(redis::cmd("INFO").arg("commandstats")).await.unwrap();
        let marker = format!("cmdstat_{command}:calls=");
        info.lines().find_map(|line| line.strip_prefix(marker.as_str())?.split(',').next()?.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn checks_of_one_key_that_arrive_together_share_one_script_call_and_get_the_answers_one_by_one_would() {
        let (_server, redis) = local_redis().await;
        let period = Duration::from_secs(10);
        let args = GcraArgs::new(period, period * 4);
        // Warm: the script is loaded (one EVAL after NOSCRIPT), so what follows is EVALSHA only.
        assert_eq!(redis.rate_limit("r:", b"warm", &args).await, Ok(SharedDecision::Admitted));
        let before = calls_of(&redis, "evalsha").await;
        let script_calls = redis.counters.rate_limit_script_calls.load(Ordering::Relaxed);
        // Ten checks of one key, polled together; a burst of 4: the first four admitted, in order.
        let checks = (0..10).map(|_| redis.rate_limit("r:", b"busy", &args));
        let answers = futures_util::future::join_all(checks).await;
        let admitted: Vec<bool> = answers.iter().map(|a| matches!(a, Ok(SharedDecision::Admitted))).collect();
        assert_eq!(admitted, [true, true, true, true, false, false, false, false, false, false]);
        for refused in &answers[4..] {
            match refused {
                Ok(SharedDecision::Wait(wait)) => assert!(*wait > period - Duration::from_secs(1) && *wait <= period, "{wait:?}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(calls_of(&redis, "evalsha").await - before, 1, "one script call for the ten checks");
        assert_eq!(redis.counters.rate_limit_script_calls.load(Ordering::Relaxed) - script_calls, 1);
        // The key's state is what four single admissions leave: the next single check waits too.
        assert!(matches!(redis.rate_limit("r:", b"busy", &args).await, Ok(SharedDecision::Wait(_))));
        // Two keys checked together: a call each, neither holds the other's budget.
        let mixed = futures_util::future::join_all((0..6).map(|i| redis.rate_limit("r:", if i % 2 == 0 { b"a" } else { b"b" }, &args))).await;
        assert!(mixed.iter().all(|a| matches!(a, Ok(SharedDecision::Admitted))), "{mixed:?}");
        assert_eq!(redis.rate_batches.open.lock().len(), 0, "no batch stays open");
    }

    /// Polls a check once (its call queued, or its batch joined), drops it (its client left), and
    /// returns what three more checks of the key, made meanwhile, were answered.
    async fn three_checks_beside_a_dropped_one(redis: &Arc<SharedRedis>, key: &'static [u8], args: &GcraArgs) -> Vec<bool> {
        let mut leader = Box::pin(redis.rate_limit("r:", key, args));
        let pending = std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(leader.as_mut(), cx).is_pending())).await;
        assert!(pending);
        let followers = tokio::spawn({
            let redis = redis.clone();
            let args = args.clone();
            async move { futures_util::future::join_all((0..3).map(|_| redis.rate_limit("r:", key, &args))).await }
        });
        tokio::task::yield_now().await;
        drop(leader);
        let answers = followers.await.unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        answers.iter().map(|a| matches!(a, Ok(SharedDecision::Admitted))).collect()
    }

    #[tokio::test]
    async fn a_batch_whose_first_check_is_dropped_still_answers_the_others() {
        let (_server, redis) = local_redis().await;
        let args = GcraArgs::new(Duration::from_secs(10), Duration::from_secs(30));
        assert_eq!(redis.rate_limit("r:", b"warm", &args).await, Ok(SharedDecision::Admitted));
        // The dropped check was counted (as in memory): two of the three others fit the burst.
        assert_eq!(three_checks_beside_a_dropped_one(&redis, b"k", &args).await, [true, true, false]);
        assert!(matches!(redis.rate_limit("r:", b"k", &args).await, Ok(SharedDecision::Wait(_))));
        // Redis lost the script: the dropped check's call did not run, so it counted nothing,
        // and the others, asked alone, load the script again.
        redis.call::<()>(&redis::cmd("SCRIPT").arg("FLUSH").clone()).await.unwrap();
        assert_eq!(three_checks_beside_a_dropped_one(&redis, b"k2", &args).await, [true, true, true]);
        assert_eq!(redis.rate_batches.open.lock().len(), 0);
    }

    #[tokio::test]
    async fn a_check_that_comes_after_its_keys_call_was_written_queues_the_next() {
        let (_server, redis) = local_redis().await;
        let args = GcraArgs::new(Duration::from_secs(10), Duration::from_secs(20));
        assert_eq!(redis.rate_limit("r:", b"warm", &args).await, Ok(SharedDecision::Admitted));
        let before = calls_of(&redis, "evalsha").await;
        let mut first = Box::pin(redis.rate_limit("r:", b"k", &args));
        let pending = std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(first.as_mut(), cx).is_pending())).await;
        assert!(pending);
        // Until Redis ran it: the call was written.
        while calls_of(&redis, "evalsha").await == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (first, second, third) = tokio::join!(first, redis.rate_limit("r:", b"k", &args), redis.rate_limit("r:", b"k", &args));
        assert_eq!(first, Ok(SharedDecision::Admitted));
        assert_eq!(second, Ok(SharedDecision::Admitted));
        assert!(matches!(third, Ok(SharedDecision::Wait(_))), "{third:?}");
        assert_eq!(calls_of(&redis, "evalsha").await - before, 2, "the written call, then one for the two that came after");
        assert_eq!(redis.rate_batches.open.lock().len(), 0);
    }
}
