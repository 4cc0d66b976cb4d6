//! Certificates that change while a route table lives: a `CertSlot` per automatic-certificate
//! route (ACME or `certProvisionFunction`), shared by every table compiled from the same engine,
//! so an installed or renewed certificate serves the next handshake while open connections keep
//! the one they negotiated. Also turns PEM into rustls signing keys and reads validity dates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate ready to serve, with the dates renewal and status need.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LoadedCert {
    /// `chain_pem`: the leaf first, then intermediates.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<LoadedCert, String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("certificate: not valid PEM ({err})"))?;
        let leaf = chain.first().ok_or("certificate: no certificate in the PEM text")?;
        let (not_before, not_after) = validity(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| format!("key: not a valid PEM private key ({err})"))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|err| format!("key: {err}"))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|err| format!("certificate and key do not belong together ({err})"))?;
        Ok(LoadedCert { key: Arc::new(certified), not_before, not_after })
    }

    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
}

/// notBefore and notAfter of the first certificate of a PEM chain (the leaf).
pub fn leaf_validity(chain_pem: &str) -> Option<(SystemTime, SystemTime)> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    validity(&leaf).ok()
}

/// notBefore and notAfter of a DER certificate.
fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|err| format!("certificate: not a valid X.509 certificate ({err})"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let seconds = t.timestamp();
        if seconds >= 0 {
            UNIX_EPOCH + Duration::from_secs(seconds as u64)
        } else {
            UNIX_EPOCH
        }
    };
    Ok((at(parsed.validity().not_before), at(parsed.validity().not_after)))
}

/// What one automatic-certificate route serves: a certificate for all its domains, and
/// certificates per domain where `certProvisionFunction` gave one.
#[derive(Debug, Default)]
pub struct CertSlot {
    current: RwLock<SlotCerts>,
}

#[derive(Debug, Default)]
struct SlotCerts {
    route_wide: Option<Arc<CertifiedKey>>,
    by_domain: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSlot {
    pub fn install(&self, cert: &LoadedCert) {
        self.current.write().route_wide = Some(cert.key.clone());
    }

    pub fn install_for_domain(&self, domain: &str, cert: &LoadedCert) {
        self.current.write().by_domain.insert(domain.to_ascii_lowercase(), cert.key.clone());
    }

    pub fn is_empty(&self) -> bool {
        let current = self.current.read();
        current.route_wide.is_none() && current.by_domain.is_empty()
    }
}

/// The slots by certificate name (the route's name), kept across route updates.
#[derive(Debug, Default)]
pub struct CertSlots {
    slots: Mutex<HashMap<String, Arc<CertSlot>>>,
}

impl CertSlots {
    pub fn slot(&self, name: &str) -> Arc<CertSlot> {
        self.slots.lock().entry(name.to_string()).or_default().clone()
    }

    /// Forgets the slots no route names any more.
    pub fn retain(&self, names: &[&str]) {
        self.slots.lock().retain(|name, _| names.contains(&name.as_str()));
    }
}

/// rustls' view of a slot. With nothing installed yet the handshake fails with an alert.
#[derive(Debug)]
pub struct SlotResolver(pub Arc<CertSlot>);

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.0.current.read();
        if !current.by_domain.is_empty() {
            if let Some(name) = hello.server_name() {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if let Some(cert) = current.by_domain.get(&name) {
                    return Some(cert.clone());
                }
            }
        }
        current.route_wide.clone()
    }
}
