//! A node's settings.

use std::net::SocketAddr;
use std::time::Duration;

use tether_core::DEFAULT_MAX_SIZE;

/// How many nodes hold each session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Every node holds every session.
    All,
    /// The owner and this many backups.
    Backup(usize),
}

/// When the client gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// After the required holders acknowledged.
    Sync,
    /// At once; replication follows.
    Async,
}

/// Settings of one node of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name; must match its backend ID at the load balancer.
    pub node_id: String,
    /// TCP (replication) and UDP (gossip) address.
    pub listen: SocketAddr,
    /// Gossip addresses of other nodes (`host:port`, DNS names allowed).
    pub seeds: Vec<String>,
    /// Shared secret authenticating nodes to each other.
    pub secret: Vec<u8>,
    /// Replication mode.
    pub replication: Replication,
    /// Acknowledgement mode.
    pub ack: Ack,
    /// How long a write waits for acknowledgements.
    pub ack_timeout: Duration,
    /// Gossip interval (failure detection takes a few of them).
    pub gossip_interval: Duration,
    /// Largest session accepted.
    pub max_size: usize,
    /// Between anti-entropy (repair) rounds.
    pub anti_entropy_interval: Duration,
    /// The node is not ready before it has seen this many members (itself
    /// included) once. `None`: 2 when `seeds` are given (a node told of
    /// peers must not take itself for the whole cluster), else 1.
    pub min_nodes: Option<usize>,
    /// A node that gossip stops hearing from leaves the view only after
    /// this long, unless its replication port refuses connections (then
    /// at once): a loaded machine's late gossip is not a death.
    pub suspect_timeout: Duration,
    /// How long a graceful stop ([`crate::ClusterStore::leave`], the node's
    /// SIGTERM) waits for its sessions to reach their next holders.
    pub leave_timeout: Duration,
}

impl ClusterConfig {
    /// A node with defaults: `backup` with one backup, sync acks (2 s), gossip every 100 ms.
    pub fn new(node_id: impl Into<String>, listen: SocketAddr, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            node_id: node_id.into(),
            listen,
            seeds: Vec::new(),
            secret: secret.into(),
            replication: Replication::Backup(1),
            ack: Ack::Sync,
            ack_timeout: Duration::from_secs(2),
            gossip_interval: Duration::from_millis(100),
            max_size: DEFAULT_MAX_SIZE,
            anti_entropy_interval: Duration::from_secs(5),
            min_nodes: None,
            suspect_timeout: Duration::from_secs(3),
            leave_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The replication port could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Gossip could not start.
    #[error("cannot start gossip: {0}")]
    Gossip(String),
    /// The settings cannot work.
    #[error("invalid cluster settings: {0}")]
    Config(String),
}
