//! The kit's own parts work against real servers.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tether_testkit::{eventually, Client, RedisServer, TestServer};

#[tokio::test]
async fn the_cookie_jar_follows_set_cookie_across_ports() {
    let setter = TestServer::serve(Router::new().route(
        "/",
        get(|| async { ([("set-cookie", "SESSION=abc; Path=/; HttpOnly")], "set") }),
    ))
    .await
    .unwrap();
    let echo = TestServer::serve(Router::new().route(
        "/",
        get(|headers: axum::http::HeaderMap| async move {
            headers
                .get("cookie")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        }),
    ))
    .await
    .unwrap();
    let remover = TestServer::serve(Router::new().route(
        "/",
        get(|| async { ([("set-cookie", "SESSION=; Max-Age=0; Path=/")], "gone") }),
    ))
    .await
    .unwrap();
    let client = Client::new();
    client.get(&setter.url("/")).await.unwrap();
    assert_eq!(client.cookie("SESSION").as_deref(), Some("abc"));
    assert_eq!(
        client.get(&echo.url("/")).await.unwrap().text(),
        "SESSION=abc"
    );
    let forked = client.fork();
    client.get(&remover.url("/")).await.unwrap();
    assert_eq!(client.cookie("SESSION"), None);
    assert_eq!(client.get(&echo.url("/")).await.unwrap().text(), "");
    assert_eq!(forked.cookie("SESSION").as_deref(), Some("abc"));
}

#[tokio::test]
async fn eventually_reports_what_it_waited_for() {
    let err = eventually(Duration::from_millis(50), "the impossible", || async {
        None::<()>
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("the impossible"));
}

#[tokio::test]
async fn redis_server_starts_stops_and_restarts() {
    let mut redis = RedisServer::start().await.unwrap();
    let port = redis.port();
    assert!(tether_testkit::redis_ping(port).await);
    redis.stop().await;
    assert!(!tether_testkit::redis_ping(port).await);
    redis.restart().await.unwrap();
    assert!(tether_testkit::redis_ping(port).await);
    let dir = redis.dir().to_path_buf();
    drop(redis);
    assert!(!dir.exists(), "temp dir left behind");
}

/// An app whose `/login` refuses member 1001 and whose `/mypage` says
/// "logged out" to every second read.
async fn fussy_app() -> TestServer {
    use axum::routing::post;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let reads = Arc::new(AtomicU64::new(0));
    TestServer::serve(
        Router::new()
            .route(
                "/login",
                post(|body: String| async move {
                    if body.contains("1001") {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "store down")
                    } else {
                        (axum::http::StatusCode::OK, "{}")
                    }
                }),
            )
            .route(
                "/mypage",
                get(move || {
                    let reads = reads.clone();
                    async move {
                        if reads.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
                            axum::http::StatusCode::UNAUTHORIZED
                        } else {
                            axum::http::StatusCode::OK
                        }
                    }
                }),
            ),
    )
    .await
    .unwrap()
}

/// Regression: `tether demo` showed a user whose login failed as "0 of 49"
/// users instead of saying a login was refused.
#[tokio::test]
async fn refused_logins_are_reported_not_dropped() {
    let app = fussy_app().await;
    let clients = (0..3).map(|_| Client::new()).collect();
    let (users, refused) =
        tether_testkit::Shoppers::log_in_as(&app.url(""), clients, Duration::from_millis(50)).await;
    assert_eq!(users.len(), 2);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].starts_with("member 1001: 503 store down"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_observer_sees_every_answer_and_a_logged_out_user_logs_in_again() {
    use std::sync::{Arc, Mutex};
    use tether_testkit::{Plan, Seen, Shoppers, Step};
    let app = fussy_app().await;
    let users = Shoppers::log_in(&app.url(""), 1).await.unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = seen.clone();
    let plan = Plan {
        pace: Duration::from_millis(5),
        fixed_rate: true,
        reads: 1,
        writes: 0,
        log_in_again: true,
        observer: Some(Arc::new(move |s| sink.lock().unwrap().push(s))),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = users.shop_with(plan, stopped);
    eventually(Duration::from_secs(10), "four reads", || async {
        let reads = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.step == Step::Read)
            .count();
        (reads >= 4).then_some(())
    })
    .await
    .unwrap();
    stop.send(true).unwrap();
    drop(running);
    let seen = seen.lock().unwrap().clone();
    let outs: Vec<&Seen> = seen.iter().filter(|s| s.logged_out).collect();
    assert!(outs.iter().all(|s| s.status == Some(401)), "{seen:?}");
    // Every 401 is followed by a login again (unless the copy was taken
    // between the two).
    for (i, s) in seen.iter().enumerate() {
        if s.logged_out && i + 1 < seen.len() {
            assert_eq!(
                seen.get(i + 1).map(|n| n.step),
                Some(Step::Login),
                "{seen:?}"
            );
        }
    }
    assert!(!outs.is_empty(), "{seen:?}");
}
