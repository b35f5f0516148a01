//! Serving file ranges to vehicles: one byte range per request (`Range`, `If-Range`), strong
//! ETags, 304 for `If-None-Match`, and a body streamed in blocks read positionally on the
//! blocking pool, so an image of gigabytes is never buffered and any number of responses share
//! one open file. Each block waits for the depot's bandwidth cap first. On plain-TCP HTTP/1
//! connections the response's [`FileRegion`] is sent with sendfile instead (`fastpath`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use atlasmesh_ota_staging::bandwidth::Bandwidth;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use super::error::ApiError;
use super::fastpath::FileRegion;

/// 256 KiB per read: large enough that the per-block overhead vanishes, small enough that 64
/// parallel downloads stay within a few tens of MiB.
const BLOCK: u64 = 256 * 1024;

/// A file (or a slice of one, for chunks inside a pack) to serve.
pub struct Servable {
    pub file: Arc<File>,
    /// Where the served object starts in the file and how long it is.
    pub base: u64,
    pub length: u64,
    /// Strong ETag value, without quotes (a SHA-256).
    pub etag: String,
    pub content_type: &'static str,
    /// Content addressed by hash never changes; mutable names must be revalidated.
    pub immutable: bool,
}

/// The byte range a request asks for, if it asks for one this server will honour.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    All,
    Range(u64, u64), // inclusive
    Unsatisfiable,
}

fn wanted(headers: &HeaderMap, length: u64, etag: &str) -> Wanted {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Wanted::All;
    };
    // If-Range: the range applies only to the representation the client already has.
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok())
        && if_range.trim() != format!("\"{etag}\"")
    {
        return Wanted::All;
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Wanted::All;
    };
    // Several ranges would need multipart responses; a full answer is allowed instead.
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Wanted::All;
    };
    let (start, end) = (start.trim(), end.trim());
    let parsed = match (start.is_empty(), end.is_empty()) {
        // bytes=-N: the last N bytes
        (true, false) => end.parse::<u64>().ok().map(|n| {
            if n == 0 {
                None
            } else {
                Some((length.saturating_sub(n), length.saturating_sub(1)))
            }
        }),
        (false, true) => start
            .parse::<u64>()
            .ok()
            .map(|s| Some((s, length.saturating_sub(1)))),
        (false, false) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some(Some((s, e.min(length.saturating_sub(1))))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => Wanted::All, // malformed: ignore, as RFC 9110 allows
        Some(None) => Wanted::Unsatisfiable,
        Some(Some((s, e))) if s >= length || length == 0 => {
            let _ = e;
            Wanted::Unsatisfiable
        }
        Some(Some((s, e))) => Wanted::Range(s, e),
    }
}

/// Builds the response for `servable` honouring the request's conditional and range headers.
pub fn serve(
    servable: Servable,
    headers: &HeaderMap,
    bandwidth: Bandwidth,
    served: Counter,
) -> Response {
    let etag = format!("\"{}\"", servable.etag);
    let cache = if servable.immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag.as_str()),
                (header::CACHE_CONTROL, cache),
            ],
        )
            .into_response();
    }
    let (status, start, end) = match wanted(headers, servable.length, &servable.etag) {
        Wanted::All => (StatusCode::OK, 0, servable.length),
        Wanted::Range(s, e) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
        Wanted::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                "the requested range is outside the file",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", servable.length)) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return response;
        }
    };
    let region = FileRegion {
        file: servable.file.clone(),
        start: servable.base + start,
        end: servable.base + end,
        bandwidth: bandwidth.clone(),
        served: served.clone(),
    };
    let body = stream(
        servable.file.clone(),
        servable.base + start,
        servable.base + end,
        bandwidth,
        served,
    );
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, servable.content_type)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, cache);
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", end - 1, servable.length),
        );
    }
    // The fast path sends the region with sendfile; hyper streams the body.
    response
        .extension(region)
        .body(body)
        .unwrap_or_else(|e| ApiError::internal(e).into_response())
}

/// Bytes that are already in memory (a verified chunk) as a response with the same headers.
pub fn serve_bytes(bytes: Bytes, etag: &str, headers: &HeaderMap, served: Counter) -> Response {
    let quoted = format!("\"{etag}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == quoted))
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, quoted)]).into_response();
    }
    served.inc_by(bytes.len() as u64);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::ETAG,
                HeaderValue::from_str(&quoted).unwrap_or(HeaderValue::from_static("\"\"")),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        bytes,
    )
        .into_response()
}

fn stream(file: Arc<File>, start: u64, end: u64, bandwidth: Bandwidth, served: Counter) -> Body {
    let blocks = futures_util::stream::unfold((file, start), move |(file, pos)| {
        let (bandwidth, served) = (bandwidth.clone(), served.clone());
        async move {
            if pos >= end {
                return None;
            }
            let n = BLOCK.min(end - pos) as usize;
            bandwidth.acquire(n).await;
            let reader = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                reader.read_exact_at(&mut buf, pos).map(|()| buf)
            })
            .await;
            match read {
                Ok(Ok(buf)) => {
                    served.inc_by(buf.len() as u64);
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(buf)),
                        (file, pos + n as u64),
                    ))
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading a served file failed");
                    Some((Err(e), (file, end)))
                }
                Err(e) => Some((Err(std::io::Error::other(e)), (file, end))),
            }
        }
    });
    Body::from_stream(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let tag = "abc";
        assert_eq!(wanted(&h(&[]), 100, tag), Wanted::All);
        assert_eq!(
            wanted(&h(&[("range", "bytes=0-9")]), 100, tag),
            Wanted::Range(0, 9)
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=90-")]), 100, tag),
            Wanted::Range(90, 99)
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=-10")]), 100, tag),
            Wanted::Range(90, 99)
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=50-500")]), 100, tag),
            Wanted::Range(50, 99)
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=100-")]), 100, tag),
            Wanted::Unsatisfiable
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=-0")]), 100, tag),
            Wanted::Unsatisfiable
        );
        assert_eq!(
            wanted(&h(&[("range", "bytes=0-1,5-6")]), 100, tag),
            Wanted::All
        );
        assert_eq!(wanted(&h(&[("range", "items=0-1")]), 100, tag), Wanted::All);
        assert_eq!(wanted(&h(&[("range", "bytes=9-1")]), 100, tag), Wanted::All);
        assert_eq!(
            wanted(
                &h(&[("range", "bytes=0-9"), ("if-range", "\"abc\"")]),
                100,
                tag
            ),
            Wanted::Range(0, 9)
        );
        assert_eq!(
            wanted(
                &h(&[("range", "bytes=0-9"), ("if-range", "\"old\"")]),
                100,
                tag
            ),
            Wanted::All
        );
    }
}
