//! The outermost middleware: gives every request a request id and a W3C trace context, runs it
//! inside a tracing span carrying both, counts and times it by route, logs its outcome, and
//! turns bare error responses from layers (404, 405, 408, 413, panics) into JSON errors.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use tracing::Instrument;

use super::error::status_error;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{CoreMetrics, HttpLabels, RouteLabels};

/// Identifies one request across logs, audit records and the response headers.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub request_id: String,
    /// W3C trace id: the caller's when it sent a valid `traceparent`, else a new one.
    pub trace_id: String,
    /// Our span within that trace.
    pub span_id: String,
}

/// The request id for handlers outside the API's authentication layer (panel forms).
#[derive(Clone, Debug, Default)]
pub struct RequestId(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RequestId(
            parts
                .extensions
                .get::<RequestContext>()
                .map(|c| c.request_id.clone()),
        ))
    }
}

/// The route template that served a response, carried outwards for metrics and audit.
#[derive(Clone, Debug)]
pub struct RouteTemplate(pub String);

/// `route_layer` that records which route template matched.
pub async fn remember_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let mut response = next.run(request).await;
    // Nested routers record first, with the full template; the outer one must not overwrite it.
    if let Some(route) = route
        && response.extensions().get::<RouteTemplate>().is_none()
    {
        response.extensions_mut().insert(RouteTemplate(route));
    }
    response
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Parses `traceparent` (version 00): `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
/// All-zero ids are invalid by the spec, and so is anything else malformed: we start a new trace.
pub fn parse_traceparent(headers: &HeaderMap) -> Option<String> {
    trace_id_of(headers.get("traceparent")?.to_str().ok()?)
}

fn trace_id_of(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = is_hex(version, 2)
        && version != "ff"
        && is_hex(trace, 32)
        && is_hex(parent, 16)
        && is_hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0')
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || parts.next().is_none());
    ok.then(|| trace.to_owned())
}

/// A caller-supplied `x-request-id` is kept if it is short and printable (it ends up in logs).
fn checked_request_id(value: &str) -> Option<String> {
    let ok = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| value.to_owned())
}

/// Vehicles' bulk reads: chunks and image ranges.
pub const BULK_PREFIXES: &[&str] = &["/images/", "/chunks/"];

fn is_bulk(path: &str) -> bool {
    BULK_PREFIXES.iter().any(|p| path.starts_with(p))
}

impl RequestContext {
    /// The caller's request id and trace when valid, new ones otherwise.
    fn for_request(headers: &HeaderMap) -> Self {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        Self::from_values(get("traceparent"), get("x-request-id"))
    }

    /// As [`Self::for_request`], from the `traceparent` and `x-request-id` values.
    pub fn from_values(traceparent: Option<&str>, request_id: Option<&str>) -> Self {
        Self {
            trace_id: traceparent
                .and_then(trace_id_of)
                .unwrap_or_else(|| random_hex(16)),
            span_id: random_hex(8),
            request_id: request_id
                .and_then(checked_request_id)
                .unwrap_or_else(|| random_hex(12)),
        }
    }
}

pub async fn observe(
    State(metrics): State<CoreMetrics>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let ids = RequestContext::for_request(request.headers());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    request.extensions_mut().insert(ids.clone());
    // Bulk reads by vehicles (thousands per image) get a debug span: at the default level it
    // is never formatted.
    let span = if is_bulk(&path) {
        tracing::debug_span!(
            "request",
            method = %method,
            path = %path,
            request_id = %ids.request_id,
            trace_id = %ids.trace_id,
            span_id = %ids.span_id,
        )
    } else {
        tracing::info_span!(
            "request",
            method = %method,
            path = %path,
            request_id = %ids.request_id,
            trace_id = %ids.trace_id,
            span_id = %ids.span_id,
        )
    };

    metrics.http_in_flight.inc();
    let mut response = next.run(request).instrument(span.clone()).await;
    metrics.http_in_flight.dec();

    if response.status().as_u16() >= 400 && !has_own_body(&response) {
        response = json_error(response).await;
    }
    let route = response
        .extensions()
        .get::<RouteTemplate>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| "unmatched".to_owned());
    span.in_scope(|| {
        finish(
            &metrics,
            &method,
            &path,
            &route,
            started,
            &ids,
            &mut response,
        )
    });
    response
}

/// What `observe` does for the responses the bulk fast path writes itself: the same metrics
/// and log line, with the metric handles looked up once instead of per request.
pub struct DirectObserver {
    route: &'static str,
    ok: Counter,
    partial: Counter,
    duration: Histogram,
}

impl DirectObserver {
    /// For `GET` requests that the router would report as `route`.
    pub fn new(metrics: &CoreMetrics, route: &'static str) -> Self {
        let count = |status| {
            metrics
                .http_requests
                .get_or_create(&HttpLabels {
                    method: "GET".into(),
                    route: route.into(),
                    status,
                })
                .clone()
        };
        Self {
            route,
            ok: count(200),
            partial: count(206),
            duration: metrics
                .http_duration
                .get_or_create(&RouteLabels {
                    method: "GET".into(),
                    route: route.into(),
                })
                .clone(),
        }
    }

    /// Counts, times and logs one answered `GET` (status 200 or 206).
    pub fn finish(&self, path: &str, status: u16, started: Instant, ids: &RequestContext) {
        let elapsed = started.elapsed();
        match status {
            206 => &self.partial,
            _ => &self.ok,
        }
        .inc();
        self.duration.observe(elapsed.as_secs_f64());
        tracing::debug!(
            status,
            route = %self.route,
            path,
            request_id = %ids.request_id,
            trace_id = %ids.trace_id,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// Counts and times a finished request, logs it, and stamps its ids on the response.
fn finish(
    metrics: &CoreMetrics,
    method: &axum::http::Method,
    path: &str,
    route: &str,
    started: Instant,
    ids: &RequestContext,
    response: &mut Response,
) {
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method.to_string(),
            route: route.to_owned(),
            status,
        })
        .inc();
    metrics
        .http_duration
        .get_or_create(&RouteLabels {
            method: method.to_string(),
            route: route.to_owned(),
        })
        .observe(elapsed.as_secs_f64());

    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    // Probes and scrapes arrive every few seconds, and a vehicle makes thousands of chunk or
    // range requests per image; at info they would drown the log and cost the transfer a log
    // write each (metrics still count them, and bytes served).
    let routine = route.starts_with("/health")
        || route == "/metrics"
        || route == "/assets/{file}"
        || is_bulk(path);
    if status >= 500 {
        tracing::error!(status, route = %route, elapsed_ms, "request failed");
    } else if routine {
        tracing::debug!(status, route = %route, elapsed_ms, "request");
    } else {
        tracing::info!(status, route = %route, elapsed_ms, "request");
    }

    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ids.request_id) {
        headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("00-{}-{}-01", ids.trace_id, ids.span_id)) {
        headers.insert("traceparent", v);
    }
}

/// Responses that already have a JSON, HTML or event-stream body keep it.
fn has_own_body(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/json")
                || ct.starts_with("text/html")
                || ct.starts_with("text/event-stream")
        })
}

async fn json_error(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    // Layer errors carry at most a short plain-text reason; keep it as the message.
    let message = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok());
    let mut json = status_error(parts.status, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    *json.extensions_mut() = parts.extensions;
    json.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(tp).unwrap());
        h
    }

    #[test]
    fn traceparent_is_honoured_only_when_valid() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(&headers(good)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(&headers(bad)), None, "{bad}");
        }
    }
}
