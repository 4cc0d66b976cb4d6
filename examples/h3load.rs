//! A small HTTP/3 load generator for `bench/` (Debian's h2load is built without QUIC): C QUIC
//! connections with M concurrent request streams each, GET one URL for D seconds, and print one
//! JSON line with the requests completed. Certificates are not verified (the bench's are
//! self-signed).
//!
//! `h3load <host> <port> <authority> <path> <connections> <streams> <seconds>`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 8 {
        eprintln!("usage: h3load <host> <port> <authority> <path> <connections> <streams> <seconds>");
        std::process::exit(2);
    }
    let address: std::net::SocketAddr = format!("{}:{}", args[1], args[2]).parse()?;
    let authority = args[3].clone();
    let path = args[4].clone();
    let connections: usize = args[5].parse()?;
    let streams: usize = args[6].parse()?;
    let seconds: f64 = args[7].parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(address, authority, path, connections, streams, Duration::from_secs_f64(seconds)))
}

async fn run(address: std::net::SocketAddr, authority: String, path: String, connections: usize, streams: usize, duration: Duration) -> Result<(), Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let uri: http::Uri = format!("https://{authority}{path}").parse()?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..connections {
        let connection = endpoint.connect(address, authority.split(':').next().unwrap_or("localhost"))?.await?;
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(connection)).await?;
        drivers.push(tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        }));
        senders.push(sender);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for sender in &senders {
        for _ in 0..streams {
            let mut sender = sender.clone();
            let uri = uri.clone();
            let done = done.clone();
            let failed = failed.clone();
            workers.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let exchange = async {
                        let request = http::Request::get(uri.clone()).body(())?;
                        let mut stream = sender.send_request(request).await?;
                        stream.finish().await?;
                        let response = stream.recv_response().await?;
                        while let Some(mut chunk) = stream.recv_data().await? {
                            chunk.advance(chunk.remaining());
                        }
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(response.status())
                    };
                    match exchange.await {
                        Ok(status) if status.is_success() => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = done.load(Ordering::Relaxed);
    println!(
        "{{\"requests\":{requests},\"failed\":{},\"seconds\":{elapsed:.3},\"rps\":{:.1}}}",
        failed.load(Ordering::Relaxed),
        requests as f64 / elapsed
    );
    drop(senders);
    endpoint.close(0u32.into(), b"");
    Ok(())
}
