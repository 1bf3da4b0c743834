//! A deterministic simulation of a fleet: the production replication core
//! (`tether_cluster::core::Core`, the code every node runs) driven through
//! a simulated network that loses, delays and reorders messages, and a
//! membership layer whose news reaches each node late. Nodes crash and
//! restart (a new generation, while messages of the old one are still in
//! flight), leave gracefully, join one or two at a time.
//!
//! Users keep writing while this happens. A model records every write a
//! user saw acknowledged, and checks:
//! - every read returns every write acknowledged before it was issued, and
//!   never "no session" for a session whose creation was acknowledged;
//! - a write never finds "no session" for such a session;
//! - at the end, with the fleet quiet, every acknowledged write is readable
//!   from any node, every node is ready and fully replicated, and every
//!   session is held by exactly as many nodes as it should be.
//!
//! Faults stay within what the design promises: at most one node down at a
//! time (k ≥ 1), and the fleet is given time to re-replicate (every node
//! fully replicated) between failures. Each seed is a different schedule;
//! a failure prints the seed and the schedule so it can be replayed.

use std::collections::BTreeMap;
use std::time::Duration;

use tether_cluster::core::view::Member;
use tether_cluster::core::{Config, Core, Failure, Input, Output};
use tether_cluster::wire::{Envelope, Op, Outcome, Refusal, Response};
use tether_cluster::{Ack, Replication};
use tether_core::placement;
use tether_core::{Delta, Expiry, Load, Record, SessionId, Timestamp};

/// Deterministic pseudo-random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u32) -> bool {
        self.next() % 100 < u64::from(percent)
    }
    fn id(&mut self) -> SessionId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next().to_le_bytes());
        b[8..].copy_from_slice(&self.next().to_le_bytes());
        SessionId::from_bytes(b)
    }
}

enum Packet {
    Req {
        from: Member,
        to: String,
        token: u64,
        env: Envelope,
    },
    Resp {
        to: Member,
        token: u64,
        reply: Result<Response, Failure>,
    },
}

struct Node {
    core: Core,
    leaving: bool,
}

/// The balancer's view of one node.
#[derive(Default)]
struct Health {
    healthy: bool,
    passes: u32,
    fails: u32,
}

#[derive(Default)]
struct User {
    /// The session, once its creation was acknowledged.
    id: Option<SessionId>,
    /// Write numbers acknowledged, in order.
    acked: Vec<u64>,
    busy: bool,
    next: u64,
}

#[derive(Clone, Copy)]
enum Kind {
    Create(SessionId),
    Write(u64),
    Read { acked_before: usize },
}

struct Call {
    user: usize,
    kind: Kind,
}

#[derive(Default, Debug)]
struct Stats {
    acked_writes: u64,
    /// Answered 503 (or lost with a crashed node).
    refused: u64,
    /// The balancer had no healthy node (the fleet was forming).
    no_backend: u64,
    reads: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    replication: Replication,
    ack: Ack,
    up: BTreeMap<String, Node>,
    next_generation: u64,
    net: Vec<Packet>,
    /// Requests a node received and has not answered: (node, generation,
    /// its token) → (sender, the sender's token).
    inbound: BTreeMap<(String, u64, u64), (Member, u64)>,
    next_token: u64,
    /// When each node hears the current membership next.
    news: Vec<(u64, String)>,
    next_tick: u64,
    users: Vec<User>,
    calls: BTreeMap<(String, u64, u64), Call>,
    loss: u32,
    lb: BTreeMap<String, Health>,
    next_check: u64,
    watched: Option<String>,
    workload: bool,
    stats: Stats,
    log: Vec<String>,
}

const T0: u64 = 1_800_000_000_000;

impl Sim {
    fn new(seed: u64, replication: Replication, ack: Ack, loss: u32) -> Self {
        Self {
            seed,
            rng: Rng(seed),
            now: T0,
            replication,
            ack,
            up: BTreeMap::new(),
            next_generation: 1,
            net: Vec::new(),
            inbound: BTreeMap::new(),
            next_token: 1,
            news: Vec::new(),
            next_tick: T0,
            users: Vec::new(),
            calls: BTreeMap::new(),
            loss,
            lb: BTreeMap::new(),
            next_check: T0,
            watched: None,
            workload: true,
            stats: Stats::default(),
            log: Vec::new(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {}: {what}\nschedule: {}\nstats: {:?}",
            self.seed,
            self.log.join(" → "),
            self.stats
        );
    }

    fn member(&self, name: &str) -> Option<Member> {
        self.up.get(name).map(|n| n.core.me().clone())
    }

    /// The live members the membership layer reports: up and not leaving.
    fn members(&self) -> Vec<Member> {
        self.up
            .values()
            .filter(|n| !n.leaving)
            .map(|n| n.core.me().clone())
            .collect()
    }

    /// Every node hears of the membership a little later, each at its own time.
    fn announce(&mut self) {
        let names: Vec<String> = self.up.keys().cloned().collect();
        for n in names {
            let lag = self.rng.below(60) as u64;
            self.news.push((self.now + lag, n));
        }
    }

    fn start(&mut self, name: &str) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!(
                "t={} start {name} gen {}",
                self.now - T0,
                self.next_generation
            );
        }
        let me = Member::new(name, self.next_generation);
        self.next_generation += 1;
        let mut cfg = Config::new(me);
        cfg.replication = self.replication;
        cfg.ack = self.ack;
        // As a node given seeds: never alone.
        cfg.min_nodes = 2;
        let core = Core::new(cfg, Timestamp(self.now));
        self.up.insert(
            name.to_string(),
            Node {
                core,
                leaving: false,
            },
        );
        self.announce();
    }

    fn crash(&mut self, name: &str) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} crash {name}", self.now - T0);
        }
        let Some(node) = self.up.remove(name) else {
            return;
        };
        // Its port refuses connections: the balancer marks it down at once.
        self.lb.remove(name);
        let g = node.core.me().generation;
        // Requests it was working on: their senders see the connection die.
        let lost: Vec<_> = self
            .inbound
            .range((name.to_string(), g, 0)..=(name.to_string(), g, u64::MAX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, (sender, token)) in lost {
            self.inbound.remove(&k);
            self.net.push(Packet::Resp {
                to: sender,
                token,
                reply: Err(Failure::Lost),
            });
        }
        let calls: Vec<_> = self
            .calls
            .range((name.to_string(), g, 0)..=(name.to_string(), g, u64::MAX))
            .map(|(k, _)| k.clone())
            .collect();
        for k in calls {
            let call = self.calls.remove(&k).expect("listed");
            self.users[call.user].busy = false;
            self.stats.refused += 1;
        }
        self.announce();
    }

    fn feed(&mut self, name: &str, input: Input) {
        let mut out = Vec::new();
        let Some(node) = self.up.get_mut(name) else {
            return;
        };
        node.core.handle(Timestamp(self.now), input, &mut out);
        let me = node.core.me().clone();
        for o in out {
            match o {
                Output::Send { to, token, env } => self.net.push(Packet::Req {
                    from: me.clone(),
                    to,
                    token,
                    env,
                }),
                Output::Respond { token, response } => {
                    let key = (me.name.clone(), me.generation, token);
                    let Some((sender, t)) = self.inbound.remove(&key) else {
                        self.fail("a response to no request");
                    };
                    // The answer may die with the connection.
                    let reply = if self.rng.chance(self.loss / 2) {
                        Err(Failure::Lost)
                    } else {
                        Ok(response)
                    };
                    self.net.push(Packet::Resp {
                        to: sender,
                        token: t,
                        reply,
                    });
                }
                Output::Done { token, result } => {
                    let key = (me.name.clone(), me.generation, token);
                    if let Some(call) = self.calls.remove(&key) {
                        self.done(call, result);
                    }
                }
                Output::Left => {
                    self.log.push(format!("{} left", me.name));
                    self.crash(&me.name);
                }
            }
        }
    }

    /// Checks one finished client operation against the model.
    fn done(&mut self, call: Call, result: Result<Outcome, Refusal>) {
        let u = call.user;
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} user {u} done: {result:?}", self.now - T0);
        }
        self.users[u].busy = false;
        match (call.kind, result) {
            (Kind::Create(id), Ok(Outcome::Created)) => self.users[u].id = Some(id),
            (Kind::Write(n), Ok(Outcome::Version(Some(_)))) => {
                self.users[u].acked.push(n);
                self.stats.acked_writes += 1;
            }
            (Kind::Write(n), Ok(Outcome::Version(None))) => self.fail(&format!(
                "user {u}: write {n} found no session, though its creation was acknowledged"
            )),
            (Kind::Read { acked_before }, Ok(Outcome::Record(found))) => {
                self.stats.reads += 1;
                let Some(r) = found else {
                    self.fail(&format!("user {u}: logged out (a read found no session)"));
                };
                for n in &self.users[u].acked[..acked_before] {
                    if !r.attributes.contains_key(&format!("w{n}")) {
                        self.fail(&format!(
                            "user {u}: acknowledged write {n} missing from a later read (version {})",
                            r.version
                        ));
                    }
                }
            }
            (_, Err(Refusal::Unavailable(why))) => {
                self.stats.refused += 1;
                if std::env::var("SIM_WHY").is_ok() {
                    eprintln!("refused: {why}");
                }
            }
            (_, other) => self.fail(&format!("user {u}: unexpected result {other:?}")),
        }
    }

    /// The balancer's health checks (`tether lb` in the tests: every 200
    /// ms, up after 2 passes, down after 3 failures): a node is healthy
    /// while its `/health` (the core's readiness) says so.
    fn health_checks(&mut self) {
        let ready: Vec<(String, bool)> = self
            .up
            .iter()
            .map(|(n, x)| (n.clone(), x.core.is_serving()))
            .collect();
        self.lb.retain(|n, _| self.up.contains_key(n));
        for (n, ok) in ready {
            let h = self.lb.entry(n).or_default();
            if ok {
                h.passes += 1;
                h.fails = 0;
                h.healthy |= h.passes >= 2;
            } else {
                h.fails += 1;
                h.passes = 0;
                h.healthy &= h.fails < 3;
            }
        }
    }

    /// Where `tether lb --policy owner` sends a request: the session's
    /// owner among healthy nodes (the next one when it refuses the
    /// connection); a login goes to any healthy node.
    fn balance(&mut self, id: Option<SessionId>) -> Option<String> {
        let healthy: Vec<String> = self
            .lb
            .iter()
            .filter(|(n, h)| h.healthy && self.up.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        match id {
            Some(id) => placement::session_preference(&id, &healthy)
                .first()
                .map(|n| (*n).clone()),
            None if healthy.is_empty() => None,
            None => Some(healthy[self.rng.below(healthy.len())].clone()),
        }
    }

    /// A client request from user `u`, through the balancer.
    fn client(&mut self, u: usize) {
        let Some(node) = self.balance(self.users[u].id) else {
            self.stats.no_backend += 1;
            return;
        };
        let now = Timestamp(self.now);
        let (kind, op) = match self.users[u].id {
            None => {
                // The node draws an ID it owns, as `propose_id` does.
                let mut id = self.rng.id();
                for _ in 0..64 {
                    if self.up[&node].core.view().owner(placement::segment(&id)) == Some(&node) {
                        break;
                    }
                    id = self.rng.id();
                }
                let mut r = Record::new(id, now, Expiry::default());
                r.attributes
                    .insert("user".into(), tether_core::testing::json(&u.to_string()));
                (Kind::Create(id), Op::Create(r))
            }
            Some(id) if self.rng.chance(60) => {
                let n = self.users[u].next;
                self.users[u].next += 1;
                let mut d = Delta::default();
                d.set(format!("w{n}"), tether_core::testing::json(&n.to_string()));
                (Kind::Write(n), Op::Apply(id, d, now))
            }
            Some(id) => {
                let load = if self.rng.chance(20) {
                    Load::refreshing(now, Duration::ZERO)
                } else {
                    Load::at(now)
                };
                let acked_before = self.users[u].acked.len();
                (Kind::Read { acked_before }, Op::Load(id, load))
            }
        };
        let token = self.next_token;
        self.next_token += 1;
        let g = self.up[&node].core.me().generation;
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} user {u} -> {node}: {op:?}", self.now - T0);
        }
        self.calls
            .insert((node.clone(), g, token), Call { user: u, kind });
        self.users[u].busy = true;
        self.feed(&node, Input::Client { token, op });
    }

    fn deliver(&mut self, p: Packet) {
        match p {
            Packet::Req {
                from,
                to,
                token,
                env,
            } => {
                let Some(target) = self.member(&to) else {
                    // Nothing listens there: refused.
                    self.net.push(Packet::Resp {
                        to: from,
                        token,
                        reply: Err(Failure::Refused),
                    });
                    return;
                };
                if self.rng.chance(self.loss) {
                    // Lost on the way: the sender times out.
                    self.net.push(Packet::Resp {
                        to: from,
                        token,
                        reply: Err(Failure::Timeout),
                    });
                    return;
                }
                let t = self.next_token;
                self.next_token += 1;
                self.inbound
                    .insert((to.clone(), target.generation, t), (from, token));
                self.feed(&to, Input::Request { token: t, env });
            }
            Packet::Resp { to, token, reply } => {
                // Answers to a previous life of a node go nowhere.
                if self.member(&to.name).as_ref() == Some(&to) {
                    self.feed(&to.name, Input::Reply { token, reply });
                }
            }
        }
    }

    /// With `SIM_WATCH=user`, prints every change of that user's copies.
    fn watch(&mut self) {
        let Some(u) = std::env::var("SIM_WATCH")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return;
        };
        let Some(id) = self.users.get(u).and_then(|u| u.id) else {
            return;
        };
        let now = Timestamp(self.now);
        let copies: Vec<(String, Option<u64>)> = self
            .up
            .iter()
            .map(|(n, x)| {
                (
                    format!("{n}/{}", x.core.me().generation),
                    x.core.store().get(&id, now).map(|r| r.version),
                )
            })
            .collect();
        let line = format!("{copies:?}");
        if self.watched.as_deref() != Some(line.as_str()) {
            eprintln!("t={} copies of user {u}: {line}", self.now - T0);
            self.watched = Some(line);
        }
    }

    fn step(&mut self) {
        self.watch();
        self.now += self.rng.below(3) as u64;
        if self.now >= self.next_check {
            self.next_check = self.now + 200;
            self.health_checks();
        }
        if self.now >= self.next_tick {
            self.next_tick = self.now + 10;
            let names: Vec<String> = self.up.keys().cloned().collect();
            for n in names {
                self.feed(&n, Input::Tick);
            }
        }
        let due: Vec<String> = self
            .news
            .iter()
            .filter(|(t, _)| *t <= self.now)
            .map(|(_, n)| n.clone())
            .collect();
        self.news.retain(|(t, _)| *t > self.now);
        for n in due {
            let members = self.members();
            self.feed(&n, Input::Members(members));
            if std::env::var("SIM_TRACE").is_ok() {
                if let Some(x) = self.up.get(&n) {
                    eprintln!(
                        "t={} {n} view {:?} ready {}",
                        self.now - T0,
                        x.core.view().members(),
                        x.core.is_ready()
                    );
                }
            }
        }
        for _ in 0..3 {
            if self.net.is_empty() {
                break;
            }
            let i = self.rng.below(self.net.len());
            let p = self.net.swap_remove(i);
            self.deliver(p);
        }
        if self.workload && self.rng.chance(30) {
            let u = self.rng.below(self.users.len());
            if !self.users[u].busy {
                self.client(u);
            }
        }
    }

    fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        while self.now < until {
            self.step();
        }
    }

    /// Runs until every member is fully replicated (the fleet may lose
    /// another node), or fails after a minute of simulated time.
    fn settle(&mut self, what: &str) {
        let limit = self.now + 60_000;
        loop {
            self.step();
            let members = self.members();
            let stable = !members.is_empty()
                && self.news.is_empty()
                && self.up.values().all(|n| {
                    n.leaving
                        || (n.core.view().members() == members.as_slice()
                            && n.core.status().fully_replicated)
                });
            if stable {
                return;
            }
            if self.now > limit {
                let states: Vec<String> = self
                    .up
                    .iter()
                    .map(|(n, x)| {
                        format!("{n}: {:?} pending {}", x.core.status(), x.core.pending())
                    })
                    .collect();
                self.fail(&format!(
                    "the fleet did not settle after {what}: {}",
                    states.join("; ")
                ));
            }
        }
    }

    fn names(&self) -> Vec<String> {
        self.up
            .iter()
            .filter(|(_, n)| !n.leaving)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn pick(&mut self) -> String {
        let names = self.names();
        names[self.rng.below(names.len())].clone()
    }

    fn leave(&mut self, name: &str) {
        if let Some(n) = self.up.get_mut(name) {
            n.leaving = true;
        }
        self.feed(name, Input::Leave);
        self.announce();
        let limit = self.now + 60_000;
        while self.up.contains_key(name) {
            self.step();
            if self.now > limit {
                self.fail(&format!("{name} never finished leaving"));
            }
        }
    }

    /// The end: no more writes; everything delivered; every acknowledged
    /// write readable from every node; exact copy counts.
    fn check_end(&mut self) {
        self.workload = false;
        // Let answers in flight come back.
        let limit = self.now + 30_000;
        while !self.calls.is_empty() {
            self.step();
            if self.now > limit {
                self.fail("client calls never finished");
            }
        }
        self.settle("the last event");
        // Stray copies (a substitute's, a read-through's) are dropped by
        // the next repair round, every 5 s.
        self.run_for(11_000);
        self.settle("the repair rounds");
        let copies = match self.replication {
            Replication::All => self.up.len(),
            Replication::Backup(k) => (k + 1).min(self.up.len()),
        };
        let now = Timestamp(self.now);
        for u in 0..self.users.len() {
            let Some(id) = self.users[u].id else {
                continue;
            };
            let holders = self
                .up
                .values()
                .filter(|n| n.core.store().get(&id, now).is_some())
                .count();
            if holders != copies {
                let seg = placement::segment(&id);
                let views: Vec<String> = self
                    .up
                    .iter()
                    .map(|(n, x)| {
                        format!(
                            "{n} holds {} ({:?})",
                            x.core.store().get(&id, now).is_some(),
                            x.core.view().holders(seg, copies).collect::<Vec<_>>()
                        )
                    })
                    .collect();
                self.fail(&format!(
                    "user {u}: session held by {holders} nodes, not {copies}: {}",
                    views.join(", ")
                ));
            }
            for name in self.names() {
                let token = self.next_token;
                self.next_token += 1;
                let g = self.up[&name].core.me().generation;
                let acked_before = self.users[u].acked.len();
                self.calls.insert(
                    (name.clone(), g, token),
                    Call {
                        user: u,
                        kind: Kind::Read { acked_before },
                    },
                );
                let op = Op::Load(id, Load::at(now));
                self.feed(&name, Input::Client { token, op });
                while !self.calls.is_empty() {
                    self.step();
                }
            }
        }
    }
}

/// One random schedule of membership changes under load.
fn run(seed: u64) -> Stats {
    if std::env::var("SIM_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    }
    let mut rng = Rng(seed ^ 0x5eed);
    let n = 3 + rng.below(2);
    let replication = match rng.below(4) {
        0 => Replication::All,
        1 if n >= 4 => Replication::Backup(2),
        _ => Replication::Backup(1),
    };
    let ack = Ack::Sync;
    let loss = [0, 0, 2, 5][rng.below(4)];
    let mut sim = Sim::new(seed, replication, ack, loss);
    sim.log
        .push(format!("{n} nodes, {replication:?}, {loss}% loss"));
    let mut names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    for name in names.clone() {
        sim.start(&name);
    }
    sim.users = (0..6 + rng.below(6)).map(|_| User::default()).collect();
    sim.settle("the start");
    sim.run_for(300);
    for _ in 0..2 + rng.below(3) {
        let event = rng.below(7);
        let live = sim.names().len();
        match event {
            // A crash; the node comes back (a new generation) soon or late.
            0 | 1 => {
                let v = sim.pick();
                sim.log.push(format!("crash {v}"));
                sim.crash(&v);
                let down = [0, 5, 50, 400, 2_000][rng.below(5)];
                sim.run_for(down);
                sim.log.push(format!("restart {v} after {down} ms"));
                sim.start(&v);
            }
            // A deploy's graceful restart.
            2 => {
                let v = sim.pick();
                sim.log.push(format!("graceful restart {v}"));
                sim.leave(&v);
                sim.start(&v);
            }
            // Scale-out by one, or two at once.
            3 | 4 => {
                let count = if event == 3 { 1 } else { 2 };
                for _ in 0..count {
                    let name = format!("n{}", names.len());
                    sim.log.push(format!("join {name}"));
                    names.push(name.clone());
                    sim.start(&name);
                }
            }
            // Scale-in: a node drained and removed.
            5 if live > 3 => {
                let v = sim.pick();
                sim.log.push(format!("scale in {v}"));
                sim.leave(&v);
            }
            // A node joins and another crashes during the handoff.
            _ => {
                let name = format!("n{}", names.len());
                names.push(name.clone());
                sim.start(&name);
                sim.run_for(rng.below(40) as u64);
                let v = sim.pick();
                sim.log
                    .push(format!("join {name}, crash {v} during the handoff"));
                sim.crash(&v);
                sim.run_for(rng.below(300) as u64);
                sim.start(&v);
            }
        }
        sim.settle("an event");
        sim.run_for(200);
    }
    sim.check_end();
    sim.stats
}

#[test]
fn every_acknowledged_write_survives_random_membership_changes_under_load() {
    // Thousands of schedules per run; `SIM_SEEDS` runs more, `SIM_SEED`
    // replays one.
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            (1..=n).collect()
        }
    };
    let mut total = Stats::default();
    for seed in seeds {
        let s = run(seed);
        total.acked_writes += s.acked_writes;
        total.refused += s.refused;
        total.no_backend += s.no_backend;
        total.reads += s.reads;
    }
    eprintln!("simulated: {total:?}");
    assert!(
        total.acked_writes > 0 && total.reads > 0,
        "the workload ran"
    );
}

/// Each node's view: news of a crash reaches nodes at different times;
/// a write during that window waits for agreement instead of being
/// acknowledged by holders that disagree on who owns the session.
#[test]
fn a_rolling_restart_loses_nothing_for_every_mode() {
    for (i, replication) in [Replication::Backup(1), Replication::All]
        .into_iter()
        .enumerate()
    {
        for graceful in [false, true] {
            let mut sim = Sim::new(10 + i as u64, replication, Ack::Sync, 2);
            for n in ["A", "B", "C"] {
                sim.start(n);
            }
            sim.users = (0..12).map(|_| User::default()).collect();
            sim.settle("the start");
            sim.run_for(500);
            for n in ["A", "B", "C"] {
                if graceful {
                    sim.leave(n);
                } else {
                    sim.crash(n);
                    sim.run_for(100);
                }
                sim.start(n);
                sim.settle("a restart");
                sim.run_for(300);
            }
            sim.check_end();
            assert!(sim.stats.acked_writes > 50, "{:?}", sim.stats);
        }
    }
}

/// A graceful stop hands every segment off before it exits: with one
/// backup, no session is ever down to a single copy.
#[test]
fn a_graceful_stop_never_leaves_a_session_with_one_copy() {
    let mut sim = Sim::new(99, Replication::Backup(1), Ack::Sync, 0);
    for n in ["A", "B", "C"] {
        sim.start(n);
    }
    sim.users = (0..10).map(|_| User::default()).collect();
    sim.settle("the start");
    sim.run_for(500);
    sim.workload = false;
    while !sim.calls.is_empty() {
        sim.step();
    }
    let ids: Vec<SessionId> = sim.users.iter().filter_map(|u| u.id).collect();
    sim.feed("B", Input::Leave);
    sim.up.get_mut("B").unwrap().leaving = true;
    sim.announce();
    while sim.up.contains_key("B") {
        sim.step();
        let now = Timestamp(sim.now);
        for id in &ids {
            let copies = sim
                .up
                .values()
                .filter(|n| n.core.store().get(id, now).is_some())
                .count();
            assert!(
                copies >= 2,
                "a session fell to {copies} copy during the handoff"
            );
        }
    }
    sim.settle("B left");
    sim.check_end();
}

/// The core refuses replication from a node with another view, and a
/// write waits for the views to agree rather than be acknowledged by
/// holders that disagree on who owns the session.
#[test]
fn replication_between_disagreeing_views_is_refused() {
    let me = Member::new("A", 1);
    let mut a = Core::new(Config::new(me.clone()), Timestamp(T0));
    let mut out = Vec::new();
    a.handle(
        Timestamp(T0),
        Input::Members(vec![me.clone(), Member::new("B", 1)]),
        &mut out,
    );
    let stranger = Envelope {
        from: Member::new("B", 1),
        view: tether_cluster::core::view::ViewId(12345),
        body: tether_cluster::wire::Request::Replicate(tether_cluster::wire::Replicate::Put(
            tether_cluster::core::store::Stamped {
                record: Record::new(
                    SessionId::from_bytes([7; 16]),
                    Timestamp(T0),
                    Expiry::default(),
                ),
                stamp: 1,
            },
        )),
    };
    out.clear();
    a.handle(
        Timestamp(T0),
        Input::Request {
            token: 1,
            env: stranger,
        },
        &mut out,
    );
    assert!(matches!(
        out.as_slice(),
        [Output::Respond {
            token: 1,
            response: Response::WrongView
        }]
    ));
    assert!(a
        .store()
        .get(&SessionId::from_bytes([7; 16]), Timestamp(T0))
        .is_none());
}
