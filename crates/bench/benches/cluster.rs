//! Replication cost against cluster size: the measured answer to "all-to-all
//! replication cost grows with N".
//!
//! For N = 2, 3, 5, 8 nodes on loopback (in this process, real TCP and real
//! gossip) and both modes, it writes one small attribute per request and
//! reports replication messages and bytes per write and the write latency;
//! then the same with a 10 KB session (bytes must follow the delta, not the
//! session). Last, a read at the owner against the same read from Redis.
//!
//! ```text
//! cargo bench -p tether-bench --bench cluster -- [--writes 300]
//! ```

use std::time::{Duration, Instant};

use tether_bench::arg;
use tether_cluster::{ClusterConfig, ClusterStore, Replication};
use tether_core::testing::{json, record_with};
use tether_core::{Delta, Load, SessionId, SessionStore, Timestamp};
use tether_testkit::eventually;

async fn cluster(n: usize, replication: Replication) -> Vec<ClusterStore> {
    let mut nodes: Vec<ClusterStore> = Vec::new();
    for i in 0..n {
        let mut config = ClusterConfig::new(
            format!("N{i}"),
            "127.0.0.1:0".parse().unwrap(),
            b"bench-secret".to_vec(),
        );
        config.replication = replication;
        if let Some(first) = nodes.first() {
            config.seeds = vec![first.addr().to_string()];
        }
        nodes.push(ClusterStore::start(config).await.expect("node"));
    }
    for node in &nodes {
        eventually(Duration::from_secs(30), "cluster formed", || async {
            (node.live_nodes().len() == n && node.is_ready()).then_some(())
        })
        .await
        .expect("cluster");
    }
    nodes
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Row {
    messages: f64,
    bytes: f64,
    p50: Duration,
    p99: Duration,
}

/// Writes one attribute `writes` times, each through the session's owner.
async fn measure(nodes: &[ClusterStore], writes: usize, session_bytes: usize) -> Row {
    let blob = format!("\"{}\"", "x".repeat(session_bytes));
    let now = Timestamp::now();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let r = record_with(now, &[("blob", &blob)]);
        nodes[0].create(&r).await.expect("create");
        ids.push(r.id);
    }
    let owner_of = |id: &SessionId| {
        let live = nodes[0].live_nodes();
        let owner = tether_core::placement::session_owner(id, &live)
            .unwrap()
            .clone();
        nodes.iter().position(|n| n.node_id() == owner).unwrap_or(0)
    };
    let before: (u64, u64) = totals(nodes);
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let id = ids[i % ids.len()];
        let mut d = Delta::default();
        d.set("n", json(&i.to_string()));
        let node = &nodes[owner_of(&id)];
        let started = Instant::now();
        node.apply(&id, &d, Timestamp::now())
            .await
            .expect("apply")
            .expect("live");
        lat.push(started.elapsed());
    }
    let after = totals(nodes);
    lat.sort();
    Row {
        messages: (after.0 - before.0) as f64 / writes as f64,
        bytes: (after.1 - before.1) as f64 / writes as f64,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

fn totals(nodes: &[ClusterStore]) -> (u64, u64) {
    nodes.iter().fold((0, 0), |(m, b), n| {
        (m + n.metrics().messages, b + n.metrics().bytes)
    })
}

fn main() {
    let writes = arg("--writes", 300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("| mode | nodes | session | messages/write | bytes/write | write p50 ms | write p99 ms |");
        println!("|---|---|---|---|---|---|---|");
        for (mode, replication) in [("all", Replication::All), ("backup k=1", Replication::Backup(1))] {
            for n in [2usize, 3, 5, 8] {
                let nodes = cluster(n, replication).await;
                for size in [10usize, 10 * 1024] {
                    let r = measure(&nodes, writes, size).await;
                    println!(
                        "| {mode} | {n} | {} | {:.2} | {:.0} | {:.3} | {:.3} |",
                        if size > 100 { "10 KB" } else { "small" },
                        r.messages,
                        r.bytes,
                        r.p50.as_secs_f64() * 1e3,
                        r.p99.as_secs_f64() * 1e3
                    );
                }
                drop(nodes);
            }
        }

        // A read at the owner (no network) against the same read from Redis.
        let nodes = cluster(3, Replication::Backup(1)).await;
        let redis = tether_testkit::RedisServer::start().await.expect("redis-server (apt-get install redis-server)");
        let redis_store = tether_redis::RedisStore::open(&redis.url()).expect("url");
        let now = Timestamp::now();
        let owned = loop {
            let id = nodes[0].propose_id();
            let r = record_with(now, &[("loginMember", "7")]);
            let r = tether_core::Record { id, ..r };
            if nodes[0].create(&r).await.is_ok() {
                break r;
            }
        };
        redis_store.create(&owned).await.expect("redis create");
        let mut results = Vec::new();
        for (name, store) in [("cluster, at the owner", &nodes[0] as &dyn SessionStore), ("redis", &redis_store as &dyn SessionStore)] {
            let mut lat = Vec::new();
            for _ in 0..2000 {
                let started = Instant::now();
                store.load(&owned.id, Load::at(Timestamp::now())).await.expect("load").expect("live");
                lat.push(started.elapsed());
            }
            lat.sort();
            results.push((name, percentile(&lat, 0.5), percentile(&lat, 0.99)));
        }
        println!("\n| read-only load | p50 µs | p99 µs |\n|---|---|---|");
        for (name, p50, p99) in results {
            println!("| {name} | {:.1} | {:.1} |", p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6);
        }
        println!("\n{writes} writes per row, each sent to the session's owner; loopback TCP, one process, 2 worker threads");
    });
}
