//! State that replicas share through Redis (`options.redis`): one client per engine, used by every
//! feature that shares state (affinity bindings, rate limits, certificates, their order lock and
//! HTTP-01 tokens). It owns the connections, the key prefix, the sealing key, whether Redis
//! answered last, and the counters of `getStatistics().sharedState`. Per-request calls go over
//! `pipeline` (a lean connection of our own); rare ones through the `redis` crate.
//! Redis is the only distributed engine: nothing here elects, votes or replicates by itself.

pub mod lock;
pub mod pipeline;
pub mod rate_limit;
pub mod resp;
pub mod seal;
#[cfg(test)]
mod test_redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

use crate::config::RedisOptions;
use pipeline::{RedisAddress, RedisPipeline, RedisTarget};
use seal::Sealer;

/// A per-request Redis call may take this long before the replica answers from its own memory.
pub const PER_REQUEST_TIMEOUT: Duration = Duration::from_millis(250);
/// A rare call (certificates, locks, tokens) may take this long.
const RARE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters of `getStatistics().sharedState`.
#[derive(Debug, Default)]
pub struct SharedStateCounters {
    pub rate_limit_calls: AtomicU64,
    pub rate_limit_script_calls: AtomicU64,
    pub rate_limit_fallbacks: AtomicU64,
    pub lock_waits: AtomicU64,
    pub certificates_loaded: AtomicU64,
    pub orders_placed: AtomicU64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedStateStats {
    pub redis_reachable: bool,
    pub rate_limit_calls: u64,
    pub rate_limit_script_calls: u64,
    pub rate_limit_fallbacks: u64,
    pub lock_waits: u64,
    pub certificates_loaded: u64,
    pub orders_placed: u64,
}

pub struct SharedRedis {
    client: redis::Client,
    /// Rare commands, through the crate's self-reconnecting connection.
    connection: redis::aio::ConnectionManager,
    target: RedisTarget,
    /// Started by the first per-request call (on the runtime).
    pipeline: OnceLock<RedisPipeline>,
    prefix: String,
    sealer: Option<Sealer>,
    pub sync_interval: Duration,
    /// Whether the last call was answered.
    reachable: AtomicBool,
    pub counters: SharedStateCounters,
    /// Rate-limit checks of one key waiting to share a script call.
    rate_batches: rate_limit::RateLimitBatches,
    /// Logs an outage of shared rate limits once.
    pub rate_limit_outage: OutageLog,
    /// Logs once that certificates come from the disk cache.
    pub certificate_outage: OutageLog,
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRedis").field("prefix", &self.prefix).field("sealed", &self.sealer.is_some()).finish()
    }
}

impl SharedRedis {
    /// A lazily connecting client; errors name the option (`redis.url: ...`). Call on a runtime.
    pub fn new(options: &RedisOptions) -> Result<Arc<SharedRedis>, String> {
        let client = redis::Client::open(options.url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
        let target = pipeline_target(client.get_connection_info())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(PER_REQUEST_TIMEOUT * 2))
            .set_response_timeout(Some(RARE_CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| format!("redis: {e}"))?;
        let sealer = match &options.encryption_key {
            Some(key) => Some(Sealer::from_base64(key).map_err(|e| format!("redis.encryptionKey: {e}"))?),
            None => None,
        };
        Ok(Arc::new(SharedRedis {
            client,
            connection,
            target,
            pipeline: OnceLock::new(),
            prefix: options.key_prefix.clone(),
            sealer,
            sync_interval: Duration::from_millis(options.sync_interval_ms.max(100)),
            reachable: AtomicBool::new(true),
            counters: SharedStateCounters::default(),
            rate_batches: rate_limit::RateLimitBatches::default(),
            rate_limit_outage: OutageLog::default(),
            certificate_outage: OutageLog::default(),
        }))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix><kind>:<name>`.
    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    pub fn sealer(&self) -> Option<&Sealer> {
        self.sealer.as_ref()
    }

    /// The pipelined connection of the per-request calls.
    pub fn pipeline(&self) -> &RedisPipeline {
        self.pipeline.get_or_init(|| RedisPipeline::start(self.target.clone(), PER_REQUEST_TIMEOUT))
    }

    /// A rare command's answer within `RARE_CALL_TIMEOUT`; the outcome sets `redisReachable`.
    pub async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        self.within(RARE_CALL_TIMEOUT, async {
            let mut connection = self.connection.clone();
            cmd.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// A script's answer (loaded on first use and again after a Redis restart by `redis::Script`).
    pub async fn run_script<T: redis::FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<T, String> {
        self.within(RARE_CALL_TIMEOUT, async {
            let mut connection = self.connection.clone();
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await
    }

    async fn within<T>(&self, limit: Duration, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
        let answered = match tokio::time::timeout(limit, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() || err.is_timeout() => Err(err.to_string()),
            Ok(Err(err)) => {
                // Redis answered, with an error: it is reachable.
                self.answered(true);
                return Err(err.to_string());
            }
            Err(_) => Err("no answer from redis in time".to_string()),
        };
        self.answered(answered.is_ok());
        answered
    }

    /// Records whether Redis answered a call.
    pub fn answered(&self, yes: bool) {
        self.reachable.store(yes, Ordering::Relaxed);
    }

    /// A connection for pub/sub (the crate's; one per subscriber task).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, String> {
        match tokio::time::timeout(RARE_CALL_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("connecting took too long".to_string()),
        }
    }

    pub fn stats(&self) -> SharedStateStats {
        let c = &self.counters;
        SharedStateStats {
            redis_reachable: self.reachable.load(Ordering::Relaxed),
            rate_limit_calls: c.rate_limit_calls.load(Ordering::Relaxed),
            rate_limit_script_calls: c.rate_limit_script_calls.load(Ordering::Relaxed),
            rate_limit_fallbacks: c.rate_limit_fallbacks.load(Ordering::Relaxed),
            lock_waits: c.lock_waits.load(Ordering::Relaxed),
            certificates_loaded: c.certificates_loaded.load(Ordering::Relaxed),
            orders_placed: c.orders_placed.load(Ordering::Relaxed),
        }
    }
}

/// Where the pipelined connection goes, from the URL the crate parsed.
fn pipeline_target(info: &redis::ConnectionInfo) -> Result<RedisTarget, String> {
    let address = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => RedisAddress::Tcp(host.clone(), *port),
        redis::ConnectionAddr::Unix(path) => RedisAddress::Unix(path.clone()),
        _ => return Err("redis.url: only redis:// and unix:// are supported (this build has no TLS for Redis)".to_string()),
    };
    let settings = info.redis_settings();
    Ok(RedisTarget {
        address,
        username: settings.username().map(str::to_string),
        password: settings.password().map(str::to_string),
        db: settings.db(),
    })
}

/// Logs an outage of one shared feature once, and its end once.
#[derive(Debug, Default)]
pub struct OutageLog {
    down: AtomicBool,
}

impl OutageLog {
    /// `meanwhile`: what the replica does until Redis returns ("rate limits are counted by this
    /// replica alone").
    pub fn failed(&self, meanwhile: &str, why: &str) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = why, "redis cannot be used; {meanwhile} until it answers again");
        }
    }

    /// `feature`: what is shared again ("rate limits").
    pub fn answered(&self, feature: &str) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("redis answers again; {feature} shared again");
        }
    }
}
