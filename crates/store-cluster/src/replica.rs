//! The sessions one node holds, with version-ordered replication. No I/O:
//! every rule here is exercised step by step in tests.

use std::collections::HashMap;

use tether_core::{Delta, Record, SessionId, Timestamp};

/// What applying a replicated delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// Applied; the session is now at this version.
    Applied(u64),
    /// Already at or past it (a duplicate or a late message): nothing to do.
    Stale,
    /// This node misses versions before it (or the whole session): it needs
    /// the full record.
    Gap,
}

/// Segments of the anti-entropy digest.
pub const SEGMENTS: usize = 64;

/// The segment of a session ID.
pub fn segment(id: &SessionId) -> usize {
    usize::from(id.as_bytes()[0]) % SEGMENTS
}

/// A node's sessions: what it owns and what it backs up.
#[derive(Debug, Default)]
pub struct Replica {
    sessions: HashMap<SessionId, Record>,
    /// Deleted sessions: (version of the deletion, until when to remember
    /// it). A late copy of a deleted session must not bring it back.
    tombstones: HashMap<SessionId, (u64, Timestamp)>,
}

impl Replica {
    /// The live session `id` at `now`.
    pub fn get(&self, id: &SessionId, now: Timestamp) -> Option<&Record> {
        self.sessions.get(id).filter(|r| !r.is_expired(now))
    }

    /// Mutable access to the live session `id` at `now`.
    pub fn get_mut(&mut self, id: &SessionId, now: Timestamp) -> Option<&mut Record> {
        self.sessions.get_mut(id).filter(|r| !r.is_expired(now))
    }

    /// Installs `record` unless this node has the same or a newer version;
    /// returns whether it was installed. Versions make duplicates and
    /// reordered full-record pushes harmless.
    pub fn put(&mut self, record: Record) -> bool {
        if self
            .tombstones
            .get(&record.id)
            .is_some_and(|(v, _)| *v > record.version)
        {
            return false;
        }
        match self.sessions.get(&record.id) {
            Some(have) if have.version > record.version => false,
            Some(have)
                if have.version == record.version && have.last_access >= record.last_access =>
            {
                false
            }
            _ => {
                self.sessions.insert(record.id, record);
                true
            }
        }
    }

    /// Applies a delta the owner applied to version `base`.
    pub fn apply_replicated(
        &mut self,
        id: &SessionId,
        base: u64,
        delta: &Delta,
        now: Timestamp,
    ) -> Replicated {
        match self.sessions.get_mut(id) {
            Some(r) if r.version > base => Replicated::Stale,
            Some(r) if r.version == base => {
                r.apply(delta, now);
                Replicated::Applied(r.version)
            }
            _ => Replicated::Gap,
        }
    }

    /// Records an access seen by the owner (no version change).
    pub fn touch(&mut self, id: &SessionId, last_access: Timestamp) {
        if let Some(r) = self.sessions.get_mut(id) {
            r.last_access = r.last_access.max(last_access);
        }
    }

    /// Removes `id`; returns the record if it was live at `now`.
    pub fn remove(&mut self, id: &SessionId, now: Timestamp) -> Option<Record> {
        self.sessions.remove(id).filter(|r| !r.is_expired(now))
    }

    /// Deletes `id` for good: removes it and remembers the deletion (at
    /// `version`, the deleted version + 1) until `until`, so a late or
    /// re-sent copy cannot revive it. Returns the record if it was live.
    pub fn delete(
        &mut self,
        id: &SessionId,
        version: u64,
        until: Timestamp,
        now: Timestamp,
    ) -> Option<Record> {
        let old = self.sessions.remove(id);
        let version = version.max(old.as_ref().map_or(0, |r| r.version + 1));
        let entry = self.tombstones.entry(*id).or_insert((version, until));
        entry.0 = entry.0.max(version);
        entry.1 = entry.1.max(until);
        old.filter(|r| !r.is_expired(now))
    }

    /// The deletions remembered: (session, version, until).
    pub fn tombstones(&self) -> Vec<(SessionId, u64, Timestamp)> {
        self.tombstones
            .iter()
            .map(|(id, (v, t))| (*id, *v, *t))
            .collect()
    }

    /// Drops every session expired at `now`; returns how many.
    pub fn sweep(&mut self, now: Timestamp) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, r| !r.is_expired(now));
        self.tombstones.retain(|_, (_, until)| *until > now);
        before - self.sessions.len()
    }

    /// Every session held (for re-replication after a membership change).
    pub fn snapshot(&self) -> Vec<Record> {
        self.sessions.values().cloned().collect()
    }

    /// Per-segment digests of the live sessions `select` picks: two nodes
    /// holding the same versions of the same sessions have equal digests.
    pub fn digests(&self, now: Timestamp, select: impl Fn(&SessionId) -> bool) -> Vec<u64> {
        let mut out = vec![0u64; SEGMENTS];
        for r in self.sessions.values() {
            if r.is_expired(now) || !select(&r.id) {
                continue;
            }
            let mut key = [0u8; 24];
            key[..16].copy_from_slice(r.id.as_bytes());
            key[16..].copy_from_slice(&r.version.to_le_bytes());
            out[segment(&r.id)] =
                out[segment(&r.id)].wrapping_add(tether_core::placement::stable_hash(&key));
        }
        out
    }

    /// The live sessions of `segments` that `select` picks (to repair them).
    pub fn in_segments(
        &self,
        now: Timestamp,
        segments: &[u8],
        select: impl Fn(&SessionId) -> bool,
    ) -> Vec<Record> {
        self.sessions
            .values()
            .filter(|r| !r.is_expired(now) && select(&r.id))
            .filter(|r| segments.iter().any(|s| usize::from(*s) == segment(&r.id)))
            .cloned()
            .collect()
    }

    /// Sessions held and their attribute bytes.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.sessions.len(),
            self.sessions.values().map(Record::size).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_core::testing::{json, record_with};

    fn delta(k: &str, v: &str) -> Delta {
        let mut d = Delta::default();
        d.set(k, json(v));
        d
    }

    #[test]
    fn deltas_apply_in_order_and_duplicates_are_harmless() {
        let now = Timestamp::now();
        let owner_copy = record_with(now, &[("a", "1")]);
        let mut backup = Replica::default();
        assert!(backup.put(owner_copy.clone()));
        assert_eq!(
            backup.apply_replicated(&owner_copy.id, 1, &delta("b", "2"), now),
            Replicated::Applied(2)
        );
        // The same message again (a retry) changes nothing.
        assert_eq!(
            backup.apply_replicated(&owner_copy.id, 1, &delta("b", "2"), now),
            Replicated::Stale
        );
        assert_eq!(backup.get(&owner_copy.id, now).unwrap().version, 2);
    }

    #[test]
    fn a_missed_delta_is_a_gap_that_a_full_record_repairs() {
        let now = Timestamp::now();
        let mut owner = Replica::default();
        let mut backup = Replica::default();
        let r = record_with(now, &[("a", "1")]);
        owner.put(r.clone());
        backup.put(r.clone());
        // Versions 2 and 3 happen on the owner; the backup only gets 3's delta.
        owner
            .get_mut(&r.id, now)
            .unwrap()
            .apply(&delta("x", "1"), now);
        owner
            .get_mut(&r.id, now)
            .unwrap()
            .apply(&delta("y", "2"), now);
        assert_eq!(
            backup.apply_replicated(&r.id, 2, &delta("y", "2"), now),
            Replicated::Gap
        );
        // The owner answers a gap with the whole record.
        assert!(backup.put(owner.get(&r.id, now).unwrap().clone()));
        assert_eq!(backup.get(&r.id, now), owner.get(&r.id, now));
        // An older full record arriving late does not roll it back.
        assert!(!backup.put(r));
        assert_eq!(backup.get(&owner.snapshot()[0].id, now).unwrap().version, 3);
    }

    #[test]
    fn a_delta_for_an_unknown_session_is_a_gap() {
        let now = Timestamp::now();
        let mut backup = Replica::default();
        let id = SessionId::random();
        assert_eq!(
            backup.apply_replicated(&id, 1, &delta("a", "1"), now),
            Replicated::Gap
        );
        assert!(backup.get(&id, now).is_none());
    }

    #[test]
    fn a_deleted_session_is_not_revived_by_a_late_copy() {
        let now = Timestamp::now();
        let mut backup = Replica::default();
        let r = record_with(now, &[("a", "1")]);
        backup.put(r.clone());
        let until = Timestamp(now.0 + 60_000);
        assert!(backup.delete(&r.id, r.version + 1, until, now).is_some());
        // A rebalance pushes the copy it took before the delete.
        assert!(!backup.put(r.clone()));
        assert!(backup.get(&r.id, now).is_none());
        // The tombstone is forgotten after its time.
        backup.sweep(Timestamp(until.0 + 1));
        assert!(backup.tombstones().is_empty());
    }

    #[test]
    fn touches_never_move_time_backwards() {
        let now = Timestamp::now();
        let mut r = Replica::default();
        let rec = record_with(now, &[]);
        r.put(rec.clone());
        r.touch(&rec.id, Timestamp(now.0 + 10));
        r.touch(&rec.id, Timestamp(now.0 + 5));
        assert_eq!(
            r.get(&rec.id, now).unwrap().last_access,
            Timestamp(now.0 + 10)
        );
    }
}
