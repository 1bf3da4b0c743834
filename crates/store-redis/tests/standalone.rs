//! `RedisStore` against a real, private `redis-server`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tether::{Session, SessionError, SessionLayer};
use tether_core::testing::record_with;
use tether_core::{Load, SessionId, SessionStore, Timestamp};
use tether_redis::RedisStore;
use tether_testkit::RedisServer;
use tower::ServiceExt;

async fn fixture() -> (RedisStore, RedisServer) {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url()).unwrap();
    (store, server)
}

tether_core::store_conformance!(fixture());

/// A direct client for assertions, separate from the store's connection.
async fn redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_session_is_one_readable_hash_with_a_ttl() {
    let (store, server) = fixture().await;
    let now = Timestamp::now();
    let r = record_with(now, &[("loginMember", "7"), ("cart", "[\"book\"]")]);
    store.create(&r).await.unwrap();
    let mut c = redis(&server).await;
    let key = format!("tether:session:{{{}}}", r.id);
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields["attr:loginMember"], "7");
    assert_eq!(fields["attr:cart"], "[\"book\"]");
    assert_eq!(fields["meta:version"], "1");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1_700_000..=1_800_000).contains(&ttl), "{ttl}");
}

async fn login(session: Session) -> Result<&'static str, SessionError> {
    session.cycle_id().await?;
    session.insert("loginMember", 7u64).await?;
    Ok("ok")
}

async fn mypage(session: Session) -> Result<(StatusCode, String), SessionError> {
    Ok(match session.get::<u64>("loginMember").await? {
        Some(m) => (StatusCode::OK, m.to_string()),
        None => (StatusCode::UNAUTHORIZED, "not logged in".into()),
    })
}

async fn set(session: Session, body: String) -> Result<&'static str, SessionError> {
    session.insert("theme", body).await?;
    Ok("ok")
}

async fn cart(session: Session) -> Result<String, SessionError> {
    let n = session
        .modify("cart", |c: &mut Option<Vec<String>>| {
            let c = c.get_or_insert_with(Vec::new);
            c.push("book".into());
            c.len()
        })
        .await?;
    Ok(n.to_string())
}

fn app(store: Arc<RedisStore>) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .route("/set", post(set))
        .route("/cart", post(cart))
        .layer(SessionLayer::from_arc(store))
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, format!("SESSION={c}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from("dark")).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let cookie = res
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap()[8..30].to_string());
    let body =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    (status, cookie, body)
}

/// Counts the commands clients send to a server (round trips), using
/// MONITOR: commands a script runs are tagged `[0 lua]` and do not count.
struct RoundTrips {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    probe: redis::aio::MultiplexedConnection,
    marker: u32,
    _task: tokio::task::JoinHandle<()>,
}

impl RoundTrips {
    async fn new(server: &RedisServer) -> Self {
        use futures_util::StreamExt;
        let client = redis::Client::open(server.url()).unwrap();
        let monitor = client.get_async_monitor().await.unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let task = tokio::spawn(async move {
            let mut stream = monitor.into_on_message::<String>();
            while let Some(line) = stream.next().await {
                sink.lock().unwrap().push(line);
            }
        });
        let mut rt = Self {
            lines,
            probe: redis(server).await,
            marker: 0,
            _task: task,
        };
        rt.take().await;
        rt
    }

    /// Client commands since the last call.
    async fn take(&mut self) -> usize {
        self.marker += 1;
        let marker = format!("tether-marker-{}", self.marker);
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(&mut self.probe)
            .await
            .unwrap();
        let lines = self.lines.clone();
        let m = marker.clone();
        tether_testkit::eventually(
            std::time::Duration::from_secs(5),
            "the MONITOR marker",
            || {
                let found = lines.lock().unwrap().iter().any(|l| l.contains(&m));
                async move { found.then_some(()) }
            },
        )
        .await
        .unwrap();
        let mut lines = self.lines.lock().unwrap();
        let at = lines.iter().position(|l| l.contains(&marker)).unwrap();
        let n = lines[..at].iter().filter(|l| !l.contains(" lua]")).count();
        lines.drain(..=at);
        n
    }
}

#[tokio::test]
async fn round_trips_per_request_are_counted() {
    let (store, server) = fixture().await;
    let app = app(Arc::new(store));
    let (_, cookie, _) = call(&app, "POST", "/login", None).await;
    let id = cookie.unwrap();
    // Warm up: each script is loaded into Redis on its first use.
    let (_, warm, _) = call(&app, "POST", "/set", None).await;
    call(&app, "POST", "/login", warm.as_deref()).await;
    call(&app, "GET", "/mypage", Some(&id)).await;
    call(&app, "POST", "/set", Some(&id)).await;
    call(&app, "POST", "/cart", Some(&id)).await;
    let mut c = RoundTrips::new(&server).await;
    let (status, _, body) = call(&app, "GET", "/mypage", Some(&id)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "7"));
    assert_eq!(c.take().await, 1, "a read-only request is one round trip");
    call(&app, "POST", "/set", Some(&id)).await;
    assert_eq!(c.take().await, 1, "a blind write is one round trip");
    let (_, new_cookie, _) = call(&app, "POST", "/login", None).await;
    assert!(new_cookie.is_some());
    assert_eq!(c.take().await, 1, "creating a session is one round trip");
    call(&app, "POST", "/login", Some(&id)).await;
    assert_eq!(
        c.take().await,
        1,
        "rotating at login is one round trip on one node"
    );
    let (_, _, n) = call(&app, "POST", "/cart", new_cookie.as_deref()).await;
    assert_eq!(n, "1");
    assert_eq!(
        c.take().await,
        2,
        "read-modify-write is a load and an apply"
    );
}

#[tokio::test]
async fn redis_down_is_503_and_recovery_needs_no_restart() {
    let (store, mut server) = fixture().await;
    let app = app(Arc::new(store));
    let (_, cookie, _) = call(&app, "POST", "/login", None).await;
    let id = cookie.unwrap();
    assert_eq!(
        call(&app, "GET", "/mypage", Some(&id)).await.0,
        StatusCode::OK
    );

    server.stop().await;
    for path in ["/mypage", "/set", "/login"] {
        let method = if path == "/mypage" { "GET" } else { "POST" };
        let started = std::time::Instant::now();
        let (status, cookie, body) = call(&app, method, path, Some(&id)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(body.contains("session store unavailable"), "{body}");
        assert!(
            cookie.is_none(),
            "{path} changed the cookie during the outage"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(8),
            "{path} hung"
        );
    }
    // The data is gone with this private, non-persistent server, but the
    // store reconnects by itself: a new login works without a restart.
    server.restart().await.unwrap();
    let (status, cookie, _) = call(&app, "POST", "/login", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&app, "GET", "/mypage", cookie.as_deref()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_requests_on_different_attributes_both_survive_in_redis() {
    let (store, _server) = fixture().await;
    let store = Arc::new(store);
    let r = record_with(Timestamp::now(), &[]);
    store.create(&r).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..10 {
        let store = store.clone();
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            let mut d = tether_core::Delta::default();
            d.set(
                format!("w{w}"),
                serde_json::value::to_raw_value(&w).unwrap(),
            );
            store
                .apply(&id, &d, Timestamp::now())
                .await
                .unwrap()
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let back = store
        .load(&r.id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.attributes.len(), 10);
    assert_eq!(back.version, 11);
    let _ = SessionId::random();
}

/// Regression (found in review): Lua's `unpack` limit made sessions with a
/// few thousand attributes fail for good, reported as "try again later".
#[tokio::test]
async fn thousands_of_attributes_fit_one_script_call() {
    let (store, _server) = fixture().await;
    let now = Timestamp::now();
    let names: Vec<String> = (0..4100).map(|i| format!("a{i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let r = record_with(now, &pairs);
    store.create(&r).await.unwrap();
    let mut d = tether_core::Delta::default();
    for n in &names {
        d.set(n.as_str(), tether_core::testing::json("2"));
    }
    assert_eq!(store.apply(&r.id, &d, now).await.unwrap(), Some(2));
    let back = store.load(&r.id, Load::at(now)).await.unwrap().unwrap();
    assert_eq!(back.attributes.len(), 4100);
    assert!(back.attributes.values().all(|v| v.get() == "2"));
}
