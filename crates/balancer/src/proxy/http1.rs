//! The HTTP/1.1 connection loop: read a head, plan it, try backends, relay
//! the answer, repeat while the connection is kept.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

use super::attempt::{Attempts, Failure, Step};
use super::backend::{await_head, send_head};
use super::hooks;
use super::refusal::{Refusal, Reply};
use super::request::{plan_request, Origin, Plan};
use super::response::{plan_response, route_cookie, Answer};
use super::{arm, fill, send_by, timed, InFlight, Io, LINGER, READ_SPACE, SEND_TIMEOUT};
use crate::config::Config;
use crate::h1::{self, Framing};
use crate::upstream::Conn;
use crate::{Generation, Shared};

/// The HTTP/2 connection preface: a client speaking h2c with prior knowledge.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What became of one try on a backend.
enum Tried {
    /// The response head arrived and is in `Client::out`.
    Answered(Answer),
    /// Nothing usable came back; `bool`: the request may not have reached
    /// the application (a kept-alive connection the backend had closed).
    Failed(Failure, bool),
}

/// Why a streamed request body could not be passed on.
pub(super) enum StreamError {
    Client,
    /// The whole upload took longer than `limits.body_timeout_ms`.
    Slow,
    Backend,
    Malformed,
}

/// Whether to keep reading requests on a connection.
pub(crate) enum Next {
    KeepAlive,
    Close,
    /// Close after draining what the client still sends.
    Linger,
    /// The client opened with the HTTP/2 preface (h2c prior knowledge).
    Http2,
}

/// One client connection.
pub(crate) struct Client<S> {
    pub(super) io: S,
    pub(super) origin: Origin,
    /// Received from the client, not yet consumed.
    pub(super) buf: BytesMut,
    /// To the client.
    pub(super) out: Vec<u8>,
    /// To the backend.
    pub(super) up: Vec<u8>,
    pub(super) timer: Pin<Box<Sleep>>,
    /// Requests served on this connection.
    served: u64,
}

/// Serves one client connection until it closes, fails or the balancer
/// stops. Returns the stream and what it had read when the client turned
/// out to speak HTTP/2 (`h2c`, when enabled).
pub(crate) async fn serve<S: Io>(
    shared: Arc<Shared>,
    io: S,
    peer: SocketAddr,
    tls: bool,
) -> Option<(S, BytesMut)> {
    let mut c = Client {
        io,
        origin: Origin {
            peer: peer.ip(),
            tls,
        },
        buf: BytesMut::with_capacity(READ_SPACE),
        // Grown on first use and kept for the connection's next requests:
        // a connection that idles, uploads slowly or tunnels never needs them.
        out: Vec::new(),
        up: Vec::new(),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        served: 0,
    };
    loop {
        match c.exchange(&shared).await {
            Next::KeepAlive => c.served += 1,
            Next::Close => {
                let _ = c.io.shutdown().await;
                return None;
            }
            Next::Linger => {
                c.linger().await;
                return None;
            }
            Next::Http2 => return Some((c.io, c.buf)),
        }
    }
}

impl<S: Io> Client<S> {
    /// Sends `self.out`, giving up after [`SEND_TIMEOUT`].
    async fn send_out(&mut self) -> bool {
        self.send_out_by(Instant::now() + SEND_TIMEOUT).await
    }

    /// Sends `self.out`, giving up at `deadline`.
    pub(super) async fn send_out_by(&mut self, deadline: Instant) -> bool {
        send_by(&mut self.io, &mut self.timer, &self.out, deadline).await
    }

    /// Answers with the balancer's own response.
    async fn answer(&mut self, r: &Reply) -> Next {
        r.write(&mut self.out);
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
        let (header_timeout, max_head, h2c) = {
            let g = shared.current.load();
            (
                Config::ms(g.config.limits.header_timeout_ms),
                g.config.limits.max_header_bytes,
                g.config.h2c && !self.origin.tls,
            )
        };
        arm(&mut self.timer, Instant::now() + header_timeout);
        // A head is parsed again only when a line has ended since the last
        // try: a client dribbling bytes must not make parsing quadratic.
        let mut parsed_upto = 0;
        let (plan, g, now) = loop {
            if h2c && self.served == 0 && self.buf.starts_with(H2_PREFACE) {
                return Next::Http2;
            }
            let fresh_line = self.buf[parsed_upto..].contains(&b'\n');
            let preface_pending = h2c
                && self.served == 0
                && self.buf.len() < H2_PREFACE.len()
                && H2_PREFACE.starts_with(&self.buf);
            if !self.buf.is_empty()
                && !preface_pending
                && (fresh_line || self.buf.len() >= max_head)
            {
                parsed_upto = self.buf.len();
                // The parsed fields (3 KiB) live in this block only, never
                // across an await: they would otherwise sit in every
                // connection's future, idle WebSockets included.
                let outcome = {
                    let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
                    let mut req = httparse::Request::new(&mut fields);
                    let parsed = req.parse(&self.buf);
                    match parsed {
                        Ok(httparse::Status::Complete(n)) => {
                            let g = shared.current.load_full();
                            let watched = shared.events.receiver_count() > 0;
                            let now = Instant::now();
                            Some(
                                plan_request(&mut self.up, &req, n, self.origin, &g, watched, now)
                                    .map(|plan| (plan, g, now))
                                    .map_err(|r| (r, n)),
                            )
                        }
                        Ok(httparse::Status::Partial) if self.buf.len() < max_head => None,
                        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                            Some(Err((Reply::early(Refusal::HeadTooLarge), 0)))
                        }
                        Err(_) => Some(Err((Reply::early(Refusal::MalformedHead), 0))),
                    }
                };
                match outcome {
                    Some(Ok(planned)) => break planned,
                    Some(Err((r, head_len))) => {
                        // The head is answered; a kept connection reads on after it.
                        self.buf.advance(head_len);
                        shared.totals.requests.fetch_add(1, Ordering::Relaxed);
                        if r.refusal == Refusal::NoBackend {
                            shared.totals.count_generated(r.refusal);
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
                None => return self.answer(&Reply::early(Refusal::HeadTooSlow)).await,
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
        let body_deadline = now + Config::ms(config.limits.body_timeout_ms);
        // Small bodies are buffered behind the head (one write, and a retry
        // can resend them); larger or chunked ones stream once.
        let buffered = match self.buffer_body(&plan, config, body_deadline).await {
            Ok(waited) => {
                // Time spent receiving the body is not the backends' time.
                if waited {
                    now = Instant::now();
                }
                true
            }
            Err(Some(next)) => return next,
            Err(None) => false,
        };
        let retry = &config.retry;
        let mut attempts =
            Attempts::for_request(retry, plan.candidates.len(), now, buffered, plan.idempotent);
        let connect_timeout = Config::ms(retry.connect_timeout_ms);
        let failure = loop {
            let at = if attempts.untried() {
                now
            } else {
                Instant::now()
            };
            let (slot, fresh, is_retry, wait) = match attempts.next(at) {
                Step::Try {
                    slot,
                    fresh,
                    retry,
                    wait,
                } => (slot, fresh, retry, wait),
                Step::GiveUp(f) => break f,
            };
            let started = at;
            if is_retry {
                shared.totals.retries.fetch_add(1, Ordering::Relaxed);
            }
            let i = plan.candidates[slot];
            let member = &g.pool.members[i];
            let stats = &member.stats;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            // Connect before sending anything: a backend that cannot be
            // reached has received nothing, so even a streamed body can go
            // to the next one.
            let mut up = match stats
                .conns
                .checkout(member.addr, started, connect_timeout, fresh)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    hooks::connect_failed(shared, g, i, &e);
                    attempts.connect_failed();
                    continue;
                }
            };
            let guard = InFlight::new(stats);
            let set_cookie = route_cookie(g, &plan, i);
            let stopping = shared.stopping.load(Ordering::Relaxed);
            let tried = self
                .try_once(
                    &mut up,
                    &plan,
                    buffered,
                    (started, wait, body_deadline),
                    set_cookie.as_deref(),
                    stopping,
                )
                .await;
            let tried = match tried {
                Ok(t) => t,
                Err(StreamError::Client) => return Next::Close,
                Err(StreamError::Slow) => {
                    return self.answer(&plan.reply(Refusal::BodyTooSlow, false)).await;
                }
                Err(StreamError::Malformed) => {
                    return self
                        .answer(&plan.reply(Refusal::MalformedChunks, false))
                        .await;
                }
                Err(StreamError::Backend) => Tried::Failed(Failure::Broken, false),
            };
            match tried {
                Tried::Answered(answer) => {
                    let answered = Instant::now();
                    let times = (started, answered);
                    hooks::answered(shared, g, i, answer.status, times, set_cookie.is_some());
                    hooks::event(shared, &plan, answer.status, answer.node.clone(), now);
                    if answer.tunnel {
                        let idle = Config::ms(config.limits.tunnel_timeout_ms);
                        self.tunnel(up, stats, idle).await;
                        drop(guard);
                        return Next::Close;
                    }
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
                Tried::Failed(failure, maybe_unsent) => {
                    if !attempts.failed(failure, maybe_unsent) {
                        tracing::debug!(backend = %member.id, "kept-alive connection was closed; retrying on a new one");
                        continue;
                    }
                    hooks::failed(shared, g, i, failure, wait);
                }
            }
        };
        let refusal = failure.refusal();
        shared.totals.count_generated(refusal);
        // A streamed body that was not read to its end leaves the
        // connection mid-message.
        let close = !plan.keep_alive || !buffered;
        hooks::event(shared, &plan, refusal.status(), None, now);
        self.answer(&plan.reply(refusal, close)).await
    }

    /// Reads a body small enough to buffer behind the head in `up`.
    /// `Ok(waited)`: buffered (it had to wait for it); `Err(None)`: it will
    /// stream; `Err(Some(next))`: the exchange ended.
    async fn buffer_body(
        &mut self,
        plan: &Plan,
        config: &Config,
        deadline: Instant,
    ) -> Result<bool, Option<Next>> {
        let limit = config.limits.buffer_body_bytes as u64;
        match plan.framing {
            Framing::Empty => {
                self.buf.advance(plan.head_len);
                Ok(false)
            }
            Framing::Length(n) if n <= limit => {
                let total = plan.head_len + usize::try_from(n).unwrap_or(usize::MAX);
                let waited = self.buf.len() < total;
                if waited {
                    if plan.expect_continue && !self.continue_100().await {
                        return Err(Some(Next::Close));
                    }
                    // One deadline for the whole body: a client trickling a
                    // byte at a time must not hold its buffer for ever.
                    arm(&mut self.timer, deadline);
                    while self.buf.len() < total {
                        match timed(&mut self.timer, fill(&mut self.io, &mut self.buf)).await {
                            Some(Ok(n)) if n > 0 => {}
                            Some(_) => return Err(Some(Next::Close)),
                            None => {
                                let r = plan.reply(Refusal::BodyTooSlow, false);
                                return Err(Some(self.answer(&r).await));
                            }
                        }
                    }
                }
                self.up.extend_from_slice(&self.buf[plan.head_len..total]);
                self.buf.advance(total);
                Ok(waited)
            }
            _ => {
                self.buf.advance(plan.head_len);
                Err(None)
            }
        }
    }

    /// Sends `100 Continue` to a client waiting for it before its body.
    pub(super) async fn continue_100(&mut self) -> bool {
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
        (started, wait, body_deadline): (Instant, Duration, Instant),
        set_cookie: Option<&str>,
        stopping: bool,
    ) -> Result<Tried, StreamError> {
        arm(&mut self.timer, started + wait);
        if let Err((f, unsent)) = send_head(up, &mut self.timer, &self.up, plan.idempotent).await {
            return Ok(Tried::Failed(f, unsent));
        }
        if !buffered {
            if plan.expect_continue && !self.continue_100().await {
                return Err(StreamError::Client);
            }
            self.stream_body(up, plan.framing, body_deadline).await?;
            // The wait for the answer starts when the upload ends.
            arm(&mut self.timer, Instant::now() + wait);
        }
        let out = &mut self.out;
        let answered = await_head(up, &mut self.timer, plan.idempotent, |res| {
            plan_response(out, res, plan, set_cookie, stopping).ok()
        })
        .await;
        Ok(match answered {
            Ok(answer) => Tried::Answered(answer),
            Err((f, unsent)) => Tried::Failed(f, unsent),
        })
    }
}

/// How relaying a response body ended.
pub(super) enum Relayed {
    Complete,
    Broken,
}
