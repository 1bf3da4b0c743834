//! The sessions one node holds, by segment, with version-ordered
//! replication and deletion markers. No I/O.
//!
//! Sessions are kept compact: the attributes as one boxed slice of (name,
//! JSON text) pairs instead of a `BTreeMap` (whose smallest node holds
//! room for eleven entries), so a one-attribute session costs about 150
//! bytes instead of about 650.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tether_core::placement::{self, SEGMENTS};
use tether_core::{Delta, Load, Record, SessionId, Timestamp};

/// What applying a replicated write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    /// Applied, or this very write was already here: the holder has it.
    Held,
    /// This node misses versions before it (or the whole session): it needs
    /// the full record.
    Gap,
    /// This node holds another history of the session (a write the sender
    /// did not build on): the sender must decide, from this copy.
    Conflict,
}

/// A session with the identity of its latest write: two copies at the
/// same version are the same only if their stamps are equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    /// The session.
    pub record: Record,
    /// Names the write that produced `record.version`.
    pub stamp: u64,
}

/// A deletion remembered so that a late copy cannot bring the session back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The deleted session.
    pub id: SessionId,
    /// The deletion's version (the deleted version + 1): copies older than
    /// it are refused.
    pub version: u64,
    /// Until when to remember it.
    pub until: Timestamp,
}

/// What a node knows of one session, for a peer that must not answer
/// "absent" without asking (read-through during a transfer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Known {
    /// Nothing.
    Absent,
    /// A live copy.
    Live(Stamped),
    /// A deletion.
    Deleted(Tombstone),
}

/// Session IDs are uniformly random (the OS CSPRNG), so hashing is the
/// identity on eight of their bytes; bytes 8..16, because bytes 0..2 name
/// the segment and are nearly equal within one segment's map.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 16 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8..16]);
            self.0 ^= u64::from_le_bytes(b);
        } else {
            for (i, x) in bytes.iter().enumerate() {
                self.0 ^= u64::from(*x) << ((i % 8) * 8);
            }
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

type IdMap<V> = HashMap<SessionId, V, BuildHasherDefault<IdHasher>>;

/// A session as held: [`Record`] without the map.
#[derive(Debug, Clone)]
struct Stored {
    attrs: Box<[(Box<str>, Box<RawValue>)]>,
    created: Timestamp,
    last_access: Timestamp,
    deadline: Timestamp,
    version: u64,
    stamp: u64,
    idle_ms: u64,
}

impl Stored {
    fn from_record(r: Record, stamp: u64) -> Self {
        Self {
            stamp,
            attrs: r
                .attributes
                .into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v))
                .collect(),
            created: r.created,
            last_access: r.last_access,
            deadline: r.deadline,
            version: r.version,
            idle_ms: r.idle_ms,
        }
    }

    fn to_record(&self, id: SessionId) -> Record {
        Record {
            id,
            attributes: self
                .attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            created: self.created,
            last_access: self.last_access,
            idle_ms: self.idle_ms,
            deadline: self.deadline,
            version: self.version,
        }
    }

    fn expires_at(&self) -> Timestamp {
        Timestamp(self.last_access.0.saturating_add(self.idle_ms)).min(self.deadline)
    }

    fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at()
    }

    fn size(&self) -> usize {
        self.attrs
            .iter()
            .map(|(k, v)| k.len() + v.get().len())
            .sum()
    }

    /// Whether `delta`'s conditions ([`Delta::expect`]) hold.
    fn meets(&self, delta: &Delta) -> bool {
        delta.expect.iter().all(|(key, want)| {
            let have = self
                .attrs
                .iter()
                .find(|(k, _)| **k == **key)
                .map(|(_, v)| v.get());
            have == want.as_ref().map(|v| v.get())
        })
    }

    /// The size after `delta`, without applying it.
    fn size_after(&self, delta: &Delta) -> usize {
        let mut size = if delta.clear { 0 } else { self.size() };
        for (key, change) in &delta.changes {
            if !delta.clear {
                if let Some((k, v)) = self.attrs.iter().find(|(k, _)| **k == **key) {
                    size -= k.len() + v.get().len();
                }
            }
            if let Some(new) = change {
                size += key.len() + new.get().len();
            }
        }
        size
    }

    fn stamped(&self, id: SessionId) -> Stamped {
        Stamped {
            record: self.to_record(id),
            stamp: self.stamp,
        }
    }

    /// Applies `delta` exactly as [`Record::apply`] does.
    fn apply(&mut self, delta: &Delta, now: Timestamp, stamp: u64) {
        self.stamp = stamp;
        let mut attrs: Vec<(Box<str>, Box<RawValue>)> = if delta.clear {
            Vec::new()
        } else {
            std::mem::take(&mut self.attrs).into_vec()
        };
        for (key, change) in &delta.changes {
            let at = attrs.binary_search_by(|(k, _)| (**k).cmp(key.as_str()));
            match (change, at) {
                (Some(v), Ok(i)) => attrs[i].1 = v.clone(),
                (Some(v), Err(i)) => attrs.insert(i, (key.clone().into_boxed_str(), v.clone())),
                (None, Ok(i)) => {
                    attrs.remove(i);
                }
                (None, Err(_)) => {}
            }
        }
        self.attrs = attrs.into_boxed_slice();
        if let Some(idle) = delta.idle_ms {
            self.idle_ms = idle;
        }
        self.last_access = self.last_access.max(now);
        self.version += 1;
    }
}

/// A copy's contribution to its segment's digest: the stamp makes two
/// histories that reached the same version differ.
fn digest_of(id: &SessionId, version: u64, stamp: u64) -> u64 {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(id.as_bytes());
    key[16..24].copy_from_slice(&version.to_le_bytes());
    key[24..].copy_from_slice(&stamp.to_le_bytes());
    placement::stable_hash(&key)
}

/// Which of two copies at the same version every node keeps: the later
/// access, then the greater stamp. Deterministic, so holders converge.
fn wins(a: (Timestamp, u64), b: (Timestamp, u64)) -> bool {
    a > b
}

#[derive(Default)]
struct Segment {
    live: IdMap<Stored>,
    tombs: IdMap<(u64, Timestamp)>,
    /// Sum of `digest_of(id, version)` over `live`: two nodes holding the
    /// same versions of the same sessions have equal digests.
    digest: u64,
    bytes: usize,
}

impl Segment {
    fn insert(&mut self, id: SessionId, s: Stored) {
        self.digest = self.digest.wrapping_add(digest_of(&id, s.version, s.stamp));
        self.bytes += s.size();
        if let Some(old) = self.live.insert(id, s) {
            self.forget(&id, &old);
        }
    }

    fn forget(&mut self, id: &SessionId, old: &Stored) {
        self.digest = self
            .digest
            .wrapping_sub(digest_of(id, old.version, old.stamp));
        self.bytes -= old.size();
    }

    fn remove(&mut self, id: &SessionId) -> Option<Stored> {
        let old = self.live.remove(id)?;
        self.forget(id, &old);
        Some(old)
    }

    /// Changes the session in place, keeping the digest and byte count.
    fn update<T>(&mut self, id: &SessionId, f: impl FnOnce(&mut Stored) -> T) -> Option<T> {
        let s = self.live.get_mut(id)?;
        let (v0, s0, b0) = (s.version, s.stamp, s.size());
        let out = f(s);
        let (v1, s1, b1) = (s.version, s.stamp, s.size());
        self.digest = self
            .digest
            .wrapping_sub(digest_of(id, v0, s0))
            .wrapping_add(digest_of(id, v1, s1));
        self.bytes = self.bytes - b0 + b1;
        Some(out)
    }

    fn tombstone(&mut self, id: SessionId, version: u64, until: Timestamp) {
        let t = self.tombs.entry(id).or_insert((version, until));
        t.0 = t.0.max(version);
        t.1 = t.1.max(until);
    }

    /// Whether a copy at `version` is refused by a deletion. The deletion
    /// wins a tie: a copy at its version is a write that raced it.
    fn buried(&self, id: &SessionId, version: u64) -> bool {
        self.tombs.get(id).is_some_and(|(v, _)| *v >= version)
    }
}

/// A node's sessions: what it owns and what it backs up, by segment.
pub struct Store {
    segs: Vec<Segment>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            segs: (0..SEGMENTS).map(|_| Segment::default()).collect(),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, b) = self.stats();
        f.debug_struct("Store")
            .field("sessions", &n)
            .field("bytes", &b)
            .finish()
    }
}

/// Why an owner's write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The ID is taken (or was deleted).
    Collision,
    /// The session would exceed the size limit.
    TooLarge(usize),
    /// A condition of the delta does not hold (another request changed
    /// the attribute).
    Conflict,
}

impl Store {
    fn seg(&self, id: &SessionId) -> &Segment {
        &self.segs[usize::from(placement::segment(id))]
    }

    fn seg_mut(&mut self, id: &SessionId) -> &mut Segment {
        &mut self.segs[usize::from(placement::segment(id))]
    }

    /// The live session `id` at `now`.
    pub fn get(&self, id: &SessionId, now: Timestamp) -> Option<Record> {
        self.seg(id)
            .live
            .get(id)
            .filter(|s| !s.is_expired(now))
            .map(|s| s.to_record(*id))
    }

    /// The version held of `id`, live or not.
    pub fn version(&self, id: &SessionId) -> Option<u64> {
        self.seg(id).live.get(id).map(|s| s.version)
    }

    /// The version and stamp held of `id`, live or not.
    pub fn state(&self, id: &SessionId) -> Option<(u64, u64)> {
        self.seg(id).live.get(id).map(|s| (s.version, s.stamp))
    }

    /// Owner: a load at `load.now`, recording the access lazily. Returns
    /// the session and whether its access time moved (to be replicated).
    pub fn load(&mut self, id: &SessionId, load: Load) -> Option<(Record, bool)> {
        let seg = self.seg_mut(id);
        let s = seg.live.get_mut(id).filter(|s| !s.is_expired(load.now))?;
        let threshold = load.threshold_ms(s.idle_ms);
        let refresh =
            threshold.is_some_and(|t| load.now.since(s.last_access).as_millis() >= u128::from(t));
        if refresh {
            s.last_access = load.now;
        }
        Some((s.to_record(*id), refresh))
    }

    /// Owner: creates `record` (its write named `stamp`) unless a live
    /// session or a deletion has its ID.
    pub fn create(&mut self, record: &Record, stamp: u64, max_size: usize) -> Result<(), Refused> {
        let size = record.size();
        if size > max_size {
            return Err(Refused::TooLarge(size));
        }
        let now = record.last_access;
        let seg = self.seg_mut(&record.id);
        if seg.live.get(&record.id).is_some_and(|s| !s.is_expired(now))
            || seg.buried(&record.id, record.version)
        {
            return Err(Refused::Collision);
        }
        seg.insert(record.id, Stored::from_record(record.clone(), stamp));
        Ok(())
    }

    /// Owner: applies a client's delta as the write named `stamp`; the new
    /// version (the session is not copied out: the owner needs only that),
    /// or `None` if there is no live session.
    pub fn apply(
        &mut self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
        stamp: u64,
        max_size: usize,
    ) -> Result<Option<u64>, Refused> {
        let seg = self.seg_mut(id);
        let Some(s) = seg.live.get(id).filter(|s| !s.is_expired(now)) else {
            return Ok(None);
        };
        if !s.meets(delta) {
            return Err(Refused::Conflict);
        }
        let size = s.size_after(delta);
        if size > max_size {
            return Err(Refused::TooLarge(size));
        }
        Ok(seg.update(id, |s| {
            s.apply(delta, now, stamp);
            s.version
        }))
    }

    /// Owner: deletes `id` at `now`, remembering the deletion at least
    /// `min_keep` or as long as the session could have lived. Returns the
    /// deletion and whether a live session was deleted.
    pub fn delete(
        &mut self,
        id: &SessionId,
        now: Timestamp,
        min_keep: std::time::Duration,
    ) -> (Tombstone, bool) {
        let seg = self.seg_mut(id);
        let old = seg.remove(id);
        let until = old.as_ref().map_or(now.plus(min_keep), |s| {
            s.expires_at().max(now.plus(min_keep))
        });
        let version = old.as_ref().map_or(1, |s| s.version + 1);
        seg.tombstone(*id, version, until);
        let (version, until) = seg.tombs[id];
        let existed = old.is_some_and(|s| !s.is_expired(now));
        (
            Tombstone {
                id: *id,
                version,
                until,
            },
            existed,
        )
    }

    /// Installs a copy unless this node has a newer version, or the same
    /// version that wins against it, or a deletion refuses it. Returns
    /// whether it was installed.
    pub fn put(&mut self, copy: Stamped) -> bool {
        let Stamped { record, stamp } = copy;
        let id = record.id;
        let seg = self.seg_mut(&id);
        if seg.buried(&id, record.version) {
            return false;
        }
        match seg.live.get(&id) {
            Some(have) if have.version > record.version => false,
            Some(have) if have.version == record.version && have.stamp == stamp => {
                // The same write: only the access time may have moved on.
                seg.update(&id, |s| {
                    s.last_access = s.last_access.max(record.last_access)
                });
                false
            }
            // Equal versions with different stamps: two histories (the
            // last write of a dead owner raced its successor, or a
            // partition). Every holder keeps the same one.
            Some(have)
                if have.version == record.version
                    && !wins((record.last_access, stamp), (have.last_access, have.stamp)) =>
            {
                false
            }
            _ => {
                seg.insert(id, Stored::from_record(record, stamp));
                true
            }
        }
    }

    /// Applies a delta the owner applied to version `base` as the write
    /// named `stamp`.
    pub fn apply_replicated(
        &mut self,
        id: &SessionId,
        base: u64,
        delta: &Delta,
        now: Timestamp,
        stamp: u64,
    ) -> Replicated {
        let seg = self.seg_mut(id);
        match seg.live.get(id).map(|s| (s.version, s.stamp)) {
            Some((v, _)) if v == base => {
                seg.update(id, |s| s.apply(delta, now, stamp));
                Replicated::Held
            }
            Some((v, s)) if v == base + 1 && s == stamp => Replicated::Held,
            Some((v, _)) if v > base => Replicated::Conflict,
            // Deleted here: the sender wrote on a copy that missed it.
            _ if seg.buried(id, base + 1) => Replicated::Conflict,
            _ => Replicated::Gap,
        }
    }

    /// Takes a full copy from its owner: whether this node now holds that
    /// very write (installed, or already here), is past it with a deletion,
    /// or holds another history.
    pub fn accept(&mut self, copy: Stamped) -> Replicated {
        let (id, version, stamp) = (copy.record.id, copy.record.version, copy.stamp);
        if self.put(copy) || self.state(&id) == Some((version, stamp)) {
            return Replicated::Held;
        }
        Replicated::Conflict
    }

    /// Records an access seen by the owner (no version change).
    pub fn touch(&mut self, id: &SessionId, last_access: Timestamp) {
        if let Some(s) = self.seg_mut(id).live.get_mut(id) {
            s.last_access = s.last_access.max(last_access);
        }
    }

    /// Installs a deletion, unless this node holds a later write of the
    /// session (another history: returns `false`, nothing changes).
    pub fn bury(&mut self, t: Tombstone) -> bool {
        let seg = self.seg_mut(&t.id);
        match seg.live.get(&t.id).map(|s| s.version) {
            Some(v) if v > t.version => return false,
            Some(_) => {
                seg.remove(&t.id);
            }
            None => {}
        }
        seg.tombstone(t.id, t.version, t.until);
        true
    }

    /// What this node knows of `id` (for a read-through).
    pub fn known(&self, id: &SessionId) -> Known {
        let seg = self.seg(id);
        if let Some(s) = seg.live.get(id) {
            return Known::Live(s.stamped(*id));
        }
        match seg.tombs.get(id) {
            Some((version, until)) => Known::Deleted(Tombstone {
                id: *id,
                version: *version,
                until: *until,
            }),
            None => Known::Absent,
        }
    }

    /// Takes in what a peer knows of a session.
    pub fn learn(&mut self, known: Known) {
        match known {
            Known::Absent => {}
            Known::Live(r) => {
                self.put(r);
            }
            Known::Deleted(t) => {
                self.bury(t);
            }
        }
    }

    /// Drops every session expired at `now` and every deletion past its
    /// time, in segments `from..to`; returns how many sessions.
    pub fn sweep(&mut self, now: Timestamp, from: u16, to: u16) -> usize {
        let mut n = 0;
        for seg in &mut self.segs[usize::from(from)..usize::from(to)] {
            let expired: Vec<SessionId> = seg
                .live
                .iter()
                .filter(|(_, s)| s.is_expired(now))
                .map(|(id, _)| *id)
                .collect();
            for id in &expired {
                seg.remove(id);
            }
            n += expired.len();
            seg.tombs.retain(|_, (_, until)| *until > now);
        }
        n
    }

    /// The digest of segment `seg`.
    pub fn digest(&self, seg: u16) -> u64 {
        self.segs[usize::from(seg)].digest
    }

    /// Whether this node holds anything of segment `seg`.
    pub fn holds(&self, seg: u16) -> bool {
        let s = &self.segs[usize::from(seg)];
        !s.live.is_empty() || !s.tombs.is_empty()
    }

    /// Sessions held in segment `seg`.
    pub fn count(&self, seg: u16) -> usize {
        self.segs[usize::from(seg)].live.len()
    }

    /// The deletions of segment `seg`, by ID.
    pub fn tombstones(&self, seg: u16) -> Vec<Tombstone> {
        let s = &self.segs[usize::from(seg)];
        let mut tombs: Vec<Tombstone> = s
            .tombs
            .iter()
            .map(|(id, (version, until))| Tombstone {
                id: *id,
                version: *version,
                until: *until,
            })
            .collect();
        tombs.sort_unstable_by_key(|t| t.id);
        tombs
    }

    /// Sessions of segment `seg` with IDs after `after`, in ID order, until
    /// about `budget` bytes (at least one); and the last ID taken when more
    /// remain. Resuming by ID, not position, cannot skip a session when the
    /// segment changes between two chunks.
    pub fn chunk(
        &self,
        seg: u16,
        after: Option<SessionId>,
        budget: usize,
    ) -> (Vec<Stamped>, Option<SessionId>) {
        let s = &self.segs[usize::from(seg)];
        let mut ids: Vec<&SessionId> = s
            .live
            .keys()
            .filter(|id| after.is_none_or(|a| **id > a))
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        let mut bytes = 0;
        for (i, id) in ids.iter().enumerate() {
            if i > 0 && bytes >= budget {
                return (out, Some(*ids[i - 1]));
            }
            let x = &s.live[*id];
            bytes += x.size() + 160;
            out.push(x.stamped(**id));
        }
        (out, None)
    }

    /// Forgets segment `seg` (handed off to the nodes that hold it now).
    pub fn drop_segment(&mut self, seg: u16) -> usize {
        let s = std::mem::take(&mut self.segs[usize::from(seg)]);
        s.live.len()
    }

    /// Sessions held and their attribute bytes, in segments `which` selects.
    pub fn stats_where(&self, mut which: impl FnMut(u16) -> bool) -> (usize, usize) {
        // Records at derived IDs (users' session indexes) are the store's
        // own bookkeeping, not sessions: not counted.
        (0..SEGMENTS)
            .filter(|s| which(*s))
            .map(|s| &self.segs[usize::from(s)])
            .fold((0, 0), |(n, b), s| {
                let sessions = s.live.keys().filter(|id| !id.is_derived()).count();
                (n + sessions, b + s.bytes)
            })
    }

    /// Sessions held (not counting the store's own records) and the
    /// attribute bytes of everything held.
    pub fn stats(&self) -> (usize, usize) {
        self.stats_where(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_core::testing::{json, record_with};

    fn delta(k: &str, v: &str) -> Delta {
        let mut d = Delta::default();
        d.set(k, json(v));
        d
    }

    fn copy(record: Record, stamp: u64) -> Stamped {
        Stamped { record, stamp }
    }

    #[test]
    fn stored_sessions_apply_deltas_exactly_as_records_do() {
        let now = Timestamp(1_000_000);
        let mut r = record_with(now, &[("b", "1"), ("a", "\"x\"")]);
        let mut store = Store::default();
        store.put(copy(r.clone(), 1));
        let mut d = delta("c", "[1]");
        d.remove("b").set("a", json("2"));
        let later = Timestamp(now.0 + 5);
        let got = store.apply(&r.id, &d, later, 2, 1 << 20).unwrap().unwrap();
        r.apply(&d, later);
        assert_eq!(got, r.version);
        assert_eq!(store.get(&r.id, later), Some(r.clone()));
        let clear = Delta {
            clear: true,
            ..Delta::default()
        };
        let got = store
            .apply(&r.id, &clear, later, 3, 1 << 20)
            .unwrap()
            .unwrap();
        r.apply(&clear, later);
        assert_eq!(got, r.version);
        assert_eq!(store.get(&r.id, later), Some(r.clone()));
        assert_eq!(store.stats(), (1, 0));
        assert_eq!(store.state(&r.id), Some((3, 3)));
    }

    #[test]
    fn a_write_applies_once_and_its_duplicate_is_recognised() {
        let now = Timestamp::now();
        let owner_copy = record_with(now, &[("a", "1")]);
        let mut backup = Store::default();
        assert!(backup.put(copy(owner_copy.clone(), 7)));
        let id = owner_copy.id;
        assert_eq!(
            backup.apply_replicated(&id, 1, &delta("b", "2"), now, 8),
            Replicated::Held
        );
        // The same message again (a retry) is the same write.
        assert_eq!(
            backup.apply_replicated(&id, 1, &delta("b", "2"), now, 8),
            Replicated::Held
        );
        assert_eq!(backup.version(&id), Some(2));
        // Another write on the same base is another history.
        assert_eq!(
            backup.apply_replicated(&id, 1, &delta("c", "3"), now, 9),
            Replicated::Conflict
        );
        assert_eq!(backup.state(&id), Some((2, 8)));
    }

    #[test]
    fn a_missed_delta_is_a_gap_that_a_full_record_repairs() {
        let now = Timestamp::now();
        let mut owner = Store::default();
        let mut backup = Store::default();
        let r = record_with(now, &[("a", "1")]);
        owner.put(copy(r.clone(), 1));
        backup.put(copy(r.clone(), 1));
        owner
            .apply(&r.id, &delta("x", "1"), now, 2, 1 << 20)
            .unwrap();
        owner
            .apply(&r.id, &delta("y", "2"), now, 3, 1 << 20)
            .unwrap();
        assert_eq!(
            backup.apply_replicated(&r.id, 2, &delta("y", "2"), now, 3),
            Replicated::Gap
        );
        let Known::Live(full) = owner.known(&r.id) else {
            panic!("live")
        };
        assert_eq!(backup.accept(full.clone()), Replicated::Held);
        assert_eq!(backup.get(&r.id, now), owner.get(&r.id, now));
        assert_eq!(
            backup.digest(placement::segment(&r.id)),
            owner.digest(placement::segment(&r.id))
        );
        // An older copy arriving late does not roll it back, and is not
        // this node's history either.
        assert!(!backup.put(copy(r.clone(), 1)));
        assert_eq!(backup.accept(copy(r.clone(), 1)), Replicated::Conflict);
        assert_eq!(backup.version(&r.id), Some(3));
        // The same copy again is held.
        assert_eq!(backup.accept(full), Replicated::Held);
    }

    #[test]
    fn two_histories_at_one_version_converge_on_one_copy_everywhere() {
        let now = Timestamp::now();
        let base = record_with(now, &[("a", "1")]);
        let mut left = base.clone();
        left.apply(&delta("side", "1"), Timestamp(now.0 + 1));
        let mut right = base.clone();
        right.apply(&delta("side", "2"), Timestamp(now.0 + 1));
        let (l, r) = (copy(left, 10), copy(right, 20));
        let mut x = Store::default();
        let mut y = Store::default();
        x.put(l.clone());
        y.put(r.clone());
        let seg = placement::segment(&base.id);
        assert_ne!(x.digest(seg), y.digest(seg), "digests see the difference");
        x.put(r.clone());
        y.put(l.clone());
        assert_eq!(x.state(&base.id), y.state(&base.id));
        assert_eq!(x.digest(seg), y.digest(seg));
    }

    #[test]
    fn a_deleted_session_is_not_revived_by_a_late_copy_or_delta() {
        let now = Timestamp::now();
        let mut owner = Store::default();
        let r = record_with(now, &[("a", "1")]);
        owner.put(copy(r.clone(), 1));
        let (t, existed) = owner.delete(&r.id, now, Duration::from_secs(60));
        assert!(existed);
        assert_eq!(t.version, 2);
        assert!(!owner.put(copy(r.clone(), 1)));
        assert_eq!(
            owner.apply_replicated(&r.id, 1, &delta("b", "1"), now, 5),
            Replicated::Conflict
        );
        assert!(owner.get(&r.id, now).is_none());
        let mut backup = Store::default();
        backup.put(copy(r.clone(), 1));
        assert!(backup.bury(t));
        assert!(backup.get(&r.id, now).is_none());
        assert!(matches!(backup.known(&r.id), Known::Deleted(x) if x == t));
        // A later write than the deletion is another history: kept.
        let mut later = r.clone();
        later.version = 5;
        let mut other = Store::default();
        other.put(copy(later, 9));
        assert!(!other.bury(t));
        assert_eq!(other.version(&r.id), Some(5));
        // The deletion is forgotten after its time.
        backup.sweep(Timestamp(t.until.0 + 1), 0, SEGMENTS);
        assert!(matches!(backup.known(&r.id), Known::Absent));
    }

    #[test]
    fn digests_follow_versions_not_history() {
        let now = Timestamp::now();
        let (mut a, mut b) = (Store::default(), Store::default());
        let r = record_with(now, &[("a", "1")]);
        let seg = placement::segment(&r.id);
        a.put(copy(r.clone(), 1));
        a.apply(&r.id, &delta("b", "2"), now, 2, 1 << 20).unwrap();
        assert_ne!(a.digest(seg), b.digest(seg));
        let Known::Live(c) = a.known(&r.id) else {
            panic!("live")
        };
        b.put(c);
        assert_eq!(a.digest(seg), b.digest(seg));
        a.delete(&r.id, now, Duration::from_secs(1));
        assert_eq!(a.digest(seg), 0);
    }

    #[test]
    fn touches_never_move_time_backwards() {
        let now = Timestamp::now();
        let mut s = Store::default();
        let rec = record_with(now, &[]);
        s.put(copy(rec.clone(), 1));
        s.touch(&rec.id, Timestamp(now.0 + 10));
        s.touch(&rec.id, Timestamp(now.0 + 5));
        assert_eq!(
            s.get(&rec.id, now).unwrap().last_access,
            Timestamp(now.0 + 10)
        );
    }

    #[test]
    fn sizes_are_checked_before_anything_changes() {
        let now = Timestamp::now();
        let mut s = Store::default();
        let r = record_with(now, &[("a", "1")]);
        s.put(copy(r.clone(), 1));
        let big = delta("b", &format!("\"{}\"", "x".repeat(100)));
        assert!(matches!(
            s.apply(&r.id, &big, now, 2, 50),
            Err(Refused::TooLarge(_))
        ));
        assert_eq!(s.get(&r.id, now), Some(r));
    }
}
