//! What every try tells the balancer, whatever the client protocol:
//! counters, latency and passive health.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::attempt::Failure;
use super::request::Plan;
use crate::upstream::ConnectError;
use crate::{Generation, Shared};

/// Backend `i` answered with `status` (its head arrived at `answered`).
pub(super) fn answered(
    shared: &Shared,
    g: &Generation,
    i: usize,
    status: u16,
    (started, answered): (Instant, Instant),
    cookie_set: bool,
) {
    let stats = &g.pool.members[i].stats;
    stats.latency.observe(answered - started);
    let class = usize::from(status / 100).clamp(1, 5) - 1;
    stats.responses[class].fetch_add(1, Ordering::Relaxed);
    if status >= 500 && g.config.health.passive_5xx {
        shared.record_failure(g, i);
    } else {
        shared.record_success(g, i);
    }
    if cookie_set {
        stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
    }
}

/// No connection to backend `i` could be opened.
pub(super) fn connect_failed(shared: &Shared, g: &Generation, i: usize, e: &ConnectError) {
    let member = &g.pool.members[i];
    shared.record_failure(g, i);
    member.stats.errors.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(backend = %member.id, error = %e, "connect failed; trying the next backend");
}

/// A try on backend `i` failed after connecting.
pub(super) fn failed(shared: &Shared, g: &Generation, i: usize, failure: Failure, wait: Duration) {
    let member = &g.pool.members[i];
    shared.record_failure(g, i);
    member.stats.errors.fetch_add(1, Ordering::Relaxed);
    match failure {
        Failure::Timeout => {
            tracing::warn!(backend = %member.id, timeout = ?wait, "backend timed out");
        }
        _ => tracing::warn!(backend = %member.id, "backend failed before response headers"),
    }
}

/// Publishes the request to live views, when any watch.
pub(super) fn event(
    shared: &Shared,
    plan: &Plan,
    status: u16,
    backend: Option<String>,
    since: Instant,
) {
    if let Some((method, path)) = &plan.described {
        let _ = shared.events.send(crate::RequestEvent {
            method: method.clone(),
            path: path.clone(),
            status,
            backend,
            ms: since.elapsed().as_secs_f64() * 1e3,
        });
    }
}
