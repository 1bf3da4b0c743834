//! The backend set and each backend's live state and counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Backend;

/// Latency histogram bucket bounds, in microseconds (Prometheus `le`).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A cumulative latency histogram with atomic buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// (bucket bound in µs, cumulative count) pairs, then the total count and sum in µs.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut acc = 0;
        let buckets = BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                acc += c.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed),
        )
    }
}

/// A backend's state and counters; kept across reloads for the same ID.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests being served now (including streaming response bodies).
    pub in_flight: AtomicUsize,
    down: AtomicBool,
    /// Ejected by passive checks (and not yet brought back).
    passive: AtomicBool,
    /// When it was ejected, in ms since the balancer started.
    ejected_at_ms: AtomicU64,
    draining: AtomicBool,
    /// Consecutive failed requests (passive checks).
    pub consecutive_failures: AtomicU32,
    /// Consecutive successful probes (active checks).
    pub probe_successes: AtomicU32,
    /// Consecutive failed probes (active checks).
    pub probe_failures: AtomicU32,
    /// Requests sent to this backend (each try counts).
    pub requests: AtomicU64,
    /// Responses by status class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Tries that failed: connect errors, resets, timeouts.
    pub errors: AtomicU64,
    /// Open WebSocket / Upgrade tunnels to this backend.
    pub tunnels: AtomicUsize,
    /// Route cookies issued pinning clients to this backend.
    pub cookies_issued: AtomicU64,
    /// Time to response headers.
    pub latency: Histogram,
    /// Idle keep-alive connections to this backend.
    pub(crate) conns: Arc<crate::upstream::ConnPool>,
}

/// The state reported for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Serving everyone.
    Up,
    /// Not serving: failed health checks or ejected.
    Down,
    /// Serving only clients already bound to it.
    Draining,
}

impl Stats {
    /// Whether health checks consider it down, allowing a retry of a
    /// passively ejected backend once `eject` has passed (half-open).
    pub fn is_down(&self, now_ms: u64, eject: Duration) -> bool {
        if !self.down.load(Ordering::Relaxed) {
            return false;
        }
        let retry_after = self.ejected_at_ms.load(Ordering::Relaxed)
            + u64::try_from(eject.as_millis()).unwrap_or(u64::MAX);
        !(self.passive.load(Ordering::Relaxed) && now_ms >= retry_after)
    }

    /// Whether it is marked down, by either kind of check.
    pub fn is_marked_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Whether it is marked down by passive checks (request failures).
    pub fn is_ejected(&self) -> bool {
        self.is_marked_down() && self.passive.load(Ordering::Relaxed)
    }

    /// Marks it down (`passive` for an ejection by request failures).
    /// Returns whether it was up before.
    pub fn mark_down(&self, passive: bool, now_ms: u64) -> bool {
        self.passive.store(passive, Ordering::Relaxed);
        self.ejected_at_ms.store(now_ms, Ordering::Relaxed);
        !self.down.swap(true, Ordering::Relaxed)
    }

    /// Marks it up. Returns whether it was down before.
    pub fn mark_up(&self) -> bool {
        self.passive.store(false, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.down.swap(false, Ordering::Relaxed)
    }

    /// Whether the admin has set it draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Sets or clears draining.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// The state to report.
    pub fn state(&self, now_ms: u64, eject: Duration) -> State {
        if self.is_down(now_ms, eject) {
            State::Down
        } else if self.is_draining() {
            State::Draining
        } else {
            State::Up
        }
    }
}

/// One backend in the current configuration.
#[derive(Debug, Clone)]
pub struct Member {
    /// Stable name.
    pub id: Arc<str>,
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Live state, shared with health checks and kept across reloads.
    pub stats: Arc<Stats>,
    /// `http://addr`, parsed once.
    pub(crate) authority: http::uri::Authority,
}

/// A pool of backends named `ids` on made-up loopback ports, for tests.
#[cfg(test)]
pub(crate) fn test_pool(ids: &[&str]) -> Pool {
    let backends: Vec<Backend> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Backend {
            id: (*id).into(),
            addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
            weight: 1,
        })
        .collect();
    Pool::new(&backends, None, Instant::now())
}

/// The backend set of one configuration generation.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Backends in configuration order.
    pub members: Vec<Member>,
    started: Instant,
}

impl Pool {
    /// Builds the pool, reusing the live state of backends that `previous` already had.
    pub fn new(backends: &[Backend], previous: Option<&Pool>, started: Instant) -> Self {
        let members = backends
            .iter()
            .map(|b| {
                let stats = previous
                    .and_then(|p| p.members.iter().find(|m| *m.id == *b.id))
                    .map_or_else(Arc::default, |m| m.stats.clone());
                Member {
                    id: b.id.as_str().into(),
                    addr: b.addr,
                    weight: b.weight,
                    stats,
                    authority: b
                        .addr
                        .to_string()
                        .parse()
                        .expect("a socket address is a valid authority"),
                }
            })
            .collect();
        Self { members, started }
    }

    /// Milliseconds since the balancer started (the clock of ejections).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// [`Pool::now_ms`] for an instant the caller already read.
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// The index of backend `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| &*m.id == id)
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}
