//! What the access log learns of a request: the request as the client sent it (before any phase
//! rewrites it, and without its query or credentials), then the route, backend and status, and
//! the bytes and time once the response has been passed on. Made only when the log is on.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{header, Response, Version};
use hyper::body::Body;

use super::ConnectionContext;
use crate::access_log::{clipped, AccessLog, AccessRecord, LogFormat};
use crate::http::body::ProxyBody;

/// A request's record and the log it goes to: it is written when this is dropped, wherever the
/// request ends (its response body's end, the proxy's own answer, or the client leaving first,
/// which the termination says until a response exists).
pub(super) struct PendingRecord {
    record: ManuallyDrop<Box<AccessRecord>>,
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
        // SAFETY: the record is taken here only, once, and nothing uses it after.
        let mut record = unsafe { ManuallyDrop::take(&mut self.record) };
        record.duration = record.started.elapsed();
        self.log.submit(record);
    }
}

impl PendingRecord {
    pub fn begin(conn: &ConnectionContext, head: &Parts, received: Instant) -> Option<PendingRecord> {
        let log = conn.env.access_log.as_ref()?;
        let mut record = Box::new(AccessRecord::begin(conn.client_ip, protocol_name(head.version), conn.https, received));
        record.termination = "client_aborted";
        record.method = Some(head.method.clone());
        record.host = request_host(head);
        record.path = Some(clipped(head.uri.path()));
        if log.format() == LogFormat::Combined {
            record.referer = head.headers.get(header::REFERER).and_then(|v| v.to_str().ok()).map(|v| clipped(&without_secrets(v)));
            record.user_agent = head.headers.get(header::USER_AGENT).map(header_text);
        }
        Some(PendingRecord { record: ManuallyDrop::new(record), log: log.clone() })
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
fn request_host(head: &Parts) -> Option<Box<str>> {
    if let Some(host) = head.headers.get(header::HOST) {
        return Some(header_text(host));
    }
    let authority = head.uri.authority()?.as_str();
    Some(clipped(authority.rsplit_once('@').map_or(authority, |(_, host)| host)))
}

/// A header's value as text for the log (bytes beyond ASCII replaced), clipped.
fn header_text(value: &http::HeaderValue) -> Box<str> {
    match value.to_str() {
        Ok(text) => clipped(text),
        Err(_) => clipped(&String::from_utf8_lossy(value.as_bytes())),
    }
}

/// A URL as a log may keep it: no user information, no query, no fragment.
fn without_secrets(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
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
