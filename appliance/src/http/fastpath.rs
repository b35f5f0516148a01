//! Zero-copy serving of the one thing the depot sends in bulk: image bytes to docked vehicles.
//!
//! hyper writes every body through user space: a positional read on the blocking pool, then a
//! copy into the socket, per block. At LAN speeds that is half the throughput of a sendfile(2)
//! server such as nginx, and the blocks in flight cost memory per connection. So on plain-TCP
//! HTTP/1.x connections the server reads request heads itself:
//!
//! - A `GET` of a whole image's range, by far the commonest request, is answered by [`Direct`]
//!   straight from the parsed head: the handler's decision (`files::plan`) and the same
//!   observation (ids, metrics, log), without building request or response objects, and the
//!   head written from the same header list as the router's response.
//! - Any other `GET` or `HEAD` without a body for one of the bulk prefixes (`/images/`,
//!   `/chunks/`) goes through the whole axum app: routing, the observe layer and the handler,
//!   which decides status and headers as for any request. When the response carries a
//!   [`FileRegion`], the region is sent from the page cache with sendfile instead of its body;
//!   any other response (an error, a chunk re-hashed in memory) is small and written as it is.
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
use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::files::{Conditions, FileAnswer};
use super::observe::{DirectObserver, RequestContext};

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

/// The answer to a `GET` bulk request, or `None` to leave it to the router.
pub type Resolve = Box<dyn Fn(&BulkHead<'_>) -> Option<FileAnswer> + Send + Sync>;

/// Answers the commonest bulk request without the router: a handler's work with none of the
/// routing and middleware around it, which at thousands of range requests per image is most of
/// the user-space cost. Observation (ids, metrics, log) is applied as the router would.
pub struct Direct {
    /// The answer to a `GET`, or `None` to leave the request (and every refusal) to the router.
    pub resolve: Resolve,
    pub observer: DirectObserver,
}

/// A parsed request head, borrowed from the connection's buffer.
pub struct BulkHead<'a> {
    /// The request target as sent: path and query, not percent-decoded.
    pub target: &'a str,
    headers: &'a [httparse::Header<'a>],
}

impl BulkHead<'_> {
    /// The first value of header `name` (case-insensitive), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    }

    pub fn conditions(&self) -> Conditions<'_> {
        Conditions {
            range: self.header("range"),
            if_range: self.header("if-range"),
            if_none_match: self.header("if-none-match"),
        }
    }
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
            match parse_head(&buf, &options) {
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
        let (version, mut keep_alive) = (head.version, head.keep_alive && !shutdown.is_cancelled());
        let mut out = Vec::with_capacity(512);
        let (region, bodiless) = match head.work {
            Work::Direct(answer, ids) => {
                write_status(&mut out, version, answer.head.status);
                answer
                    .head
                    .for_each(|name, parts| write_header(&mut out, name, parts));
                write_ids(&mut out, &ids);
                write_date(&mut out);
                if !keep_alive {
                    write_header(&mut out, "connection", &[b"close"]);
                }
                out.extend_from_slice(b"\r\n");
                (Some(answer.region), false)
            }
            Work::Router(mut request) => {
                let method = request.method().clone();
                request.extensions_mut().insert(ConnectInfo(peer));
                let Ok(response) = app.clone().oneshot(request).await;
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
                write_status(&mut out, version, parts.status);
                for (name, value) in &parts.headers {
                    write_header(&mut out, name.as_str(), &[value.as_bytes()]);
                }
                if !parts.headers.contains_key(header::DATE) {
                    write_date(&mut out);
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&small);
                (region, bodiless)
            }
        };
        // With a file to follow, the head is sent with MSG_MORE: it leaves with the first file
        // bytes, as under nginx's tcp_nopush, without two setsockopt calls per response.
        let region = region.filter(|_| !bodiless);
        let mut stall = Stall::new();
        if let Err(e) = write_all(&stream, &mut stall, &out, region.is_some()).await {
            tracing::debug!(%peer, error = %e, "client went away");
            return After::Closed;
        }
        if let Some(region) = region
            && let Err(e) = send_region(&stream, &mut stall, &region).await
        {
            // The length was promised in the head; a short body must end the connection.
            tracing::debug!(%peer, error = %e, "sending a file region ended early");
            return After::Closed;
        }
        if !keep_alive {
            let _ = stream.shutdown().await;
            return After::Closed;
        }
    }
}

struct Head {
    len: usize,
    version: Version,
    keep_alive: bool,
    work: Work,
}

enum Work {
    /// Answered by [`Direct`], already observed.
    Direct(FileAnswer, RequestContext),
    Router(Request<Body>),
}

enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A complete request this module serves.
    Bulk(Box<Head>),
    /// Anything else: hyper's.
    Other,
}

fn parse_head(buf: &[u8], options: &Options<'_>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Parsed::Other;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return Parsed::Other,
    };
    if !options.prefixes.iter().any(|p| target.starts_with(p)) {
        return Parsed::Other;
    }
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut keep_alive = version == Version::HTTP_11;
    for h in parsed.headers.iter() {
        let is = |name: &str| h.name.eq_ignore_ascii_case(name);
        if (is("content-length") && h.value != b"0")
            || is("transfer-encoding")
            || is("upgrade")
            || is("expect")
        {
            // A body, an upgrade or an expectation: hyper knows what to do.
            return Parsed::Other;
        }
        if is("connection") {
            let tokens = || h.value.split(|&b| b == b',').map(|t| t.trim_ascii());
            if tokens().any(|t| t.eq_ignore_ascii_case(b"close")) {
                keep_alive = false;
            } else if tokens().any(|t| t.eq_ignore_ascii_case(b"keep-alive")) {
                keep_alive = true;
            }
        }
    }
    let head = BulkHead {
        target,
        headers: parsed.headers,
    };
    let direct = options
        .direct
        .filter(|_| method == Method::GET)
        .and_then(|direct| {
            let started = Instant::now();
            let answer = (direct.resolve)(&head)?;
            let ids = RequestContext::from_values(
                head.header("traceparent"),
                head.header("x-request-id"),
            );
            direct
                .observer
                .finish(target, answer.head.status.as_u16(), started, &ids);
            Some(Work::Direct(answer, ids))
        });
    let work = match direct {
        Some(work) => work,
        None => {
            let mut builder = Request::builder()
                .method(method)
                .uri(target)
                .version(version);
            for h in head.headers {
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_bytes(h.value),
                ) else {
                    return Parsed::Other;
                };
                builder = builder.header(name, value);
            }
            match builder.body(Body::empty()) {
                Ok(request) => Work::Router(request),
                Err(_) => return Parsed::Other,
            }
        }
    };
    Parsed::Bulk(Box::new(Head {
        len,
        version,
        keep_alive,
        work,
    }))
}

fn write_status(out: &mut Vec<u8>, version: Version, status: StatusCode) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[&[u8]]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for part in value {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// The ids `observe` stamps on every response.
fn write_ids(out: &mut Vec<u8>, ids: &RequestContext) {
    write_header(out, "x-request-id", &[ids.request_id.as_bytes()]);
    write_header(
        out,
        "traceparent",
        &[
            b"00-",
            ids.trace_id.as_bytes(),
            b"-",
            ids.span_id.as_bytes(),
            b"-01",
        ],
    );
}

/// The `Date` header, formatted once a second per thread rather than per response.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        write_header(out, "date", &[text.as_bytes()]);
    });
}

/// Runs a non-blocking socket operation until it makes progress. Waits count against `stall`,
/// one deadline for a whole response rather than a timer per wait.
async fn when_writable<T>(
    stream: &TcpStream,
    stall: &mut Stall,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        match stream.try_io(Interest::WRITABLE, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
        stall.wait_writable(stream).await?;
    }
}

/// A client that accepts no byte for [`WRITE_STALL`] is gone. The deadline is moved forward
/// lazily, when it fires after progress, so a fast transfer never touches the timer again.
struct Stall {
    deadline: Pin<Box<tokio::time::Sleep>>,
    progress: bool,
}

impl Stall {
    fn new() -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep(WRITE_STALL)),
            progress: false,
        }
    }

    fn progressed(&mut self) {
        self.progress = true;
    }

    async fn wait_writable(&mut self, stream: &TcpStream) -> io::Result<()> {
        loop {
            tokio::select! {
                ready = stream.writable() => return ready,
                () = self.deadline.as_mut() => {
                    if !std::mem::take(&mut self.progress) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client stopped reading",
                        ));
                    }
                    let next = tokio::time::Instant::now() + WRITE_STALL;
                    self.deadline.as_mut().reset(next);
                }
            }
        }
    }
}

/// Writes `bytes`; with `more`, tells the kernel that more data follows (MSG_MORE).
async fn write_all(
    stream: &TcpStream,
    stall: &mut Stall,
    mut bytes: &[u8],
    more: bool,
) -> io::Result<()> {
    let flags = if more {
        rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL
    } else {
        rustix::net::SendFlags::NOSIGNAL
    };
    while !bytes.is_empty() {
        let n = when_writable(stream, stall, || {
            rustix::net::send(stream, bytes, flags).map_err(io::Error::from)
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        stall.progressed();
        bytes = &bytes[n..];
    }
    Ok(())
}

async fn send_region(stream: &TcpStream, stall: &mut Stall, region: &FileRegion) -> io::Result<()> {
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
            let n = when_writable(stream, stall, || {
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
            stall.progressed();
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

    const OPTIONS: Options<'static> = Options {
        prefixes: &["/images/", "/chunks/"],
        header_read_timeout: Duration::from_secs(1),
        direct: None,
    };

    fn bulk(raw: &[u8]) -> (Head, Request<Body>) {
        match parse_head(raw, &OPTIONS) {
            Parsed::Bulk(head) => {
                let head = *head;
                match head.work {
                    Work::Router(request) => (
                        Head {
                            work: Work::Router(Request::new(Body::empty())),
                            ..head
                        },
                        request,
                    ),
                    Work::Direct(..) => panic!("no direct handler was given"),
                }
            }
            Parsed::Partial => panic!("partial: {}", String::from_utf8_lossy(raw)),
            Parsed::Other => panic!("other: {}", String::from_utf8_lossy(raw)),
        }
    }

    fn is_other(raw: &[u8]) -> bool {
        matches!(parse_head(raw, &OPTIONS), Parsed::Other)
    }

    #[test]
    fn bulk_reads_are_taken_and_everything_else_left_to_hyper() {
        let raw = b"GET /images/a.img HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\nGET /next";
        let (head, request) = bulk(raw);
        assert_eq!(head.len, raw.len() - "GET /next".len());
        assert!(head.keep_alive);
        assert_eq!(request.headers()["range"], "bytes=0-9");
        assert_eq!(request.uri().path(), "/images/a.img");
        assert!(!bulk(b"HEAD /chunks/ab HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            bulk(b"GET /chunks/ab HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !bulk(b"GET /images/a HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(matches!(
            parse_head(b"GET /images/a HTTP/1.1\r\nHost:", &OPTIONS),
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
        let mut out = Vec::new();
        write_status(&mut out, Version::HTTP_11, StatusCode::PARTIAL_CONTENT);
        write_header(&mut out, "content-length", &[b"10"]);
        write_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        let (start, date) = text.split_once("date: ").unwrap();
        assert_eq!(
            start,
            "HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\n"
        );
        assert!(httpdate::parse_http_date(date.trim_end()).is_ok(), "{date}");
    }
}
