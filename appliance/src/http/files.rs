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
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
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

/// The conditional and range headers of a request, however it was parsed.
#[derive(Default)]
pub struct Conditions<'a> {
    pub range: Option<&'a str>,
    pub if_range: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
}

impl<'a> Conditions<'a> {
    pub fn from_headers(headers: &'a HeaderMap) -> Self {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        Self {
            range: get(header::RANGE),
            if_range: get(header::IF_RANGE),
            if_none_match: get(header::IF_NONE_MATCH),
        }
    }
}

/// What a file request gets, decided from its conditional and range headers alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    NotModified,
    Unsatisfiable,
    /// Bytes `start..end` of the object: 200 for all of it, 206 for a range.
    Send {
        status: StatusCode,
        start: u64,
        end: u64,
    },
}

fn is_etag(value: &str, etag: &str) -> bool {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .is_some_and(|v| v == etag)
}

/// Decides the answer to a request for an object of `length` bytes with strong ETag `etag`
/// (unquoted), as RFC 9110 allows: one range at most, malformed or multiple ranges get all.
pub fn plan(length: u64, etag: &str, conditions: &Conditions) -> Plan {
    if conditions.if_none_match.is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim() == "*" || is_etag(t.trim(), etag))
    }) {
        return Plan::NotModified;
    }
    let all = Plan::Send {
        status: StatusCode::OK,
        start: 0,
        end: length,
    };
    let Some(range) = conditions.range else {
        return all;
    };
    // If-Range: the range applies only to the representation the client already has.
    if conditions
        .if_range
        .is_some_and(|v| !is_etag(v.trim(), etag))
    {
        return all;
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return all;
    };
    // Several ranges would need multipart responses; a full answer is allowed instead.
    if spec.contains(',') {
        return all;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return all;
    };
    let (start, end) = (start.trim(), end.trim());
    let last = length.saturating_sub(1);
    // None: malformed, ignored; Some(None): unsatisfiable.
    let parsed = match (start.is_empty(), end.is_empty()) {
        // bytes=-N: the last N bytes
        (true, false) => end
            .parse::<u64>()
            .ok()
            .map(|n| (n > 0).then(|| (length.saturating_sub(n), last))),
        (false, true) => start.parse::<u64>().ok().map(|s| Some((s, last))),
        (false, false) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some(Some((s, e.min(last)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => all,
        Some(Some((s, e))) if s < length => Plan::Send {
            status: StatusCode::PARTIAL_CONTENT,
            start: s,
            end: e + 1,
        },
        Some(_) => Plan::Unsatisfiable,
    }
}

/// The head of a file response that sends bytes: the one list of headers from which both the
/// router's responses and the fast path's raw heads are written.
pub struct FileHead {
    pub status: StatusCode,
    pub content_type: &'static str,
    /// Strong ETag value, without quotes.
    pub etag: String,
    pub immutable: bool,
    /// The bytes sent, `start..end`, of an object of `total` bytes.
    pub start: u64,
    pub end: u64,
    pub total: u64,
}

impl FileHead {
    /// Calls `header` with each header's lower-case name and its value in parts, in order.
    pub fn for_each(&self, mut header: impl FnMut(&'static str, &[&[u8]])) {
        let (mut length, mut first, mut last, mut total) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        header("content-type", &[self.content_type.as_bytes()]);
        header(
            "content-length",
            &[length.format(self.end - self.start).as_bytes()],
        );
        header("accept-ranges", &[b"bytes"]);
        header("etag", &[b"\"", self.etag.as_bytes(), b"\""]);
        header("cache-control", &[cache_control(self.immutable).as_bytes()]);
        if self.status == StatusCode::PARTIAL_CONTENT {
            header(
                "content-range",
                &[
                    b"bytes ",
                    first.format(self.start).as_bytes(),
                    b"-",
                    last.format(self.end.saturating_sub(1)).as_bytes(),
                    b"/",
                    total.format(self.total).as_bytes(),
                ],
            );
        }
    }
}

fn cache_control(immutable: bool) -> &'static str {
    if immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

/// A response that sends bytes of a file: its head, and the region of the file that is its
/// body.
pub struct FileAnswer {
    pub head: FileHead,
    pub region: FileRegion,
}

impl Servable {
    /// The answer when the request asks for bytes; `Err` with the plan otherwise.
    pub fn answer(
        self,
        conditions: &Conditions,
        bandwidth: Bandwidth,
        served: Counter,
    ) -> Result<FileAnswer, Plan> {
        let (status, start, end) = match plan(self.length, &self.etag, conditions) {
            Plan::Send { status, start, end } => (status, start, end),
            other => return Err(other),
        };
        Ok(FileAnswer {
            region: FileRegion {
                file: self.file,
                start: self.base + start,
                end: self.base + end,
                bandwidth,
                served,
            },
            head: FileHead {
                status,
                content_type: self.content_type,
                etag: self.etag,
                immutable: self.immutable,
                start,
                end,
                total: self.length,
            },
        })
    }
}

/// Builds the response for `servable` honouring the request's conditional and range headers.
pub fn serve(
    servable: Servable,
    headers: &HeaderMap,
    bandwidth: Bandwidth,
    served: Counter,
) -> Response {
    let (length, etag, immutable) = (servable.length, servable.etag.clone(), servable.immutable);
    match servable.answer(&Conditions::from_headers(headers), bandwidth, served) {
        Ok(FileAnswer { head, region }) => {
            let mut response = Response::new(stream(region.clone()));
            *response.status_mut() = head.status;
            let headers = response.headers_mut();
            head.for_each(|name, parts| {
                if let Ok(value) = HeaderValue::from_bytes(&parts.concat()) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            });
            // The fast path sends the region with sendfile; hyper streams the body.
            response.extensions_mut().insert(region);
            response
        }
        Err(Plan::NotModified) => (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, format!("\"{etag}\"")),
                (header::CACHE_CONTROL, cache_control(immutable).to_owned()),
            ],
        )
            .into_response(),
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                "the requested range is outside the file",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{length}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            response
        }
    }
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

fn stream(region: FileRegion) -> Body {
    let FileRegion {
        file,
        start,
        end,
        bandwidth,
        served,
    } = region;
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

    fn plan_for(range: &str, if_range: Option<&str>) -> Plan {
        let conditions = Conditions {
            range: (!range.is_empty()).then_some(range),
            if_range,
            if_none_match: None,
        };
        plan(100, "abc", &conditions)
    }

    fn send(status: StatusCode, start: u64, end: u64) -> Plan {
        Plan::Send { status, start, end }
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let all = send(StatusCode::OK, 0, 100);
        let part = |s, e| send(StatusCode::PARTIAL_CONTENT, s, e);
        assert_eq!(plan_for("", None), all);
        assert_eq!(plan_for("bytes=0-9", None), part(0, 10));
        assert_eq!(plan_for("bytes=90-", None), part(90, 100));
        assert_eq!(plan_for("bytes=-10", None), part(90, 100));
        assert_eq!(plan_for("bytes=50-500", None), part(50, 100));
        assert_eq!(plan_for("bytes=100-", None), Plan::Unsatisfiable);
        assert_eq!(plan_for("bytes=-0", None), Plan::Unsatisfiable);
        assert_eq!(plan_for("bytes=0-1,5-6", None), all);
        assert_eq!(plan_for("items=0-1", None), all);
        assert_eq!(plan_for("bytes=9-1", None), all);
        assert_eq!(plan_for("bytes=0-9", Some("\"abc\"")), part(0, 10));
        assert_eq!(plan_for("bytes=0-9", Some("\"old\"")), all);
    }

    #[test]
    fn a_matching_if_none_match_is_not_modified() {
        for tags in ["\"abc\"", "\"x\", \"abc\"", "*"] {
            let conditions = Conditions {
                if_none_match: Some(tags),
                ..Conditions::default()
            };
            assert_eq!(plan(100, "abc", &conditions), Plan::NotModified, "{tags}");
        }
        let conditions = Conditions {
            if_none_match: Some("\"abd\""),
            ..Conditions::default()
        };
        assert_eq!(plan(0, "abc", &conditions), send(StatusCode::OK, 0, 0));
    }

    #[test]
    fn heads_name_the_range_they_send() {
        let head = FileHead {
            status: StatusCode::PARTIAL_CONTENT,
            content_type: "application/octet-stream",
            etag: "abc".into(),
            immutable: true,
            start: 10,
            end: 20,
            total: 100,
        };
        let mut lines = Vec::new();
        head.for_each(|name, parts| {
            lines.push(format!(
                "{name}: {}",
                String::from_utf8(parts.concat()).unwrap()
            ))
        });
        assert_eq!(
            lines,
            [
                "content-type: application/octet-stream",
                "content-length: 10",
                "accept-ranges: bytes",
                "etag: \"abc\"",
                "cache-control: public, max-age=31536000, immutable",
                "content-range: bytes 10-19/100",
            ]
        );
    }
}
