//! Active health checks: one probe loop per backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::Shared;

/// A client that opens a fresh connection per probe, as HAProxy's checks do:
/// a pooled connection could answer for a backend that no longer accepts.
pub(crate) fn probe_client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// Starts a probe loop for every backend of the current configuration.
pub(crate) fn spawn_all(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let g = shared.current.load();
    if g.config.health.path.is_empty() {
        return Vec::new();
    }
    g.pool
        .members
        .iter()
        .map(|m| tokio::spawn(probe_loop(shared.clone(), m.id.to_string())))
        .collect()
}

async fn probe_loop(shared: Arc<Shared>, id: String) {
    let client = probe_client();
    loop {
        let g = shared.current.load_full();
        let Some(i) = g.pool.index_of(&id) else {
            return;
        };
        let member = &g.pool.members[i];
        let h = &g.config.health;
        let uri: Uri = match format!("http://{}{}", member.addr, h.path).parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(backend = %id, error = %e, "invalid health check path");
                return;
            }
        };
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        let ok = matches!(
            tokio::time::timeout(Config::ms(h.timeout_ms), client.request(req)).await,
            Ok(Ok(res)) if res.status().is_success() || res.status().is_redirection()
        );
        let s = &member.stats;
        if ok {
            s.probe_failures.store(0, Ordering::Relaxed);
            let n = s.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= h.rise && s.is_marked_down() && s.mark_up() {
                tracing::info!(backend = %id, "backend is up (health check passed {n} times)");
            }
        } else {
            s.probe_successes.store(0, Ordering::Relaxed);
            let n = s.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= h.fall && s.mark_down(false, g.pool.now_ms()) {
                tracing::warn!(backend = %id, "backend is down (health check failed {n} times)");
            }
        }
        tokio::time::sleep(Config::ms(h.interval_ms)).await;
    }
}
