//! The certificate store in Redis, shared by replicas: `<prefix>cert:<route>` holds one JSON value
//! (chain, key, meta) and `<prefix>account:<id>` an ACME account's credentials. With
//! `redis.encryptionKey` the private key and the credentials are sealed (AES-256-GCM), and an
//! unsealed or foreign value is refused rather than used. A saved certificate is announced on
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
            (Some(_), _, None) => Err(format!("{redis_key} holds an unsealed private key, but redis.encryptionKey is set: refusing it")),
            (None, Some(plain), _) => Ok(plain),
            (None, None, _) => Err(format!("{redis_key} holds a sealed private key: set redis.encryptionKey to the key that sealed it")),
        }
    }
}

impl CertStorage for RedisCertStore {
    fn load<'a>(&'a self, cert_name: &'a str) -> StoreFuture<'a, Option<StoredCert>> {
        Box::pin(async move {
            let key = self.redis.key("cert", cert_name);
            let mut get = redis::cmd("GET");
            get.arg(&key);
            let answer = self.redis.call::<Option<String>>(&get).await;
            let outage = &self.redis.certificate_outage;
            let text = match answer {
                Ok(Some(text)) => text,
                Ok(None) => {
                    outage.answered("certificates are");
                    return Ok(None);
                }
                Err(err) => {
                    outage.failed("certificates come from this replica's disk cache", &err);
                    return Ok(self.cache.load(cert_name));
                }
            };
            outage.answered("certificates are");
            let value: StoredValue = serde_json::from_str(&text).map_err(|e| format!("{key} is not a certificate this proxy stored: {e}"))?;
            let key_pem = self.reveal(value.key_pem, value.sealed_key, &key)?;
            let stored = StoredCert { chain_pem: value.chain_pem, key_pem, meta: value.meta };
            let cached = self.cache.load(cert_name);
            if cached.as_ref().map(|c| &c.meta) != Some(&stored.meta) {
                if let Err(err) = self.cache.save(cert_name, &stored.chain_pem, &stored.key_pem, &stored.meta) {
                    tracing::warn!(route = cert_name, error = %err, "cannot keep the certificate in the disk cache");
                }
            }
            Ok(Some(stored))
        })
    }

    fn save<'a>(&'a self, cert_name: &'a str, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The cache first: a replica that restarts while Redis is down still has it.
            self.cache.save(cert_name, &cert.chain_pem, &cert.key_pem, &cert.meta)?;
            let key = self.redis.key("cert", cert_name);
            let (key_pem, sealed_key) = self.protect(&cert.key_pem, &key)?;
            let value = StoredValue { chain_pem: cert.chain_pem.clone(), key_pem, sealed_key, meta: cert.meta.clone() };
            let text = serde_json::to_string(&value).map_err(|e| e.to_string())?;
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(text);
            self.redis.call::<()>(&set).await.map_err(|e| format!("cannot store the certificate in redis: {e}"))?;
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(format!("{}{CERT_CHANNEL}", self.redis.prefix())).arg(cert_name);
            if let Err(err) = self.redis.call::<i64>(&publish).await {
                tracing::warn!(route = cert_name, error = %err, "cannot announce the new certificate; replicas find it at their next sync");
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
                    let (plain, sealed) = if Sealer::is_sealed(&text) { (None, Some(text)) } else { (Some(text), None) };
                    self.reveal(plain, sealed, &key).map(Some)
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
