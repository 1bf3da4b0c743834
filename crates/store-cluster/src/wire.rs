//! The replication protocol: length-delimited frames of versioned JSON over
//! TCP, after a mutual HMAC handshake on the cluster secret.
//!
//! A stranger without the secret can neither join (it cannot answer the
//! challenge) nor inject sessions (nothing is read before the handshake). A
//! frame that is too large or does not decode closes that connection and is
//! logged; it never panics the node.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tether_core::{Delta, Load, Record, SessionId, Timestamp};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The protocol version carried in every frame.
pub const VERSION: u8 = 1;
/// The largest frame accepted (a session is at most 64 KiB by default).
pub const MAX_FRAME: usize = 1024 * 1024;

/// A framed connection.
pub type Conn = Framed<TcpStream, LengthDelimitedCodec>;

/// Wraps a TCP stream in the frame codec.
pub fn framed(stream: TcpStream) -> Conn {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    Framed::new(stream, codec)
}

/// What one node asks another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Install a full record if newer (creation, repair, re-replication).
    Put(Record),
    /// Apply a delta the owner applied to version `base`.
    Delta {
        /// The session.
        id: SessionId,
        /// The version the owner applied it to.
        base: u64,
        /// The change.
        delta: Delta,
        /// The owner's time.
        now: Timestamp,
    },
    /// Record an access (sliding expiry) without a new version.
    Touch {
        /// The session.
        id: SessionId,
        /// When.
        last_access: Timestamp,
    },
    /// Delete a session for good: the deletion's version, and until when
    /// to remember it.
    Remove(SessionId, u64, Timestamp),
    /// The sender finished re-replicating to this node for its current view.
    Synced,
    /// Anti-entropy: the digests of the sessions `owner` owns and the
    /// receiver should back up; the receiver answers the segments that differ.
    Digest {
        /// The sending owner.
        owner: String,
        /// Per-segment digests.
        segments: Vec<u64>,
    },
    /// Forwarded to the owner: create.
    Create(Record),
    /// Forwarded to the owner: load.
    Load(SessionId, Load),
    /// Forwarded to the owner: apply a client's delta.
    Apply(SessionId, Delta, Timestamp),
    /// Forwarded to the owner: delete.
    Delete(SessionId),
}

impl Request {
    /// Whether this is replication traffic (counted in the metrics).
    pub fn is_replication(&self) -> bool {
        matches!(
            self,
            Self::Put(_) | Self::Delta { .. } | Self::Touch { .. } | Self::Remove(..)
        )
    }
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// A replicated delta found a gap: send the full record.
    NeedFull,
    /// A create found the ID taken.
    Collision,
    /// A write exceeded the size limit.
    TooLarge(usize, usize),
    /// A version, or none (no such live session).
    Version(Option<u64>),
    /// A session, or none.
    Record(Option<Record>),
    /// Whether a delete removed something.
    Deleted(bool),
    /// The node could not do it (its own replication failed, say).
    Unavailable(String),
    /// Anti-entropy: segments whose digests differ.
    Mismatch(Vec<u8>),
}

/// One frame.
#[derive(Debug, Serialize, Deserialize)]
pub struct Frame<T> {
    /// Protocol version.
    pub v: u8,
    /// Correlates a response with its request.
    pub id: u64,
    /// The message.
    pub body: T,
}

/// Handshake messages.
#[derive(Debug, Serialize, Deserialize)]
enum Handshake {
    Hello {
        node: String,
        nonce: [u8; 16],
    },
    Challenge {
        node: String,
        nonce: [u8; 16],
        proof: Vec<u8>,
    },
    Auth {
        proof: Vec<u8>,
    },
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    /// A frame did not decode.
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
    /// A frame of another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The peer does not know the cluster secret.
    #[error("peer failed authentication")]
    Auth,
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
}

fn proof(secret: &[u8], role: &[u8], a: &[u8; 16], b: &[u8; 16]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(a);
    mac.update(b);
    mac.finalize().into_bytes().to_vec()
}

fn verify(secret: &[u8], role: &[u8], a: &[u8; 16], b: &[u8; 16], got: &[u8]) -> bool {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(a);
    mac.update(b);
    mac.verify_slice(got).is_ok()
}

fn nonce() -> [u8; 16] {
    *SessionId::random().as_bytes()
}

/// Sends one value as a frame; returns the bytes written.
pub async fn send<T: Serialize>(conn: &mut Conn, id: u64, body: &T) -> Result<usize, WireError> {
    let bytes = serde_json::to_vec(&Frame {
        v: VERSION,
        id,
        body,
    })
    .map_err(WireError::Malformed)?;
    let n = bytes.len();
    conn.send(Bytes::from(bytes)).await?;
    Ok(n)
}

/// Receives one frame.
pub async fn recv<T: for<'de> Deserialize<'de>>(conn: &mut Conn) -> Result<Frame<T>, WireError> {
    let bytes = conn.next().await.ok_or(WireError::Closed)??;
    let frame: Frame<T> = serde_json::from_slice(&bytes).map_err(WireError::Malformed)?;
    if frame.v != VERSION {
        return Err(WireError::Version(frame.v));
    }
    Ok(frame)
}

/// Client side of the handshake; returns the peer's node name.
pub async fn client_handshake(
    conn: &mut Conn,
    me: &str,
    secret: &[u8],
) -> Result<String, WireError> {
    let mine = nonce();
    send(
        conn,
        0,
        &Handshake::Hello {
            node: me.to_string(),
            nonce: mine,
        },
    )
    .await?;
    let Handshake::Challenge {
        node,
        nonce: theirs,
        proof: p,
    } = recv::<Handshake>(conn).await?.body
    else {
        return Err(WireError::Auth);
    };
    if !verify(secret, b"server", &mine, &theirs, &p) {
        return Err(WireError::Auth);
    }
    send(
        conn,
        0,
        &Handshake::Auth {
            proof: proof(secret, b"client", &theirs, &mine),
        },
    )
    .await?;
    Ok(node)
}

/// Server side of the handshake; returns the peer's node name.
pub async fn server_handshake(
    conn: &mut Conn,
    me: &str,
    secret: &[u8],
) -> Result<String, WireError> {
    let Handshake::Hello {
        node,
        nonce: theirs,
    } = recv::<Handshake>(conn).await?.body
    else {
        return Err(WireError::Auth);
    };
    let mine = nonce();
    let challenge = Handshake::Challenge {
        node: me.to_string(),
        nonce: mine,
        proof: proof(secret, b"server", &theirs, &mine),
    };
    send(conn, 0, &challenge).await?;
    let Handshake::Auth { proof: p } = recv::<Handshake>(conn).await?.body else {
        return Err(WireError::Auth);
    };
    if !verify(secret, b"client", &mine, &theirs, &p) {
        return Err(WireError::Auth);
    }
    Ok(node)
}
