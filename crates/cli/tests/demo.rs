//! `tether demo` end to end with a small workload: the measured table must
//! say what each strategy is known to do.

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_measures_every_strategy_with_a_node_killed() {
    let out = tokio::process::Command::new(Path::new(env!("CARGO_BIN_EXE_tether")))
        .args(["demo", "--users", "20", "--requests", "6", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["strategy"] == name)
            .unwrap()
            .clone()
    };
    let lost = |r: &serde_json::Value| {
        r["users_logged_out_before_kill"].as_u64().unwrap()
            + r["users_logged_out_after_kill"].as_u64().unwrap()
    };

    let local = row("local");
    assert_eq!(local["still_logged_in_after_switch"], false, "{local}");
    assert!(
        local["users_logged_out_before_kill"].as_u64().unwrap() > 0,
        "{local}"
    );

    for sticky in ["sticky-ip", "sticky-cookie"] {
        let r = row(sticky);
        assert_eq!(r["still_logged_in_after_switch"], true, "{r}");
        assert_eq!(r["users_logged_out_before_kill"], 0, "{r}");
        assert!(
            r["users_logged_out_after_kill"].as_u64().unwrap() > 0,
            "the killed node's users must be lost: {r}"
        );
    }
    for shared in [
        "replicated-all",
        "replicated-backup",
        "redis",
        "sticky-redis",
        "jwt",
    ] {
        let r = row(shared);
        assert!(r["skipped"].is_null(), "{r}");
        assert_eq!(r["still_logged_in_after_switch"], true, "{r}");
        assert_eq!(lost(&r), 0, "{shared} lost a logged-in user: {r}");
        assert_eq!(r["users"], 20);
    }
    // The near cache answers the sticky users' reads: fewer Redis round
    // trips per request than plain Redis behind round robin.
    let trips = |name: &str| row(name)["store_round_trips_per_request"].as_f64().unwrap();
    assert!(
        trips("sticky-redis") < trips("redis"),
        "sticky-redis {} vs redis {}",
        trips("sticky-redis"),
        trips("redis")
    );
    for replicated in ["replicated-all", "replicated-backup"] {
        let r = row(replicated);
        assert!(
            r["replication_messages_per_write"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_is_one_self_contained_page_with_charts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    let out = tokio::process::Command::new(Path::new(env!("CARGO_BIN_EXE_tether")))
        .args([
            "demo",
            "--only",
            "local,replicated-backup",
            "--users",
            "6",
            "--requests",
            "4",
            "--sweep-nodes",
            "2,3",
        ])
        .arg("--report")
        .arg(&path)
        .arg("--json")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sweep = doc["sweep"].as_array().unwrap();
    let messages = |s: &str, n: u64| {
        sweep
            .iter()
            .find(|r| r["strategy"] == s && r["nodes"] == n)
            .unwrap()["messages_per_write"]
            .as_f64()
            .unwrap()
    };
    // All-to-all sends N-1 messages per write; owner + 1 backup sends one.
    assert!((messages("replicated-all", 3) - 2.0).abs() < 0.01);
    assert!((messages("replicated-backup", 3) - 1.0).abs() < 0.01);
    let html = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "latency, nodes, logouts, sweep"
    );
    for needle in [
        "Latency through the balancer",
        "Users logged out over time",
        "replicated-backup",
    ] {
        assert!(html.contains(needle), "{needle}");
    }
    // Nothing is fetched from the network: the only URL is the SVG namespace.
    let urls: Vec<&str> = html
        .match_indices("http")
        .map(|(i, _)| &html[i..i + 26])
        .collect();
    assert!(
        urls.iter()
            .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
        "{urls:?}"
    );
}
