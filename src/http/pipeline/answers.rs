//! The answers the proxy writes itself: refusals (edge rules, security), a route's native
//! responses (redirects, static bodies, blocks), and the failures to reach an upstream.

use std::sync::atomic::Ordering;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};

use super::Answer;
use crate::http::body::{empty, full, text_response, ProxyBody};
use crate::http::edge;
use crate::templates::TemplateContext;
use crate::http::pool::UpstreamError;
use crate::routing::table::{NativeResponse, Route};
use crate::security::http::Refusal as SecurityRefusal;

/// A request the edge rules refuse: the reason as the body; an HTTP/1 connection closes after it.
pub(super) fn edge_refusal(refusal: edge::Refusal, version: Version) -> Response<ProxyBody> {
    let mut response = text_response(refusal.status, refusal.reason);
    if version < Version::HTTP_2 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request the route's rate limit or authentication refuses.
pub(super) fn security_refusal(route: &Route, refusal: SecurityRefusal) -> Response<ProxyBody> {
    match refusal {
        SecurityRefusal::RateLimited { retry_after_secs, message } => {
            route.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(full(format!("{message}\n")));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        SecurityRefusal::Unauthorized { challenge } => {
            route.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut response = text_response(StatusCode::UNAUTHORIZED, "authentication required");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            response
        }
    }
}

/// What a route with a native response answers, without any upstream.
pub(super) fn native_response(native: &NativeResponse, templates: &TemplateContext<'_>) -> Response<ProxyBody> {
    match native {
        NativeResponse::Redirect { location, status } => {
            let path_with_query = if templates.query.is_empty() {
                templates.path.to_string()
            } else {
                format!("{}?{}", templates.path, templates.query)
            };
            let rendered = location
                .replace("{domain}", templates.domain)
                .replace("{port}", &templates.port.to_string())
                .replace("{path}", &path_with_query)
                .replace("{query}", templates.query)
                .replace("{clientIp}", &templates.client_ip.to_string())
                .replace("{routeName}", templates.route_name);
            let mut response = Response::new(empty());
            *response.status_mut() = *status;
            match HeaderValue::from_str(&rendered) {
                Ok(value) => {
                    response.headers_mut().insert(header::LOCATION, value);
                    response
                }
                Err(_) => text_response(StatusCode::BAD_REQUEST, "the redirect target is not a valid header value"),
            }
        }
        NativeResponse::Response { status, headers, body } => {
            let mut response = Response::new(full(body.clone()));
            *response.status_mut() = *status;
            for (name, value) in headers {
                response.headers_mut().insert(name.clone(), value.clone());
            }
            response
        }
        NativeResponse::Block { status, message } => {
            let mut response = Response::new(full(message.clone()));
            *response.status_mut() = *status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response
        }
    }
}

/// A backend that could not be reached.
pub(super) fn upstream_failure(err: UpstreamError) -> Answer {
    tracing::debug!(error = %err, "upstream unavailable");
    let message = match err {
        UpstreamError::ConnectTimeout => "connecting to the upstream server timed out",
        UpstreamError::ConnectFailed(_) => "the upstream server refused the connection",
        UpstreamError::Tls(_) => "the TLS handshake with the upstream server failed",
        UpstreamError::Handshake(_) => "the upstream server failed the handshake",
        UpstreamError::Quic(_) => "the QUIC connection to the upstream server failed",
        UpstreamError::PoolExhausted => "too many connections to the upstream server",
    };
    text_response(StatusCode::BAD_GATEWAY, message)
}
