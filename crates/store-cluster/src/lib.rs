//! Session clustering: the servers hold the sessions themselves.
//!
//! - `all` (Tomcat's DeltaManager model): every node holds every session;
//!   each write's delta goes to all other nodes.
//! - `backup` (BackupManager / Infinispan `numOwners`): each session has an
//!   owner and `k` backups; the delta goes to the backups only.
//!
//! Placement is by segment ([`tether_core::placement`]): the session ID
//! space is cut into 1024 segments, each placed by rendezvous hashing over
//! the live nodes, the same function as the load balancer's `owner`
//! policy, so requests arrive at the owner and, after it dies, at the first
//! backup, which holds a replica. Membership and failure detection come
//! from chitchat (gossip with a phi accrual failure detector).
//!
//! Every decision lives in an I/O-free core (`core`): events in, messages
//! out. The async node only carries messages; the simulator in
//! `tests/simulator.rs` drives the same core through thousands of random
//! schedules of crashes, restarts, joins, departures, lost and reordered
//! messages.
//!
//! # Writes
//! The owner applies a delta (version + 1) and, with `Ack::Sync` (the
//! default), answers only after `k` backups (all others in `all` mode)
//! acknowledged it *under the same view*: a node whose view of the members
//! differs refuses replication, so under one view a session has exactly one
//! owner. A backup that is down (refuses connections) is replaced by the
//! next node of the preference list; if too few acknowledge in time the
//! write fails with a clear error instead of pretending success. Such an
//! error does not mean "not written": the owner keeps the write, so it may
//! still appear. A forwarded operation falls back to the next node only
//! when the owner refuses connections (it is down): an owner that is merely
//! slow may still apply the request, and a second acting owner would apply
//! it twice, so the client gets 503 instead. `Ack::Async` answers at once:
//! a write acknowledged to the client can then be lost if the owner dies
//! within the replication delay (a few milliseconds on a LAN).
//!
//! # Membership changes
//! On every view change each node runs a transfer round with every peer:
//! it compares per-segment digests of the segments both should hold, sends
//! those that differ and those it no longer holds under the new view, and
//! says `Synced`. A segment handed off is dropped only after every new
//! holder acknowledged it. Until every peer has synced with it, an owner
//! asks the unsynced peers what they know of a session before answering
//! (read-through), so a new owner never answers "no session" for a session
//! that exists elsewhere, and never writes on a stale copy.
//!
//! A node is *serving* ([`ClusterStore::is_serving`], the node's `/health`)
//! once it has joined (seen `min_nodes` members: a node given seeds never
//! takes itself for the whole cluster) and received its share, until it
//! leaves. It is *ready* ([`ClusterStore::is_ready`]) while membership has
//! converged (every peer synced under this very view) and it holds its
//! share; a new view makes it not ready until it has synced again, but it
//! keeps serving meanwhile (read-through answers correctly).
//! [`Status::fully_replicated`] says when every session it holds has all
//! its copies, so a deploy may stop the next node.
//! [`ClusterStore::leave`] (the node's SIGTERM) announces the departure,
//! hands every session to the nodes that hold it next and returns once
//! they acknowledged: a rolling restart never drops a session to one copy.
//!
//! A member that refuses connections is dropped from the view by every node
//! that talks to it within a round trip (a refused message, or a peer whose
//! view differs, makes a node probe its members); one that stops gossiping
//! but still accepts connections (frozen, cut off) after
//! [`ClusterConfig::suspect_timeout`].
//!
//! Deletions leave tombstones (at least 2 minutes, or as long as the
//! session could have lived), so a copy sent before a logout, or by a
//! transfer, cannot bring the session back.
//!
//! # Anti-entropy
//! Every 5 s each node runs a repair round (the same digest comparison,
//! without `Synced`): a holder that missed a write (a dropped connection,
//! an async write, a healed partition) is repaired without anyone noticing.
//!
//! # Partitions
//! There is no quorum: during a partition each side acts as owner for the
//! sessions whose owner it cannot reach, and after healing the higher
//! version wins (at equal versions the later access), so writes made on
//! the losing side of a session can be lost. Sticky routing through the
//! `owner` policy keeps a user on one side.
//!
//! # Wire
//! TCP, length-delimited JSON frames with a version, at most 1 MiB, after a
//! mutual HMAC-SHA256 handshake on the cluster secret. Gossip datagrams
//! carry an HMAC tag keyed by the secret, so a stranger can neither join
//! nor announce a fake member.

mod config;
pub mod core;
mod driver;
mod gossip;
mod membership;
mod peer;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chitchat::ChitchatHandle;
use tether_core::placement;
use tether_core::{Delta, Load, Record, SessionId, SessionStore, StoreError, Timestamp};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use crate::config::{Ack, ClusterConfig, Replication, StartError};
pub use crate::core::Status;
use crate::core::{view::Member, Core};
use crate::driver::{lock, Driver};
use crate::wire::{Op, Outcome, Refusal};

/// Replication figures for `/metrics` and the demo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Writes applied by this node as owner.
    pub writes: u64,
    /// Replication messages sent (owner to holders).
    pub messages: u64,
    /// Replication bytes sent (owner to holders).
    pub bytes: u64,
    /// Writes answered by this node's store, and their total time in µs
    /// (at the owner: the apply and the holders' acknowledgements).
    pub acks: u64,
    /// See `acks`.
    pub ack_us: u64,
    /// Writes that failed for want of acknowledgements.
    pub ack_failures: u64,
    /// Operations sent to another node because this one does not own the session.
    pub forwarded: u64,
    /// Sessions sent and received by transfer rounds.
    pub transferred_out: u64,
    /// Sessions received by transfer rounds.
    pub transferred_in: u64,
    /// Bytes sent by transfer rounds.
    pub transfer_bytes: u64,
    /// Operations that asked peers first while a transfer was under way.
    pub read_throughs: u64,
    /// Segments handed off to their new holders and dropped here.
    pub handed_off: u64,
    /// Membership views installed.
    pub views: u64,
}

/// A [`SessionStore`] replicated among the servers.
pub struct ClusterStore {
    driver: Arc<Driver>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    chitchat: ChitchatHandle,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("node", &lock(&self.driver.core).me().name)
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Gossip stops with its handle; connections close here, so a dropped
        // store is gone for its peers as a crashed node would be.
        self.driver.close();
    }
}

fn refusal(r: Refusal) -> StoreError {
    match r {
        Refusal::Collision => StoreError::Collision,
        Refusal::Conflict => StoreError::Conflict,
        Refusal::TooLarge { size, limit } => StoreError::TooLarge { size, limit },
        Refusal::Unavailable(msg) => StoreError::unavailable(msg),
    }
}

fn unexpected(o: &Outcome) -> StoreError {
    StoreError::unavailable(format!("unexpected answer from the cluster: {o:?}"))
}

impl ClusterStore {
    /// Binds the replication port, joins the gossip and starts serving.
    ///
    /// # Errors
    /// If the port cannot be bound or gossip cannot start.
    pub async fn start(config: ClusterConfig) -> Result<Self, StartError> {
        if config.max_size > wire::MAX_FRAME / 2 {
            return Err(StartError::Config(format!(
                "a session limit of {} bytes does not fit the replication frame limit ({} bytes); use at most {}",
                config.max_size,
                wire::MAX_FRAME,
                wire::MAX_FRAME / 2
            )));
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let listen = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut config = config;
        config.listen = listen;
        // Generations order the lives of a node: a restart is a new member.
        let generation = Timestamp::now().0;
        let me = Member::new(config.node_id.clone(), generation);
        let mut core_config = crate::core::Config::new(me.clone());
        core_config.replication = config.replication;
        core_config.ack = config.ack;
        core_config.ack_timeout = config.ack_timeout;
        core_config.max_size = config.max_size;
        core_config.anti_entropy = config.anti_entropy_interval;
        core_config.min_nodes =
            config
                .min_nodes
                .unwrap_or(if config.seeds.is_empty() { 1 } else { 2 });
        let core = Core::new(core_config, Timestamp::now());
        let (hint_tx, hints) = tokio::sync::mpsc::unbounded_channel();
        let driver = Arc::new(Driver::new(
            core,
            config.secret.clone(),
            listen.ip(),
            config.ack_timeout,
            hint_tx,
        ));
        let chitchat = membership::start(&config, generation).await?;
        let tasks = vec![
            tokio::spawn(driver::serve(driver.clone(), listener)),
            tokio::spawn(driver::tick(driver.clone())),
            tokio::spawn(membership::watch(
                driver.clone(),
                chitchat.chitchat(),
                me,
                config.suspect_timeout,
                hints,
            )),
        ];
        Ok(Self {
            driver,
            addr: listen,
            tasks,
            chitchat,
        })
    }

    /// The nodes that should hold session `id` under the current view, owner first.
    pub fn holders(&self, id: &SessionId) -> Vec<String> {
        let core = lock(&self.driver.core);
        core.view()
            .holders(placement::segment(id), core.copies())
            .map(str::to_string)
            .collect()
    }

    /// This node's own copy of session `id`, if it holds one (no routing:
    /// for inspecting replicas).
    pub fn local_copy(&self, id: &SessionId) -> Option<Record> {
        lock(&self.driver.core).store().get(id, Timestamp::now())
    }

    /// This node's name.
    pub fn node_id(&self) -> String {
        lock(&self.driver.core).me().name.clone()
    }

    /// This node's replication (and gossip) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live nodes this node sees, sorted.
    pub fn live_nodes(&self) -> Vec<String> {
        lock(&self.driver.core).view().names()
    }

    /// Whether membership has converged and this node holds its share
    /// (false again after a view change, until synced).
    pub fn is_ready(&self) -> bool {
        lock(&self.driver.core).is_ready()
    }

    /// Whether a balancer may send this node requests: it joined and got
    /// its share once, and is not leaving (the node's `/health`).
    pub fn is_serving(&self) -> bool {
        lock(&self.driver.core).is_serving()
    }

    /// Readiness, replication state and the view, for operators.
    pub fn status(&self) -> Status {
        lock(&self.driver.core).status()
    }

    /// Replication figures.
    pub fn metrics(&self) -> Metrics {
        let c = lock(&self.driver.core).counters();
        Metrics {
            writes: c.writes,
            messages: c.messages,
            bytes: self.driver.bytes.load(Ordering::Relaxed),
            acks: self.driver.writes_timed.load(Ordering::Relaxed),
            ack_us: self.driver.write_us.load(Ordering::Relaxed),
            ack_failures: c.ack_failures,
            forwarded: c.forwarded,
            transferred_out: c.transferred_out,
            transferred_in: c.transferred_in,
            transfer_bytes: self.driver.transfer_bytes.load(Ordering::Relaxed),
            read_throughs: c.read_throughs,
            handed_off: c.handed_off,
            views: c.views,
        }
    }

    /// Sessions this node owns, sessions it holds as a backup, and their
    /// attribute bytes.
    pub fn holdings(&self) -> (usize, usize, usize) {
        lock(&self.driver.core).holdings()
    }

    /// Leaves the cluster gracefully: announces the departure, hands every
    /// session to the nodes that hold it next, and returns `true` once they
    /// all acknowledged (`false` if `within` passed first). Afterwards this
    /// node only forwards to the others.
    pub async fn leave(&self, within: Duration) -> bool {
        {
            let chitchat = self.chitchat.chitchat();
            let mut guard = chitchat.lock().await;
            guard
                .self_node_state()
                .set(membership::LEAVING, "1".to_string());
        }
        let mut left = self.driver.left.subscribe();
        self.driver.feed(crate::core::Input::Leave);
        tokio::time::timeout(within, left.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn call(&self, op: Op) -> Result<Outcome, StoreError> {
        self.driver.call(op).await.map_err(refusal)
    }
}

#[async_trait]
impl SessionStore for ClusterStore {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        match self.call(Op::Create(record.clone())).await? {
            Outcome::Created => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        match self.call(Op::Load(*id, load)).await? {
            Outcome::Record(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        match self.call(Op::Apply(*id, delta.clone(), now)).await? {
            Outcome::Version(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        match self.call(Op::Delete(*id, Timestamp::now())).await? {
            Outcome::Deleted(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        // The old and new IDs usually have different owners: move the
        // session by creating it under the new ID, then deleting the old.
        let Some(mut record) = self.load(old, Load::at(now)).await? else {
            return Ok(None);
        };
        if !record.meets(delta) {
            return Err(StoreError::Conflict);
        }
        let size = record.size_after(delta);
        let limit = self.max_size();
        if size > limit {
            return Err(StoreError::TooLarge { size, limit });
        }
        record.apply(delta, now);
        record.id = *new;
        self.create(&record).await?;
        self.delete(old).await?;
        Ok(Some(record.version))
    }

    fn max_size(&self) -> usize {
        lock(&self.driver.core).max_size()
    }

    fn propose_id(&self) -> SessionId {
        // Draw until this node owns the ID, so a login's session starts here
        // and the balancer's `owner` policy sends the next request here too.
        let core = lock(&self.driver.core);
        let me = core.me().name.clone();
        for _ in 0..64 {
            let id = SessionId::random();
            if core.view().owner(placement::segment(&id)) == Some(me.as_str()) {
                return id;
            }
        }
        SessionId::random()
    }
}
