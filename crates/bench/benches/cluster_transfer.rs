//! State transfer and memory of the replicated store.
//!
//! 1. Three nodes (`backup`, k = 1) hold N sessions (one `loginMember`
//!    attribute each, as after a login). A writer keeps writing at the
//!    sessions' owners on A and B. C crashes (its store dropped, its
//!    connections cut); A and B re-replicate. A new C starts: the time from
//!    its start to ready (it holds its share) and to every node fully
//!    replicated, the sessions and bytes moved, and the writers' p99
//!    before and during the transfer.
//! 2. Memory per session held: one node alone holding N sessions, RSS
//!    growth over N, against `MemoryStore` holding the same records, each
//!    in a child process of its own.
//!
//! ```text
//! cargo bench -p tether-bench --bench cluster_transfer -- [--sessions 100000]
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_bench::arg;
use tether_cluster::{ClusterConfig, ClusterStore, Replication};
use tether_core::testing::json;
use tether_core::{Delta, Expiry, MemoryStore, Record, SessionId, SessionStore, Timestamp};
use tether_testkit::eventually;

const SECRET: &[u8] = b"bench-transfer-secret";

fn config(name: &str, seeds: &[&ClusterStore]) -> ClusterConfig {
    let mut c = ClusterConfig::new(name, "127.0.0.1:0".parse().unwrap(), SECRET.to_vec());
    c.replication = Replication::Backup(1);
    c.seeds = seeds.iter().map(|s| s.addr().to_string()).collect();
    c
}

fn record(i: u64, now: Timestamp) -> Record {
    let mut r = Record::new(SessionId::random(), now, Expiry::default());
    r.attributes
        .insert("loginMember".into(), json(&(i % 100_000).to_string()));
    r
}

fn owner<'a>(nodes: &'a [&'a ClusterStore], id: &SessionId) -> &'a ClusterStore {
    let live = nodes[0].live_nodes();
    let o = tether_core::placement::session_owner(id, &live).expect("a member");
    nodes
        .iter()
        .find(|n| n.node_id() == *o)
        .copied()
        .unwrap_or(nodes[0])
}

async fn fully_replicated(nodes: &[&ClusterStore], within: Duration) -> Duration {
    let started = Instant::now();
    for n in nodes {
        eventually(within, "fully replicated", || async {
            let s = n.status();
            (s.live.len() == nodes.len() && s.fully_replicated).then_some(())
        })
        .await
        .expect("fully replicated");
    }
    started.elapsed()
}

/// Loads `n` sessions at their owners, 256 at a time.
async fn load(nodes: &[&ClusterStore], n: u64) -> Vec<SessionId> {
    let now = Timestamp::now();
    let mut ids = Vec::with_capacity(n as usize);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for i in 0..n {
        let r = record(i, now);
        ids.push(r.id);
        let o = owner(nodes, &r.id);
        pending.push(async move { o.create(&r).await });
        if pending.len() >= 256 {
            pending.next().await.expect("a create").expect("created");
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("created");
    }
    ids
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Writes at the owners on `nodes` until `stop`; latencies by when they started.
async fn writer(
    nodes: Vec<Arc<ClusterStore>>,
    ids: Arc<Vec<SessionId>>,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<(Instant, Duration, bool)>>>,
) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let id = ids[(i * 7919) % ids.len()];
        let refs: Vec<&ClusterStore> = nodes.iter().map(|n| n.as_ref()).collect();
        let o = owner(&refs, &id);
        if !refs.iter().any(|n| std::ptr::eq(*n, o)) {
            continue;
        }
        let mut d = Delta::default();
        d.set("n", json(&i.to_string()));
        let started = Instant::now();
        let ok = o.apply(&id, &d, Timestamp::now()).await.is_ok();
        out.lock().unwrap().push((started, started.elapsed(), ok));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn p99_between(
    samples: &[(Instant, Duration, bool)],
    from: Instant,
    to: Instant,
) -> (Duration, usize, usize) {
    let mut lat: Vec<Duration> = samples
        .iter()
        .filter(|(t, _, ok)| *t >= from && *t < to && *ok)
        .map(|(_, d, _)| *d)
        .collect();
    let failed = samples
        .iter()
        .filter(|(t, _, ok)| *t >= from && *t < to && !*ok)
        .count();
    lat.sort();
    (percentile(&lat, 0.99), lat.len(), failed)
}

async fn transfer(n: u64) {
    let a = Arc::new(ClusterStore::start(config("A", &[])).await.expect("A"));
    let b = Arc::new(ClusterStore::start(config("B", &[&a])).await.expect("B"));
    let c = ClusterStore::start(config("C", &[&a])).await.expect("C");
    fully_replicated(&[&a, &b, &c], Duration::from_secs(30)).await;
    let started = Instant::now();
    let ids = Arc::new(load(&[&a, &b, &c], n).await);
    let loaded = started.elapsed();
    fully_replicated(&[&a, &b, &c], Duration::from_secs(120)).await;
    let held_by_c = {
        let (o, b, _) = c.holdings();
        o + b
    };
    eprintln!("loaded {n} sessions in {loaded:?}; C holds {held_by_c}");

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let w = tokio::spawn(writer(
        vec![a.clone(), b.clone()],
        ids.clone(),
        stop.clone(),
        samples.clone(),
    ));
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let steady_to = Instant::now();

    // C crashes; A and B give every session its second copy again.
    drop(c);
    let crashed = Instant::now();
    let (mut a_saw, mut b_saw) = (None, None);
    eventually(Duration::from_secs(60), "C gone from the views", || {
        if a_saw.is_none() && a.live_nodes().len() == 2 {
            a_saw = Some(crashed.elapsed());
        }
        if b_saw.is_none() && b.live_nodes().len() == 2 {
            b_saw = Some(crashed.elapsed());
        }
        let done = a_saw.is_some() && b_saw.is_some();
        async move { done.then_some(()) }
    })
    .await
    .expect("C noticed");
    let noticed = crashed.elapsed();
    eprintln!("A noticed after {a_saw:?}, B after {b_saw:?}");
    let reprotect = fully_replicated(&[&a, &b], Duration::from_secs(120)).await;
    let reprotected = Instant::now();
    let moved_before: u64 = [&a, &b].iter().map(|n| n.metrics().transferred_out).sum();
    let bytes_before: u64 = [&a, &b].iter().map(|n| n.metrics().transfer_bytes).sum();

    // A new C joins, empty.
    let join = Instant::now();
    let c = ClusterStore::start(config("C", &[&a]))
        .await
        .expect("C again");
    eventually(Duration::from_secs(120), "C ready", || async {
        c.is_ready().then_some(())
    })
    .await
    .expect("C ready");
    let ready = join.elapsed();
    fully_replicated(&[&a, &b, &c], Duration::from_secs(120)).await;
    let all = join.elapsed();
    let joined = Instant::now();
    stop.store(true, Ordering::Relaxed);
    w.await.expect("writer");
    let moved: u64 = [&a, &b]
        .iter()
        .map(|n| n.metrics().transferred_out)
        .sum::<u64>()
        - moved_before;
    let bytes: u64 = [&a, &b]
        .iter()
        .map(|n| n.metrics().transfer_bytes)
        .sum::<u64>()
        - bytes_before;
    let (oc, bc, _) = c.holdings();
    let samples = samples.lock().unwrap();
    let (p99_steady, n_steady, f_steady) = p99_between(&samples, steady_from, steady_to);
    let (p99_loss, n_loss, f_loss) = p99_between(&samples, crashed, reprotected);
    let (p99_join, n_join, f_join) = p99_between(&samples, join, joined);
    let rate = (oc + bc) as f64 / ready.as_secs_f64();
    println!("| sessions in the fleet | {n} |");
    println!("| C noticed dead after | {:.2} s |", noticed.as_secs_f64());
    println!(
        "| A and B fully replicated again after | {:.2} s |",
        reprotect.as_secs_f64()
    );
    println!(
        "| new C: start to ready (holds its share) | {:.2} s |",
        ready.as_secs_f64()
    );
    println!(
        "| new C: start to every node fully replicated | {:.2} s |",
        all.as_secs_f64()
    );
    println!(
        "| sessions C holds / sessions sent to it | {} / {moved} |",
        oc + bc
    );
    println!("| transfer rate (sessions C holds / time to ready) | {rate:.0} sessions/s |");
    println!("| bytes sent to C | {:.1} MB |", bytes as f64 / 1e6);
    println!(
        "| writes p99 steady ({n_steady} writes, {f_steady} refused) | {:.2} ms |",
        p99_steady.as_secs_f64() * 1e3
    );
    println!("| writes p99 while re-replicating after the crash ({n_loss}, {f_loss} refused) | {:.2} ms |", p99_loss.as_secs_f64() * 1e3);
    println!(
        "| writes p99 while C joins ({n_join}, {f_join} refused) | {:.2} ms |",
        p99_join.as_secs_f64() * 1e3
    );
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// In a child process: RSS growth per session for `store` holding `n`.
async fn memory_child(store: &str, n: u64) {
    let now = Timestamp::now();
    let before = rss();
    let held: Box<dyn SessionStore> = match store {
        "memory" => Box::new(MemoryStore::new()),
        _ => {
            let mut c = ClusterConfig::new("M", "127.0.0.1:0".parse().unwrap(), SECRET.to_vec());
            c.replication = Replication::Backup(1);
            let s = ClusterStore::start(c).await.expect("node");
            eventually(Duration::from_secs(30), "alone and ready", || async {
                s.is_ready().then_some(())
            })
            .await
            .expect("ready");
            Box::new(s)
        }
    };
    let base = rss();
    for i in 0..n {
        held.create(&record(i, now)).await.expect("create");
    }
    let after = rss();
    println!(
        "{store} {n} {} {}",
        (after - base) as f64 / n as f64,
        after - before
    );
}

fn main() {
    if std::env::var("BENCH_TRACE").is_ok() {
        use tracing_subscriber::prelude::*;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                        m.target().starts_with("tether_cluster")
                            && *m.level() <= tracing::Level::DEBUG
                    })),
            )
            .init();
    }
    let sessions = arg("--sessions", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        let store = args[i + 1].clone();
        let n: u64 = args[i + 2].parse().expect("count");
        rt.block_on(memory_child(&store, n));
        return;
    }
    rt.block_on(async {
        println!("State transfer, backup k=1, 3 nodes (in one process, loopback TCP, 2 worker threads):\n");
        println!("| measure | value |\n|---|---|");
        transfer(sessions).await;
    });
    let memory = arg("--memory-sessions", 1_000_000);
    println!("\nMemory per session held ({memory} one-attribute sessions, each store in a child process):\n");
    println!("| store | bytes per session (RSS growth / sessions) | ratio to MemoryStore |\n|---|---|---|");
    let exe = std::env::current_exe().expect("exe");
    let mut rows = Vec::new();
    for store in ["memory", "cluster"] {
        let out = std::process::Command::new(&exe)
            .args(["--memory-child", store, &memory.to_string()])
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        let per: f64 = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        rows.push((store, per));
    }
    let base = rows[0].1;
    for (store, per) in rows {
        println!("| {store} | {per:.0} | {:.2} |", per / base);
    }
}
