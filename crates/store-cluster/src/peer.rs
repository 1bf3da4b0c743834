//! Outgoing connections to other nodes: one multiplexed connection per peer,
//! requests correlated with responses, reconnected after a failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::wire::{self, Frame, Request, Response};

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection could be made (the peer is down or unreachable).
    #[error("cannot connect to {0}")]
    Connect(SocketAddr),
    /// The connection failed before an answer came.
    #[error("connection to {0} lost")]
    Lost(SocketAddr),
    /// No answer in time.
    #[error("{0} did not answer in time")]
    Timeout(SocketAddr),
}

type Reply = oneshot::Sender<Response>;

/// A connection to one peer.
pub struct Peer {
    addr: SocketAddr,
    /// Source address for connections: the node's own cluster IP, so a
    /// node is recognisable by address on the wire (firewalls, tests).
    local: Option<std::net::IpAddr>,
    tx: Mutex<Option<mpsc::Sender<(Request, Reply)>>>,
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

    async fn sender(
        &self,
        me: &str,
        secret: &[u8],
    ) -> Result<mpsc::Sender<(Request, Reply)>, CallError> {
        let mut slot = self.tx.lock().await;
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let stream = tokio::time::timeout(Duration::from_secs(1), self.connect())
            .await
            .map_err(|_| CallError::Connect(self.addr))?
            .map_err(|_| CallError::Connect(self.addr))?;
        let _ = stream.set_nodelay(true);
        let mut conn = wire::framed(stream);
        tokio::time::timeout(
            Duration::from_secs(2),
            wire::client_handshake(&mut conn, me, secret),
        )
        .await
        .map_err(|_| CallError::Connect(self.addr))?
        .map_err(|e| {
            tracing::warn!(peer = %self.addr, error = %e, "replication handshake failed");
            CallError::Connect(self.addr)
        })?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(conn, rx, self.addr));
        *slot = Some(tx.clone());
        Ok(tx)
    }

    /// Sends `req` and waits up to `timeout` for the answer.
    ///
    /// # Errors
    /// [`CallError`] when the peer is unreachable, drops the connection or is too slow.
    pub async fn call(
        &self,
        me: &str,
        secret: &[u8],
        req: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let tx = self.sender(me, secret).await?;
        let (reply, answer) = oneshot::channel();
        tx.send((req, reply))
            .await
            .map_err(|_| CallError::Lost(self.addr))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(r)) => Ok(r),
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
async fn run(conn: wire::Conn, mut rx: mpsc::Receiver<(Request, Reply)>, addr: SocketAddr) {
    let (mut sink, mut stream) = StreamExt::split::<bytes::Bytes>(conn);
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next = 1u64;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some((req, reply)) = out else { return };
                let id = next;
                next += 1;
                let Ok(bytes) = serde_json::to_vec(&Frame { v: wire::VERSION, id, body: &req }) else { continue };
                if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
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
