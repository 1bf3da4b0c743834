//! Request checks and head rewriting: everything the balancer decides about
//! a request from its head alone, with no I/O.
//!
//! What reaches a backend: the request line in origin form, the client's
//! fields minus the hop-by-hop ones and the route cookie, `Host` (from the
//! absolute-form target when there is one), the framing fields written by
//! the balancer, and `X-Forwarded-For` / `X-Forwarded-Proto`.
//!
//! Fields a client lists in `Connection` are **not** removed, unlike RFC 9110
//! §7.6.1 asks: a client could otherwise strip `Authorization`, `Cookie` or
//! any field a front proxy added (`Connection: keep-alive, Authorization`).
//! nginx and HAProxy do the same. Only the fixed hop-by-hop set goes
//! ([`is_hop_by_hop`]). Backends, which are trusted, may still nominate
//! fields in their responses' `Connection`.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use httparse::Header;

use super::refusal::{Refusal, Reply};
use crate::config::Config;
use crate::h1::{self, is, FrameError, Framing};
use crate::select::{cookie_value, Choice, Headers, RequestInfo};
use crate::Generation;

/// The client's address: the peer, unless the peer is a trusted proxy, in
/// which case the right-most untrusted address of `X-Forwarded-For`. A
/// malformed entry stops the walk: nothing left of it can be trusted.
pub(crate) fn client_ip(peer: IpAddr, headers: Headers<'_>, config: &Config) -> IpAddr {
    if !config.is_trusted(peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) if config.is_trusted(ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the ones the balancer writes itself.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| is(name, h))
}

/// The tokens of every `Connection` field: header names to drop, plus the
/// `close` / `keep-alive` / `upgrade` options.
pub(crate) fn connection_tokens<'a>(headers: &[Header<'a>]) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|h| is(h.name, "connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
    )
}

/// Appends one header line.
pub(crate) fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether `a` is a valid `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2.2):
/// a reg-name of unreserved, sub-delim and `%` characters, or an IP literal
/// in brackets, and an optional decimal port. nginx and HAProxy refuse
/// anything else with 400; passing it on would let a client write quotes,
/// spaces or `@` into every backend's idea of its own host.
pub(crate) fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &a[1..end];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b));
        if !ok {
            return false;
        }
        match &a[end + 1..] {
            [] => (&a[..0], None),
            [b':', port @ ..] => (&a[..0], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|b| *b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let host_ok = host
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b))
        && (a.first() == Some(&b'[') || !host.is_empty());
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok
}

/// The origin-form target to send on, and the authority of an
/// absolute-form target (which replaces `Host`, RFC 9112 §3.2.2).
pub(crate) fn origin_form<'a>(method: &str, target: &'a str) -> Option<(&'a str, Option<&'a str>)> {
    if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        return Some((target, None));
    }
    let lower = target.get(..8)?.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if !valid_authority(authority.as_bytes()) {
        return None;
    }
    let path = match rest.as_bytes().get(end) {
        Some(b'/') => &rest[end..],
        // "http://host?q" has an empty path: RFC 9112 §3.2.1 makes it "/".
        _ => "/",
    };
    Some((path, Some(authority)))
}

/// What the balancer decided about one request, from its head alone.
pub(crate) struct Plan {
    pub(crate) head_len: usize,
    pub(crate) framing: Framing,
    pub(crate) idempotent: bool,
    pub(crate) head: bool,
    /// The client wants the connection kept after this exchange.
    pub(crate) keep_alive: bool,
    pub(crate) http10: bool,
    pub(crate) expect_continue: bool,
    /// A protocol upgrade (WebSocket) was asked for and forwarded: a `101`
    /// answer turns the connection into a tunnel.
    pub(crate) upgrade: bool,
    /// The request came over TLS (cookies the balancer sets are `Secure`).
    pub(crate) tls: bool,
    pub(crate) choice: Choice,
    pub(crate) candidates: Vec<usize>,
    /// (method, path) when a live view is watching.
    pub(crate) described: Option<(String, String)>,
}

impl Plan {
    /// A refusal of the balancer's own to this request.
    pub(crate) fn reply(&self, refusal: Refusal, close: bool) -> Reply {
        Reply::new(refusal, close, self.head, self.http10)
    }
}

/// The connection a request arrived on, as far as planning cares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    /// The peer's address.
    pub(crate) peer: IpAddr,
    /// Whether the connection is TLS.
    pub(crate) tls: bool,
}

/// Reads a parsed request head: validates it, selects the backends and
/// writes the head to send them into `up`.
pub(crate) fn plan_request(
    up: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    origin: Origin,
    g: &Generation,
    watched: bool,
    now: Instant,
) -> Result<Plan, Reply> {
    let config = &g.config;
    let peer = origin.peer;
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Reply::early(Refusal::MalformedHead));
    };
    if head_len > config.limits.max_header_bytes {
        return Err(Reply::early(Refusal::HeadTooLarge));
    }
    let http10 = version == 0;
    let head = method == "HEAD";
    let reply = |refusal, close| Reply::new(refusal, close, head, http10);
    let fields: &[Header<'_>] = req.headers;
    let framing = match h1::request_framing(fields, http10) {
        Ok(f) => f,
        Err(FrameError::Coding) => return Err(reply(Refusal::CodingNotImplemented, false)),
        Err(_) => return Err(reply(Refusal::BadFraming, false)),
    };
    // From here on an early answer can keep the connection only if no body follows.
    let bodyless = framing == Framing::Empty;
    if method == "CONNECT" {
        return Err(reply(Refusal::Connect, false));
    }
    let Some((target, authority)) = origin_form(method, target) else {
        return Err(reply(Refusal::BadTarget, false));
    };
    let mut hosts = 0;
    for h in fields.iter().filter(|h| is(h.name, "host")) {
        hosts += 1;
        if !valid_authority(h.value) {
            return Err(reply(Refusal::BadHost, false));
        }
    }
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(reply(Refusal::BadHost, false));
    }
    let trusted = config.is_trusted(peer);
    let tokens = connection_tokens(fields);
    let has = |t: &str| tokens.iter().any(|x| x.eq_ignore_ascii_case(t));
    let keep_alive = if http10 {
        has("keep-alive") && !has("close")
    } else {
        !has("close")
    };
    let mut expect_continue = false;
    for h in fields.iter().filter(|h| is(h.name, "expect")) {
        if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
            // HTTP/1.0 has no interim responses (RFC 9110 §10.1.1).
            expect_continue = !bodyless && !http10;
        } else {
            return Err(reply(Refusal::Expectation, false));
        }
    }
    // An upgrade is tunnelled only for a bodyless HTTP/1.1 GET (what
    // WebSocket sends); `h2c` is never: the balancer speaks HTTP/2 to
    // clients itself. Anything else ignores the upgrade, as RFC 9110 §7.8
    // allows, and is served as an ordinary request.
    let upgrade_to = fields
        .iter()
        .find(|h| is(h.name, "upgrade"))
        .map(|h| h.value)
        .filter(|v| {
            has("upgrade")
                && method == "GET"
                && bodyless
                && !http10
                && !v.trim_ascii().eq_ignore_ascii_case(b"h2c")
        });

    let headers = Headers::new(fields);
    let client = client_ip(peer, headers, config);
    let mut choice = g.select.choose(
        &RequestInfo {
            client_ip: client,
            headers,
        },
        &g.pool,
    );
    // A draining backend keeps serving the sessions it holds. What binds a
    // request to it is a session, not the route cookie or the address
    // alone: route cookies are the same for every client of a backend, so
    // anyone can collect one and keep a drained backend busy forever.
    choice.bound = choice
        .bound
        .filter(|_| cookie_value(headers, &config.session_cookie).is_some());
    let bound = choice.bound;
    let now_ms = g.pool.ms_at(now);
    let eject = Config::ms(config.health.eject_ms);
    let candidates: Vec<usize> = choice
        .order
        .iter()
        .copied()
        .filter(|i| usable(g, *i, now_ms, eject, bound))
        .collect();
    if candidates.is_empty() {
        return Err(reply(Refusal::NoBackend, !bodyless || !keep_alive));
    }

    // The head for the backend: hop-by-hop fields and the route cookie
    // removed, framing and forwarding fields written by the balancer.
    let route_cookie = g.codec.as_ref().map(|c| c.name());
    up.clear();
    // The rewritten head is about the size of the received one.
    up.reserve(head_len.max(256) + 256);
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    let mut has_proto = false;
    for h in fields {
        let name = h.name;
        if is(name, "host") {
            // An absolute-form target names the host itself.
            if authority.is_none() {
                header(up, name, h.value);
            }
            continue;
        }
        // Names with `_` are dropped as nginx does: CGI-style gateways map
        // `X_Forwarded_For` and `X-Forwarded-For` to one variable. Other
        // client-address fields are believed only from trusted proxies.
        if is_hop_by_hop(name)
            || is(name, "expect")
            || name.contains('_')
            || (!trusted
                && ["forwarded", "x-real-ip", "x-forwarded-host"]
                    .iter()
                    .any(|f| is(name, f)))
        {
            continue;
        }
        if is(name, "content-length") {
            had_length = true;
            continue;
        }
        if is(name, "x-forwarded-for") {
            if trusted {
                prior_xff.push(h.value);
            }
            continue;
        }
        if is(name, "x-forwarded-proto") {
            if trusted {
                has_proto = true;
                header(up, name, h.value);
            }
            continue;
        }
        if let Some(route) = route_cookie.filter(|_| is(name, "cookie")) {
            if cookie_value(Headers::new(std::slice::from_ref(h)), route).is_some() {
                // The route cookie is the balancer's business (HAProxy's
                // `indirect`): backends never see it.
                let kept = strip_cookie(h.value, route);
                if !kept.is_empty() {
                    header(up, name, &kept);
                }
                continue;
            }
        }
        header(up, name, h.value);
    }
    match authority {
        Some(a) => header(up, "Host", a.as_bytes()),
        None if hosts == 0 => {
            let backend = g.pool.members[candidates[0]].authority.as_str();
            header(up, "Host", backend.as_bytes());
        }
        None => {}
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(up, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => up.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Empty if had_length => up.extend_from_slice(b"Content-Length: 0\r\n"),
        Framing::Empty | Framing::Close => {}
    }
    if let Some(to) = upgrade_to {
        up.extend_from_slice(b"Connection: Upgrade\r\n");
        header(up, "Upgrade", to);
    }
    up.extend_from_slice(b"X-Forwarded-For: ");
    for p in &prior_xff {
        up.extend_from_slice(p.trim_ascii());
        up.extend_from_slice(b", ");
    }
    let _ = write!(up, "{peer}\r\n");
    if !has_proto {
        up.extend_from_slice(if origin.tls {
            b"X-Forwarded-Proto: https\r\n"
        } else {
            b"X-Forwarded-Proto: http\r\n"
        });
    }
    up.extend_from_slice(b"\r\n");

    Ok(Plan {
        head_len,
        framing,
        idempotent: is_idempotent(method),
        head,
        keep_alive,
        http10,
        expect_continue,
        upgrade: upgrade_to.is_some(),
        tls: origin.tls,
        choice,
        candidates,
        described: watched.then(|| (method.to_string(), target.to_string())),
    })
}

/// Whether backend `i` may take this request: not down, and not draining
/// unless the request is bound to it.
pub(crate) fn usable(
    g: &Generation,
    i: usize,
    now_ms: u64,
    eject: Duration,
    bound: Option<usize>,
) -> bool {
    let s = &g.pool.members[i].stats;
    !s.is_down(now_ms, eject) && (!s.is_draining() || bound == Some(i))
}

/// A `Cookie` value without the pairs named `name`.
fn strip_cookie(value: &[u8], name: &str) -> Vec<u8> {
    let mut kept = Vec::with_capacity(value.len());
    for pair in value.split(|b| *b == b';').map(<[u8]>::trim_ascii) {
        let key = pair.split(|b| *b == b'=').next().unwrap_or_default();
        if pair.is_empty() || key == name.as_bytes() {
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    kept
}
