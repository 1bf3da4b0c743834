//! `tether lb` terminating TLS and speaking HTTP/2 to clients, in front of
//! real `tether node` processes (and in-process backends where a test must
//! see what reached the backend), over loopback TCP. Certificates come from
//! a test authority made fresh in each run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use tether_testkit::{eventually, lb_args, node_args, tls_connect, Client, Process, TestCa};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// An in-process backend that tells what reached it: the forwarding
/// fields, and a body of `n` bytes at `/big/{n}`; `/count` counts requests.
async fn echo_backend(hits: Arc<AtomicUsize>) -> tether_testkit::TestServer {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/",
            get(|headers: http::HeaderMap| async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                (
                    [("x-tether-node", "E")],
                    format!(
                        "proto={} host={} cookie={}",
                        h("x-forwarded-proto"),
                        h("host"),
                        h("cookie")
                    ),
                )
            }),
        )
        .route(
            "/big/{n}",
            get(
                |axum::extract::Path(n): axum::extract::Path<usize>| async move {
                    (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>()
                },
            ),
        )
        .route(
            "/count",
            get(move || {
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::Relaxed);
                    "counted"
                }
            }),
        )
        .route("/health", get(|| async { "ok" }));
    tether_testkit::TestServer::serve(app).await.unwrap()
}

struct Tls {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Tls {
    fn new() -> Self {
        Self {
            ca: TestCa::new().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.ca.issue(self.dir.path(), stem, names).unwrap()
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.ca.client_config(alpn).unwrap()
    }
}

/// `tether lb` with TLS from `cert`/`key` in front of `backends`, plus `extra` flags.
async fn tls_lb(
    policy: &str,
    backends: &[(&str, SocketAddr)],
    (cert, key): &(PathBuf, PathBuf),
    extra: &[&str],
) -> Process {
    let mut args = lb_args(policy, backends);
    args.extend([
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn_n(bin(), &args, 2).await.unwrap()
}

/// A TLS balancer with `policy` (and `extra` flags, health checks off) in
/// front of an echo backend, with a certificate for `localhost`.
async fn echo_behind_tls(
    policy: &str,
    extra: &[&str],
) -> (Tls, tether_testkit::TestServer, Process) {
    let tls = Tls::new();
    let cert = tls.issue("site", &["localhost"]);
    let echo = echo_backend(Arc::default()).await;
    let mut flags = vec!["--health-path", ""];
    flags.extend_from_slice(extra);
    let lb = tls_lb(policy, &[("E", echo.addr())], &cert, &flags).await;
    (tls, echo, lb)
}

/// One HTTP/1.1 request on `io`, read until the response's end (the
/// request asks the server to close).
async fn http1_close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, request: &str) -> String {
    io.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    // A TLS peer closing without close_notify is an error here; what was read counts.
    let _ = tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut reply))
        .await
        .expect("no answer in 20 s");
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn tls_terminates_with_secure_cookies_and_tells_backends_https() {
    let (tls, _echo, lb) = echo_behind_tls("cookie", &[]).await;

    let mut io = tls_connect(lb.addr(), "localhost", tls.client(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(
        io.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let reply = http1_close(
        &mut io,
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(
        reply.contains("proto=https host=localhost"),
        "a client's own X-Forwarded-Proto must not pass: {reply}"
    );
    let cookie = reply
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: tether_route=")
        })
        .unwrap_or_else(|| panic!("no route cookie: {reply}"));
    assert!(cookie.contains("; Secure"), "{cookie}");

    // TLS 1.2 clients are served too; plain HTTP on the TLS port is not.
    let mut io = tls_connect(lb.addr(), "localhost", tls12_client(&tls))
        .await
        .unwrap();
    assert_eq!(
        io.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let reply = http1_close(
        &mut io,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.contains("proto=https"), "{reply}");
    // Handshakes resume (tickets): a client's second connection skips the
    // full handshake, on TLS 1.3 and 1.2 alike.
    for config in [tls.client(&[b"http/1.1"]), tls12_client(&tls)] {
        let first = tls_connect(lb.addr(), "localhost", config.clone())
            .await
            .unwrap();
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        let mut first = first;
        // TLS 1.3 tickets come after the handshake: read a response to get them.
        http1_close(
            &mut first,
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        let again = tls_connect(lb.addr(), "localhost", config).await.unwrap();
        assert_eq!(
            again.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{:?}",
            again.get_ref().1.protocol_version()
        );
    }
    let mut plain = TcpStream::connect(lb.addr()).await.unwrap();
    let reply = http1_close(&mut plain, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(
        !reply.contains("200"),
        "plain HTTP was served on the TLS port: {reply}"
    );
}

/// A client that speaks TLS 1.2 only and trusts the test authority.
fn tls12_client(tls: &Tls) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(tls.ca.pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The leaf certificate a TLS connection to `addr` for `name` was given.
async fn served_cert(addr: SocketAddr, name: &str, tls: &Tls) -> Vec<u8> {
    let io = tls_connect(addr, name, tls.client(&[b"http/1.1"]))
        .await
        .unwrap();
    io.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn first_cert(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap().to_vec())
        .unwrap()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_a_broken_reload_keeps_the_running_one() {
    let tls = Tls::new();
    let default = tls.issue("default", &["default.test"]);
    let a = tls.issue("a", &["a.test"]);
    let wild = tls.issue("wild", &["x.w.test"]);
    let echo = echo_backend(Arc::default()).await;
    let path = tls.dir.path().join("lb.toml");
    let write = |a_cert: &Path| {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\npolicy = \"round-robin\"\n\
             [health]\npath = \"\"\n[[backend]]\nid = \"E\"\naddr = \"{}\"\n\
             [tls]\ncert = \"default.pem\"\nkey = \"default.key\"\n\
             [[tls.sni]]\nnames = [\"a.test\"]\ncert = \"{}\"\nkey = \"a.key\"\n\
             [[tls.sni]]\nnames = [\"*.w.test\"]\ncert = \"wild.pem\"\nkey = \"wild.key\"\n",
            echo.addr(),
            a_cert.file_name().unwrap().to_str().unwrap()
        );
        std::fs::write(&path, text).unwrap();
    };
    write(&a.0);
    let lb = Process::spawn_n(
        bin(),
        &["lb".into(), "--config".into(), path.display().to_string()],
        2,
    )
    .await
    .unwrap();
    assert_eq!(
        served_cert(lb.addr(), "a.test", &tls).await,
        first_cert(&a.0)
    );
    assert_eq!(
        served_cert(lb.addr(), "x.w.test", &tls).await,
        first_cert(&wild.0)
    );
    assert_eq!(
        served_cert(lb.addr(), "default.test", &tls).await,
        first_cert(&default.0)
    );

    // A kept connection, to show a reload does not drop it.
    let mut kept = tls_connect(lb.addr(), "a.test", tls.client(&[b"http/1.1"]))
        .await
        .unwrap();
    assert!(read_one(&mut kept).await.starts_with("HTTP/1.1 200"));

    // A renewed certificate is served after POST /reload.
    let renewed = tls.issue("a2", &["a.test"]);
    std::fs::rename(&renewed.1, tls.dir.path().join("a.key")).unwrap();
    write(&renewed.0);
    let admin = format!("http://{}", lb.addrs()[1]);
    let r = Client::new()
        .send(Method::POST, &format!("{admin}/reload"), &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let renewed_der = first_cert(&renewed.0);
    assert_eq!(served_cert(lb.addr(), "a.test", &tls).await, renewed_der);

    // A broken certificate is refused with a reason; the running one stays.
    std::fs::write(
        tls.dir.path().join("a2.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .unwrap();
    let r = Client::new()
        .send(Method::POST, &format!("{admin}/reload"), &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("a2.pem"), "{}", r.text());
    // A key that belongs to another certificate is refused too (SIGHUP this time).
    let other = tls.issue("other", &["a.test"]);
    std::fs::copy(&other.1, tls.dir.path().join("a.key")).unwrap();
    let (good, _) = tls.issue("a3", &["a.test"]);
    write(&good);
    lb.signal(tether_testkit::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the refused reload in the log",
        || async { lb.log().contains("reload refused").then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(served_cert(lb.addr(), "a.test", &tls).await, renewed_der);
    assert!(
        read_one(&mut kept).await.starts_with("HTTP/1.1 200"),
        "the kept connection was dropped"
    );
}

/// One request on a kept HTTP/1.1 connection; the first read of the answer.
async fn read_one(io: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    io.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn plain_http_is_redirected_to_https() {
    let tls = Tls::new();
    let cert = tls.issue("site", &["localhost"]);
    let echo = echo_backend(Arc::default()).await;
    let lb = Process::spawn_n(
        bin(),
        &{
            let mut args = lb_args("round-robin", &[("E", echo.addr())]);
            args.extend([
                "--tls-cert".into(),
                cert.0.display().to_string(),
                "--tls-key".into(),
                cert.1.display().to_string(),
                "--redirect-http".into(),
                "127.0.0.1:0".into(),
            ]);
            args
        },
        3,
    )
    .await
    .unwrap();
    let redirect = lb.addrs()[2];
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let reply = http1_close(
        &mut s,
        "GET /cart?x=1 HTTP/1.1\r\nHost: shop.test:8080\r\n\r\n",
    )
    .await;
    let want = format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://shop.test:{}/cart?x=1\r\n",
        lb.addr().port()
    );
    assert!(reply.starts_with(&want), "{reply}");
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let reply = http1_close(&mut s, "GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
}

#[tokio::test]
async fn garbage_and_half_handshakes_are_cut_off() {
    let (tls, _echo, lb) = echo_behind_tls("round-robin", &["--header-timeout-ms", "500"]).await;
    // The first bytes of a ClientHello, then nothing: closed at the timeout.
    let mut half = TcpStream::connect(lb.addr()).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // Not TLS at all: closed at once.
    let mut garbage = TcpStream::connect(lb.addr()).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Connected, silent.
    let mut silent = TcpStream::connect(lb.addr()).await.unwrap();
    for s in [&mut half, &mut garbage, &mut silent] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a stalled handshake was kept open");
        assert!(!String::from_utf8_lossy(&rest).contains("200"));
    }
    // Meanwhile real clients are served.
    let mut io = tls_connect(lb.addr(), "localhost", tls.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let reply = http1_close(
        &mut io,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// An HTTP/2 client over TLS (ALPN h2) to `addr`.
async fn h2_client(addr: SocketAddr, tls: &Tls) -> h2::client::SendRequest<Bytes> {
    let io = tls_connect(addr, "localhost", tls.client(&[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends one request on an HTTP/2 connection: (status, headers, body).
async fn h2_send(
    send: &mut h2::client::SendRequest<Bytes>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut stream) = ready
        .send_request(req.body(()).unwrap(), body.is_empty())
        .unwrap();
    if !body.is_empty() {
        stream
            .send_data(Bytes::copy_from_slice(body), true)
            .unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .unwrap()
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (parts.status.as_u16(), parts.headers, out)
}

fn set_cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_string())
}

/// A browser picking HTTP/2 is pinned exactly as one on HTTP/1.1: the
/// route cookie it got over h2 holds over h1 and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_pinned_by_the_same_route_cookie() {
    let tls = Tls::new();
    let cert = tls.issue("site", &["localhost"]);
    let mut nodes = Vec::new();
    for id in ["A", "B", "C"] {
        nodes.push(
            Process::spawn(bin(), &node_args(id, "memory"))
                .await
                .unwrap(),
        );
    }
    let backends: Vec<(&str, SocketAddr)> = ["A", "B", "C"]
        .into_iter()
        .zip(nodes.iter().map(Process::addr))
        .collect();
    let lb = tls_lb("cookie", &backends, &cert, &[]).await;
    let mut h2 = h2_client(lb.addr(), &tls).await;
    for member in 0..6 {
        let body = format!("{{\"member\":{member}}}");
        let (status, headers, _) = h2_send(
            &mut h2,
            Method::POST,
            "/login",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200);
        let home = headers["x-tether-node"].to_str().unwrap().to_string();
        let route = set_cookie(&headers, "TETHER_ROUTE").expect("route cookie over h2");
        let session = set_cookie(&headers, "SESSION").expect("session cookie");
        let all = headers.get_all("set-cookie").iter().count();
        assert!(all >= 2, "both cookies arrive as separate fields");
        // Cookies sent as separate h2 fields (RFC 9113 §8.2.3) are joined.
        for _ in 0..3 {
            let (status, headers, _) = h2_send(
                &mut h2,
                Method::GET,
                "/mypage",
                &[("cookie", &route), ("cookie", &session)],
                b"",
            )
            .await;
            assert_eq!(
                (status, headers["x-tether-node"].to_str().unwrap()),
                (200, home.as_str())
            );
            assert!(set_cookie(&headers, "TETHER_ROUTE").is_none(), "re-pinned");
        }
        // The same cookies over HTTP/1.1 over TLS land on the same node.
        let mut io = tls_connect(lb.addr(), "localhost", tls.client(&[b"http/1.1"]))
            .await
            .unwrap();
        let reply = http1_close(
            &mut io,
            &format!("GET /mypage HTTP/1.1\r\nHost: localhost\r\nCookie: {route}; {session}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(&format!("x-tether-node: {home}")), "{reply}");
    }
    // The status document counts h2 requests like any other.
    let s: serde_json::Value = Client::new()
        .get(&format!("http://{}/status", lb.addrs()[1]))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert!(s["requests"].as_u64().unwrap() >= 6 * 5, "{s}");
}

#[tokio::test]
async fn http2_bodies_stream_both_ways_within_flow_control() {
    let (tls, _echo, lb) = echo_behind_tls("round-robin", &[]).await;
    // A client with a small window: the balancer must send as it opens.
    let io = tls_connect(lb.addr(), "localhost", tls.client(&[b"h2"]))
        .await
        .unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4096)
        .initial_connection_window_size(8192)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send;
    let (status, headers, body) = h2_send(&mut send, Method::GET, "/big/3000000", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-length"], "3000000");
    assert_eq!(body.len(), 3_000_000);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    // A refusal of the balancer's own reaches an h2 client as a response.
    let (status, _, body) = h2_send(&mut send, Method::CONNECT, "/", &[], b"").await;
    assert!(
        status == 405 || status == 400,
        "{status} {}",
        String::from_utf8_lossy(&body)
    );
}

// ---- HTTP/2 limits, driven with raw frames over h2c (prior knowledge) ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing (RFC 7541 §6.2.2).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn get(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
    ])
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Reads frames until `stop` says so, the connection closes or 20 s pass.
/// Returns every (type, flags, stream, payload) read.
async fn read_frames(
    s: &mut TcpStream,
    mut stop: impl FnMut(&(u8, u8, u32, Vec<u8>)) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let f = (buf[3], buf[4], id, buf[9..9 + len].to_vec());
            buf.drain(..9 + len);
            let done = stop(&f);
            frames.push(f);
            if done {
                return frames;
            }
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return frames,
        }
    }
}

const GOAWAY: u8 = 0x7;
const RST_STREAM: u8 = 0x3;
const HEADERS: u8 = 0x1;

fn error_code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

/// An h2c connection with the preface and an empty SETTINGS sent.
async fn h2c(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    s
}

async fn h2c_lb(backend: SocketAddr) -> Process {
    let mut args = lb_args("round-robin", &[("E", backend)]);
    args.extend(["--health-path".into(), String::new(), "--h2c".into()]);
    Process::spawn_n(bin(), &args, 2).await.unwrap()
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_when_enabled() {
    let echo = echo_backend(Arc::default()).await;
    let lb = h2c_lb(echo.addr()).await;
    let mut s = h2c(lb.addr()).await;
    s.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get("/")))
        .await
        .unwrap();
    let frames = read_frames(&mut s, |f| f.0 == 0x0 && f.1 & END_STREAM != 0).await;
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == 0x0)
        .flat_map(|f| f.3.clone())
        .collect();
    assert!(
        String::from_utf8_lossy(&body).starts_with("proto=http host=localhost"),
        "{frames:?}"
    );
    // HTTP/1.1 on the same listener still works.
    let reply = Client::new().get(&lb.url("/")).await.unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    // A backend that holds every request until the test ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            open.push(s);
        }
    });
    let lb = h2c_lb(backend).await;
    let mut s = h2c(lb.addr()).await;
    let mut burst = Vec::new();
    for k in 0..129u32 {
        burst.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * k,
            &get("/slow"),
        ));
    }
    s.write_all(&burst).await.unwrap();
    let frames = read_frames(&mut s, |f| f.0 == RST_STREAM).await;
    let settings = frames.iter().find(|f| f.0 == 0x4 && f.1 == 0).unwrap();
    let advertised = settings
        .3
        .chunks(6)
        .find(|c| c[..2] == [0, 3])
        .map(|c| error_code(c, 2));
    assert_eq!(advertised, Some(128), "SETTINGS_MAX_CONCURRENT_STREAMS");
    let reset = frames.last().unwrap();
    assert_eq!(
        (reset.0, reset.2, error_code(&reset.3, 0)),
        (RST_STREAM, 1 + 2 * 128, 0x7),
        "the 129th stream must be refused (REFUSED_STREAM)"
    );
    eventually(
        Duration::from_secs(10),
        "128 requests at the backend",
        || async { (held.load(Ordering::Relaxed) >= 128).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(held.load(Ordering::Relaxed), 128);
}

#[tokio::test]
async fn http2_oversized_heads_and_continuation_floods_are_refused() {
    let echo = echo_backend(Arc::default()).await;
    let lb = h2c_lb(echo.addr()).await;
    // An 80 KiB header (the limit is 64 KiB), split over CONTINUATION frames: 431.
    let mut s = h2c(lb.addr()).await;
    let big = "x".repeat(80 * 1024);
    let mut block = get("/");
    block.extend(hpack(&[("x-big", &big)]));
    let pieces: Vec<&[u8]> = block.chunks(16_000).collect();
    let mut out = frame(HEADERS, END_STREAM, 1, pieces[0]);
    for (k, p) in pieces[1..].iter().enumerate() {
        let last = k + 2 == pieces.len();
        out.extend(frame(0x9, if last { END_HEADERS } else { 0 }, 1, p));
    }
    s.write_all(&out).await.unwrap();
    let frames = read_frames(&mut s, |f| {
        f.0 == HEADERS || f.0 == RST_STREAM || f.0 == GOAWAY
    })
    .await;
    let answer = frames.last().unwrap();
    assert_eq!(answer.0, HEADERS, "{frames:?}");
    // `:status` (static index 8) with the Huffman code of "431" (RFC 7541
    // Appendix B: 011010 011001 00001, padded with ones).
    assert!(
        answer.3.windows(3).any(|w| w == [0x69, 0x90, 0xff]),
        "{answer:?}"
    );

    // A CONTINUATION flood: a header block that never ends.
    let mut s = h2c(lb.addr()).await;
    let mut flood = frame(HEADERS, END_STREAM, 1, &get("/"));
    let junk = hpack(&[("x-a", "b")]);
    for _ in 0..20_000 {
        flood.extend(frame(0x9, 0, 1, &junk));
    }
    // The balancer may close before taking it all.
    let _ = s.write_all(&flood).await;
    let frames = read_frames(&mut s, |f| f.0 == GOAWAY).await;
    assert!(
        frames.iter().any(|f| f.0 == GOAWAY),
        "no GOAWAY for a CONTINUATION flood: {frames:?}"
    );
    // And the balancer still serves.
    let mut s = h2c(lb.addr()).await;
    s.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get("/")))
        .await
        .unwrap();
    let frames = read_frames(&mut s, |f| f.0 == HEADERS).await;
    assert!(frames.iter().any(|f| f.0 == HEADERS));
}

/// CVE-2023-44487: a client opening and at once resetting streams costs the
/// backends (almost) nothing and loses its connection.
#[tokio::test]
async fn http2_rapid_reset_ends_the_connection() {
    let hits = Arc::new(AtomicUsize::new(0));
    let echo = echo_backend(hits.clone()).await;
    let lb = h2c_lb(echo.addr()).await;
    let mut s = h2c(lb.addr()).await;
    let mut burst = Vec::new();
    for k in 0..2000u32 {
        let id = 1 + 2 * k;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get("/count")));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = s.write_all(&burst).await;
    let frames = read_frames(&mut s, |f| f.0 == GOAWAY).await;
    let goaway = frames.iter().find(|f| f.0 == GOAWAY).expect("GOAWAY");
    assert_eq!(error_code(&goaway.3, 4), 0xb, "ENHANCE_YOUR_CALM");
    let reached = hits.load(Ordering::Relaxed);
    assert!(
        reached < 300,
        "{reached} of 2000 reset streams reached the backend"
    );
}
