//! The replicated store with real node processes and `tether lb --policy owner`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tether_testkit::{eventually, lb_args, node_args, Client, Process};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

const SECRET: &str = "cluster-test-secret";

/// A cluster node; `http` pins its HTTP address (for a restart behind a balancer).
async fn node(id: &str, mode: &str, seed: Option<SocketAddr>, http: Option<SocketAddr>) -> Process {
    let mut args = node_args(id, "cluster");
    if let Some(addr) = http {
        let i = args.iter().position(|a| a == "127.0.0.1:0").unwrap();
        args[i] = addr.to_string();
    }
    args.extend(
        [
            "--cluster-listen",
            "127.0.0.1:0",
            "--cluster-secret",
            SECRET,
            "--replication",
            mode,
        ]
        .map(String::from),
    );
    if let Some(seed) = seed {
        args.extend(["--peer".to_string(), format!("seed={seed}")]);
    }
    Process::spawn_n(bin(), &args, 2).await.unwrap()
}

/// Waits until each node sees `live` members and reports ready.
async fn wait_ready(nodes: &[&Process], live: usize) {
    for n in nodes {
        let (health, stats) = (n.url("/health"), n.url("/stats"));
        eventually(Duration::from_secs(30), "node ready", || {
            let (health, stats) = (health.clone(), stats.clone());
            async move {
                let s = Client::new().get(&stats).await.ok()?.json().ok()?;
                let seen = s["cluster_live"].as_array()?.len();
                (seen == live && Client::new().get(&health).await.ok()?.status == 200).then_some(())
            }
        })
        .await
        .unwrap();
    }
}

async fn three(mode: &str) -> Vec<Process> {
    let a = node("A", mode, None, None).await;
    let seed = a.addrs()[1];
    let b = node("B", mode, Some(seed), None).await;
    let c = node("C", mode, Some(seed), None).await;
    wait_ready(&[&a, &b, &c], 3).await;
    vec![a, b, c]
}

/// `tether lb --policy owner` in front of nodes A, B, C.
async fn owner_balancer(nodes: &[Process]) -> Process {
    let backends: Vec<(&str, SocketAddr)> = ["A", "B", "C"]
        .into_iter()
        .zip(nodes.iter().map(Process::addr))
        .collect();
    Process::spawn_n(bin(), &lb_args("owner", &backends), 2)
        .await
        .unwrap()
}

fn index(id: &str) -> usize {
    ["A", "B", "C"].iter().position(|x| *x == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_dies_and_the_user_stays_logged_in() {
    let mut nodes = three("backup").await;
    let lb = owner_balancer(&nodes).await;
    let user = Client::new();
    let login = user
        .post_json(&lb.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.text());
    let id = tether_core::SessionId::parse(&user.cookie("SESSION").unwrap()).unwrap();
    let owner = tether_core::placement::session_owner(&id, &["A", "B", "C"])
        .unwrap()
        .to_string();
    // The login was served by the owner (the node drew an ID it owns).
    assert_eq!(login.node().unwrap(), owner);
    let r = user.get(&lb.url("/mypage")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.node().unwrap()), (200, owner.clone()));

    let i = index(&owner);
    let http = nodes[i].addr();
    nodes[i].kill().await;
    // Through the balancer, the first backup answers at once: never a 401.
    for _ in 0..5 {
        let r = user.get(&lb.url("/mypage")).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "logged out after the owner died: {}",
            r.text()
        );
        assert_ne!(r.node().unwrap(), owner);
    }
    // Writes keep working while the cluster notices the death.
    let cart = user
        .post_json(&lb.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    assert_eq!(cart.status, 200, "{}", cart.text());

    // The owner comes back under a new generation, pulls its sessions and
    // reports ready; then it serves the session again, with the cart.
    let seed = nodes[(i + 1) % 3].addrs()[1];
    nodes[i] = node(&owner, "backup", Some(seed), Some(http)).await;
    wait_ready(&[&nodes[i]], 3).await;
    let r = eventually(
        Duration::from_secs(20),
        "the returned owner serving the session",
        || async {
            let r = user.get(&lb.url("/mypage")).await.ok()?;
            (r.status == 200 && r.node().as_deref() == Some(owner.as_str())).then_some(r)
        },
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let cart = user
        .post_json(&lb.url("/cart"), &json!({"item": "pen"}))
        .await
        .unwrap();
    assert_eq!(cart.json().unwrap()["cart"], json!(["book", "pen"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_to_all_survives_two_of_three_nodes_dying() {
    let mut nodes = three("all").await;
    let user = Client::new();
    let r = user
        .post_json(&nodes[0].url("/login"), &json!({"member": 5}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    nodes[0].kill().await;
    nodes[1].kill().await;
    let r = user.get(&nodes[2].url("/mypage")).await.unwrap();
    assert_eq!(r.json().unwrap(), json!({"member": 5, "node": "C"}));
}

/// Under a bounded write load, SIGKILL a node: every write the client saw
/// acknowledged must still be there (sync replication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_when_a_node_dies() {
    let mut nodes = three("backup").await;
    let lb = owner_balancer(&nodes).await;
    let mut clients = Vec::new();
    for c in 0..9 {
        let client = Client::new();
        let r = client
            .post_json(&lb.url("/login"), &json!({"member": c}))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        clients.push(client);
    }
    let url = lb.url("/cart");
    let mut tasks = Vec::new();
    for client in clients.clone() {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..40 {
                let item = format!("item{i}");
                match client.post_json(&url, &json!({"item": item})).await {
                    Ok(r) if r.status == 200 => acked.push(item),
                    _ => failed += 1,
                }
            }
            (acked, failed)
        }));
    }
    // Kill B while the writes run.
    eventually(Duration::from_secs(10), "writes under way", || async {
        let s = Client::new()
            .get(&nodes[1].url("/stats"))
            .await
            .ok()?
            .json()
            .ok()?;
        (s["requests"].as_u64()? > 20).then_some(())
    })
    .await
    .unwrap();
    nodes[1].kill().await;
    let mut lost = 0;
    let mut failed_total = 0;
    let mut by_client = HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (acked, failed) = t.await.unwrap();
        failed_total += failed;
        by_client.insert(i, acked);
    }
    for (i, client) in clients.iter().enumerate() {
        let r = client.get(&lb.url("/mypage")).await.unwrap();
        assert_eq!(r.status, 200, "client {i} logged out: {}", r.text());
        let cart = client
            .post_json(&lb.url("/cart"), &json!({"item": "check"}))
            .await
            .unwrap();
        let items: Vec<String> =
            serde_json::from_value(cart.json().unwrap()["cart"].clone()).unwrap();
        lost += by_client[&i]
            .iter()
            .filter(|it| !items.contains(it))
            .count();
    }
    eprintln!("write load with a SIGKILL: {lost} acknowledged writes lost, {failed_total} writes refused (503/502) during the failover");
    assert_eq!(lost, 0, "acknowledged writes were lost");
}
