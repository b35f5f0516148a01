//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, a header-read timeout against slow
//! clients, and graceful shutdown: stop accepting, let in-flight requests finish (up to a
//! grace period), then return.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::fastpath;

#[derive(Clone)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Path prefixes of bulk file reads served with sendfile on plain TCP (see `fastpath`).
    pub bulk_prefixes: &'static [&'static str],
    /// Bulk requests answered without the router on the fast path.
    pub bulk_direct: Option<std::sync::Arc<fastpath::Direct>>,
}

/// Serves `app` on `listener` until `shutdown` is cancelled and in-flight requests are done.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let graceful = GracefulShutdown::new();

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning; the listener stays open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let (prefixes, header_timeout) = (options.bulk_prefixes, options.header_read_timeout);
        let direct = options.bulk_direct.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                None if !prefixes.is_empty() => {
                    // The watcher lives as long as the task, so shutdown waits for fast-path
                    // responses too.
                    let options = fastpath::Options {
                        prefixes,
                        header_read_timeout: header_timeout,
                        direct: direct.as_deref(),
                    };
                    match fastpath::serve(stream, peer, app.clone(), options, shutdown).await {
                        fastpath::After::Closed => drop(watcher),
                        fastpath::After::Hyper(stream) => {
                            serve_connection(TokioIo::new(stream), peer, app, &builder, watcher)
                                .await
                        }
                    }
                }
                None => serve_connection(TokioIo::new(stream), peer, app, &builder, watcher).await,
                Some(acceptor) => {
                    // Handshakes run in the connection's own task, so a slow client cannot hold
                    // up the accept loop.
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(TokioIo::new(stream), peer, app, &builder, watcher)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(grace = ?options.shutdown_grace, "shutdown grace period over; closing remaining connections");
        }
    }
}

async fn serve_connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let connection = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
