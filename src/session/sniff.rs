//! The Sniffing state: reading the first bytes of a connection (kept, to be replayed to the
//! backend) until they tell TLS from HTTP from anything else, within `initialDataTimeout`.

use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::http::sniff::{sniff as sniff_http, HttpSniff, MAX_HEAD_BYTES};
use crate::metrics::TerminationReason;
use crate::tls::client_hello::{parse_client_hello, ClientHelloInfo, ClientHelloParse, MAX_CLIENT_HELLO_BYTES};

#[derive(Debug)]
pub enum Sniffed {
    Tls(ClientHelloInfo),
    Http { host: Option<String> },
    Other,
}

const READ_CHUNK: usize = 4096;
const MAX_SNIFF_BYTES: usize = if MAX_CLIENT_HELLO_BYTES > MAX_HEAD_BYTES { MAX_CLIENT_HELLO_BYTES } else { MAX_HEAD_BYTES };

/// Reads into `buf` until the prefix classifies. `on_read` counts every byte taken from the client.
/// The first byte must come by `deadline`; from it, the rest must follow within `head_timeout`
/// (a request head or ClientHello trickled in byte by byte does not hold a connection for long).
pub async fn sniff(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut deadline: Instant,
    head_timeout: std::time::Duration,
    on_read: impl Fn(usize),
) -> Result<Sniffed, TerminationReason> {
    loop {
        if let Some(found) = classify(buf)? {
            return Ok(found);
        }
        if buf.len() >= MAX_SNIFF_BYTES {
            return Ok(Sniffed::Other);
        }
        buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout_at(deadline.into(), client.read_buf(buf)).await;
        match read {
            Err(_) => return Err(TerminationReason::InitialDataTimeout),
            Ok(Err(_)) => return Err(TerminationReason::ClientError),
            Ok(Ok(0)) => return Err(TerminationReason::ClientClosedBeforeData),
            Ok(Ok(n)) => {
                if buf.len() == n {
                    deadline = deadline.min(Instant::now() + head_timeout);
                }
                on_read(n);
            }
        }
    }
}

/// `Ok(None)`: not decided yet, read more.
fn classify(buf: &[u8]) -> Result<Option<Sniffed>, TerminationReason> {
    if buf.is_empty() {
        return Ok(None);
    }
    match parse_client_hello(buf) {
        ClientHelloParse::Complete(info) => return Ok(Some(Sniffed::Tls(info))),
        ClientHelloParse::Incomplete => return Ok(None),
        ClientHelloParse::Invalid(_) => return Err(TerminationReason::InvalidTls),
        ClientHelloParse::NotTls => {}
    }
    Ok(match sniff_http(buf) {
        HttpSniff::Request { host } => Some(Sniffed::Http { host }),
        HttpSniff::H2Preface => Some(Sniffed::Http { host: None }),
        HttpSniff::Incomplete => None,
        HttpSniff::NotHttp => Some(Sniffed::Other),
    })
}
