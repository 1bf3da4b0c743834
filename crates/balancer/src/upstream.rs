//! Connections to backends: a small keep-alive pool whose connections are
//! driven by the task that uses them.
//!
//! hyper's pooled client runs every connection as a task of its own, so each
//! proxied request crosses tasks twice (request in, response out). Here the
//! request's own task polls the connection while it waits for the response
//! headers, and the response body polls it while it streams; the connection
//! goes back to the pool when the body ends. On one worker thread this is the
//! difference between trailing nginx and matching it (docs/BENCHMARKS.md).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::UpstreamBody;

/// Idle connections older than this are not reused (backends commonly close
/// idle keep-alive connections after 60 s or more; stay under that).
const MAX_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per backend.
const MAX_POOLED: usize = 512;

/// One keep-alive connection to a backend.
pub(crate) struct Conn {
    sender: SendRequest<UpstreamBody>,
    /// The response deadline, reused for every request on this connection:
    /// moving a registered timer later is nearly free in tokio, while a new
    /// timer per request cost ~6% of the balancer's throughput.
    deadline: Pin<Box<tokio::time::Sleep>>,
    conn: Connection<TokioIo<TcpStream>, UpstreamBody>,
    addr: SocketAddr,
    idle_since: Instant,
    done: bool,
    reused: bool,
}

impl Conn {
    /// Polls the connection; marks it done when it finishes or fails.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.done = true;
        }
    }

    /// Whether this connection was taken from the pool (not freshly opened).
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }
}

/// Idle connections of one backend.
#[derive(Default)]
pub(crate) struct ConnPool {
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool").finish_non_exhaustive()
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {addr} failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl ConnPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live idle connection to `addr`, or a new one.
    pub(crate) async fn checkout(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        loop {
            let Some(mut c) = self.lock().pop() else {
                break;
            };
            if c.addr != addr || c.idle_since.elapsed() > MAX_IDLE {
                continue;
            }
            // One poll lets the connection notice a close by the backend and
            // finish the previous exchange, so `is_ready` is accurate.
            std::future::poll_fn(|cx| {
                c.drive(cx);
                Poll::Ready(())
            })
            .await;
            if !c.done && c.sender.is_ready() {
                c.reused = true;
                return Ok(c);
            }
        }
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        Ok(Conn {
            sender,
            deadline: Box::pin(tokio::time::sleep(MAX_IDLE)),
            conn,
            addr,
            idle_since: Instant::now(),
            done: false,
            reused: false,
        })
    }

    /// Returns a connection whose exchange is complete.
    fn checkin(&self, mut c: Conn) {
        if c.done || c.sender.is_closed() {
            return;
        }
        c.idle_since = Instant::now();
        let mut idle = self.lock();
        if idle.len() < MAX_POOLED {
            idle.push(c);
        }
    }
}

/// Why a request got no response headers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The backend did not answer in time.
    #[error("no response headers in time")]
    Timeout,
    /// The exchange failed.
    #[error(transparent)]
    Http(hyper::Error),
    /// The connection closed before the request was answered.
    #[error("connection closed before the response")]
    Closed,
}

/// Sends `req` on `conn`, driving the connection in this task until the
/// response headers arrive or `timeout` passes.
pub(crate) async fn send(
    conn: &mut Conn,
    req: Request<UpstreamBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, SendError> {
    conn.deadline
        .as_mut()
        .reset(tokio::time::Instant::now() + timeout);
    let mut response = std::pin::pin!(conn.sender.send_request(req));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = response.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(SendError::Http));
        }
        conn.drive(cx);
        // A finished connection makes the response future fail; poll it again.
        if conn.done {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(SendError::Http));
            }
            // The connection ended (the backend closed it) with the request
            // still queued: it will never be answered, and the queue lives
            // as long as the connection object. Without this the request
            // waited for the full response timeout.
            return Poll::Ready(Err(SendError::Closed));
        }
        if conn.deadline.as_mut().poll(cx).is_ready() {
            // The exchange is abandoned half-way: never reuse this connection.
            conn.done = true;
            return Poll::Ready(Err(SendError::Timeout));
        }
        Poll::Pending
    })
    .await
}

/// A response body that drives its connection while it streams and returns
/// the connection to the pool when it ends.
pub(crate) struct Streaming {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<ConnPool>,
}

impl Streaming {
    pub(crate) fn new(inner: Incoming, conn: Conn, pool: Arc<ConnPool>) -> Self {
        Self {
            inner,
            conn: Some(conn),
            pool,
        }
    }

    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.checkin(c);
        }
    }
}

impl hyper::body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if let Some(c) = self.conn.as_mut() {
            c.drive(cx);
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.release(),
            // A connection that failed mid-body is not reused.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled; the exchange is
        // still complete. A body dropped half-way leaves the connection
        // mid-message: it is closed, never reused.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
