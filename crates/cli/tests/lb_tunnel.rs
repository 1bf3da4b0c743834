//! `tether lb` WebSocket tunnels, connection and upload limits, and the
//! admin API's guard, over loopback TCP with a real `tether lb` process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use tether_testkit::{eventually, lb_args, node_args, Client, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// A backend named `id`: plain requests get `id` as their body (and in
/// `X-Tether-Node`); a WebSocket upgrade gets `101`, then every chunk it
/// receives comes back prefixed with `id:`.
async fn ws_backend(id: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => n,
                        _ => return,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end + 4);
                    if head.contains("\r\nupgrade: websocket") {
                        let reply = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: test\r\n\r\n";
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        loop {
                            let mut chunk = [0u8; 4096];
                            let n = match s.read(&mut chunk).await {
                                Ok(n) if n > 0 => n,
                                _ => return,
                            };
                            let mut out = format!("{id}:").into_bytes();
                            out.extend_from_slice(&chunk[..n]);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nX-Tether-Node: {id}\r\nContent-Length: {}\r\n\r\n{id}",
                        id.len()
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one response head (and whatever follows it in the same reads).
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("no response head in 20 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a head: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Reads exactly `n` bytes.
async fn read_n(s: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf))
        .await
        .expect("nothing within 20 s")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

fn upgrade(cookie: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{cookie}\r\n"
    )
}

/// Opens a tunnel through `lb` with `cookie` (a `Cookie: …\r\n` line or
/// nothing); returns the stream and the 101 head.
async fn open_tunnel(lb: SocketAddr, cookie: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    s.write_all(upgrade(cookie).as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (s, head)
}

/// Sends `msg` through the tunnel and returns the backend that echoed it.
async fn echo(s: &mut TcpStream, msg: &str) -> String {
    s.write_all(msg.as_bytes()).await.unwrap();
    let got = read_n(s, 2 + msg.len()).await;
    let (id, rest) = got.split_once(':').unwrap();
    assert_eq!(rest, msg);
    id.to_string()
}

fn route_cookie(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .filter(|c| c.starts_with("TETHER_ROUTE="))
        .map(|c| c.split(';').next().unwrap().to_string())
}

async fn status(lb: &Process) -> serde_json::Value {
    Client::new()
        .get(&format!("http://{}/status", lb.addrs()[1]))
        .await
        .unwrap()
        .json()
        .unwrap()
}

async fn tunnels(lb: &Process) -> Vec<u64> {
    let s = status(lb).await;
    s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["tunnels"].as_u64().unwrap())
        .collect()
}

async fn ws_lb(extra: &[&str]) -> Process {
    let a = ws_backend("A").await;
    let b = ws_backend("B").await;
    let mut args = lb_args("cookie", &[("A", a), ("B", b)]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn_n(bin(), &args, 2).await.unwrap()
}

#[tokio::test]
async fn websockets_are_pinned_like_requests_and_tunnel_both_ways() {
    let lb = ws_lb(&[]).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        // A page load pins the browser; its WebSocket follows the cookie.
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let page = read_head(&mut s).await;
        let home = page.rsplit("\r\n\r\n").next().unwrap().to_string();
        let cookie = route_cookie(&page).expect("route cookie");
        let (mut ws, head) = open_tunnel(lb.addr(), &format!("Cookie: {cookie}\r\n")).await;
        assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("Sec-WebSocket-Accept: test\r\n"), "{head}");
        assert!(
            route_cookie(&head).is_none(),
            "a pinned client was re-pinned: {head}"
        );
        for msg in ["hello", "x", &"y".repeat(1000)] {
            assert_eq!(echo(&mut ws, msg).await, home);
        }
        open.push((ws, home));
    }
    // A WebSocket without a cookie is pinned by the 101 itself.
    let (mut ws, head) = open_tunnel(lb.addr(), "").await;
    let cookie = route_cookie(&head).expect("a route cookie on the 101");
    let home = echo(&mut ws, "hi").await;
    let r = Client::new();
    let (name, value) = cookie.split_once('=').unwrap();
    r.set_cookie(name, value);
    assert_eq!(r.get(&lb.url("/")).await.unwrap().text(), home);
    open.push((ws, home));

    // Open tunnels are counted per backend, in /status and /metrics.
    let per_backend = |id: &str| open.iter().filter(|(_, h)| h == id).count() as u64;
    assert_eq!(tunnels(&lb).await, vec![per_backend("A"), per_backend("B")]);
    let metrics = Client::new()
        .get(&format!("http://{}/metrics", lb.addrs()[1]))
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(&format!(
            "tether_lb_backend_tunnels{{backend=\"A\"}} {}",
            per_backend("A")
        )),
        "{metrics}"
    );
    // Closing the client side ends the tunnel.
    open.clear();
    eventually(Duration::from_secs(10), "tunnels closed", || async {
        (tunnels(&lb).await == vec![0, 0]).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_idle_tunnel_closes_after_the_tunnel_timeout_not_the_header_timeout() {
    let lb = ws_lb(&["--header-timeout-ms", "200", "--tunnel-timeout-ms", "1500"]).await;
    let (mut ws, _) = open_tunnel(lb.addr(), "").await;
    echo(&mut ws, "a").await;
    let quiet_since = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), ws.read_to_end(&mut rest))
        .await
        .expect("an idle tunnel was never closed")
        .unwrap();
    let idle = quiet_since.elapsed();
    assert!(
        idle >= Duration::from_millis(1400),
        "closed after {idle:?}: the tunnel timeout is 1.5 s"
    );
    assert!(rest.is_empty());
}

#[tokio::test]
async fn draining_a_backend_or_the_balancer_lets_open_tunnels_finish() {
    let mut lb = ws_lb(&["--drain-timeout-ms", "30000"]).await;
    let (mut ws, head) = open_tunnel(lb.addr(), "").await;
    let home = echo(&mut ws, "before").await;
    let cookie = route_cookie(&head).unwrap();
    // The backend is drained: its tunnel goes on, a new one (with a bare
    // route cookie and no session) goes elsewhere.
    let drained = Client::new()
        .send(
            Method::POST,
            &format!("http://{}/backends/{home}/drain", lb.addrs()[1]),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(drained.status, 200);
    assert_eq!(echo(&mut ws, "during").await, home);
    let (mut other, _) = open_tunnel(lb.addr(), &format!("Cookie: {cookie}\r\n")).await;
    assert_ne!(echo(&mut other, "new").await, home);
    drop(other);

    // The balancer stops: it takes no new connections, the tunnel lives on.
    lb.signal(tether_testkit::SIGTERM);
    eventually(Duration::from_secs(10), "the listener closed", || async {
        TcpStream::connect(lb.addr()).await.is_err().then_some(())
    })
    .await
    .unwrap();
    assert_eq!(echo(&mut ws, "after stop").await, home);
    assert!(!lb.has_exited());
    // Once the tunnel ends, the balancer exits.
    drop(ws);
    let exited = lb.terminate(Duration::from_secs(20)).await;
    assert!(
        exited.is_ok(),
        "the balancer did not exit after its last tunnel closed"
    );

    // With a short drain timeout, a tunnel is cut at it.
    let mut lb = ws_lb(&["--drain-timeout-ms", "300"]).await;
    let (mut ws, _) = open_tunnel(lb.addr(), "").await;
    echo(&mut ws, "x").await;
    lb.signal(tether_testkit::SIGTERM);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), ws.read_to_end(&mut rest))
        .await
        .expect("the tunnel outlived the drain timeout")
        .ok();
    eventually(Duration::from_secs(20), "exit", || {
        let done = lb.has_exited();
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
}

/// A `tether node` and a round-robin balancer in front of it with `extra` flags.
async fn node_lb(extra: &[&str]) -> (Process, Process) {
    let node = Process::spawn(bin(), &node_args("A", "memory"))
        .await
        .unwrap();
    let mut args = lb_args("round-robin", &[("A", node.addr())]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let lb = Process::spawn_n(bin(), &args, 2).await.unwrap();
    (node, lb)
}

/// One keep-alive request on `s`: the response head.
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_head(s).await
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_in_the_accept_queue() {
    let (_node, lb) = node_lb(&["--max-connections", "2"]).await;
    let mut first = TcpStream::connect(lb.addr()).await.unwrap();
    let mut second = TcpStream::connect(lb.addr()).await.unwrap();
    assert!(get_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut second).await.starts_with("HTTP/1.1 200"));
    // The third connects (the kernel queues it) but is not served...
    let mut third = TcpStream::connect(lb.addr()).await.unwrap();
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut chunk = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut chunk)).await;
    assert!(
        early.is_err(),
        "a third connection was served beyond --max-connections 2"
    );
    // ...until a slot frees.
    drop(first);
    assert!(read_head(&mut third).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut second).await.starts_with("HTTP/1.1 200"));
}

/// Regression (outside probe): a client trickling its upload kept its whole
/// body buffered for as long as it sent a byte per read timeout.
#[tokio::test]
async fn the_body_timeout_bounds_the_whole_upload() {
    let (_node, lb) = node_lb(&["--body-timeout-ms", "1000"]).await;
    // One body small enough to buffer, one that streams.
    for length in [1_000, 1_000_000] {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        let head = format!("POST /cart HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // A byte every 50 ms: never idle for a read timeout, and far from
        // done when the 1 s deadline for the whole upload passes.
        let mut answer = Vec::new();
        for _ in 0..400 {
            if s.write_all(b" ").await.is_err() {
                break;
            }
            let mut chunk = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => {
                    answer.extend_from_slice(&chunk[..n]);
                    break;
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408 "), "{length}: {text:?}");
    }
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_refuses_web_pages() {
    let (node, lb) = node_lb(&["--admin-token", "0123456789abcdef-token"]).await;
    let admin = |p: &str| format!("http://{}{p}", lb.addrs()[1]);
    let auth = ("authorization", "Bearer 0123456789abcdef-token");
    let c = Client::new();
    let send = |method: Method, path: &str, headers: Vec<(&'static str, &'static str)>| {
        let c = c.clone();
        let url = admin(path);
        async move {
            c.send(method, &url, &headers, Bytes::from_static(b"x=1"))
                .await
                .unwrap()
                .status
                .as_u16()
        }
    };
    assert_eq!(send(Method::GET, "/status", vec![]).await, 401);
    assert_eq!(
        send(
            Method::GET,
            "/status",
            vec![("authorization", "Bearer wrong")]
        )
        .await,
        401
    );
    assert_eq!(send(Method::GET, "/status", vec![auth]).await, 200);
    // What a cross-site form or fetch sends: refused, even with a token.
    for page in [
        vec![
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ],
        vec![("sec-fetch-site", "cross-site"), auth],
        vec![("origin", "null"), auth],
    ] {
        assert_eq!(send(Method::POST, "/backends/A/drain", page).await, 403);
    }
    let s: serde_json::Value = c
        .send(Method::GET, &admin("/status"), &[auth], Bytes::new())
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        s["backends"][0]["state"], "up",
        "a refused call changed state"
    );
    assert_eq!(
        send(Method::POST, "/backends/A/drain", vec![auth]).await,
        200
    );

    // An admin listener off loopback without a token does not start.
    let node_addr = node.addr();
    let mut args = lb_args("round-robin", &[("A", node_addr)]);
    let i = args.iter().position(|a| a == "--admin").unwrap();
    args[i + 1] = "0.0.0.0:0".into();
    let err = Process::spawn_n(bin(), &args, 2)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin_token"), "{err}");
}
