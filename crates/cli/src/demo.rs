//! `tether demo`: every strategy, measured on this machine, with a node
//! killed half-way.
//!
//! For each strategy it starts three `tether node` processes behind a
//! `tether lb`, with the strategy's store, all on free loopback ports; replays
//! the brief's scenario (log in, then the next page on another server where
//! the policy allows it); runs a bounded workload of virtual users with
//! cookie jars (logins, reads of `/mypage`, writes to `/cart`), SIGKILLs one
//! node half-way and keeps going; then stops everything it started.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tether_testkit::{lb_args, node_args, Client, Process, RedisServer};

/// The strategies, in the brief's order.
pub const STRATEGIES: [&str; 8] = [
    "local",
    "sticky-ip",
    "sticky-cookie",
    "replicated-all",
    "replicated-backup",
    "redis",
    "sticky-redis",
    "jwt",
];

/// Whether `strategy` keeps sessions in Redis.
pub fn uses_redis(strategy: &str) -> bool {
    matches!(strategy, "redis" | "sticky-redis")
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Virtual users per strategy.
    pub users: usize,
    /// Requests per user after its login.
    pub requests: usize,
    /// Users running at once.
    pub concurrency: usize,
    /// An existing Redis to use instead of a private `redis-server`.
    pub redis_url: Option<String>,
    /// Only these strategies (all when empty).
    pub only: Vec<String>,
    /// Draw a progress bar on stderr while the workload runs.
    pub progress_bar: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            users: 200,
            requests: 12,
            concurrency: 32,
            redis_url: None,
            only: Vec::new(),
            progress_bar: false,
        }
    }
}

/// What was measured for one strategy. Keys are documented in README.md.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Strategy name.
    pub strategy: String,
    /// Why the row could not run (e.g. `redis-server` missing), if it did not.
    pub skipped: Option<String>,
    /// Load balancer policy used.
    pub policy: String,
    /// Scenario: node that served the login.
    pub login_node: String,
    /// Scenario: node that served the next page.
    pub next_node: String,
    /// Scenario: still logged in on the next page.
    pub still_logged_in_after_switch: bool,
    /// Users that logged in.
    pub users: usize,
    /// Users that saw "not logged in" after logging in, before the kill.
    pub users_logged_out_before_kill: usize,
    /// Users that saw "not logged in" for the first time after the kill.
    pub users_logged_out_after_kill: usize,
    /// Requests sent (after logins).
    pub requests: usize,
    /// Requests that failed (5xx or no answer) after the kill.
    pub failed_after_kill: usize,
    /// Requests that failed before the kill.
    pub failed_before_kill: usize,
    /// Failed requests by answer: an HTTP status, or `no answer`.
    pub failures: BTreeMap<String, usize>,
    /// Requests served per node.
    pub requests_per_node: BTreeMap<String, usize>,
    /// Busiest node's share over the mean share.
    pub imbalance: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// Latency percentiles, ms.
    pub p99_ms: f64,
    /// Requests per second over the workload.
    pub rps: f64,
    /// Round trips to the external store per request (Redis row: commands
    /// clients sent, counted by Redis; 0 where sessions never leave the nodes).
    pub store_round_trips_per_request: Option<f64>,
    /// Replication messages per write (replicated rows).
    pub replication_messages_per_write: Option<f64>,
    /// Replication bytes per write (replicated rows).
    pub replication_bytes_per_write: Option<f64>,
    /// Session bytes held per surviving node (in-process stores).
    pub session_bytes_per_node: BTreeMap<String, u64>,
    /// Where the sessions live.
    pub note: String,
    /// Latency at percentiles 0, 5, …, 95 and 99, ms.
    pub latency_curve_ms: Vec<f64>,
    /// The slowest request, ms.
    pub latency_max_ms: f64,
    /// When each logged-out user found out, ms relative to the kill.
    pub logged_out_at_ms: Vec<f64>,
}

/// Everything a strategy's fleet holds, stopped on drop.
struct Fleet {
    nodes: Vec<Process>,
    lb: Process,
    _dir: tempfile::TempDir,
}

/// The `tether node` arguments of node `id` for `strategy`. `seed` is the
/// cluster address of a running node (replicated strategies), `listen` the
/// HTTP address (port 0: a free one). Returns the arguments and how many
/// addresses the node will announce.
pub(crate) fn strategy_node_args(
    strategy: &str,
    id: &str,
    listen: SocketAddr,
    seed: Option<SocketAddr>,
    dir: &Path,
    redis: Option<&str>,
) -> Result<(Vec<String>, usize), String> {
    let (store, extra): (&str, Vec<String>) = match strategy {
        "redis" => (redis.ok_or("no redis")?, vec![]),
        // Sticky routing keeps each user on the node that has the session
        // cached; Redis keeps every session through any node's failure.
        "sticky-redis" => (redis.ok_or("no redis")?, vec!["--redis-near-cache".into()]),
        "jwt" => {
            let keys = dir.join("keys.toml");
            if !keys.exists() {
                std::fs::write(&keys, tether_jwt::generate_hs256_key_file("demo"))
                    .map_err(|e| e.to_string())?;
            }
            (
                "jwt",
                vec!["--jwt-key-file".into(), keys.display().to_string()],
            )
        }
        "replicated-all" | "replicated-backup" => {
            let mode = if strategy == "replicated-all" {
                "all"
            } else {
                "backup"
            };
            let mut extra: Vec<String> = [
                "--cluster-listen",
                "127.0.0.1:0",
                "--cluster-secret",
                "tether-demo-secret",
                "--replication",
                mode,
            ]
            .map(String::from)
            .to_vec();
            if let Some(seed) = seed {
                extra.extend(["--peer".to_string(), format!("seed={seed}")]);
            }
            ("cluster", extra)
        }
        "local" | "sticky-ip" | "sticky-cookie" => ("memory", vec![]),
        other => {
            return Err(format!(
                "unknown strategy {other:?}: use {}",
                STRATEGIES.join(", ")
            ))
        }
    };
    let mut args = node_args(id, store);
    if let Some(i) = args.iter().position(|a| a == "127.0.0.1:0") {
        args[i] = listen.to_string();
    }
    args.extend(extra);
    args.extend(["--log-level".into(), "error".into()]);
    Ok((args, if store == "cluster" { 2 } else { 1 }))
}

/// Waits until every node answers `/health`, sees `live` cluster members
/// and, for a cluster, is fully replicated (non-cluster nodes count as
/// seeing all).
pub(crate) async fn wait_ready(nodes: &[&Process], live: usize) -> Result<(), String> {
    for n in nodes {
        let (health, stats) = (n.url("/health"), n.url("/stats"));
        tether_testkit::eventually(Duration::from_secs(30), "node ready", || {
            let (health, stats) = (health.clone(), stats.clone());
            async move {
                let s = Client::new().get(&stats).await.ok()?.json().ok()?;
                let seen = s["cluster_live"].as_array().map_or(live, Vec::len);
                let replicated = s["cluster"]["fully_replicated"].as_bool().unwrap_or(true);
                (seen == live && replicated && Client::new().get(&health).await.ok()?.status == 200)
                    .then_some(())
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn start_fleet(bin: &Path, strategy: &str, redis: Option<&str>) -> Result<Fleet, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ids = ["A", "B", "C"];
    let mut nodes: Vec<Process> = Vec::new();
    for id in ids {
        let seed = nodes.first().and_then(|n| n.addrs().get(1).copied());
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let (args, announced) = strategy_node_args(strategy, id, any, seed, dir.path(), redis)?;
        nodes.push(
            Process::spawn_n(bin, &args, announced)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    // Every node ready (a cluster node once it holds its share).
    wait_ready(&nodes.iter().collect::<Vec<_>>(), 3).await?;
    let policy = policy_of(strategy);
    let backends: Vec<(&str, SocketAddr)> = ids
        .iter()
        .copied()
        .zip(nodes.iter().map(Process::addr))
        .collect();
    let mut args = lb_args(policy, &backends);
    args.extend(["--log-level".into(), "error".into()]);
    let lb = Process::spawn_n(bin, &args, 2)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Fleet {
        nodes,
        lb,
        _dir: dir,
    })
}

/// The balancer policy a strategy runs behind.
pub fn policy_of(strategy: &str) -> &'static str {
    match strategy {
        "sticky-ip" => "ip-hash",
        "sticky-cookie" | "sticky-redis" => "cookie",
        "replicated-backup" => "owner",
        _ => "round-robin",
    }
}

/// A client whose address is distinct per user (own /24), so `ip-hash`
/// spreads users as it would real clients.
fn user_client(i: usize) -> Client {
    let ip = IpAddr::from([127, 0, (i % 250 + 1) as u8, (i / 250 + 1) as u8]);
    Client::from_address(ip)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    per_node: BTreeMap<String, usize>,
    logged_out_before: usize,
    logged_out_after: usize,
    failed_before: usize,
    failed_after: usize,
    requests: usize,
    users: usize,
    failures: BTreeMap<String, usize>,
    logout_times: Vec<Duration>,
}

/// Runs one strategy.
async fn run_strategy(bin: &Path, strategy: &str, config: &DemoConfig, redis: Option<&str>) -> Row {
    let mut row = Row {
        strategy: strategy.into(),
        policy: policy_of(strategy).into(),
        ..Row::default()
    };
    if uses_redis(strategy) && redis.is_none() {
        row.skipped = Some(
            "redis-server not found on PATH: install it (apt-get install -y redis-server) or pass --redis-url".into(),
        );
        return row;
    }
    let fleet = match start_fleet(bin, strategy, redis).await {
        Ok(f) => f,
        Err(e) => {
            row.skipped = Some(format!("could not start the fleet: {e}"));
            return row;
        }
    };

    // The brief's scenario.
    let user = user_client(1000);
    if let Ok(login) = user
        .post_json(&fleet.lb.url("/login"), &json!({"member": 1}))
        .await
    {
        row.login_node = login.node().unwrap_or_default();
        if let Ok(next) = user.get(&fleet.lb.url("/mypage")).await {
            row.next_node = next.node().unwrap_or_default();
            row.still_logged_in_after_switch = next.status == 200;
        }
    }

    // The workload, with node B killed half-way.
    if let (true, Some(url)) = (uses_redis(strategy), redis) {
        let _ = redis_command(url, &["CONFIG", "RESETSTAT"]).await;
    }
    let total = config.users * config.requests;
    let done = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let gate = Arc::new(tokio::sync::Semaphore::new(config.concurrency));
    let lb_url = fleet.lb.url("");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for u in 0..config.users {
        let (done, killed, tally, gate, lb_url) = (
            done.clone(),
            killed.clone(),
            tally.clone(),
            gate.clone(),
            lb_url.clone(),
        );
        let requests = config.requests;
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok();
            let client = user_client(u);
            let Ok(login) = client
                .post_json(&format!("{lb_url}/login"), &json!({"member": u}))
                .await
            else {
                return None;
            };
            if login.status != 200 {
                return None;
            }
            let mut seen_out = false;
            let mut local = Tally {
                users: 1,
                ..Tally::default()
            };
            for r in 0..requests {
                let t = Instant::now();
                let res = if r % 4 == 3 {
                    client
                        .post_json(&format!("{lb_url}/cart"), &json!({"item": format!("i{r}")}))
                        .await
                } else {
                    client.get(&format!("{lb_url}/mypage")).await
                };
                local.latencies.push(t.elapsed());
                local.requests += 1;
                // Classified by when the answer came: the flag is raised
                // before the kill, so anything the kill caused counts after.
                let after = killed.load(Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                match res {
                    Ok(res) => {
                        if let Some(n) = res.node() {
                            *local.per_node.entry(n).or_default() += 1;
                        }
                        if res.status == 401 && !seen_out {
                            seen_out = true;
                            local.logout_times.push(started.elapsed());
                            if after {
                                local.logged_out_after += 1;
                            } else {
                                local.logged_out_before += 1;
                            }
                        } else if res.status.is_server_error() {
                            *local
                                .failures
                                .entry(res.status.as_u16().to_string())
                                .or_default() += 1;
                            if after {
                                local.failed_after += 1
                            } else {
                                local.failed_before += 1
                            }
                        }
                    }
                    Err(_) => {
                        *local.failures.entry("no answer".into()).or_default() += 1;
                        if after {
                            local.failed_after += 1
                        } else {
                            local.failed_before += 1
                        }
                    }
                }
            }
            let mut t = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.latencies.extend(local.latencies);
            for (n, c) in local.per_node {
                *t.per_node.entry(n).or_default() += c;
            }
            t.logged_out_before += local.logged_out_before;
            t.logged_out_after += local.logged_out_after;
            t.failed_before += local.failed_before;
            t.failed_after += local.failed_after;
            t.requests += local.requests;
            t.users += 1;
            for (k, v) in local.failures {
                *t.failures.entry(k).or_default() += v;
            }
            t.logout_times.extend(local.logout_times);
            Some((client, seen_out))
        }));
    }
    let bar = config.progress_bar.then(|| {
        let done = done.clone();
        let name = strategy.to_string();
        tokio::spawn(async move {
            use std::io::Write as _;
            loop {
                let d = done.load(Ordering::Relaxed).min(total);
                let filled = d * 30 / total.max(1);
                eprint!(
                    "\r  {name:<18} [{}{}] {d}/{total} requests",
                    "#".repeat(filled),
                    ".".repeat(30 - filled)
                );
                let _ = std::io::stderr().flush();
                if d >= total {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    // Half-way: SIGKILL node B, as a crash would.
    let victim = &fleet.nodes[1];
    let half = total / 2;
    let _ = tether_testkit::eventually(Duration::from_secs(120), "half the workload", || {
        let d = done.load(Ordering::SeqCst);
        async move { (d >= half).then_some(()) }
    })
    .await;
    killed.store(true, Ordering::SeqCst);
    let kill_at = started.elapsed();
    victim.signal(tether_testkit::SIGKILL);
    let mut users = Vec::new();
    for t in tasks {
        if let Ok(Some(u)) = t.await {
            users.push(u);
        }
    }
    let elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.abort();
        let d = done.load(Ordering::Relaxed);
        eprintln!(
            "\r  {strategy:<18} [{}] {d}/{total} requests, node B killed at {}",
            "#".repeat(30),
            total / 2
        );
    }
    // Every user comes back once after the kill: users of the dead node
    // who had finished before it died find out now.
    let mut late = 0;
    let mut late_times = Vec::new();
    for (client, seen_out) in &users {
        if !seen_out {
            if let Ok(r) = client.get(&format!("{lb_url}/mypage")).await {
                if r.status == 401 {
                    late += 1;
                    late_times.push(started.elapsed());
                }
            }
        }
    }

    let t = std::mem::take(
        &mut *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut lat = t.latencies;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    row.latency_curve_ms = (0..20)
        .map(|i| pct(f64::from(i) / 20.0))
        .chain([pct(0.99)])
        .collect();
    row.latency_max_ms = pct(1.0);
    let mut outs: Vec<f64> = t
        .logout_times
        .iter()
        .chain(&late_times)
        .map(|d| (d.as_secs_f64() - kill_at.as_secs_f64()) * 1e3)
        .collect();
    outs.sort_by(f64::total_cmp);
    row.logged_out_at_ms = outs;
    row.p50_ms = pct(0.5);
    row.p99_ms = pct(0.99);
    row.rps = t.requests as f64 / elapsed.as_secs_f64();
    row.users = t.users;
    row.requests = t.requests;
    row.users_logged_out_before_kill = t.logged_out_before;
    row.users_logged_out_after_kill = t.logged_out_after + late;
    row.failed_before_kill = t.failed_before;
    row.failed_after_kill = t.failed_after;
    row.failures = t.failures;
    let mean = t.per_node.values().sum::<usize>() as f64 / 3.0;
    row.imbalance = t.per_node.values().copied().max().unwrap_or(0) as f64 / mean.max(1.0);
    row.requests_per_node = t.per_node;

    // What the surviving nodes hold and replicated.
    let (mut messages, mut bytes, mut writes, mut forwarded) = (0.0, 0.0, 0.0, 0.0);
    for (i, n) in fleet.nodes.iter().enumerate() {
        if i == 1 {
            continue;
        }
        let id = ["A", "B", "C"][i];
        if let Ok(s) = Client::new().get(&n.url("/stats")).await {
            if let Ok(s) = s.json() {
                if s["sessions"].is_number() {
                    row.session_bytes_per_node
                        .insert(id.into(), s["session_bytes"].as_u64().unwrap_or(0));
                }
            }
        }
        if let Ok(m) = Client::new().get(&n.url("/metrics")).await {
            let text = m.text();
            let metric = |name: &str| metric(&text, name);
            messages += metric("tether_cluster_replication_messages_total");
            bytes += metric("tether_cluster_replication_bytes_total");
            writes += metric("tether_cluster_writes_total");
            forwarded += metric("tether_cluster_forwarded_total");
        }
    }
    if strategy.starts_with("replicated") && writes > 0.0 {
        row.replication_messages_per_write = Some(messages / writes);
        row.replication_bytes_per_write = Some(bytes / writes);
    }
    row.store_round_trips_per_request =
        match (strategy, redis) {
            (s, Some(url)) if uses_redis(s) => redis_command(url, &["INFO", "commandstats"])
                .await
                .map(|info| {
                    // Commands clients send; the commands our scripts run inside
                    // Redis are not round trips, nor are `CLIENT CACHING` and
                    // `WAIT`, which travel in the pipeline of the command they
                    // serve.
                    let sent: f64 = info
                        .lines()
                        .filter(|l| {
                            [
                                "cmdstat_hgetall:",
                                "cmdstat_evalsha:",
                                "cmdstat_eval:",
                                "cmdstat_del:",
                                "cmdstat_script",
                            ]
                            .iter()
                            .any(|p| l.starts_with(p))
                        })
                        .filter_map(|l| {
                            l.split("calls=")
                                .nth(1)?
                                .split(',')
                                .next()?
                                .parse::<f64>()
                                .ok()
                        })
                        .sum();
                    // Logins, the workload, and the last check after the kill.
                    sent / (row.requests + 2 * row.users) as f64
                }),
            (s, None) if uses_redis(s) => None,
            // Hops to the owner on another node (the killed node's count is lost).
            (s, _) if s.starts_with("replicated") => {
                Some(forwarded / (row.requests + 2 * row.users) as f64)
            }
            _ => Some(0.0),
        };
    row.note = match strategy {
        "redis" => "sessions in one shared Redis: nodes hold none".into(),
        "sticky-redis" => {
            "sessions in Redis, each node caching its own users' (invalidated by Redis)".into()
        }
        "jwt" => "sessions in the clients' tokens: nodes hold none".into(),
        "local" | "sticky-ip" | "sticky-cookie" => {
            "each node holds only its own users' sessions".into()
        }
        _ => "replicas held by the surviving nodes".into(),
    };
    drop(fleet);
    row
}

/// Sends one command to the Redis at `url` (for statistics) and returns its text answer.
async fn redis_command(url: &str, args: &[&str]) -> Option<String> {
    let client = tether_testkit::redis_client::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut cmd = tether_testkit::redis_client::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let v: tether_testkit::redis_client::Value = cmd.query_async(&mut conn).await.ok()?;
    tether_testkit::redis_client::from_redis_value::<String>(v).ok()
}

/// Runs every strategy; `progress` is told about each start and finish.
pub async fn run(bin: &Path, config: &DemoConfig, mut progress: impl FnMut(&str)) -> Vec<Row> {
    let mut private_redis = None;
    let redis_url = match &config.redis_url {
        Some(u) => Some(u.clone()),
        None => match RedisServer::start().await {
            Ok(r) => {
                let url = r.url();
                private_redis = Some(r);
                Some(url)
            }
            Err(_) => None,
        },
    };
    let mut rows = Vec::new();
    for s in STRATEGIES {
        if !config.only.is_empty() && !config.only.iter().any(|o| o == s) {
            continue;
        }
        progress(&format!("{s}: starting 3 nodes and a balancer"));
        let row = run_strategy(bin, s, config, redis_url.as_deref()).await;
        progress(&format!("{s}: done"));
        rows.push(row);
    }
    drop(private_redis);
    rows
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// A table line: its label and how to render a row's cell.
type Cell = (&'static str, Box<dyn Fn(&Row) -> String>);

/// The brief's comparison table, measured.
pub fn render(rows: &[Row], config: &DemoConfig) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "tether demo: 3 nodes behind tether lb per strategy, {} users × {} requests, node B SIGKILLed half-way\n\n",
        config.users, config.requests
    ));
    let cells: Vec<Cell> = vec![
        ("balancer policy", Box::new(|r: &Row| r.policy.clone())),
        (
            "still logged in on the next server",
            Box::new(|r: &Row| {
                format!(
                    "{} ({}→{})",
                    yes_no(r.still_logged_in_after_switch),
                    r.login_node,
                    r.next_node
                )
            }),
        ),
        (
            "users logged out before the kill",
            Box::new(|r: &Row| format!("{} of {}", r.users_logged_out_before_kill, r.users)),
        ),
        (
            "users logged out by the kill",
            Box::new(|r: &Row| format!("{} of {}", r.users_logged_out_after_kill, r.users)),
        ),
        (
            "failed requests after the kill",
            Box::new(|r: &Row| r.failed_after_kill.to_string()),
        ),
        (
            "requests per node A/B/C",
            Box::new(|r: &Row| {
                ["A", "B", "C"]
                    .iter()
                    .map(|n| {
                        r.requests_per_node
                            .get(*n)
                            .copied()
                            .unwrap_or(0)
                            .to_string()
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            }),
        ),
        (
            "imbalance (max/mean)",
            Box::new(|r: &Row| format!("{:.2}", r.imbalance)),
        ),
        (
            "replication msgs / write",
            Box::new(|r: &Row| {
                r.replication_messages_per_write
                    .map_or("-".into(), |v| format!("{v:.2}"))
            }),
        ),
        (
            "replication bytes / write",
            Box::new(|r: &Row| {
                r.replication_bytes_per_write
                    .map_or("-".into(), |v| format!("{v:.0}"))
            }),
        ),
        (
            "store round trips / request",
            Box::new(|r: &Row| {
                r.store_round_trips_per_request
                    .map_or("-".into(), |v| format!("{v:.2}"))
            }),
        ),
        (
            "session bytes per node",
            Box::new(|r: &Row| {
                if r.session_bytes_per_node.is_empty() {
                    "0 (none held)".into()
                } else {
                    r.session_bytes_per_node
                        .values()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("/")
                }
            }),
        ),
        (
            "latency p50 / p99 ms",
            Box::new(|r: &Row| format!("{:.2} / {:.2}", r.p50_ms, r.p99_ms)),
        ),
        ("requests/s", Box::new(|r: &Row| format!("{:.0}", r.rps))),
    ];
    let width = 36;
    let col = 20;
    out.push_str(&format!("{:<width$}", ""));
    for r in rows {
        out.push_str(&format!("{:<col$}", r.strategy));
    }
    out.push('\n');
    for (name, f) in &cells {
        out.push_str(&format!("{name:<width$}"));
        for r in rows {
            let cell = if r.skipped.is_some() {
                "(not run)".to_string()
            } else {
                f(r)
            };
            out.push_str(&format!("{cell:<col$}"));
        }
        out.push('\n');
    }
    for r in rows {
        if let Some(why) = &r.skipped {
            out.push_str(&format!("\n{}: {why}", r.strategy));
        }
    }
    out.push_str(
        "\nEvery cell was measured in this run; `--json` gives the same figures to machines.\n",
    );
    out
}

/// Replication cost at one cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// `replicated-all` or `replicated-backup`.
    pub strategy: String,
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

/// The value of metric `name` in Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Measures replication cost against cluster size: for each size, a
/// cluster of node processes, one user writing to its session at the owner.
pub async fn sweep(bin: &Path, sizes: &[usize], writes: usize) -> Result<Vec<SweepRow>, String> {
    let mut rows = Vec::new();
    for (strategy, mode) in [("replicated-all", "all"), ("replicated-backup", "backup")] {
        for &n in sizes {
            let mut nodes: Vec<Process> = Vec::new();
            for i in 0..n {
                let mut args = node_args(&format!("N{i}"), "cluster");
                args.extend(
                    [
                        "--cluster-listen",
                        "127.0.0.1:0",
                        "--cluster-secret",
                        "tether-demo-secret",
                        "--replication",
                        mode,
                        "--log-level",
                        "error",
                    ]
                    .map(String::from),
                );
                if let Some(first) = nodes.first() {
                    args.extend(["--peer".to_string(), format!("N0={}", first.addrs()[1])]);
                }
                nodes.push(
                    Process::spawn_n(bin, &args, 2)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            for node in &nodes {
                let (health, stats) = (node.url("/health"), node.url("/stats"));
                tether_testkit::eventually(Duration::from_secs(30), "cluster formed", || {
                    let (health, stats) = (health.clone(), stats.clone());
                    async move {
                        let s = Client::new().get(&stats).await.ok()?.json().ok()?;
                        let live = s["cluster_live"].as_array()?.len();
                        (live == n && Client::new().get(&health).await.ok()?.status == 200)
                            .then_some(())
                    }
                })
                .await
                .map_err(|e| e.to_string())?;
            }
            let user = Client::new();
            user.post_json(&nodes[0].url("/login"), &json!({"member": 1}))
                .await
                .map_err(|e| e.to_string())?;
            let totals = |nodes: &[Process]| {
                let urls: Vec<String> = nodes.iter().map(|p| p.url("/metrics")).collect();
                async move {
                    let mut t = (0.0, 0.0, 0.0);
                    for u in urls {
                        if let Ok(r) = Client::new().get(&u).await {
                            let text = r.text();
                            t.0 += metric(&text, "tether_cluster_replication_messages_total");
                            t.1 += metric(&text, "tether_cluster_replication_bytes_total");
                            t.2 += metric(&text, "tether_cluster_writes_total");
                        }
                    }
                    t
                }
            };
            let before = totals(&nodes).await;
            let mut lat = Vec::with_capacity(writes);
            for i in 0..writes {
                let started = Instant::now();
                // A bounded cart: the session stays small, as sessions do.
                let r = user
                    .post_json(
                        &nodes[0].url("/cart"),
                        &json!({"item": format!("i{}", i % 5)}),
                    )
                    .await;
                lat.push(started.elapsed());
                if r.map(|r| r.status != 200).unwrap_or(true) {
                    return Err(format!("a write failed at N = {n}"));
                }
                if i % 5 == 4 {
                    user.post_json(&nodes[0].url("/logout"), &json!({}))
                        .await
                        .map_err(|e| e.to_string())?;
                    user.post_json(&nodes[0].url("/login"), &json!({"member": 1}))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            let after = totals(&nodes).await;
            lat.sort();
            let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
            // Logins and logouts replicate too (with the user's session
            // index, two writes each): count every write the owners made.
            let total_writes = (after.2 - before.2).max(1.0);
            rows.push(SweepRow {
                strategy: strategy.into(),
                nodes: n,
                messages_per_write: (after.0 - before.0) / total_writes,
                bytes_per_write: (after.1 - before.1) / total_writes,
                write_p50_ms: pct(0.5),
                write_p99_ms: pct(0.99),
            });
        }
    }
    Ok(rows)
}

/// The sweep as a table.
pub fn render_sweep(rows: &[SweepRow]) -> String {
    let mut out =
        String::from("\nReplication cost against cluster size (writes at the owner):\n\n");
    out.push_str(&format!(
        "{:<20}{:>6}{:>16}{:>15}{:>14}{:>14}\n",
        "strategy", "nodes", "messages/write", "bytes/write", "p50 ms", "p99 ms"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<20}{:>6}{:>16.2}{:>15.0}{:>14.2}{:>14.2}\n",
            r.strategy,
            r.nodes,
            r.messages_per_write,
            r.bytes_per_write,
            r.write_p50_ms,
            r.write_p99_ms
        ));
    }
    out
}

/// Where this executable is, to start nodes and balancers from it.
pub fn this_binary() -> std::io::Result<PathBuf> {
    std::env::current_exe()
}
