//! What the Redis tests share: the app a user would write, a way to call
//! it, and a round-trip counter at the servers.

#![allow(dead_code)] // Each test binary uses a part.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tether::{Session, SessionError, SessionLayer};
use tether_redis::RedisStore;
use tether_testkit::RedisServer;
use tower::ServiceExt;

pub async fn login(session: Session) -> Result<&'static str, SessionError> {
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

pub fn app(store: Arc<RedisStore>) -> Router {
    app_with(SessionLayer::from_arc(store))
}

pub fn app_with(layer: SessionLayer) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .route("/set", post(set))
        .route("/cart", post(cart))
        .route("/logout", post(logout))
        .layer(layer)
}

pub async fn logout(session: Session) -> Result<&'static str, SessionError> {
    session.destroy().await?;
    Ok("bye")
}

pub async fn call(
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

/// One server's MONITOR feed.
struct Monitor {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    probe: redis::aio::MultiplexedConnection,
    _task: tokio::task::JoinHandle<()>,
}

/// Counts the commands clients send to servers (round trips), using
/// MONITOR on each (every master of a cluster): commands a script runs are
/// tagged `[0 lua]` and do not count.
pub struct RoundTrips {
    monitors: Vec<Monitor>,
    marker: u32,
}

impl RoundTrips {
    pub async fn new(servers: &[&RedisServer]) -> Self {
        use futures_util::StreamExt;
        let mut monitors = Vec::new();
        for server in servers {
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
            monitors.push(Monitor {
                lines,
                probe: server.connect().await.unwrap(),
                _task: task,
            });
        }
        let mut rt = Self {
            monitors,
            marker: 0,
        };
        rt.take().await;
        rt
    }

    /// Client commands since the last call, on all the servers.
    pub async fn take(&mut self) -> usize {
        self.marker += 1;
        let marker = format!("tether-marker-{}", self.marker);
        let mut n = 0;
        for m in &mut self.monitors {
            let _: String = redis::cmd("ECHO")
                .arg(&marker)
                .query_async(&mut m.probe)
                .await
                .unwrap();
            let lines = m.lines.clone();
            let mk = marker.clone();
            tether_testkit::eventually(
                std::time::Duration::from_secs(5),
                "the MONITOR marker",
                || {
                    let found = lines.lock().unwrap().iter().any(|l| l.contains(&mk));
                    async move { found.then_some(()) }
                },
            )
            .await
            .unwrap();
            let mut lines = m.lines.lock().unwrap();
            let at = lines.iter().position(|l| l.contains(&marker)).unwrap();
            if std::env::var_os("SHOW_MONITOR").is_some() {
                eprintln!("{:#?}", &lines[..at]);
            }
            // Commands a script runs are tagged `lua]`; `CLIENT CACHING`
            // and `WAIT` only ever travel in the same pipeline as the
            // command they serve (one write to the socket, one round
            // trip); `HELLO` (and `CLIENT` settings) open a new connection,
            // once in its life; the driver's own cluster topology queries
            // (`CLUSTER SLOTS`) and heartbeats (`PING`) serve no request.
            n += lines[..at]
                .iter()
                .filter(|l| {
                    ![
                        " lua]",
                        "] \"CLIENT\"",
                        "] \"WAIT\"",
                        "] \"HELLO\"",
                        "] \"CLUSTER\"",
                        "] \"PING\"",
                        "] \"ECHO\"",
                    ]
                    .iter()
                    .any(|skip| l.contains(skip))
                })
                .count();
            lines.drain(..=at);
        }
        n
    }
}

/// Round trips of each kind of request: `(read, blind write, create,
/// rotate, read-then-write)`.
pub async fn round_trips(store: RedisStore, servers: &[&RedisServer]) -> [usize; 5] {
    let app = app(Arc::new(store));
    let (_, cookie, _) = call(&app, "POST", "/login", None).await;
    let id = cookie.unwrap();
    // Warm up: each script is loaded into Redis on its first use.
    let (_, warm, _) = call(&app, "POST", "/set", None).await;
    call(&app, "POST", "/login", warm.as_deref()).await;
    call(&app, "GET", "/mypage", Some(&id)).await;
    call(&app, "POST", "/set", Some(&id)).await;
    call(&app, "POST", "/cart", Some(&id)).await;
    let mut c = RoundTrips::new(servers).await;
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
