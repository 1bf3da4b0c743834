//! WebSocket and other `Upgrade` tunnels: after the backend's `101`, bytes
//! are copied both ways until either side closes or nothing moves for the
//! tunnel idle timeout (`limits.tunnel_timeout_ms`, HAProxy's
//! `timeout tunnel`), never the header timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::http1::Client;
use super::{Io, SEND_TIMEOUT};
use crate::pool::Stats;
use crate::upstream::Conn;

/// Copy buffer per direction. Small: an open WebSocket is mostly idle, and
/// memory per tunnel is what limits how many a balancer holds.
const TUNNEL_BUFFER: usize = 4 * 1024;

/// Counts an open tunnel on a backend (`/status`, `/metrics`).
struct Open(Arc<Stats>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that records when it last read something.
struct Watched<'a, S> {
    io: &'a mut S,
    last: &'a AtomicU64,
    epoch: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

impl<S: Io> Client<S> {
    /// Sends the `101` head in `out` and what each side sent past its head,
    /// then copies both ways until a side closes or the tunnel is idle for `idle`.
    pub(super) async fn tunnel(&mut self, mut up: Conn, stats: &Arc<Stats>, idle: Duration) {
        stats.tunnels.fetch_add(1, Ordering::Relaxed);
        let _open = Open(stats.clone());
        self.out.extend_from_slice(&up.buf);
        if !self.send_out_by(Instant::now() + SEND_TIMEOUT).await {
            return;
        }
        if !self.buf.is_empty()
            && tokio::time::timeout(SEND_TIMEOUT, up.io.write_all(&self.buf))
                .await
                .map_or(true, |r| r.is_err())
        {
            return;
        }
        // Nothing of the HTTP exchange is needed any more: give the
        // buffers back before a wait that may last hours.
        self.buf = BytesMut::new();
        self.out = Vec::new();
        self.up = Vec::new();
        up.buf = BytesMut::new();
        let epoch = Instant::now();
        let last = AtomicU64::new(0);
        let mut client = Watched {
            io: &mut self.io,
            last: &last,
            epoch,
        };
        let mut backend = Watched {
            io: &mut up.io,
            last: &last,
            epoch,
        };
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut backend,
            TUNNEL_BUFFER,
            TUNNEL_BUFFER,
        );
        let mut copy = std::pin::pin!(copy);
        let mut deadline = epoch + idle;
        loop {
            tokio::select! {
                _ = &mut copy => return,
                () = tokio::time::sleep_until(deadline.into()) => {
                    let since = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
                    if since + idle <= Instant::now() {
                        tracing::debug!(idle = ?idle, "tunnel idle; closing it");
                        return;
                    }
                    deadline = since + idle;
                }
            }
        }
    }
}
