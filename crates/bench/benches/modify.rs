//! Read-modify-write of one attribute: a counter incremented by every
//! request (`POST /incr`), in the same run for
//! - tether's atomic `Session::modify` (conditional write, retried on a
//!   lost race),
//! - the same handler written as `get` then `insert` (what `modify` did
//!   before it was atomic: last writer wins),
//! - tower-sessions (`get` then `insert`, the peer a user would pick),
//!
//! over `MemoryStore` and Redis, with every request on one session
//! (`contended`: sixteen connections at once on one counter) and spread
//! over 256 sessions. After each run the counters are read back: every
//! answered increment must be there; "lost" counts those that are not.
//!
//! ```text
//! cargo bench -p tether-bench --bench modify -- [--seconds 5] [--rounds 3] [--connections 16]
//! ```

use std::net::SocketAddr;

use axum::routing::{get, post};
use axum::Router;
use tether_bench::{block_on, median, serve_on_own_core, wrk_options, wrk_script, WrkResult};
use tether_testkit::Client;

const SESSIONS: usize = 256;

fn tether_app(layer: tether::SessionLayer, atomic: bool) -> Router {
    async fn login(session: tether::Session) -> Result<&'static str, tether::SessionError> {
        session.insert("n", 0u64).await?;
        Ok("ok")
    }
    async fn atomic_incr(session: tether::Session) -> Result<String, tether::SessionError> {
        let n = session
            .modify("n", |n: &mut Option<u64>| {
                let v = n.unwrap_or(0) + 1;
                *n = Some(v);
                v
            })
            .await?;
        Ok(n.to_string())
    }
    async fn blind_incr(session: tether::Session) -> Result<String, tether::SessionError> {
        let n = session.get::<u64>("n").await?.unwrap_or(0) + 1;
        session.insert("n", n).await?;
        Ok(n.to_string())
    }
    async fn read(session: tether::Session) -> Result<String, tether::SessionError> {
        Ok(session.get::<u64>("n").await?.unwrap_or(0).to_string())
    }
    let incr = if atomic {
        post(atomic_incr)
    } else {
        post(blind_incr)
    };
    Router::new()
        .route("/login", post(login))
        .route("/incr", incr)
        .route("/n", get(read))
        .layer(layer.with_config(tether::SessionConfig::default().with_secure(false)))
}

fn tower_sessions_app() -> Router {
    use tower_sessions::{MemoryStore, Session, SessionManagerLayer};
    async fn login(session: Session) -> &'static str {
        session.insert("n", 0u64).await.expect("insert");
        "ok"
    }
    async fn incr(session: Session) -> String {
        let n = session.get::<u64>("n").await.expect("get").unwrap_or(0) + 1;
        session.insert("n", n).await.expect("insert");
        n.to_string()
    }
    async fn read(session: Session) -> String {
        session
            .get::<u64>("n")
            .await
            .expect("get")
            .unwrap_or(0)
            .to_string()
    }
    Router::new()
        .route("/login", post(login))
        .route("/incr", post(incr))
        .route("/n", get(read))
        .layer(SessionManagerLayer::new(MemoryStore::default()).with_secure(false))
}

/// A wrk script sending `POST /incr` with `cookies` in turn.
fn script(cookies: &[String]) -> String {
    let list: Vec<String> = cookies.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "local cookies = {{ {} }}\nlocal i = 0\nrequest = function()\n  i = i % #cookies + 1\n  return wrk.format(\"POST\", \"/incr\", {{ [\"Cookie\"] = cookies[i] }}, \"\")\nend\n",
        list.join(", ")
    )
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    cookies: Vec<String>,
    layer: Option<tether::SessionLayer>,
}

async fn counters(addr: SocketAddr, cookies: &[String]) -> u64 {
    let mut sum = 0;
    for c in cookies {
        let client = Client::new();
        let (name, value) = c.split_once('=').expect("name=value");
        client.set_cookie(name, value);
        let r = client.get(&format!("http://{addr}/n")).await.expect("read");
        sum += r.text().trim().parse::<u64>().expect("a count");
    }
    sum
}

#[derive(Default, Clone)]
struct Row {
    runs: Vec<WrkResult>,
    lost: u64,
    answered: u64,
    retries: u64,
    gave_up: u64,
}

fn main() {
    let (seconds, rounds, connections) = wrk_options();
    block_on(async {
        let redis = tether_testkit::RedisServer::start()
            .await
            .expect("redis-server (apt-get install redis-server)");
        let memory = tether::SessionLayer::new(tether::MemoryStore::new());
        let memory_blind = tether::SessionLayer::new(tether::MemoryStore::new());
        let redis_layer = |url: String| {
            tether::SessionLayer::new(tether_redis::RedisStore::open(&url).expect("redis url"))
        };
        let on_redis = redis_layer(redis.url());
        let on_redis_blind = redis_layer(redis.url());
        type App = Box<dyn FnOnce() -> Router + Send>;
        let setups: Vec<(
            &'static str,
            App,
            &'static str,
            Option<tether::SessionLayer>,
        )> = vec![
            (
                "tether+memory modify",
                Box::new({
                    let l = memory.clone();
                    move || tether_app(l, true)
                }),
                "SESSION",
                Some(memory),
            ),
            (
                "tether+memory get+insert",
                Box::new({
                    let l = memory_blind.clone();
                    move || tether_app(l, false)
                }),
                "SESSION",
                None,
            ),
            (
                "tower-sessions+memory get+insert",
                Box::new(tower_sessions_app),
                "id",
                None,
            ),
            (
                "tether+redis modify",
                Box::new({
                    let l = on_redis.clone();
                    move || tether_app(l, true)
                }),
                "SESSION",
                Some(on_redis),
            ),
            (
                "tether+redis get+insert",
                Box::new({
                    let l = on_redis_blind.clone();
                    move || tether_app(l, false)
                }),
                "SESSION",
                None,
            ),
        ];
        let mut targets = Vec::new();
        for (name, app, cookie_name, layer) in setups {
            let addr = serve_on_own_core(app);
            let mut cookies = Vec::new();
            for _ in 0..SESSIONS {
                let client = Client::new();
                let r = client
                    .post_form(&format!("http://{addr}/login"), "")
                    .await
                    .expect("login");
                assert!(r.status.is_success(), "{name} login: {}", r.status);
                cookies.push(format!(
                    "{cookie_name}={}",
                    client.cookie(cookie_name).expect("cookie")
                ));
            }
            targets.push(Target {
                name,
                addr,
                cookies,
                layer,
            });
        }
        let shapes: [(&str, usize); 2] =
            [("one session (contended)", 1), ("256 sessions", SESSIONS)];
        let mut rows: Vec<Vec<Row>> = vec![vec![Row::default(); shapes.len()]; targets.len()];
        for round in 1..=rounds {
            for (s, (shape, n)) in shapes.iter().enumerate() {
                for (t, target) in targets.iter().enumerate() {
                    let cookies = &target.cookies[..*n];
                    let before = counters(target.addr, cookies).await;
                    let stats0 = target.layer.as_ref().map_or((0, 0), |l| l.modify_retries());
                    let url = format!("http://{}/incr", target.addr);
                    let r = wrk_script(&url, &script(cookies), connections, seconds)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    let after = counters(target.addr, cookies).await;
                    let stats1 = target.layer.as_ref().map_or((0, 0), |l| l.modify_retries());
                    let answered = r.requests - r.errors;
                    let stored = after - before;
                    let row = &mut rows[t][s];
                    row.lost += answered.saturating_sub(stored);
                    row.answered += answered;
                    row.retries += stats1.0 - stats0.0;
                    row.gave_up += stats1.1 - stats0.1;
                    eprintln!(
                        "round {round} {shape:<24} {:<34} {:>8.0} req/s p99 {:>8.1?} answered {answered} stored {stored} errors {}",
                        target.name, r.rps, r.p99, r.errors
                    );
                    row.runs.push(r);
                }
            }
        }
        // Two nodes sharing one Redis, one session, half the connections on
        // each: races between nodes are retried in the store, not queued.
        let two: Vec<(&str, bool)> = vec![
            ("tether+redis modify, 2 nodes", true),
            ("tether+redis get+insert, 2 nodes", false),
        ];
        let mut cross = Vec::new();
        for (name, atomic) in two {
            let layers = [redis_layer(redis.url()), redis_layer(redis.url())];
            let addrs: Vec<SocketAddr> = layers
                .iter()
                .map(|l| {
                    let l = l.clone();
                    serve_on_own_core(Box::new(move || tether_app(l, atomic)))
                })
                .collect();
            let client = Client::new();
            client
                .post_form(&format!("http://{}/login", addrs[0]), "")
                .await
                .expect("login");
            let cookie = vec![format!(
                "SESSION={}",
                client.cookie("SESSION").expect("cookie")
            )];
            let mut runs = Vec::new();
            let (mut lost, mut answered, mut retries, mut gave_up) = (0, 0, 0, 0);
            for _ in 0..rounds {
                let before = counters(addrs[0], &cookie).await;
                let s0: Vec<(u64, u64)> = layers.iter().map(|l| l.modify_retries()).collect();
                let text = script(&cookie);
                let (u0, u1) = (
                    format!("http://{}/incr", addrs[0]),
                    format!("http://{}/incr", addrs[1]),
                );
                let (a, b) = tokio::join!(
                    wrk_script(&u0, &text, connections / 2, seconds),
                    wrk_script(&u1, &text, connections / 2, seconds)
                );
                let (a, b) = (
                    a.unwrap_or_else(|e| panic!("{e}")),
                    b.unwrap_or_else(|e| panic!("{e}")),
                );
                let after = counters(addrs[0], &cookie).await;
                let s1: Vec<(u64, u64)> = layers.iter().map(|l| l.modify_retries()).collect();
                let ok = a.requests - a.errors + b.requests - b.errors;
                answered += ok;
                lost += ok.saturating_sub(after - before);
                if atomic {
                    retries += s1.iter().zip(&s0).map(|(x, y)| x.0 - y.0).sum::<u64>();
                    gave_up += s1.iter().zip(&s0).map(|(x, y)| x.1 - y.1).sum::<u64>();
                }
                eprintln!(
                    "{name}: {:.0} req/s, answered {ok}, stored {}, errors {}",
                    a.rps + b.rps,
                    after - before,
                    a.errors + b.errors
                );
                runs.push((a.rps + b.rps, a.p99.max(b.p99)));
            }
            cross.push((name, atomic, runs, lost, answered, retries, gave_up));
        }
        println!("| shape | server | req/s (median of {rounds}) | p99 ms | vs get+insert on the same store | updates lost | retries per 1000 | 409s |");
        println!("|---|---|---|---|---|---|---|---|");
        for (s, (shape, _)) in shapes.iter().enumerate() {
            let rps: Vec<f64> = rows
                .iter()
                .map(|r| median(r[s].runs.iter().map(|w| w.rps).collect()))
                .collect();
            for (t, target) in targets.iter().enumerate() {
                let row = &rows[t][s];
                let p99 = median(row.runs.iter().map(|w| w.p99.as_secs_f64() * 1e3).collect());
                let base = match t {
                    0 => Some(rps[1]),
                    3 => Some(rps[4]),
                    _ => None,
                };
                println!(
                    "| {shape} | {} | {:.0} | {p99:.2} | {} | {} of {} | {} | {} |",
                    target.name,
                    rps[t],
                    base.map_or("".into(), |b| format!("{:.2}", rps[t] / b)),
                    row.lost,
                    row.answered,
                    if target.layer.is_some() {
                        format!(
                            "{:.1}",
                            row.retries as f64 * 1000.0 / row.answered.max(1) as f64
                        )
                    } else {
                        "".into()
                    },
                    if target.layer.is_some() {
                        row.gave_up.to_string()
                    } else {
                        "".into()
                    },
                );
            }
        }
        let base = median(cross[1].2.iter().map(|r| r.0).collect());
        for (name, atomic, runs, lost, answered, retries, gave_up) in &cross {
            let rps = median(runs.iter().map(|r| r.0).collect());
            let p99 = median(runs.iter().map(|r| r.1.as_secs_f64() * 1e3).collect());
            println!(
                "| one session, two nodes | {name} | {rps:.0} | {p99:.2} | {} | {lost} of {answered} | {} | {} |",
                if *atomic { format!("{:.2}", rps / base) } else { String::new() },
                if *atomic { format!("{:.1}", *retries as f64 * 1000.0 / (*answered).max(1) as f64) } else { String::new() },
                if *atomic { gave_up.to_string() } else { String::new() },
            );
        }
        println!("\n{seconds} s per run, {rounds} rounds, wrk -t1 -c{connections} POST /incr (two nodes: two wrk with half each), each server on its own core; Redis on loopback");
    });
}
