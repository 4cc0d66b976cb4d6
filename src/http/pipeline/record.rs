//! What the access log learns of a request: the request as the client sent it (before any phase
//! rewrites it, and without its query or credentials), then the route, backend and status, and
//! the bytes and time once the response has been passed on. Made only when the log is on.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{header, Response, Version};
use hyper::body::Body;

use super::ConnectionContext;
use crate::access_log::{AccessLog, AccessRecord, LogFormat, Opening};
use crate::http::body::ProxyBody;

/// A request's record and the log it goes to: it is written when this is dropped, wherever the
/// request ends (its response body's end, the proxy's own answer, or the client leaving first,
/// which the termination says until a response exists).
pub(super) struct PendingRecord {
    record: AccessRecord,
    log: Arc<AccessLog>,
}

impl Deref for PendingRecord {
    type Target = AccessRecord;

    fn deref(&self) -> &AccessRecord {
        &self.record
    }
}

impl DerefMut for PendingRecord {
    fn deref_mut(&mut self) -> &mut AccessRecord {
        &mut self.record
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        self.log.submit(&self.record);
    }
}

impl PendingRecord {
    pub fn begin(conn: &ConnectionContext, head: &Parts, received: Instant) -> Option<PendingRecord> {
        let log = conn.env.access_log.as_ref()?;
        let (referer, user_agent) = match log.format() {
            LogFormat::Combined => (
                head.headers.get(header::REFERER).and_then(|v| v.to_str().ok()).map(without_secrets),
                head.headers.get(header::USER_AGENT).map(http::HeaderValue::as_bytes),
            ),
            LogFormat::Json => (None, None),
        };
        let opening = Opening {
            client_ip: conn.header_values.client_ip_text(),
            method: Some(head.method.as_str()),
            host: request_host(head),
            path: Some(head.uri.path().as_bytes()),
            protocol: protocol_name(head.version),
            tls: conn.https(),
            referer: referer.as_deref().map(str::as_bytes),
            user_agent,
        };
        let mut record = log.begin(&opening, received);
        record.termination = "client_aborted";
        Some(PendingRecord { record, log: log.clone() })
    }

    /// A response the proxy gave itself (or a 101): it is whole already, and the request is over.
    pub fn answered(mut self, route: Option<&Arc<crate::routing::table::Route>>, response: &Response<ProxyBody>) {
        let status = response.status().as_u16();
        self.route = route.map(|r| r.label.clone());
        self.status = Some(status);
        self.bytes_out = response.body().size_hint().exact().unwrap_or(0);
        self.termination = if status == 101 { "upgraded" } else { "completed" };
    }
}

pub(super) fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// The host the client named: `Host`, else the target's authority (HTTP/2's `:authority`),
/// without any user information.
fn request_host(head: &Parts) -> Option<&[u8]> {
    if let Some(host) = head.headers.get(header::HOST) {
        return Some(host.as_bytes());
    }
    let authority = head.uri.authority()?.as_str();
    Some(authority.rsplit_once('@').map_or(authority, |(_, host)| host).as_bytes())
}

/// A URL as a log may keep it: no user information, no query, no fragment.
fn without_secrets(url: &str) -> Cow<'_, str> {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return Cow::Owned(format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]));
        }
    }
    Cow::Borrowed(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referers_lose_credentials_queries_and_fragments() {
        assert_eq!(without_secrets("https://user:pw@example.com/a/b?token=1#x"), "https://example.com/a/b");
        assert_eq!(without_secrets("https://example.com/p@th?q"), "https://example.com/p@th");
        assert_eq!(without_secrets("/relative?secret"), "/relative");
        assert_eq!(without_secrets("https://example.com"), "https://example.com");
    }
}
