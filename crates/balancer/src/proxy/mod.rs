//! Forwarding: one task per client connection reads requests, picks a
//! backend, and relays each exchange over a pooled keep-alive connection.
//!
//! Decisions and byte loops live apart (pingora's hooks vs `proxy_h1`):
//!
//! | stage | module | I/O |
//! |---|---|---|
//! | request checks, backend choice, head for the backend | [`request`] | none |
//! | response head for the client, route cookie | [`response`] | none |
//! | which backend next, when to give up | [`attempt`] | none |
//! | the balancer's own answers | [`refusal`] | none |
//! | HTTP/1.1 connection loop | [`http1`] | client and backend sockets |
//! | HTTP/2 connection loop (streams to HTTP/1.1 backends) | [`http2`] | idem |
//! | body relay both ways | [`body`] | idem |
//! | WebSocket / Upgrade tunnels | [`tunnel`] | idem |
//!
//! The HTTP/1.1 path speaks the protocol itself (heads parsed in place by
//! `httparse`, framing in [`crate::h1`]) instead of going through hyper's
//! server and client: rewriting the head straight from the received bytes,
//! with one read and one write per side and no header maps, is what lets one
//! worker thread keep up with nginx (docs/BENCHMARKS.md has the figures).
//! HTTP/2 goes through the `h2` crate; hyper runs the health checks and
//! axum the admin listener.

pub(crate) mod attempt;
mod backend;
mod body;
mod hooks;
pub(crate) mod http1;
pub(crate) mod http2;
pub(crate) mod refusal;
pub(crate) mod request;
pub(crate) mod response;
mod tunnel;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;

use crate::pool::Stats;

/// Longest wait for a client to take response bytes (nginx's `send_timeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Free space ensured before each read.
const READ_SPACE: usize = 8 * 1024;
/// How long a closing connection keeps reading (and discarding) what the
/// client still sends, so the kernel does not reset the connection and
/// destroy the response before the client has read it (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);

/// A client connection's byte stream: plain TCP or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Counts a request as in flight on a backend until its response is relayed
/// (for `least-conn`, `p2c` and bounded load). A tunnel counts for its whole
/// life, so `least-conn` spreads long-lived WebSockets.
pub(crate) struct InFlight(Arc<Stats>);

impl InFlight {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Polls `fut` until it completes or `timer` fires (`None`). One timer per
/// connection, moved for each wait: a new timer per request cost a few
/// percent of the balancer's throughput.
async fn timed<T>(timer: &mut Pin<Box<Sleep>>, fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Writes all of `bytes` and flushes (TLS holds records until then),
/// giving up at `deadline`.
async fn send_by<S: Io>(
    io: &mut S,
    timer: &mut Pin<Box<Sleep>>,
    bytes: &[u8],
    deadline: Instant,
) -> bool {
    arm(timer, deadline);
    let sent = timed(timer, async {
        io.write_all(bytes).await?;
        io.flush().await
    })
    .await;
    matches!(sent, Some(Ok(())))
}

fn arm(timer: &mut Pin<Box<Sleep>>, at: Instant) {
    timer.as_mut().reset(tokio::time::Instant::from_std(at));
}

/// Reads more into `buf`; 0 means the peer closed.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SPACE {
        buf.reserve(READ_SPACE);
    }
    io.read_buf(buf).await
}

#[cfg(test)]
mod tests;
