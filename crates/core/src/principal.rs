//! A user's sessions: the per-principal index, kept in the store itself.
//!
//! A session names its principal (the logged-in user) in the attribute
//! [`PRINCIPAL`]. For each principal the store holds one more record, at a
//! [`SessionId::derived`] ID (which no client can address): its members are
//! the principal's sessions, each with when it joined, when it may expire
//! (a hint the owner refreshes as the session's expiry slides) and what the
//! app recorded about its device. Because the index is an ordinary record
//! written through [`SessionStore`], every store gets it with the same
//! guarantees as sessions: atomic conditional writes ([`Delta::expect`]),
//! replication and state transfer in the replicated store, failover on
//! Redis; on Redis Cluster it lives in the principal's own slot.
//!
//! - **Admission** ([`PrincipalIndex::admit`]) adds a session and enforces a
//!   limit of sessions per principal, refusing the new one or evicting the
//!   longest-standing ones. It is a compare-and-set on the index's change
//!   counter: two logins racing for the last slot cannot both win.
//! - **Expiry without leaks.** The index record's own expiry is kept beyond
//!   its members' hints, so when every session of a principal has expired
//!   the index goes too, by the store's ordinary expiry. The reaper
//!   ([`PrincipalIndex::reap`]) finds members whose sessions are gone
//!   without a logout, reports them once as expired (leased: a reaper that
//!   dies before reporting leaves them to the next one, so at least once)
//!   and drops them. A directory of principals, sharded over
//!   [`DIRECTORY_SHARDS`] records, tells the reaper where to look.
//!
//! The index is written before the session at a login (a reservation) and
//! after it at a logout; a member whose session never came to be, or is
//! gone, is skipped by [`PrincipalIndex::sessions`] and dropped by the
//! reaper.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Delta, Expiry, Load, Record, SessionId, SessionStore, StoreError, Timestamp};

/// The attribute naming a session's principal (a JSON string).
pub const PRINCIPAL: &str = "tether.principal";

/// Attributes describing a session's device, recorded by the app or the
/// layer at login (JSON strings) and shown in a user's session list.
pub const DEVICE: [&str; 3] = ["tether.user_agent", "tether.address", "tether.node"];

/// How many records the directory of principals is spread over.
pub const DIRECTORY_SHARDS: u32 = 64;

/// How long after its last member's expiry hint an index record lives:
/// time for a reaper to report the expiries.
const MARGIN_MS: u64 = 10 * 60 * 1000;

/// How long a reaper holds an expired member before another may report it.
const LEASE_MS: u64 = 30_000;

/// Compare-and-set retries before giving up (each after a re-read).
const TRIES: u32 = 32;

/// What to do when a principal already has as many sessions as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitPolicy {
    /// Refuse the new session ([`StoreError::LimitReached`]).
    Refuse,
    /// End the sessions that joined longest ago to make room.
    EvictOldest,
}

impl std::str::FromStr for LimitPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "evict-oldest" => Ok(Self::EvictOldest),
            other => Err(format!(
                "unknown policy {other:?}: use refuse or evict-oldest"
            )),
        }
    }
}

/// At most `max` sessions per principal, and what happens beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimit {
    /// Sessions allowed per principal (at least 1).
    pub max: usize,
    /// What a login beyond `max` does.
    pub policy: LimitPolicy,
}

/// One session in a principal's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// When it joined the index (logged in), ms.
    #[serde(rename = "j")]
    pub joined: u64,
    /// When it may expire, as last known, ms.
    #[serde(rename = "e")]
    pub expires: u64,
    /// What the app recorded about its device (user agent, address, node).
    #[serde(rename = "d", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device: BTreeMap<String, String>,
    /// Held by a reaper until then, ms (0: not held).
    #[serde(rename = "l", default, skip_serializing_if = "is_zero")]
    pub lease: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A session of a principal, as [`PrincipalIndex::sessions`] lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The session's ID (never shown to users: see [`SessionId::reference`]).
    pub id: SessionId,
    /// Its index entry.
    pub member: Member,
    /// The session itself, when the store holds it (server-side stores).
    pub record: Option<Record>,
}

/// A session the reaper found expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Whose it was.
    pub principal: String,
    /// Which.
    pub id: SessionId,
}

/// How the index sees the sessions it lists: whether one still exists, and
/// how to end one. For server-side stores a load and a delete of the
/// session ([`InStore`]); for tokens a look at, and a write to, the
/// deny-list.
#[async_trait::async_trait]
pub trait Sessions: Send + Sync {
    /// The session `id` if it is live at `now` (`Ok(None)`: gone), and its
    /// record when there is one.
    async fn live(
        &self,
        principal: &str,
        id: &SessionId,
        member: &Member,
        now: Timestamp,
    ) -> Result<Option<Option<Record>>, StoreError>;

    /// Ends session `id` of `principal` (eviction, revocation).
    async fn end(
        &self,
        principal: &str,
        id: &SessionId,
        member: &Member,
        now: Timestamp,
    ) -> Result<(), StoreError>;
}

/// Sessions are records in `store`: live while the store holds them.
pub struct InStore(pub Arc<dyn SessionStore>);

#[async_trait::async_trait]
impl Sessions for InStore {
    async fn live(
        &self,
        _: &str,
        id: &SessionId,
        _: &Member,
        now: Timestamp,
    ) -> Result<Option<Option<Record>>, StoreError> {
        Ok(self.0.load(id, Load::at(now)).await?.map(Some))
    }

    async fn end(
        &self,
        _: &str,
        id: &SessionId,
        _: &Member,
        _: Timestamp,
    ) -> Result<(), StoreError> {
        self.0.delete(id).await.map(|_| ())
    }
}

/// The index of every principal's sessions, in `store`.
#[derive(Clone)]
pub struct PrincipalIndex {
    store: Arc<dyn SessionStore>,
    namespace: Arc<str>,
}

impl std::fmt::Debug for PrincipalIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalIndex").finish_non_exhaustive()
    }
}

fn shard_of(principal: &str) -> u32 {
    let b = SessionId::derived("principal-shard", principal);
    u32::from(b.as_bytes()[0]) % DIRECTORY_SHARDS
}

fn member_key(id: &SessionId) -> String {
    format!("s:{id}")
}

fn json<T: Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("plain data serialises")
}

/// An index record as read: its change counter and members.
struct Snapshot {
    exists: bool,
    counter: Option<Box<RawValue>>,
    members: BTreeMap<SessionId, Member>,
}

impl Snapshot {
    fn of(record: Option<Record>) -> Self {
        let Some(r) = record else {
            return Self {
                exists: false,
                counter: None,
                members: BTreeMap::new(),
            };
        };
        let mut members = BTreeMap::new();
        for (k, v) in &r.attributes {
            let Some(id) = k.strip_prefix("s:").and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Ok(m) = serde_json::from_str::<Member>(v.get()) {
                members.insert(id, m);
            }
        }
        Self {
            exists: true,
            counter: r.attributes.get("n").cloned(),
            members,
        }
    }

    fn next_counter(&self) -> u64 {
        self.counter
            .as_ref()
            .and_then(|c| c.get().parse::<u64>().ok())
            .unwrap_or(0)
            + 1
    }
}

/// The delta making a record live until `until` (at least), written at `now`.
fn live_until(delta: &mut Delta, until: u64, now: Timestamp) {
    delta.idle_ms = Some(until.saturating_sub(now.0).max(1));
}

impl PrincipalIndex {
    /// The index kept in `store` (usually the sessions' own store).
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Self {
            store,
            namespace: "".into(),
        }
    }

    /// Keeps this index apart from others in the same store (several apps
    /// sharing one Redis, tests): the index records are named within
    /// `namespace`.
    #[must_use]
    pub fn with_namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    fn index_id(&self, principal: &str) -> SessionId {
        SessionId::derived("principal", &format!("{}\0{principal}", self.namespace))
    }

    fn shard_id(&self, shard: u32) -> SessionId {
        SessionId::derived("principals", &format!("{}\0{shard}", self.namespace))
    }

    /// Every member of `principal`'s index as stored, dead ones and leased
    /// ones included (for operators and tests; users see
    /// [`PrincipalIndex::sessions`]).
    ///
    /// # Errors
    /// Store errors.
    pub async fn members(
        &self,
        principal: &str,
        now: Timestamp,
    ) -> Result<Vec<(SessionId, Member)>, StoreError> {
        Ok(self
            .snapshot(&self.index_id(principal), now)
            .await?
            .members
            .into_iter()
            .collect())
    }

    /// Lets index record `id` expire at once if it holds nothing (no
    /// members, no principals): an emptied index leaves no key behind.
    async fn retire_if_empty(&self, id: SessionId, now: Timestamp) -> Result<(), StoreError> {
        let Some(record) = self.store.load(&id, Load::at(now)).await? else {
            return Ok(());
        };
        if record
            .attributes
            .keys()
            .any(|k| k.starts_with("s:") || k.starts_with("p:"))
        {
            return Ok(());
        }
        let snap = Snapshot::of(Some(record));
        let mut delta = Delta::default();
        delta.set("n", json(&snap.next_counter()));
        delta.expect("n", snap.counter.clone());
        delta.idle_ms = Some(1);
        match self.store.apply(&id, &delta, now).await {
            Ok(_) | Err(StoreError::Conflict) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The store the index lives in.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    async fn snapshot(&self, id: &SessionId, now: Timestamp) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::of(self.store.load(id, Load::at(now)).await?))
    }

    /// Writes `delta` to index record `id` as read in `snap`: conditional on
    /// its change counter, creating it if it did not exist. `Ok(false)`:
    /// another writer was first, read again.
    async fn commit(
        &self,
        id: SessionId,
        snap: &Snapshot,
        mut delta: Delta,
        keep_until: u64,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let next = snap.next_counter();
        delta.set("n", json(&next));
        let latest = snap
            .members
            .values()
            .map(|m| m.expires)
            .max()
            .unwrap_or(0)
            .max(keep_until);
        let until = latest.saturating_add(MARGIN_MS);
        if !snap.exists {
            let mut record = Record::new(
                id,
                now,
                Expiry {
                    idle: Duration::from_millis(until.saturating_sub(now.0).max(1)),
                    absolute: None,
                },
            );
            record.insert_sets(&delta);
            return match self.store.create(&record).await {
                Ok(()) => Ok(true),
                Err(StoreError::Collision) => Ok(false),
                Err(e) => Err(e),
            };
        }
        delta.expect("n", snap.counter.clone());
        live_until(&mut delta, until, now);
        match self.store.apply(&id, &delta, now).await {
            Ok(Some(_)) => Ok(true),
            // Gone meanwhile (expired), or changed: read again.
            Ok(None) | Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs `change` on principal `principal`'s index until its write wins.
    async fn update<T>(
        &self,
        index: SessionId,
        now: Timestamp,
        mut change: impl FnMut(&Snapshot) -> Result<Option<(Delta, u64, T)>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        for attempt in 0..TRIES {
            let snap = self.snapshot(&index, now).await?;
            let Some((delta, keep_until, out)) = change(&snap)? else {
                return Ok(None);
            };
            if self.commit(index, &snap, delta, keep_until, now).await? {
                return Ok(Some(out));
            }
            tokio_free_backoff(attempt).await;
        }
        Err(StoreError::Unavailable(
            "a user's session index kept changing under this write".into(),
        ))
    }

    /// Adds session `id` of `principal` (at a login), within `limit`.
    /// Returns the sessions evicted (ended through `sessions`, after the
    /// index write that won) to make room, for the caller to report.
    ///
    /// # Errors
    /// [`StoreError::LimitReached`] when the principal has `limit.max`
    /// live sessions and the policy is [`LimitPolicy::Refuse`]; store errors.
    pub async fn admit(
        &self,
        principal: &str,
        id: &SessionId,
        member: Member,
        limit: Option<SessionLimit>,
        sessions: &dyn Sessions,
        now: Timestamp,
    ) -> Result<Vec<SessionId>, StoreError> {
        let index = self.index_id(principal);
        let mut verified: BTreeMap<SessionId, bool> = BTreeMap::new();
        for attempt in 0..TRIES {
            let snap = self.snapshot(&index, now).await?;
            let mut others: Vec<(SessionId, &Member)> = snap
                .members
                .iter()
                .filter(|(m, _)| *m != id)
                .map(|(m, v)| (*m, v))
                .collect();
            let mut delta = Delta::default();
            delta.set(PRINCIPAL, json(&principal));
            delta.set(member_key(id), json(&member));
            let mut evict: Vec<(SessionId, Member)> = Vec::new();
            if let Some(limit) = limit {
                if others.len() >= limit.max {
                    // Count only sessions that still exist: a member whose
                    // session expired or never came to be holds no slot.
                    for (m, entry) in &others {
                        if let std::collections::btree_map::Entry::Vacant(v) = verified.entry(*m) {
                            let live = entry.expires > now.0
                                && sessions.live(principal, m, entry, now).await?.is_some();
                            v.insert(live);
                        }
                    }
                    others.retain(|(m, _)| verified.get(m).copied().unwrap_or(true));
                }
                if others.len() >= limit.max {
                    if limit.policy == LimitPolicy::Refuse {
                        return Err(StoreError::LimitReached { max: limit.max });
                    }
                    others.sort_by_key(|(m, e)| (e.joined, *m));
                    let excess = others.len() + 1 - limit.max.max(1);
                    for (m, entry) in others.iter().take(excess) {
                        evict.push((*m, (*entry).clone()));
                        delta.remove(member_key(m));
                    }
                }
            }
            let first = snap.members.is_empty();
            if !self
                .commit(index, &snap, delta, member.expires, now)
                .await?
            {
                tokio_free_backoff(attempt).await;
                continue;
            }
            if first {
                self.enlist(principal, member.expires, now).await?;
            }
            // Only the admission whose write won ends sessions, so racing
            // logins never end more than the limit asks. If ending fails,
            // the session goes back in the index (it must stay revocable)
            // and the login fails.
            let mut ended = Vec::new();
            for (m, entry) in evict {
                if let Err(e) = sessions.end(principal, &m, &entry, now).await {
                    let mut back = Delta::default();
                    back.set(member_key(&m), json(&entry));
                    let _ = self.store.apply(&index, &back, now).await;
                    return Err(e);
                }
                ended.push(m);
            }
            return Ok(ended);
        }
        Err(StoreError::Unavailable(
            "a user's session index kept changing under this login".into(),
        ))
    }

    /// Puts `principal` in its directory shard, so the reaper looks at it.
    async fn enlist(
        &self,
        principal: &str,
        expires: u64,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let key = format!("p:{principal}");
        self.update(self.shard_id(shard_of(principal)), now, |_| {
            let mut delta = Delta::default();
            delta.set(key.clone(), json(&expires));
            Ok(Some((delta, expires, ())))
        })
        .await
        .map(|_| ())
    }

    /// Removes session `id` from `principal`'s index (logout, revocation).
    ///
    /// # Errors
    /// Store errors.
    pub async fn remove(
        &self,
        principal: &str,
        ids: &[SessionId],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut delta = Delta::default();
        for id in ids {
            delta.remove(member_key(id));
        }
        // A plain write: removing is idempotent and commutes with
        // admissions (which write other members).
        self.store
            .apply(&self.index_id(principal), &delta, now)
            .await
            .map(|_| ())
    }

    /// Replaces `old` with `new` in `principal`'s index (the session's ID
    /// was rotated), keeping its entry.
    ///
    /// # Errors
    /// Store errors.
    pub async fn rename(
        &self,
        principal: &str,
        old: &SessionId,
        new: &SessionId,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let (old, new) = (*old, *new);
        self.update(self.index_id(principal), now, move |snap| {
            let Some(entry) = snap.members.get(&old) else {
                return Ok(None);
            };
            let mut delta = Delta::default();
            delta.remove(member_key(&old));
            delta.set(member_key(&new), json(entry));
            Ok(Some((delta, entry.expires, ())))
        })
        .await
        .map(|_| ())
    }

    /// Records that session `id` now lives until `expires` (its expiry
    /// slid), so the index outlives it.
    ///
    /// # Errors
    /// Store errors.
    pub async fn extend(
        &self,
        principal: &str,
        id: &SessionId,
        expires: u64,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let id = *id;
        self.update(self.index_id(principal), now, move |snap| {
            let Some(entry) = snap.members.get(&id) else {
                return Ok(None);
            };
            if entry.expires >= expires {
                return Ok(None);
            }
            let mut entry = entry.clone();
            entry.expires = expires;
            let mut delta = Delta::default();
            delta.set(member_key(&id), json(&entry));
            Ok(Some((delta, expires, ())))
        })
        .await
        .map(|_| ())
    }

    /// `principal`'s live sessions, longest-standing first.
    ///
    /// # Errors
    /// Store errors.
    pub async fn sessions(
        &self,
        principal: &str,
        sessions: &dyn Sessions,
        now: Timestamp,
    ) -> Result<Vec<Listed>, StoreError> {
        let snap = self.snapshot(&self.index_id(principal), now).await?;
        let named = json(&principal);
        let mut out = Vec::new();
        for (id, member) in snap.members {
            if member.lease > now.0 {
                continue;
            }
            if let Some(record) = sessions.live(principal, &id, &member, now).await? {
                // A session that changed hands (a new login on the same
                // device as someone else) is not this principal's.
                let owned = record.as_ref().is_none_or(|r| {
                    r.attributes.get(PRINCIPAL).map(|p| p.get()) == Some(named.get())
                });
                if owned {
                    out.push(Listed { id, member, record });
                }
            }
        }
        out.sort_by_key(|l| (l.member.joined, l.id));
        Ok(out)
    }

    /// Finds sessions that expired (gone without a logout) among the
    /// principals whose hints say so, reports each through `report` and
    /// drops it from its index. A member is leased to this reaper first, so
    /// another reaper skips it; if this one dies before reporting, the lease
    /// runs out and the next reports it (at least once). Returns how many
    /// were reported.
    ///
    /// # Errors
    /// Store errors (what was reported before stays reported).
    pub async fn reap(
        &self,
        sessions: &dyn Sessions,
        now: Timestamp,
        report: &(dyn Fn(Expired) + Send + Sync),
    ) -> Result<usize, StoreError> {
        let mut reported = 0;
        for shard in 0..DIRECTORY_SHARDS {
            let Some(dir) = self
                .store
                .load(&self.shard_id(shard), Load::at(now))
                .await?
            else {
                continue;
            };
            for (k, v) in &dir.attributes {
                let Some(principal) = k.strip_prefix("p:") else {
                    continue;
                };
                let due = v.get().parse::<u64>().unwrap_or(0);
                if due > now.0 {
                    continue;
                }
                reported += self
                    .reap_principal(principal, sessions, now, report)
                    .await?;
            }
        }
        Ok(reported)
    }

    /// Ends every session of `principal` but `keep` ("log out everywhere
    /// else"; all of them without `keep`) and drops them from the index.
    /// Returns the sessions ended.
    ///
    /// # Errors
    /// Store errors; the sessions ended before the error stay ended.
    pub async fn end_all(
        &self,
        principal: &str,
        keep: Option<&SessionId>,
        sessions: &dyn Sessions,
        now: Timestamp,
    ) -> Result<Vec<SessionId>, StoreError> {
        let snap = self.snapshot(&self.index_id(principal), now).await?;
        let mut ended = Vec::new();
        for (id, member) in &snap.members {
            if Some(id) == keep {
                continue;
            }
            sessions.end(principal, id, member, now).await?;
            ended.push(*id);
        }
        if !ended.is_empty() {
            self.remove(principal, &ended, now).await?;
        }
        Ok(ended)
    }

    /// Ends session `id` of `principal` and drops it from the index.
    /// `Ok(false)` if it is not one of the principal's.
    ///
    /// # Errors
    /// Store errors.
    pub async fn end_one(
        &self,
        principal: &str,
        id: &SessionId,
        sessions: &dyn Sessions,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let snap = self.snapshot(&self.index_id(principal), now).await?;
        let Some(member) = snap.members.get(id) else {
            return Ok(false);
        };
        sessions.end(principal, id, member, now).await?;
        self.remove(principal, &[*id], now).await?;
        Ok(true)
    }

    async fn reap_principal(
        &self,
        principal: &str,
        sessions: &dyn Sessions,
        now: Timestamp,
        report: &(dyn Fn(Expired) + Send + Sync),
    ) -> Result<usize, StoreError> {
        let index = self.index_id(principal);
        let snap = self.snapshot(&index, now).await?;
        let mut next_due = u64::MAX;
        let mut dead = Vec::new();
        for (id, member) in &snap.members {
            if member.lease > now.0 {
                next_due = next_due.min(member.lease);
                continue;
            }
            if member.expires > now.0 {
                next_due = next_due.min(member.expires);
                continue;
            }
            match sessions.live(principal, id, member, now).await? {
                Some(record) => {
                    // Its expiry slid past the hint: record the new one.
                    let expires = record.as_ref().map_or(member.expires, |r| r.expires_at().0);
                    if expires > member.expires {
                        self.extend(principal, id, expires, now).await?;
                    }
                    next_due = next_due.min(expires.max(now.0 + 1));
                }
                None => dead.push((*id, member.clone())),
            }
        }
        let mut reported = 0;
        for (id, member) in dead {
            // Lease it: only the reaper whose lease write wins reports it.
            let mut leased = member.clone();
            leased.lease = now.0 + LEASE_MS;
            let mut delta = Delta::default();
            delta.set(member_key(&id), json(&leased));
            delta.expect(member_key(&id), Some(json(&member)));
            match self.store.apply(&index, &delta, now).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
            report(Expired {
                principal: principal.to_string(),
                id,
            });
            reported += 1;
            self.remove(principal, &[id], now).await?;
        }
        // Tell the directory when to look again, or forget the principal.
        let key = format!("p:{principal}");
        let shard = self.shard_id(shard_of(principal));
        let remaining = snap.members.len() - reported;
        let mut delta = Delta::default();
        if remaining == 0 || next_due == u64::MAX {
            delta.remove(key);
        } else {
            delta.set(key, json(&next_due));
        }
        self.store.apply(&shard, &delta, now).await?;
        if remaining == 0 {
            self.retire_if_empty(index, now).await?;
            self.retire_if_empty(shard, now).await?;
        }
        Ok(reported)
    }
}

/// A short random wait between compare-and-set tries, without a runtime
/// dependency here: yields on the caller's executor.
async fn tokio_free_backoff(attempt: u32) {
    // Spin a few yields: the other writer needs one round trip to finish.
    for _ in 0..(1 + attempt.min(8)) {
        yield_now().await;
    }
}

/// Yields once to the executor.
async fn yield_now() {
    struct Yield(bool);
    impl std::future::Future for Yield {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0 {
                std::task::Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
    Yield(false).await;
}
