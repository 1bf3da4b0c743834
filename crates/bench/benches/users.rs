//! What a user's session index costs: logins per second with and without a
//! principal (and with a limit of five sessions per user, evicting the
//! oldest), over `MemoryStore` and a private `redis-server`, in the same
//! run; then how long the reaper takes to report and clean up 10 000
//! expired sessions of 1 000 users in Redis.
//!
//! Each login is `POST /login` with a random member among 1 000, so most
//! are a returning user's (the index exists) and some a user's first.
//!
//! ```text
//! cargo bench -p tether-bench --bench users -- [--seconds 5] [--rounds 3] [--connections 16]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use tether::{LimitPolicy, Session, SessionConfig, SessionError, SessionLayer, SessionLimit};
use tether_bench::{block_on, median, serve_on_own_core, wrk_options, wrk_script, WrkResult};
use tether_core::principal::{InStore, PrincipalIndex};
use tether_core::{SessionStore, Timestamp};

async fn login(session: Session, body: String) -> Result<&'static str, SessionError> {
    session.cycle_id().await?;
    session
        .insert("loginMember", body.trim().parse::<u64>().unwrap_or(0))
        .await?;
    Ok("ok")
}

#[derive(Clone, Copy, Debug)]
enum Index {
    Off,
    On,
    Limited,
}

fn app(store: Arc<dyn SessionStore>, index: Index) -> Router {
    let mut config = SessionConfig::default().with_secure(false);
    if !matches!(index, Index::Off) {
        config = config.with_principal_attribute("loginMember");
    }
    if matches!(index, Index::Limited) {
        config = config.with_session_limit(SessionLimit {
            max: 5,
            policy: LimitPolicy::EvictOldest,
        });
    }
    Router::new()
        .route("/login", post(login))
        .layer(SessionLayer::from_arc(store).with_config(config))
}

const SCRIPT: &str = "wrk.method = \"POST\"\n\
    request = function()\n  return wrk.format(nil, nil, nil, tostring(math.random(1, 1000)))\nend\n";

fn main() {
    let (seconds, rounds, connections) = wrk_options();
    block_on(async {
        let redis = tether_testkit::RedisServer::start()
            .await
            .expect("redis-server (apt-get install redis-server)");
        let mut targets = Vec::new();
        for store in ["memory", "redis"] {
            for index in [Index::Off, Index::On, Index::Limited] {
                let url = redis.url();
                let addr = serve_on_own_core(Box::new(move || {
                    let s: Arc<dyn SessionStore> = if store == "memory" {
                        Arc::new(tether::MemoryStore::new())
                    } else {
                        Arc::new(tether_redis::RedisStore::open(&url).expect("url"))
                    };
                    app(s, index)
                }));
                targets.push((format!("{store}, index {index:?}"), addr));
            }
        }
        let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(); targets.len()];
        for round in 1..=rounds {
            for (i, (name, addr)) in targets.iter().enumerate() {
                let r = wrk_script(
                    &format!("http://{addr}/login"),
                    SCRIPT,
                    connections,
                    seconds,
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                eprintln!(
                    "round {round} {name:<28} {:>8.0} logins/s  p99 {:>8.1?}  errors {}",
                    r.rps, r.p99, r.errors
                );
                assert_eq!(r.errors, 0, "{name} answered errors");
                results[i].push(r);
            }
        }
        println!("\n| store, index | logins/s (median of {rounds}) | p99 ms | vs the same store without the index |");
        println!("|---|---|---|---|");
        for (i, (name, _)) in targets.iter().enumerate() {
            let rps = median(results[i].iter().map(|r| r.rps).collect());
            let p99 = median(
                results[i]
                    .iter()
                    .map(|r| r.p99.as_secs_f64() * 1e3)
                    .collect(),
            );
            let base = median(results[i / 3 * 3].iter().map(|r| r.rps).collect());
            println!("| {name} | {rps:.0} | {p99:.2} | {:.2} |", rps / base);
        }
        println!("\n{seconds} s per run, {rounds} rounds alternating, wrk -t1 -c{connections}, one server core each");

        // Expiry: 10 000 sessions of 1 000 users, reaped after they expire.
        let store: Arc<dyn SessionStore> =
            Arc::new(tether_redis::RedisStore::open(&redis.url()).expect("url"));
        let index = PrincipalIndex::new(store.clone()).with_namespace("expiry-bench");
        let alive = InStore(store.clone());
        let idle = Duration::from_secs(2);
        let written = Instant::now();
        for i in 0..10_000u64 {
            let principal = format!("user-{}", i % 1000);
            let now = Timestamp::now();
            let (r, member) = tether_core::testing::principal_session(&principal, now, idle);
            index
                .admit(&principal, &r.id, member, None, &alive, now)
                .await
                .expect("admit");
            store.create(&r).await.expect("create");
        }
        let writing = written.elapsed();
        let after = Timestamp(Timestamp::now().0 + 2_500);
        let reaping = Instant::now();
        let reported = std::sync::atomic::AtomicUsize::new(0);
        index
            .reap(&alive, after, &|_| {
                reported.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await
            .expect("reap");
        let took = reaping.elapsed();
        println!(
            "\nExpiry: 10 000 sessions of 1 000 users written (admission and session) in {writing:?}; \
             one reaper found and reported {} expiries in {took:?} ({:.0} µs each, one connection, sequential)",
            reported.into_inner(),
            took.as_secs_f64() * 1e6 / 10_000.0
        );
    });
}
