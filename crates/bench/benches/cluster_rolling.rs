//! A deploy of a replicated fleet: three `tether node --store cluster`
//! processes behind `tether lb --policy owner` hold N logged-in sessions;
//! sixteen users keep adding to their carts; every node is restarted in
//! turn, first gracefully (SIGTERM: it hands its sessions off), then by
//! SIGKILL. Reported: the time each rolling restart took (each node waited
//! for until every node said "fully replicated"), requests refused, and
//! what was lost: acknowledged writes and sessions (every preloaded session
//! is read back at the end).
//!
//! ```text
//! cargo build --release -p tether-cli
//! cargo bench -p tether-bench --bench cluster_rolling -- [--sessions 100000]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tether_bench::arg;
use tether_testkit::{Client, Fleet, Shoppers, Tally};

fn tether_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/tether")
}

/// Logs `n` members in through the balancer; returns their session cookies.
async fn preload(base: &str, n: usize) -> Vec<String> {
    let base: Arc<str> = base.into();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let base = base.clone();
            async move {
                let client = Client::new();
                for _ in 0..50 {
                    if let Ok(r) = client
                        .post_json(&format!("{base}/login"), &json!({ "member": i }))
                        .await
                    {
                        if r.status == 200 {
                            return client.cookie("SESSION").expect("a session cookie");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("login {i} refused 50 times");
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Reads every preloaded session back: how many are gone.
async fn missing(base: &str, cookies: &[String]) -> usize {
    let base: Arc<str> = base.into();
    futures_util::stream::iter(cookies.iter().cloned())
        .map(|cookie| {
            let base = base.clone();
            async move {
                let client = Client::new();
                client.set_cookie("SESSION", &cookie);
                for _ in 0..50 {
                    if let Ok(r) = client.get(&format!("{base}/mypage")).await {
                        match r.status.as_u16() {
                            200 => return 0,
                            401 => return 1,
                            _ => {}
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                1
            }
        })
        .buffer_unordered(64)
        .fold(0, |a, b| async move { a + b })
        .await
}

async fn rolling(fleet: &mut Fleet, graceful: bool) -> (Duration, Tally) {
    let shoppers = Shoppers::log_in(&fleet.url(), 16).await.expect("users");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = shoppers.shop(Duration::from_millis(20), stopped);
    let progress = running.progress();
    progress
        .more(200, Duration::from_secs(60))
        .await
        .expect("writing");
    let started = Instant::now();
    for n in ["A", "B", "C"] {
        fleet.restart(n, graceful).await;
    }
    let took = started.elapsed();
    progress
        .more(200, Duration::from_secs(60))
        .await
        .expect("writing");
    stop.send(true).expect("stop");
    (took, running.check().await.expect("check"))
}

fn main() {
    let sessions = arg("--sessions", 100_000usize);
    let bin = tether_bin();
    assert!(
        bin.exists(),
        "{} missing: cargo build --release -p tether-cli",
        bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut fleet = Fleet::start(&bin, "backup", &["A", "B", "C"]).await;
        let started = Instant::now();
        let cookies = preload(&fleet.url(), sessions).await;
        eprintln!("{sessions} logins in {:?}", started.elapsed());
        fleet.wait_replicated().await;
        println!("| rolling restart of 3 nodes, {sessions} sessions, 16 users writing | took | requests | refused | acknowledged writes lost | users logged out |");
        println!("|---|---|---|---|---|---|");
        for (name, graceful) in [("SIGTERM (hand-off)", true), ("SIGKILL", false)] {
            let (took, t) = rolling(&mut fleet, graceful).await;
            println!(
                "| {name} | {:.1} s | {} | {} | {} | {} |",
                took.as_secs_f64(),
                t.requests,
                t.refused,
                t.lost,
                t.logged_out
            );
            for (why, n) in &t.refusals {
                eprintln!("  {n} × {}", why.trim());
            }
        }
        let gone = missing(&fleet.url(), &cookies).await;
        println!("\npreloaded sessions missing after both rolling restarts: {gone} of {sessions}");
    });
}
