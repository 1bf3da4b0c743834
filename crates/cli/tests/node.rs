//! `tether node` as a real process over loopback TCP, and the brief's problem.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tether_testkit::{node_args, Client, Process, TestServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

async fn node(id: &str, extra: &[&str]) -> Process {
    let mut args = node_args(id, "memory");
    args.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn(bin(), &args).await.unwrap()
}

/// The brief's problem, shown honestly: a login on A means nothing to B.
#[tokio::test]
async fn local_sessions_log_the_user_out_on_another_server() {
    let (a, b) = tokio::join!(node("A", &[]), node("B", &[]));
    let user = Client::new();
    let login = user
        .post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(login.status, 200);
    assert_eq!(login.json().unwrap(), json!({"member": 7, "node": "A"}));

    let on_b = user.get(&b.url("/mypage")).await.unwrap();
    assert_eq!(on_b.status, 401);
    assert_eq!(
        on_b.json().unwrap(),
        json!({"error": "not logged in", "node": "B"})
    );

    let on_a = user.get(&a.url("/mypage")).await.unwrap();
    assert_eq!(on_a.status, 200);
    assert_eq!(on_a.json().unwrap(), json!({"member": 7, "node": "A"}));
}

#[tokio::test]
async fn the_reference_api_end_to_end() {
    let a = node("A", &[]).await;
    let user = Client::new();
    assert_eq!(user.get(&a.url("/health")).await.unwrap().status, 200);

    // Form login, as a browser sends it.
    let login = user.post_form(&a.url("/login"), "member=42").await.unwrap();
    assert_eq!(login.json().unwrap(), json!({"member": 42, "node": "A"}));
    assert_eq!(login.node().as_deref(), Some("A"));
    let cookie = &login.set_cookies()[0];
    assert!(cookie.starts_with("SESSION="), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
    assert!(!cookie.contains("Secure"), "--cookie-secure false");

    let cart = user
        .post_json(&a.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    assert_eq!(cart.json().unwrap(), json!({"cart": ["book"], "node": "A"}));
    let cart = user.post_form(&a.url("/cart"), "item=pen").await.unwrap();
    assert_eq!(
        cart.json().unwrap(),
        json!({"cart": ["book", "pen"], "node": "A"})
    );

    let page = user
        .send(
            http::Method::GET,
            &a.url("/mypage"),
            &[("accept", "text/html")],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("<b id=\"member\">42</b>") && html.contains("<li>pen</li>"),
        "{html}"
    );

    let logout = user.post_json(&a.url("/logout"), &json!({})).await.unwrap();
    assert_eq!(
        logout.json().unwrap(),
        json!({"logged_out": true, "node": "A"})
    );
    assert!(logout.set_cookies()[0].contains("Max-Age=0"));
    assert_eq!(user.get(&a.url("/mypage")).await.unwrap().status, 401);

    let stats = user.get(&a.url("/stats")).await.unwrap().json().unwrap();
    assert_eq!(stats["sessions"], 0, "{stats}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_not_500s() {
    let a = node("A", &["--max-session-bytes", "200"]).await;
    let user = Client::new();
    for body in ["{", "{\"member\": \"seven\"}", "[]", ""] {
        let r = user
            .send(
                http::Method::POST,
                &a.url("/login"),
                &[("content-type", "application/json")],
                body.to_string().into(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
        assert!(r.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("member"));
    }
    let good = tether_core::SessionId::random().to_string();
    for cookie in [
        format!("SESSION={}", &good[..21]),
        format!("SESSION={good}{}", "A".repeat(4000)),
        "SESSION=%%%%%%%%%%%%%%%%%%%%%%".to_string(),
        format!("SESSION={good}"), // well-formed but unknown
    ] {
        let r = user
            .send(
                http::Method::GET,
                &a.url("/mypage"),
                &[("cookie", cookie.as_str())],
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{cookie}");
    }
    // Over the session size limit: 413, and the cart already stored is intact.
    user.post_json(&a.url("/login"), &json!({"member": 1}))
        .await
        .unwrap();
    user.post_json(&a.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    let r = user
        .post_json(&a.url("/cart"), &json!({"item": "x".repeat(300)}))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("limit"), "{}", r.text());
    let r = user
        .post_json(&a.url("/cart"), &json!({"item": "pen"}))
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["cart"], json!(["book", "pen"]));
}

#[tokio::test]
async fn the_pre_login_session_id_is_dead_after_login() {
    let a = node("A", &[]).await;
    let attacker = Client::new();
    attacker
        .post_json(&a.url("/cart"), &json!({"item": "bait"}))
        .await
        .unwrap();
    let planted = attacker.cookie("SESSION").expect("anonymous session");

    let victim = Client::new();
    victim.set_cookie("SESSION", &planted);
    victim
        .post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    let after = victim.cookie("SESSION").unwrap();
    assert_ne!(after, planted);
    assert_eq!(victim.get(&a.url("/mypage")).await.unwrap().status, 200);
    assert_eq!(attacker.get(&a.url("/mypage")).await.unwrap().status, 401);
}

#[tokio::test]
async fn api_clients_can_use_the_x_auth_token_header() {
    let a = node("A", &[]).await;
    let api = Client::new();
    let login = api
        .post_json(&a.url("/login"), &json!({"member": 5}))
        .await
        .unwrap();
    let token = login.header("x-auth-token").expect("token header");
    let bare = Client::new();
    let r = bare
        .send(
            http::Method::GET,
            &a.url("/mypage"),
            &[("x-auth-token", token.as_str())],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.json().unwrap(), json!({"member": 5, "node": "A"}));
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut a = node("A", &[]).await;
    let status = a.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{status:?}\n{}", a.log());
    assert!(a.log().contains("node stopped"), "{}", a.log());
}

#[tokio::test]
async fn health_reports_not_ready() {
    let (router, handle) = tether_cli::node::app(&tether_cli::node::NodeConfig::new("A"))
        .await
        .unwrap();
    let server = TestServer::serve(router).await.unwrap();
    let client = Client::new();
    assert_eq!(
        client.get(&server.url("/health")).await.unwrap().status,
        200
    );
    handle.set_ready(false);
    let r = client.get(&server.url("/health")).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json().unwrap()["status"], "not ready");
}

#[tokio::test]
async fn an_unknown_store_is_refused_at_startup() {
    let out = tokio::process::Command::new(bin())
        .args([
            "node",
            "--id",
            "A",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "mongodb://x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown store"), "{err}");
}

/// The brief's recommended strategy: both nodes share one Redis, so a login
/// on A is a login on B.
#[tokio::test]
async fn with_redis_the_other_server_knows_the_session() {
    let mut redis = tether_testkit::RedisServer::start().await.unwrap();
    let url = redis.url();
    let spawn = |id: &'static str| {
        let url = url.clone();
        async move { Process::spawn(bin(), &node_args(id, &url)).await.unwrap() }
    };
    let (a, b) = tokio::join!(spawn("A"), spawn("B"));
    let user = Client::new();
    let login = user
        .post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(login.json().unwrap(), json!({"member": 7, "node": "A"}));
    let on_b = user.get(&b.url("/mypage")).await.unwrap();
    assert_eq!(on_b.json().unwrap(), json!({"member": 7, "node": "B"}));
    let cart = user
        .post_json(&b.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    assert_eq!(cart.json().unwrap()["cart"], json!(["book"]));
    let cart = user
        .post_json(&a.url("/cart"), &json!({"item": "pen"}))
        .await
        .unwrap();
    assert_eq!(cart.json().unwrap()["cart"], json!(["book", "pen"]));
    // Redis down: 503 with a clear body, not a logout; back up: served again.
    redis.stop().await;
    let r = user.get(&b.url("/mypage")).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("session store unavailable"));
    redis.restart().await.unwrap();
    let again = Client::new();
    again
        .post_json(&b.url("/login"), &json!({"member": 8}))
        .await
        .unwrap();
    assert_eq!(again.get(&a.url("/mypage")).await.unwrap().status, 200);
}

/// Sentinel failover seen through a node: during the outage the node says
/// 503, never 401 (a silent logout), and afterwards the user is still in;
/// writes need a replica again before they are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_does_not_log_the_user_out() {
    let mut set = tether_testkit::RedisSentinels::start("nodemaster")
        .await
        .unwrap();
    let mut args = node_args("A", &set.url());
    args.extend(["--redis-wait".to_string(), "1:2000".to_string()]);
    let a = Process::spawn(bin(), &args).await.unwrap();
    let user = Client::new();
    let login = user
        .post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.text());
    set.master.stop().await;
    let killed = std::time::Instant::now();
    let mut unavailable = 0;
    loop {
        let r = user.get(&a.url("/mypage")).await.unwrap();
        match r.status.as_u16() {
            200 => break,
            503 => unavailable += 1,
            other => panic!("status {other} during failover: {}", r.text()),
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(30),
            "no failover in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "sentinel failover through a node: {unavailable} requests got 503 over {:?}",
        killed.elapsed()
    );
    // `--redis-wait 1`: the promoted master has no replica yet, so a write
    // cannot be promised and is refused (503, the user keeps the session).
    let cart = user
        .post_json(&a.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    assert_eq!(cart.status, 503, "an unreplicated write was acknowledged");
    // The old master returns as the new master's replica: writes go through.
    set.master.restart().await.unwrap();
    let cart = tether_testkit::eventually(
        std::time::Duration::from_secs(30),
        "a write acknowledged after the replica returned",
        || async {
            let r = user
                .post_json(&a.url("/cart"), &json!({"item": "book"}))
                .await
                .ok()?;
            (r.status == 200).then_some(r)
        },
    )
    .await
    .unwrap();
    assert!(cart.json().unwrap()["cart"]
        .as_array()
        .unwrap()
        .contains(&json!("book")));
    assert_eq!(user.get(&a.url("/mypage")).await.unwrap().status, 200);
}
