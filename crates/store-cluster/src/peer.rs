//! Outgoing connections to other nodes: one multiplexed connection per peer,
//! requests correlated with responses, reconnected after a failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::core::Failure;
use crate::wire::{self, Envelope, Frame, Response};

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer refused the connection: nothing listens there (it is down).
    #[error("{0} refused the connection")]
    Refused(SocketAddr),
    /// No connection could be made in time (the peer is unreachable or
    /// frozen; it may be alive).
    #[error("cannot connect to {0}")]
    Unreachable(SocketAddr),
    /// The connection failed before an answer came.
    #[error("connection to {0} lost")]
    Lost(SocketAddr),
    /// No answer in time.
    #[error("{0} did not answer in time")]
    Timeout(SocketAddr),
}

impl CallError {
    /// What the core makes of it.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Refused(_) => Failure::Refused,
            Self::Lost(_) => Failure::Lost,
            Self::Unreachable(_) | Self::Timeout(_) => Failure::Timeout,
        }
    }
}

type Reply = oneshot::Sender<Response>;
/// Encoded envelopes to send, with where to put each answer.
type Outbox = mpsc::Sender<(Vec<u8>, Reply)>;

/// A connection to one peer.
pub struct Peer {
    addr: SocketAddr,
    /// Source address for connections: the node's own cluster IP, so a
    /// node is recognisable by address on the wire (firewalls, tests).
    local: Option<std::net::IpAddr>,
    tx: Mutex<Option<Outbox>>,
}

impl Peer {
    /// A peer at `addr`, connected on first use.
    pub fn new(addr: SocketAddr, local: Option<std::net::IpAddr>) -> Self {
        Self {
            addr,
            local: local.filter(|ip| !ip.is_unspecified()),
            tx: Mutex::new(None),
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let Some(ip) = self.local.filter(|ip| ip.is_ipv4() == self.addr.is_ipv4()) else {
            return TcpStream::connect(self.addr).await;
        };
        let socket = if ip.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(ip, 0))?;
        socket.connect(self.addr).await
    }

    async fn sender(&self, me: &str, secret: &[u8]) -> Result<Outbox, CallError> {
        let mut slot = self.tx.lock().await;
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let stream = match tokio::time::timeout(Duration::from_secs(1), self.connect()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(CallError::Refused(self.addr))
            }
            _ => return Err(CallError::Unreachable(self.addr)),
        };
        let _ = stream.set_nodelay(true);
        let mut conn = wire::framed(stream);
        tokio::time::timeout(
            Duration::from_secs(2),
            wire::client_handshake(&mut conn, me, secret),
        )
        .await
        .map_err(|_| CallError::Unreachable(self.addr))?
        .map_err(|e| {
            tracing::warn!(peer = %self.addr, error = %e, "replication handshake failed");
            CallError::Unreachable(self.addr)
        })?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(conn, rx, self.addr));
        *slot = Some(tx.clone());
        Ok(tx)
    }

    /// Sends `env` and waits up to `timeout` for the answer; returns it and
    /// the bytes sent.
    ///
    /// # Errors
    /// [`CallError`] when the peer is down, unreachable, drops the
    /// connection or is too slow.
    pub async fn call(
        &self,
        me: &str,
        secret: &[u8],
        env: &Envelope,
        timeout: Duration,
    ) -> Result<(Response, usize), CallError> {
        let bytes = serde_json::to_vec(env).map_err(|_| CallError::Lost(self.addr))?;
        let n = bytes.len();
        let tx = self.sender(me, secret).await?;
        let (reply, answer) = oneshot::channel();
        tx.send((bytes, reply))
            .await
            .map_err(|_| CallError::Lost(self.addr))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(r)) => Ok((r, n)),
            Ok(Err(_)) => Err(CallError::Lost(self.addr)),
            Err(_) => {
                // A connection that stopped answering is not trusted again:
                // the next call opens a new one.
                *self.tx.lock().await = None;
                Err(CallError::Timeout(self.addr))
            }
        }
    }
}

/// Owns one connection: writes requests, routes responses to their callers.
async fn run(conn: wire::Conn, mut rx: mpsc::Receiver<(Vec<u8>, Reply)>, addr: SocketAddr) {
    let (mut sink, mut stream) = StreamExt::split::<bytes::Bytes>(conn);
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next = 1u64;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some((body, reply)) = out else { return };
                let id = next;
                next += 1;
                // The envelope is already JSON: splice it into the frame
                // instead of encoding it twice.
                let mut frame = format!("{{\"v\":{},\"id\":{id},\"body\":", wire::VERSION).into_bytes();
                frame.extend_from_slice(&body);
                frame.push(b'}');
                if sink.send(bytes::Bytes::from(frame)).await.is_err() {
                    return;
                }
                pending.insert(id, reply);
            }
            frame = stream.next() => {
                let Some(Ok(bytes)) = frame else {
                    tracing::debug!(peer = %addr, "replication connection closed");
                    return;
                };
                match serde_json::from_slice::<Frame<Response>>(&bytes) {
                    Ok(f) if f.v == wire::VERSION => {
                        if let Some(reply) = pending.remove(&f.id) {
                            let _ = reply.send(f.body);
                        }
                    }
                    _ => {
                        tracing::warn!(peer = %addr, "malformed frame from peer; closing the connection");
                        return;
                    }
                }
            }
        }
    }
}
