//! The certificate store in Redis, shared by replicas: `<prefix>cert:<route>` holds one JSON value
//! (chain, key, meta) and `<prefix>account:<id>` an ACME account's credentials. With
//! `redis.encryptionKey` the private key and the credentials are sealed (AES-256-GCM): a value
//! sealed under another key is an error, and one stored unsealed before the key was set is used
//! and sealed. A saved certificate is announced on
//! `<prefix>certs` (its route name), so replicas swap it at once. The disk store is kept beside it
//! as a cache: written with everything Redis gives, read while Redis is unreachable.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::store::{account_id, CertMeta, CertStorage, CertStore, StoreFuture, StoredCert};
use crate::shared_state::seal::Sealer;
use crate::shared_state::SharedRedis;

pub const CERT_CHANNEL: &str = "certs";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredValue {
    chain_pem: String,
    /// The key in the clear, without `encryptionKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_pem: Option<String>,
    /// The key sealed under `encryptionKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_key: Option<String>,
    meta: CertMeta,
}

pub struct RedisCertStore {
    redis: Arc<SharedRedis>,
    cache: CertStore,
}

impl RedisCertStore {
    pub fn new(redis: Arc<SharedRedis>, cache: CertStore) -> RedisCertStore {
        RedisCertStore { redis, cache }
    }

    /// The secret as stored: sealed when a key is configured.
    fn protect(&self, secret: &str, redis_key: &str) -> Result<(Option<String>, Option<String>), String> {
        match self.redis.sealer() {
            Some(sealer) => Ok((None, Some(sealer.seal(secret, redis_key)?))),
            None => Ok((Some(secret.to_string()), None)),
        }
    }

    /// The secret of a stored value, refusing what the configuration cannot vouch for.
    fn reveal(&self, plain: Option<String>, sealed: Option<String>, redis_key: &str) -> Result<String, String> {
        match (self.redis.sealer(), plain, sealed) {
            (Some(sealer), _, Some(sealed)) => sealer.open(&sealed, redis_key).map_err(|e| format!("{redis_key}: {e}")),
            (Some(_), Some(plain), None) => {
                tracing::warn!(key = redis_key, "a secret in redis is not sealed although redis.encryptionKey is set; sealing it");
                Ok(plain)
            }
            (None, Some(plain), _) => Ok(plain),
            (None, None, Some(_)) => Err(format!("{redis_key} holds a sealed private key: set redis.encryptionKey to the key that sealed it")),
            (_, None, None) => Err(format!("{redis_key} holds no private key")),
        }
    }
}

impl RedisCertStore {
    /// Writes the certificate to Redis and announces it. `only_if_absent`: a value another
    /// replica wrote meanwhile stays.
    async fn put(&self, cert_name: &str, cert: &StoredCert, only_if_absent: bool) -> Result<(), String> {
        let key = self.redis.key("cert", cert_name);
        let (key_pem, sealed_key) = self.protect(&cert.key_pem, &key)?;
        let value = StoredValue { chain_pem: cert.chain_pem.clone(), key_pem, sealed_key, meta: cert.meta.clone() };
        let text = serde_json::to_string(&value).map_err(|e| e.to_string())?;
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(text);
        if only_if_absent {
            set.arg("NX");
        }
        self.redis.call::<Option<String>>(&set).await.map_err(|e| format!("cannot store the certificate in redis: {e}"))?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(format!("{}{CERT_CHANNEL}", self.redis.prefix())).arg(cert_name);
        if let Err(err) = self.redis.call::<i64>(&publish).await {
            tracing::warn!(route = cert_name, error = %err, "cannot announce the new certificate; replicas find it at their next sync");
        }
        Ok(())
    }

    /// What Redis holds for the route, opened; `Ok(None)` when nothing.
    async fn fetch(&self, cert_name: &str) -> Result<Option<StoredCert>, Fetch> {
        let key = self.redis.key("cert", cert_name);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let text = match self.redis.call::<Option<String>>(&get).await {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(None),
            Err(err) => return Err(Fetch::Unreachable(err)),
        };
        let value: StoredValue = serde_json::from_str(&text).map_err(|e| Fetch::Unreadable(format!("{key} is not a certificate this proxy stored: {e}")))?;
        let unsealed = value.key_pem.is_some() && value.sealed_key.is_none();
        let key_pem = match (self.redis.sealer(), unsealed) {
            // Stored before `encryptionKey` was set: used, and sealed from now on.
            (Some(_), true) => {
                tracing::warn!(route = cert_name, "the certificate's key in redis is not sealed; sealing it with redis.encryptionKey");
                let stored = StoredCert { chain_pem: value.chain_pem, key_pem: value.key_pem.unwrap_or_default(), meta: value.meta };
                if let Err(err) = self.put(cert_name, &stored, false).await {
                    tracing::warn!(route = cert_name, error = %err, "cannot seal the stored key");
                }
                return Ok(Some(stored));
            }
            _ => self.reveal(value.key_pem, value.sealed_key, &key).map_err(Fetch::Unreadable)?,
        };
        Ok(Some(StoredCert { chain_pem: value.chain_pem, key_pem, meta: value.meta }))
    }
}

enum Fetch {
    Unreachable(String),
    Unreadable(String),
}

impl CertStorage for RedisCertStore {
    fn load<'a>(&'a self, cert_name: &'a str) -> StoreFuture<'a, Option<StoredCert>> {
        Box::pin(async move {
            let outage = &self.redis.certificate_outage;
            let cached = self.cache.load(cert_name);
            let stored = match self.fetch(cert_name).await {
                Ok(stored) => stored,
                Err(Fetch::Unreadable(err)) => return Err(err),
                Err(Fetch::Unreachable(err)) => {
                    outage.failed("certificates come from this replica's disk cache", &err);
                    return Ok(cached);
                }
            };
            outage.answered("certificates are");
            // The disk holds a later certificate than Redis (Redis was emptied, or down when it
            // was issued): Redis gets it back, so no replica orders what one already has.
            let cache_is_later = match (&cached, &stored) {
                (Some(cached), Some(stored)) => cached.meta.expires_at > stored.meta.expires_at,
                (Some(_), None) => true,
                _ => false,
            };
            if cache_is_later {
                if let Some(cached) = &cached {
                    match self.put(cert_name, cached, stored.is_none()).await {
                        Ok(()) => tracing::info!(route = cert_name, "wrote this replica's cached certificate back to redis"),
                        Err(err) => tracing::warn!(route = cert_name, error = %err, "cannot write the cached certificate back to redis"),
                    }
                }
                return Ok(cached);
            }
            if let Some(stored) = &stored {
                if cached.as_ref().map(|c| &c.meta) != Some(&stored.meta) {
                    if let Err(err) = self.cache.save(cert_name, &stored.chain_pem, &stored.key_pem, &stored.meta) {
                        tracing::warn!(route = cert_name, error = %err, "cannot keep the certificate in the disk cache");
                    }
                }
            }
            Ok(stored)
        })
    }

    fn save<'a>(&'a self, cert_name: &'a str, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The disk first: what it holds reaches Redis later when Redis fails now (`load`
            // writes a later cached certificate back), so an issued certificate is never lost.
            self.cache.save(cert_name, &cert.chain_pem, &cert.key_pem, &cert.meta)?;
            if let Err(err) = self.put(cert_name, cert, false).await {
                tracing::warn!(route = cert_name, error = %err, "the certificate is on this replica's disk only until redis takes it");
            }
            Ok(())
        })
    }

    fn load_account<'a>(&'a self, directory_url: &'a str, email: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let key = self.redis.key("account", &account_id(directory_url, email));
            let mut get = redis::cmd("GET");
            get.arg(&key);
            match self.redis.call::<Option<String>>(&get).await {
                Ok(None) => Ok(None),
                Ok(Some(text)) => {
                    let was_sealed = Sealer::is_sealed(&text);
                    let (plain, sealed) = if was_sealed { (None, Some(text)) } else { (Some(text), None) };
                    let credentials = self.reveal(plain, sealed, &key)?;
                    if !was_sealed && self.redis.sealer().is_some() {
                        // Stored before `encryptionKey` was set: sealed now.
                        let (_, sealed) = self.protect(&credentials, &key)?;
                        let mut set = redis::cmd("SET");
                        set.arg(&key).arg(sealed.unwrap_or_default());
                        if let Err(err) = self.redis.call::<()>(&set).await {
                            tracing::warn!(error = %err, "cannot seal the ACME account credentials in redis");
                        }
                    }
                    Ok(Some(credentials))
                }
                Err(_) => Ok(self.cache.load_account(directory_url, email)),
            }
        })
    }

    fn save_account<'a>(&'a self, directory_url: &'a str, email: &'a str, credentials_json: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.cache.save_account(directory_url, email, credentials_json)?;
            let key = self.redis.key("account", &account_id(directory_url, email));
            let (plain, sealed) = self.protect(credentials_json, &key)?;
            let mut set = redis::cmd("SET");
            // Another replica may have registered the account meanwhile: the first one stays.
            set.arg(&key).arg(plain.or(sealed).unwrap_or_default()).arg("NX");
            self.redis.call::<Option<String>>(&set).await.map(|_| ()).map_err(|e| format!("cannot store the ACME account in redis: {e}"))
        })
    }
}
