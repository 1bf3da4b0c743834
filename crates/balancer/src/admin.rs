//! The admin listener: `/status`, `/metrics`, drain and reload.
//!
//! Who may call it: with `admin_token` set, only requests carrying
//! `Authorization: Bearer TOKEN` (compared in constant time); the token is
//! required when the listener is not on loopback. Whatever the token, a
//! request a browser marks as coming from a web page (`Origin`, or
//! `Sec-Fetch-Site` other than `none`) is refused with 403: a page the
//! operator visits cannot drain or reload the balancer with a simple
//! cross-site POST (CSRF), which needs no preflight and would otherwise reach
//! a loopback admin port from the operator's own browser.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Config;
use crate::pool::Member;
use crate::{Generation, Shared};

/// The admin API.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/backends/{id}/drain", post(drain))
        .route("/backends/{id}/undrain", post(undrain))
        .route("/reload", post(reload))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// Refuses requests from web pages and, with a token configured, requests
/// without it.
async fn guard(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let from_page = headers.contains_key("origin")
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none");
    if from_page {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "the admin API does not answer web pages (Origin or Sec-Fetch-Site present)"})),
        )
            .into_response();
    }
    if let Some(token) = &shared.admin_token {
        let given = headers
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given, token.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                Json(
                    json!({"error": "missing or wrong admin token (Authorization: Bearer TOKEN)"}),
                ),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Equality whose time does not depend on where the inputs differ: for
/// comparing secrets (admin tokens) a caller sent.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn backend_json(g: &Generation, m: &Member) -> serde_json::Value {
    let s = &m.stats;
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let responses: serde_json::Map<String, serde_json::Value> = classes
        .iter()
        .zip(&s.responses)
        .map(|(c, n)| ((*c).to_string(), json!(n.load(Ordering::Relaxed))))
        .collect();
    json!({
        "id": &*m.id,
        "addr": m.addr.to_string(),
        "weight": m.weight,
        "state": s.state(g.pool.now_ms(), Config::ms(g.config.health.eject_ms)),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "requests": s.requests.load(Ordering::Relaxed),
        "responses": responses,
        "errors": s.errors.load(Ordering::Relaxed),
        "tunnels": s.tunnels.load(Ordering::Relaxed),
        "consecutive_failures": s.consecutive_failures.load(Ordering::Relaxed),
        // The balancer keeps no stick table; what it knows is how many route
        // cookies it issued pinning clients here.
        "cookies_issued": s.cookies_issued.load(Ordering::Relaxed),
    })
}

/// The whole status document.
pub(crate) fn status_json(shared: &Shared) -> serde_json::Value {
    let g = shared.current.load();
    let t = &shared.totals;
    json!({
        "policy": g.config.policy,
        "listen": g.config.listen.to_string(),
        "requests": t.requests.load(Ordering::Relaxed),
        "retries": t.retries.load(Ordering::Relaxed),
        "reloads": t.reloads.load(Ordering::Relaxed),
        "backends": g.pool.members.iter().map(|m| backend_json(&g, m)).collect::<Vec<_>>(),
    })
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(status_json(&shared))
}

async fn set_drain(shared: &Shared, id: &str, draining: bool) -> Response {
    let g = shared.current.load();
    match g.pool.index_of(id) {
        Some(i) => {
            let m = &g.pool.members[i];
            m.stats.set_draining(draining);
            tracing::info!(backend = id, draining, "drain state changed by admin");
            Json(backend_json(&g, m)).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no backend {id:?}")})),
        )
            .into_response(),
    }
}

async fn drain(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    set_drain(&shared, &id, true).await
}

async fn undrain(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    set_drain(&shared, &id, false).await
}

async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    match crate::reload(&shared) {
        Ok(()) => Json(status_json(&shared)).into_response(),
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let _ = write!(msg, ": {s}");
                source = s.source();
            }
            let code = match e {
                crate::ReloadError::NoFile => StatusCode::CONFLICT,
                crate::ReloadError::Config(_) => StatusCode::BAD_REQUEST,
            };
            (
                code,
                Json(json!({"error": msg, "kept": "the previous configuration"})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        render_metrics(&shared),
    )
}

/// Prometheus text exposition.
pub(crate) fn render_metrics(shared: &Shared) -> String {
    let g = shared.current.load();
    let t = &shared.totals;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "tether_lb_requests_total",
        "Requests received from clients.",
        t.requests.load(Ordering::Relaxed),
    );
    counter(
        "tether_lb_retries_total",
        "Requests sent to another backend after a failed try.",
        t.retries.load(Ordering::Relaxed),
    );
    counter(
        "tether_lb_reloads_total",
        "Configuration reloads applied.",
        t.reloads.load(Ordering::Relaxed),
    );
    let _ = writeln!(out, "# HELP tether_lb_generated_responses_total Error responses generated by the balancer.\n# TYPE tether_lb_generated_responses_total counter");
    for (code, n) in [
        (502, &t.bad_gateway),
        (503, &t.no_backend),
        (504, &t.timeouts),
    ] {
        let _ = writeln!(
            out,
            "tether_lb_generated_responses_total{{code=\"{code}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    let now = g.pool.now_ms();
    let eject = Config::ms(g.config.health.eject_ms);
    let families: [(&str, &str, &str); 6] = [
        (
            "tether_lb_backend_requests_total",
            "counter",
            "Tries sent to the backend.",
        ),
        (
            "tether_lb_backend_errors_total",
            "counter",
            "Tries that failed: connect errors, resets, timeouts.",
        ),
        (
            "tether_lb_backend_in_flight",
            "gauge",
            "Requests in flight on the backend.",
        ),
        (
            "tether_lb_backend_tunnels",
            "gauge",
            "Open WebSocket / Upgrade tunnels to the backend.",
        ),
        (
            "tether_lb_backend_up",
            "gauge",
            "1 if the backend takes new clients, 0 if down or draining.",
        ),
        (
            "tether_lb_backend_responses_total",
            "counter",
            "Responses by status class.",
        ),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in &g.pool.members {
            let s = &m.stats;
            let id = &*m.id;
            match name {
                "tether_lb_backend_requests_total" => {
                    let _ = writeln!(
                        out,
                        "{name}{{backend=\"{id}\"}} {}",
                        s.requests.load(Ordering::Relaxed)
                    );
                }
                "tether_lb_backend_errors_total" => {
                    let _ = writeln!(
                        out,
                        "{name}{{backend=\"{id}\"}} {}",
                        s.errors.load(Ordering::Relaxed)
                    );
                }
                "tether_lb_backend_in_flight" => {
                    let _ = writeln!(
                        out,
                        "{name}{{backend=\"{id}\"}} {}",
                        s.in_flight.load(Ordering::Relaxed)
                    );
                }
                "tether_lb_backend_tunnels" => {
                    let _ = writeln!(
                        out,
                        "{name}{{backend=\"{id}\"}} {}",
                        s.tunnels.load(Ordering::Relaxed)
                    );
                }
                "tether_lb_backend_up" => {
                    let up = s.state(now, eject) == crate::pool::State::Up;
                    let _ = writeln!(out, "{name}{{backend=\"{id}\"}} {}", u8::from(up));
                }
                _ => {
                    for (c, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(&s.responses) {
                        let _ = writeln!(
                            out,
                            "{name}{{backend=\"{id}\",class=\"{c}\"}} {}",
                            n.load(Ordering::Relaxed)
                        );
                    }
                }
            }
        }
    }
    let name = "tether_lb_backend_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time from sending a request to the backend's response headers.\n# TYPE {name} histogram");
    for m in &g.pool.members {
        let (buckets, count, sum_us) = m.stats.latency.snapshot();
        for (le, n) in buckets {
            let _ = writeln!(
                out,
                "{name}_bucket{{backend=\"{}\",le=\"{}\"}} {n}",
                m.id,
                le as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{backend=\"{}\",le=\"+Inf\"}} {count}",
            m.id
        );
        let _ = writeln!(
            out,
            "{name}_sum{{backend=\"{}\"}} {}",
            m.id,
            sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{backend=\"{}\"}} {count}", m.id);
    }
    out
}
