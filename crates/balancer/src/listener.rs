//! The client listener: accepting within `limits.max_connections`, the TLS
//! handshake and protocol choice, and draining on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::proxy::{http1, http2};
use crate::Shared;

/// Accepts until `shutdown` resolves; returns the connections still open.
///
/// With `limits.max_connections` set, the loop stops accepting while that
/// many are open: new connections wait in the kernel's accept queue (the
/// listen backlog), as with HAProxy's `maxconn`, instead of piling up here.
pub(crate) async fn accept_loop(
    shared: &Arc<Shared>,
    listener: TcpListener,
    tls: bool,
    shutdown: impl Future<Output = ()>,
) -> JoinSet<()> {
    let max = shared.current.load().config.limits.max_connections;
    let slots = Arc::new(Semaphore::new(if max == 0 {
        Semaphore::MAX_PERMITS
    } else {
        max
    }));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    connection(shared, stream, peer, tls).await;
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    connections
}

/// Idle connections close now, busy ones after their exchange, tunnels
/// when they end; whatever is left after the drain timeout is cut.
pub(crate) async fn drain(shared: &Shared, mut connections: JoinSet<()>) {
    shared.stopping.store(true, Ordering::Relaxed);
    shared.stop.notify_waiters();
    let timeout = Config::ms(shared.current.load().config.limits.drain_timeout_ms);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, drained).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            ?timeout,
            "connections still open after the drain timeout; closing them"
        );
        connections.abort_all();
    }
}

/// Serves one accepted connection.
async fn connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, tls: bool) {
    let _ = stream.set_nodelay(true);
    if !tls {
        if let Some((io, read)) = http1::serve(shared.clone(), stream, peer, false).await {
            Box::pin(http2::serve(shared, Rewound { read, io }, peer, false)).await;
        }
        return;
    }
    // Boxed, as every path but plain HTTP/1.1: each connection's task is as
    // large as its largest path, and an idle WebSocket keeps all of it.
    Box::pin(tls_connection(shared, stream, peer)).await;
}

/// Serves a connection on a TLS listener: the handshake, then the
/// protocol ALPN chose.
async fn tls_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let (config, handshake_timeout) = {
        let g = shared.current.load();
        let Some(config) = g.tls.clone() else {
            return;
        };
        (config, Config::ms(g.config.limits.header_timeout_ms))
    };
    // A half-done or garbage handshake costs a task and a timer until the
    // header timeout, then nothing.
    let accepted = tokio::time::timeout(
        handshake_timeout,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let io = match accepted {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    if io.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        http2::serve(shared, io, peer, true).await;
    } else {
        // An HTTP/1.1 client cannot switch to h2 over TLS: no h2c there.
        let _ = http1::serve(shared, io, peer, true).await;
    }
}

/// A stream whose first bytes were already read: they are read again first
/// (the HTTP/2 preface an h2c client opened with).
pub(crate) struct Rewound<S> {
    read: BytesMut,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
