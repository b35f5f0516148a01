//! Zero-copy serving of the one thing the depot sends in bulk: image bytes to docked vehicles.
//!
//! hyper writes every body through user space: a positional read on the blocking pool, then a
//! copy into the socket, per block. At LAN speeds that is half the throughput of a sendfile(2)
//! server such as nginx, and the blocks in flight cost memory per connection. So on plain-TCP
//! HTTP/1.x connections the server reads request heads itself:
//!
//! - A `GET` or `HEAD` without a body for one of the bulk prefixes (`/images/`, `/chunks/`)
//!   still goes through the whole axum app: routing, the observe layer (request id, metrics,
//!   logs) and the handler, which decides status and headers as for any request. When the
//!   response carries a [`FileRegion`], the region is sent from the page cache with sendfile
//!   instead of its body; any other response (an error, a chunk re-hashed in memory) is small
//!   and written as it is.
//! - Anything else (another route, a request body, HTTP/2, a head that does not parse or is too
//!   large) hands the connection, with the bytes read so far, to hyper for the rest of its life,
//!   so every other behaviour stays hyper's.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use atlasmesh_ota_staging::bandwidth::Bandwidth;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::observe::observe_direct;
use crate::metrics::CoreMetrics;

/// A slice of an open file that a response's body stands for; the fast path sends it with
/// sendfile and never polls the body. hyper, which does not know it, streams the body.
#[derive(Clone)]
pub struct FileRegion {
    pub file: Arc<File>,
    /// Byte offsets in the file, end exclusive.
    pub start: u64,
    pub end: u64,
    pub bandwidth: Bandwidth,
    pub served: Counter,
}

/// Largest request head read here; larger ones go to hyper, which answers 431.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;
/// Largest in-memory body written by the fast path (chunks are at most 256 KiB).
const MAX_SMALL_BODY: usize = 4 * 1024 * 1024;
/// Bytes per bandwidth-cap payment when a cap is set.
const CAPPED_BLOCK: u64 = 256 * 1024;
/// A client that accepts no byte for this long is gone.
const WRITE_STALL: Duration = Duration::from_secs(60);

/// What the server does with a connection after the fast path is done with it.
pub enum After {
    Closed,
    /// Hand to hyper: these bytes were read from the socket and are the next request.
    Hyper(Rewind),
}

pub struct Options<'a> {
    pub prefixes: &'a [&'static str],
    pub header_read_timeout: Duration,
    pub direct: Option<&'a Direct>,
}

/// A handler called without the router: the response, or `None` to leave it to the router.
pub type Resolve = Box<dyn Fn(&Request<Body>) -> Option<Response> + Send + Sync>;

/// Answers the commonest bulk request without the router: a handler's work with none of the
/// routing and middleware around it, which at thousands of range requests per image is most of
/// the user-space cost. Observation (ids, metrics, log) is applied as the router would.
pub struct Direct {
    /// The response, or `None` to leave the request to the router.
    pub resolve: Resolve,
    /// The route template the router would report for these requests.
    pub route: &'static str,
    pub metrics: CoreMetrics,
}

/// Serves requests on `stream` while they are bulk reads; see the module docs.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    options: Options<'_>,
    shutdown: CancellationToken,
) -> After {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let head = loop {
            match parse_head(&buf, options.prefixes) {
                Parsed::Bulk(head) => break head,
                Parsed::Partial if buf.len() < MAX_HEAD => {}
                Parsed::Partial | Parsed::Other => return After::Hyper(Rewind::new(buf, stream)),
            }
            let idle = buf.is_empty();
            let read = async {
                tokio::time::timeout(options.header_read_timeout, stream.read_buf(&mut buf)).await
            };
            // Between requests a keep-alive connection simply ends on shutdown.
            let result = if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => return After::Closed,
                    r = read => r,
                }
            } else {
                read.await
            };
            match result {
                Ok(Ok(n)) if n > 0 => {}
                _ => return After::Closed,
            }
        };
        buf.advance(head.len);
        let (method, version) = (head.request.method().clone(), head.request.version());
        let mut keep_alive = head.keep_alive && !shutdown.is_cancelled();
        let mut request = head.request;
        let started = Instant::now();
        let direct = options.direct.and_then(|direct| {
            let mut response = (direct.resolve)(&request)?;
            observe_direct(
                &direct.metrics,
                &request,
                direct.route,
                started,
                &mut response,
            );
            Some(response)
        });
        let response = match direct {
            Some(response) => response,
            None => {
                request.extensions_mut().insert(ConnectInfo(peer));
                let Ok(response) = app.clone().oneshot(request).await;
                response
            }
        };
        let region = response.extensions().get::<FileRegion>().cloned();
        let (mut parts, body) = response.into_parts();
        keep_alive &= parts
            .headers
            .get(header::CONNECTION)
            .is_none_or(|v| !v.as_bytes().eq_ignore_ascii_case(b"close"));
        let bodiless = method == Method::HEAD
            || parts.status == StatusCode::NOT_MODIFIED
            || parts.status == StatusCode::NO_CONTENT;
        let small = match (&region, bodiless) {
            (Some(_), _) | (None, true) => Bytes::new(),
            (None, false) => match axum::body::to_bytes(body, MAX_SMALL_BODY).await {
                Ok(bytes) => {
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, bytes.len().into());
                    bytes
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "a bulk-route response body failed");
                    return After::Closed;
                }
            },
        };
        if !keep_alive {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let mut out = Vec::with_capacity(512 + small.len());
        write_head(&mut out, version, parts.status, &parts.headers);
        out.extend_from_slice(&small);
        // With a file to follow, the socket is corked (as nginx's tcp_nopush): the head leaves
        // with the first file bytes and only full segments go out until the region is sent.
        let region = region.filter(|_| !bodiless);
        if region.is_some() {
            let _ = rustix::net::sockopt::set_tcp_cork(&stream, true);
        }
        if let Err(e) = write_all(&stream, &out).await {
            tracing::debug!(%peer, error = %e, "client went away");
            return After::Closed;
        }
        if let Some(region) = region {
            if let Err(e) = send_region(&stream, &region).await {
                // The length was promised in the head; a short body must end the connection.
                tracing::debug!(%peer, error = %e, "sending a file region ended early");
                return After::Closed;
            }
            let _ = rustix::net::sockopt::set_tcp_cork(&stream, false);
        }
        if !keep_alive {
            let _ = stream.shutdown().await;
            return After::Closed;
        }
    }
}

struct Head {
    request: Request<Body>,
    len: usize,
    keep_alive: bool,
}

enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A complete request this module serves.
    Bulk(Box<Head>),
    /// Anything else: hyper's.
    Other,
}

fn parse_head(buf: &[u8], prefixes: &[&str]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Parsed::Other;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return Parsed::Other,
    };
    if !prefixes.iter().any(|p| path.starts_with(p)) {
        return Parsed::Other;
    }
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut builder = Request::builder().method(method).uri(path).version(version);
    let mut keep_alive = version == Version::HTTP_11;
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            // A body, an upgrade or an expectation: hyper knows what to do.
            "content-length" if h.value != b"0" => return Parsed::Other,
            "transfer-encoding" | "upgrade" | "expect" => return Parsed::Other,
            "connection" => {
                let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if value.split(',').any(|t| t.trim() == "close") {
                    keep_alive = false;
                } else if value.split(',').any(|t| t.trim() == "keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        builder = builder.header(name, value);
    }
    match builder.body(Body::empty()) {
        Ok(request) => Parsed::Bulk(Box::new(Head {
            request,
            len,
            keep_alive,
        })),
        Err(_) => Parsed::Other,
    }
}

fn write_head(
    out: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    headers: &axum::http::HeaderMap,
) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Runs a non-blocking socket operation until it makes progress, giving up after a stall.
async fn when_writable<T>(
    stream: &TcpStream,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    tokio::time::timeout(WRITE_STALL, async {
        loop {
            stream.writable().await?;
            match stream.try_io(Interest::WRITABLE, &mut op) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))?
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = when_writable(stream, || stream.try_write(bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

async fn send_region(stream: &TcpStream, region: &FileRegion) -> io::Result<()> {
    let capped = region.bandwidth.rate().is_some();
    let mut offset = region.start;
    while offset < region.end {
        let block_end = if capped {
            region.end.min(offset + CAPPED_BLOCK)
        } else {
            region.end
        };
        region
            .bandwidth
            .acquire((block_end - offset) as usize)
            .await;
        while offset < block_end {
            let want = usize::try_from(block_end - offset).unwrap_or(usize::MAX);
            let n = when_writable(stream, || {
                rustix::fs::sendfile(stream, &*region.file, Some(&mut offset), want)
                    .map_err(io::Error::from)
            })
            .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the served file is shorter than its region",
                ));
            }
            region.served.inc_by(n as u64);
        }
    }
    Ok(())
}

/// A socket whose first bytes were already read: replays them, then reads the socket.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    fn new(prefix: BytesMut, inner: TcpStream) -> Self {
        Self {
            prefix: prefix.freeze(),
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let prefix = self.prefix.split_to(n);
            buf.put_slice(&prefix);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIXES: &[&str] = &["/images/", "/chunks/"];

    fn bulk(raw: &[u8]) -> Head {
        match parse_head(raw, PREFIXES) {
            Parsed::Bulk(head) => *head,
            Parsed::Partial => panic!("partial: {}", String::from_utf8_lossy(raw)),
            Parsed::Other => panic!("other: {}", String::from_utf8_lossy(raw)),
        }
    }

    fn is_other(raw: &[u8]) -> bool {
        matches!(parse_head(raw, PREFIXES), Parsed::Other)
    }

    #[test]
    fn bulk_reads_are_taken_and_everything_else_left_to_hyper() {
        let raw = b"GET /images/a.img HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\nGET /next";
        let head = bulk(raw);
        assert_eq!(head.len, raw.len() - "GET /next".len());
        assert!(head.keep_alive);
        assert_eq!(head.request.headers()["range"], "bytes=0-9");
        assert!(!bulk(b"HEAD /chunks/ab HTTP/1.0\r\n\r\n").keep_alive);
        assert!(bulk(b"GET /chunks/ab HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!bulk(b"GET /images/a HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(matches!(
            parse_head(b"GET /images/a HTTP/1.1\r\nHost:", PREFIXES),
            Parsed::Partial
        ));
        assert!(is_other(b"GET /api/v1/status HTTP/1.1\r\n\r\n"));
        assert!(is_other(b"POST /images/a HTTP/1.1\r\n\r\n"));
        assert!(is_other(
            b"GET /images/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        ));
        assert!(is_other(
            b"GET /images/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(is_other(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(is_other(b"\x16\x03\x01 not http at all"));
    }

    #[test]
    fn heads_are_written_as_http_1_1() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, 10.into());
        headers.insert(header::DATE, HeaderValue::from_static("then"));
        let mut out = Vec::new();
        write_head(
            &mut out,
            Version::HTTP_11,
            StatusCode::PARTIAL_CONTENT,
            &headers,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\ndate: then\r\n\r\n"
        );
    }
}
