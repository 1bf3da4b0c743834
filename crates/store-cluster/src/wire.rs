//! The node-to-node protocol: length-delimited frames of versioned JSON
//! over TCP, after a mutual HMAC handshake on the cluster secret. Three
//! protocols share a connection: forwarded client operations, replication
//! from an owner to the other holders, and segment transfer.
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

use crate::core::store::{Known, Stamped, Tombstone};
use crate::core::view::{Member, ViewId};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The protocol version carried in every frame.
pub const VERSION: u8 = 2;
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

/// Every request carries its sender and the sender's view: replication
/// and transfer messages are only accepted between nodes that agree on the
/// view, so two nodes can never both act as a segment's owner for
/// acknowledged writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending incarnation.
    #[serde(rename = "f")]
    pub from: Member,
    /// The sender's view.
    #[serde(rename = "v")]
    pub view: ViewId,
    /// The request.
    #[serde(rename = "b")]
    pub body: Request,
}

/// What one node asks another: one enum per protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// A client's operation, sent to the session's owner.
    Forward(Forward),
    /// From the owner to the other holders of a session.
    Replicate(Replicate),
    /// Moving segments between holders when the view changes, and repair.
    Transfer(Transfer),
}

/// A client's operation forwarded to the node that owns the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forward {
    /// The operation.
    pub op: Op,
    /// Nodes the sender found down (connections refused), with the
    /// generation it tried: the receiver acts as owner if it is the first
    /// of the session's preference without them (a newer generation of a
    /// skipped name is not skipped: it restarted).
    pub skip: Vec<Member>,
}

/// A client's operation on one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Create if absent.
    Create(Record),
    /// Load, recording the access lazily.
    Load(SessionId, Load),
    /// Apply a delta at a time.
    Apply(SessionId, Delta, Timestamp),
    /// Delete at a time.
    Delete(SessionId, Timestamp),
}

impl Op {
    /// The session the operation is about.
    pub fn id(&self) -> SessionId {
        match self {
            Self::Create(r) => r.id,
            Self::Load(id, _) | Self::Apply(id, _, _) | Self::Delete(id, _) => *id,
        }
    }
}

/// Owner to holders: keep your copy equal to mine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Replicate {
    /// Install a full copy (creation, repair, a new holder).
    Put(Stamped),
    /// Apply a delta the owner applied to version `base`.
    Delta {
        /// Names the write.
        stamp: u64,
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
    /// Delete for good.
    Remove(Tombstone),
}

/// Segment transfer between the holders of a view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Transfer {
    /// The sender's digests of segments both should hold; the receiver
    /// answers those that differ from its own.
    Digest(Vec<(u16, u64)>),
    /// Sessions and deletions of some segments.
    Batch {
        /// Sessions.
        records: Vec<Stamped>,
        /// Deletions.
        tombstones: Vec<Tombstone>,
    },
    /// The sender has sent the receiver everything it should hold from the
    /// sender under this view.
    Synced,
    /// What do you know of these sessions? (A new owner's read-through.)
    Fetch(Vec<SessionId>),
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// A forwarded operation's result.
    Done(Result<Outcome, Refusal>),
    /// A forwarded operation reached a node that does not own the session
    /// under its view: route again.
    NotOwner,
    /// Applied (or already there).
    Ack,
    /// A replicated delta found a gap: send the full record.
    NeedFull,
    /// The holder has another history of the session (or a later
    /// deletion): what it holds, for the owner to decide.
    Conflict(Known),
    /// The receiver's view differs from the sender's: retry once they agree.
    WrongView,
    /// Segments whose digests differ.
    Mismatch(Vec<u16>),
    /// What the receiver knows of each session asked for, in order.
    Known(Vec<Known>),
}

/// What an operation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    /// Created.
    Created,
    /// The session, or none.
    Record(Option<Record>),
    /// The new version, or none (no such live session).
    Version(Option<u64>),
    /// Whether a live session was deleted.
    Deleted(bool),
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A create found the ID taken.
    Collision,
    /// A conditional write found the attribute changed.
    Conflict,
    /// A write exceeded the size limit.
    TooLarge {
        /// The size it would have had.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not possible now (no owner reachable, not replicated in time…).
    Unavailable(String),
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
