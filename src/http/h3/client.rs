//! The backend side of HTTP/3 (`backendProtocol: 'http3'`): QUIC connections to a backend from
//! the pool's client endpoints, each multiplexing every client's requests as an HTTP/2 connection
//! does. A request's body is sent by a task of its own while its response is awaited (a backend
//! may answer before it has read the body), and the response body is read as it arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h3::error::{Code, StreamError};
use http::request::Parts;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::MessageBody;
use crate::http::headers::content_length;
use crate::http::body::ProxyBody;
use crate::http::pool::{UpstreamError, UpstreamTls};

pub type RecvStream = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;
type SendStream = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// A backend's response body off its stream.
pub type ResponseBody = MessageBody<RecvStream>;

/// One QUIC connection to a backend, shared by the requests on it.
#[derive(Clone)]
pub struct H3Upstream {
    sender: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    connection: quinn::Connection,
}

impl H3Upstream {
    /// The connection is closed (by either side, or idle): the pool dials again.
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// Datagrams the backend sent on this connection so far.
    pub fn datagrams_received(&self) -> u64 {
        self.connection.stats().udp_rx.datagrams
    }

    /// Gives the connection up (a backend silent through a whole response timeout): the pool
    /// sees it closed and dials again.
    pub fn abandon(&self) {
        self.connection.close(quinn::VarInt::from_u32(0x100), b"no answer");
    }
}

/// Keep-alive pings on idle upstream connections, and the silence after which one is dead: QUIC
/// hears of no refused port (no ICMP reaches quinn), so a backend that went away without closing
/// its connections is found out only by its silence.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The client endpoints of one pool, bound on first use: one per address family, each a single
/// UDP socket for all of the pool's QUIC connections of that family.
#[derive(Default)]
pub struct QuicClients {
    v4: std::sync::OnceLock<quinn::Endpoint>,
    v6: std::sync::OnceLock<quinn::Endpoint>,
}

impl QuicClients {
    fn endpoint(&self, to: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let (slot, local): (_, SocketAddr) = if to.is_ipv4() { (&self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into()) } else { (&self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into()) };
        if let Some(endpoint) = slot.get() {
            return Ok(endpoint.clone());
        }
        let endpoint = quinn::Endpoint::client(local)?;
        // Another request may have bound one meanwhile: theirs is kept, this one dropped.
        Ok(slot.get_or_init(|| endpoint).clone())
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    static TRANSPORT: std::sync::OnceLock<Arc<quinn::TransportConfig>> = std::sync::OnceLock::new();
    TRANSPORT
        .get_or_init(|| {
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(KEEP_ALIVE)).max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
            Arc::new(transport)
        })
        .clone()
}

/// A new QUIC connection to `host:port` with TLS `tls` (ALPN h3), ready for requests.
pub async fn connect(clients: &QuicClients, host: &str, port: u16, tls: &UpstreamTls, deadline: Instant) -> Result<H3Upstream, UpstreamError> {
    let within = |error: UpstreamError| move |_| error;
    let address = tokio::time::timeout_at(deadline.into(), tokio::net::lookup_host((host, port)))
        .await
        .map_err(within(UpstreamError::ConnectTimeout))?
        .map_err(UpstreamError::ConnectFailed)?
        .next()
        .ok_or_else(|| UpstreamError::ConnectFailed(std::io::Error::new(std::io::ErrorKind::NotFound, "the target resolves to no address")))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.config.clone()).map_err(|err| UpstreamError::Quic(format!("TLS config unfit for QUIC: {err}")))?;
    let endpoint = clients.endpoint(address).map_err(UpstreamError::ConnectFailed)?;
    let server_name = tls.server_name.to_str();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let connecting = endpoint
        .connect_with(config, address, &server_name)
        .map_err(|err| UpstreamError::Quic(err.to_string()))?;
    let connection = tokio::time::timeout_at(deadline.into(), connecting)
        .await
        .map_err(within(UpstreamError::ConnectTimeout))?
        .map_err(|err| UpstreamError::Quic(err.to_string()))?;
    let (mut driver, sender) = tokio::time::timeout_at(deadline.into(), h3::client::builder().build::<_, _, Bytes>(h3_quinn::Connection::new(connection.clone())))
        .await
        .map_err(within(UpstreamError::ConnectTimeout))?
        .map_err(|err| UpstreamError::Quic(err.to_string()))?;
    // The connection's control streams, until it closes.
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(H3Upstream { sender, connection })
}

/// Sends one request (its head an absolute URI: `:scheme`, `:authority`) and waits for the
/// response head.
pub async fn send(upstream: &H3Upstream, parts: Parts, body: ProxyBody) -> Result<Response<ResponseBody>, StreamError> {
    let mut sender = upstream.sender.clone();
    let stream = sender.send_request(Request::from_parts(parts, ())).await?;
    let (mut send, mut recv) = stream.split();
    if body.is_end_stream() {
        send.finish().await?;
    } else {
        tokio::spawn(send_body(send, body));
    }
    let response = recv.recv_response().await?;
    let expected = content_length(response.headers()).ok().flatten();
    // A backend's body longer than it said fails as it arrives; a malformed length is the
    // backend's own error, and its body is passed on as it comes.
    let (parts, ()) = response.into_parts();
    Ok(Response::from_parts(parts, MessageBody::new(recv, expected, None)))
}

/// The request body, frame by frame; a body that fails (the client left, or sent it malformed)
/// resets the stream, so the backend never takes a part for the whole.
async fn send_body(mut send: SendStream, mut body: ProxyBody) {
    let sent: Result<(), Box<dyn std::error::Error + Send + Sync>> = async {
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(data) if !data.is_empty() => send.send_data(data).await?,
                Ok(_) => {}
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(trailers).await?;
                    }
                }
            }
        }
        send.finish().await?;
        Ok(())
    }
    .await;
    if let Err(err) = sent {
        tracing::debug!(error = %err, "HTTP/3 request body not delivered upstream");
        send.stop_stream(Code::H3_REQUEST_CANCELLED);
    }
}
