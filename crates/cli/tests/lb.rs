//! `tether lb` in front of real `tether node` processes over loopback TCP.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;
use tether_testkit::{eventually, lb_args, node_args, Client, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

async fn node(id: &str) -> Process {
    Process::spawn(bin(), &node_args(id, "memory"))
        .await
        .unwrap()
}

/// A node restarted on the address it had (the balancer's config names it).
async fn node_at(id: &str, addr: SocketAddr) -> Process {
    let mut args = node_args(id, "memory");
    let i = args.iter().position(|a| a == "127.0.0.1:0").unwrap();
    args[i] = addr.to_string();
    Process::spawn(bin(), &args).await.unwrap()
}

struct Fleet {
    nodes: Vec<Process>,
    lb: Process,
}

impl Fleet {
    async fn start(policy: &str, ids: &[&str], extra: &[&str]) -> Self {
        let mut nodes = Vec::new();
        for id in ids {
            nodes.push(node(id).await);
        }
        let backends: Vec<(&str, SocketAddr)> = ids
            .iter()
            .copied()
            .zip(nodes.iter().map(Process::addr))
            .collect();
        let mut args = lb_args(policy, &backends);
        args.extend(extra.iter().map(|s| s.to_string()));
        let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();
        Self { nodes, lb }
    }

    fn url(&self, path: &str) -> String {
        self.lb.url(path)
    }

    fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.lb.addrs()[1], path)
    }

    /// POSTs to the admin listener.
    async fn admin_post(&self, path: &str) -> tether_testkit::Response {
        Client::new()
            .send(Method::POST, &self.admin(path), &[], Default::default())
            .await
            .unwrap()
    }

    async fn status(&self) -> serde_json::Value {
        Client::new()
            .get(&self.admin("/status"))
            .await
            .unwrap()
            .json()
            .unwrap()
    }

    async fn state(&self, id: &str) -> String {
        let s = self.status().await;
        s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .map(|b| b["state"].as_str().unwrap().to_string())
            .unwrap()
    }

    async fn wait_state(&self, id: &str, want: &str) {
        eventually(Duration::from_secs(20), &format!("{id} {want}"), || async {
            (self.state(id).await == want).then_some(())
        })
        .await
        .unwrap();
    }

    fn index(&self, id: &str) -> usize {
        ["A", "B", "C", "D"].iter().position(|x| *x == id).unwrap()
    }
}

async fn login(client: &Client, fleet: &Fleet, member: u64) -> String {
    let r = client
        .post_json(&fleet.url("/login"), &json!({ "member": member }))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.node().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_policy_keeps_each_client_on_one_backend_and_balances_clients() {
    let fleet = Arc::new(Fleet::start("cookie", &["A", "B", "C"], &[]).await);
    let mut tasks = Vec::new();
    for c in 0..200u64 {
        let fleet = fleet.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let mut seen = HashSet::new();
            seen.insert(login(&client, &fleet, c).await);
            for _ in 0..19 {
                let r = client.get(&fleet.url("/mypage")).await.unwrap();
                assert_eq!(r.status, 200, "client {c} lost its session: {}", r.text());
                seen.insert(r.node().unwrap());
            }
            assert!(client.cookie("TETHER_ROUTE").is_some());
            seen
        }));
    }
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let seen = t.await.unwrap();
        assert_eq!(seen.len(), 1, "a client moved between backends: {seen:?}");
        *per_backend
            .entry(seen.into_iter().next().unwrap())
            .or_default() += 1;
    }
    // New clients are spread by round robin: 200 over 3 is 66 or 67 each.
    for (id, n) in &per_backend {
        assert!(
            (60..=74).contains(n),
            "{id} got {n} of 200 clients: {per_backend:?}"
        );
    }
}

#[tokio::test]
async fn ip_hash_pins_a_whole_slash_24_like_nginx() {
    let fleet = Fleet::start("ip-hash", &["A", "B", "C"], &[]).await;
    let mut by_net = HashMap::new();
    for net in 1..=6u8 {
        let mut nodes = HashSet::new();
        for host in [1u8, 2, 77, 200] {
            let ip = IpAddr::from([127, 0, net, host]);
            let r = Client::from_address(ip)
                .get(&fleet.url("/mypage"))
                .await
                .unwrap();
            nodes.insert(r.node().unwrap());
        }
        assert_eq!(nodes.len(), 1, "127.0.{net}.0/24 was split: {nodes:?}");
        let node = nodes.into_iter().next().unwrap();
        // The same choice nginx's ip_hash makes for that address.
        let expected =
            tether_lb::select::nginx_ip_hash_order(IpAddr::from([127, 0, net, 1]), &[1, 1, 1])[0];
        assert_eq!(fleet.index(&node), expected, "127.0.{net}.x");
        by_net.insert(net, node);
    }
    let distinct: HashSet<_> = by_net.values().collect();
    assert!(
        distinct.len() >= 2,
        "six /24s all on one backend: {by_net:?}"
    );
}

/// The brief's sticky-session strategy works, and so does its stated weakness.
#[tokio::test]
async fn sticky_sessions_work_until_the_pinned_server_dies() {
    for policy in ["cookie", "ip-hash"] {
        let mut fleet = Fleet::start(policy, &["A", "B", "C"], &[]).await;
        let user = Client::new();
        let home = login(&user, &fleet, 7).await;
        for _ in 0..5 {
            let r = user.get(&fleet.url("/mypage")).await.unwrap();
            assert_eq!(
                (r.status.as_u16(), r.node().unwrap()),
                (200, home.clone()),
                "{policy}"
            );
        }
        let i = fleet.index(&home);
        fleet.nodes[i].kill().await;
        let r = user.get(&fleet.url("/mypage")).await.unwrap();
        assert_eq!(
            r.status, 401,
            "{policy}: memory sessions cannot survive their server"
        );
        assert_ne!(r.node().unwrap(), home);
        if policy == "cookie" {
            let route = user.cookie("TETHER_ROUTE").unwrap();
            assert!(
                !route.starts_with(&format!("{home}.")),
                "route cookie not rewritten: {route}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_marks_down_reroutes_and_recovers() {
    let mut fleet = Fleet::start("cookie", &["A", "B", "C"], &[]).await;
    let fleet_url = fleet.url("/health");
    // Clients pinned everywhere; remember who is pinned to B.
    let mut clients = Vec::new();
    for c in 0..12 {
        let client = Client::new();
        let node = login(&client, &fleet, c).await;
        clients.push((client, node));
    }
    assert!(clients.iter().any(|(_, n)| n == "B"));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut load = Vec::new();
    for (client, _) in &clients {
        let client = client.clone();
        let url = fleet.url("/mypage");
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            for _ in 0..400 {
                let r = tokio::select! {
                    r = client.get(&url) => r,
                    () = stop.notified() => break,
                };
                match r {
                    Ok(r) if r.status.is_server_error() => failed += 1,
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    // Let the load run, then crash B.
    eventually(Duration::from_secs(10), "traffic on B", || async {
        let s = fleet.status().await;
        (s["backends"][1]["requests"].as_u64().unwrap() > 30).then_some(())
    })
    .await
    .unwrap();
    let b_addr = fleet.nodes[1].addr();
    fleet.nodes[1].kill().await;
    fleet.wait_state("B", "down").await;
    stop.notify_waiters();
    let (mut ok, mut failed) = (0, 0);
    for t in load {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed += f;
    }
    // GETs are idempotent: even requests in flight at the kill are retried.
    assert!(
        failed <= 12,
        "{failed} failed requests ({ok} ok) beyond those in flight at the kill"
    );
    // B's clients were moved and their route cookies rewritten.
    for (client, node) in &clients {
        let r = client.get(&fleet.url("/mypage")).await.unwrap();
        assert_ne!(r.node().unwrap(), "B");
        if node == "B" {
            assert!(!client.cookie("TETHER_ROUTE").unwrap().starts_with("B."));
        }
    }
    // Restarted, B passes `rise` checks and takes new clients again.
    fleet.nodes[1] = node_at("B", b_addr).await;
    fleet.wait_state("B", "up").await;
    let mut seen = HashSet::new();
    for c in 0..9 {
        seen.insert(login(&Client::new(), &fleet, c).await);
    }
    assert!(
        seen.contains("B"),
        "B got no new clients after recovery: {seen:?}"
    );
    assert_eq!(Client::new().get(&fleet_url).await.unwrap().status, 200);
}

#[tokio::test]
async fn forged_stale_and_foreign_route_cookies_are_treated_as_absent() {
    let fleet = Fleet::start("cookie", &["A", "B"], &["--cookie-secret", "s1"]).await;
    let user = Client::new();
    let home = login(&user, &fleet, 1).await;
    let genuine = user.cookie("TETHER_ROUTE").unwrap();
    let other = if home == "A" { "B" } else { "A" };
    let tag = genuine.rsplit_once('.').unwrap().1;
    for forged in [
        format!("{other}.{home}.{tag}"),
        format!("{other}.."),
        "garbage".to_string(),
        format!("Z.A.{tag}"),
        "A".repeat(3000),
    ] {
        let c = Client::new();
        c.set_cookie("TETHER_ROUTE", &forged);
        let r = c.get(&fleet.url("/mypage")).await.unwrap();
        assert_eq!(r.status, 401, "{forged}");
        let issued = c.cookie("TETHER_ROUTE").unwrap();
        assert_ne!(
            issued, forged,
            "a forged cookie must be replaced by a genuine one"
        );
        assert!(r
            .set_cookies()
            .iter()
            .any(|s| s.starts_with("TETHER_ROUTE=")));
        assert!(r
            .header("cache-control")
            .unwrap()
            .contains("no-cache=\"set-cookie\""));
    }
}

#[tokio::test]
async fn two_balancers_with_one_secret_route_a_cookie_identically() {
    let fleet = Fleet::start("cookie", &["A", "B", "C"], &["--cookie-secret", "shared"]).await;
    let backends: Vec<(&str, SocketAddr)> = vec![
        ("A", fleet.nodes[0].addr()),
        ("B", fleet.nodes[1].addr()),
        ("C", fleet.nodes[2].addr()),
    ];
    let mut args = lb_args("cookie", &backends);
    args.extend(["--cookie-secret".to_string(), "shared".to_string()]);
    let second = Process::spawn_n(bin(), &args, 2).await.unwrap();
    for c in 0..9 {
        let user = Client::new();
        let home = login(&user, &fleet, c).await;
        for _ in 0..3 {
            let r = user.get(&second.url("/mypage")).await.unwrap();
            assert_eq!((r.status.as_u16(), r.node().unwrap()), (200, home.clone()));
            assert!(
                r.set_cookies().is_empty(),
                "the second balancer re-pinned the client"
            );
        }
    }
}

#[tokio::test]
async fn owner_policy_sends_a_session_to_its_rendezvous_owner() {
    let fleet = Fleet::start("owner", &["A", "B", "C"], &[]).await;
    for _ in 0..12 {
        let user = Client::new();
        login(&user, &fleet, 3).await;
        // The session lives where the login landed; from now on requests
        // follow the owner function, which the cluster store shares.
        let id = tether_core::SessionId::parse(&user.cookie("SESSION").unwrap()).unwrap();
        let owner = tether_core::placement::session_owner(&id, &["A", "B", "C"]).unwrap();
        for _ in 0..3 {
            let r = user.get(&fleet.url("/mypage")).await.unwrap();
            assert_eq!(r.node().unwrap(), *owner);
        }
    }
}

#[tokio::test]
async fn draining_keeps_bound_clients_and_takes_no_new_ones() {
    let fleet = Fleet::start("cookie", &["A", "B"], &[]).await;
    let mut on_a = None;
    while on_a.is_none() {
        let c = Client::new();
        if login(&c, &fleet, 1).await == "A" {
            on_a = Some(c);
        }
    }
    let on_a = on_a.unwrap();
    let r = fleet.admin_post("/backends/A/drain").await;
    assert_eq!(r.json().unwrap()["state"], "draining");
    for c in 0..6 {
        assert_eq!(
            login(&Client::new(), &fleet, c).await,
            "B",
            "a new client went to a draining backend"
        );
    }
    let r = on_a.get(&fleet.url("/mypage")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.node().unwrap().as_str()), (200, "A"));
    // A route cookie is the same for every client of A, so anyone can
    // collect one: alone (no session) it does not hold a drained backend.
    let collector = Client::new();
    let collected = on_a.cookie("TETHER_ROUTE").unwrap();
    collector.set_cookie("TETHER_ROUTE", &collected);
    let r = collector.get(&fleet.url("/health")).await.unwrap();
    assert_eq!(r.node().unwrap(), "B");
    assert_ne!(
        collector.cookie("TETHER_ROUTE").unwrap(),
        collected,
        "not re-issued"
    );
    let r = fleet.admin_post("/backends/Z/drain").await;
    assert_eq!(r.status, 404);
    fleet.admin_post("/backends/A/undrain").await;
    assert_eq!(fleet.state("A").await, "up");
}

#[tokio::test]
async fn no_backend_at_all_is_503_and_metrics_say_so() {
    let mut fleet = Fleet::start("round-robin", &["A"], &[]).await;
    fleet.nodes[0].kill().await;
    fleet.wait_state("A", "down").await;
    let r = Client::new().get(&fleet.url("/mypage")).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no backend"));
    let metrics = Client::new()
        .get(&fleet.admin("/metrics"))
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("tether_lb_generated_responses_total{code=\"503\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tether_lb_backend_up{backend=\"A\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("tether_lb_backend_latency_seconds_bucket{backend=\"A\",le=\"+Inf\"}"));
}

#[tokio::test]
async fn reload_swaps_backends_without_dropping_connections() {
    let a = node("A").await;
    let b = node("B").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.toml");
    let write = |backends: &[(&str, SocketAddr)]| {
        let mut text = String::from("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\npolicy = \"round-robin\"\n[health]\ninterval_ms = 200\n");
        for (id, addr) in backends {
            text.push_str(&format!("[[backend]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
        }
        std::fs::write(&path, text).unwrap();
    };
    write(&[("A", a.addr())]);
    let lb = Process::spawn_n(
        bin(),
        &["lb".into(), "--config".into(), path.display().to_string()],
        2,
    )
    .await
    .unwrap();
    let admin = format!("http://{}", lb.addrs()[1]);
    // One keep-alive client: its pooled connection must survive the reload.
    let client = Client::new();
    for _ in 0..3 {
        assert_eq!(
            client
                .get(&lb.url("/health"))
                .await
                .unwrap()
                .node()
                .unwrap(),
            "A"
        );
    }
    write(&[("A", a.addr()), ("B", b.addr())]);
    let r = client
        .send(
            Method::POST,
            &format!("{admin}/reload"),
            &[],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let r = client.get(&lb.url("/health")).await.unwrap();
        assert_eq!(r.status, 200);
        seen.insert(r.node().unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // A broken file is refused and the running configuration stays.
    std::fs::write(&path, "policy = \"nonsense\"").unwrap();
    let r = client
        .send(
            Method::POST,
            &format!("{admin}/reload"),
            &[],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(client.get(&lb.url("/health")).await.unwrap().status, 200);
    // SIGHUP reloads too.
    write(&[("B", b.addr())]);
    lb.signal(tether_testkit::SIGHUP);
    eventually(Duration::from_secs(10), "SIGHUP reload", || async {
        let s: serde_json::Value = Client::new()
            .get(&format!("{admin}/status"))
            .await
            .ok()?
            .json()
            .ok()?;
        (s["backends"].as_array()?.len() == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        client
            .get(&lb.url("/health"))
            .await
            .unwrap()
            .node()
            .unwrap(),
        "B"
    );
}

/// A backend that speaks broken HTTP: `mode` decides how.
async fn broken_backend(mode: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let reply: &[u8] = match mode {
                    "garbage" => b"this is not HTTP at all\r\n\r\n",
                    // Promise 100 bytes, send 10, hang up.
                    "truncated" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                };
                let _ = s.write_all(reply).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn broken_backends_give_502_and_the_balancer_keeps_serving() {
    let garbage = broken_backend("garbage").await;
    let truncated = broken_backend("truncated").await;
    for (addr, mode) in [(garbage, "garbage"), (truncated, "truncated")] {
        let mut args = lb_args("round-robin", &[("X", addr)]);
        args.extend(["--health-path".into(), String::new()]);
        let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();
        let r = Client::new().get(&lb.url("/")).await;
        match mode {
            "garbage" => assert_eq!(r.unwrap().status, 502),
            // Headers already went out: the client sees a cut body, not a fake success.
            _ => assert!(r.is_err(), "a truncated body was passed off as complete"),
        }
        // Still alive and answering.
        let r = Client::new().get(&lb.url("/")).await;
        assert!(r.is_err() || r.unwrap().status == 502);
        assert!(!Client::new()
            .get(&format!("http://{}/status", lb.addrs()[1]))
            .await
            .unwrap()
            .text()
            .is_empty());
    }
}

#[tokio::test]
async fn slow_and_oversized_request_heads_are_cut_off() {
    let a = node("A").await;
    let mut args = lb_args("round-robin", &[("A", a.addr())]);
    args.extend(["--header-timeout-ms".into(), "500".into()]);
    let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();

    // Slowloris: one byte every 100 ms never completes a head in 500 ms.
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        closed || !text.contains("200 OK"),
        "a byte-by-byte head was served: {text}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // A 100 KiB header is refused with 431.
    let big = "x".repeat(100 * 1024);
    let r = Client::new()
        .send(
            Method::GET,
            &lb.url("/health"),
            &[("x-big", big.as_str())],
            Default::default(),
        )
        .await;
    match r {
        Ok(r) => assert_eq!(r.status, 431),
        Err(e) => panic!("expected 431, got {e}"),
    }
    // Garbage X-Forwarded-For from an untrusted client is ignored, not an error.
    let r = Client::new()
        .send(
            Method::GET,
            &lb.url("/health"),
            &[("x-forwarded-for", "<script>, 999.1.1.1")],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Regression (found in review): a streamed (chunked) body was moved into the
/// request before connecting, so a dead backend turned failover into a 502.
#[tokio::test]
async fn a_streamed_body_fails_over_when_the_first_backend_is_dead() {
    let live = node("A").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", tether_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let mut args = lb_args("round-robin", &[("DEAD", dead), ("A", live.addr())]);
    args.extend(["--health-path".into(), String::new()]);
    let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();
    for _ in 0..4 {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let body = "{\"item\":\"book\"}";
        let req = format!(
            "POST /cart HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
}

/// An in-process backend that reports what reached it.
async fn echo_backend() -> tether_testkit::TestServer {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/echo",
            post(
                |headers: http::HeaderMap, body: axum::body::Bytes| async move {
                    let h = |n: &str| {
                        headers
                            .get_all(n)
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .collect::<Vec<_>>()
                            .join("|")
                    };
                    let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
                    format!(
                        "len={} sum={sum} xff={} te={} cookie={} expect={}",
                        body.len(),
                        h("x-forwarded-for"),
                        h("transfer-encoding"),
                        h("cookie"),
                        h("expect")
                    )
                },
            ),
        )
        .route("/big", get(|| async { vec![b'x'; 3_000_000] }))
        .layer(axum::extract::DefaultBodyLimit::disable());
    tether_testkit::TestServer::serve(app).await.unwrap()
}

/// Sends `request` on a new connection and reads until the balancer closes it.
async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply))
        .await
        .expect("the balancer did not close the connection")
        .unwrap();
    reply
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

#[tokio::test]
async fn message_framing_survives_the_proxy_in_every_shape() {
    let echo = echo_backend().await;
    let mut args = lb_args("cookie", &[("E", echo.addr())]);
    args.extend(["--health-path".into(), String::new()]);
    let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();

    // Pipelined on one connection: a length-delimited POST, a HEAD whose
    // response announces 3 MB it must not carry, and a chunked POST.
    let reply = exchange_raw(
        lb.addr(),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nCookie: TETHER_ROUTE=forged; a=1\r\n\r\nhello\
          HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nwor\r\n2\r\nld\r\n0\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(count(&reply, "HTTP/1.1 200 OK\r\n"), 3, "{text}");
    assert!(
        text.contains("len=5 sum=532 xff=127.0.0.1 te= cookie=a=1 "),
        "{text}"
    );
    assert!(
        text.contains("len=5 sum=552 xff=127.0.0.1 te=chunked"),
        "{text}"
    );
    assert!(text.contains("Content-Length: 3000000"), "{text}");
    assert!(reply.len() < 10_000, "the HEAD response carried a body");

    // Bodies larger than the retry buffer stream through intact, both ways.
    let big = vec![b'a'; 2_000_000];
    let mut req =
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n"
            .to_vec();
    req.extend_from_slice(&big);
    let text = String::from_utf8_lossy(&exchange_raw(lb.addr(), &req).await).to_string();
    assert!(text.contains("len=2000000 sum=194000000 "), "{text}");
    let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for piece in big.chunks(65_000) {
        req.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    let text = String::from_utf8_lossy(&exchange_raw(lb.addr(), &req).await).to_string();
    assert!(text.contains("len=2000000 sum=194000000 "), "{text}");
    let reply = exchange_raw(
        lb.addr(),
        b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body_at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(reply.len() - body_at, 3_000_000);
    assert!(reply[body_at..].iter().all(|b| *b == b'x'));

    // Expect: 100-continue is answered by the balancer before the body is sent.
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("len=5 sum=532") && text.ends_with("expect="),
        "{text}"
    );

    // A request that could desynchronise the balancer and the backend is
    // refused and the connection closed: what follows is never served.
    for smuggle in [
        &b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 44\r\n\r\nhelloGET /big HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let reply = exchange_raw(lb.addr(), smuggle).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert_eq!(count(&reply, "HTTP/1.1 "), 1, "{text}");
    }
    // Trailers (and chunk extensions) stay with the balancer: the backend
    // gets a re-chunked body, so it cannot find a request hidden in them.
    let reply = exchange_raw(
        lb.addr(),
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2;x=\"y\"\r\nhi\r\n0\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(count(&reply, "HTTP/1.1 "), 1, "{text}");
    assert!(
        text.contains("len=2 sum=209 ") && reply.len() < 10_000,
        "{text}"
    );
}

#[tokio::test]
async fn a_chunked_response_is_dechunked_for_an_http_1_0_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One answer per request head on a kept-alive connection.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut args = lb_args("round-robin", &[("C", addr)]);
    args.extend(["--health-path".into(), String::new()]);
    let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();
    let reply = exchange_raw(lb.addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Connection: close\r\n") && !text.to_ascii_lowercase().contains("chunked"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nhello world"), "{text}");
    let reply = exchange_raw(
        lb.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{text}"
    );
}

/// Regression (outside probe): one non-UTF-8 byte in another cookie made
/// the balancer ignore the route cookie, re-route the client and issue a
/// new cookie.
#[tokio::test]
async fn a_non_utf8_cookie_does_not_unpin_the_client() {
    let fleet = Fleet::start("cookie", &["A", "B", "C"], &[]).await;
    let user = Client::new();
    let home = login(&user, &fleet, 1).await;
    let route = user.cookie("TETHER_ROUTE").unwrap();
    // `/health`: what is checked is the routing (the node itself does not
    // read a session from a Cookie field that is not UTF-8).
    for _ in 0..4 {
        let mut request =
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: theme=\xff\xfe; "
                .to_vec();
        request.extend_from_slice(format!("TETHER_ROUTE={route}\r\n\r\n").as_bytes());
        let reply = exchange_raw(fleet.lb.addr(), &request).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
        let node = format!("x-tether-node: {home}\r\n");
        assert!(
            text.to_ascii_lowercase()
                .contains(&node.to_ascii_lowercase()),
            "{text}"
        );
        assert!(!text.contains("TETHER_ROUTE="), "re-pinned: {text}");
    }
}
