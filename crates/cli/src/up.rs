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
use tether_testkit::{Client, Process, RedisServer};
use tokio::sync::Mutex;

use crate::demo::{policy_of, strategy_node_args, wait_ready};

/// Settings of `tether up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The strategy.
    pub strategy: String,
    /// Where the app (the balancer) listens.
    pub listen: SocketAddr,
    /// Where the dashboard listens.
    pub dashboard: SocketAddr,
    /// An existing Redis for the `redis` strategy.
    pub redis_url: Option<String>,
}

struct Slot {
    id: &'static str,
    http: SocketAddr,
    process: Option<Process>,
}

struct Up {
    bin: PathBuf,
    strategy: String,
    app: SocketAddr,
    slots: Mutex<Vec<Slot>>,
    lb: tether_lb::Handle,
    dir: tempfile::TempDir,
    redis: Option<String>,
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
    let _private_redis;
    let redis = match (&config.redis_url, config.strategy.as_str()) {
        (Some(u), _) => Some(u.clone()),
        (None, s) if crate::demo::uses_redis(s) => {
            let r = RedisServer::start().await.map_err(|e| e.to_string())?;
            let url = r.url();
            _private_redis = r;
            Some(url)
        }
        _ => None,
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut slots = Vec::new();
    for id in ["A", "B", "C"] {
        let seed = slots
            .first()
            .and_then(|s: &Slot| s.process.as_ref()?.addrs().get(1).copied());
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let (args, n) = strategy_node_args(
            &config.strategy,
            id,
            any,
            seed,
            dir.path(),
            redis.as_deref(),
        )?;
        let p = Process::spawn_n(&bin, &args, n)
            .await
            .map_err(|e| e.to_string())?;
        slots.push(Slot {
            id,
            http: p.addr(),
            process: Some(p),
        });
    }
    wait_ready(
        &slots
            .iter()
            .filter_map(|s| s.process.as_ref())
            .collect::<Vec<_>>(),
        3,
    )
    .await?;

    let policy: tether_lb::PolicyKind = policy_of(&config.strategy).parse()?;
    let backends = slots
        .iter()
        .map(|s| tether_lb::BackendConfig {
            id: s.id.into(),
            addr: s.http.to_string(),
            weight: 1,
        })
        .collect();
    let mut lb_config = tether_lb::Config::new(config.listen, policy, backends);
    lb_config.health.interval_ms = 500;
    let balancer = tether_lb::Balancer::bind(lb_config, None)
        .await
        .map_err(|e| e.to_string())?;
    let app = balancer.local_addr().map_err(|e| e.to_string())?;
    let up = Arc::new(Up {
        bin,
        strategy: config.strategy.clone(),
        app,
        slots: Mutex::new(slots),
        lb: balancer.handle(),
        dir,
        redis,
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
    // Dropping the slots kills the nodes; the temp dir goes with `up`.
    up.slots.lock().await.clear();
    Ok(())
}

async fn state(State(up): State<Arc<Up>>) -> Json<serde_json::Value> {
    let status = up.lb.status();
    let mut nodes = Vec::new();
    // Copy what is needed and let go of the lock: a slow node must not hold
    // up the kill and restart buttons.
    let slots: Vec<(&'static str, SocketAddr, bool)> = up
        .slots
        .lock()
        .await
        .iter()
        .map(|s| (s.id, s.http, s.process.is_some()))
        .collect();
    for (id, http, running) in slots {
        let stats = if running {
            match Client::new().get(&format!("http://{}/stats", http)).await {
                Ok(r) => r.json().unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            }
        } else {
            serde_json::Value::Null
        };
        let metrics = if running {
            Client::new()
                .get(&format!("http://{}/metrics", http))
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
            .and_then(|b| b.iter().find(|b| b["id"] == id))
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
        "strategy": up.strategy,
        "policy": policy_of(&up.strategy),
        "app": format!("http://{}", up.app),
        "nodes": nodes,
    }))
}

async fn kill(State(up): State<Arc<Up>>, Path(id): Path<String>) -> Response {
    let mut slots = up.slots.lock().await;
    let Some(slot) = slots.iter_mut().find(|s| s.id == id) else {
        return (StatusCode::NOT_FOUND, "no such node").into_response();
    };
    match slot.process.take() {
        Some(mut p) => {
            // SIGKILL, as a crash: no draining, no goodbye.
            p.kill().await;
            Json(json!({ "killed": id })).into_response()
        }
        None => (StatusCode::CONFLICT, "already down").into_response(),
    }
}

async fn restart(State(up): State<Arc<Up>>, Path(id): Path<String>) -> Response {
    let mut slots = up.slots.lock().await;
    let seed = slots
        .iter()
        .filter(|s| s.id != id)
        .find_map(|s| s.process.as_ref()?.addrs().get(1).copied());
    let Some(slot) = slots.iter_mut().find(|s| s.id == id) else {
        return (StatusCode::NOT_FOUND, "no such node").into_response();
    };
    if slot.process.is_some() {
        return (StatusCode::CONFLICT, "already running").into_response();
    }
    let args = strategy_node_args(
        &up.strategy,
        slot.id,
        slot.http,
        seed,
        up.dir.path(),
        up.redis.as_deref(),
    );
    let started = match args {
        Ok((args, n)) => Process::spawn_n(&up.bin, &args, n)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match started {
        Ok(p) => {
            slot.process = Some(p);
            Json(json!({ "restarted": id })).into_response()
        }
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
            .replace("{{STRATEGY}}", &up.strategy),
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
