//! Gossip over UDP with every datagram authenticated.
//!
//! chitchat's own UDP transport accepts any datagram carrying the cluster
//! ID, and the cluster ID travels in the clear: anyone who saw one datagram
//! could announce a fake member and move session ownership. Here each
//! datagram carries an HMAC-SHA256 tag (16 bytes) keyed by the cluster
//! secret, and datagrams without a valid tag are dropped unread.
//! (A captured datagram can still be replayed; it only repeats what a real
//! member said.)

use std::net::SocketAddr;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const TAG: usize = 16;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;

/// chitchat's transport, with authenticated datagrams.
pub(crate) struct AuthUdp {
    key: Vec<u8>,
}

impl AuthUdp {
    pub(crate) fn new(secret: &[u8]) -> Self {
        // A key of its own, so gossip tags never equal replication proofs.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
        mac.update(b"tether-gossip-key");
        Self {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }
}

fn tag(key: &[u8], payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(payload);
    mac
}

#[async_trait]
impl Transport for AuthUdp {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen).await?;
        Ok(Box::new(AuthSocket {
            socket,
            key: self.key.clone(),
            buf: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
        }))
    }
}

struct AuthSocket {
    socket: tokio::net::UdpSocket,
    key: Vec<u8>,
    buf: Box<[u8]>,
}

#[async_trait]
impl Socket for AuthSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let payload = msg.serialize_to_vec();
        let mut datagram = tag(&self.key, &payload).finalize().into_bytes()[..TAG].to_vec();
        datagram.extend_from_slice(&payload);
        anyhow::ensure!(
            datagram.len() <= MAX_DATAGRAM,
            "gossip message too large for one datagram"
        );
        self.socket.send_to(&datagram, to).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = self.socket.recv_from(&mut self.buf).await?;
            let datagram = &self.buf[..len];
            if len < TAG {
                continue;
            }
            let (claimed, payload) = datagram.split_at(TAG);
            if tag(&self.key, payload)
                .verify_truncated_left(claimed)
                .is_err()
            {
                tracing::debug!(%from, "dropping an unauthenticated gossip datagram");
                continue;
            }
            let mut rest = payload;
            match ChitchatMessage::deserialize(&mut rest) {
                Ok(msg) => return Ok((from, msg)),
                Err(e) => tracing::warn!(%from, error = %e, "malformed gossip datagram"),
            }
        }
    }
}
