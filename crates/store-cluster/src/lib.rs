//! Session clustering: the servers hold the sessions themselves.
//!
//! - `all` (Tomcat's DeltaManager model): every node holds every session;
//!   each write's delta goes to all other nodes.
//! - `backup` (BackupManager / Infinispan `numOwners`): rendezvous hashing of
//!   the session ID over the live nodes gives an owner and `k` backups; the
//!   delta goes to the backups only.
//!
//! Membership and failure detection come from chitchat (gossip with a phi
//! accrual failure detector). Ownership uses [`tether_core::placement`], the
//! same function as the load balancer's `owner` policy, so requests arrive at
//! the owner, and after it dies at the first backup, which holds a replica.
//!
//! # Writes
//! The owner applies a delta (version + 1) and, with `Ack::Sync` (the
//! default), answers only after `k` backups (all others in `all` mode)
//! acknowledged it; a backup that cannot be reached is replaced by the next
//! node of the preference list, and if too few acknowledge in time the write
//! fails with a clear error instead of pretending success. Such an error
//! does not mean "not written": the owner keeps the write (as Tomcat's
//! DeltaManager does), so a client retrying a create may get a collision.
//! A forwarded operation falls back to the next node only when the owner
//! refuses connections (it is down): an owner that is merely slow may still
//! apply the request, and a second acting owner would apply it twice, so
//! the client gets 503 instead. `Ack::Async`
//! answers at once: a write acknowledged to the client can then be lost if
//! the owner dies within the replication delay (a few milliseconds on a LAN).
//!
//! # Membership changes
//! On every change of the live set each node re-sends the sessions it holds
//! to their current replica set (versions make the repeats harmless): the
//! first backup of a dead owner re-replicates to a new backup, and a node
//! that (re)joins receives what it now owns. Each node then tells its peers
//! it is done; a node reports ready ([`ClusterStore::is_ready`]) once every
//! live peer has.
//!
//! Deletions leave tombstones (at least 2 minutes, or as long as the
//! session could have lived), so a copy sent before a logout, or by a
//! rebalance, cannot bring the session back.
//!
//! # Anti-entropy
//! Every 5 s each owner compares, with every peer, per-segment digests (64
//! segments) of the versions of the sessions the peer should back up, and
//! re-sends the sessions of segments that differ: a backup that missed a
//! delta (a dropped connection, an async write, a healed partition) is
//! repaired without anyone noticing. A delta that finds a version gap is
//! answered with a request for the full record.
//!
//! # Partitions
//! There is no quorum: during a partition each side acts as owner for the
//! sessions whose owner it cannot reach, and after healing the higher
//! version wins, so writes made on the losing side of a session can be
//! lost. Sticky routing through the `owner` policy keeps a user on one side.
//!
//! # Wire
//! TCP, length-delimited JSON frames with a version, at most 1 MiB, after a
//! mutual HMAC-SHA256 handshake on the cluster secret. Gossip datagrams
//! carry an HMAC tag keyed by the secret, so a stranger can neither join
//! nor announce a fake member.

mod gossip;
mod peer;
pub mod replica;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use futures_util::{SinkExt, StreamExt};
use tether_core::placement;
use tether_core::{
    Delta, Load, Record, SessionId, SessionStore, StoreError, Timestamp, DEFAULT_MAX_SIZE,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use peer::Peer;
use replica::{Replica, Replicated};
use wire::{Frame, Request, Response};

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
    /// After the required backups acknowledged.
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
    /// Between anti-entropy passes.
    pub anti_entropy_interval: Duration,
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
        }
    }
}

/// Replication figures for `/metrics` and the demo.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Writes applied by this node as owner.
    pub writes: AtomicU64,
    /// Replication messages sent.
    pub messages: AtomicU64,
    /// Replication bytes sent (frame payloads).
    pub bytes: AtomicU64,
    /// Sum of acknowledgement waits, µs.
    pub ack_us: AtomicU64,
    /// Acknowledgement waits measured.
    pub acks: AtomicU64,
    /// Writes that failed for want of acknowledgements.
    pub ack_failures: AtomicU64,
    /// Operations sent to another node because this one does not own the session.
    pub forwarded: AtomicU64,
}

/// Deletions are remembered at least this long, so a copy in flight or in
/// a rebalance cannot bring a deleted (logged-out) session back.
const TOMBSTONE_MIN: Duration = Duration::from_secs(120);

/// What became of one replication message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Acked,
    /// The connection was refused: the node is down.
    Refused,
    Failed,
}

/// The live members as this node sees them.
#[derive(Debug, Clone, Default)]
struct View {
    ids: Vec<String>,
    addrs: HashMap<String, SocketAddr>,
    /// Each member's generation: a restarted node is a new member even
    /// when gossip has not yet declared its previous life dead.
    generations: Vec<(String, u64)>,
}

struct Node {
    config: ClusterConfig,
    replica: Mutex<Replica>,
    view: RwLock<View>,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    metrics: Metrics,
    synced_from: Mutex<HashSet<String>>,
    ready: AtomicBool,
    rebalancing: tokio::sync::Mutex<()>,
}

/// A [`SessionStore`] replicated among the servers.
pub struct ClusterStore {
    node: Arc<Node>,
    tasks: Vec<JoinHandle<()>>,
    _chitchat: ChitchatHandle,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("node", &self.node.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
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

fn unavailable(msg: impl Into<String>) -> StoreError {
    let e: tether_core::BoxError = msg.into().into();
    StoreError::Unavailable(e)
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
        let generation = Timestamp::now().0;
        let cluster_id = {
            use hmac::{Hmac, KeyInit, Mac};
            let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&config.secret)
                .expect("any key length");
            mac.update(b"tether-cluster-id");
            let tag = mac.finalize().into_bytes();
            tag[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.node_id.clone(), generation, listen),
            cluster_id,
            gossip_interval: config.gossip_interval,
            listen_addr: listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: config.gossip_interval,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let transport = gossip::AuthUdp::new(&config.secret);
        let chitchat = spawn_chitchat(
            chitchat_config,
            vec![("repl".into(), listen.to_string())],
            &transport,
        )
        .await
        .map_err(|e| StartError::Gossip(format!("{e:#}")))?;
        let node = Arc::new(Node {
            view: RwLock::new(View {
                ids: vec![config.node_id.clone()],
                addrs: HashMap::from([(config.node_id.clone(), listen)]),
                generations: Vec::new(),
            }),
            config,
            replica: Mutex::new(Replica::default()),
            peers: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            synced_from: Mutex::new(HashSet::new()),
            ready: AtomicBool::new(false),
            rebalancing: tokio::sync::Mutex::new(()),
        });
        let mut tasks = vec![tokio::spawn(serve(node.clone(), listener))];
        let watcher = chitchat.chitchat().lock().await.live_nodes_watcher();
        tasks.push(tokio::spawn(watch_membership(node.clone(), watcher)));
        let sweeper = node.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                lock(&sweeper.replica).sweep(Timestamp::now());
            }
        }));
        let repairer = node.clone();
        let every = node.config.anti_entropy_interval;
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                repairer.clone().anti_entropy().await;
            }
        }));
        Ok(Self {
            node,
            tasks,
            _chitchat: chitchat,
        })
    }

    /// The nodes that should hold session `id`, owner first.
    pub fn holders(&self, id: &SessionId) -> Vec<String> {
        self.node.replica_set(id)
    }

    /// This node's own copy of session `id`, if it holds one (no routing:
    /// for inspecting replicas).
    pub fn local_copy(&self, id: &SessionId) -> Option<Record> {
        lock(&self.node.replica).get(id, Timestamp::now()).cloned()
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.node.config.node_id
    }

    /// This node's replication (and gossip) address.
    pub fn addr(&self) -> SocketAddr {
        self.node.config.listen
    }

    /// The live nodes this node sees, sorted.
    pub fn live_nodes(&self) -> Vec<String> {
        read(&self.node.view).ids.clone()
    }

    /// Whether every live peer has re-replicated to this node since it joined.
    pub fn is_ready(&self) -> bool {
        self.node.ready.load(Ordering::SeqCst)
    }

    /// Replication figures.
    pub fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }

    /// (sessions owned, sessions backed up, attribute bytes held).
    pub fn holdings(&self) -> (usize, usize, usize) {
        let now = Timestamp::now();
        let records = lock(&self.node.replica).snapshot();
        let me = &self.node.config.node_id;
        let owned = records
            .iter()
            .filter(|r| !r.is_expired(now))
            .filter(|r| self.node.replica_set(&r.id).first() == Some(me))
            .count();
        let (held, bytes) = lock(&self.node.replica).stats();
        (owned, held - owned, bytes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Node {
    fn me(&self) -> &str {
        &self.config.node_id
    }

    /// Owner first, then the nodes that hold replicas, then the rest (the
    /// fallbacks when one of those cannot be reached).
    fn preference(&self, id: &SessionId) -> Vec<String> {
        let view = read(&self.view);
        placement::preference(id.as_bytes(), &view.ids)
            .into_iter()
            .cloned()
            .collect()
    }

    /// The nodes that should hold `id`.
    fn replica_set(&self, id: &SessionId) -> Vec<String> {
        let mut p = self.preference(id);
        if let Replication::Backup(k) = self.config.replication {
            p.truncate(k + 1);
        }
        p
    }

    fn backups_wanted(&self) -> usize {
        let live = read(&self.view).ids.len();
        match self.config.replication {
            Replication::All => live.saturating_sub(1),
            Replication::Backup(k) => k.min(live.saturating_sub(1)),
        }
    }

    fn peer(&self, node: &str) -> Option<Arc<Peer>> {
        let addr = *read(&self.view).addrs.get(node)?;
        let mut peers = lock(&self.peers);
        Some(
            peers
                .entry(addr)
                .or_insert_with(|| Arc::new(Peer::new(addr, Some(self.config.listen.ip()))))
                .clone(),
        )
    }

    async fn call(
        &self,
        node: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, peer::CallError> {
        let peer = self
            .peer(node)
            .ok_or(peer::CallError::Connect(self.config.listen))?;
        peer.call(self.me(), &self.config.secret, req, timeout)
            .await
    }

    /// Runs `req` at the owner of `id`: here if this node owns it, else at
    /// the first node of the preference list that answers (a dead owner not
    /// yet noticed by gossip is skipped; its first backup acts as owner).
    async fn route(self: &Arc<Self>, id: &SessionId, req: Request) -> Result<Response, StoreError> {
        let mut last = String::from("no live node");
        for candidate in self.preference(id) {
            if candidate == self.me() {
                return Ok(self.clone().handle(req).await);
            }
            self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
            match self
                .call(&candidate, req.clone(), self.config.ack_timeout * 2)
                .await
            {
                Ok(r) => return Ok(r),
                // Refused: the owner is down, the next node acts as owner.
                Err(e @ peer::CallError::Connect(_)) => last = e.to_string(),
                // Slow or cut mid-request: it may still apply the request,
                // so acting as owner here could apply it twice. Fail instead.
                Err(e) => {
                    return Err(unavailable(format!(
                        "the session's owner did not answer: {e}"
                    )))
                }
            }
        }
        Err(unavailable(format!(
            "no owner reachable for the session: {last}"
        )))
    }

    /// Sends `req` (a replication message about `id`) to the backups,
    /// replacing unreachable ones by the next nodes of the preference list.
    /// `repair` is the full record to send to a backup that reports a gap.
    async fn replicate(
        self: &Arc<Self>,
        id: &SessionId,
        req: Request,
        repair: Option<Record>,
    ) -> Result<(), StoreError> {
        let wanted = self.backups_wanted();
        if wanted == 0 {
            return Ok(());
        }
        let size = serde_json::to_vec(&req).map(|v| v.len()).unwrap_or(0) as u64;
        let candidates: Vec<String> = self
            .preference(id)
            .into_iter()
            .filter(|n| n != self.me())
            .collect();
        let node = self.clone();
        let work = async move {
            let started = Instant::now();
            // The first `wanted` candidates in parallel (so all-to-all
            // latency does not grow with N), then the next ones in turn for
            // any that failed.
            let (first, rest) = candidates.split_at(wanted.min(candidates.len()));
            let sends = first
                .iter()
                .map(|t| node.send_replica(t, &req, &repair, size));
            let results = futures_util::future::join_all(sends).await;
            let mut acked = results.iter().filter(|r| **r == Sent::Acked).count();
            // A node that refuses connections has crashed: it holds nothing
            // to keep consistent, and gossip will drop it shortly. In `all`
            // mode there is nobody to replace it, so it is not waited for.
            let refused = results.iter().filter(|r| **r == Sent::Refused).count();
            let wanted = match node.config.replication {
                Replication::All => wanted - refused,
                Replication::Backup(_) => wanted,
            };
            for target in rest {
                if acked >= wanted {
                    break;
                }
                if node.send_replica(target, &req, &repair, size).await == Sent::Acked {
                    acked += 1;
                }
            }
            node.metrics
                .ack_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            node.metrics.acks.fetch_add(1, Ordering::Relaxed);
            (acked, wanted)
        };
        match self.config.ack {
            Ack::Async => {
                tokio::spawn(work);
                Ok(())
            }
            Ack::Sync => {
                let (acked, wanted) = work.await;
                if acked < wanted {
                    self.metrics.ack_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(unavailable(format!(
                        "write not replicated: {acked} of {wanted} backups acknowledged within {:?}",
                        self.config.ack_timeout
                    )));
                }
                Ok(())
            }
        }
    }

    /// Sends one replication message; a backup that reports a gap gets the
    /// full record. Returns whether the backup acknowledged.
    async fn send_replica(
        &self,
        target: &str,
        req: &Request,
        repair: &Option<Record>,
        size: u64,
    ) -> Sent {
        self.metrics.messages.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes.fetch_add(size, Ordering::Relaxed);
        let mut answer = self
            .call(target, req.clone(), self.config.ack_timeout)
            .await;
        if let Err(peer::CallError::Lost(_)) = answer {
            // The connection died under the message (the peer crashed, or
            // dropped an idle connection). Replication messages are
            // idempotent, so try once more on a new connection: a crashed
            // peer now refuses it, which is an answer.
            answer = self
                .call(target, req.clone(), self.config.ack_timeout)
                .await;
        }
        match answer {
            Ok(Response::Ok) => Sent::Acked,
            Ok(Response::NeedFull) => {
                let Some(full) = repair.clone() else {
                    return Sent::Failed;
                };
                let put = Request::Put(full);
                let bytes = serde_json::to_vec(&put).map(|v| v.len()).unwrap_or(0) as u64;
                self.metrics.messages.fetch_add(1, Ordering::Relaxed);
                self.metrics.bytes.fetch_add(bytes, Ordering::Relaxed);
                match self.call(target, put, self.config.ack_timeout).await {
                    Ok(Response::Ok) => Sent::Acked,
                    _ => Sent::Failed,
                }
            }
            Ok(other) => {
                tracing::warn!(%target, ?other, "unexpected replication answer");
                Sent::Failed
            }
            Err(peer::CallError::Connect(_)) => Sent::Refused,
            Err(e) => {
                tracing::debug!(%target, error = %e, "backup unreachable; trying the next node");
                Sent::Failed
            }
        }
    }

    fn check_size(&self, size: usize) -> Result<(), StoreError> {
        if size > self.config.max_size {
            return Err(StoreError::TooLarge {
                size,
                limit: self.config.max_size,
            });
        }
        Ok(())
    }

    /// Acting as owner: create.
    async fn owner_create(self: &Arc<Self>, record: Record) -> Result<(), StoreError> {
        self.check_size(record.size())?;
        {
            let mut replica = lock(&self.replica);
            if replica.get(&record.id, record.last_access).is_some() {
                return Err(StoreError::Collision);
            }
            replica.put(record.clone());
        }
        self.metrics.writes.fetch_add(1, Ordering::Relaxed);
        self.replicate(&record.id, Request::Put(record.clone()), None)
            .await
    }

    /// Acting as owner: apply.
    async fn owner_apply(
        self: &Arc<Self>,
        id: SessionId,
        delta: Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let record = {
            let mut replica = lock(&self.replica);
            let Some(r) = replica.get_mut(&id, now) else {
                return Ok(None);
            };
            self.check_size(r.size_after(&delta))?;
            r.apply(&delta, now);
            r.clone()
        };
        self.metrics.writes.fetch_add(1, Ordering::Relaxed);
        let version = record.version;
        let req = Request::Delta {
            id,
            base: version - 1,
            delta,
            now,
        };
        self.replicate(&id, req, Some(record)).await?;
        Ok(Some(version))
    }

    /// Acting as owner: load, recording the access lazily.
    async fn owner_load(self: &Arc<Self>, id: SessionId, load: Load) -> Option<Record> {
        let record = {
            let mut replica = lock(&self.replica);
            let r = replica.get_mut(&id, load.now)?;
            if load.should_refresh(r) {
                r.last_access = load.now;
                Some(r.clone())
            } else {
                return Some(r.clone());
            }
        }?;
        // The access must reach the backups, or a failover would expire the
        // session early; it is not worth a client's wait.
        let node = self.clone();
        let touch = Request::Touch {
            id,
            last_access: load.now,
        };
        tokio::spawn(async move {
            let _ = node.replicate_async(&id, touch).await;
        });
        Some(record)
    }

    async fn replicate_async(
        self: &Arc<Self>,
        id: &SessionId,
        req: Request,
    ) -> Result<(), StoreError> {
        for target in self.replica_set(id).into_iter().filter(|n| n != self.me()) {
            self.metrics.messages.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .call(&target, req.clone(), self.config.ack_timeout)
                .await;
        }
        Ok(())
    }

    /// Acting as owner: delete.
    async fn owner_delete(self: &Arc<Self>, id: SessionId) -> Result<bool, StoreError> {
        let now = Timestamp::now();
        let (version, until, existed) = {
            let mut replica = lock(&self.replica);
            let old = replica.get(&id, now).cloned();
            // Remember the deletion as long as the session could have lived.
            let until = old.as_ref().map_or(now.plus(TOMBSTONE_MIN), |r| {
                r.expires_at().max(now.plus(TOMBSTONE_MIN))
            });
            let version = old.as_ref().map_or(0, |r| r.version + 1);
            let existed = replica.delete(&id, version, until, now).is_some();
            (version, until, existed)
        };
        self.metrics.writes.fetch_add(1, Ordering::Relaxed);
        self.replicate(&id, Request::Remove(id, version, until), None)
            .await?;
        Ok(existed)
    }

    /// Serves one request from a peer (or from this node's own routing).
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        let outcome = |r: Result<Response, StoreError>| match r {
            Ok(r) => r,
            Err(StoreError::Collision) => Response::Collision,
            Err(StoreError::TooLarge { size, limit }) => Response::TooLarge(size, limit),
            Err(e) => Response::Unavailable(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )),
        };
        match req {
            Request::Put(r) => {
                lock(&self.replica).put(r);
                Response::Ok
            }
            Request::Delta {
                id,
                base,
                delta,
                now,
            } => match lock(&self.replica).apply_replicated(&id, base, &delta, now) {
                Replicated::Applied(_) | Replicated::Stale => Response::Ok,
                Replicated::Gap => Response::NeedFull,
            },
            Request::Touch { id, last_access } => {
                lock(&self.replica).touch(&id, last_access);
                Response::Ok
            }
            Request::Remove(id, version, until) => {
                lock(&self.replica).delete(&id, version, until, Timestamp::now());
                Response::Ok
            }
            Request::Synced => Response::Ok,
            Request::Digest { owner, segments } => {
                let me = self.me().to_string();
                let mine = lock(&self.replica).digests(Timestamp::now(), |id| {
                    let set = self.replica_set(id);
                    set.first() == Some(&owner) && set.contains(&me)
                });
                let differ = (0..mine.len())
                    .filter(|i| segments.get(*i) != Some(&mine[*i]))
                    .map(|i| i as u8)
                    .collect();
                Response::Mismatch(differ)
            }
            Request::Create(r) => outcome(self.owner_create(r).await.map(|()| Response::Ok)),
            Request::Load(id, load) => Response::Record(self.owner_load(id, load).await),
            Request::Apply(id, delta, now) => outcome(
                self.owner_apply(id, delta, now)
                    .await
                    .map(Response::Version),
            ),
            Request::Delete(id) => outcome(self.owner_delete(id).await.map(Response::Deleted)),
        }
    }

    /// One anti-entropy pass: for every peer, compare digests of the
    /// sessions this node owns and the peer should hold; re-send the
    /// sessions of segments that differ (a backup that missed a delta, a
    /// dropped connection, a partition that healed).
    async fn anti_entropy(self: Arc<Self>) {
        let peers: Vec<String> = read(&self.view)
            .ids
            .iter()
            .filter(|n| *n != self.me())
            .cloned()
            .collect();
        let me = self.me().to_string();
        for peer in peers {
            let select = |id: &SessionId| {
                let set = self.replica_set(id);
                set.first() == Some(&me) && set.contains(&peer)
            };
            let segments = lock(&self.replica).digests(Timestamp::now(), select);
            let req = Request::Digest {
                owner: me.clone(),
                segments,
            };
            let Ok(Response::Mismatch(differ)) =
                self.call(&peer, req, self.config.ack_timeout).await
            else {
                continue;
            };
            if differ.is_empty() {
                continue;
            }
            let records = lock(&self.replica).in_segments(Timestamp::now(), &differ, select);
            tracing::info!(%peer, segments = differ.len(), sessions = records.len(), "anti-entropy repairing a replica");
            for r in records {
                self.metrics.messages.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .call(&peer, Request::Put(r), self.config.ack_timeout)
                    .await;
            }
        }
    }

    fn update_ready(&self) {
        let view = read(&self.view);
        let synced = lock(&self.synced_from);
        let ready = view
            .ids
            .iter()
            .filter(|n| *n != self.me())
            .all(|n| synced.contains(n));
        if ready && !self.ready.swap(true, Ordering::SeqCst) {
            tracing::info!(node = self.me(), "holding its share of sessions: ready");
        }
    }

    /// After a membership change: send every held session to its current
    /// replica set, then tell every peer this node is done.
    async fn rebalance(self: Arc<Self>) {
        // One pass at a time: a pass that started under an older view must
        // not finish (and hand sessions off) after a newer one began.
        let _pass = self.rebalancing.lock().await;
        let (records, tombstones) = {
            let replica = lock(&self.replica);
            (replica.snapshot(), replica.tombstones())
        };
        for (id, version, until) in tombstones {
            for target in self.replica_set(&id).iter().filter(|n| *n != self.me()) {
                self.metrics.messages.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .call(
                        target,
                        Request::Remove(id, version, until),
                        self.config.ack_timeout,
                    )
                    .await;
            }
        }
        let mut handed_off = Vec::new();
        for (i, record) in records.into_iter().enumerate() {
            let set = self.replica_set(&record.id);
            let mut all_acked = true;
            for target in set.iter().filter(|n| *n != self.me()) {
                self.metrics.messages.fetch_add(1, Ordering::Relaxed);
                let acked = matches!(
                    self.call(
                        target,
                        Request::Put(record.clone()),
                        self.config.ack_timeout
                    )
                    .await,
                    Ok(Response::Ok)
                );
                all_acked &= acked;
            }
            // Handed off only once every node that should hold it has it.
            if all_acked && !set.iter().any(|n| n == self.me()) {
                handed_off.push(record.id);
            }
            // Batches: let request handling run between them.
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
        }
        {
            let mut replica = lock(&self.replica);
            for id in handed_off {
                // Still not ours under the view as it is now?
                if !self.replica_set(&id).iter().any(|n| n == self.me()) {
                    replica.remove(&id, Timestamp::now());
                }
            }
        }
        let peers: Vec<String> = read(&self.view)
            .ids
            .iter()
            .filter(|n| *n != self.me())
            .cloned()
            .collect();
        for p in peers {
            let _ = self
                .call(&p, Request::Synced, self.config.ack_timeout)
                .await;
        }
    }
}

async fn watch_membership(
    node: Arc<Node>,
    mut watcher: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<ChitchatId, chitchat::NodeState>,
    >,
) {
    loop {
        let view = {
            let live = watcher.borrow_and_update();
            let mut view = View::default();
            for (id, state) in live.iter() {
                let addr = state
                    .get("repl")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(id.gossip_advertise_addr);
                view.addrs.insert(id.node_id.clone(), addr);
                view.ids.push(id.node_id.clone());
                view.generations
                    .push((id.node_id.clone(), id.generation_id));
            }
            if !view.ids.contains(&node.config.node_id) {
                view.ids.push(node.config.node_id.clone());
                view.addrs
                    .insert(node.config.node_id.clone(), node.config.listen);
            }
            view.ids.sort();
            view.ids.dedup();
            view.generations.sort();
            view
        };
        let changed = {
            let current = read(&node.view);
            current.ids != view.ids || current.generations != view.generations
        };
        if changed {
            tracing::info!(node = %node.config.node_id, live = ?view.ids, "membership changed");
            *node
                .view
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
            node.update_ready();
            tokio::spawn(node.clone().rebalance());
        }
        if watcher.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(node: Arc<Node>, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        tokio::spawn(async move {
            let mut conn = wire::framed(stream);
            let hello = tokio::time::timeout(
                Duration::from_secs(5),
                wire::server_handshake(&mut conn, node.me(), &node.config.secret),
            )
            .await;
            let from = match hello {
                Ok(Ok(from)) => from,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "replication peer refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "replication handshake timed out");
                    return;
                }
            };
            let (mut sink, mut stream) = StreamExt::split::<bytes::Bytes>(conn);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
            let writer = tokio::spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            });
            while let Some(frame) = stream.next().await {
                let bytes = match frame {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "bad frame from peer; closing the connection");
                        break;
                    }
                };
                let frame: Frame<Request> = match serde_json::from_slice(&bytes) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "malformed frame from peer; closing the connection");
                        break;
                    }
                };
                if tx.is_closed() {
                    // The writer died (the socket failed): answers could
                    // not be sent, so stop taking requests on this connection.
                    break;
                }
                if frame.v != wire::VERSION {
                    tracing::warn!(%peer, version = frame.v, "unsupported protocol version; closing");
                    break;
                }
                if matches!(frame.body, Request::Synced) {
                    lock(&node.synced_from).insert(from.clone());
                    node.update_ready();
                }
                let node = node.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let body = node.handle(frame.body).await;
                    if let Ok(bytes) = serde_json::to_vec(&Frame {
                        v: wire::VERSION,
                        id: frame.id,
                        body,
                    }) {
                        let _ = tx.send(bytes).await;
                    }
                });
            }
            drop(tx);
            let _ = writer.await;
        });
    }
}

fn answer<T>(r: Response, f: impl FnOnce(Response) -> Option<T>) -> Result<T, StoreError> {
    match r {
        Response::Collision => Err(StoreError::Collision),
        Response::TooLarge(size, limit) => Err(StoreError::TooLarge { size, limit }),
        Response::Unavailable(msg) => Err(unavailable(msg)),
        other => f(other).ok_or_else(|| unavailable("unexpected answer from the owner")),
    }
}

#[async_trait]
impl SessionStore for ClusterStore {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        let r = self
            .node
            .route(&record.id, Request::Create(record.clone()))
            .await?;
        answer(r, |r| matches!(r, Response::Ok).then_some(()))
    }

    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        let r = self.node.route(id, Request::Load(*id, load)).await?;
        answer(r, |r| match r {
            Response::Record(rec) => Some(rec),
            _ => None,
        })
    }

    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let r = self
            .node
            .route(id, Request::Apply(*id, delta.clone(), now))
            .await?;
        answer(r, |r| match r {
            Response::Version(v) => Some(v),
            _ => None,
        })
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let r = self.node.route(id, Request::Delete(*id)).await?;
        answer(r, |r| match r {
            Response::Deleted(d) => Some(d),
            _ => None,
        })
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
        self.node.check_size(record.size_after(delta))?;
        record.apply(delta, now);
        record.id = *new;
        self.create(&record).await?;
        self.delete(old).await?;
        Ok(Some(record.version))
    }

    fn max_size(&self) -> usize {
        self.node.config.max_size
    }

    fn propose_id(&self) -> SessionId {
        // Draw until this node owns the ID, so a login's session starts here
        // and the balancer's `owner` policy sends the next request here too.
        let view = read(&self.node.view).ids.clone();
        for _ in 0..64 {
            let id = SessionId::random();
            if placement::owner(id.as_bytes(), &view).map(String::as_str) == Some(self.node.me()) {
                return id;
            }
        }
        SessionId::random()
    }
}
