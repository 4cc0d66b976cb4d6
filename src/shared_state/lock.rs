//! A lock across replicas in Redis: `SET key token NX PX ttl` takes it, a task renews it while the
//! holder works, and a compare-and-delete releases it, so a holder never releases a lock that
//! expired and went to another replica. A holder that dies stops renewing and the lock expires.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::task::JoinHandle;

use super::SharedRedis;

const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// A lock this replica holds; released when dropped (or by `release`).
pub struct HeldLock {
    redis: Arc<SharedRedis>,
    key: String,
    token: String,
    renewer: JoinHandle<()>,
    released: bool,
}

impl SharedRedis {
    /// Takes the lock `<prefix>lock:<name>` for `ttl` (renewed every third of it while held).
    /// `Ok(None)`: another replica holds it.
    pub async fn try_lock(self: &Arc<Self>, name: &str, ttl: Duration) -> Result<Option<HeldLock>, String> {
        let key = self.key("lock", name);
        let mut token = [0u8; 16];
        SystemRandom::new().fill(&mut token).map_err(|_| "no random bytes for a lock token".to_string())?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let ttl_ms = ttl.as_millis() as u64;
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(&token).arg("NX").arg("PX").arg(ttl_ms);
        let taken: Option<String> = self.call(&set).await?;
        if taken.is_none() {
            return Ok(None);
        }
        let renewer = {
            let redis = self.clone();
            let (key, token) = (key.clone(), token.clone());
            tokio::spawn(async move {
                let script = redis::Script::new(RENEW);
                let mut pause = ttl / 3;
                loop {
                    tokio::time::sleep(pause).await;
                    match redis.run_script::<i64>(script.key(&key).arg(&token).arg(ttl_ms)).await {
                        Ok(1) => pause = ttl / 3,
                        Ok(_) => {
                            tracing::warn!(lock = %key, "the lock expired while held (redis was slow or lost it); another replica may take it");
                            return;
                        }
                        Err(err) => {
                            // Sooner than usual: two missed renewals in a row would lose it.
                            pause = ttl / 10;
                            tracing::warn!(lock = %key, error = %err, "cannot renew the lock; retrying");
                        }
                    }
                }
            })
        };
        Ok(Some(HeldLock { redis: self.clone(), key, token, renewer, released: false }))
    }

    /// Whether anyone holds `<prefix>lock:<name>` now.
    pub async fn is_locked(&self, name: &str) -> Result<bool, String> {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.key("lock", name));
        Ok(self.call::<i64>(&exists).await? == 1)
    }
}

impl HeldLock {
    pub async fn release(mut self) {
        self.renewer.abort();
        self.released = true;
        let script = redis::Script::new(RELEASE);
        if let Err(err) = self.redis.run_script::<i64>(script.key(&self.key).arg(&self.token)).await {
            tracing::warn!(lock = %self.key, error = %err, "cannot release the lock; it expires by itself");
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released {
            return;
        }
        // Dropped without `release` (the order was cancelled): released in the background.
        let (redis, key, token) = (self.redis.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let script = redis::Script::new(RELEASE);
                let _ = redis.run_script::<i64>(script.key(&key).arg(&token)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_state::test_redis::local_redis;

    #[tokio::test]
    async fn one_holder_at_a_time_renewed_while_held_and_expiring_when_its_holder_is_gone() {
        let (_server, redis) = local_redis().await;
        let ttl = Duration::from_millis(300);
        let held = redis.try_lock("a", ttl).await.unwrap().expect("free");
        assert!(redis.try_lock("a", ttl).await.unwrap().is_none(), "held by the first");
        // Renewed past its TTL while held.
        tokio::time::sleep(ttl * 2).await;
        assert!(redis.is_locked("a").await.unwrap());
        held.release().await;
        assert!(!redis.is_locked("a").await.unwrap());
        // A holder that dies (its renewer stops) loses the lock when the TTL runs out.
        let dead = redis.try_lock("a", ttl).await.unwrap().expect("free again");
        dead.renewer.abort();
        std::mem::forget(dead);
        assert!(redis.try_lock("a", ttl).await.unwrap().is_none());
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let next = redis.try_lock("a", ttl).await.unwrap().expect("expired");
        // A lock that expired and went to another is not released by its old holder.
        let mut set = redis::cmd("SET");
        set.arg(redis.key("lock", "a")).arg("someone else");
        redis.call::<()>(&set).await.unwrap();
        next.release().await;
        assert!(redis.is_locked("a").await.unwrap(), "the other holder keeps it");
    }
}
