//! A user's sessions on real fleets: the device list (`GET /sessions`),
//! revoking one device, "log out everywhere", the session limit and the
//! operator command (`tether sessions`), on Redis, Redis with near caches,
//! tokens with a revocation store and the replicated store. Revocation
//! latency — from the answer to "log out everywhere" until every node
//! refuses every device — is measured and printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::Method;
use serde_json::{json, Value};
use tether_testkit::{node_args, Client, Fleet, Process, RedisServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Logs `client` in as member 7 through `base`, as browser `ua`.
async fn login(client: &Client, base: &str, ua: &str) {
    let r = client
        .send(
            Method::POST,
            &format!("{base}/login"),
            &[("content-type", "application/json"), ("user-agent", ua)],
            Bytes::from_static(b"{\"member\": 7}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "login: {}", r.text());
}

async fn sessions(client: &Client, base: &str) -> Vec<Value> {
    let r = client.get(&format!("{base}/sessions")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["sessions"], "exactly {{\"sessions\": [...]}}: {v}");
    v["sessions"].as_array().unwrap().clone()
}

async fn status(client: &Client, base: &str) -> u16 {
    client
        .get(&format!("{base}/mypage"))
        .await
        .unwrap()
        .status
        .as_u16()
}

/// The scenario on a fleet whose nodes are `bases` (one base: a balancer).
/// Returns the revocation latency of "log out everywhere".
async fn devices_then_everywhere(bases: &[String]) -> Duration {
    let at = |i: usize| bases[i % bases.len()].as_str();
    let devices: Vec<Client> = (0..3).map(|_| Client::new()).collect();
    for (i, d) in devices.iter().enumerate() {
        login(d, at(i), &format!("browser-{i}")).await;
    }
    // Device 0 sees three sessions, its own marked, none showing an ID.
    let list = sessions(&devices[0], at(0)).await;
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list.iter().filter(|s| s["current"] == true).count(), 1);
    for s in &list {
        for key in ["ref", "current", "created", "last_access"] {
            assert!(s.get(key).is_some(), "{key} missing: {s}");
        }
        for d in &devices {
            let id = d.cookie("SESSION").unwrap();
            assert!(
                !id.contains(s["ref"].as_str().unwrap()),
                "a ref shows an ID"
            );
        }
    }
    let mine = list.iter().find(|s| s["current"] == true).unwrap();
    assert_eq!(mine["user_agent"], "browser-0");
    // Revoke device 1 from device 0, on another node.
    let one = list
        .iter()
        .find(|s| s["user_agent"] == "browser-1")
        .unwrap()["ref"]
        .as_str()
        .unwrap()
        .to_string();
    let r = devices[0]
        .post_json(&format!("{}/sessions/{one}/revoke", at(1)), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["ended"], true);
    tether_testkit::eventually(Duration::from_secs(5), "device 1 refused", || async {
        (status(&devices[1], at(2)).await == 401).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(status(&devices[2], at(2)).await, 200);
    assert_eq!(sessions(&devices[2], at(0)).await.len(), 2);

    // Everywhere: every device refused on every node.
    let r = devices[2]
        .post_json(&format!("{}/logout-everywhere", at(0)), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let done = Instant::now();
    for d in [&devices[0], &devices[2]] {
        for i in 0..bases.len() {
            tether_testkit::eventually(Duration::from_secs(5), "refused everywhere", || async {
                (status(d, at(i)).await == 401).then_some(())
            })
            .await
            .unwrap();
        }
    }
    done.elapsed()
}

async fn redis_nodes(redis: &RedisServer, extra: &[&str]) -> Vec<Process> {
    let mut nodes = Vec::new();
    for id in ["A", "B", "C"] {
        let mut args = node_args(id, &redis.url());
        args.extend(extra.iter().map(|s| s.to_string()));
        nodes.push(Process::spawn(bin(), &args).await.unwrap());
    }
    nodes
}

fn bases(nodes: &[Process]) -> Vec<String> {
    nodes.iter().map(|n| n.url("")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_user_sees_and_ends_their_sessions_on_every_node() {
    let redis = RedisServer::start().await.unwrap();
    let nodes = redis_nodes(&redis, &[]).await;
    let latency = devices_then_everywhere(&bases(&nodes)).await;
    eprintln!("redis: every node refused every device {latency:?} after 'log out everywhere'");
    let cached = redis_nodes(&redis, &["--redis-near-cache"]).await;
    let latency = devices_then_everywhere(&bases(&cached)).await;
    eprintln!("redis + near cache: every node refused every device {latency:?} after");
    // Every event was seen and counted.
    let text = Client::new()
        .get(&nodes[0].url("/metrics"))
        .await
        .unwrap()
        .text();
    assert!(
        text.contains("tether_session_events_total{node=\"A\",kind=\"created\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_a_revocation_store_are_listed_and_ended_on_every_node() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys: PathBuf = dir.path().join("keys.toml");
    std::fs::write(&keys, tether_jwt::generate_hs256_key_file("k")).unwrap();
    let mut nodes = Vec::new();
    for id in ["A", "B", "C"] {
        let mut args = node_args(id, "jwt");
        args.extend([
            "--jwt-key-file".to_string(),
            keys.display().to_string(),
            "--jwt-revocation".to_string(),
            redis.url(),
        ]);
        nodes.push(Process::spawn(bin(), &args).await.unwrap());
    }
    let latency = devices_then_everywhere(&bases(&nodes)).await;
    eprintln!("jwt + revocation store: every node refused every device {latency:?} after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_replicated_store_a_user_sees_and_ends_their_sessions() {
    let fleet = Fleet::start(bin(), "backup", &["A", "B", "C"]).await;
    let latency = devices_then_everywhere(&[fleet.url()]).await;
    eprintln!("replicated (backup): every device refused {latency:?} after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_limit_holds_across_nodes_and_operators_revoke_from_the_command_line() {
    let redis = RedisServer::start().await.unwrap();
    let nodes = redis_nodes(
        &redis,
        &[
            "--max-sessions-per-user",
            "2",
            "--max-sessions-policy",
            "refuse",
            "--admin-token",
            "s3cret",
        ],
    )
    .await;
    let b = bases(&nodes);
    let (one, two, three) = (Client::new(), Client::new(), Client::new());
    login(&one, &b[0], "one").await;
    login(&two, &b[1], "two").await;
    let r = three
        .post_json(&format!("{}/login", b[2]), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("at most 2"), "{}", r.text());

    // The operator lists, then ends, the user's sessions.
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(bin())
            .args(&args)
            .env_remove("TETHER_ADMIN_TOKEN")
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let args = |verb: &str, target: &[&str]| {
        let mut a = vec!["sessions".to_string(), verb.to_string()];
        a.extend(target.iter().map(|s| s.to_string()));
        a.extend([
            "--principal".to_string(),
            "7".to_string(),
            "--json".to_string(),
        ]);
        a
    };
    let url = redis.url();
    let (ok, out, err) = run(args("list", &["--store", &url])).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 2, "{out}");
    // Through a node: the token is required.
    let (ok, _, err) = run(args("list", &["--node", &b[0], "--admin-token", "wrong"])).await;
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, out, err) = run(args(
        "revoke",
        &["--node", &b[1], "--admin-token", "s3cret"],
    ))
    .await;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["ended"], 2);
    for c in [&one, &two] {
        for base in &b {
            assert_eq!(status(c, base).await, 401);
        }
    }
    // The slots are free again.
    login(&three, &b[2], "three").await;
    let (ok, out, _) = run(vec![
        "sessions".into(),
        "list".into(),
        "--store".into(),
        url.clone(),
        "--principal".into(),
        "7".into(),
    ])
    .await;
    assert!(ok && out.starts_with("1 sessions of 7"), "{out}");
}
