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
