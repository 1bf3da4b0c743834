//! `tether sessions`: an operator lists or ends a user's sessions in a live
//! fleet, through its session store (Redis) or a node's operator endpoints
//! (every strategy, with the node's `--admin-token`).

use std::sync::Arc;

use serde_json::Value;

/// Where the fleet's sessions are reached.
#[derive(Debug, Clone)]
pub enum Target {
    /// The session store itself: `redis://…`, `redis+sentinel://…`,
    /// `redis+cluster://…`.
    Store(String),
    /// A node's operator endpoints, with its token.
    Node {
        /// `http://host:port` of any node of the fleet.
        url: String,
        /// The node's `--admin-token`.
        token: String,
    },
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Print the user's sessions.
    List,
    /// End all of them.
    Revoke,
}

/// Runs `action` for `principal` against `target`; returns the result as
/// JSON (`{"principal", "sessions": [...]}` or `{"principal", "ended": n}`).
///
/// # Errors
/// An unreachable store or node, a refused token, an unusable URL.
pub async fn run(target: &Target, action: Action, principal: &str) -> Result<Value, String> {
    match target {
        Target::Store(url) => {
            let store = tether_redis::RedisStore::open(url).map_err(|e| e.to_string())?;
            let principals = tether::Principals::in_store(Arc::new(store));
            act(&principals, action, principal)
                .await
                .map_err(|e| format!("{action:?} of the sessions: {e}"))
        }
        Target::Node { url, token } => {
            let encoded: String = principal
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let base = url.trim_end_matches('/');
            let (method, path) = match action {
                Action::List => (
                    axum::http::Method::GET,
                    format!("{base}/admin/principals/{encoded}/sessions"),
                ),
                Action::Revoke => (
                    axum::http::Method::POST,
                    format!("{base}/admin/principals/{encoded}/revoke"),
                ),
            };
            let auth = format!("Bearer {token}");
            let r = tether_testkit::Client::new()
                .send(
                    method,
                    &path,
                    &[("authorization", &auth)],
                    axum::body::Bytes::new(),
                )
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            if !r.status.is_success() {
                return Err(format!("{path}: {} {}", r.status, r.text().trim()));
            }
            r.json().map_err(|e| format!("{path}: {e}"))
        }
    }
}

/// Runs `action` for `principal` on `principals` (the CLI against a store,
/// a node's operator endpoints): the JSON both answer with.
///
/// # Errors
/// When the store fails.
pub async fn act(
    principals: &tether::Principals,
    action: Action,
    principal: &str,
) -> Result<Value, tether::StoreError> {
    let now = tether::Timestamp::now();
    Ok(match action {
        Action::List => {
            let list = principals.list(principal, now).await?;
            serde_json::json!({ "principal": principal, "sessions": list })
        }
        Action::Revoke => {
            let ended = principals.end_all(principal, now).await?;
            serde_json::json!({ "principal": principal, "ended": ended })
        }
    })
}

/// The result as a person reads it.
pub fn render(result: &Value) -> String {
    let principal = result["principal"].as_str().unwrap_or_default();
    if let Some(n) = result["ended"].as_u64() {
        return format!("ended {n} sessions of {principal}\n");
    }
    let sessions = result["sessions"].as_array().cloned().unwrap_or_default();
    let mut out = format!("{} sessions of {principal}\n", sessions.len());
    let now = tether::Timestamp::now().0;
    let ago = |v: &Value| {
        v.as_u64()
            .map(|ms| format!("{} s ago", now.saturating_sub(ms) / 1000))
            .unwrap_or_else(|| "-".into())
    };
    for s in &sessions {
        out.push_str(&format!(
            "{}  logged in {:>10}  last used {:>10}  node {:<4} {:<16} {}\n",
            s["ref"].as_str().unwrap_or("?"),
            ago(&s["logged_in"]),
            ago(&s["last_access"]),
            s["node"].as_str().unwrap_or("-"),
            s["address"].as_str().unwrap_or("-"),
            s["user_agent"].as_str().unwrap_or("-"),
        ));
    }
    out
}
