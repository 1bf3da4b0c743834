//! Sessions in Redis against the Redis session store its users pick today:
//! tether + `RedisStore` (plain, with the near cache, with `WAIT 1`),
//! tether + `MemoryStore` for reference, and tower-sessions 0.14 with
//! tower-sessions-redis-store 0.16, all against the same `redis-server`.
//!
//! Shapes: a read-only handler (`GET /mypage`), a read-then-write handler
//! (`POST /visit`: get a counter, insert it plus one), and both on
//! sessions holding a 10 KB attribute (the write changes the counter only).
//! Each request carries the next of `--sessions` logged-in sessions, so the
//! connections work on many users' sessions at once, as a site does (one
//! session under contention is `benches/modify.rs`'s subject).
//! Each server runs on its own single-threaded runtime (one core); `wrk`
//! drives them in alternating rounds. Redis time per request is read from
//! `INFO commandstats` (reset before each run): the sum of `usec` over every
//! command, divided by the requests `wrk` completed.
//!
//! Then the near cache's staleness: pairs of "write on node A, then the
//! next request on node B" (`--pairs`), counting reads of the old value.
//!
//! ```text
//! cargo bench -p tether-bench --bench redis -- [--seconds 5] [--rounds 3] [--connections 16] [--sessions 256] [--pairs 10000]
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tether_bench::{arg, block_on, median, serve_on_own_core, wrk_options, wrk_script, WrkResult};
use tether_testkit::redis_client as redis;
use tether_testkit::{Client, RedisServer};

/// The 10 KB attribute of the large session.
fn profile() -> String {
    "x".repeat(10 * 1024)
}

fn tether_app(layer: tether::SessionLayer) -> Router {
    use tether::{Session, SessionError};
    async fn login(session: Session) -> Result<&'static str, SessionError> {
        session.insert("loginMember", 7u64).await?;
        Ok("ok")
    }
    async fn login_big(session: Session) -> Result<&'static str, SessionError> {
        session.insert("loginMember", 7u64).await?;
        session.insert("profile", profile()).await?;
        Ok("ok")
    }
    async fn mypage(session: Session) -> Result<String, SessionError> {
        Ok(session
            .get::<u64>("loginMember")
            .await?
            .map_or_else(|| "anonymous".into(), |m| m.to_string()))
    }
    async fn visit(session: Session) -> Result<String, SessionError> {
        let n = session.get::<u64>("visits").await?.unwrap_or(0) + 1;
        session.insert("visits", n).await?;
        Ok(n.to_string())
    }
    async fn set(session: Session, body: String) -> Result<&'static str, SessionError> {
        session.insert("v", body).await?;
        Ok("ok")
    }
    async fn read_v(session: Session) -> Result<String, SessionError> {
        Ok(session.get::<String>("v").await?.unwrap_or_default())
    }
    Router::new()
        .route("/login", post(login))
        .route("/login-big", post(login_big))
        .route("/mypage", get(mypage))
        .route("/visit", post(visit))
        .route("/v", get(read_v).post(set))
        .layer(layer.with_config(tether::SessionConfig::default().with_secure(false)))
}

fn tower_sessions_app(url: String) -> Router {
    use tower_sessions_014::{Session, SessionManagerLayer};
    use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};
    async fn login(session: Session) -> &'static str {
        session.insert("loginMember", 7u64).await.expect("insert");
        "ok"
    }
    async fn login_big(session: Session) -> &'static str {
        session.insert("loginMember", 7u64).await.expect("insert");
        session.insert("profile", profile()).await.expect("insert");
        "ok"
    }
    async fn mypage(session: Session) -> String {
        session
            .get::<u64>("loginMember")
            .await
            .expect("get")
            .map_or_else(|| "anonymous".into(), |m| m.to_string())
    }
    async fn visit(session: Session) -> String {
        let n = session
            .get::<u64>("visits")
            .await
            .expect("get")
            .unwrap_or(0)
            + 1;
        session.insert("visits", n).await.expect("insert");
        n.to_string()
    }
    // The pool its documentation shows: six connections.
    let pool = Pool::new(Config::from_url(&url).expect("url"), None, None, None, 6).expect("pool");
    // The connections run as tasks of their own; the handle is not needed.
    drop(pool.connect());
    let store = tower_sessions_redis_store::RedisStore::new(pool);
    Router::new()
        .route("/login", post(login))
        .route("/login-big", post(login_big))
        .route("/mypage", get(mypage))
        .route("/visit", post(visit))
        .layer(SessionManagerLayer::new(store).with_secure(false))
}

/// A server under test: its name, its router, its session cookie's name,
/// and whether its sessions are in Redis (Redis time is then counted).
type Peer = (
    &'static str,
    Box<dyn FnOnce() -> Router + Send>,
    &'static str,
    bool,
);

/// A running server and its logged-in sessions' cookies (`NAME=VALUE`).
struct Target {
    name: &'static str,
    addr: std::net::SocketAddr,
    small: Vec<String>,
    big: Vec<String>,
    redis: bool,
}

/// A wrk script sending `method` requests, each with the next of `cookies`
/// (so sixteen connections hit many sessions, as users do, not one).
fn cycling(method: &str, cookies: &[String]) -> String {
    let list: Vec<String> = cookies.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "local cookies = {{ {} }}\nlocal i = 0\nwrk.method = \"{method}\"\n\
         request = function()\n  i = i % #cookies + 1\n  \
         return wrk.format(nil, nil, {{ [\"Cookie\"] = cookies[i] }})\nend\n",
        list.join(", ")
    )
}

/// One measured run.
#[derive(Clone)]
struct Run {
    wrk: WrkResult,
    /// Redis µs per request in commands (`INFO commandstats`), in CPU
    /// (`INFO cpu`: the whole process, I/O included), and calls per
    /// request by command.
    redis_us: f64,
    cpu_us: f64,
    calls: BTreeMap<String, f64>,
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// `INFO commandstats` as command → (calls, usec).
async fn commandstats(c: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, (f64, f64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |f: &str| -> Option<f64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((name.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// Commands tether's scripts run inside Redis: their time is already in
/// `evalsha`'s (this bench's servers never send them themselves).
const SCRIPT_INTERNAL: [&str; 7] = [
    "hget", "hset", "hstrlen", "pexpire", "hdel", "hkeys", "rename",
];

/// Redis's CPU time so far, user plus system, in seconds.
async fn redis_cpu(c: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "used_cpu_user" | "used_cpu_sys").then(|| v.trim().parse::<f64>().ok())?
        })
        .sum()
}

async fn login(addr: std::net::SocketAddr, path: &str, cookie_name: &str, name: &str) -> String {
    // A store that connects in the background may refuse the first tries.
    let client = Client::new();
    let ok = tether_testkit::eventually(Duration::from_secs(10), "a login", || async {
        let r = client
            .post_form(&format!("http://{addr}{path}"), "")
            .await
            .ok()?;
        r.status.is_success().then_some(())
    })
    .await;
    ok.unwrap_or_else(|e| panic!("{name} {path}: {e}"));
    let cookie = client.cookie(cookie_name).expect("session cookie");
    let check = client
        .get(&format!("http://{addr}/mypage"))
        .await
        .expect("mypage");
    assert_eq!(check.text(), "7", "{name} does not read the session");
    format!("{cookie_name}={cookie}")
}

fn main() {
    let (seconds, rounds, connections) = wrk_options();
    let pairs = arg("--pairs", 10_000usize);
    let sessions = arg("--sessions", 256usize);
    block_on(async {
        let server = RedisServer::start()
            .await
            .expect("redis-server (apt-get install redis-server)");
        // A replica, for the WAIT 1 server.
        let master_port = server.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port])
            .await
            .expect("replica");
        let mut stats = connect(&server.url()).await;
        tether_testkit::eventually(Duration::from_secs(10), "the replica in sync", || {
            let url = server.url();
            async move {
                let mut c = connect(&url).await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                info.contains("connected_slaves:1").then_some(())
            }
        })
        .await
        .expect("replica");
        let url = server.url();
        let store = move || tether_redis::RedisStore::open(&url).expect("redis url");
        let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
        let ts_url = server.url();
        let peers: Vec<Peer> = vec![
            (
                "tether+memory",
                Box::new(|| tether_app(tether::SessionLayer::new(tether::MemoryStore::new()))),
                "SESSION",
                false,
            ),
            (
                "tower-sessions+redis",
                Box::new(move || tower_sessions_app(ts_url)),
                "id",
                true,
            ),
            (
                "tether+redis",
                Box::new(move || tether_app(tether::SessionLayer::new(s1()))),
                "SESSION",
                true,
            ),
            (
                "tether+redis near cache",
                Box::new(move || {
                    tether_app(tether::SessionLayer::new(
                        s2().with_near_cache(100_000, 256 << 20),
                    ))
                }),
                "SESSION",
                true,
            ),
            (
                "tether+redis WAIT 1",
                Box::new(move || {
                    tether_app(tether::SessionLayer::new(
                        s3().with_wait(1, Duration::from_millis(100)),
                    ))
                }),
                "SESSION",
                true,
            ),
        ];
        if arg("--staleness-only", 0) == 1 {
            println!("\n### Near-cache staleness\n");
            for clients in [1, 16] {
                staleness(&server.url(), pairs, clients).await;
            }
            return;
        }
        let mut targets = Vec::new();
        for (name, app, cookie_name, redis) in peers {
            let addr = serve_on_own_core(app);
            let (mut small, mut big) = (Vec::new(), Vec::new());
            for _ in 0..sessions {
                small.push(login(addr, "/login", cookie_name, name).await);
                big.push(login(addr, "/login-big", cookie_name, name).await);
            }
            targets.push(Target {
                name,
                addr,
                small,
                big,
                redis,
            });
        }

        let shapes = [
            ("read", false, false),
            ("read-then-write", true, false),
            ("10 KB session: read", false, true),
            (
                "10 KB session: read-then-write (one attribute changes)",
                true,
                true,
            ),
        ];
        let mut results: BTreeMap<(usize, usize), Vec<Run>> = BTreeMap::new();
        for round in 1..=rounds {
            for (s, (shape, write, big)) in shapes.iter().enumerate() {
                for (t, target) in targets.iter().enumerate() {
                    let cookies = if *big { &target.big } else { &target.small };
                    let _: () = redis::cmd("CONFIG")
                        .arg("RESETSTAT")
                        .query_async(&mut stats)
                        .await
                        .expect("RESETSTAT");
                    let cpu_before = redis_cpu(&mut stats).await;
                    let (method, path) = if *write {
                        ("POST", "visit")
                    } else {
                        ("GET", "mypage")
                    };
                    let r = wrk_script(
                        &format!("http://{}/{path}", target.addr),
                        &cycling(method, cookies),
                        connections,
                        seconds,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                    let after = commandstats(&mut stats).await;
                    let cpu = redis_cpu(&mut stats).await - cpu_before;
                    let requests = r.requests.max(1) as f64;
                    let mut calls = BTreeMap::new();
                    let mut usec = 0.0;
                    for (cmd, (c, u)) in &after {
                        // The stats connection's own commands are not a request's.
                        if matches!(cmd.as_str(), "info" | "config|resetstat") {
                            continue;
                        }
                        calls.insert(cmd.clone(), c / requests);
                        // A script's `usec` includes the commands it runs,
                        // which are counted again under their own names.
                        if !SCRIPT_INTERNAL.contains(&cmd.as_str()) {
                            usec += u;
                        }
                    }
                    let (redis_us, cpu_us) = if target.redis {
                        (usec / requests, cpu * 1e6 / requests)
                    } else {
                        (0.0, 0.0)
                    };
                    eprintln!(
                        "round {round} {shape:<28} {:<24} {:>9.0} req/s  p99 {:>8.1?}  redis {redis_us:>5.2} µs/req in commands, {cpu_us:>5.2} µs/req CPU  errors {}",
                        target.name, r.rps, r.p99, r.errors
                    );
                    if std::env::var_os("REDIS_DETAIL").is_some() {
                        for (cmd, (c, u)) in &after {
                            eprintln!(
                                "    {cmd:<22} {:>6.2} calls/req {:>6.2} µs/call",
                                c / requests,
                                u / c.max(1.0)
                            );
                        }
                    }
                    assert_eq!(r.errors, 0, "{} answered errors", target.name);
                    results.entry((s, t)).or_default().push(Run {
                        wrk: r,
                        redis_us,
                        cpu_us,
                        calls,
                    });
                }
            }
        }

        println!("\n{seconds} s per run, {rounds} rounds alternating, wrk -t1 -c{connections} over {sessions} sessions, one server core each, one redis-server (and its replica for WAIT 1)");
        for (s, (shape, _, _)) in shapes.iter().enumerate() {
            println!("\n### {shape}\n");
            println!("| server | req/s (median) | p99 ms | vs tower-sessions+redis | vs tether+memory | Redis µs/request in commands | Redis CPU µs/request | Redis calls/request (by command) |");
            println!("|---|---|---|---|---|---|---|---|");
            let med = |t: usize| -> (f64, f64, f64, f64) {
                let runs = &results[&(s, t)];
                (
                    median(runs.iter().map(|r| r.wrk.rps).collect()),
                    median(runs.iter().map(|r| r.wrk.p99.as_secs_f64() * 1e3).collect()),
                    median(runs.iter().map(|r| r.redis_us).collect()),
                    median(runs.iter().map(|r| r.cpu_us).collect()),
                )
            };
            let (memory_rps, ..) = med(0);
            let (ts_rps, ..) = med(1);
            for (t, target) in targets.iter().enumerate() {
                let (rps, p99, us, cpu) = med(t);
                let last = results[&(s, t)].last().expect("a run");
                let calls: Vec<String> = last
                    .calls
                    .iter()
                    .filter(|(_, c)| **c >= 0.005)
                    .map(|(cmd, c)| format!("{cmd} {c:.2}"))
                    .collect();
                println!(
                    "| {} | {rps:.0} | {p99:.2} | {:.2} | {:.2} | {} | {} | {} |",
                    target.name,
                    rps / ts_rps,
                    rps / memory_rps,
                    if target.redis {
                        format!("{us:.2}")
                    } else {
                        "-".into()
                    },
                    if target.redis {
                        format!("{cpu:.2}")
                    } else {
                        "-".into()
                    },
                    if target.redis {
                        calls.join(", ")
                    } else {
                        "-".into()
                    },
                );
            }
        }

        println!("\n### Near-cache staleness\n");
        for clients in [1, 16] {
            staleness(&server.url(), pairs, clients).await;
        }
        drop(replica);
    });
}

/// Two near-cached nodes on their own cores sharing Redis; for each pair,
/// one client writes a fresh value on A and, once A answered, reads on B.
/// A stale read is B answering the previous value. `clients` such clients
/// run at once, each on its own session.
async fn staleness(url: &str, pairs: usize, clients: usize) {
    let node = |url: String| -> Box<dyn FnOnce() -> Router + Send> {
        Box::new(move || {
            tether_app(tether::SessionLayer::new(
                tether_redis::RedisStore::open(&url)
                    .expect("url")
                    .with_near_cache(100_000, 256 << 20),
            ))
        })
    };
    let a = serve_on_own_core(node(url.to_string()));
    let b = serve_on_own_core(node(url.to_string()));
    let each = pairs.div_ceil(clients);
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let login = client
                .post_form(&format!("http://{a}/login"), "")
                .await
                .expect("login");
            assert!(login.status.is_success());
            // B reads the session once so it holds a copy to go stale.
            client.get(&format!("http://{b}/v")).await.expect("read");
            let mut stale = 0;
            for i in 0..each {
                let value = format!("c{c}-{i}");
                let w = client
                    .post_form(&format!("http://{a}/v"), &value)
                    .await
                    .expect("write");
                assert!(w.status.is_success(), "write refused: {}", w.status);
                let r = client.get(&format!("http://{b}/v")).await.expect("read");
                if r.text() != value {
                    stale += 1;
                }
            }
            stale
        }));
    }
    let mut stale = 0;
    for t in tasks {
        stale += t.await.expect("client");
    }
    println!(
        "{} pairs ({clients} clients at once): write on node A, then the next request on node B: **{stale} stale reads**",
        each * clients
    );
}
