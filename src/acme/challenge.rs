//! HTTP-01 challenge answers: token → key authorization while an order waits for validation,
//! and the response the session writes for `GET /.well-known/acme-challenge/<token>`. With
//! `options.redis` the answers are also kept in Redis (`<prefix>acme-challenge:<token>`, with a
//! TTL), so that whichever replica the CA's validation reaches answers it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;

use crate::shared_state::SharedRedis;

pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";
/// A token outlives no order: validation and issuance are bounded well within this.
const SHARED_TOKEN_TTL: Duration = Duration::from_secs(10 * 60);
/// Tokens are base64url of at least 128 bits (RFC 8555 §8.1); anything much longer is not one.
const MAX_TOKEN_BYTES: usize = 256;

#[derive(Debug, Default)]
pub struct ChallengeStore {
    answers: RwLock<HashMap<String, String>>,
    shared: OnceLock<Arc<SharedRedis>>,
}

impl ChallengeStore {
    /// Shares the answers through Redis from now on.
    pub fn share(&self, redis: Arc<SharedRedis>) {
        let _ = self.shared.set(redis);
    }

    /// Publishes an answer; with Redis, it is there before this returns (or the failure is logged
    /// and only this replica answers).
    pub async fn publish(&self, token: &str, key_authorization: &str) {
        self.answers.write().insert(token.to_string(), key_authorization.to_string());
        if let Some(redis) = self.shared.get() {
            let mut set = redis::cmd("SET");
            set.arg(redis.key("acme-challenge", token)).arg(key_authorization).arg("EX").arg(SHARED_TOKEN_TTL.as_secs());
            if let Err(err) = redis.call::<()>(&set).await {
                tracing::warn!(error = %err, "cannot share the ACME challenge through redis; only this replica answers it");
            }
        }
    }

    pub fn withdraw(&self, token: &str) {
        self.answers.write().remove(token);
        if let Some(redis) = self.shared.get().cloned() {
            let mut del = redis::cmd("DEL");
            del.arg(redis.key("acme-challenge", token));
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = redis.call::<i64>(&del).await;
                });
            }
        }
    }

    /// Whether the path asks for a challenge answer (then `answer` gives the response).
    pub fn is_challenge(path: &str) -> bool {
        path.starts_with(CHALLENGE_PATH_PREFIX)
    }

    /// The whole HTTP/1.1 response for a request path under the challenge prefix (`None` for
    /// any other path): the key authorization, from this replica or Redis, or 404.
    pub async fn answer(&self, path: &str) -> Option<Vec<u8>> {
        let token = token_of(path)?;
        let mut answer = self.answers.read().get(token).cloned();
        if let (None, Some(redis)) = (&answer, self.shared.get()) {
            // Only what can be a token (base64url, RFC 8555 §8.1) costs a Redis call.
            let plausible = (16..=MAX_TOKEN_BYTES).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if plausible {
                let mut get = redis::cmd("GET");
                get.arg(redis.key("acme-challenge", token));
                match redis.call::<Option<String>>(&get).await {
                    Ok(found) => answer = found,
                    Err(err) => tracing::warn!(error = %err, "cannot read an ACME challenge answer from redis; answering 404"),
                }
            }
        }
        Some(render(answer))
    }
}

fn token_of(path: &str) -> Option<&str> {
    let token = path.strip_prefix(CHALLENGE_PATH_PREFIX)?;
    Some(token.split(['?', '#']).next().unwrap_or_default())
}

fn render(answer: Option<String>) -> Vec<u8> {
    let (status, body) = match answer {
        Some(key_authorization) => ("200 OK", key_authorization),
        None => ("404 Not Found", "unknown ACME challenge token\n".to_string()),
    };
    format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn known_tokens_are_answered_and_others_get_404() {
        let store = ChallengeStore::default();
        store.answers.write().insert("abc".into(), "abc.thumb".into());
        let ok = String::from_utf8(store.answer("/.well-known/acme-challenge/abc").await.unwrap()).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nabc.thumb"), "{ok}");
        let missing = String::from_utf8(store.answer("/.well-known/acme-challenge/zzz").await.unwrap()).unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"));
        assert!(store.answer("/index.html").await.is_none());
        store.withdraw("abc");
        assert!(String::from_utf8(store.answer("/.well-known/acme-challenge/abc").await.unwrap()).unwrap().starts_with("HTTP/1.1 404"));
    }
}
