//! The contract every session store implements.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Delta, Record, SessionId, Timestamp};

/// The default limit on a session's size (attribute names plus JSON text).
pub const DEFAULT_MAX_SIZE: usize = 64 * 1024;

/// A boxed error kept as the cause of a [`StoreError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The principal already has the most sessions allowed and the policy
    /// refuses new ones. HTTP: 409.
    #[error("too many sessions: at most {max} per user")]
    LimitReached {
        /// The limit.
        max: usize,
    },
    /// The store could not be reached or did not answer in time. HTTP: 503.
    #[error("session store unavailable")]
    Unavailable(#[source] BoxError),
    /// The session would exceed the store's size limit; nothing was written.
    #[error("session of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The size the session would have had.
        size: usize,
        /// The store's limit.
        limit: usize,
    },
    /// A session with that identifier already exists; nothing was written.
    #[error("session id already in use")]
    Collision,
    /// A condition of the delta ([`crate::Delta::expect`]) no longer holds:
    /// another request changed the attribute since it was read. Nothing was
    /// written; read again and retry.
    #[error("session attribute changed concurrently")]
    Conflict,
    /// The store holds data it cannot decode. HTTP: 500.
    #[error("stored session is corrupt")]
    Corrupt(#[source] BoxError),
}

impl StoreError {
    /// Wraps any error as [`StoreError::Unavailable`].
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        Self::Unavailable(e.into())
    }

    /// Whether a retry later might succeed (the store was unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// What a load should do about the lazy expiry refresh.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    /// The caller's current time; a session expired at this time is not returned.
    pub now: Timestamp,
    /// Record the access (move `last_access` to `now`) when at least this much
    /// time has passed since the recorded one.
    pub refresh_after: Option<Duration>,
    /// Record the access once this fraction of the session's own inactivity
    /// timeout has passed (a session given a shorter timeout refreshes sooner).
    ///
    /// Recording only after a fraction of the inactivity window keeps a
    /// read-only request from being a write most of the time.
    pub refresh_fraction: Option<f64>,
}

impl Load {
    /// A pure read at `now`.
    pub fn at(now: Timestamp) -> Self {
        Self {
            now,
            refresh_after: None,
            refresh_fraction: None,
        }
    }

    /// A read at `now` that records the access once `after` has passed.
    pub fn refreshing(now: Timestamp, after: Duration) -> Self {
        Self {
            now,
            refresh_after: Some(after),
            refresh_fraction: None,
        }
    }

    /// A read at `now` that records the access once `fraction` of the
    /// session's inactivity timeout has passed.
    pub fn refreshing_fraction(now: Timestamp, fraction: f64) -> Self {
        Self {
            now,
            refresh_after: None,
            refresh_fraction: Some(fraction),
        }
    }

    /// The threshold for `record`, in milliseconds (`None`: never refresh).
    pub fn threshold_ms(&self, record_idle_ms: u64) -> Option<u64> {
        let by_fraction = self
            .refresh_fraction
            .map(|f| (record_idle_ms as f64 * f) as u64);
        let absolute = self.refresh_after.map(crate::millis);
        match (absolute, by_fraction) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether `record` should have its access recorded by this load.
    pub fn should_refresh(&self, record: &Record) -> bool {
        self.threshold_ms(record.idle_ms)
            .is_some_and(|t| self.now.since(record.last_access).as_millis() >= u128::from(t))
    }
}

/// Where sessions live: memory, a replicated cluster, Redis.
///
/// Every method is one atomic step against the store. Times come from the
/// caller; a store must treat a session whose [`Record::expires_at`] is at or
/// before the given time as absent, whatever its own eviction does.
/// The conformance suite in `tether_core::testing` (feature `testing`) checks an
/// implementation against this contract.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Inserts `record` if no live session has its identifier.
    ///
    /// # Errors
    /// [`StoreError::Collision`] if the identifier is taken,
    /// [`StoreError::TooLarge`] if the record exceeds [`Self::max_size`].
    async fn create(&self, record: &Record) -> Result<(), StoreError>;

    /// Returns the live session `id`, recording the access as `load` says.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot answer.
    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError>;

    /// Applies `delta` to the live session `id` at `now` and returns its new
    /// version, or `None` if there is no such live session (a deleted or
    /// expired session is never brought back).
    ///
    /// # Errors
    /// [`StoreError::TooLarge`] if the result would exceed [`Self::max_size`],
    /// [`StoreError::Conflict`] if a condition of [`Delta::expect`] does not
    /// hold; the stored session is then unchanged.
    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError>;

    /// Deletes session `id`; returns whether a live session was deleted.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot answer.
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Moves the live session `old` to the identifier `new`, applying `delta`
    /// in the same step; `old` no longer exists afterwards. Returns the new
    /// version, or `None` if `old` is not a live session.
    ///
    /// # Errors
    /// [`StoreError::Collision`] if `new` is taken, [`StoreError::TooLarge`]
    /// as for [`Self::apply`]; in both cases nothing changes.
    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError>;

    /// The largest session this store accepts, in bytes of [`Record::size`].
    fn max_size(&self) -> usize {
        DEFAULT_MAX_SIZE
    }

    /// An identifier for a new or rotated session. Random by default; a
    /// replicated store may draw until the ID is one it owns, so a login's
    /// session starts on the node that served the login.
    fn propose_id(&self) -> SessionId {
        SessionId::random()
    }
}

macro_rules! forward_store {
    ($ty:ty) => {
        #[async_trait]
        impl<S: SessionStore + ?Sized> SessionStore for $ty {
            async fn create(&self, record: &Record) -> Result<(), StoreError> {
                (**self).create(record).await
            }
            async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
                (**self).load(id, load).await
            }
            async fn apply(
                &self,
                id: &SessionId,
                delta: &Delta,
                now: Timestamp,
            ) -> Result<Option<u64>, StoreError> {
                (**self).apply(id, delta, now).await
            }
            async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
                (**self).delete(id).await
            }
            async fn rotate(
                &self,
                old: &SessionId,
                new: &SessionId,
                delta: &Delta,
                now: Timestamp,
            ) -> Result<Option<u64>, StoreError> {
                (**self).rotate(old, new, delta, now).await
            }
            fn max_size(&self) -> usize {
                (**self).max_size()
            }
            fn propose_id(&self) -> SessionId {
                (**self).propose_id()
            }
        }
    };
}

forward_store!(Arc<S>);
forward_store!(Box<S>);
