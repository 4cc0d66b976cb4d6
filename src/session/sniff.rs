//! The Sniffing state: reading the first bytes of a connection (kept, to be replayed to the
//! backend) until they tell TLS from HTTP from anything else, within `initialDataTimeout`.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::http::edge::Refusal;
use crate::http::head::{parse_head, HeadParse, RequestHead};
use crate::metrics::TerminationReason;
use crate::tls::client_hello::{parse_client_hello, ClientHelloInfo, ClientHelloParse, MAX_CLIENT_HELLO_BYTES};

#[derive(Debug)]
pub enum Sniffed {
    Tls(ClientHelloInfo),
    /// A complete HTTP/1.x request head that meets the edge rules.
    Http(Box<RequestHead>),
    /// The HTTP/2 prior-knowledge preface.
    H2Preface,
    /// HTTP that the edge rules refuse.
    RefusedHttp(Refusal),
    Other,
}

const READ_CHUNK: usize = 4096;

/// Reads into `buf` until the prefix classifies. `on_read` counts every byte taken from the client.
/// The first byte must come by `deadline`; from it, the rest must follow within `head_timeout`
/// (a request head or ClientHello trickled in byte by byte does not hold a connection for long).
/// `max_head` is the engine's `maxHeaderSize`.
pub async fn sniff<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
    head_timeout: std::time::Duration,
    max_head: usize,
    on_read: impl Fn(usize),
) -> Result<Sniffed, TerminationReason> {
    // Both parsers decide by themselves before their limits; this is a backstop.
    let most = MAX_CLIENT_HELLO_BYTES.max(max_head) + READ_CHUNK;
    read_until(client, buf, deadline, head_timeout, most, on_read, |bytes| classify(bytes, max_head)).await.map(|found| found.unwrap_or(Sniffed::Other))
}

/// The first request head inside a terminated TLS connection (HTTP/1.x by ALPN), read and checked
/// as a plain connection's is. `None`: the bytes were no HTTP/1.x head within the limits.
pub async fn read_first_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
    head_timeout: std::time::Duration,
    max_head: usize,
) -> Result<Option<HeadParse>, TerminationReason> {
    let classify = |bytes: &[u8]| {
        Ok(match parse_head(bytes, max_head) {
            HeadParse::Incomplete => None,
            decided => Some(decided),
        })
    };
    read_until(stream, buf, deadline, head_timeout, max_head + READ_CHUNK, |_| {}, classify).await
}

/// Reads into `buf` until `classify` decides, or `most` bytes came undecided (`Ok(None)`).
async fn read_until<S: AsyncRead + Unpin, T>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    mut deadline: Instant,
    head_timeout: std::time::Duration,
    most: usize,
    on_read: impl Fn(usize),
    classify: impl Fn(&[u8]) -> Result<Option<T>, TerminationReason>,
) -> Result<Option<T>, TerminationReason> {
    loop {
        if let Some(found) = classify(buf)? {
            return Ok(Some(found));
        }
        if buf.len() >= most {
            return Ok(None);
        }
        buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout_at(deadline.into(), stream.read_buf(buf)).await;
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
fn classify(buf: &[u8], max_head: usize) -> Result<Option<Sniffed>, TerminationReason> {
    if buf.is_empty() {
        return Ok(None);
    }
    match parse_client_hello(buf) {
        ClientHelloParse::Complete(info) => return Ok(Some(Sniffed::Tls(info))),
        ClientHelloParse::Incomplete => return Ok(None),
        ClientHelloParse::Invalid(_) => return Err(TerminationReason::InvalidTls),
        ClientHelloParse::NotTls => {}
    }
    Ok(match parse_head(buf, max_head) {
        HeadParse::Request(head) => Some(Sniffed::Http(Box::new(head))),
        HeadParse::H2Preface => Some(Sniffed::H2Preface),
        HeadParse::Refused(refusal) => Some(Sniffed::RefusedHttp(refusal)),
        HeadParse::Incomplete => None,
        HeadParse::NotHttp => Some(Sniffed::Other),
    })
}
