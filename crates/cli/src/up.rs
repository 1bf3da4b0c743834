//! `tether up`: a fleet that stays up, with a dashboard.
//!
//! Three `tether node` processes with the chosen strategy's store, the load
//! balancer in this process (so the dashboard sees every request), and a
//! dashboard page: nodes up or down, sessions held, requests served,
//! replication traffic, a live feed of requests (server-sent events) and
//! buttons to kill and restart each node. A person can log in on the app,
//! kill the node that served them, reload, and see what the strategy does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tether_testkit::{Client, RedisServer};
use tokio::sync::Mutex;

use crate::fleet::Fleet;
use crate::strategy::Strategy;

/// Settings of `tether up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The strategy.
    pub strategy: Strategy,
    /// Where the app (the balancer) listens.
    pub listen: SocketAddr,
    /// Where the dashboard listens.
    pub dashboard: SocketAddr,
    /// An existing Redis for the Redis strategies.
    pub redis_url: Option<String>,
}

struct Up {
    strategy: Strategy,
    app: SocketAddr,
    fleet: Mutex<Fleet>,
    lb: tether_lb::Handle,
}

/// Starts everything; serves until `shutdown`, then stops everything.
///
/// # Errors
/// If a node, the balancer or the dashboard cannot start.
pub async fn run(
    bin: PathBuf,
    config: UpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let mut private_redis = None;
    let redis = match (&config.redis_url, config.strategy.needs_redis()) {
        (Some(u), _) => Some(u.clone()),
        (None, true) => {
            let r = RedisServer::start().await.map_err(|e| e.to_string())?;
            let url = r.url();
            private_redis = Some(r);
            Some(url)
        }
        (None, false) => None,
    };
    let fleet = Fleet::start(&bin, config.strategy, &["A", "B", "C"], redis).await?;
    let backends = fleet
        .backends()
        .into_iter()
        .map(|(id, addr)| tether_lb::BackendConfig {
            id: id.into(),
            addr: addr.to_string(),
            weight: 1,
        })
        .collect();
    let mut lb_config = tether_lb::Config::new(config.listen, config.strategy.policy(), backends);
    lb_config.health.interval_ms = 500;
    let balancer = tether_lb::Balancer::bind(lb_config, None)
        .await
        .map_err(|e| e.to_string())?;
    let app = balancer.local_addr().map_err(|e| e.to_string())?;
    let up = Arc::new(Up {
        strategy: config.strategy,
        app,
        fleet: Mutex::new(fleet),
        lb: balancer.handle(),
    });
    let listener = tokio::net::TcpListener::bind(config.dashboard)
        .await
        .map_err(|e| e.to_string())?;
    let dashboard = listener.local_addr().map_err(|e| e.to_string())?;
    println!("tether up app listening on http://{app}");
    println!("tether up dashboard listening on http://{dashboard}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut lb_stop = stop_rx.clone();
    let lb_task = tokio::spawn(balancer.run(async move {
        let _ = lb_stop.wait_for(|s| *s).await;
    }));
    let router = Router::new()
        .route("/", get(page))
        .route("/state", get(state))
        .route("/events", get(events))
        .route("/nodes/{id}/kill", post(kill))
        .route("/nodes/{id}/restart", post(restart))
        .with_state(up.clone());
    let mut dash_stop = stop_rx;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown => {}
                _ = dash_stop.wait_for(|s| *s) => {}
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    let _ = stop_tx.send(true);
    let _ = lb_task.await;
    // Dropping the fleet kills the nodes; then the private Redis goes.
    drop(up);
    drop(private_redis);
    Ok(())
}

async fn state(State(up): State<Arc<Up>>) -> Json<serde_json::Value> {
    let status = up.lb.status();
    let mut nodes = Vec::new();
    // Copy what is needed and let go of the lock: a slow node must not hold
    // up the kill and restart buttons.
    let members: Vec<(String, SocketAddr, bool)> = up
        .fleet
        .lock()
        .await
        .nodes()
        .iter()
        .map(|n| (n.id.clone(), n.http, n.is_running()))
        .collect();
    for (id, http, running) in members {
        let stats = if running {
            match Client::new().get(&format!("http://{http}/stats")).await {
                Ok(r) => r.json().unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            }
        } else {
            serde_json::Value::Null
        };
        let metrics = if running {
            Client::new()
                .get(&format!("http://{http}/metrics"))
                .await
                .map(|r| r.text())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let replication = metrics
            .contains("tether_cluster_replication_messages_total")
            .then(|| crate::demo::metric(&metrics, "tether_cluster_replication_messages_total"));
        let lb_state = status["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["id"] == id.as_str()))
            .map(|b| b["state"].clone())
            .unwrap_or_default();
        nodes.push(json!({
            "id": id,
            "running": running,
            "balancer_state": lb_state,
            "sessions": stats["sessions"],
            "session_bytes": stats["session_bytes"],
            "requests": stats["requests"],
            "replication_messages": replication,
        }));
    }
    Json(json!({
        "strategy": up.strategy.name(),
        "policy": up.strategy.policy_name(),
        "app": format!("http://{}", up.app),
        "nodes": nodes,
    }))
}

/// Whether node `id` exists (404 if not) and runs as `running` wants (409 if not).
fn check(fleet: &Fleet, id: &str, running: bool) -> Result<(), (StatusCode, &'static str)> {
    match fleet.nodes().iter().find(|n| n.id == id) {
        None => Err((StatusCode::NOT_FOUND, "no such node")),
        Some(n) if n.is_running() != running => {
            let why = if running {
                "already down"
            } else {
                "already running"
            };
            Err((StatusCode::CONFLICT, why))
        }
        Some(_) => Ok(()),
    }
}

async fn kill(State(up): State<Arc<Up>>, Path(id): Path<String>) -> Response {
    let mut fleet = up.fleet.lock().await;
    if let Err(refused) = check(&fleet, &id, true) {
        return refused.into_response();
    }
    // SIGKILL, as a crash: no draining, no goodbye.
    match fleet.kill(&id).await {
        Ok(()) => Json(json!({ "killed": id })).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn restart(State(up): State<Arc<Up>>, Path(id): Path<String>) -> Response {
    let mut fleet = up.fleet.lock().await;
    if let Err(refused) = check(&fleet, &id, false) {
        return refused.into_response();
    }
    match fleet.boot(&id).await {
        Ok(()) => Json(json!({ "restarted": id })).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn events(
    State(up): State<Arc<Up>>,
) -> Sse<impl futures_core::Stream<Item = Result<Event, Infallible>>> {
    let mut rx = up.lb.subscribe();
    let stream = async_stream(move |tx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    if tx.send(Ok(Event::default().data(data))).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// A stream fed by a task (keeps the dependency list short).
fn async_stream<F, Fut>(produce: F) -> tokio_stream_like::ReceiverStream<Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(produce(tx));
    tokio_stream_like::ReceiverStream(rx)
}

mod tokio_stream_like {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// An mpsc receiver as a stream.
    pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_core::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

async fn page(State(up): State<Arc<Up>>) -> Html<String> {
    Html(
        DASHBOARD
            .replace("{{APP}}", &format!("http://{}", up.app))
            .replace("{{STRATEGY}}", up.strategy.name()),
    )
}

const DASHBOARD: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tether up · {{STRATEGY}}</title>
<style>
body{font-family:sans-serif;max-width:60em;margin:1.5em auto;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4em;text-align:left}
.up{color:#1a7f37;font-weight:bold}.down{color:#cf222e;font-weight:bold}
#feed{font-family:monospace;font-size:.85em;height:16em;overflow:auto;background:#f6f8fa;padding:.5em}
button{margin-right:.3em}
</style></head><body>
<h1>tether up: <span id="strategy">{{STRATEGY}}</span></h1>
<p>The app: <a id="app" href="{{APP}}/login" target="_blank">{{APP}}/login</a> (log in, then kill the node that served you, then reload).</p>
<table><thead><tr><th>node</th><th>process</th><th>balancer</th><th>sessions held</th><th>bytes</th><th>requests</th><th>replication msgs</th><th></th></tr></thead>
<tbody id="nodes"></tbody></table>
<h2>requests, live</h2><div id="feed"></div>
<script>
async function refresh(){
  const s = await (await fetch('/state')).json();
  const rows = s.nodes.map(n => `<tr id="row-${n.id}"><td>${n.id}</td>
    <td class="${n.running?'up':'down'}" id="proc-${n.id}">${n.running?'running':'killed'}</td>
    <td>${n.balancer_state||''}</td><td>${n.sessions??'-'}</td><td>${n.session_bytes??'-'}</td>
    <td>${n.requests??'-'}</td><td>${n.replication_messages??'-'}</td>
    <td><button id="kill-${n.id}" onclick="act('${n.id}','kill')" ${n.running?'':'disabled'}>kill</button>
        <button id="restart-${n.id}" onclick="act('${n.id}','restart')" ${n.running?'disabled':''}>restart</button></td></tr>`);
  document.getElementById('nodes').innerHTML = rows.join('');
}
async function act(id, what){ await fetch(`/nodes/${id}/${what}`, {method:'POST'}); refresh(); }
const feed = document.getElementById('feed');
new EventSource('/events').onmessage = e => {
  const r = JSON.parse(e.data);
  const line = document.createElement('div');
  line.textContent = `${r.method} ${r.path} → ${r.status} by ${r.backend||'-'} in ${r.ms.toFixed(2)} ms`;
  feed.prepend(line);
  while (feed.childNodes.length > 200) feed.removeChild(feed.lastChild);
};
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;
