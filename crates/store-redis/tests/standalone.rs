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
    // The metadata, packed: version,last,idle,deadline,created,size.
    let meta: Vec<u64> = fields["m"].split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!(meta.len(), 6, "{fields:?}");
    assert_eq!(meta[0], 1, "version");
    assert_eq!(meta[5], r.size() as u64, "size");
    assert_eq!(
        fields.len(),
        3,
        "two attributes and the metadata: {fields:?}"
    );
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
        if std::env::var_os("SHOW_MONITOR").is_some() {
            eprintln!("{:#?}", &lines[..at]);
        }
        // Commands a script runs are tagged `lua]`; `CLIENT CACHING` and
        // `WAIT` only ever travel in the same pipeline as the command they
        // serve (one write to the socket, one round trip); `HELLO` (and
        // `CLIENT` settings) open a new connection, once in its life.
        let n = lines[..at]
            .iter()
            .filter(|l| {
                ![" lua]", "] \"CLIENT\"", "] \"WAIT\"", "] \"HELLO\""]
                    .iter()
                    .any(|skip| l.contains(skip))
            })
            .count();
        lines.drain(..=at);
        n
    }
}

/// Round trips of each kind of request: `(read, blind write, create,
/// rotate, read-then-write)`.
async fn round_trips(store: RedisStore, server: &RedisServer) -> [usize; 5] {
    let app = app(Arc::new(store));
    let (_, cookie, _) = call(&app, "POST", "/login", None).await;
    let id = cookie.unwrap();
    // Warm up: each script is loaded into Redis on its first use.
    let (_, warm, _) = call(&app, "POST", "/set", None).await;
    call(&app, "POST", "/login", warm.as_deref()).await;
    call(&app, "GET", "/mypage", Some(&id)).await;
    call(&app, "POST", "/set", Some(&id)).await;
    call(&app, "POST", "/cart", Some(&id)).await;
    let mut c = RoundTrips::new(server).await;
    let (status, _, body) = call(&app, "GET", "/mypage", Some(&id)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "7"));
    let read = c.take().await;
    call(&app, "POST", "/set", Some(&id)).await;
    let write = c.take().await;
    let (_, new_cookie, _) = call(&app, "POST", "/login", None).await;
    assert!(new_cookie.is_some());
    let create = c.take().await;
    let (_, rotated, _) = call(&app, "POST", "/login", Some(&id)).await;
    assert!(rotated.is_some());
    let rotate = c.take().await;
    let (_, _, n) = call(&app, "POST", "/cart", new_cookie.as_deref()).await;
    assert_eq!(n, "1");
    let rmw = c.take().await;
    [read, write, create, rotate, rmw]
}

#[tokio::test]
async fn round_trips_per_request_are_counted() {
    let (store, server) = fixture().await;
    assert_eq!(
        round_trips(store, &server).await,
        [1, 1, 1, 1, 2],
        "read, blind write, create, rotate, read-then-write: one each, two for the last"
    );
}

#[tokio::test]
async fn the_near_cache_saves_the_read_round_trip() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_near_cache(1000, 1 << 20);
    assert_eq!(
        round_trips(store, &server).await,
        [0, 1, 1, 1, 1],
        "read, blind write, create, rotate, read-then-write: the reads are local"
    );
}

/// `--redis-wait` adds no round trip: `WAIT` travels with the write.
#[tokio::test]
async fn waiting_for_replicas_adds_no_round_trip() {
    let server = RedisServer::start().await.expect("redis-server");
    // No replica here: WAIT 0 answers at once, and the count is checked.
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_wait(0, std::time::Duration::from_millis(100))
        .with_near_cache(1000, 1 << 20);
    assert_eq!(round_trips(store, &server).await, [0, 1, 1, 1, 1]);
}

/// A write that `WAIT` could not promise is refused (503), though Redis
/// holds it: "acknowledged" means replicated as configured.
#[tokio::test]
async fn a_write_no_replica_acknowledged_is_unavailable() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_wait(1, std::time::Duration::from_millis(50));
    let now = Timestamp::now();
    let r = record_with(now, &[("a", "1")]);
    let err = store.create(&r).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let why = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(
        why.as_deref(),
        Some("written on the Redis master but acknowledged by 0 of 1 replicas within 50 ms")
    );
    let mut d = tether_core::Delta::default();
    d.set("a", tether_core::testing::json("2"));
    let err = store.apply(&r.id, &d, now).await.unwrap_err();
    let why = std::error::Error::source(&err).map(ToString::to_string);
    assert!(why.unwrap_or_default().contains("acknowledged by 0 of 1"));
    assert!(store.delete(&r.id).await.unwrap_err().is_unavailable());
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
    let (status, cookie, body) = call(&app, "POST", "/login", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
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
