//! The replicated store through the operations a fleet lives through, with
//! real `tether node` processes behind `tether lb --policy owner` and users
//! writing the whole time: rolling restarts (SIGKILL and SIGTERM), scale-out
//! and scale-in, and a fresh fleet. Every cart item a user saw acknowledged
//! is checked at the end; no user may ever be logged out.
//!
//! The scenarios run one at a time (a lock): each is a fleet of up to five
//! nodes, a balancer and sixteen users, which is what a 2-core machine can
//! carry next to the rest of the suite.

use std::path::Path;
use std::time::Duration;

use tether_testkit::{eventually, Client, Fleet, Progress, Shoppers, Tally};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Users shop through the balancer while `ops` runs; returns what they saw.
async fn under_load(
    fleet: &mut Fleet,
    users: usize,
    ops: impl AsyncFnOnce(&mut Fleet, Progress),
) -> Tally {
    let shoppers = Shoppers::log_in(&fleet.url(), users).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = shoppers.shop(Duration::from_millis(20), stopped);
    let progress = running.progress();
    // The users are writing before anything happens…
    progress.more(100, Duration::from_secs(60)).await.unwrap();
    ops(fleet, progress.clone()).await;
    // …and after everything.
    progress.more(100, Duration::from_secs(60)).await.unwrap();
    stop.send(true).unwrap();
    let tally = running.check().await.unwrap();
    if let Ok(dir) = std::env::var("KEEP_LOGS") {
        for (name, m) in &fleet.nodes {
            if let Some(p) = &m.process {
                let path = format!("{dir}/{name}-{}.log", p.pid().unwrap_or(0));
                std::fs::write(path, p.log()).unwrap();
            }
        }
    }
    eprintln!(
        "{} users, {} requests: {} writes acknowledged, {} refused (503), {} lost, {} users logged out",
        tally.users, tally.requests, tally.acked, tally.refused, tally.lost, tally.logged_out
    );
    for (why, n) in &tally.refusals {
        eprintln!("  {n} × {why}");
    }
    tally
}

fn assert_nothing_lost(t: &Tally) {
    assert!(t.acked > 100, "the users wrote: {t:?}");
    assert_eq!(t.lost, 0, "acknowledged writes lost: {:#?}", t.problems);
    assert_eq!(t.logged_out, 0, "users logged out: {:#?}", t.problems);
}

async fn rolling_restart(mode: &'static str, graceful: bool) -> Tally {
    let mut fleet = Fleet::start(bin(), mode, &["A", "B", "C"]).await;
    under_load(
        &mut fleet,
        16,
        async |fleet: &mut Fleet, progress: Progress| {
            for n in ["A", "B", "C"] {
                fleet.restart(n, graceful).await;
                // A deploy moves on once the node is healthy and serving.
                progress.more(50, Duration::from_secs(60)).await.unwrap();
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_by_sigkill_loses_no_session_and_no_acknowledged_write() {
    let _one = SERIAL.lock().await;
    for mode in ["backup", "all"] {
        let t = rolling_restart(mode, false).await;
        assert_nothing_lost(&t);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_by_sigterm_hands_sessions_off_and_loses_nothing() {
    let _one = SERIAL.lock().await;
    let t = rolling_restart("backup", true).await;
    assert_nothing_lost(&t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_by_two_then_scale_in_by_one_loses_nothing() {
    let _one = SERIAL.lock().await;
    let mut fleet = Fleet::start(bin(), "backup", &["A", "B", "C"]).await;
    let t = under_load(
        &mut fleet,
        16,
        async |fleet: &mut Fleet, progress: Progress| {
            // Two nodes join at once; the balancer learns of them by a reload
            // once they hold their share.
            fleet.add("D");
            fleet.add("E");
            fleet.boot("D").await;
            fleet.boot("E").await;
            fleet.wait_replicated().await;
            fleet.balance(&["A", "B", "C", "D", "E"]).await;
            progress.more(50, Duration::from_secs(60)).await.unwrap();
            // Scale-in: drain B at the balancer, stop it (it hands off), and
            // take it out of the configuration.
            let drain = fleet.admin("/backends/B/drain");
            let r = Client::new()
                .send(http::Method::POST, &drain, &[], Default::default())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            fleet.stop("B").await;
            fleet.nodes.remove("B");
            fleet.balance(&["A", "C", "D", "E"]).await;
            fleet.wait_replicated().await;
        },
    )
    .await;
    assert_nothing_lost(&t);
    // Each session lives on exactly two nodes again.
    let mut held = 0;
    for n in fleet.running() {
        held += fleet.stats(&n).await.unwrap()["sessions"].as_u64().unwrap();
    }
    assert_eq!(held, 2 * 16, "copies after scale-out and scale-in");
}

/// Regression (issue 11): nodes reported ready before they had seen each
/// other, so the first logins were written without a backup and a SIGKILL
/// of their owner logged the users out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_fleet_is_ready_only_once_formed_and_survives_a_kill() {
    let _one = SERIAL.lock().await;
    let mut fleet = Fleet::start(bin(), "backup", &["A", "B", "C"]).await;
    let users = Shoppers::log_in(&fleet.url(), 12).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = users.shop(Duration::from_millis(20), stopped);
    let progress = running.progress();
    progress.more(100, Duration::from_secs(60)).await.unwrap();
    fleet.kill("B").await;
    eventually(Duration::from_secs(30), "A and C see B gone", || async {
        let s = fleet.stats("A").await?;
        (s["cluster"]["live"].as_array()?.len() == 2).then_some(())
    })
    .await
    .unwrap();
    progress.more(100, Duration::from_secs(60)).await.unwrap();
    stop.send(true).unwrap();
    let t = running.check().await.unwrap();
    assert_nothing_lost(&t);
}
