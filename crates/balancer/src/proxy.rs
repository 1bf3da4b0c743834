//! Forwarding: one task per client connection reads requests, picks a
//! backend, and relays each exchange over a pooled keep-alive connection.
//!
//! The data path speaks HTTP/1.1 itself (heads parsed in place by
//! `httparse`, framing in [`crate::h1`]) instead of going through hyper's
//! server and client: rewriting the head straight from the received bytes,
//! with one read and one write per side and no header maps, is what lets one
//! worker thread keep up with nginx (docs/BENCHMARKS.md has the figures).
//! hyper still runs the health checks and axum the admin listener.

use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use httparse::Header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::config::Config;
use crate::h1::{self, is, Chunks, FrameError, Framing};
use crate::pool::Stats;
use crate::select::{cookie_value, Choice, Headers, RequestInfo, Route};
use crate::upstream::Conn;
use crate::{Generation, Shared};

/// Longest wait for a client to take response bytes (nginx's `send_timeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the next piece of a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Free space ensured before each read.
const READ_SPACE: usize = 8 * 1024;
/// How long a closing connection keeps reading (and discarding) what the
/// client still sends, so the kernel does not reset the connection and
/// destroy the response before the client has read it (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);

/// Counts a request as in flight on a backend until its response is relayed
/// (for `least-conn`, `p2c` and bounded load).
pub(crate) struct InFlight(Arc<Stats>);

impl InFlight {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

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
fn is_hop_by_hop(name: &str) -> bool {
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
/// `close` / `keep-alive` options.
fn connection_tokens<'a>(headers: &[Header<'a>]) -> Vec<&'a str> {
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

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The origin-form target to send on, and the authority of an
/// absolute-form target (which replaces `Host`, RFC 9112 §3.2.2).
fn origin_form<'a>(method: &str, target: &'a str) -> Option<(&'a str, Option<&'a str>)> {
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
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let path = match rest.as_bytes().get(end) {
        Some(b'/') => &rest[end..],
        // "http://host?q" has an empty path: RFC 9112 §3.2.1 makes it "/".
        _ => "/",
    };
    Some((path, Some(authority)))
}

/// A request the balancer answers itself.
struct Reply {
    status: u16,
    msg: &'static str,
    close: bool,
    /// Answering a HEAD request: no body.
    head: bool,
    /// An HTTP/1.0 client: a kept connection must be said so.
    http10: bool,
}

/// A reply before the request line is known.
fn reply(status: u16, msg: &'static str, close: bool) -> Reply {
    Reply {
        status,
        msg,
        close,
        head: false,
        http10: false,
    }
}

/// What the balancer decided about one request, from its head alone.
struct Plan {
    head_len: usize,
    framing: Framing,
    idempotent: bool,
    head: bool,
    /// The client wants the connection kept after this exchange.
    keep_alive: bool,
    http10: bool,
    expect_continue: bool,
    choice: Choice,
    candidates: Vec<usize>,
    /// (method, path) when a live view is watching.
    described: Option<(String, String)>,
}

impl Plan {
    /// A reply of the balancer's own to this request.
    fn reply(&self, status: u16, msg: &'static str, close: bool) -> Reply {
        Reply {
            status,
            msg,
            close,
            head: self.head,
            http10: self.http10,
        }
    }
}

/// Reads a parsed request head: validates it, selects the backends and
/// writes the head to send them into `up`.
fn plan_request(
    up: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    peer: IpAddr,
    g: &Generation,
    watched: bool,
    now: Instant,
) -> Result<Plan, Reply> {
    let config = &g.config;
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(reply(400, "400 malformed request\n", true));
    };
    if head_len > config.limits.max_header_bytes {
        return Err(reply(431, "431 request header fields too large\n", true));
    }
    let http10 = version == 0;
    let reply = |status, msg, close| Reply {
        status,
        msg,
        close,
        head: method == "HEAD",
        http10,
    };
    let fields: &[Header<'_>] = req.headers;
    let framing = match h1::request_framing(fields, http10) {
        Ok(f) => f,
        Err(FrameError::Coding) => {
            return Err(reply(501, "501 transfer coding not implemented\n", true))
        }
        Err(_) => return Err(reply(400, "400 invalid message framing\n", true)),
    };
    // From here on an early answer can keep the connection only if no body follows.
    let bodyless = framing == Framing::Empty;
    if method == "CONNECT" {
        return Err(reply(405, "405 CONNECT is not supported\n", true));
    }
    let Some((target, authority)) = origin_form(method, target) else {
        return Err(reply(400, "400 bad request target\n", true));
    };
    let hosts = fields.iter().filter(|h| is(h.name, "host")).count();
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(reply(
            400,
            "400 exactly one Host header is required\n",
            true,
        ));
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
            return Err(reply(417, "417 expectation not supported\n", true));
        }
    }

    let headers = Headers::new(fields);
    let client = client_ip(peer, headers, config);
    let choice = g.select.choose(
        &RequestInfo {
            client_ip: client,
            headers,
        },
        &g.pool,
    );
    let now_ms = g.pool.ms_at(now);
    let eject = Config::ms(config.health.eject_ms);
    let candidates: Vec<usize> = choice
        .order
        .iter()
        .copied()
        .filter(|i| usable(g, *i, now_ms, eject, choice.bound))
        .collect();
    if candidates.is_empty() {
        return Err(reply(
            503,
            "503 no backend available\n",
            !bodyless || !keep_alive,
        ));
    }

    // The head for the backend: hop-by-hop fields and the route cookie
    // removed, framing and forwarding fields written by the balancer.
    let route_cookie = g.codec.as_ref().map(|c| c.name());
    up.clear();
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
        // Fields the balancer owns cannot be removed by listing them in
        // `Connection`; any other listed field is hop-by-hop.
        let owned = is(name, "x-forwarded-for") || is(name, "x-forwarded-proto");
        if !owned && tokens.iter().any(|t| is(name, t)) {
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
    up.extend_from_slice(b"X-Forwarded-For: ");
    for p in &prior_xff {
        up.extend_from_slice(p.trim_ascii());
        up.extend_from_slice(b", ");
    }
    let _ = write!(up, "{peer}\r\n");
    if !has_proto {
        up.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
    }
    up.extend_from_slice(b"\r\n");

    Ok(Plan {
        head_len,
        framing,
        idempotent: is_idempotent(method),
        head: method == "HEAD",
        keep_alive,
        http10,
        expect_continue,
        choice,
        candidates,
        described: watched.then(|| (method.to_string(), target.to_string())),
    })
}

/// Whether backend `i` may take this request: not down, and not draining
/// unless the request is bound to it.
fn usable(g: &Generation, i: usize, now_ms: u64, eject: Duration, bound: Option<usize>) -> bool {
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

/// What the balancer decided about a backend's response head.
struct Answer {
    status: u16,
    framing: Framing,
    /// Remove the chunked framing for an HTTP/1.0 client.
    dechunk: bool,
    /// The backend connection may serve another request afterwards.
    reusable: bool,
    close_client: bool,
    /// `X-Tether-Node`, when a live view is watching.
    node: Option<String>,
}

/// Writes the head to send the client for a backend's response.
fn plan_response(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    plan: &Plan,
    set_cookie: Option<&str>,
    stopping: bool,
) -> Result<Answer, FrameError> {
    let status = res.code.unwrap_or(0);
    let fields: &[Header<'_>] = res.headers;
    let http11 = res.version == Some(1);
    let framing = h1::response_framing(fields, status, plan.head, !http11)?;
    let tokens = connection_tokens(fields);
    // A length beside a coding is a message someone may read differently:
    // pass it on re-framed, but do not reuse the connection.
    let ambiguous = fields.iter().any(|h| is(h.name, "content-length"))
        && fields.iter().any(|h| is(h.name, "transfer-encoding"));
    let backend_close = tokens.iter().any(|t| t.eq_ignore_ascii_case("close"))
        || (!http11 && !tokens.iter().any(|t| t.eq_ignore_ascii_case("keep-alive")));
    let dechunk = framing == Framing::Chunked && plan.http10;
    let close_client = !plan.keep_alive || stopping || framing == Framing::Close || dechunk;
    let mut node = None;
    let mut cache_control: Vec<&[u8]> = Vec::new();
    let mut length: Option<&[u8]> = None;
    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in fields {
        let name = h.name;
        // The framing fields are written by the balancer below.
        if is(name, "content-length") {
            length.get_or_insert(h.value.trim_ascii());
            continue;
        }
        if is_hop_by_hop(name) || tokens.iter().any(|t| is(name, t)) {
            continue;
        }
        if set_cookie.is_some() && is(name, "cache-control") {
            cache_control.push(h.value);
            continue;
        }
        if plan.described.is_some() && is(name, "x-tether-node") {
            node = std::str::from_utf8(h.value).ok().map(str::to_string);
        }
        header(out, name, h.value);
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked if !dechunk => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        // HEAD, 204, 304 and an empty body keep the length they announce.
        Framing::Empty => {
            if let Some(v) = length {
                header(out, "Content-Length", v);
            }
        }
        Framing::Chunked | Framing::Close => {}
    }
    if let Some(cookie) = set_cookie {
        header(out, "Set-Cookie", cookie.as_bytes());
        let existing = (!cache_control.is_empty()).then(|| cache_control.join(&b", "[..]));
        header(out, "Cache-Control", &no_shared_cache(existing.as_deref()));
    }
    if close_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if plan.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Answer {
        status,
        framing,
        dechunk,
        reusable: !backend_close && !ambiguous && framing != Framing::Close,
        close_client,
        node,
    })
}

/// The `Cache-Control` of a response that sets the route cookie: a shared
/// cache must not store it, or it would pin whoever receives it to one backend.
fn no_shared_cache(existing: Option<&[u8]>) -> Vec<u8> {
    match existing {
        Some(v) => {
            let lower = v.to_ascii_lowercase();
            let has = |s: &[u8]| lower.windows(s.len()).any(|w| w == s);
            let mut v = v.to_vec();
            if !(has(b"no-cache=\"set-cookie\"") || has(b"private") || has(b"no-store")) {
                v.extend_from_slice(b", no-cache=\"set-cookie\"");
            }
            v
        }
        None => b"private, no-cache=\"set-cookie\"".to_vec(),
    }
}

/// A canned response of the balancer's own.
fn canned(out: &mut Vec<u8>, r: &Reply) {
    out.clear();
    let connection = match (r.close, r.http10) {
        (true, _) => "Connection: close\r\n",
        (false, true) => "Connection: keep-alive\r\n",
        (false, false) => "",
    };
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{connection}\r\n",
        r.status,
        h1::reason(r.status),
        r.msg.len(),
    );
    if !r.head {
        out.extend_from_slice(r.msg.as_bytes());
    }
}

/// Polls `fut` until it completes or `timer` fires (`None`). One timer per
/// connection, moved for each wait: a new timer per request cost a few
/// percent of the balancer's throughput.
async fn timed<T>(timer: &mut Pin<Box<Sleep>>, fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Writes all of `bytes`, giving up at `deadline`.
async fn send_by(
    io: &mut TcpStream,
    timer: &mut Pin<Box<Sleep>>,
    bytes: &[u8],
    deadline: Instant,
) -> bool {
    arm(timer, deadline);
    matches!(timed(timer, io.write_all(bytes)).await, Some(Ok(())))
}

fn arm(timer: &mut Pin<Box<Sleep>>, at: Instant) {
    timer.as_mut().reset(tokio::time::Instant::from_std(at));
}

/// Reads more into `buf`; 0 means the peer closed.
async fn fill(io: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SPACE {
        buf.reserve(READ_SPACE);
    }
    io.read_buf(buf).await
}

enum Failure {
    Connect,
    Timeout,
    Broken,
}

/// What became of one try on a backend.
enum Tried {
    /// The response head arrived and is in `Client::out`.
    Answered(Answer),
    /// Nothing usable came back; `bool`: the request may not have reached
    /// the application (a kept-alive connection the backend had closed).
    Failed(Failure, bool),
}

/// Why a streamed request body could not be passed on.
enum StreamError {
    Client,
    Backend,
    Malformed,
}

/// Whether to keep reading requests on a connection.
enum Next {
    KeepAlive,
    Close,
    /// Close after draining what the client still sends.
    Linger,
}

/// One client connection.
struct Client {
    io: TcpStream,
    peer: SocketAddr,
    /// Received from the client, not yet consumed.
    buf: BytesMut,
    /// To the client.
    out: Vec<u8>,
    /// To the backend.
    up: Vec<u8>,
    timer: Pin<Box<Sleep>>,
}

/// Serves one client connection until it closes, fails or the balancer stops.
pub(crate) async fn serve(shared: Arc<Shared>, io: TcpStream, peer: SocketAddr) {
    let _ = io.set_nodelay(true);
    let mut c = Client {
        io,
        peer,
        buf: BytesMut::with_capacity(READ_SPACE),
        out: Vec::with_capacity(READ_SPACE),
        up: Vec::with_capacity(READ_SPACE),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
    };
    loop {
        match c.exchange(&shared).await {
            Next::KeepAlive => continue,
            Next::Close => {
                let _ = c.io.shutdown().await;
                return;
            }
            Next::Linger => {
                c.linger().await;
                return;
            }
        }
    }
}

impl Client {
    /// Sends `self.out`, giving up after [`SEND_TIMEOUT`].
    async fn send_out(&mut self) -> bool {
        self.send_out_by(Instant::now() + SEND_TIMEOUT).await
    }

    /// Sends `self.out`, giving up at `deadline`.
    async fn send_out_by(&mut self, deadline: Instant) -> bool {
        send_by(&mut self.io, &mut self.timer, &self.out, deadline).await
    }

    /// Answers with the balancer's own response.
    async fn answer(&mut self, r: &Reply) -> Next {
        canned(&mut self.out, r);
        if !self.send_out().await {
            return Next::Close;
        }
        if r.close {
            Next::Linger
        } else {
            Next::KeepAlive
        }
    }

    /// Half-closes, then discards what the client still sends for a while,
    /// so an unread request does not make the kernel reset the connection
    /// before the client has read the answer.
    async fn linger(&mut self) {
        let _ = self.io.shutdown().await;
        arm(&mut self.timer, Instant::now() + LINGER);
        let mut discarded = 0usize;
        while discarded < 1 << 20 {
            self.buf.clear();
            match timed(&mut self.timer, fill(&mut self.io, &mut self.buf)).await {
                Some(Ok(n)) if n > 0 => discarded += n,
                _ => return,
            }
        }
    }

    /// Reads a request head and serves the exchange.
    async fn exchange(&mut self, shared: &Arc<Shared>) -> Next {
        // The configuration is read once the head is here: a kept-alive
        // connection waiting for its next request must see a reload.
        let (header_timeout, max_head) = {
            let g = shared.current.load();
            (
                Config::ms(g.config.limits.header_timeout_ms),
                g.config.limits.max_header_bytes,
            )
        };
        arm(&mut self.timer, Instant::now() + header_timeout);
        // A head is parsed again only when a line has ended since the last
        // try: a client dribbling bytes must not make parsing quadratic.
        let mut parsed_upto = 0;
        let (plan, g, now) = loop {
            let fresh_line = self.buf[parsed_upto..].contains(&b'\n');
            if !self.buf.is_empty() && (fresh_line || self.buf.len() >= max_head) {
                parsed_upto = self.buf.len();
                let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
                let mut req = httparse::Request::new(&mut fields);
                let parsed = req.parse(&self.buf);
                let outcome = match parsed {
                    Ok(httparse::Status::Complete(n)) => {
                        let g = shared.current.load_full();
                        let watched = shared.events.receiver_count() > 0;
                        let now = Instant::now();
                        let peer = self.peer.ip();
                        Some(
                            plan_request(&mut self.up, &req, n, peer, &g, watched, now)
                                .map(|plan| (plan, g, now))
                                .map_err(|r| (r, n)),
                        )
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() < max_head => None,
                    Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Some(
                        Err((reply(431, "431 request header fields too large\n", true), 0)),
                    ),
                    Err(_) => Some(Err((reply(400, "400 malformed request head\n", true), 0))),
                };
                match outcome {
                    Some(Ok(planned)) => break planned,
                    Some(Err((r, head_len))) => {
                        // The head is answered; a kept connection reads on after it.
                        self.buf.advance(head_len);
                        shared.totals.requests.fetch_add(1, Ordering::Relaxed);
                        if r.status == 503 {
                            shared.totals.count_generated(503);
                        }
                        return self.answer(&r).await;
                    }
                    None => {}
                }
            }
            // Between requests the balancer may be stopping: an idle
            // connection closes then instead of waiting for another request.
            let idle = self.buf.is_empty();
            let stopped = shared.stop.notified();
            let mut stopped = std::pin::pin!(stopped);
            if idle {
                stopped.as_mut().enable();
                if shared.stopping.load(Ordering::Relaxed) {
                    return Next::Close;
                }
            }
            let got = {
                let read = fill(&mut self.io, &mut self.buf);
                let mut read = std::pin::pin!(read);
                let timer = &mut self.timer;
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = read.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    if idle && stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Ok(0)));
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await
            };
            match got {
                Some(Ok(n)) if n > 0 => {}
                // Closed (or failed) by the client, or the balancer stopping.
                Some(_) => return Next::Close,
                // The head did not arrive in time: slowloris, or just idle.
                None if idle => return Next::Close,
                None => {
                    let r = reply(408, "408 request head too slow\n", true);
                    return self.answer(&r).await;
                }
            }
        };
        shared.totals.requests.fetch_add(1, Ordering::Relaxed);
        self.forward(shared, &g, plan, now).await
    }

    /// Serves a planned request: body, tries, response.
    async fn forward(
        &mut self,
        shared: &Shared,
        g: &Generation,
        plan: Plan,
        mut now: Instant,
    ) -> Next {
        let config = &g.config;
        let limit = config.limits.buffer_body_bytes as u64;
        // Bodies up to the limit are buffered behind the head (one write,
        // and a retry can resend them); larger or chunked ones stream once.
        let buffered = match plan.framing {
            Framing::Empty => {
                self.buf.advance(plan.head_len);
                true
            }
            Framing::Length(n) if n <= limit => {
                let total = plan.head_len + usize::try_from(n).unwrap_or(usize::MAX);
                let waited = self.buf.len() < total;
                if waited {
                    if plan.expect_continue && !self.continue_100().await {
                        return Next::Close;
                    }
                    while self.buf.len() < total {
                        arm(&mut self.timer, Instant::now() + BODY_TIMEOUT);
                        match timed(&mut self.timer, fill(&mut self.io, &mut self.buf)).await {
                            Some(Ok(n)) if n > 0 => {}
                            Some(_) => return Next::Close,
                            None => {
                                let r = plan.reply(408, "408 request body too slow\n", true);
                                return self.answer(&r).await;
                            }
                        }
                    }
                }
                self.up.extend_from_slice(&self.buf[plan.head_len..total]);
                self.buf.advance(total);
                // Time spent receiving the body is not the backends' time.
                if waited {
                    now = Instant::now();
                }
                true
            }
            _ => {
                self.buf.advance(plan.head_len);
                false
            }
        };

        let budget = Config::ms(config.retry.timeout_ms);
        let per_try = Config::ms(config.retry.response_timeout_ms);
        let connect_timeout = Config::ms(config.retry.connect_timeout_ms);
        let tries = usize::try_from(config.retry.tries).unwrap_or(usize::MAX);
        let mut last = Failure::Connect;
        let mut k = 0;
        let mut fresh_retry = false;
        let mut body_sent = false;
        while k < plan.candidates.len().min(tries) {
            let i = plan.candidates[k];
            let started = if k == 0 && !fresh_retry {
                now
            } else {
                Instant::now()
            };
            let remaining = budget.saturating_sub(started - now);
            if k > 0 && !fresh_retry {
                if remaining.is_zero() {
                    break;
                }
                shared.totals.retries.fetch_add(1, Ordering::Relaxed);
            }
            let member = &g.pool.members[i];
            let stats = &member.stats;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            // Connect before sending anything: a backend that cannot be
            // reached has received nothing, so even a streamed body can go
            // to the next one.
            let mut up = match stats
                .conns
                .checkout(member.addr, started, connect_timeout, fresh_retry)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    shared.record_failure(g, i);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(backend = %member.id, error = %e, "connect failed; trying the next backend");
                    last = Failure::Connect;
                    fresh_retry = false;
                    k += 1;
                    continue;
                }
            };
            if !buffered && body_sent {
                // A streamed body is gone after its one try.
                break;
            }
            let guard = InFlight::new(stats);
            let wait = if k == 0 {
                per_try
            } else {
                per_try.min(remaining.max(Duration::from_millis(1)))
            };
            let set_cookie = route_cookie(g, &plan, i);
            let stopping = shared.stopping.load(Ordering::Relaxed);
            let tried = self
                .try_once(
                    &mut up,
                    &plan,
                    buffered,
                    (started, wait),
                    set_cookie.as_deref(),
                    stopping,
                )
                .await;
            let tried = match tried {
                Ok(t) => t,
                Err(StreamError::Client) => return Next::Close,
                Err(StreamError::Malformed) => {
                    let r = plan.reply(400, "400 malformed chunked body\n", true);
                    return self.answer(&r).await;
                }
                Err(StreamError::Backend) => {
                    body_sent = true;
                    Tried::Failed(Failure::Broken, false)
                }
            };
            body_sent |= !buffered;
            match tried {
                Tried::Answered(answer) => {
                    let answered = Instant::now();
                    stats.latency.observe(answered - started);
                    let class = usize::from(answer.status / 100).clamp(1, 5) - 1;
                    stats.responses[class].fetch_add(1, Ordering::Relaxed);
                    if answer.status >= 500 && config.health.passive_5xx {
                        shared.record_failure(g, i);
                    } else {
                        shared.record_success(g, i);
                    }
                    if set_cookie.is_some() {
                        stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
                    }
                    self.event(shared, &plan, answer.status, answer.node.clone(), now);
                    let next = self.relay(&mut up, &answer, answered).await;
                    drop(guard);
                    if matches!(next, Relayed::Complete) && answer.reusable && up.buf.is_empty() {
                        stats.conns.checkin(up, answered);
                    }
                    return match next {
                        Relayed::Complete if !answer.close_client => Next::KeepAlive,
                        // A pipelined request may be waiting unread.
                        Relayed::Complete => Next::Linger,
                        // Headers already went out: cutting the connection is
                        // the only way to tell the client the body is incomplete.
                        Relayed::Broken => Next::Close,
                    };
                }
                Tried::Failed(_, true) if buffered && !fresh_retry => {
                    tracing::debug!(backend = %member.id, "kept-alive connection was closed; retrying on a new one");
                    fresh_retry = true;
                    continue;
                }
                Tried::Failed(failure, _) => {
                    shared.record_failure(g, i);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    match failure {
                        Failure::Timeout => {
                            tracing::warn!(backend = %member.id, timeout = ?wait, "backend timed out");
                        }
                        _ => {
                            tracing::warn!(backend = %member.id, "backend failed before response headers");
                        }
                    }
                    last = failure;
                    if !plan.idempotent || !buffered {
                        break;
                    }
                }
            }
            fresh_retry = false;
            k += 1;
        }
        let (status, msg) = match last {
            Failure::Timeout => (504, "504 backend timed out\n"),
            Failure::Connect => (502, "502 no backend could be reached\n"),
            Failure::Broken => (502, "502 backend sent an invalid or incomplete response\n"),
        };
        shared.totals.count_generated(status);
        // A streamed body that was not read to its end leaves the
        // connection mid-message.
        let close = !plan.keep_alive || !buffered;
        let r = plan.reply(status, msg, close);
        self.event(shared, &plan, status, None, now);
        self.answer(&r).await
    }

    /// Sends `100 Continue` to a client waiting for it before its body.
    async fn continue_100(&mut self) -> bool {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let deadline = Instant::now() + SEND_TIMEOUT;
        send_by(&mut self.io, &mut self.timer, interim, deadline).await
    }

    /// Sends the request on `up` and reads the response head into `out`.
    async fn try_once(
        &mut self,
        up: &mut Conn,
        plan: &Plan,
        buffered: bool,
        (started, wait): (Instant, Duration),
        set_cookie: Option<&str>,
        stopping: bool,
    ) -> Result<Tried, StreamError> {
        arm(&mut self.timer, started + wait);
        let mut written = 0;
        let sent = timed(&mut self.timer, async {
            while written < self.up.len() {
                match up.io.write(&self.up[written..]).await {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => written += n,
                    Err(e) => return Err(e),
                }
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        match sent {
            Some(Ok(())) => {}
            // A kept-alive connection the backend had closed: if not a byte
            // was taken, nothing reached the application.
            Some(Err(_)) => {
                let unsent = written == 0 || plan.idempotent;
                return Ok(Tried::Failed(Failure::Broken, up.reused && unsent));
            }
            None => return Ok(Tried::Failed(Failure::Timeout, false)),
        }
        if !buffered {
            if plan.expect_continue && !self.continue_100().await {
                return Err(StreamError::Client);
            }
            self.stream_body(up, plan.framing).await?;
            // The wait for the answer starts when the upload ends.
            arm(&mut self.timer, Instant::now() + wait);
        }
        loop {
            if !up.buf.is_empty() {
                let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
                let mut res = httparse::Response::new(&mut fields);
                match res.parse(&up.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let status = res.code.unwrap_or(0);
                        if status == 101 {
                            // No upgrade was asked for (Upgrade is not forwarded).
                            return Ok(Tried::Failed(Failure::Broken, false));
                        }
                        if (100..200).contains(&status) {
                            // Interim responses are the balancer's business.
                            up.buf.advance(n);
                            continue;
                        }
                        let Ok(answer) =
                            plan_response(&mut self.out, &res, plan, set_cookie, stopping)
                        else {
                            return Ok(Tried::Failed(Failure::Broken, false));
                        };
                        up.buf.advance(n);
                        return Ok(Tried::Answered(answer));
                    }
                    Ok(httparse::Status::Partial) if up.buf.len() < MAX_RESPONSE_HEAD => {}
                    Ok(httparse::Status::Partial) | Err(_) => {
                        return Ok(Tried::Failed(Failure::Broken, false))
                    }
                }
            }
            let nothing_yet = up.buf.is_empty();
            match timed(&mut self.timer, fill(&mut up.io, &mut up.buf)).await {
                Some(Ok(n)) if n > 0 => {}
                // Closed or reset before any response byte.
                Some(_) => {
                    return Ok(Tried::Failed(
                        Failure::Broken,
                        nothing_yet && up.reused && plan.idempotent,
                    ))
                }
                None => return Ok(Tried::Failed(Failure::Timeout, false)),
            }
        }
    }
}

/// The route cookie to set when the request is served by backend `i`: none
/// when the client's valid cookie already names `i` (and a live backup).
fn route_cookie(g: &Generation, plan: &Plan, i: usize) -> Option<String> {
    let codec = g.codec.as_ref()?;
    let member = &g.pool.members[i];
    let stale = match &plan.choice.route {
        Some(r) => {
            r.primary != *member.id
                || r.backup
                    .as_deref()
                    .is_some_and(|b| g.pool.index_of(b).is_none())
        }
        None => true,
    };
    if !stale {
        return None;
    }
    let now_ms = g.pool.now_ms();
    let eject = Config::ms(g.config.health.eject_ms);
    let backup = plan
        .candidates
        .iter()
        .chain(&plan.choice.order)
        .copied()
        .find(|b| *b != i && usable(g, *b, now_ms, eject, plan.choice.bound))
        .map(|b| g.pool.members[b].id.to_string());
    Some(codec.set_cookie(&Route {
        primary: member.id.to_string(),
        backup,
    }))
}

/// How relaying a response body ended.
enum Relayed {
    Complete,
    Broken,
}

impl Client {
    /// Publishes the request to live views, when any watch.
    fn event(
        &self,
        shared: &Shared,
        plan: &Plan,
        status: u16,
        backend: Option<String>,
        since: Instant,
    ) {
        if let Some((method, path)) = &plan.described {
            let _ = shared.events.send(crate::RequestEvent {
                method: method.clone(),
                path: path.clone(),
                status,
                backend,
                ms: since.elapsed().as_secs_f64() * 1e3,
            });
        }
    }

    /// Passes a streamed request body from the client to the backend. A
    /// chunked body is re-chunked: the backend sees the balancer's framing
    /// only, never the client's extensions or trailers (a backend that
    /// parses those differently could find a second request in them).
    async fn stream_body(&mut self, up: &mut Conn, framing: Framing) -> Result<(), StreamError> {
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = Chunks::default();
        let mut staged = Vec::new();
        loop {
            let take = if framing == Framing::Chunked {
                let used = chunks
                    .scan(&self.buf, |data| {
                        let _ = write!(staged, "{:x}\r\n", data.len());
                        staged.extend_from_slice(data);
                        staged.extend_from_slice(b"\r\n");
                    })
                    .map_err(|_| StreamError::Malformed)?;
                if chunks.done() {
                    staged.extend_from_slice(b"0\r\n\r\n");
                }
                used
            } else {
                usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len())
            };
            let piece = if framing == Framing::Chunked {
                &staged[..]
            } else {
                &self.buf[..take]
            };
            if !piece.is_empty() {
                arm(&mut self.timer, Instant::now() + SEND_TIMEOUT);
                match timed(&mut self.timer, up.io.write_all(piece)).await {
                    Some(Ok(())) => {}
                    _ => return Err(StreamError::Backend),
                }
            }
            staged.clear();
            if take > 0 {
                self.buf.advance(take);
                left = left.saturating_sub(take as u64);
            }
            let done = match framing {
                Framing::Chunked => chunks.done(),
                _ => left == 0,
            };
            if done {
                return Ok(());
            }
            arm(&mut self.timer, Instant::now() + BODY_TIMEOUT);
            match timed(&mut self.timer, fill(&mut self.io, &mut self.buf)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return Err(StreamError::Client),
            }
        }
    }

    /// Sends the response head in `out` and relays the body after it.
    async fn relay(&mut self, up: &mut Conn, answer: &Answer, mut clock: Instant) -> Relayed {
        let read_timeout = SEND_TIMEOUT;
        let mut left = match answer.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = Chunks::default();
        loop {
            // Move what the backend sent into the client's buffer.
            match answer.framing {
                Framing::Empty => {}
                Framing::Length(_) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(up.buf.len());
                    self.out.extend_from_slice(&up.buf[..take]);
                    up.buf.advance(take);
                    left -= take as u64;
                }
                Framing::Chunked => {
                    let out = &mut self.out;
                    let scanned = if answer.dechunk {
                        chunks.scan(&up.buf, |d| out.extend_from_slice(d))
                    } else {
                        chunks.scan(&up.buf, |_| {})
                    };
                    let Ok(used) = scanned else {
                        return Relayed::Broken;
                    };
                    if !answer.dechunk {
                        self.out.extend_from_slice(&up.buf[..used]);
                    }
                    up.buf.advance(used);
                }
                Framing::Close => {
                    self.out.extend_from_slice(&up.buf);
                    up.buf.clear();
                }
            }
            let done = match answer.framing {
                Framing::Empty => true,
                Framing::Length(_) => left == 0,
                Framing::Chunked => chunks.done(),
                Framing::Close => false,
            };
            // Head and body go out together when the body is already here;
            // otherwise nothing is held back while waiting on the backend.
            if !self.out.is_empty() {
                if !self.send_out_by(clock + SEND_TIMEOUT).await {
                    return Relayed::Broken;
                }
                self.out.clear();
            }
            if done {
                return Relayed::Complete;
            }
            clock = Instant::now();
            arm(&mut self.timer, clock + read_timeout);
            match timed(&mut self.timer, fill(&mut up.io, &mut up.buf)).await {
                Some(Ok(n)) if n > 0 => clock = Instant::now(),
                // A close ends a close-delimited body; any other body is cut.
                Some(Ok(_)) if answer.framing == Framing::Close => return Relayed::Complete,
                _ => return Relayed::Broken,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, PolicyKind};

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
        crate::build_generation(c, None, Instant::now(), b"test secret").unwrap()
    }

    /// Plans `raw` from `peer`: the head written for upstream, and the plan
    /// or the balancer's own reply.
    fn planned(g: &Generation, raw: &str, peer: &str) -> (String, Result<Plan, Reply>) {
        let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let httparse::Status::Complete(n) = req.parse(raw.as_bytes()).unwrap() else {
            panic!("incomplete head");
        };
        let mut up = Vec::new();
        let peer = peer.parse().unwrap();
        let planned = plan_request(&mut up, &req, n, peer, g, false, Instant::now());
        (String::from_utf8(up).unwrap(), planned)
    }

    /// Plans `raw` from `peer`: the head sent upstream, or the status answered.
    fn plan(g: &Generation, raw: &str, peer: &str) -> Result<(String, Plan), u16> {
        let (up, planned) = planned(g, raw, peer);
        planned.map(|p| (up, p)).map_err(|r| r.status)
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
        let raw = "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\r\n";
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
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nTE: trailers\r\nUpgrade: h2c\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nCookie: SESSION=abc; TETHER_ROUTE=A..xyz; theme=dark\r\nCookie: TETHER_ROUTE=B..q\r\nAccept: */*\r\n\r\n";
        let (up, plan) = plan(&g, raw, "127.0.0.1").unwrap();
        assert_eq!(
            up,
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nCookie: SESSION=abc; theme=dark\r\nAccept: */*\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
        assert!(plan.keep_alive && plan.idempotent && plan.framing == Framing::Empty);
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
        let (up, p) = plan(&g, "PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n", "127.0.0.1").unwrap();
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
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
            ("GET example.com HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\n", 417),
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
            canned(&mut out, &r);
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
        let ambiguous =
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
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
}
