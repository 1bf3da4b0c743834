//! Transfer rounds: after a view change (and every few seconds, as repair)
//! each node compares segment digests with every peer, sends the segments
//! that differ and those it hands off, then says `Synced`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tether_core::placement::SEGMENTS;
use tether_core::{SessionId, Timestamp};

use super::view::Member;
use super::{Core, Failure, Output, Sent};
use crate::wire::{Request, Response, Transfer};

/// Before asking a peer again after a different view or a failure.
const RETRY: Duration = Duration::from_millis(20);
/// Before asking again a peer that refused the connection (it is down;
/// gossip will soon say so).
const RETRY_DOWN: Duration = Duration::from_millis(500);
/// Batches in flight to one peer.
const WINDOW: usize = 4;
/// How long a peer's offer of a segment stands in for another peer's equal
/// offer (the first peer is sending it; if it fails, its round restarts).
const OFFER_TTL: Duration = Duration::from_secs(10);

/// Which message of a round a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Digest,
    Batch,
    Synced,
}

/// One round: this node's side of the transfer with every peer.
#[derive(Debug)]
pub(crate) struct Round {
    /// Names the round, so late replies to an earlier one are ignored.
    seq: u64,
    /// After a view change (ends with `Synced`), or a repair round.
    full: bool,
    peers: BTreeMap<String, PeerRound>,
    /// Segments held here that this node no longer holds under the view.
    handoff: Vec<u16>,
}

#[derive(Debug)]
struct PeerRound {
    /// Send every segment both hold, whatever the digests say: the peer is
    /// back after being out of the view under the same generation (a
    /// partition or a false suspicion), so both sides may have written the
    /// same versions differently, which digests of versions cannot see.
    force: bool,
    state: State,
    attempt: u32,
    /// Segments to send, with where to resume inside the first one.
    queue: VecDeque<(u16, Option<SessionId>)>,
    inflight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Digest,
    Sending,
    Synced,
    Done,
    Retry(Timestamp),
}

impl Core {
    /// Starts a round under the current view (replacing any under way).
    pub(crate) fn start_round(&mut self, full: bool, out: &mut Vec<Output>) {
        if full {
            self.round_done = false;
        }
        let me = self.cfg.me.name.clone();
        let copies = self.copies();
        let handoff = (0..SEGMENTS)
            .filter(|s| self.store.holds(*s) && !self.view.holds(*s, copies, &me))
            .collect();
        let seq = self.token();
        let peers: Vec<String> = self.peers().map(str::to_string).collect();
        let returning = |p: &String| {
            full && self.view.member(p).is_some_and(|m| {
                self.seen.get(&m.name) == Some(&m.generation) && !self.previous.contains(m)
            })
        };
        let force: Vec<bool> = peers.iter().map(returning).collect();
        self.round = Some(Round {
            seq,
            full,
            peers: peers
                .iter()
                .zip(force)
                .map(|(p, force)| {
                    let pr = PeerRound {
                        force,
                        state: State::Digest,
                        attempt: 0,
                        queue: VecDeque::new(),
                        inflight: 0,
                    };
                    (p.clone(), pr)
                })
                .collect(),
            handoff,
        });
        for p in peers {
            self.send_digest(&p, out);
        }
        self.round_progress(out);
    }

    /// The view changed: rounds and operations start over under it.
    pub(crate) fn view_changed(&mut self, out: &mut Vec<Output>) {
        self.ops_view_changed(out);
    }

    fn send_digest(&mut self, peer: &str, out: &mut Vec<Output>) {
        let me = self.cfg.me.name.clone();
        let copies = self.copies();
        let Some(round) = self.round.as_mut() else {
            return;
        };
        let Some(pr) = round.peers.get_mut(peer) else {
            return;
        };
        pr.state = State::Digest;
        pr.queue.clear();
        pr.inflight = 0;
        let sent = Sent::Round(round.seq, peer.to_string(), Step::Digest, pr.attempt);
        let digests = self
            .offered(peer, &me, copies)
            .into_iter()
            .map(|s| (s, self.store.digest(s)))
            .collect();
        self.send(
            peer,
            Request::Transfer(Transfer::Digest(digests)),
            sent,
            out,
        );
    }

    /// The segments this node offers `peer`: those `peer` holds under the
    /// view that this node holds too, or holds data of without being a
    /// holder any more (a handoff). The peer asks for those whose digests
    /// differ from its own.
    fn offered(&self, peer: &str, me: &str, copies: usize) -> Vec<u16> {
        (0..SEGMENTS)
            .filter(|s| self.view.holds(*s, copies, peer))
            .filter(|s| self.view.holds(*s, copies, me) || self.store.holds(*s))
            .collect()
    }

    /// A peer answered (or failed to answer) a message of the round.
    pub(crate) fn round_reply(
        &mut self,
        seq: u64,
        peer: &str,
        step: Step,
        attempt: u32,
        reply: Result<Response, Failure>,
        out: &mut Vec<Output>,
    ) {
        let now = self.now;
        let copies = self.copies();
        let Some(round) = self.round.as_mut().filter(|r| r.seq == seq) else {
            return;
        };
        let Some(pr) = round.peers.get_mut(peer).filter(|pr| pr.attempt == attempt) else {
            return;
        };
        match (step, reply) {
            (Step::Digest, Ok(Response::Mismatch(differ))) => {
                let mut segs = if pr.force {
                    let me = self.cfg.me.name.clone();
                    self.offered(peer, &me, copies)
                } else {
                    differ
                };
                segs.sort_unstable();
                segs.dedup();
                let Some(pr) = self.round.as_mut().and_then(|r| r.peers.get_mut(peer)) else {
                    return;
                };
                pr.queue = segs.into_iter().map(|s| (s, None)).collect();
                pr.state = State::Sending;
                self.pump(peer, out);
            }
            (Step::Batch, Ok(Response::Ack)) => {
                pr.inflight -= 1;
                self.pump(peer, out);
            }
            (Step::Synced, Ok(Response::Ack)) => {
                pr.state = State::Done;
                self.round_progress(out);
            }
            (_, reply) => {
                // A different view, a failure, or a peer that is down: start
                // this peer's part over a little later.
                let wait = if matches!(reply, Err(Failure::Refused)) {
                    RETRY_DOWN
                } else {
                    RETRY
                };
                pr.attempt += 1;
                pr.queue.clear();
                pr.inflight = 0;
                pr.state = State::Retry(now.plus(wait));
            }
        }
    }

    /// Sends the next batches to `peer`, then `Synced`.
    fn pump(&mut self, peer: &str, out: &mut Vec<Output>) {
        loop {
            let budget = self.cfg.batch_bytes;
            let Some(round) = self.round.as_mut() else {
                return;
            };
            let (seq, full) = (round.seq, round.full);
            let Some(pr) = round.peers.get_mut(peer) else {
                return;
            };
            if pr.state != State::Sending {
                return;
            }
            if pr.queue.is_empty() {
                if pr.inflight > 0 {
                    return;
                }
                if full {
                    pr.state = State::Synced;
                    let sent = Sent::Round(seq, peer.to_string(), Step::Synced, pr.attempt);
                    self.send(peer, Request::Transfer(Transfer::Synced), sent, out);
                } else {
                    pr.state = State::Done;
                    self.round_progress(out);
                }
                return;
            }
            if pr.inflight >= WINDOW {
                return;
            }
            // One batch: whole segments while they fit, the rest of a large
            // one in the next batch (resuming after the last ID sent).
            let mut records = Vec::new();
            let mut tombstones = Vec::new();
            let mut bytes = 0;
            while let Some((seg, after)) = pr.queue.front().copied() {
                if after.is_none() {
                    let t = self.store.tombstones(seg);
                    bytes += t.len() * 96;
                    tombstones.extend(t);
                }
                let (chunk, next) = self.store.chunk(seg, after, budget.saturating_sub(bytes));
                bytes += chunk.iter().map(|r| r.record.size() + 160).sum::<usize>();
                records.extend(chunk);
                match next {
                    Some(last) => {
                        pr.queue[0].1 = Some(last);
                        break;
                    }
                    None => {
                        pr.queue.pop_front();
                    }
                }
                if bytes >= budget {
                    break;
                }
            }
            pr.inflight += 1;
            let sent = Sent::Round(seq, peer.to_string(), Step::Batch, pr.attempt);
            self.counters.transferred_out += records.len() as u64;
            let batch = Transfer::Batch {
                records,
                tombstones,
            };
            self.send(peer, Request::Transfer(batch), sent, out);
        }
    }

    /// Hands off segments whose holders all have them, and ends the round
    /// once every peer is done.
    fn round_progress(&mut self, out: &mut Vec<Output>) {
        let copies = self.copies();
        let Some(round) = self.round.as_mut() else {
            return;
        };
        let done = |p: &str| round.peers.get(p).is_some_and(|pr| pr.state == State::Done);
        let view = &self.view;
        let (ready, keep): (Vec<u16>, Vec<u16>) = round
            .handoff
            .iter()
            .partition(|s| view.holders(**s, copies).all(done));
        round.handoff = keep;
        let finished = round.peers.values().all(|pr| pr.state == State::Done);
        let full = round.full;
        for seg in ready {
            self.store.drop_segment(seg);
            self.counters.handed_off += 1;
        }
        if finished && self.round.as_ref().is_some_and(|r| r.handoff.is_empty()) {
            self.round = None;
            if full {
                self.round_done = true;
            }
        }
        let _ = out;
    }

    /// Retries due, and a repair round when none is under way.
    pub(crate) fn round_tick(&mut self, out: &mut Vec<Output>) {
        let now = self.now;
        match self.round.as_mut() {
            Some(round) => {
                let due: Vec<String> = round
                    .peers
                    .iter()
                    .filter(|(_, pr)| matches!(pr.state, State::Retry(t) if t <= now))
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in due {
                    self.send_digest(&p, out);
                }
            }
            None if now >= self.next_repair => {
                self.next_repair = now.plus(self.cfg.anti_entropy);
                self.start_round(false, out);
            }
            None => {}
        }
    }

    /// A transfer message from a peer under the same view.
    pub(crate) fn transfer(
        &mut self,
        from: &Member,
        t: Transfer,
        out: &mut Vec<Output>,
    ) -> Response {
        match t {
            Transfer::Digest(theirs) => {
                // Several peers may offer the same copy of a segment (both
                // old holders of a segment this node now holds): ask one.
                let now = self.now;
                let mut differ = Vec::new();
                for (s, d) in theirs {
                    if s >= SEGMENTS || self.store.digest(s) == d {
                        continue;
                    }
                    match self.offers.get(&s) {
                        Some((d0, p0, at))
                            if *d0 == d && *p0 != from.name && now.since(*at) < OFFER_TTL => {}
                        _ => {
                            self.offers.insert(s, (d, from.name.clone(), now));
                            differ.push(s);
                        }
                    }
                }
                Response::Mismatch(differ)
            }
            Transfer::Batch {
                records,
                tombstones,
            } => {
                self.counters.transferred_in += records.len() as u64;
                for t in tombstones {
                    self.store.bury(t);
                }
                for r in records {
                    self.store.put(r);
                }
                Response::Ack
            }
            Transfer::Synced => {
                tracing::trace!(node = %self.cfg.me.name, from = %from.name, "synced");
                self.synced_from.insert(from.name.clone());
                self.peer_synced(&from.name, out);
                Response::Ack
            }
            Transfer::Fetch(ids) => {
                Response::Known(ids.iter().map(|id| self.store.known(id)).collect())
            }
        }
    }
}
