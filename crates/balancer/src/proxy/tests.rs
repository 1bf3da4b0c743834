//! Request and response planning, driven with raw heads (no I/O).

use std::net::IpAddr;
use std::time::Instant;

use httparse::Header;

use super::refusal::Reply;
use super::request::{client_ip, origin_form, plan_request, Origin, Plan};
use super::response::{no_shared_cache, plan_response, Answer};
use crate::config::{BackendConfig, Config, PolicyKind};
use crate::h1::{self, Framing};
use crate::select::Headers;
use crate::Generation;

fn generation(policy: PolicyKind, trusted: &[&str]) -> Generation {
    let mut c = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        policy,
        vec![BackendConfig {
            id: "A".into(),
            addr: "127.0.0.1:1".into(),
            weight: 1,
        }],
    );
    c.trusted_proxies = trusted.iter().map(|t| t.parse().unwrap()).collect();
    let resumption = crate::tls::Resumption::new().unwrap();
    crate::build_generation(c, None, Instant::now(), b"test secret", &resumption).unwrap()
}

/// Plans `raw` from `peer`: the head written for upstream, and the plan
/// or the balancer's own reply.
fn planned(g: &Generation, raw: &str, peer: &str) -> (String, Result<Plan, Reply>) {
    let (up, planned) = planned_bytes(g, raw.as_bytes(), peer, false);
    (String::from_utf8(up).unwrap(), planned)
}

/// [`planned`] for a head that need not be UTF-8, on a TLS connection or not.
fn planned_bytes(
    g: &Generation,
    raw: &[u8],
    peer: &str,
    tls: bool,
) -> (Vec<u8>, Result<Plan, Reply>) {
    let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(n) = req.parse(raw).unwrap() else {
        panic!("incomplete head");
    };
    let mut up = Vec::new();
    let origin = Origin {
        peer: peer.parse().unwrap(),
        tls,
    };
    let planned = plan_request(&mut up, &req, n, origin, g, false, Instant::now());
    (up, planned)
}

/// Plans `raw` from `peer`: the head sent upstream, or the status answered.
fn plan(g: &Generation, raw: &str, peer: &str) -> Result<(String, Plan), u16> {
    let (up, planned) = planned(g, raw, peer);
    planned.map(|p| (up, p)).map_err(|r| r.status())
}

/// The head written for the client for the backend's response head `raw`.
fn respond(raw: &[u8], plan: &Plan, cookie: Option<&str>, stopping: bool) -> (String, Answer) {
    let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    res.parse(raw).unwrap();
    let mut out = Vec::new();
    let a = plan_response(&mut out, &res, plan, cookie, stopping).unwrap();
    (String::from_utf8(out).unwrap(), a)
}

fn headers<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
    pairs
        .iter()
        .map(|(name, v)| Header {
            name,
            value: v.as_bytes(),
        })
        .collect()
}

#[test]
fn x_forwarded_for_is_ignored_from_untrusted_peers() {
    let g = generation(PolicyKind::RoundRobin, &["10.0.0.0/8"]);
    let h = headers(&[("X-Forwarded-For", "6.6.6.6")]);
    let peer: IpAddr = "192.0.2.1".parse().unwrap();
    assert_eq!(client_ip(peer, Headers::new(&h), &g.config), peer);
    let raw =
        "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\r\n";
    let (up, _) = plan(&g, raw, "192.0.2.1").unwrap();
    assert!(up.contains("X-Forwarded-For: 192.0.2.1\r\n"), "{up}");
    assert!(
        up.contains("X-Forwarded-Proto: http\r\n")
            && !up.contains("6.6.6.6")
            && !up.contains("https"),
        "{up}"
    );
}

#[test]
fn trusted_chains_resolve_to_the_first_untrusted_hop() {
    let g = generation(PolicyKind::RoundRobin, &["10.0.0.0/8"]);
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2")]);
    assert_eq!(
        client_ip(peer, Headers::new(&h), &g.config),
        "203.0.113.7".parse::<IpAddr>().unwrap()
    );
    let raw = "GET / HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 6.6.6.6, 203.0.113.7, 10.0.0.2\r\nX-Forwarded-Proto: https\r\n\r\n";
    let (up, _) = plan(&g, raw, "10.0.0.1").unwrap();
    assert!(
        up.contains("X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.0.0.2, 10.0.0.1\r\n"),
        "{up}"
    );
    assert!(
        up.contains("X-Forwarded-Proto: https\r\n") && !up.contains("Proto: http\r\n"),
        "{up}"
    );
}

#[test]
fn garbage_x_forwarded_for_stops_the_walk() {
    let g = generation(PolicyKind::RoundRobin, &["10.0.0.0/8"]);
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    for garbage in ["not-an-ip", "<script>", "1.2.3.4.5", ""] {
        let v = format!("9.9.9.9, {garbage}");
        let h = headers(&[("x-forwarded-for", &v)]);
        assert_eq!(
            client_ip(peer, Headers::new(&h), &g.config),
            peer,
            "{garbage:?}"
        );
    }
}

#[test]
fn hop_by_hop_fields_and_the_route_cookie_do_not_reach_the_backend() {
    let g = generation(PolicyKind::Cookie, &[]);
    let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, upgrade\r\nTE: trailers\r\nUpgrade: h2c\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nCookie: SESSION=abc; TETHER_ROUTE=A..xyz; theme=dark\r\nCookie: TETHER_ROUTE=B..q\r\nAccept: */*\r\n\r\n";
    let (up, plan) = plan(&g, raw, "127.0.0.1").unwrap();
    assert_eq!(
        up,
        "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nCookie: SESSION=abc; theme=dark\r\nAccept: */*\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    );
    assert!(plan.keep_alive && plan.idempotent && plan.framing == Framing::Empty);
    assert!(!plan.upgrade, "h2c is never tunnelled");
}

/// Regression (outside probe): `Connection: keep-alive, Authorization`
/// removed the client's credentials before they reached the backend.
#[test]
fn fields_named_in_connection_by_a_client_are_not_removed() {
    let g = generation(PolicyKind::RoundRobin, &["127.0.0.0/8"]);
    let raw = "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Authorization, Cookie, X-Client-Cert, X-Forwarded-For\r\nAuthorization: Bearer t\r\nCookie: a=1\r\nX-Client-Cert: c\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
    let (up, _) = plan(&g, raw, "127.0.0.1").unwrap();
    assert_eq!(
        up,
        "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nCookie: a=1\r\nX-Client-Cert: c\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    );
}

/// Regression (outside probe): `GET http://a"b/x` was sent on with
/// `Host: a"b`; nginx and HAProxy answer 400.
#[test]
fn invalid_authorities_are_refused_in_the_target_and_in_host() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    for raw in [
        "GET http://a\"b/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET http://h:80x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: u@h\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \r\n\r\n",
    ] {
        assert_eq!(plan(&g, raw, "127.0.0.1").err(), Some(400), "{raw:?}");
    }
    for host in [
        "a.example",
        "a.example:8080",
        "[::1]:80",
        "127.0.0.1",
        "xn--bcher-kva.example",
    ] {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert!(plan(&g, &raw, "127.0.0.1").is_ok(), "{host}");
    }
}

/// Regression (outside probe): one non-UTF-8 byte in another cookie made
/// the route cookie invisible, so the client was re-routed.
#[test]
fn a_non_utf8_cookie_does_not_hide_the_route_cookie() {
    let g = generation(PolicyKind::Cookie, &[]);
    let codec = g.codec.as_ref().unwrap();
    let value = codec.encode(&crate::select::Route {
        primary: "A".into(),
        backup: None,
    });
    let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: theme=\xff\xfe; TETHER_ROUTE=".to_vec();
    raw.extend_from_slice(value.as_bytes());
    raw.extend_from_slice(b"\r\n\r\n");
    let (up, Ok(p)) = planned_bytes(&g, &raw, "127.0.0.1", false) else {
        panic!("refused");
    };
    assert_eq!(p.choice.route.map(|r| r.primary).as_deref(), Some("A"));
    assert!(
        up.windows(8).any(|w| w == b"theme=\xff\xfe"),
        "other cookies pass as they are"
    );
}

#[test]
fn a_draining_backend_keeps_sessions_not_bare_route_cookies() {
    let mut c = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        PolicyKind::Cookie,
        ["A", "B"]
            .iter()
            .enumerate()
            .map(|(i, id)| BackendConfig {
                id: (*id).into(),
                addr: format!("127.0.0.1:{}", i + 1),
                weight: 1,
            })
            .collect(),
    );
    c.health.path = String::new();
    let resumption = crate::tls::Resumption::new().unwrap();
    let g = crate::build_generation(c, None, Instant::now(), b"k", &resumption).unwrap();
    let value = g.codec.as_ref().unwrap().encode(&crate::select::Route {
        primary: "A".into(),
        backup: Some("B".into()),
    });
    g.pool.members[0].stats.set_draining(true);
    let with = |cookies: &str| {
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {cookies}\r\n\r\n");
        let (_, p) = plan(&g, &raw, "127.0.0.1").unwrap();
        p.candidates
    };
    // A route cookie anyone can collect does not hold a drained backend.
    assert_eq!(with(&format!("TETHER_ROUTE={value}")), vec![1]);
    // A session on it does.
    assert_eq!(
        with(&format!("TETHER_ROUTE={value}; SESSION=s")),
        vec![0, 1]
    );
}

#[test]
fn websocket_upgrades_are_forwarded_and_others_ignored() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    let ws = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (up, p) = plan(&g, ws, "127.0.0.1").unwrap();
    assert!(p.upgrade);
    assert_eq!(
        up,
        "GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    );
    for raw in [
        // Not named in Connection.
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        // A body, or not a GET.
        "POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\n",
        "GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let (up, p) = plan(&g, raw, "127.0.0.1").unwrap();
        assert!(!p.upgrade && !up.contains("pgrade"), "{raw:?}: {up}");
    }
    // The backend's 101 is passed on with its Upgrade; an unasked 101 is refused.
    let (text, a) = respond(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: a\r\n\r\n",
        &p_of(&g, ws),
        Some("R=1"),
        false,
    );
    assert!(a.tunnel && !a.reusable);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: a\r\nSet-Cookie: R=1\r\n")
            && text.ends_with("Connection: Upgrade\r\n\r\n"),
        "{text}"
    );
    let plain = p_of(&g, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut fields = [httparse::EMPTY_HEADER; 8];
    let mut res = httparse::Response::new(&mut fields);
    res.parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        .unwrap();
    assert!(plan_response(&mut Vec::new(), &res, &plain, None, false).is_err());
}

fn p_of(g: &Generation, raw: &str) -> Plan {
    plan(g, raw, "127.0.0.1").unwrap().1
}

#[test]
fn behind_tls_the_backend_is_told_https() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    let raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: http\r\n\r\n";
    let (up, Ok(p)) = planned_bytes(&g, raw, "127.0.0.1", true) else {
        panic!("refused");
    };
    let up = String::from_utf8(up).unwrap();
    assert!(
        p.tls && up.ends_with("X-Forwarded-Proto: https\r\n\r\n"),
        "{up}"
    );
    assert_eq!(up.matches("Proto").count(), 1, "{up}");
}

#[test]
fn framing_is_rewritten_by_the_balancer() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    let (up, p) = plan(
        &g,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert_eq!(up.matches("Content-Length: 5\r\n").count(), 1, "{up}");
    assert!(p.framing == Framing::Length(5) && !p.idempotent);
    let (up, _) = plan(
        &g,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert!(up.contains("Content-Length: 0\r\n"), "{up}");
    let (up, p) = plan(
        &g,
        "PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert!(
        up.contains("Transfer-Encoding: chunked\r\n") && !up.contains("Expect"),
        "{up}"
    );
    assert!(p.expect_continue && p.framing == Framing::Chunked);
    // HTTP/1.0 without Host: the backend gets one, and a kept connection
    // needs the client's keep-alive.
    let (up, p) = plan(
        &g,
        "GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert!(
        up.starts_with("GET /x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"),
        "{up}"
    );
    assert!(p.http10 && p.keep_alive);
    let (_, p) = plan(&g, "GET / HTTP/1.0\r\n\r\n", "127.0.0.1").unwrap();
    assert!(!p.keep_alive);
}

#[test]
fn requests_that_could_smuggle_or_confuse_are_answered_by_the_balancer() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    for (raw, status) in [
        (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            400,
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405,
        ),
        ("GET example.com HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\n",
            417,
        ),
    ] {
        assert_eq!(plan(&g, raw, "127.0.0.1").err(), Some(status), "{raw:?}");
    }
}

#[test]
fn absolute_targets_become_origin_form() {
    assert_eq!(origin_form("GET", "/x?y"), Some(("/x?y", None)));
    assert_eq!(origin_form("OPTIONS", "*"), Some(("*", None)));
    assert_eq!(origin_form("GET", "*"), None);
    assert_eq!(
        origin_form("GET", "HTTP://h:1/p/q?r"),
        Some(("/p/q?r", Some("h:1")))
    );
    assert_eq!(origin_form("GET", "https://h"), Some(("/", Some("h"))));
    assert_eq!(origin_form("GET", "http://h?q=1"), Some(("/", Some("h"))));
    assert_eq!(origin_form("GET", "http:///x"), None);
    assert_eq!(origin_form("GET", "http://u@h/x"), None);
    assert_eq!(origin_form("GET", "ftp://h/x"), None);
    // The target's authority replaces Host.
    let g = generation(PolicyKind::RoundRobin, &[]);
    let (up, _) = plan(
        &g,
        "GET http://real/x HTTP/1.1\r\nHost: other\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert!(
        up.starts_with("GET /x HTTP/1.1\r\nHost: real\r\n") && !up.contains("other"),
        "{up}"
    );
}

#[test]
fn fields_that_could_spoof_the_client_are_dropped_and_owned_ones_kept() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    let raw = "GET / HTTP/1.1\r\nHost: x\r\nConnection: host, x-forwarded-for\r\nX_Forwarded_For: 1.1.1.1\r\nForwarded: for=1.1.1.1\r\nX-Real-IP: 1.1.1.1\r\nX-Forwarded-Host: evil\r\n\r\n";
    let (up, _) = plan(&g, raw, "127.0.0.1").unwrap();
    assert_eq!(up, "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n");
    // From a trusted proxy, its address fields pass.
    let g = generation(PolicyKind::RoundRobin, &["127.0.0.0/8"]);
    let (up, _) = plan(&g, raw, "127.0.0.1").unwrap();
    assert!(
        up.contains("Forwarded: for=1.1.1.1\r\n")
            && up.contains("X-Real-IP")
            && !up.contains("X_Forwarded"),
        "{up}"
    );
}

#[test]
fn early_answers_respect_head_and_the_clients_connection_wishes() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    g.pool.members[0].stats.mark_down(false, 0);
    let answer = |raw: &str| {
        let r = planned(&g, raw, "127.0.0.1").1.err().unwrap();
        let mut out = Vec::new();
        r.write(&mut out);
        String::from_utf8(out).unwrap()
    };
    let head = answer("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 503 ")
            && head.ends_with("\r\n\r\n")
            && !head.contains("Connection"),
        "{head}"
    );
    let closing = answer("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(closing.contains("Connection: close\r\n"), "{closing}");
    let old = answer("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert!(old.contains("Connection: keep-alive\r\n"), "{old}");
    let old = answer("GET / HTTP/1.0\r\n\r\n");
    assert!(old.contains("Connection: close\r\n"), "{old}");
    let g2 = generation(PolicyKind::RoundRobin, &[]);
    let (_, p) = plan(
        &g2,
        "POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        "127.0.0.1",
    )
    .unwrap();
    assert!(!p.expect_continue, "HTTP/1.0 has no 100 Continue");
}

#[test]
fn route_cookie_responses_are_not_shared_cacheable() {
    assert_eq!(no_shared_cache(None), b"private, no-cache=\"set-cookie\"");
    assert_eq!(
        no_shared_cache(Some(b"public, max-age=60")),
        b"public, max-age=60, no-cache=\"set-cookie\""
    );
    assert_eq!(no_shared_cache(Some(b"Private")), b"Private");
}

#[test]
fn response_heads_are_rewritten_for_the_client() {
    let g = generation(PolicyKind::RoundRobin, &[]);
    let (_, mut p) = plan(&g, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1").unwrap();
    let raw = b"HTTP/1.1 200 OK\r\nConnection: close, x-internal\r\nX-Internal: 1\r\nTransfer-Encoding: chunked\r\nCache-Control: public\r\n\r\n";
    let (text, a) = respond(raw, &p, Some("R=1"), false);
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: R=1\r\nCache-Control: public, no-cache=\"set-cookie\"\r\n\r\n"
    );
    assert!(!a.reusable && !a.close_client && !a.dechunk);
    // An HTTP/1.0 client cannot take chunks: the body is de-chunked and
    // delimited by the close.
    p.http10 = true;
    let (text, a) = respond(raw, &p, None, false);
    assert!(a.dechunk && a.close_client);
    assert!(
        !text.contains("chunked") && text.contains("Connection: close\r\n"),
        "{text}"
    );
    // Framing fields are the balancer's: a length beside a coding is
    // dropped (and the connection not reused), a length is rewritten.
    p.http10 = false;
    let ambiguous = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (text, a) = respond(ambiguous, &p, None, false);
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    assert!(!a.reusable);
    let listed = b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\nCache-Control: no-store\r\nCache-Control: max-age=60\r\n\r\n";
    let (text, a) = respond(listed, &p, Some("R=1"), false);
    assert!(
        text.contains("Content-Length: 5\r\n") && a.framing == Framing::Length(5),
        "{text}"
    );
    assert!(
        text.contains("Cache-Control: no-store, max-age=60\r\n"),
        "{text}"
    );
    // Stopping closes kept connections after the response.
    let (_, a) = respond(listed, &p, None, true);
    assert!(a.close_client);
}
