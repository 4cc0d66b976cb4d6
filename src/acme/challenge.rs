//! HTTP-01 challenge answers: token → key authorization while an order waits for validation,
//! and the response the session writes for `GET /.well-known/acme-challenge/<token>`.

use std::collections::HashMap;

use parking_lot::RwLock;

pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Default)]
pub struct ChallengeStore {
    answers: RwLock<HashMap<String, String>>,
}

impl ChallengeStore {
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.answers.write().insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.answers.write().remove(token);
    }

    /// The whole HTTP/1.1 response for a request path under the challenge prefix (`None` for
    /// any other path): the key authorization, or 404 for a token we do not hold.
    pub fn response_for(&self, path: &str) -> Option<Vec<u8>> {
        let token = path.strip_prefix(CHALLENGE_PATH_PREFIX)?;
        let token = token.split(['?', '#']).next().unwrap_or_default();
        let answer = self.answers.read().get(token).cloned();
        let (status, body) = match answer {
            Some(key_authorization) => ("200 OK", key_authorization),
            None => ("404 Not Found", "unknown ACME challenge token\n".to_string()),
        };
        Some(
            format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                .into_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_tokens_are_answered_and_others_get_404() {
        let store = ChallengeStore::default();
        store.insert("abc", "abc.thumb");
        let ok = String::from_utf8(store.response_for("/.well-known/acme-challenge/abc").unwrap()).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nabc.thumb"), "{ok}");
        let missing = String::from_utf8(store.response_for("/.well-known/acme-challenge/zzz").unwrap()).unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"));
        assert!(store.response_for("/index.html").is_none());
        store.remove("abc");
        assert!(String::from_utf8(store.response_for("/.well-known/acme-challenge/abc").unwrap()).unwrap().starts_with("HTTP/1.1 404"));
    }
}
