//! The async side of a node: carries the core's messages over TCP, feeds
//! it replies, requests, membership and clock ticks. Every decision is the
//! core's (`crate::core`); this file only moves bytes.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tether_core::Timestamp;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::core::{Core, Failure, Input, Output};
use crate::peer::Peer;
use crate::wire::{self, Envelope, Frame, Op, Outcome, Refusal, Request, Response};

/// How often the core's clock ticks (retries, deadlines, repair, expiry).
pub(crate) const TICK: Duration = Duration::from_millis(10);

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One node's connections, waiting callers and core.
pub(crate) struct Driver {
    pub(crate) core: Mutex<Core>,
    me: String,
    secret: Vec<u8>,
    local_ip: IpAddr,
    op_timeout: Duration,
    call_timeout: Duration,
    addrs: RwLock<HashMap<String, SocketAddr>>,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Result<Outcome, Refusal>>>>,
    answers: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next: AtomicU64,
    /// Bytes of replication messages sent (owner to holders).
    pub(crate) bytes: AtomicU64,
    /// Bytes of transfer messages sent.
    pub(crate) transfer_bytes: AtomicU64,
    /// Writes answered, and the time they took in µs (the owner's apply
    /// and the holders' acknowledgements, or the hop to the owner).
    pub(crate) writes_timed: AtomicU64,
    pub(crate) write_us: AtomicU64,
    pub(crate) left: tokio::sync::watch::Sender<bool>,
    /// Set when the store is dropped: connections close with it.
    closed: tokio::sync::watch::Sender<bool>,
    /// Peers that refused a connection, for the membership layer to probe.
    hints: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Driver {
    pub(crate) fn new(
        core: Core,
        secret: Vec<u8>,
        local_ip: IpAddr,
        ack_timeout: Duration,
        hints: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            hints,
            me: core.me().name.clone(),
            core: Mutex::new(core),
            secret,
            local_ip,
            op_timeout: ack_timeout * 3,
            call_timeout: ack_timeout,
            addrs: RwLock::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
            transfer_bytes: AtomicU64::new(0),
            writes_timed: AtomicU64::new(0),
            write_us: AtomicU64::new(0),
            left: tokio::sync::watch::channel(false).0,
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    /// A peer's view differs from this node's. If a member crashed and only
    /// some nodes noticed yet, probing every member now lets this node
    /// notice too, instead of waiting for its own failure detector; views
    /// agree again sooner and writes wait less.
    fn views_differ(&self) {
        let peers = lock(&self.core).view().names();
        for p in peers.into_iter().filter(|p| *p != self.me) {
            let _ = self.hints.send(p);
        }
    }

    /// Closes every connection (the store was dropped, as a crash would).
    pub(crate) fn close(&self) {
        let _ = self.closed.send(true);
        lock(&self.peers).clear();
    }

    pub(crate) fn set_addrs(&self, addrs: HashMap<String, SocketAddr>) {
        *self
            .addrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addrs;
    }

    fn peer(&self, name: &str) -> Option<Arc<Peer>> {
        let addr = *self
            .addrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)?;
        let mut peers = lock(&self.peers);
        Some(
            peers
                .entry(addr)
                .or_insert_with(|| Arc::new(Peer::new(addr, Some(self.local_ip))))
                .clone(),
        )
    }

    /// Runs `input` through the core and carries out what it says, until
    /// nothing is left that can be done without waiting.
    pub(crate) fn feed(self: &Arc<Self>, input: Input) {
        let mut queue = VecDeque::from([input]);
        let mut out = Vec::new();
        while let Some(input) = queue.pop_front() {
            lock(&self.core).handle(Timestamp::now(), input, &mut out);
            for o in out.drain(..) {
                match o {
                    Output::Send { to, token, env } => match self.peer(&to) {
                        // Not in the address book: not a member any more.
                        None => queue.push_back(Input::Reply {
                            token,
                            reply: Err(Failure::Refused),
                        }),
                        Some(peer) => self.spawn_call(peer, token, env, to),
                    },
                    Output::Respond { token, response } => {
                        if matches!(response, Response::WrongView) {
                            self.views_differ();
                        }
                        if let Some(tx) = lock(&self.answers).remove(&token) {
                            let _ = tx.send(response);
                        }
                    }
                    Output::Done { token, result } => {
                        if let Some(tx) = lock(&self.waiting).remove(&token) {
                            let _ = tx.send(result);
                        }
                    }
                    Output::Left => {
                        let _ = self.left.send(true);
                    }
                }
            }
        }
    }

    fn spawn_call(self: &Arc<Self>, peer: Arc<Peer>, token: u64, env: Envelope, env_to: String) {
        let driver = self.clone();
        tokio::spawn(async move {
            let transfer = matches!(env.body, Request::Transfer(_));
            let timeout = if transfer {
                driver.call_timeout.max(Duration::from_secs(10))
            } else {
                driver.call_timeout
            };
            let reply = match peer.call(&driver.me, &driver.secret, &env, timeout).await {
                Ok((Response::WrongView, _)) => {
                    driver.views_differ();
                    Ok(Response::WrongView)
                }
                Ok((response, bytes)) => {
                    let counter = match env.body {
                        Request::Replicate(_) => Some(&driver.bytes),
                        Request::Transfer(_) => Some(&driver.transfer_bytes),
                        Request::Forward(_) => None,
                    };
                    if let Some(c) = counter {
                        c.fetch_add(bytes as u64, Ordering::Relaxed);
                    }
                    Ok(response)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "message to a peer failed");
                    if e.failure() == Failure::Refused {
                        let _ = driver.hints.send(env_to.clone());
                    }
                    Err(e.failure())
                }
            };
            driver.feed(Input::Reply { token, reply });
        });
    }

    /// Runs a client's operation and waits for its result.
    pub(crate) async fn call(self: &Arc<Self>, op: Op) -> Result<Outcome, Refusal> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(token, tx);
        let write = !matches!(op, Op::Load(..));
        let started = std::time::Instant::now();
        self.feed(Input::Client { token, op });
        match tokio::time::timeout(self.op_timeout, rx).await {
            Ok(Ok(result)) => {
                if let Err(Refusal::Unavailable(why)) = &result {
                    tracing::info!(%why, "session operation refused");
                }
                if write && result.is_ok() {
                    self.writes_timed.fetch_add(1, Ordering::Relaxed);
                    self.write_us
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                result
            }
            _ => {
                lock(&self.waiting).remove(&token);
                Err(Refusal::Unavailable(
                    "the cluster did not answer in time".into(),
                ))
            }
        }
    }
}

/// Ticks the core's clock.
pub(crate) async fn tick(driver: Arc<Driver>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        driver.feed(Input::Tick);
    }
}

/// Accepts peers' connections and feeds their requests to the core.
pub(crate) async fn serve(driver: Arc<Driver>, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(driver.clone(), stream, peer));
    }
}

async fn connection(driver: Arc<Driver>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let mut conn = wire::framed(stream);
    let hello = tokio::time::timeout(
        Duration::from_secs(5),
        wire::server_handshake(&mut conn, &driver.me, &driver.secret),
    )
    .await;
    match hello {
        Ok(Ok(_)) => {}
        // A membership probe connects and closes at once.
        Ok(Err(wire::WireError::Closed)) => return,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "replication peer refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "replication handshake timed out");
            return;
        }
    }
    let (mut sink, mut stream) = StreamExt::split::<bytes::Bytes>(conn);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4096);
    let mut closed = driver.closed.subscribe();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                return;
            }
        }
    });
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = closed.wait_for(|c| *c) => None,
        };
        let Some(frame) = frame else { break };
        let bytes = match frame {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad frame from peer; closing the connection");
                break;
            }
        };
        let frame: Frame<Envelope> = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed frame from peer; closing the connection");
                break;
            }
        };
        if frame.v != wire::VERSION {
            tracing::warn!(%peer, version = frame.v, "unsupported protocol version; closing");
            break;
        }
        if tx.is_closed() {
            // The writer died (the socket failed): answers could not be
            // sent, so stop taking requests on this connection.
            break;
        }
        let token = driver.next.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, mut answer) = oneshot::channel();
        lock(&driver.answers).insert(token, answer_tx);
        driver.feed(Input::Request {
            token,
            env: frame.body,
        });
        let id = frame.id;
        let respond = move |tx: tokio::sync::mpsc::Sender<Vec<u8>>, body: Response| async move {
            if let Ok(bytes) = serde_json::to_vec(&Frame {
                v: wire::VERSION,
                id,
                body,
            }) {
                let _ = tx.send(bytes).await;
            }
        };
        match answer.try_recv() {
            Ok(body) => respond(tx.clone(), body).await,
            Err(_) => {
                // Answered later (a forwarded write waiting for its holders).
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(body) = answer.await {
                        respond(tx, body).await;
                    }
                });
            }
        }
    }
    drop(tx);
    if *closed.borrow() {
        // The store is gone: cut the connection now, whatever answers are
        // still owed on it (a crashed node owes nothing).
        writer.abort();
    }
    let _ = writer.await;
}
