//! Keep-alive connections to backends: a small pool of idle sockets per
//! backend, each with the bytes it has read but not yet consumed.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections older than this are not reused (backends commonly close
/// idle keep-alive connections after 60 s or more; stay under that).
const MAX_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per backend.
const MAX_POOLED: usize = 512;

/// One connection to a backend.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) io: TcpStream,
    /// Read but not yet consumed; empty between exchanges.
    pub(crate) buf: BytesMut,
    addr: SocketAddr,
    idle_since: Instant,
    /// Taken from the pool rather than freshly opened: a failure before any
    /// response byte may just be the backend closing it as we reused it.
    pub(crate) reused: bool,
}

/// Idle connections of one backend.
#[derive(Debug, Default)]
pub(crate) struct ConnPool {
    idle: Mutex<Vec<Conn>>,
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
}

impl ConnPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live idle connection to `addr`, or a new one (always a new one
    /// when `fresh`).
    pub(crate) async fn checkout(
        &self,
        addr: SocketAddr,
        now: Instant,
        connect_timeout: Duration,
        fresh: bool,
    ) -> Result<Conn, ConnectError> {
        while let Some(mut c) = (!fresh).then(|| self.lock().pop()).flatten() {
            if c.addr != addr || now.saturating_duration_since(c.idle_since) > MAX_IDLE {
                continue;
            }
            // A backend that closed the idle connection (or, wrongly, sent
            // something) has made it readable. `try_read` asks the socket
            // only when the reactor saw it become readable, so a quiet
            // connection costs no system call here.
            match c.io.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.reused = true;
                    return Ok(c);
                }
                _ => continue,
            }
        }
        let io = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = io.set_nodelay(true);
        Ok(Conn {
            io,
            // Allocated by the first read: a backend connection carrying a
            // slow upload has nothing to read yet.
            buf: BytesMut::new(),
            addr,
            idle_since: now,
            reused: false,
        })
    }

    /// Returns a connection whose exchange is complete, with nothing unread.
    pub(crate) fn checkin(&self, mut c: Conn, now: Instant) {
        debug_assert!(c.buf.is_empty());
        c.idle_since = now;
        let mut idle = self.lock();
        if idle.len() < MAX_POOLED {
            idle.push(c);
        }
    }
}
