//! How a session is laid out in Redis, and read back.
//!
//! One hash per session at `PREFIX{ID}` (the ID is a hash tag, so on Redis
//! Cluster everything of a session sits in one slot). Fields:
//! - `attr:NAME`: an attribute as JSON text;
//! - `m`: the metadata packed in one field,
//!   `version,last,idle,deadline,created,size,gc` (milliseconds; deadline 0 =
//!   none; size = attribute names plus JSON bytes, kept so a write checks the
//!   size limit from the changed attributes only; gc = when the key's Redis
//!   TTL ends, see [`Meta::collect_after`]).
//!
//! One field instead of seven halves the work of `HGETALL` for the common
//! small session and lets a write read and rewrite all of it with one
//! `HGET` and one `HSET`; a writer that knows the metadata it read can
//! compare it whole instead of parsing it in Redis. `redis-cli HGETALL
//! tether:session:{ID}` still shows the session as it is.

use std::collections::BTreeMap;

use redis::Value;
use serde_json::value::RawValue;
use tether_core::{Record, SessionId, StoreError, Timestamp};

/// The metadata field.
pub(crate) const META: &str = "m";

/// A session's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub version: u64,
    pub last: u64,
    pub idle: u64,
    /// 0: no absolute deadline.
    pub deadline: u64,
    pub created: u64,
    pub size: u64,
    /// When Redis drops the key (its TTL), at or after the expiry.
    pub gc: u64,
}

impl Meta {
    /// The metadata of `record` as first written at `now`.
    pub(crate) fn of(record: &Record, now: u64) -> Self {
        let mut m = Self {
            version: record.version,
            last: record.last_access.0,
            idle: record.idle_ms,
            deadline: record.deadline.deadline_to_wire(),
            created: record.created.0,
            size: record.size() as u64,
            gc: 0,
        };
        m.collect_after(now);
        m
    }

    /// When the session expires.
    pub(crate) fn expires(&self) -> u64 {
        let e = self.last.saturating_add(self.idle);
        if self.deadline > 0 {
            e.min(self.deadline)
        } else {
            e
        }
    }

    /// Moves `gc` past the expiry if it is not already: returns the TTL to
    /// give the key (`PEXPIRE`), or `None` when its TTL still covers it.
    ///
    /// The TTL is set a quarter of the inactivity window beyond the expiry,
    /// so most writes (which move the expiry by a little) need no
    /// `PEXPIRE`: Redis keeps a key up to that much longer than the session
    /// lives, and every reader and script checks the expiry itself. The
    /// scripts follow the same rule (`tether_gc` in `scripts.rs`).
    pub(crate) fn collect_after(&mut self, now: u64) -> Option<u64> {
        let expires = self.expires();
        if expires <= self.gc {
            return None;
        }
        let mut gc = expires.saturating_add(self.idle / 4);
        if self.deadline > 0 && gc > self.deadline {
            gc = self.deadline;
        }
        self.gc = gc;
        Some(gc.saturating_sub(now).max(1))
    }

    pub(crate) fn pack(&self) -> String {
        format!(
            "{},{},{},{},{},{},{}",
            self.version, self.last, self.idle, self.deadline, self.created, self.size, self.gc
        )
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut it = text.split(',').map(|n| n.parse::<u64>().ok());
        let mut next = || it.next().flatten();
        let m = Self {
            version: next()?,
            last: next()?,
            idle: next()?,
            deadline: next()?,
            created: next()?,
            size: next()?,
            gc: next()?,
        };
        it.next().is_none().then_some(m)
    }
}

pub(crate) fn corrupt(msg: impl Into<String>) -> StoreError {
    let e: tether_core::BoxError = msg.into().into();
    StoreError::Corrupt(e)
}

pub(crate) fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// [`text`], taken out of the answer.
fn owned_text(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// Field/value pairs of an `HGETALL` answer (a RESP2 array or a RESP3 map).
fn pairs(v: Value) -> Result<Vec<(Value, Value)>, StoreError> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(m) => Ok(m),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            Ok(out)
        }
        other => Err(corrupt(format!("unexpected HGETALL answer {other:?}"))),
    }
}

/// Rebuilds a session and its metadata from `HGETALL` output; `None` when
/// the hash is gone.
pub(crate) fn parse_hash(
    id: SessionId,
    answer: Value,
) -> Result<Option<(Record, Meta)>, StoreError> {
    let pairs = pairs(answer)?;
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut meta = None;
    let mut attributes = BTreeMap::new();
    for (k, v) in pairs {
        let k = std::str::from_utf8(text(&k).ok_or_else(|| corrupt("non-string field"))?)
            .map_err(|_| corrupt("non-UTF-8 field name"))?;
        // The answer is ours to take apart: values move, not copied (this
        // runs on every read the near cache does not answer).
        let v = String::from_utf8(owned_text(v).ok_or_else(|| corrupt("non-string value"))?)
            .map_err(|_| corrupt("non-UTF-8 value"))?;
        if let Some(name) = k.strip_prefix("attr:") {
            let raw = RawValue::from_string(v).map_err(|e| StoreError::Corrupt(Box::new(e)))?;
            attributes.insert(name.to_string(), raw);
        } else if k == META {
            meta = Some(Meta::parse(&v).ok_or_else(|| corrupt("malformed session metadata"))?);
        }
    }
    let Some(m) = meta else {
        // A write in flight created the hash's attributes before its
        // metadata cannot happen (writes are atomic): this is not ours.
        return Err(corrupt("session hash without metadata"));
    };
    Ok(Some((
        Record {
            id,
            attributes,
            created: Timestamp(m.created),
            last_access: Timestamp(m.last),
            idle_ms: m.idle,
            deadline: Timestamp::deadline_from_wire(m.deadline),
            version: m.version,
        },
        m,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_refuses_garbage() {
        let m = Meta {
            version: 3,
            last: 1_800_000_000_123,
            idle: 1_800_000,
            deadline: 0,
            created: 1_800_000_000_000,
            size: 42,
            gc: 1_800_002_250_123,
        };
        assert_eq!(Meta::parse(&m.pack()), Some(m));
        assert_eq!(Meta::parse("1,2,3"), None);
        assert_eq!(Meta::parse("a,2,3,4,5,6,7"), None);
        assert_eq!(Meta::parse("1,2,3,4,5,6,7,8"), None);
    }

    #[test]
    fn the_ttl_moves_only_when_the_expiry_passes_it() {
        let mut m = Meta {
            version: 1,
            last: 1_000_000,
            idle: 400_000,
            deadline: 0,
            created: 1_000_000,
            size: 0,
            gc: 0,
        };
        assert_eq!(m.collect_after(1_000_000), Some(500_000), "expiry + idle/4");
        assert_eq!(m.gc, 1_500_000);
        m.last = 1_090_000;
        assert_eq!(m.collect_after(1_090_000), None, "still covered");
        m.last = 1_100_001;
        assert_eq!(m.collect_after(1_100_001), Some(1_600_001 - 1_100_001));
        // An absolute deadline caps it.
        m.deadline = 1_550_000;
        m.gc = 0;
        m.collect_after(1_100_001);
        assert_eq!(m.gc, 1_550_000);
        assert!(m.gc >= m.expires());
    }
}
