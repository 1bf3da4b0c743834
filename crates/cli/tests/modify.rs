//! Two tabs, one cart: eight clients share one session and each adds 50
//! items at the same time to the reference node's `/cart` (which uses
//! `Session::modify`). Every item answered 200 must be in the cart at the
//! end, on every store. (Before `modify` was atomic, 15 of 400 went missing
//! on `--store memory` and 151 of 400 on Redis.)

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tether_testkit::{node_args, Client, Fleet, Process, RedisServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

const CLIENTS: usize = 8;
const EACH: usize = 50;

/// Logs in through `base`, then races the clients; returns the items
/// acknowledged, the final cart and how many requests were refused.
async fn race(base: &str) -> (Vec<String>, Vec<String>, usize) {
    race_through(&[base]).await
}

/// As [`race`], client `c` sending through `bases[c % bases.len()]`.
async fn race_through(bases: &[&str]) -> (Vec<String>, Vec<String>, usize) {
    let base = bases[0];
    let owner = Client::new();
    let r = owner
        .post_json(&format!("{base}/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = owner.cookie("SESSION").unwrap();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let base: Arc<str> = bases[c % bases.len()].into();
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let tab = Client::new();
            tab.set_cookie("SESSION", &cookie);
            let (mut acked, mut refused) = (Vec::new(), 0);
            for i in 0..EACH {
                let item = format!("c{c}-{i}");
                let r = tab
                    .post_json(&format!("{base}/cart"), &json!({ "item": item }))
                    .await
                    .unwrap();
                if r.status != 200 {
                    eprintln!("refused: {} {}", r.status, r.text().trim());
                    refused += 1;
                    continue;
                }
                let cart: Vec<String> =
                    serde_json::from_value(r.json().unwrap()["cart"].clone()).unwrap();
                assert!(cart.contains(&item), "a 200 whose cart lacks its item");
                acked.push(item);
            }
            (acked, refused)
        }));
    }
    let (mut acked, mut refused) = (Vec::new(), 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        acked.extend(a);
        refused += r;
    }
    let r = owner
        .post_json(&format!("{base}/cart"), &json!({"item": "final"}))
        .await
        .unwrap();
    let cart: Vec<String> = serde_json::from_value(r.json().unwrap()["cart"].clone()).unwrap();
    (acked, cart, refused)
}

fn check(store: &str, (acked, cart, refused): (Vec<String>, Vec<String>, usize)) {
    let lost: Vec<&String> = acked.iter().filter(|i| !cart.contains(i)).collect();
    eprintln!(
        "{store}: {} of {} acknowledged, {} lost, {refused} refused",
        acked.len(),
        CLIENTS * EACH,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{store}: acknowledged items lost: {lost:?}"
    );
    // An ordinary race is retried, never an error.
    assert_eq!(refused, 0, "{store}: requests refused");
    assert_eq!(acked.len(), CLIENTS * EACH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_lose_nothing_in_memory() {
    let node = Process::spawn(bin(), &node_args("A", "memory"))
        .await
        .unwrap();
    check("memory", race(&node.url("")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_lose_nothing_in_redis() {
    let redis = RedisServer::start().await.unwrap();
    let args = node_args("A", &redis.url());
    let node = Process::spawn(bin(), &args).await.unwrap();
    check("redis", race(&node.url("")).await);
}

/// Two nodes with near caches, the tabs split between them: each node's
/// copy goes stale at every write of the other; the conditional write
/// catches it and the retry reads Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_through_two_near_caches_lose_nothing() {
    let redis = RedisServer::start().await.unwrap();
    let mut nodes = Vec::new();
    for id in ["A", "B"] {
        let mut args = node_args(id, &redis.url());
        args.push("--redis-near-cache".into());
        nodes.push(Process::spawn(bin(), &args).await.unwrap());
    }
    let (a, b) = (nodes[0].url(""), nodes[1].url(""));
    check("redis, near cache", race_through(&[&a, &b]).await);
    let (mut hits, mut invalidations) = (0.0, 0.0);
    for n in &nodes {
        let text = Client::new().get(&n.url("/metrics")).await.unwrap().text();
        let metric = |name: &str| tether_cli::demo::metric(&text, name);
        hits += metric("tether_redis_near_cache_hits_total");
        invalidations += metric("tether_redis_near_cache_invalidations_total");
    }
    assert!(
        hits > 0.0 && invalidations > 0.0,
        "hits {hits}, invalidations {invalidations}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_carts_lose_nothing_in_the_replicated_store() {
    for mode in ["backup", "all"] {
        let fleet = Fleet::start(bin(), mode, &["A", "B", "C"]).await;
        check(mode, race(&fleet.url()).await);
    }
}
