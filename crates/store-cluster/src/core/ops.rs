//! Client operations: routing to the owner, read-through while a transfer
//! is under way, execution at the owner, and replication to the holders.

use std::collections::BTreeMap;
use std::time::Duration;

use tether_core::placement::segment;
use tether_core::{SessionId, Timestamp};

use super::store::{Known, Refused, Replicated, Stamped};
use super::view::Member;
use super::{Client, Core, Failure, Output, Sent};
use crate::wire::{Forward, Op, Outcome, Refusal, Replicate, Request, Response, Transfer};
use crate::{Ack, Replication};

/// Before asking again a node that answered "not the owner" or "not the
/// same view": views converge within a few gossip rounds.
const RETRY: Duration = Duration::from_millis(10);
/// Operations slower than this are logged (debug) with their trail.
const SLOW: Duration = Duration::from_millis(100);

/// An operation under way.
#[derive(Debug)]
pub(crate) struct Pending {
    /// Who waits for it; `None` once answered (async replication).
    client: Option<Client>,
    deadline: Timestamp,
    /// When it arrived, and what it went through (for slow-operation logs).
    started: Timestamp,
    trail: Vec<&'static str>,
    /// Bumped when the operation starts over, so late answers to an
    /// earlier attempt are recognised.
    attempt: u32,
    stage: Stage,
}

impl Pending {
    /// Whether this operation still carries data only this node may hold.
    pub(crate) fn holds_data(&self) -> bool {
        matches!(self.stage, Stage::Replicate(_))
    }
}

#[derive(Debug)]
enum Stage {
    /// Sent to another node acting as owner, or about to be.
    Route {
        op: Op,
        skip: Vec<Member>,
        /// The node asked, as it was when asked.
        to: Option<Member>,
        retry_at: Option<Timestamp>,
    },
    /// Here, as owner, asking unsynced peers what they know first.
    Fetch {
        op: Op,
        skip: Vec<Member>,
        /// Peers still to answer: `None` while asked, else when to ask again.
        waiting: BTreeMap<String, Option<Timestamp>>,
    },
    /// Applied here; waiting for the holders.
    Replicate(Repl),
    /// Moving between stages (never seen outside one call).
    Running,
}

#[derive(Debug)]
struct Repl {
    id: SessionId,
    /// The client's write, to apply again on a newer copy (rebase).
    op: Op,
    outcome: Outcome,
    /// For holders that have the version before: the delta (or the record).
    first: Replicate,
    /// Send the full current state instead of `first` (after a view change).
    full: bool,
    targets: BTreeMap<String, Target>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Sent to this generation; the number of resends after a lost
    /// connection.
    InFlight(u8, u64),
    /// Holds the write (this generation of the node did).
    Acked(u64),
    /// Down: the next node of the preference takes its place.
    Refused,
    /// Nothing could be sent (the session was handed off meanwhile).
    Failed,
    /// Not under the same view: ask again at this time.
    Retry(Timestamp),
}

impl Core {
    /// A client's operation arrives here (from this node's own clients, or
    /// forwarded by a peer with the nodes it found down).
    pub(crate) fn start(
        &mut self,
        client: Client,
        op: Op,
        skip: Vec<Member>,
        out: &mut Vec<Output>,
    ) {
        if !self.formed {
            // Alone, a node would take itself for the whole cluster: own
            // every session, answer "absent" for sessions held elsewhere,
            // and write without backups. A peer that already counts it as
            // owner asks again shortly; a client (a balancer that has not
            // yet noticed the restart) waits until the node has joined.
            if let Client::Peer(token) = client {
                return out.push(Output::Respond {
                    token,
                    response: Response::NotOwner,
                });
            }
        }
        let id = self.token();
        self.ops.insert(
            id,
            Pending {
                client: Some(client),
                deadline: self.now.plus(self.cfg.ack_timeout * 2),
                started: self.now,
                trail: Vec::new(),
                attempt: 0,
                stage: Stage::Route {
                    op,
                    skip,
                    to: None,
                    retry_at: None,
                },
            },
        );
        self.route(id, out);
    }

    fn route(&mut self, op_id: u64, out: &mut Vec<Output>) {
        let Some(mut p) = self.ops.remove(&op_id) else {
            return;
        };
        let Stage::Route { op, skip, to, .. } = &p.stage else {
            self.ops.insert(op_id, p);
            return;
        };
        if to.is_some() {
            self.ops.insert(op_id, p);
            return;
        }
        if !self.formed {
            p.trail.push("not joined");
            if let Stage::Route { retry_at, .. } = &mut p.stage {
                *retry_at = Some(self.now.plus(RETRY));
            }
            self.ops.insert(op_id, p);
            return;
        }
        let target = self
            .view
            .preference(segment(&op.id()))
            .find(|n| !self.skipped(skip, n))
            .map(str::to_string);
        let Some(target) = target else {
            let why = if self.leaving {
                "this node is leaving and sees no other node"
            } else {
                "no live node can own the session"
            };
            return self.done(p, Err(Refusal::Unavailable(why.into())), out);
        };
        if target == self.cfg.me.name {
            let (op, skip) = match std::mem::replace(&mut p.stage, Stage::Running) {
                Stage::Route { op, skip, .. } => (op, skip),
                _ => unreachable!("matched above"),
            };
            return self.execute(op_id, p, op, skip, out);
        }
        if let Some(Client::Peer(token)) = p.client {
            // Forwarded here, but another node owns it under this view:
            // the sender routes again (never a second hop, which could loop
            // while views disagree).
            return out.push(Output::Respond {
                token,
                response: Response::NotOwner,
            });
        }
        let forward = Forward {
            op: op.clone(),
            skip: skip.clone(),
        };
        if let Stage::Route { to, retry_at, .. } = &mut p.stage {
            *to = self.view.member(&target).cloned();
            *retry_at = None;
        }
        let attempt = p.attempt;
        p.trail.push("forward");
        self.ops.insert(op_id, p);
        self.counters.forwarded += 1;
        self.send(
            &target,
            Request::Forward(forward),
            Sent::Op(op_id, target.clone(), attempt),
            out,
        );
    }

    /// Executes here as owner: first, while some peer has not synced under
    /// this view, asks the unsynced peers what they know of the session;
    /// acting for an owner that is down, asks every other node (the dead
    /// owner's last write may have reached some holders and not others).
    fn execute(
        &mut self,
        op_id: u64,
        mut p: Pending,
        op: Op,
        skip: Vec<Member>,
        out: &mut Vec<Output>,
    ) {
        let waiting: BTreeMap<String, Option<Timestamp>> = if matches!(op, Op::Create(_)) {
            // A fresh random ID: nobody can know it.
            BTreeMap::new()
        } else {
            let acting = skip.iter().any(|m| self.skipped(&skip, &m.name));
            self.peers()
                .filter(|peer| acting || !self.synced_from.contains(*peer))
                .filter(|peer| !self.skipped(&skip, peer))
                .map(|peer| (peer.to_string(), None))
                .collect()
        };
        if waiting.is_empty() {
            return self.run(op_id, p, op, skip, out);
        }
        self.counters.read_throughs += 1;
        let id = op.id();
        tracing::trace!(node = %self.cfg.me.name, ?id, asking = ?waiting.keys().collect::<Vec<_>>(), "read-through");
        let peers: Vec<String> = waiting.keys().cloned().collect();
        p.trail.push("read-through");
        p.attempt += 1;
        let attempt = p.attempt;
        p.stage = Stage::Fetch { op, skip, waiting };
        self.ops.insert(op_id, p);
        for peer in peers {
            self.send(
                &peer,
                Request::Transfer(Transfer::Fetch(vec![id])),
                Sent::Op(op_id, peer.clone(), attempt),
                out,
            );
        }
    }

    /// Runs the operation on this node's copy.
    fn run(
        &mut self,
        op_id: u64,
        mut p: Pending,
        op: Op,
        skip: Vec<Member>,
        out: &mut Vec<Output>,
    ) {
        let now = self.now;
        if let Op::Load(id, load) = op {
            let found = self.store.load(&id, load);
            if let Some((_, true)) = &found {
                // The access must reach the holders, or a failover would
                // expire the session early; nobody waits for it.
                let touch = Replicate::Touch {
                    id,
                    last_access: load.now,
                };
                for h in self.other_holders(&id) {
                    self.counters.messages += 1;
                    self.send(&h, Request::Replicate(touch.clone()), Sent::Ignore, out);
                }
            }
            let record = found.map(|(r, _)| r);
            return self.done(p, Ok(Outcome::Record(record)), out);
        }
        let id = op.id();
        let (outcome, first) = match self.write(&op) {
            Ok(w) => w,
            Err(answer) => return self.done(p, answer, out),
        };
        self.counters.writes += 1;
        tracing::trace!(node = %self.cfg.me.name, view = ?self.view.id(), ?id, ?outcome, "applied as owner");
        p.stage = Stage::Replicate(Repl {
            id,
            op,
            outcome: outcome.clone(),
            first,
            full: false,
            targets: skip
                .iter()
                .filter(|m| self.skipped(&skip, &m.name))
                .map(|m| (m.name.clone(), Target::Refused))
                .collect(),
        });
        // The replication gets its own full timeout from now.
        p.deadline = now.plus(self.cfg.ack_timeout);
        if self.cfg.ack == Ack::Async {
            let client = p.client.take();
            self.answer(client, Ok(outcome), out);
        }
        self.ops.insert(op_id, p);
        self.replicate(op_id, out);
    }

    /// A name for a new write: unique across nodes and their lives.
    fn next_stamp(&mut self) -> u64 {
        let n = self.token();
        let mut key = self.cfg.me.name.as_bytes().to_vec();
        key.push(0xff);
        key.extend_from_slice(&self.cfg.me.generation.to_le_bytes());
        key.extend_from_slice(&n.to_le_bytes());
        tether_core::placement::stable_hash(&key)
    }

    /// Applies a write here as owner: its outcome and what the holders
    /// get, or the answer when nothing was written.
    #[allow(clippy::type_complexity)]
    fn write(&mut self, op: &Op) -> Result<(Outcome, Replicate), Result<Outcome, Refusal>> {
        let max = self.cfg.max_size;
        let too_large = |size| Err(Refusal::TooLarge { size, limit: max });
        let stamp = self.next_stamp();
        match op {
            Op::Create(record) => match self.store.create(record, stamp, max) {
                Ok(()) => Ok((
                    Outcome::Created,
                    Replicate::Put(Stamped {
                        record: record.clone(),
                        stamp,
                    }),
                )),
                Err(Refused::Collision) => Err(Err(Refusal::Collision)),
                Err(Refused::TooLarge(size)) => Err(too_large(size)),
                Err(Refused::Conflict) => Err(Err(Refusal::Conflict)),
            },
            Op::Apply(id, delta, at) => match self.store.apply(id, delta, *at, stamp, max) {
                Ok(Some(version)) => Ok((
                    Outcome::Version(Some(version)),
                    Replicate::Delta {
                        stamp,
                        id: *id,
                        base: version - 1,
                        delta: delta.clone(),
                        now: *at,
                    },
                )),
                Ok(None) | Err(Refused::Collision) => Err(Ok(Outcome::Version(None))),
                Err(Refused::TooLarge(size)) => Err(too_large(size)),
                Err(Refused::Conflict) => Err(Err(Refusal::Conflict)),
            },
            Op::Delete(id, at) => {
                let at = (*at).max(self.now);
                let (t, existed) = self.store.delete(id, at, self.cfg.tombstone_min);
                Ok((Outcome::Deleted(existed), Replicate::Remove(t)))
            }
            Op::Load(..) => Err(Err(Refusal::Unavailable(
                "internal: a load is not a write".into(),
            ))),
        }
    }

    /// A holder had another history of `id` and this node took it: every
    /// write of the session still replicating is applied again on top, so
    /// neither history's acknowledged writes are lost.
    fn rebase(&mut self, id: SessionId, out: &mut Vec<Output>) {
        let ops: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, p)| matches!(&p.stage, Stage::Replicate(r) if r.id == id))
            .map(|(k, _)| *k)
            .collect();
        tracing::debug!(node = %self.cfg.me.name, ?id, writes = ops.len(), "rebasing writes on another holder's copy");
        for op_id in ops {
            let Some(mut p) = self.ops.remove(&op_id) else {
                continue;
            };
            let Stage::Replicate(r) = &mut p.stage else {
                self.ops.insert(op_id, p);
                continue;
            };
            match self.write(&r.op) {
                Ok((outcome, first)) => {
                    r.outcome = outcome;
                    r.first = first;
                    r.full = true;
                    r.targets.retain(|_, t| *t == Target::Refused);
                    self.ops.insert(op_id, p);
                    self.replicate(op_id, out);
                }
                Err(answer) => self.done(p, answer, out),
            }
        }
    }

    /// Whether `name` is down according to `skip`: a node found down under
    /// a generation, unless this view knows a newer generation of it (a
    /// restarted node under the same name is alive).
    fn skipped(&self, skip: &[Member], name: &str) -> bool {
        skip.iter().any(|m| {
            m.name == name
                && self
                    .view
                    .member(name)
                    .is_some_and(|v| v.generation <= m.generation)
        })
    }

    /// The holders of `id`'s segment other than this node.
    fn other_holders(&self, id: &SessionId) -> Vec<String> {
        let me = self.cfg.me.name.as_str();
        self.view
            .holders(segment(id), self.copies())
            .filter(|n| *n != me)
            .map(str::to_string)
            .collect()
    }

    /// What a holder that may lack the base version gets: the current state.
    fn full_message(&self, id: &SessionId) -> Option<Replicate> {
        match self.store.known(id) {
            Known::Live(c) => Some(Replicate::Put(c)),
            Known::Deleted(t) => Some(Replicate::Remove(t)),
            Known::Absent => None,
        }
    }

    /// Sends the write to as many holders as still needed, replacing those
    /// that are down by the next nodes of the preference; finishes the
    /// operation when enough acknowledged, or when nobody is left to ask.
    fn replicate(&mut self, op_id: u64, out: &mut Vec<Output>) {
        let me = self.cfg.me.name.clone();
        let now = self.now;
        let Some(Pending {
            stage: Stage::Replicate(r),
            ..
        }) = self.ops.get(&op_id)
        else {
            return;
        };
        let candidates: Vec<String> = self
            .view
            .preference(segment(&r.id))
            .filter(|n| *n != me)
            .map(str::to_string)
            .collect();
        let state = |c: &String| r.targets.get(c).copied();
        let wanted = match self.cfg.replication {
            // Every other live node, except those that refuse connections:
            // a crashed node holds nothing to keep consistent.
            Replication::All => candidates
                .iter()
                .filter(|c| state(c) != Some(Target::Refused))
                .count(),
            Replication::Backup(k) => k.min(candidates.len()),
        };
        let acked = candidates
            .iter()
            .filter(|c| matches!(state(c), Some(Target::Acked(_))))
            .count();
        if acked >= wanted {
            return self.replicated_enough(op_id, out);
        }
        let mut need = wanted
            - acked
            - candidates
                .iter()
                .filter(|c| matches!(state(c), Some(Target::InFlight(..))))
                .count()
                .min(wanted - acked);
        let mut to_send = Vec::new();
        let mut waiting = false;
        for c in &candidates {
            if need == 0 {
                break;
            }
            match state(c) {
                None => {
                    to_send.push(c.clone());
                    need -= 1;
                }
                Some(Target::Retry(at)) => {
                    // Views differ: wait for this holder rather than write
                    // past it, unless it is time to ask again.
                    if at <= now {
                        to_send.push(c.clone());
                    }
                    waiting = true;
                    need -= 1;
                }
                _ => {}
            }
        }
        let inflight = candidates
            .iter()
            .any(|c| matches!(state(c), Some(Target::InFlight(..))));
        if to_send.is_empty() && !inflight && !waiting {
            let msg = format!(
                "write not replicated: {acked} of {wanted} holders acknowledged (the others are down or did not answer)"
            );
            self.counters.ack_failures += 1;
            return self.finish(op_id, Err(Refusal::Unavailable(msg)), out);
        }
        for c in to_send {
            self.send_replica(op_id, &c, 0, false, out);
        }
    }

    fn send_replica(
        &mut self,
        op_id: u64,
        to: &str,
        tries: u8,
        force_full: bool,
        out: &mut Vec<Output>,
    ) {
        let Some(Pending {
            stage: Stage::Replicate(r),
            attempt,
            ..
        }) = self.ops.get(&op_id)
        else {
            return;
        };
        let attempt = *attempt;
        let msg = if r.full || force_full {
            self.full_message(&r.id)
        } else {
            Some(r.first.clone())
        };
        let Some(Pending {
            stage: Stage::Replicate(r),
            ..
        }) = self.ops.get_mut(&op_id)
        else {
            return;
        };
        let Some(msg) = msg else {
            // Nothing left to send (handed off meanwhile): not this holder.
            r.targets.insert(to.to_string(), Target::Failed);
            return;
        };
        let generation = self.view.member(to).map_or(0, |m| m.generation);
        r.targets
            .insert(to.to_string(), Target::InFlight(tries, generation));
        self.counters.messages += 1;
        self.send(
            to,
            Request::Replicate(msg),
            Sent::Op(op_id, to.to_string(), attempt),
            out,
        );
    }

    fn replicated_enough(&mut self, op_id: u64, out: &mut Vec<Output>) {
        let Some(p) = self.ops.remove(&op_id) else {
            return;
        };
        if let Stage::Replicate(r) = &p.stage {
            let outcome = r.outcome.clone();
            self.done(p, Ok(outcome), out);
        }
    }

    fn answer(
        &mut self,
        client: Option<Client>,
        result: Result<Outcome, Refusal>,
        out: &mut Vec<Output>,
    ) {
        match client {
            Some(Client::Local(token)) => out.push(Output::Done { token, result }),
            Some(Client::Peer(token)) => out.push(Output::Respond {
                token,
                response: Response::Done(result),
            }),
            None => {}
        }
    }

    /// Answers operation `p`; a slow one is logged with what it went
    /// through (membership changes show up here first).
    fn done(&mut self, p: Pending, result: Result<Outcome, Refusal>, out: &mut Vec<Output>) {
        let took = self.now.since(p.started);
        if took >= SLOW {
            tracing::debug!(node = %self.cfg.me.name, ms = took.as_millis() as u64, trail = ?p.trail, ok = result.is_ok(), "slow operation");
        }
        self.answer(p.client, result, out);
    }

    fn finish(&mut self, op_id: u64, result: Result<Outcome, Refusal>, out: &mut Vec<Output>) {
        if let Some(p) = self.ops.remove(&op_id) {
            self.done(p, result, out);
        }
    }

    /// A peer answered (or failed to answer) a message of operation `op_id`.
    pub(crate) fn op_reply(
        &mut self,
        op_id: u64,
        from: &Member,
        attempt: u32,
        reply: Result<Response, Failure>,
        out: &mut Vec<Output>,
    ) {
        let now = self.now;
        let peer = from.name.as_str();
        let Some(mut p) = self.ops.remove(&op_id) else {
            return;
        };
        if p.attempt != attempt {
            self.ops.insert(op_id, p);
            return;
        }
        match &mut p.stage {
            Stage::Route {
                to, retry_at, skip, ..
            } => {
                let Some(asked) = to.take().filter(|m| m == from) else {
                    self.ops.insert(op_id, p);
                    return;
                };
                match reply {
                    Ok(Response::Done(result)) => self.done(p, result, out),
                    Ok(Response::NotOwner) => {
                        p.trail.push("not the owner");
                        *retry_at = Some(now.plus(RETRY));
                        self.ops.insert(op_id, p);
                    }
                    Err(Failure::Refused) => {
                        // Down: the next node of the preference acts as owner.
                        skip.push(asked);
                        self.ops.insert(op_id, p);
                        self.route(op_id, out);
                    }
                    Err(Failure::Lost | Failure::Timeout) => {
                        // It may still apply the operation: a second acting
                        // owner could apply it twice. Fail instead.
                        let msg = format!("the session's owner ({peer}) did not answer");
                        self.done(p, Err(Refusal::Unavailable(msg)), out);
                    }
                    Ok(other) => {
                        let msg = format!("unexpected answer from {peer}: {other:?}");
                        self.done(p, Err(Refusal::Unavailable(msg)), out);
                    }
                }
            }
            Stage::Fetch { waiting, .. } => {
                if waiting.contains_key(peer) {
                    match reply {
                        Ok(Response::Known(known)) => {
                            for k in known {
                                self.store.learn(k);
                            }
                            waiting.remove(peer);
                        }
                        // A node that refuses connections is down: what it
                        // held is also held by a live node.
                        Err(Failure::Refused) => {
                            waiting.remove(peer);
                        }
                        _ => {
                            p.trail.push("read-through again");
                            waiting.insert(peer.to_string(), Some(now.plus(RETRY)));
                        }
                    }
                }
                self.ops.insert(op_id, p);
                self.fetched(op_id, out);
            }
            Stage::Replicate(r) => {
                let Some(Target::InFlight(tries, sent_to)) = r
                    .targets
                    .get(peer)
                    .copied()
                    .filter(|t| matches!(t, Target::InFlight(_, g) if *g == from.generation))
                else {
                    self.ops.insert(op_id, p);
                    return;
                };
                let mut resend = None;
                tracing::trace!(node = %self.cfg.me.name, id = ?r.id, %peer, ?reply, "replication answer");
                match reply {
                    // The generation that was asked holds it (the view may
                    // know a newer one by now).
                    Ok(Response::Ack) => {
                        r.targets.insert(peer.to_string(), Target::Acked(sent_to));
                    }
                    Ok(Response::NeedFull) => resend = Some(tries),
                    Ok(Response::Conflict(theirs)) => {
                        let same = match (&theirs, self.store.known(&r.id)) {
                            (Known::Live(a), Known::Live(b)) => {
                                a.record.version == b.record.version && a.stamp == b.stamp
                            }
                            (Known::Deleted(a), Known::Deleted(b)) => a.version == b.version,
                            _ => false,
                        };
                        if same {
                            r.targets.insert(peer.to_string(), Target::Acked(sent_to));
                        } else {
                            let id = r.id;
                            let before = self.store.known(&id);
                            self.store.learn(theirs);
                            let changed = !matches!(
                                (&before, self.store.known(&id)),
                                (Known::Live(a), Known::Live(b)) if a.stamp == b.stamp && a.record.version == b.record.version
                            ) && !matches!(
                                (&before, self.store.known(&id)),
                                (Known::Deleted(a), Known::Deleted(b)) if a.version == b.version
                            );
                            self.ops.insert(op_id, p);
                            if changed {
                                return self.rebase(id, out);
                            }
                            // Ours wins: the holder takes it in full.
                            return self.send_replica(op_id, peer, tries, true, out);
                        }
                    }
                    Ok(Response::WrongView) => {
                        p.trail.push("holder's view differs");
                        r.full = true;
                        r.targets
                            .insert(peer.to_string(), Target::Retry(now.plus(RETRY)));
                    }
                    Err(Failure::Refused) => {
                        r.targets.insert(peer.to_string(), Target::Refused);
                    }
                    // The connection died under the message (the peer
                    // crashed, or dropped an idle connection): replication
                    // messages are idempotent, so once more at once.
                    Err(Failure::Lost) if tries == 0 => resend = Some(1),
                    // Alive but slow, or the message was lost: keep asking
                    // this holder until the deadline. Writing past it to
                    // the next node would leave it without the write, and
                    // it is the one that serves the session if the owner
                    // dies.
                    _ => {
                        p.trail.push("holder did not answer");
                        r.targets
                            .insert(peer.to_string(), Target::Retry(now.plus(RETRY)));
                    }
                }
                self.ops.insert(op_id, p);
                match resend {
                    Some(tries) => self.send_replica(op_id, peer, tries, true, out),
                    None => self.replicate(op_id, out),
                }
            }
            Stage::Running => {
                self.ops.insert(op_id, p);
            }
        }
    }

    /// A read-through may be complete.
    fn fetched(&mut self, op_id: u64, out: &mut Vec<Output>) {
        let done = matches!(
            self.ops.get(&op_id),
            Some(Pending { stage: Stage::Fetch { waiting, .. }, .. }) if waiting.is_empty()
        );
        if !done {
            return;
        }
        let Some(mut p) = self.ops.remove(&op_id) else {
            return;
        };
        if let Stage::Fetch { op, skip, .. } = std::mem::replace(&mut p.stage, Stage::Running) {
            self.run(op_id, p, op, skip, out);
        }
    }

    /// `peer` sent everything it had for this node: read-throughs need not
    /// wait for it.
    pub(crate) fn peer_synced(&mut self, peer: &str, out: &mut Vec<Output>) {
        let ids: Vec<u64> = self
            .ops
            .iter_mut()
            .filter_map(|(id, p)| match &mut p.stage {
                Stage::Fetch { waiting, .. } => waiting.remove(peer).map(|_| *id),
                _ => None,
            })
            .collect();
        for id in ids {
            self.fetched(id, out);
        }
    }

    /// Applies an owner's replication message.
    pub(crate) fn replicated(&mut self, r: Replicate) -> Response {
        let (id, result) = match r {
            Replicate::Put(copy) => (copy.record.id, self.store.accept(copy)),
            Replicate::Delta {
                stamp,
                id,
                base,
                delta,
                now,
            } => (
                id,
                self.store.apply_replicated(&id, base, &delta, now, stamp),
            ),
            Replicate::Touch { id, last_access } => {
                self.store.touch(&id, last_access);
                return Response::Ack;
            }
            Replicate::Remove(t) => {
                let held = if self.store.bury(t) {
                    Replicated::Held
                } else {
                    Replicated::Conflict
                };
                (t.id, held)
            }
        };
        match result {
            Replicated::Held => Response::Ack,
            Replicated::Gap => Response::NeedFull,
            Replicated::Conflict => Response::Conflict(self.store.known(&id)),
        }
    }

    /// Deadlines and retries.
    pub(crate) fn ops_tick(&mut self, out: &mut Vec<Output>) {
        let now = self.now;
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for op_id in ids {
            let Some(p) = self.ops.get_mut(&op_id) else {
                continue;
            };
            if now >= p.deadline {
                let msg = match &p.stage {
                    Stage::Route { .. } => {
                        "the session's owner could not be reached in time (membership is changing)"
                    }
                    Stage::Fetch { .. } => {
                        "peers did not answer in time while the session was being transferred"
                    }
                    Stage::Replicate(_) => {
                        self.counters.ack_failures += 1;
                        "write not replicated in time: the holders did not acknowledge it"
                    }
                    Stage::Running => "internal: an operation stalled",
                };
                self.finish(op_id, Err(Refusal::Unavailable(msg.into())), out);
                continue;
            }
            match &mut p.stage {
                Stage::Route { retry_at, .. } => {
                    if retry_at.is_some_and(|t| t <= now) {
                        *retry_at = None;
                        self.route(op_id, out);
                    }
                }
                Stage::Fetch { op, waiting, .. } => {
                    let id = op.id();
                    let due: Vec<String> = waiting
                        .iter_mut()
                        .filter(|(_, t)| t.is_some_and(|t| t <= now))
                        .map(|(peer, t)| {
                            *t = None;
                            peer.clone()
                        })
                        .collect();
                    let attempt = p.attempt;
                    for peer in due {
                        self.send(
                            &peer,
                            Request::Transfer(Transfer::Fetch(vec![id])),
                            Sent::Op(op_id, peer.clone(), attempt),
                            out,
                        );
                    }
                }
                Stage::Running => {}
                Stage::Replicate(r) => {
                    if r.targets
                        .values()
                        .any(|t| matches!(t, Target::Retry(at) if *at <= now))
                    {
                        self.replicate(op_id, out);
                    }
                }
            }
        }
    }

    /// The view changed: operations route again under it; writes count the
    /// acknowledgements of holders still in it and send the full state to
    /// new holders.
    pub(crate) fn ops_view_changed(&mut self, out: &mut Vec<Output>) {
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        for op_id in ids {
            let Some(p) = self.ops.get_mut(&op_id) else {
                continue;
            };
            p.trail.push("view changed");
            match &mut p.stage {
                Stage::Route { to: None, .. } => self.route(op_id, out),
                Stage::Route { .. } | Stage::Running => {}
                Stage::Fetch { .. } => {
                    // Start over: the owner, or who must be asked, changed.
                    p.attempt += 1;
                    if let Stage::Fetch { op, skip, .. } =
                        std::mem::replace(&mut p.stage, Stage::Running)
                    {
                        p.stage = Stage::Route {
                            op,
                            skip,
                            to: None,
                            retry_at: None,
                        };
                    }
                    self.route(op_id, out);
                }
                Stage::Replicate(r) => {
                    r.full = true;
                    let view = &self.view;
                    r.targets.retain(|name, t| match (t, view.member(name)) {
                        (Target::Acked(g), Some(m)) => *g == m.generation,
                        (Target::InFlight(_, g), Some(m)) => *g == m.generation,
                        _ => false,
                    });
                    self.replicate(op_id, out);
                }
            }
        }
    }
}
