//! Where automatic certificates and ACME accounts are kept: one interface (`CertStorage`), two
//! stores. On disk (the default): `<store>/<certName>/{cert.pem,key.pem,ca.pem,meta.json}` per
//! route and `<store>/account-<hash>.json` per ACME account; private keys and account credentials
//! are written with mode 0600, and every file is replaced by rename, so a crash mid-write never
//! leaves half a certificate behind. In Redis (with `options.redis`, `redis_store`): shared by the
//! replicas, with the disk store kept beside it as a cache.

use std::fs;
use std::future::Future;
use std::pin::Pin;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertMeta {
    pub domains: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub issued_at: u64,
    pub expires_at: u64,
    /// 'acme' or 'custom'.
    pub source: String,
    #[serde(default)]
    pub directory_url: Option<String>,
}

/// A stored certificate: the chain (leaf first) and its key, PEM.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub chain_pem: String,
    pub key_pem: String,
    pub meta: CertMeta,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// A store of certificates (by route name) and ACME account credentials (by directory and email).
/// `load` answers `Ok(None)` when there is nothing usable and `Err` when what is there cannot be
/// read as it must be (a sealed key the configured key does not open).
pub trait CertStorage: Send + Sync {
    fn load<'a>(&'a self, cert_name: &'a str) -> StoreFuture<'a, Option<StoredCert>>;
    fn save<'a>(&'a self, cert_name: &'a str, cert: &'a StoredCert) -> StoreFuture<'a, ()>;
    fn load_account<'a>(&'a self, directory_url: &'a str, email: &'a str) -> StoreFuture<'a, Option<String>>;
    fn save_account<'a>(&'a self, directory_url: &'a str, email: &'a str, credentials_json: &'a str) -> StoreFuture<'a, ()>;
}

#[derive(Debug, Clone)]
pub struct CertStore {
    root: PathBuf,
}

impl CertStorage for CertStore {
    fn load<'a>(&'a self, cert_name: &'a str) -> StoreFuture<'a, Option<StoredCert>> {
        Box::pin(async move { Ok(CertStore::load(self, cert_name)) })
    }

    fn save<'a>(&'a self, cert_name: &'a str, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        Box::pin(async move { CertStore::save(self, cert_name, &cert.chain_pem, &cert.key_pem, &cert.meta) })
    }

    fn load_account<'a>(&'a self, directory_url: &'a str, email: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { Ok(CertStore::load_account(self, directory_url, email)) })
    }

    fn save_account<'a>(&'a self, directory_url: &'a str, email: &'a str, credentials_json: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { CertStore::save_account(self, directory_url, email, credentials_json) })
    }
}

impl CertStore {
    pub fn new(root: impl Into<PathBuf>) -> CertStore {
        CertStore { root: root.into() }
    }

    fn dir(&self, cert_name: &str) -> PathBuf {
        // A route name may hold anything; the folder name must stay inside the store.
        let safe: String = cert_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
            .collect();
        let safe = if safe.is_empty() || safe.chars().all(|c| c == '.') { "_".to_string() } else { safe };
        self.root.join(safe)
    }

    /// The stored certificate of `cert_name`, if a complete one is there.
    pub fn load(&self, cert_name: &str) -> Option<StoredCert> {
        let dir = self.dir(cert_name);
        let cert = fs::read_to_string(dir.join("cert.pem")).ok()?;
        let key = fs::read_to_string(dir.join("key.pem")).ok()?;
        let meta: CertMeta = serde_json::from_str(&fs::read_to_string(dir.join("meta.json")).ok()?).ok()?;
        let mut chain_pem = cert;
        if let Ok(ca) = fs::read_to_string(dir.join("ca.pem")) {
            if !chain_pem.ends_with('\n') {
                chain_pem.push('\n');
            }
            chain_pem.push_str(&ca);
        }
        Some(StoredCert { chain_pem, key_pem: key, meta })
    }

    /// Writes the chain as cert.pem (the leaf) and ca.pem (the rest, when there is any).
    pub fn save(&self, cert_name: &str, chain_pem: &str, key_pem: &str, meta: &CertMeta) -> Result<(), String> {
        let dir = self.dir(cert_name);
        fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let (leaf, rest) = split_leaf(chain_pem);
        write_atomically(&dir.join("key.pem"), key_pem.as_bytes(), 0o600)?;
        write_atomically(&dir.join("cert.pem"), leaf.as_bytes(), 0o644)?;
        if rest.trim().is_empty() {
            let _ = fs::remove_file(dir.join("ca.pem"));
        } else {
            write_atomically(&dir.join("ca.pem"), rest.as_bytes(), 0o644)?;
        }
        let meta = serde_json::to_vec_pretty(meta).map_err(|err| err.to_string())?;
        write_atomically(&dir.join("meta.json"), &meta, 0o644)
    }

    /// Account credentials for one directory and email (JSON of instant-acme's credentials).
    pub fn load_account(&self, directory_url: &str, email: &str) -> Option<String> {
        fs::read_to_string(self.account_path(directory_url, email)).ok()
    }

    pub fn save_account(&self, directory_url: &str, email: &str, credentials_json: &str) -> Result<(), String> {
        fs::create_dir_all(&self.root).map_err(|err| format!("cannot create {}: {err}", self.root.display()))?;
        write_atomically(&self.account_path(directory_url, email), credentials_json.as_bytes(), 0o600)
    }

    fn account_path(&self, directory_url: &str, email: &str) -> PathBuf {
        self.root.join(format!("account-{}.json", account_id(directory_url, email)))
    }
}

/// Names an ACME account in a store: a hash of its directory and email.
pub fn account_id(directory_url: &str, email: &str) -> String {
    format!("{:016x}", fnv1a(format!("{directory_url}\n{email}").as_bytes()))
}

/// The first PEM block and everything after it.
fn split_leaf(chain_pem: &str) -> (&str, &str) {
    const END: &str = "-----END CERTIFICATE-----";
    match chain_pem.find(END) {
        Some(at) => {
            let mut cut = at + END.len();
            if chain_pem[cut..].starts_with("\r\n") {
                cut += 2;
            } else if chain_pem[cut..].starts_with('\n') {
                cut += 1;
            }
            (&chain_pem[..cut], &chain_pem[cut..])
        }
        None => (chain_pem, ""),
    }
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    // Unique per write: two tasks of one process replacing the same file must not share a temp file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` only applies to files that did not exist; a stale temp file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|err| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {err}", path.display())
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

pub fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_split_into_leaf_and_rest() {
        let chain = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        let (leaf, rest) = split_leaf(chain);
        assert_eq!(leaf, "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n");
        assert!(rest.contains("\nB\n"));
        assert_eq!(split_leaf("x").1, "");
    }

    #[test]
    fn files_round_trip_with_private_modes_and_safe_folder_names() {
        let root = std::env::temp_dir().join(format!("smartproxy-store-test-{}", std::process::id()));
        let store = CertStore::new(&root);
        let meta = CertMeta { domains: vec!["a.test".into()], issued_at: 1, expires_at: 2, source: "acme".into(), directory_url: None };
        let chain = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        store.save("../evil/name", chain, "KEY", &meta).unwrap();
        let dir = root.join(".._evil_name");
        assert_eq!(fs::metadata(dir.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = store.load("../evil/name").unwrap();
        assert_eq!(loaded.chain_pem, chain);
        assert_eq!(loaded.key_pem, "KEY");
        store.save_account("https://acme/dir", "a@b", "{}").unwrap();
        assert_eq!(store.load_account("https://acme/dir", "a@b").as_deref(), Some("{}"));
        assert!(store.load_account("https://other/dir", "a@b").is_none());
        let _ = fs::remove_dir_all(&root);
    }
}
