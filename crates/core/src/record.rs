//! The stored form of a session and the changes applied to it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::SessionId;

/// Milliseconds since the Unix epoch.
///
/// Stores take the time from their caller instead of reading a clock, so the
/// same expiry rules hold on every store and tests can move time forward
/// without sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The farthest future; used for "no absolute deadline".
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// The current wall-clock time.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// This time moved forward by `d`, saturating.
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// Time elapsed from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// A deadline as compact encodings carry it: 0 for "none" ([`Self::MAX`]),
    /// which keeps `u64::MAX` out of JSON numbers and Redis strings.
    #[must_use]
    pub fn deadline_to_wire(self) -> u64 {
        if self == Self::MAX {
            0
        } else {
            self.0
        }
    }

    /// The inverse of [`Self::deadline_to_wire`].
    #[must_use]
    pub fn deadline_from_wire(ms: u64) -> Self {
        if ms == 0 {
            Self::MAX
        } else {
            Self(ms)
        }
    }
}

/// The expiry policy: a sliding inactivity timeout capped by an absolute lifetime.
///
/// Spring Session's default inactivity timeout (1800 s) is kept; the absolute cap
/// (12 h by default) bounds how long a stolen but constantly used session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Inactivity after which the session expires.
    pub idle: Duration,
    /// Lifetime from creation after which the session expires however active; `None` for no cap.
    pub absolute: Option<Duration>,
}

impl Default for Expiry {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(1800),
            absolute: Some(Duration::from_secs(12 * 3600)),
        }
    }
}

/// A session as a store holds it.
///
/// Attributes are JSON text, one entry per attribute, so stores can keep and
/// ship them without re-encoding and a person can read them with `redis-cli`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The identifier.
    pub id: SessionId,
    /// Attribute name to JSON value.
    pub attributes: BTreeMap<String, Box<RawValue>>,
    /// When the session was created.
    pub created: Timestamp,
    /// The last access that was recorded (reads record it lazily).
    pub last_access: Timestamp,
    /// This session's inactivity timeout in milliseconds.
    pub idle_ms: u64,
    /// The absolute deadline ([`Timestamp::MAX`] when there is none).
    pub deadline: Timestamp,
    /// Increases by one with every applied delta; 1 at creation.
    pub version: u64,
}

// `RawValue` has no `PartialEq`; two records are equal when their JSON text is.
impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.created == other.created
            && self.last_access == other.last_access
            && self.idle_ms == other.idle_ms
            && self.deadline == other.deadline
            && self.version == other.version
            && self.attributes.len() == other.attributes.len()
            && self
                .attributes
                .iter()
                .zip(&other.attributes)
                .all(|((ka, va), (kb, vb))| ka == kb && va.get() == vb.get())
    }
}

impl Record {
    /// A new record with version 1, created and last accessed at `now`.
    pub fn new(id: SessionId, now: Timestamp, expiry: Expiry) -> Self {
        Self {
            id,
            attributes: BTreeMap::new(),
            created: now,
            last_access: now,
            idle_ms: millis(expiry.idle),
            deadline: expiry.absolute.map_or(Timestamp::MAX, |a| now.plus(a)),
            version: 1,
        }
    }

    /// When the session expires if nobody touches it again.
    pub fn expires_at(&self) -> Timestamp {
        Timestamp(self.last_access.0.saturating_add(self.idle_ms)).min(self.deadline)
    }

    /// Whether the session is expired at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at()
    }

    /// The size that counts against a store's limit: attribute names plus their JSON text.
    pub fn size(&self) -> usize {
        self.attributes
            .iter()
            .map(|(k, v)| k.len() + v.get().len())
            .sum()
    }

    /// Applies `delta` in place: clear first, then sets and removals, then the
    /// idle change; records the access at `now` and increments the version.
    pub fn apply(&mut self, delta: &Delta, now: Timestamp) {
        if delta.clear {
            self.attributes.clear();
        }
        for (key, change) in &delta.changes {
            match change {
                Some(value) => {
                    self.attributes.insert(key.clone(), value.clone());
                }
                None => {
                    self.attributes.remove(key);
                }
            }
        }
        if let Some(idle) = delta.idle_ms {
            self.idle_ms = idle;
        }
        self.last_access = self.last_access.max(now);
        self.version += 1;
    }

    /// Sets the attributes `delta` sets (its removals have nothing to
    /// remove on a record being made): a new record from a first write.
    pub fn insert_sets(&mut self, delta: &Delta) {
        for (k, v) in &delta.changes {
            if let Some(v) = v {
                self.attributes.insert(k.clone(), v.clone());
            }
        }
    }

    /// Whether `delta`'s conditions ([`Delta::expect`]) hold on this record.
    pub fn meets(&self, delta: &Delta) -> bool {
        delta.expect.iter().all(|(k, want)| {
            self.attributes.get(k).map(|v| v.get()) == want.as_ref().map(|v| v.get())
        })
    }

    /// The size this record would have after `delta`, without applying it.
    pub fn size_after(&self, delta: &Delta) -> usize {
        let mut size = if delta.clear { 0 } else { self.size() };
        for (key, change) in &delta.changes {
            if !delta.clear {
                if let Some(old) = self.attributes.get(key) {
                    size -= key.len() + old.get().len();
                }
            }
            if let Some(new) = change {
                size += key.len() + new.get().len();
            }
        }
        size
    }
}

/// The changes one request made to one session, applied atomically.
///
/// Only attributes the request changed are present, so two requests that
/// change different attributes of one session never overwrite each other.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    /// Remove every attribute before applying `changes`.
    // Defaults are left out of the encoding: deltas travel between nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
    /// Attribute name to new JSON value, or `None` to remove it.
    pub changes: BTreeMap<String, Option<Box<RawValue>>>,
    /// A new inactivity timeout for this session, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// Conditions: apply only if each named attribute still holds exactly
    /// this JSON text (`None`: still absent). A store refuses the whole
    /// delta with [`crate::StoreError::Conflict`] otherwise; this is how an
    /// atomic read-modify-write (`Session::modify`) is made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expect: BTreeMap<String, Option<Box<RawValue>>>,
}

impl Delta {
    /// Whether applying this delta would change nothing but the access time.
    pub fn is_empty(&self) -> bool {
        !self.clear && self.changes.is_empty() && self.idle_ms.is_none()
    }

    /// Makes the delta apply only if attribute `key` still holds `value`
    /// (JSON text; `None`: still absent).
    pub fn expect(&mut self, key: impl Into<String>, value: Option<Box<RawValue>>) -> &mut Self {
        self.expect.insert(key.into(), value);
        self
    }

    /// Sets `key` to the JSON text `value`.
    pub fn set(&mut self, key: impl Into<String>, value: Box<RawValue>) -> &mut Self {
        self.changes.insert(key.into(), Some(value));
        self
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl Into<String>) -> &mut Self {
        self.changes.insert(key.into(), None);
        self
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).unwrap()
    }

    #[test]
    fn expiry_is_the_earlier_of_idle_and_deadline() {
        let t0 = Timestamp(1_000_000);
        let expiry = Expiry {
            idle: Duration::from_secs(60),
            absolute: Some(Duration::from_secs(100)),
        };
        let mut r = Record::new(SessionId::random(), t0, expiry);
        assert_eq!(r.expires_at(), Timestamp(1_060_000));
        r.last_access = Timestamp(1_070_000);
        assert_eq!(r.expires_at(), Timestamp(1_100_000));
        assert!(!r.is_expired(Timestamp(1_099_999)));
        assert!(r.is_expired(Timestamp(1_100_000)));
    }

    #[test]
    fn size_after_matches_applied_size() {
        let mut r = Record::new(SessionId::random(), Timestamp(0), Expiry::default());
        r.attributes.insert("a".into(), raw("1"));
        r.attributes.insert("bb".into(), raw("\"xyz\""));
        let mut d = Delta::default();
        d.set("a", raw("12345")).remove("bb").set("c", raw("[1,2]"));
        let predicted = r.size_after(&d);
        r.apply(&d, Timestamp(5));
        assert_eq!(predicted, r.size());
        assert_eq!(r.version, 2);
        assert_eq!(r.last_access, Timestamp(5));

        let clear = Delta {
            clear: true,
            ..Delta::default()
        };
        assert_eq!(r.size_after(&clear), 0);
    }
}
