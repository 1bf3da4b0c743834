//! Sessions in this process's memory: the `local` strategy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::record::millis;
use crate::store::{Load, SessionStore, StoreError, DEFAULT_MAX_SIZE};
use crate::{Delta, Record, SessionId, Timestamp};

const SHARDS: usize = 16;

/// An in-memory [`SessionStore`], safe under concurrent requests.
///
/// Sessions are spread over 16 independently locked shards so concurrent
/// requests rarely wait on each other. Expired sessions are evicted
/// incrementally: every operation that finds a sweep due sweeps one shard, so
/// a full pass completes once per sweep interval (60 s by default) without a
/// background task and without one long pause.
///
/// ```
/// # tokio_test_block_on(async {
/// use tether_core::{Delta, Expiry, Load, MemoryStore, Record, SessionId, SessionStore, Timestamp};
/// let store = MemoryStore::default();
/// let now = Timestamp::now();
/// let record = Record::new(SessionId::random(), now, Expiry::default());
/// store.create(&record).await.unwrap();
/// assert!(store.load(&record.id, Load::at(now)).await.unwrap().is_some());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<HashMap<SessionId, Record>>]>,
    max_size: usize,
    sweep_every_ms: u64,
    next_sweep: AtomicU64,
    sweep_cursor: AtomicUsize,
    bytes: AtomicUsize,
}

/// Occupancy figures of a [`MemoryStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Sessions held, including expired ones not yet swept (not the
    /// store's own records, such as users' session indexes).
    pub sessions: usize,
    /// Attribute bytes held (names plus JSON text).
    pub bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with the default size limit and sweep interval.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_size: DEFAULT_MAX_SIZE,
            sweep_every_ms: 60_000 / SHARDS as u64,
            next_sweep: AtomicU64::new(0),
            sweep_cursor: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Sets the largest session accepted, in bytes of [`Record::size`].
    #[must_use]
    pub fn with_max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// Sets how long a full eviction pass over all shards may take.
    #[must_use]
    pub fn with_sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_every_ms = (millis(every) / SHARDS as u64).max(1);
        self
    }

    /// Evicts every session expired at `now`; returns how many were evicted.
    pub fn sweep(&self, now: Timestamp) -> usize {
        (0..SHARDS).map(|i| self.sweep_shard(i, now)).sum()
    }

    /// Current occupancy.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            // Records at derived IDs (users' session indexes) are the
            // store's own bookkeeping, not sessions.
            sessions: self
                .shards
                .iter()
                .map(|s| lock(s).keys().filter(|id| !id.is_derived()).count())
                .sum(),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn sweep_shard(&self, index: usize, now: Timestamp) -> usize {
        let mut shard = lock(&self.shards[index]);
        let before = shard.len();
        let mut freed = 0;
        shard.retain(|_, r| {
            let keep = !r.is_expired(now);
            if !keep {
                freed += r.size();
            }
            keep
        });
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        before - shard.len()
    }

    /// Sweeps one shard when a sweep is due; only one caller wins the slot.
    fn maybe_sweep(&self, now: Timestamp) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now.0 < due {
            return;
        }
        let next = now.0.saturating_add(self.sweep_every_ms);
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let index = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
            self.sweep_shard(index, now);
        }
    }

    fn shard_of(id: &SessionId) -> usize {
        // IDs are uniformly random, so their first byte spreads them evenly.
        usize::from(id.as_bytes()[0]) % SHARDS
    }

    fn shard(&self, id: &SessionId) -> MutexGuard<'_, HashMap<SessionId, Record>> {
        lock(&self.shards[Self::shard_of(id)])
    }

    fn check_size(&self, size: usize) -> Result<(), StoreError> {
        if size > self.max_size {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_size,
            });
        }
        Ok(())
    }

    /// Removes an expired entry so the map never answers for it again.
    fn live<'a>(
        &self,
        map: &'a mut HashMap<SessionId, Record>,
        id: &SessionId,
        now: Timestamp,
    ) -> Option<&'a mut Record> {
        if map.get(id).is_some_and(|r| r.is_expired(now)) {
            if let Some(dead) = map.remove(id) {
                self.bytes.fetch_sub(dead.size(), Ordering::Relaxed);
            }
            return None;
        }
        map.get_mut(id)
    }
}

impl MemoryStore {
    /// The body of `rotate` once the shards are locked; `new_map` is `None`
    /// when both identifiers live in the same shard.
    fn rotate_in(
        &self,
        old_map: &mut HashMap<SessionId, Record>,
        mut new_map: Option<&mut HashMap<SessionId, Record>>,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let Some(record) = self.live(old_map, old, now) else {
            return Ok(None);
        };
        if !record.meets(delta) {
            return Err(StoreError::Conflict);
        }
        let (old_size, new_size) = (record.size(), record.size_after(delta));
        self.check_size(new_size)?;
        let collides = match new_map.as_deref_mut() {
            Some(map) => self.live(map, new, now).is_some(),
            None => self.live(old_map, new, now).is_some(),
        };
        if collides {
            return Err(StoreError::Collision);
        }
        let mut record = old_map
            .remove(old)
            .expect("checked live under the same lock");
        record.id = *new;
        record.apply(delta, now);
        let version = record.version;
        match new_map {
            Some(map) => map.insert(*new, record),
            None => old_map.insert(*new, record),
        };
        self.bytes.fetch_add(new_size, Ordering::Relaxed);
        self.bytes.fetch_sub(old_size, Ordering::Relaxed);
        Ok(Some(version))
    }
}

// A panic while a shard is locked cannot leave a record half-updated (every
// update is computed before it is stored), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.maybe_sweep(record.last_access);
        let size = record.size();
        self.check_size(size)?;
        let mut shard = self.shard(&record.id);
        if self
            .live(&mut shard, &record.id, record.last_access)
            .is_some()
        {
            return Err(StoreError::Collision);
        }
        shard.insert(record.id, record.clone());
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        self.maybe_sweep(load.now);
        let mut shard = self.shard(id);
        Ok(self.live(&mut shard, id, load.now).map(|record| {
            if load.should_refresh(record) {
                record.last_access = load.now;
            }
            record.clone()
        }))
    }

    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        self.maybe_sweep(now);
        let mut shard = self.shard(id);
        let Some(record) = self.live(&mut shard, id, now) else {
            return Ok(None);
        };
        if !record.meets(delta) {
            return Err(StoreError::Conflict);
        }
        let (old, new) = (record.size(), record.size_after(delta));
        self.check_size(new)?;
        record.apply(delta, now);
        self.bytes.fetch_add(new, Ordering::Relaxed);
        self.bytes.fetch_sub(old, Ordering::Relaxed);
        Ok(Some(record.version))
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let removed = self.shard(id).remove(id);
        if let Some(r) = &removed {
            self.bytes.fetch_sub(r.size(), Ordering::Relaxed);
        }
        Ok(removed.is_some())
    }

    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        self.maybe_sweep(now);
        let (a, b) = (Self::shard_of(old), Self::shard_of(new));
        if a == b {
            let mut map = lock(&self.shards[a]);
            return self.rotate_in(&mut map, None, old, new, delta, now);
        }
        // Lock both shards in index order so two rotations cannot deadlock.
        let (mut old_map, mut new_map) = if a < b {
            let first = lock(&self.shards[a]);
            (first, lock(&self.shards[b]))
        } else {
            let first = lock(&self.shards[b]);
            (lock(&self.shards[a]), first)
        };
        self.rotate_in(&mut old_map, Some(&mut new_map), old, new, delta, now)
    }

    fn max_size(&self) -> usize {
        self.max_size
    }
}
