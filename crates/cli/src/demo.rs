//! `tether demo`: the brief's scenario, measured on this machine.
//!
//! This build runs the `local` strategy only — the honest baseline: two nodes
//! that each keep sessions in their own memory, a login on node A, then the
//! next page on node B. The other strategies (sticky load balancing,
//! replication, Redis, JWT) join the table as they land.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tether_testkit::{node_args, Client, Process};

/// What the scenario observed for one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The strategy's name.
    pub strategy: String,
    /// The node the login went to, and its status.
    pub login_node: String,
    /// Status of the login.
    pub login_status: u16,
    /// Status of `/mypage` on the node that served the login.
    pub same_node_status: u16,
    /// The node asked next.
    pub other_node: String,
    /// Status of `/mypage` on the other node.
    pub other_node_status: u16,
    /// Whether the user was still logged in on the other node.
    pub still_logged_in: bool,
    /// Wall time of the three requests, in milliseconds.
    pub elapsed_ms: f64,
}

/// Runs the `local` scenario with nodes started from `bin` (this executable).
///
/// # Errors
/// If a node cannot start or a request fails at the transport level.
pub async fn run_local(bin: &Path) -> tether_testkit::Result<ScenarioResult> {
    let a = Process::spawn(bin, &node_args("A", "memory")).await?;
    let b = Process::spawn(bin, &node_args("B", "memory")).await?;
    let user = Client::new();
    let started = Instant::now();
    let login = user
        .post_json(&a.url("/login"), &serde_json::json!({ "member": 7 }))
        .await?;
    let same = user.get(&a.url("/mypage")).await?;
    let other = user.get(&b.url("/mypage")).await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(ScenarioResult {
        strategy: "local".into(),
        login_node: login.node().unwrap_or_default(),
        login_status: login.status.as_u16(),
        same_node_status: same.status.as_u16(),
        other_node: other.node().unwrap_or_default(),
        other_node_status: other.status.as_u16(),
        still_logged_in: other.status.is_success(),
        elapsed_ms,
    })
}

/// The scenario as a table for people.
pub fn render(results: &[ScenarioResult]) -> String {
    let mut out = String::new();
    out.push_str("The brief's scenario: log in on one server, open the next page on another.\n\n");
    out.push_str(&format!(
        "{:<10} {:<14} {:<18} {:<20} {}\n",
        "strategy", "login", "/mypage same node", "/mypage other node", "still logged in?"
    ));
    for r in results {
        out.push_str(&format!(
            "{:<10} {:<14} {:<18} {:<20} {}\n",
            r.strategy,
            format!("{} on {}", r.login_status, r.login_node),
            r.same_node_status.to_string(),
            format!("{} on {}", r.other_node_status, r.other_node),
            if r.still_logged_in {
                "yes"
            } else {
                "NO: logged out"
            },
        ));
    }
    out.push_str(
        "\nThis build measures the `local` strategy only (each server keeps its own sessions):\n\
         the problem every other strategy solves. Sticky load balancing, replication, Redis\n\
         and JWT rows are added by their issues; see README.md.\n",
    );
    out
}
