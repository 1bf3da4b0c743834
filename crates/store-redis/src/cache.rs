//! The near cache: sessions this node used recently, kept coherent by Redis
//! (server-assisted client-side caching, `CLIENT TRACKING`).
//!
//! Redis remembers which keys each tracking connection read and pushes an
//! `invalidate` message when another client changes one; the connection
//! delivers it before any later reply, and this cache drops the session.
//!
//! The hard part is the race between a read and an invalidation: a reply
//! can carry a value that another client changes before the reply is
//! cached. Every read or write first takes a [`Ticket`] (the cache's epoch
//! and invalidation count); its result is cached only if no invalidation of
//! that session came after the ticket and the cache was not cleared since.
//! Everything is dropped (a new epoch) when a tracking connection breaks or
//! is replaced, on failover and on Sentinel's `+switch-master`: the server
//! forgets what it tracked for a closed connection.
//!
//! Bounded by entries and bytes (least recently used go first), sharded so
//! nodes serving many sessions do not contend on one lock.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_core::{Record, SessionId};

use crate::layout::Meta;

const SHARDS: usize = 16;
/// An invalidation older than this cannot concern a read still in flight
/// (the response timeout is shorter).
const TOMB_TTL: Duration = Duration::from_secs(10);

/// What the cache did so far (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to Redis.
    pub misses: u64,
    /// Sessions dropped because Redis said another client changed them.
    pub invalidations: u64,
    /// Times the whole cache was dropped (a connection broke or changed).
    pub flushes: u64,
    /// Sessions dropped to stay within the bounds.
    pub evictions: u64,
    /// Sessions held now.
    pub entries: u64,
    /// Their attribute bytes.
    pub bytes: u64,
}

/// Taken before a read or write whose result may be cached.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    epoch: u64,
    seq: u64,
}

/// A session as this node last saw it, with its metadata as stored (a
/// write compares it with Redis's whole).
#[derive(Debug)]
pub(crate) struct Cached {
    pub record: Record,
    pub meta: Meta,
}

struct Entry {
    cached: Arc<Cached>,
    bytes: usize,
}

struct Shard {
    lru: lru::LruCache<SessionId, Entry>,
    bytes: usize,
    /// Sessions invalidated lately: the invalidation's number and time.
    tombs: HashMap<SessionId, (u64, Instant)>,
}

impl Shard {
    fn remove(&mut self, id: &SessionId) {
        if let Some(e) = self.lru.pop(id) {
            self.bytes -= e.bytes;
        }
    }
}

/// Recently used sessions, kept coherent by Redis.
pub(crate) struct NearCache {
    shards: Vec<Mutex<Shard>>,
    max_bytes: usize,
    epoch: AtomicU64,
    seq: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    evictions: AtomicU64,
}

fn shard_of(id: &SessionId) -> usize {
    usize::from(id.as_bytes()[15]) % SHARDS
}

impl NearCache {
    /// A cache of at most `entries` sessions and `bytes` attribute bytes.
    pub(crate) fn new(entries: usize, bytes: usize) -> Arc<Self> {
        let per = NonZeroUsize::new(entries.div_ceil(SHARDS).max(1)).expect("at least one");
        Arc::new(Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: lru::LruCache::new(per),
                        bytes: 0,
                        tombs: HashMap::new(),
                    })
                })
                .collect(),
            max_bytes: (bytes / SHARDS).max(1),
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    fn shard(&self, id: &SessionId) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached session `id`, counting a hit or a miss.
    pub(crate) fn get(&self, id: &SessionId) -> Option<Arc<Cached>> {
        let found = self.shard(id).lru.get(id).map(|e| e.cached.clone());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The cached session `id`, without counting.
    pub(crate) fn peek(&self, id: &SessionId) -> Option<Arc<Cached>> {
        self.shard(id).lru.peek(id).map(|e| e.cached.clone())
    }

    pub(crate) fn ticket(&self) -> Ticket {
        // Read the epoch first: a clear between the two reads makes the
        // ticket stale, never a stale ticket look fresh.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let seq = self.seq.load(Ordering::SeqCst);
        Ticket { epoch, seq }
    }

    /// Caches `record` as read or written under `ticket`, unless the session
    /// was invalidated after the ticket was taken or the cache was cleared.
    pub(crate) fn put(&self, ticket: Ticket, record: Record, meta: Meta) {
        let id = record.id;
        let bytes = record.size() + 128;
        let mut shard = self.shard(&id);
        if self.epoch.load(Ordering::SeqCst) != ticket.epoch {
            return;
        }
        if shard
            .tombs
            .get(&id)
            .is_some_and(|(seq, _)| *seq > ticket.seq)
        {
            shard.remove(&id);
            return;
        }
        // This node's requests of one session overlap, and Redis does not
        // tell a node of its own writes (`NOLOOP`): an older state answered
        // later must not replace a newer one, or it would stay.
        if let Some(e) = shard.lru.peek(&id) {
            let old = &e.cached.record;
            if old.created == record.created
                && (old.version, old.last_access) > (record.version, record.last_access)
            {
                return;
            }
        }
        // `push`, not `put`: it hands back what it evicted to stay within
        // the entry bound too, so the byte count stays true.
        if let Some((old_id, old)) = shard.lru.push(
            id,
            Entry {
                cached: Arc::new(Cached { record, meta }),
                bytes,
            },
        ) {
            shard.bytes -= old.bytes;
            if old_id != id {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        shard.bytes += bytes;
        while shard.bytes > self.max_bytes || shard.lru.len() > shard.lru.cap().get() {
            match shard.lru.pop_lru() {
                Some((_, e)) => {
                    shard.bytes -= e.bytes;
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }

    /// Drops session `id`: this node changed it and could not follow, or
    /// deleted it. Like an invalidation, it keeps out what reads and writes
    /// already in flight would cache (Redis sends none for a node's own
    /// writes), or a deleted session could come back.
    pub(crate) fn forget(&self, id: &SessionId) {
        self.entomb(id);
    }

    /// Redis said `key` changed (`PREFIX{ID}`: the ID is the hash tag).
    pub(crate) fn invalidate(&self, key: &[u8]) {
        let Some(id) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_suffix('}'))
            .and_then(|k| k.rsplit_once('{'))
            .and_then(|(_, tag)| SessionId::parse(tag).ok())
        else {
            return;
        };
        self.entomb(&id);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops `id` and refuses results of tickets taken before now.
    fn entomb(&self, id: &SessionId) {
        let id = *id;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut shard = self.shard(&id);
        shard.remove(&id);
        let now = Instant::now();
        shard.tombs.insert(id, (seq, now));
        if shard.tombs.len() > 4096 {
            shard
                .tombs
                .retain(|_, (_, at)| now.duration_since(*at) < TOMB_TTL);
        }
    }

    /// Drops everything: what the server tracked for this node is gone.
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.lru.clear();
            s.bytes = 0;
            s.tombs.clear();
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> NearCacheStats {
        let (mut entries, mut bytes) = (0, 0);
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            entries += s.lru.len() as u64;
            bytes += s.bytes as u64;
        }
        NearCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries,
            bytes,
        }
    }

    /// Handles a push from a tracking connection.
    pub(crate) fn on_push(&self, info: redis::PushInfo) {
        match info.kind {
            redis::PushKind::Invalidate => match info.data.first() {
                // A null list: the server dropped its tracking table (a
                // FLUSHALL, or too many keys tracked).
                Some(redis::Value::Nil) | None => self.clear(),
                Some(redis::Value::Array(keys)) => {
                    for k in keys {
                        if let Some(k) = crate::layout::text(k) {
                            self.invalidate(k);
                        }
                    }
                }
                Some(_) => self.clear(),
            },
            redis::PushKind::Disconnection => self.clear(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_core::testing::record_with;
    use tether_core::Timestamp;

    fn meta(r: &Record) -> Meta {
        Meta::of(r, r.last_access.0)
    }

    fn key(id: &SessionId) -> Vec<u8> {
        format!("p:{{{id}}}").into_bytes()
    }

    #[test]
    fn an_invalidation_after_the_ticket_keeps_the_read_out() {
        let c = NearCache::new(100, 1 << 20);
        let r = record_with(Timestamp::now(), &[("a", "1")]);
        let t = c.ticket();
        c.invalidate(&key(&r.id));
        c.put(t, r.clone(), meta(&r));
        assert!(
            c.get(&r.id).is_none(),
            "a read older than an invalidation was cached"
        );
        let t = c.ticket();
        c.put(t, r.clone(), meta(&r));
        assert!(c.get(&r.id).is_some());
        c.invalidate(&key(&r.id));
        assert!(c.get(&r.id).is_none());
        assert_eq!(c.stats().invalidations, 2);
    }

    #[test]
    fn an_older_state_answered_later_does_not_replace_a_newer_one() {
        let c = NearCache::new(100, 1 << 20);
        let v1 = record_with(Timestamp::now(), &[("a", "1")]);
        let mut v2 = v1.clone();
        v2.version += 1;
        let (t1, t2) = (c.ticket(), c.ticket());
        c.put(t2, v2.clone(), meta(&v2));
        c.put(t1, v1.clone(), meta(&v1));
        assert_eq!(c.get(&v1.id).unwrap().record.version, v2.version);
        // A new life of the same ID (deleted, created again) is not older.
        let mut again = v1.clone();
        again.created = Timestamp(v1.created.0 + 1);
        c.put(c.ticket(), again.clone(), meta(&again));
        assert_eq!(c.get(&v1.id).unwrap().record.created, again.created);
    }

    #[test]
    fn forgetting_keeps_out_what_was_in_flight() {
        let c = NearCache::new(100, 1 << 20);
        let r = record_with(Timestamp::now(), &[("a", "1")]);
        let t = c.ticket();
        c.forget(&r.id);
        c.put(t, r.clone(), meta(&r));
        assert!(c.get(&r.id).is_none(), "a deleted session came back");
        c.put(c.ticket(), r.clone(), meta(&r));
        assert!(c.get(&r.id).is_some());
        assert_eq!(c.stats().invalidations, 0, "a forget is not Redis's word");
    }

    #[test]
    fn a_clear_makes_older_tickets_worthless() {
        let c = NearCache::new(100, 1 << 20);
        let r = record_with(Timestamp::now(), &[("a", "1")]);
        let t = c.ticket();
        c.clear();
        c.put(t, r.clone(), meta(&r));
        assert!(c.get(&r.id).is_none());
    }

    #[test]
    fn bounds_evict_the_least_recently_used() {
        let c = NearCache::new(SHARDS * 2, 1 << 20);
        let now = Timestamp::now();
        let mut ids = Vec::new();
        for _ in 0..SHARDS * 8 {
            let r = record_with(now, &[("a", "1")]);
            ids.push(r.id);
            let m = meta(&r);
            c.put(c.ticket(), r, m);
        }
        let s = c.stats();
        assert!(s.entries <= (SHARDS * 2) as u64, "{s:?}");
        assert!(s.evictions > 0);
        // Bytes too.
        let small = NearCache::new(1000, SHARDS * 300);
        for _ in 0..100 {
            let r = record_with(now, &[("a", &format!("\"{}\"", "x".repeat(200)))]);
            let m = meta(&r);
            small.put(small.ticket(), r, m);
        }
        assert!(small.stats().bytes <= (SHARDS * 300) as u64);
    }

    #[test]
    fn pushes_invalidate_keys_and_a_null_or_a_disconnect_drops_all() {
        let c = NearCache::new(100, 1 << 20);
        let (a, b) = (
            record_with(Timestamp::now(), &[]),
            record_with(Timestamp::now(), &[]),
        );
        c.put(c.ticket(), a.clone(), meta(&a));
        c.put(c.ticket(), b.clone(), meta(&b));
        c.on_push(redis::PushInfo {
            kind: redis::PushKind::Invalidate,
            data: vec![redis::Value::Array(vec![redis::Value::BulkString(key(
                &a.id
            ))])],
        });
        assert!(c.peek(&a.id).is_none() && c.peek(&b.id).is_some());
        c.on_push(redis::PushInfo {
            kind: redis::PushKind::Invalidate,
            data: vec![redis::Value::Nil],
        });
        assert!(c.peek(&b.id).is_none());
        c.put(c.ticket(), b.clone(), meta(&b));
        c.on_push(redis::PushInfo {
            kind: redis::PushKind::Disconnection,
            data: vec![],
        });
        assert!(c.peek(&b.id).is_none());
    }
}
