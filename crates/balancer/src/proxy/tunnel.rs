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

/// Bytes moved per read. Read into the stack: a heap buffer exists only
/// while a side cannot take what was read, so an idle tunnel holds none.
const CHUNK: usize = 8 * 1024;

/// Counts an open tunnel on a backend (`/status`, `/metrics`).
struct Open(Arc<Stats>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One direction of a tunnel.
#[derive(Default)]
struct Pump {
    /// Read but not yet written: only while the writer is full.
    pending: Vec<u8>,
    written: usize,
    /// The writer has data to flush (TLS holds records until flushed).
    unflushed: bool,
    /// The reader has ended; the writer is shut down next.
    eof: bool,
    done: bool,
}

impl Pump {
    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down);
    /// `moved` is called whenever bytes were read.
    fn poll<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        moved: &mut impl FnMut(),
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.written < self.pending.len() {
                match Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.pending.is_empty() {
                // Give the buffer back: the tunnel may now idle for hours.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.unflushed {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return match Pin::new(&mut *w).poll_shutdown(cx) {
                    Poll::Ready(r) => {
                        self.done = true;
                        Poll::Ready(r)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            // Uninitialised: zeroing 8 KiB on every poll of an idle side
            // would cost more than the read.
            let mut space = [std::mem::MaybeUninit::<u8>::uninit(); CHUNK];
            let mut rb = ReadBuf::uninit(&mut space);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let chunk = rb.filled();
            let n = chunk.len();
            if n == 0 {
                self.eof = true;
                continue;
            }
            moved();
            let mut off = 0;
            while off < n {
                match Pin::new(&mut *w).poll_write(cx, &chunk[off..n]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(k)) => {
                        off += k;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.pending = chunk[off..n].to_vec();
                        break;
                    }
                }
            }
        }
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
        let mut touch = || {
            let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            last.store(ms, Ordering::Relaxed);
        };
        let (mut to_backend, mut to_client) = (Pump::default(), Pump::default());
        let client = &mut self.io;
        let backend = &mut up.io;
        // Both directions in one task; the tunnel ends when both have ended
        // (each side's close is passed on as a half-close), or on an error.
        let copy = std::future::poll_fn(|cx| {
            let a = to_backend.poll(cx, client, backend, &mut touch);
            let b = to_client.poll(cx, backend, client, &mut touch);
            match (a, b) {
                (Poll::Ready(Err(_)), _) | (_, Poll::Ready(Err(_))) => Poll::Ready(()),
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(()),
                _ => Poll::Pending,
            }
        });
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
