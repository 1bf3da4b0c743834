//! `tether demo --sweep-nodes 2,3,5,8`: replication cost against cluster
//! size, for both replicated strategies.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use tether_testkit::Client;

use super::measure::Snapshot;
use crate::fleet::Fleet;
use crate::strategy::Strategy;

/// Replication cost at one cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// `replicated-all` or `replicated-backup`.
    pub strategy: Strategy,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Replication messages per write.
    pub messages_per_write: f64,
    /// Replication bytes per write.
    pub bytes_per_write: f64,
    /// Write (`POST /cart` at the owner) latency, ms.
    pub write_p50_ms: f64,
    /// Write latency, ms.
    pub write_p99_ms: f64,
}

/// Measures replication cost against cluster size: for each size, a
/// cluster of node processes, one user writing to its session at the owner.
///
/// # Errors
/// If a cluster does not form or a write fails.
pub async fn sweep(bin: &Path, sizes: &[usize], writes: usize) -> Result<Vec<SweepRow>, String> {
    let mut rows = Vec::new();
    for strategy in [Strategy::ReplicatedAll, Strategy::ReplicatedBackup] {
        for &n in sizes {
            let ids: Vec<String> = (0..n).map(|i| format!("N{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let fleet = Fleet::start(bin, strategy, &ids, None).await?;
            let node = &fleet.nodes()[0];
            let user = Client::new();
            let fail = |e: tether_testkit::Error| e.to_string();
            user.post_json(&node.url("/login"), &json!({"member": 1}))
                .await
                .map_err(fail)?;
            let before = Snapshot::take(&fleet).await;
            let mut lat = Vec::with_capacity(writes);
            for i in 0..writes {
                let started = Instant::now();
                // A bounded cart: the session stays small, as sessions do.
                let r = user
                    .post_json(&node.url("/cart"), &json!({"item": format!("i{}", i % 5)}))
                    .await;
                lat.push(started.elapsed());
                if r.map(|r| r.status != 200).unwrap_or(true) {
                    return Err(format!("a write failed at N = {n}"));
                }
                if i % 5 == 4 {
                    user.post_json(&node.url("/logout"), &json!({}))
                        .await
                        .map_err(fail)?;
                    user.post_json(&node.url("/login"), &json!({"member": 1}))
                        .await
                        .map_err(fail)?;
                }
            }
            let counted = Snapshot::take(&fleet).await.since(&before);
            lat.sort();
            let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
            // Logins and logouts replicate too (with the user's session
            // index, two writes each): count every write the owners made.
            let total_writes = counted.writes.max(1.0);
            rows.push(SweepRow {
                strategy,
                nodes: n,
                messages_per_write: counted.messages / total_writes,
                bytes_per_write: counted.bytes / total_writes,
                write_p50_ms: pct(0.5),
                write_p99_ms: pct(0.99),
            });
        }
    }
    Ok(rows)
}
