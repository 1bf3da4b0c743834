//! HTTP/2 to clients (the `h2` crate), HTTP/1.1 to backends over the same
//! pool: each stream is planned, routed and retried exactly like an
//! HTTP/1.1 request (the same [`plan_request`], policies and attempts), so
//! the route cookie, the owner and ip-hash pin a browser the same whichever
//! protocol it picked.
//!
//! Limits, each a defence against a known attack on HTTP/2 servers:
//! - concurrent streams per connection ([`MAX_STREAMS`]); more are refused
//!   with `REFUSED_STREAM` by `h2`;
//! - the header list size (`limits.max_header_bytes`): larger heads get 431,
//!   and CONTINUATION floods are cut by `h2`'s frame count limit;
//! - flow-control windows: the balancer reads a response from the backend
//!   only as fast as the client's window opens, so a slow reader holds at
//!   most a window's worth of memory per stream;
//! - rapid reset (CVE-2023-44487): `h2` answers more than
//!   [`MAX_PENDING_RESETS`] streams reset before they were accepted with
//!   `GOAWAY ENHANCE_YOUR_CALM`, and so does this loop when clients reset
//!   more than [`MAX_CLIENT_RESETS`] streams that had reached a backend and
//!   most streams end that way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Response};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use super::attempt::{Attempts, Failure, Step};
use super::backend::{await_head, send_head};
use super::refusal::Refusal;
use super::request::{plan_request, Origin, Plan};
use super::response::{no_shared_cache, passes, route_cookie, shape};
use super::{arm, fill, hooks, timed, InFlight, Io, SEND_TIMEOUT};
use crate::config::Config;
use crate::h1::{is, Chunks, Framing};
use crate::upstream::Conn;
use crate::{Generation, Shared};

/// Streams open at once on one connection (nginx's default is 128).
pub(crate) const MAX_STREAMS: u32 = 128;
/// Flow-control window per stream, bytes (the protocol's default).
const STREAM_WINDOW: u32 = 65_535;
/// Flow-control window per connection, bytes.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream beyond what the client's window
/// admits.
const SEND_BUFFER: usize = 64 * 1024;
/// Streams the client may reset before the server accepted them.
pub(crate) const MAX_PENDING_RESETS: usize = 20;
/// Accepted streams a client may reset before the connection is suspected
/// of rapid reset (and more than half of all its streams must end so).
pub(crate) const MAX_CLIENT_RESETS: usize = 100;

/// Serves one HTTP/2 connection until it closes, idles out or the balancer
/// stops.
pub(crate) async fn serve<S: Io + 'static>(
    shared: Arc<Shared>,
    io: S,
    peer: SocketAddr,
    tls: bool,
) {
    let (idle, max_head) = {
        let g = shared.current.load();
        (
            Config::ms(g.config.limits.header_timeout_ms),
            g.config.limits.max_header_bytes,
        )
    };
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    let mut conn = match tokio::time::timeout(idle, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(c)) => c,
        _ => return,
    };
    let origin = Origin {
        peer: peer.ip(),
        tls,
    };
    let resets = Arc::new(AtomicUsize::new(0));
    let mut accepted = 0usize;
    let mut streams = JoinSet::new();
    let stop = shared.stop.notified();
    let mut stop = std::pin::pin!(stop);
    stop.as_mut().enable();
    let mut closing = shared.stopping.load(Ordering::Relaxed);
    if closing {
        conn.graceful_shutdown();
    }
    let mut idle_at = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    accepted += 1;
                    streams.spawn(stream(shared.clone(), req, respond, origin, resets.clone()));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection error");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_at = tokio::time::Instant::now() + idle;
                }
            }
            () = tokio::time::sleep_until(idle_at), if streams.is_empty() && !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut stop, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
        }
        let reset = resets.load(Ordering::Relaxed);
        if reset > MAX_CLIENT_RESETS && reset * 2 > accepted {
            tracing::warn!(%peer, reset, accepted, "HTTP/2 client resets most of its streams (rapid reset?); closing the connection");
            conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            resets.store(0, Ordering::Relaxed);
            closing = true;
        }
    }
    // Streams still running lose their connection: dropping the set aborts them.
}

/// What one stream's request body is, as far as the backend is concerned.
enum Upload {
    /// None, or all of it read (and replayable).
    Whole,
    /// Larger than the retry buffer: what was read, then the rest streams.
    Streaming,
}

/// Serves one stream.
async fn stream(
    shared: Arc<Shared>,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    origin: Origin,
    resets: Arc<AtomicUsize>,
) {
    let mut timer = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
    if serve_stream(&shared, req, &mut respond, origin, &mut timer)
        .await
        .is_err()
    {
        resets.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a stream ended early: the client reset it or went away.
type Gone = ();

async fn serve_stream(
    shared: &Shared,
    req: http::Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
    origin: Origin,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<(), Gone> {
    let g = shared.current.load_full();
    let now = Instant::now();
    shared.totals.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, mut body) = req.into_parts();
    let limits = &g.config.limits;
    let body_deadline = now + Config::ms(limits.body_timeout_ms);

    // Read up to the retry buffer's size: a small body is sent with the
    // head and can be replayed on another backend.
    let mut held = BytesMut::new();
    let mut upload = Upload::Whole;
    if !body.is_end_stream() {
        arm(timer, body_deadline);
        loop {
            match timed(timer, body.data()).await {
                None => return refuse(respond, Refusal::BodyTooSlow),
                Some(None) => break,
                Some(Some(Ok(chunk))) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    held.extend_from_slice(&chunk);
                }
                Some(Some(Err(_))) => return Err(()),
            }
            if body.is_end_stream() {
                break;
            }
            if held.len() > limits.buffer_body_bytes {
                upload = Upload::Streaming;
                break;
            }
        }
    }

    // The request as an HTTP/1.1 head: `:authority` becomes `Host` (when the
    // client sent none), cookies split over several fields (RFC 9113
    // §8.2.3) are joined, and the body's framing is the balancer's.
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut fields: Vec<httparse::Header<'_>> = Vec::with_capacity(parts.headers.len() + 3);
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(a) = parts.uri.authority() {
            fields.push(httparse::Header {
                name: "host",
                value: a.as_str().as_bytes(),
            });
        }
    }
    let mut cookies: Vec<u8> = Vec::new();
    for (name, value) in &parts.headers {
        if name == http::header::COOKIE {
            if !cookies.is_empty() {
                cookies.extend_from_slice(b"; ");
            }
            cookies.extend_from_slice(value.as_bytes());
        } else if !(name == http::header::CONTENT_LENGTH && matches!(upload, Upload::Whole)) {
            fields.push(httparse::Header {
                name: name.as_str(),
                value: value.as_bytes(),
            });
        }
    }
    if !cookies.is_empty() {
        fields.push(httparse::Header {
            name: "cookie",
            value: &cookies,
        });
    }
    let length = held.len().to_string();
    match upload {
        Upload::Whole if !held.is_empty() => fields.push(httparse::Header {
            name: "content-length",
            value: length.as_bytes(),
        }),
        Upload::Streaming if !parts.headers.contains_key(http::header::CONTENT_LENGTH) => {
            fields.push(httparse::Header {
                name: "transfer-encoding",
                value: b"chunked",
            });
        }
        _ => {}
    }
    let mut head = Vec::with_capacity(1024);
    let planned = {
        let mut req = httparse::Request::new(&mut fields);
        req.method = Some(parts.method.as_str());
        req.path = Some(target);
        req.version = Some(1);
        let watched = shared.events.receiver_count() > 0;
        plan_request(&mut head, &req, 0, origin, &g, watched, now)
    };
    let plan = match planned {
        Ok(p) => p,
        Err(reply) => {
            if reply.refusal == Refusal::NoBackend {
                shared.totals.count_generated(reply.refusal);
            }
            return refuse(respond, reply.refusal);
        }
    };
    let replayable = matches!(upload, Upload::Whole);
    if replayable {
        head.extend_from_slice(&held);
    }
    let mut stream_body = (!replayable).then_some((held, body));
    forward(
        shared,
        &g,
        &plan,
        head,
        &mut stream_body,
        respond,
        timer,
        now,
    )
    .await
}

/// Tries backends for a planned stream and relays the answer.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    g: &Generation,
    plan: &Plan,
    head: Vec<u8>,
    stream_body: &mut Option<(BytesMut, RecvStream)>,
    respond: &mut SendResponse<Bytes>,
    timer: &mut Pin<Box<Sleep>>,
    now: Instant,
) -> Result<(), Gone> {
    let retry = &g.config.retry;
    let body_deadline = now + Config::ms(g.config.limits.body_timeout_ms);
    let replayable = stream_body.is_none();
    let mut attempts = Attempts::for_request(
        retry,
        plan.candidates.len(),
        now,
        replayable,
        plan.idempotent,
    );
    let failure = loop {
        let started = if attempts.untried() {
            now
        } else {
            Instant::now()
        };
        let (slot, fresh, wait) = match attempts.next(started) {
            Step::Try {
                slot,
                fresh,
                retry,
                wait,
            } => {
                if retry {
                    shared.totals.retries.fetch_add(1, Ordering::Relaxed);
                }
                (slot, fresh, wait)
            }
            Step::GiveUp(f) => break f,
        };
        let i = plan.candidates[slot];
        let member = &g.pool.members[i];
        member.stats.requests.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight::new(&member.stats);
        let set_cookie = route_cookie(g, plan, i);
        let work = async {
            let connect = Config::ms(retry.connect_timeout_ms);
            let mut up = match member
                .stats
                .conns
                .checkout(member.addr, started, connect, fresh)
                .await
            {
                Ok(c) => c,
                Err(e) => return Tried::Unreachable(e),
            };
            arm(timer, started + wait);
            if let Err((f, unsent)) = send_head(&mut up, timer, &head, plan.idempotent).await {
                return Tried::Failed(f, unsent);
            }
            if let Some((held, body)) = stream_body.take() {
                match upload(&mut up, plan.framing, held, body, timer, body_deadline).await {
                    Ok(()) => arm(timer, Instant::now() + wait),
                    Err(Upstream::Client) => return Tried::Gone,
                    Err(Upstream::Slow) => return Tried::Slow,
                    Err(Upstream::Backend) => return Tried::Failed(Failure::Broken, false),
                }
            }
            let head = await_head(&mut up, timer, plan.idempotent, |res| {
                h2_head(res, plan, set_cookie.as_deref())
            })
            .await;
            match head {
                Ok((response, framing, reusable)) => {
                    Tried::Answered(up, response, framing, reusable)
                }
                Err((f, unsent)) => Tried::Failed(f, unsent),
            }
        };
        // While a backend works on it, the client may reset the stream:
        // the work stops at once (rapid reset costs the backends nothing more).
        let tried = tokio::select! {
            t = work => t,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return Err(()),
        };
        match tried {
            Tried::Answered(mut up, response, framing, reusable) => {
                let answered = Instant::now();
                let status = response.status().as_u16();
                hooks::answered(
                    shared,
                    g,
                    i,
                    status,
                    (started, answered),
                    set_cookie.is_some(),
                );
                let node = plan.described.as_ref().and_then(|_| {
                    response
                        .headers()
                        .get("x-tether-node")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
                hooks::event(shared, plan, status, node, now);
                let end = framing == Framing::Empty;
                let mut send = respond.send_response(response, end).map_err(|_| ())?;
                let complete = end || relay(&mut up, framing, &mut send, timer).await?;
                if complete && reusable && up.buf.is_empty() {
                    member.stats.conns.checkin(up, Instant::now());
                }
                return Ok(());
            }
            Tried::Unreachable(e) => {
                hooks::connect_failed(shared, g, i, &e);
                attempts.connect_failed();
            }
            Tried::Failed(failure, maybe_unsent) => {
                if attempts.failed(failure, maybe_unsent) {
                    hooks::failed(shared, g, i, failure, wait);
                }
            }
            Tried::Slow => return refuse(respond, Refusal::BodyTooSlow),
            Tried::Gone => return Err(()),
        }
    };
    let refusal = failure.refusal();
    shared.totals.count_generated(refusal);
    hooks::event(shared, plan, refusal.status(), None, now);
    refuse(respond, refusal)
}

/// What became of one try.
// Lives on the stack for one step; boxing the large variant would cost an
// allocation per stream.
#[allow(clippy::large_enum_variant)]
enum Tried {
    Answered(Conn, Response<()>, Framing, bool),
    Unreachable(crate::upstream::ConnectError),
    Failed(Failure, bool),
    /// The upload outlived `limits.body_timeout_ms`.
    Slow,
    /// The client went away during the upload.
    Gone,
}

/// The response head for an HTTP/2 client: the backend's fields that pass
/// (no connection-specific ones: HTTP/2 forbids them), the route cookie,
/// and the framing of the body to read from the backend. `None` when the
/// head cannot be passed on (no `101` over HTTP/2, a field HTTP/2 cannot carry).
fn h2_head(
    res: &httparse::Response<'_, '_>,
    plan: &Plan,
    set_cookie: Option<&str>,
) -> Option<(Response<()>, Framing, bool)> {
    let shape = shape(res, plan).ok()?;
    if shape.status == 101 {
        return None;
    }
    let mut response = Response::builder().status(shape.status).body(()).ok()?;
    let headers = response.headers_mut();
    let mut cache_control: Vec<&[u8]> = Vec::new();
    for h in res.headers.iter() {
        if !passes(h.name, &shape.tokens) || is(h.name, "content-length") {
            continue;
        }
        if set_cookie.is_some() && is(h.name, "cache-control") {
            cache_control.push(h.value);
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A value HTTP/2 cannot carry is dropped, not the response.
        if let Ok(v) = HeaderValue::from_bytes(h.value) {
            headers.append(name, v);
        }
    }
    if let Framing::Length(n) = shape.framing {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(cookie) = set_cookie {
        headers.append(
            http::header::SET_COOKIE,
            HeaderValue::from_str(cookie).ok()?,
        );
        let existing = (!cache_control.is_empty()).then(|| cache_control.join(&b", "[..]));
        let value = HeaderValue::from_bytes(&no_shared_cache(existing.as_deref())).ok()?;
        headers.insert(http::header::CACHE_CONTROL, value);
    }
    Some((response, shape.framing, shape.reusable))
}

/// Why a streamed upload stopped.
enum Upstream {
    Client,
    Slow,
    Backend,
}

/// Sends what was read of a large body, then the rest as the client sends
/// it, chunked unless the client gave a length. Each DATA frame's window
/// is given back only once its bytes are written to the backend, so a slow
/// backend slows the client instead of filling the balancer's memory.
async fn upload(
    up: &mut Conn,
    framing: Framing,
    held: BytesMut,
    mut body: RecvStream,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> Result<(), Upstream> {
    use tokio::io::AsyncWriteExt;
    let chunked = framing == Framing::Chunked;
    let mut piece = held.freeze();
    loop {
        if !piece.is_empty() {
            arm(timer, Instant::now() + SEND_TIMEOUT);
            let written = timed(timer, async {
                if chunked {
                    up.io
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                }
                up.io.write_all(&piece).await?;
                if chunked {
                    up.io.write_all(b"\r\n").await?;
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            if !matches!(written, Some(Ok(()))) {
                return Err(Upstream::Backend);
            }
        }
        if body.is_end_stream() {
            break;
        }
        arm(timer, deadline);
        match timed(timer, body.data()).await {
            None => return Err(Upstream::Slow),
            Some(None) => break,
            Some(Some(Ok(chunk))) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                piece = chunk;
            }
            Some(Some(Err(_))) => return Err(Upstream::Client),
        }
    }
    if chunked {
        arm(timer, Instant::now() + SEND_TIMEOUT);
        if !matches!(
            timed(timer, up.io.write_all(b"0\r\n\r\n")).await,
            Some(Ok(()))
        ) {
            return Err(Upstream::Backend);
        }
    }
    Ok(())
}

/// Relays a response body to the client as its window allows. `Ok(true)`:
/// the whole body went; `Ok(false)`: the backend broke off (the stream is
/// reset, so the client sees it incomplete).
async fn relay(
    up: &mut Conn,
    framing: Framing,
    send: &mut SendStream<Bytes>,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<bool, Gone> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunks::default();
    loop {
        let mut data = BytesMut::new();
        match framing {
            Framing::Empty => {}
            Framing::Length(_) => {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(up.buf.len());
                data = up.buf.split_to(take);
                left -= take as u64;
            }
            Framing::Chunked => {
                let Ok(used) = chunks.scan(&up.buf, |d| data.extend_from_slice(d)) else {
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return Ok(false);
                };
                up.buf.advance(used);
            }
            Framing::Close => data = up.buf.split(),
        }
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks.done(),
            Framing::Close => false,
        };
        send_flow(send, data.freeze(), done, timer).await?;
        if done {
            return Ok(true);
        }
        arm(timer, Instant::now() + SEND_TIMEOUT);
        match timed(timer, fill(&mut up.io, &mut up.buf)).await {
            Some(Ok(n)) if n > 0 => {}
            Some(Ok(_)) if framing == Framing::Close => {
                send_flow(send, Bytes::new(), true, timer).await?;
                return Ok(true);
            }
            _ => {
                send.send_reset(Reason::INTERNAL_ERROR);
                return Ok(false);
            }
        }
    }
}

/// Sends `data` as the client's flow-control window opens.
async fn send_flow(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<(), Gone> {
    let mut ended = false;
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        arm(timer, Instant::now() + SEND_TIMEOUT);
        let granted = timed(timer, std::future::poll_fn(|cx| send.poll_capacity(cx))).await;
        let n = match granted {
            Some(Some(Ok(n))) => n,
            // The client stopped reading (or left).
            _ => {
                send.send_reset(Reason::CANCEL);
                return Err(());
            }
        };
        if n == 0 {
            continue;
        }
        let piece = data.split_to(n.min(data.len()));
        ended = end && data.is_empty();
        send.send_data(piece, ended).map_err(|_| ())?;
    }
    if end && !ended {
        // No data was left to carry the end flag.
        send.send_data(Bytes::new(), true).map_err(|_| ())?;
    }
    Ok(())
}

/// Answers a stream with the balancer's own response.
fn refuse(respond: &mut SendResponse<Bytes>, refusal: Refusal) -> Result<(), Gone> {
    let response = Response::builder()
        .status(refusal.status())
        .header("content-type", "text/plain; charset=utf-8")
        .body(())
        .map_err(|_| ())?;
    let mut send = respond.send_response(response, false).map_err(|_| ())?;
    send.send_data(Bytes::from_static(refusal.body().as_bytes()), true)
        .map_err(|_| ())
}
