//! A handler reading one session attribute: tether + `MemoryStore` against
//! tower-sessions + its `MemoryStore`, in the same process and the same run.
//!
//! Each server runs on its own single-threaded runtime (one core each), and
//! `wrk` drives them in alternating rounds with a logged-in session cookie.
//!
//! ```text
//! cargo bench -p tether-bench --bench session_read -- [--seconds 5] [--rounds 3] [--connections 16]
//! ```

use axum::routing::{get, post};
use axum::Router;
use tether_bench::{block_on, median, serve_on_own_core, wrk, wrk_options, WrkResult};
use tether_testkit::Client;

fn tether_app() -> Router {
    tether_app_with(tether::SessionLayer::new(tether::MemoryStore::new()))
}

fn tether_app_with(layer: tether::SessionLayer) -> Router {
    async fn login(session: tether::Session) -> Result<&'static str, tether::SessionError> {
        session.insert("loginMember", 7u64).await?;
        Ok("ok")
    }
    async fn mypage(session: tether::Session) -> Result<String, tether::SessionError> {
        Ok(session
            .get::<u64>("loginMember")
            .await?
            .map_or_else(|| "anonymous".into(), |m| m.to_string()))
    }
    Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .layer(layer.with_config(tether::SessionConfig::default().with_secure(false)))
}

fn tower_sessions_app() -> Router {
    use tower_sessions::{MemoryStore, Session, SessionManagerLayer};
    async fn login(session: Session) -> &'static str {
        session.insert("loginMember", 7u64).await.expect("insert");
        "ok"
    }
    async fn mypage(session: Session) -> String {
        session
            .get::<u64>("loginMember")
            .await
            .expect("get")
            .map_or_else(|| "anonymous".into(), |m| m.to_string())
    }
    Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .layer(SessionManagerLayer::new(MemoryStore::default()).with_secure(false))
}

/// A server under test: its name, its router, its session cookie's name.
type Peer = (
    &'static str,
    Box<dyn FnOnce() -> Router + Send>,
    &'static str,
);

fn main() {
    let (seconds, rounds, connections) = wrk_options();
    block_on(async {
        // The store every node of a fleet would share, for comparison: a
        // private redis-server on loopback, one round trip per read.
        let redis = tether_testkit::RedisServer::start()
            .await
            .expect("redis-server (apt-get install redis-server)");
        let url = redis.url();
        let keys = tether_jwt::generate_hs256_key_file("bench");
        let jwt = move |revocation: Option<String>| -> Box<dyn FnOnce() -> Router + Send> {
            let keys = keys.clone();
            Box::new(move || {
                let codec = tether_jwt::JwtCodec::from_toml(&keys).expect("key file");
                let mut sessions =
                    tether::JwtSessions::new(codec.with_subject_attribute("loginMember"));
                if let Some(url) = revocation {
                    let store = tether_redis::RedisStore::open(&url).expect("redis url");
                    sessions = sessions.with_revocation(tether_jwt::Revocation::new(
                        std::sync::Arc::new(store),
                        std::time::Duration::from_secs(43_200),
                    ));
                }
                tether_app_with(tether::SessionLayer::jwt(sessions))
            })
        };
        let redis_url = redis.url();
        let peers: [Peer; 5] = [
            ("tether+memory", Box::new(tether_app), "SESSION"),
            ("tower-sessions", Box::new(tower_sessions_app), "id"),
            (
                "tether+redis",
                Box::new(move || {
                    tether_app_with(tether::SessionLayer::new(
                        tether_redis::RedisStore::open(&url).expect("redis url"),
                    ))
                }),
                "SESSION",
            ),
            ("tether+jwt", jwt(None), "SESSION"),
            ("tether+jwt+revocation", jwt(Some(redis_url)), "SESSION"),
        ];
        let mut targets = Vec::new();
        for (name, app, cookie_name) in peers {
            let addr = serve_on_own_core(app);
            let client = Client::new();
            let login = client
                .post_form(&format!("http://{addr}/login"), "")
                .await
                .expect("login");
            assert!(login.status.is_success(), "{name} login: {}", login.status);
            let cookie = client.cookie(cookie_name).expect("session cookie");
            let check = client
                .get(&format!("http://{addr}/mypage"))
                .await
                .expect("mypage");
            assert_eq!(check.text(), "7", "{name} does not read the session");
            if name.contains("jwt") {
                eprintln!(
                    "{name}: a session holding loginMember is a {}-byte token",
                    cookie.len()
                );
            }
            targets.push((name, addr, format!("Cookie: {cookie_name}={cookie}")));
        }
        let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(); targets.len()];
        for round in 1..=rounds {
            for (i, (name, addr, cookie)) in targets.iter().enumerate() {
                let url = format!("http://{addr}/mypage");
                let r = wrk(&url, std::slice::from_ref(cookie), connections, seconds)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                eprintln!(
                    "round {round} {name:<15} {:>10.0} req/s  p50 {:>8.1?}  p99 {:>8.1?}  errors {}",
                    r.rps, r.p50, r.p99, r.errors
                );
                assert_eq!(r.errors, 0, "{name} answered errors");
                results[i].push(r);
            }
        }
        let summary: Vec<(f64, f64)> = results
            .iter()
            .map(|rs| {
                (
                    median(rs.iter().map(|r| r.rps).collect()),
                    median(rs.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect()),
                )
            })
            .collect();
        let (base_rps, base_p99) = summary[1];
        println!("\n| server | req/s (median of {rounds}) | p99 ms | req/s ratio to tower-sessions | p99 ratio |");
        println!("|---|---|---|---|---|");
        for ((name, _, _), (rps, p99)) in targets.iter().zip(&summary) {
            println!(
                "| {name} | {rps:.0} | {p99:.3} | {:.2} | {:.2} |",
                rps / base_rps,
                p99 / base_p99
            );
        }
        println!("\n{seconds} s per round, {rounds} rounds alternating, wrk -t1 -c{connections}, one server core each");
    });
}
