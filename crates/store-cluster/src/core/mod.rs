//! The replication core: every decision a node makes, without I/O.
//!
//! [`Core::handle`] takes one [`Input`] (a membership change, a client's
//! operation, a peer's request or reply, a timer tick) and the time, and
//! returns what to do as [`Output`]s (messages to send, answers to give).
//! The async node in `driver.rs` only carries messages and clocks; the
//! deterministic simulator (`tests/simulator.rs`) drives this same code
//! through lost, reordered and late messages, crashes, restarts, joins and
//! departures.
//!
//! # The rules
//! - **Views**: a node's view is the set of members (name and generation)
//!   it believes live. Segment placement is a function of the view.
//! - **Agreement**: replication and transfer messages carry the sender's
//!   view and are refused (`WrongView`) by a node whose view differs. So a
//!   write is acknowledged only when its owner and the holders agreed on the
//!   view, and under one view a segment has exactly one owner. Forwarded
//!   client operations are not view-checked: the receiver executes only if
//!   it owns the session under its own view, else answers `NotOwner`.
//! - **Transfer**: on every view change each node runs a round with each
//!   peer: it sends its digests of the segments both hold, then the
//!   segments that differ and the segments it holds but no longer should
//!   (handoff), then `Synced`. A segment handed off is dropped only after
//!   every holder acknowledged it.
//! - **Read-through**: until every peer has sent `Synced` for the current
//!   view, an owner does not trust a miss or an old copy: before executing,
//!   it asks the peers that have not synced what they know of the session
//!   (Infinispan's non-blocking state transfer). A peer answers only under
//!   the same view, that is, once it can no longer accept the old owner's
//!   writes.
//! - **Readiness**: membership has converged (every peer in the view sent
//!   `Synced` under this very view, so it sees the same members) and the
//!   node holds every session it should. A new view makes it not ready until
//!   it has synced again.

pub mod store;
pub mod view;

mod ops;
mod transfer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tether_core::placement::SEGMENTS;
use tether_core::Timestamp;

use crate::wire::{Envelope, Op, Outcome, Refusal, Request, Response};
use crate::{Ack, Replication};
use store::Store;
use view::{Member, View};

pub(crate) use ops::Pending;
pub(crate) use transfer::Round;

/// What the core needs to know of its node's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This incarnation.
    pub me: Member,
    /// How many copies.
    pub replication: Replication,
    /// When clients get their answer.
    pub ack: Ack,
    /// How long an operation may wait for the cluster.
    pub ack_timeout: Duration,
    /// Largest session accepted.
    pub max_size: usize,
    /// A node is not ready before its view has had this many members once
    /// (2 when it was given seeds: it must not take itself for the cluster).
    pub min_nodes: usize,
    /// Between repair rounds.
    pub anti_entropy: Duration,
    /// Deletions are remembered at least this long.
    pub tombstone_min: Duration,
    /// Target size of one transfer batch.
    pub batch_bytes: usize,
}

impl Config {
    /// Settings for `me` with the defaults of [`crate::ClusterConfig::new`].
    pub fn new(me: Member) -> Self {
        Self {
            me,
            replication: Replication::Backup(1),
            ack: Ack::Sync,
            ack_timeout: Duration::from_secs(2),
            max_size: tether_core::DEFAULT_MAX_SIZE,
            min_nodes: 1,
            anti_entropy: Duration::from_secs(5),
            tombstone_min: Duration::from_secs(120),
            batch_bytes: 64 * 1024,
        }
    }
}

/// Why a message got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused: the node is down.
    Refused,
    /// The connection failed under the message: it may or may not have
    /// been processed.
    Lost,
    /// No answer in time.
    Timeout,
}

/// Something that happened to the node.
#[derive(Debug)]
pub enum Input {
    /// The live members as the membership layer sees them (this node
    /// included unless it is leaving).
    Members(Vec<Member>),
    /// A client's operation on this node; answered by [`Output::Done`] with
    /// the same token.
    Client {
        /// Chosen by the caller.
        token: u64,
        /// The operation.
        op: Op,
    },
    /// A request from a peer; answered by [`Output::Respond`] with the same
    /// token.
    Request {
        /// Chosen by the caller.
        token: u64,
        /// The request.
        env: Envelope,
    },
    /// The answer to an [`Output::Send`], or why there is none. The driver
    /// owes exactly one for every send.
    Reply {
        /// The send's token.
        token: u64,
        /// The answer.
        reply: Result<Response, Failure>,
    },
    /// Time passed: deadlines, retries, repair rounds, expiry.
    Tick,
    /// Hand everything off and leave (a graceful stop).
    Leave,
}

/// Something the node must do.
#[derive(Debug)]
pub enum Output {
    /// Send a request to a peer; answer with [`Input::Reply`].
    Send {
        /// The peer's name.
        to: String,
        /// Echo it in the reply.
        token: u64,
        /// The request.
        env: Envelope,
    },
    /// Answer a peer's request.
    Respond {
        /// The request's token.
        token: u64,
        /// The answer.
        response: Response,
    },
    /// A client's operation is finished.
    Done {
        /// The operation's token.
        token: u64,
        /// Its result.
        result: Result<Outcome, Refusal>,
    },
    /// Leaving is finished: every session was handed off.
    Left,
}

/// Counters of what the node did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Writes applied as owner.
    pub writes: u64,
    /// Replication messages sent (owner to holders).
    pub messages: u64,
    /// Operations sent to the owner on another node.
    pub forwarded: u64,
    /// Writes that failed for want of acknowledgements.
    pub ack_failures: u64,
    /// Sessions sent in transfer batches.
    pub transferred_out: u64,
    /// Sessions received in transfer batches.
    pub transferred_in: u64,
    /// Operations that asked peers first (read-through during a transfer).
    pub read_throughs: u64,
    /// Segments handed off and dropped.
    pub handed_off: u64,
    /// View changes installed.
    pub views: u64,
}

/// A node's state as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node's incarnation.
    pub me: Member,
    /// The members of the current view (names and generations), sorted.
    pub members: Vec<Member>,
    /// Their names.
    pub live: Vec<String>,
    /// Converged (every peer synced under this very view) and holding its
    /// share; false again after a view change until synced.
    pub ready: bool,
    /// Joined and received its share once, not leaving: the balancer may
    /// send it requests (the node's `/health`).
    pub serving: bool,
    /// Ready, its own transfer round for this view finished, and every
    /// session has its copies: another node may be stopped now.
    pub fully_replicated: bool,
    /// Peers that have sent `Synced` under the current view.
    pub synced_from: usize,
    /// Peers in the view.
    pub peers: usize,
    /// Leaving (handing off before exit).
    pub leaving: bool,
}

/// Who waits for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Client {
    Local(u64),
    Peer(u64),
}

/// What an outstanding send was for.
#[derive(Debug, Clone)]
pub(crate) enum Sent {
    /// Part of a pending operation (its ID, the peer, the attempt).
    Op(u64, String, u32),
    /// Part of a transfer round (its sequence, the peer, the step, the
    /// attempt with that peer).
    Round(u64, String, transfer::Step, u32),
    /// Nobody waits for the answer.
    Ignore,
}

/// The core of one node.
pub struct Core {
    pub(crate) cfg: Config,
    /// The last membership reported (before removing a leaving self).
    members: Vec<Member>,
    pub(crate) view: View,
    /// The members of the view before this one.
    pub(crate) previous: Vec<Member>,
    /// The newest generation of every node ever in a view.
    pub(crate) seen: BTreeMap<String, u64>,
    pub(crate) store: Store,
    pub(crate) leaving: bool,
    left: bool,
    pub(crate) formed: bool,
    /// Has been ready once since it started.
    served: bool,
    pub(crate) synced_from: BTreeSet<String>,
    pub(crate) round: Option<Round>,
    /// Segments a peer is sending this node (its digest, who, since when),
    /// so that a second peer holding the same copy does not send it too.
    pub(crate) offers: HashMap<u16, (u64, String, Timestamp)>,
    /// The last full round for this view finished.
    pub(crate) round_done: bool,
    next_token: u64,
    /// What each outstanding send is for, and the generation of the node
    /// it went to (a late answer from a previous life must not count for
    /// the current one).
    pub(crate) sends: HashMap<u64, (Sent, u64)>,
    pub(crate) ops: BTreeMap<u64, Pending>,
    pub(crate) now: Timestamp,
    pub(crate) next_repair: Timestamp,
    sweep: Option<u16>,
    next_sweep: Timestamp,
    pub(crate) counters: Counters,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("me", &self.cfg.me)
            .field("view", &self.view.names())
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_CHUNK: u16 = 64;

impl Core {
    /// A node that sees only itself.
    pub fn new(cfg: Config, now: Timestamp) -> Self {
        let me = cfg.me.clone();
        let mut core = Self {
            members: vec![me.clone()],
            view: View::new([me.clone()]),
            previous: Vec::new(),
            seen: BTreeMap::from([(me.name, me.generation)]),
            store: Store::default(),
            leaving: false,
            left: false,
            formed: false,
            served: false,
            synced_from: BTreeSet::new(),
            round: None,
            offers: HashMap::new(),
            round_done: true,
            next_token: 1,
            sends: HashMap::new(),
            ops: BTreeMap::new(),
            now,
            next_repair: now.plus(cfg.anti_entropy),
            sweep: None,
            next_sweep: now.plus(SWEEP_EVERY),
            counters: Counters::default(),
            cfg,
        };
        core.formed = core.cfg.min_nodes <= 1;
        core
    }

    /// This incarnation.
    pub fn me(&self) -> &Member {
        &self.cfg.me
    }

    /// The current view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// The sessions held.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The replication mode.
    pub fn replication(&self) -> Replication {
        self.cfg.replication
    }

    /// The largest session accepted.
    pub fn max_size(&self) -> usize {
        self.cfg.max_size
    }

    /// What the node did so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Operations and transfers under way (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        self.ops.len() + self.sends.len()
    }

    /// Copies each session should have under a view of `live` members.
    pub(crate) fn copies(&self) -> usize {
        match self.cfg.replication {
            Replication::All => self.view.len().max(1),
            Replication::Backup(k) => k + 1,
        }
    }

    /// Whether membership converged and the node holds its share.
    pub fn is_ready(&self) -> bool {
        !self.leaving
            && self.formed
            && self.view.contains(&self.cfg.me.name)
            && self.unsynced_peers().next().is_none()
    }

    /// Whether a balancer may send this node requests: it joined and
    /// received its share once, and is not leaving. A later view change
    /// does not take this away: while it syncs again, it answers through
    /// read-through, correctly, and taking every node out of a balancer
    /// whenever a member joins would be an outage.
    pub fn is_serving(&self) -> bool {
        self.served && !self.leaving
    }

    /// The operator's view of the node.
    pub fn status(&self) -> Status {
        let ready = self.is_ready();
        let enough = match self.cfg.replication {
            Replication::All => self.view.len() >= 2,
            Replication::Backup(k) => self.view.len() > k,
        };
        Status {
            me: self.cfg.me.clone(),
            members: self.view.members().to_vec(),
            live: self.view.names(),
            ready,
            serving: self.is_serving(),
            fully_replicated: ready && self.round_done && enough,
            synced_from: self
                .peers()
                .filter(|p| self.synced_from.contains(*p))
                .count(),
            peers: self.peers().count(),
            leaving: self.leaving,
        }
    }

    /// Sessions this node owns, sessions it holds for others, and their bytes.
    pub fn holdings(&self) -> (usize, usize, usize) {
        let me = self.cfg.me.name.as_str();
        let (owned, _) = self.store.stats_where(|s| self.view.owner(s) == Some(me));
        let (all, bytes) = self.store.stats();
        (owned, all - owned, bytes)
    }

    /// The other members of the view.
    pub(crate) fn peers(&self) -> impl Iterator<Item = &str> + '_ {
        let me = self.cfg.me.name.as_str();
        self.view
            .members()
            .iter()
            .map(|m| m.name.as_str())
            .filter(move |n| *n != me)
    }

    pub(crate) fn unsynced_peers(&self) -> impl Iterator<Item = &str> + '_ {
        self.peers().filter(|p| !self.synced_from.contains(*p))
    }

    pub(crate) fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    pub(crate) fn envelope(&self, body: Request) -> Envelope {
        Envelope {
            from: self.cfg.me.clone(),
            view: self.view.id(),
            body,
        }
    }

    /// Queues a request to `to`, remembering what it is for.
    pub(crate) fn send(&mut self, to: &str, body: Request, sent: Sent, out: &mut Vec<Output>) {
        let token = self.token();
        let generation = self.view.member(to).map_or(0, |m| m.generation);
        self.sends.insert(token, (sent, generation));
        let env = self.envelope(body);
        out.push(Output::Send {
            to: to.to_string(),
            token,
            env,
        });
    }

    /// Handles one input at time `now`, appending what to do to `out`.
    pub fn handle(&mut self, now: Timestamp, input: Input, out: &mut Vec<Output>) {
        self.now = self.now.max(now);
        match input {
            Input::Members(members) => {
                self.members = members;
                self.install(out);
            }
            Input::Client { token, op } => {
                self.start(Client::Local(token), op, Vec::new(), out);
            }
            Input::Request { token, env } => self.request(token, env, out),
            Input::Reply { token, reply } => match self.sends.remove(&token) {
                Some((Sent::Op(op, peer, attempt), generation)) => {
                    let to = Member::new(peer, generation);
                    self.op_reply(op, &to, attempt, reply, out)
                }
                Some((Sent::Round(seq, peer, step, attempt), _)) => {
                    self.round_reply(seq, &peer, step, attempt, reply, out)
                }
                Some((Sent::Ignore, _)) | None => {}
            },
            Input::Tick => self.tick(out),
            Input::Leave => {
                if !self.leaving {
                    self.leaving = true;
                    tracing::info!(node = %self.cfg.me.name, "leaving: handing sessions off");
                    self.install(out);
                }
            }
        }
        self.check_left(out);
        if !self.served && self.is_ready() {
            self.served = true;
            tracing::info!(node = %self.cfg.me.name, live = ?self.view.names(), "joined and holding its share: serving");
        }
    }

    /// Installs the view the last membership and `leaving` give, if new.
    fn install(&mut self, out: &mut Vec<Output>) {
        let me = &self.cfg.me;
        let members = self
            .members
            .iter()
            .filter(|m| !(self.leaving && m.name == me.name))
            .filter(|m| m.name != me.name || m.generation == me.generation)
            .cloned()
            .chain((!self.leaving).then(|| me.clone()));
        let view = View::new(members);
        if view.id() == self.view.id() {
            return;
        }
        self.counters.views += 1;
        tracing::info!(node = %self.cfg.me.name, live = ?view.names(), "membership changed");
        tracing::trace!(node = %self.cfg.me.name, view = ?view.id(), members = ?view.members(), "view installed");
        self.previous = std::mem::replace(&mut self.view, view).members().to_vec();
        self.synced_from.clear();
        self.offers.clear();
        if self.view.len() >= self.cfg.min_nodes {
            self.formed = true;
        }
        self.start_round(true, out);
        for m in self.view.members() {
            let g = self.seen.entry(m.name.clone()).or_insert(m.generation);
            *g = (*g).max(m.generation);
        }
        self.view_changed(out);
    }

    fn request(&mut self, token: u64, env: Envelope, out: &mut Vec<Output>) {
        match env.body {
            Request::Forward(f) => self.start(Client::Peer(token), f.op, f.skip, out),
            Request::Replicate(r) => {
                let response = if env.view == self.view.id() {
                    self.replicated(r)
                } else {
                    Response::WrongView
                };
                out.push(Output::Respond { token, response });
            }
            Request::Transfer(t) => {
                let response = if env.view == self.view.id() {
                    self.transfer(&env.from, t, out)
                } else {
                    Response::WrongView
                };
                out.push(Output::Respond { token, response });
            }
        }
    }

    fn tick(&mut self, out: &mut Vec<Output>) {
        self.ops_tick(out);
        self.round_tick(out);
        if self.now >= self.next_sweep && self.sweep.is_none() {
            self.sweep = Some(0);
        }
        if let Some(from) = self.sweep {
            let to = (from + SWEEP_CHUNK).min(SEGMENTS);
            self.store.sweep(self.now, from, to);
            self.sweep = (to < SEGMENTS).then_some(to);
            if self.sweep.is_none() {
                self.next_sweep = self.now.plus(SWEEP_EVERY);
            }
        }
    }

    fn check_left(&mut self, out: &mut Vec<Output>) {
        if self.leaving && !self.left && self.round_done && self.round.is_none() {
            // Writes still replicating under this node's name must finish first.
            if self.ops.values().any(Pending::holds_data) {
                return;
            }
            self.left = true;
            tracing::info!(node = %self.cfg.me.name, "every session handed off");
            out.push(Output::Left);
        }
    }
}
