//! rustls configs built once per route table: a `ServerConfig` per terminating route (its
//! certificate chain and key, ALPN `h2` + `http/1.1`, allowed versions, session resumption by
//! tickets and by a session cache) and a `ClientConfig` per re-encrypting route or target (system
//! roots plus the route's or target's CA, or no verification when the config explicitly opts out).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion};

/// Where Debian (and most Linux systems) keep the trusted roots as one PEM bundle.
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
pub const ALPN_H3: &[u8] = b"h3";

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn versions(names: &[String]) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    if names.is_empty() {
        return Ok(vec![&rustls::version::TLS13, &rustls::version::TLS12]);
    }
    let mut out = Vec::new();
    for name in names {
        match name.as_str() {
            "TLSv1.3" => out.push(&rustls::version::TLS13),
            "TLSv1.2" => out.push(&rustls::version::TLS12),
            "TLSv1.0" | "TLSv1.1" => {}
            other => return Err(format!("{other:?} is not a TLS version")),
        }
    }
    if out.is_empty() {
        return Err("TLSv1.0 and TLSv1.1 are not supported (insecure); allow TLSv1.2 or TLSv1.3".into());
    }
    Ok(out)
}

fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{what}: not valid PEM certificates ({err})"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate found in the PEM text"));
    }
    Ok(certs)
}

/// The acceptor config of a terminating route. Errors name what is wrong with the PEM.
/// `alpn`: what the server may select (`h2`, `http/1.1` for the HTTP engine; nothing for socket
/// handlers, which get bytes of whatever protocol the client speaks).
pub fn server_config(cert_pem: &str, key_pem: &str, ca_pem: Option<&str>, allowed: &[String], alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, String> {
    let mut chain = certificates(cert_pem, "cert")?;
    if let Some(ca) = ca_pem {
        chain.extend(certificates(ca, "ca")?);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| format!("key: not a valid PEM private key ({err})"))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions(allowed)?)
        .map_err(|err| err.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| format!("cert/key: {err}"))?;
    finish_server_config(config, alpn)
}

/// The acceptor config of an automatic-certificate route: the certificate is looked up in its
/// slot at each handshake (none yet: the handshake fails with an alert).
pub fn server_config_with_resolver(resolver: Arc<dyn ResolvesServerCert>, allowed: &[String], alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, String> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions(allowed)?)
        .map_err(|err| err.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    finish_server_config(config, alpn)
}

fn finish_server_config(mut config: ServerConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, String> {
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|err| err.to_string())?;
    Ok(Arc::new(config))
}

/// What QUIC connections of one port share across handshakes: session resumption by tickets and
/// by a session cache, as the TCP acceptors have.
#[derive(Debug, Clone)]
pub struct QuicResumption {
    /// None: the system's randomness failed; the session cache alone resumes.
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

impl QuicResumption {
    pub fn new() -> QuicResumption {
        let ticketer = match rustls::crypto::ring::Ticketer::new() {
            Ok(ticketer) => Some(ticketer),
            Err(err) => {
                tracing::warn!(error = %err, "QUIC session tickets unavailable");
                None
            }
        };
        QuicResumption { ticketer, cache: rustls::server::ServerSessionMemoryCache::new(4096) }
    }
}

/// The TLS side of one QUIC connection: TLS 1.3 only (QUIC has no other), ALPN `h3`, no early
/// data (a replayed 0-RTT request would reach a backend twice), and the certificate `resolver`
/// picks from the client's hello.
pub fn quic_server_config(resolver: Arc<dyn ResolvesServerCert>, resumption: &QuicResumption) -> Result<quinn::crypto::rustls::QuicServerConfig, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| err.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H3.to_vec()];
    if let Some(ticketer) = &resumption.ticketer {
        config.ticketer = ticketer.clone();
    }
    config.session_storage = resumption.cache.clone();
    config.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(|err| err.to_string())
}

/// The connector config of a re-encrypting route or target; `allowed` lists the TLS versions it
/// may speak (empty: TLSv1.2 and TLSv1.3), `alpn` what may be offered upstream.
pub fn client_config(extra_ca_pem: Option<&str>, verify: bool, allowed: &[String], alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider()).with_protocol_versions(&versions(allowed)?).map_err(|err| err.to_string())?;
    let mut config = if verify {
        let mut roots = RootCertStore::empty();
        for path in SYSTEM_ROOTS {
            if let Ok(bundle) = std::fs::read(path) {
                for cert in CertificateDer::pem_slice_iter(&bundle).flatten() {
                    let _ = roots.add(cert);
                }
                break;
            }
        }
        if let Some(ca) = extra_ca_pem {
            for cert in certificates(ca, "ca")? {
                roots.add(cert).map_err(|err| format!("ca: {err}"))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider()))).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// `rejectUnauthorized: false`: the user opted out of verifying the upstream (self-signed lab
/// backends). Signatures are still checked so the handshake itself stays sound.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_parsed_and_old_ones_refused_alone() {
        assert_eq!(versions(&[]).unwrap().len(), 2);
        assert_eq!(versions(&["TLSv1.3".into()]).unwrap().len(), 1);
        assert_eq!(versions(&["TLSv1.1".into(), "TLSv1.2".into()]).unwrap().len(), 1);
        assert!(versions(&["TLSv1.0".into()]).is_err());
        assert!(versions(&["SSLv3".into()]).is_err());
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let err = server_config("not pem", "not pem", None, &[], &[]).unwrap_err();
        assert!(err.starts_with("cert:"), "{err}");
    }

    #[test]
    fn client_configs_build_with_and_without_verification() {
        assert!(client_config(None, true, &[], &[ALPN_HTTP11]).is_ok());
        assert!(client_config(None, false, &["TLSv1.3".into()], &[ALPN_H2, ALPN_HTTP11]).is_ok());
        assert!(client_config(None, true, &["TLSv1.0".into()], &[ALPN_HTTP11]).is_err());
    }
}
