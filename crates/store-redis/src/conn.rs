//! Connections for the three deployments, re-established after failures,
//! and set up for the near cache (RESP3, `CLIENT TRACKING`) when it is on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, Pipeline, ProtocolVersion,
    RedisError, RedisFuture, Value,
};
use tokio::sync::Mutex;

use tether_core::SessionId;

use crate::cache::NearCache;

/// Where connections come from.
pub(crate) enum Source {
    /// One server.
    Single(ConnectionInfo),
    /// The master named by Sentinel, resolved at every (re)connect.
    Sentinel {
        addrs: Vec<ConnectionAddr>,
        master: String,
        user: Option<String>,
        pass: Option<String>,
        db: Option<i64>,
    },
    /// A Redis Cluster (seed nodes, username, password); the driver follows
    /// MOVED/ASK and refreshes the topology.
    Cluster(Vec<String>, Option<String>, Option<String>),
}

/// A live connection of either kind.
#[derive(Clone)]
pub(crate) enum Live {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Live {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Live {
    /// Sends `pipe`, every command of which concerns session `id`, and
    /// returns every answer (errors included, as values). On a cluster it
    /// goes to the master of the session's slot: the driver would otherwise
    /// route a pipeline by its first command that looks keyed, and it takes
    /// `CLIENT CACHING`'s argument for a key.
    pub(crate) async fn exec(
        &mut self,
        pipe: &Pipeline,
        id: &SessionId,
    ) -> Result<Vec<Value>, RedisError> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipe, 0, pipe.len()).await,
            Self::Cluster(c) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(slot(id.encode().as_str()), SlotAddr::Master);
                c.route_pipeline(
                    pipe.clone(),
                    0,
                    pipe.len(),
                    SingleNodeRoutingInfo::SpecificNode(route),
                )
                .await
            }
        }
    }
}

/// The cluster slot of a hash tag (CRC16/XMODEM mod 16384).
pub(crate) fn slot(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// Connections blocked by `WAIT` serve nothing else meanwhile: writes that
/// must reach replicas take turns over this many.
const WAITED: usize = 8;

/// How often tracking connections are checked (see [`Connector::heartbeat`]).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a heartbeat may take before the connection is given up.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Hands out shared connections, making them when there are none, and
/// forgets them after a connection-level failure so the next call
/// reconnects (and, for Sentinel, asks the sentinels where the master is).
pub(crate) struct Connector {
    source: Source,
    sentinel: Mutex<Option<SentinelClient>>,
    current: Mutex<Option<Live>>,
    /// Connections for writes followed by `WAIT`, which blocks the
    /// connection it is sent on: other requests must not queue behind it.
    waited: Vec<Mutex<Option<Live>>>,
    /// When the last slow connection attempt failed: for a short while
    /// after, callers fail at once instead of queueing for their own
    /// attempt. A quick refusal is not remembered: trying again costs
    /// nothing, and the first request after Redis is back must succeed.
    failed_at: std::sync::Mutex<Option<Instant>>,
    connect_timeout: Duration,
    response_timeout_ms: AtomicU64,
    /// The near cache the connections report invalidations to.
    tracking: std::sync::OnceLock<Arc<NearCache>>,
}

impl Connector {
    pub(crate) fn new(
        source: Source,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            sentinel: Mutex::new(None),
            current: Mutex::new(None),
            waited: (0..WAITED).map(|_| Mutex::new(None)).collect(),
            failed_at: std::sync::Mutex::new(None),
            connect_timeout,
            response_timeout_ms: AtomicU64::new(tether_core::millis(response_timeout)),
            tracking: std::sync::OnceLock::new(),
        })
    }

    /// Makes the response timeout at least `min` (a `WAIT` must be able to
    /// outlast its own timeout). Applies to connections made afterwards.
    pub(crate) fn raise_response_timeout(&self, min: Duration) {
        let ms = tether_core::millis(min);
        self.response_timeout_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms.load(Ordering::Relaxed))
    }

    /// Turns client-side caching on for connections made from now on (set
    /// before the first use).
    pub(crate) fn track(&self, cache: Arc<NearCache>) {
        let _ = self.tracking.set(cache);
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster(..))
    }

    /// The shared connection, connecting if needed.
    pub(crate) async fn get(&self) -> Result<Live, RedisError> {
        self.get_slot(&self.current).await
    }

    /// A connection for writes that are followed by `WAIT`, chosen by
    /// `affinity` (a session's hash): one session always uses the same one,
    /// so its reads are tracked on the connection its writes use (`NOLOOP`
    /// then keeps this node's own writes from invalidating its cache).
    pub(crate) async fn get_waited(&self, affinity: usize) -> Result<Live, RedisError> {
        self.get_slot(&self.waited[affinity % WAITED]).await
    }

    async fn get_slot(&self, slot: &Mutex<Option<Live>>) -> Result<Live, RedisError> {
        let mut current = slot.lock().await;
        if let Some(live) = current.as_ref() {
            return Ok(live.clone());
        }
        let recently_failed = self
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200));
        if recently_failed {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "Redis unreachable (reconnecting)",
            )));
        }
        // Sentinel resolution and cluster discovery talk to several nodes:
        // bound the whole attempt, not just one socket.
        let started = Instant::now();
        let attempt = tokio::time::timeout(self.connect_timeout * 3, self.connect()).await;
        let live = match attempt {
            Ok(Ok(live)) => live,
            Ok(Err(e)) if started.elapsed() < Duration::from_millis(50) => return Err(e),
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => {
                return Err(self.failed(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to Redis timed out",
                ))))
            }
        };
        *current = Some(live.clone());
        Ok(live)
    }

    fn failed(&self, e: RedisError) -> RedisError {
        *self
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        e
    }

    async fn connect(&self) -> Result<Live, RedisError> {
        let tracking = self.tracking.get().cloned();
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout()));
        if let Some(cache) = &tracking {
            let cache = cache.clone();
            config = config.set_push_sender(move |info: redis::PushInfo| {
                cache.on_push(info);
                Ok::<(), std::convert::Infallible>(())
            });
        }
        let protocol = if tracking.is_some() {
            ProtocolVersion::RESP3
        } else {
            ProtocolVersion::RESP2
        };
        let mut live = match &self.source {
            Source::Single(info) => {
                let settings = info.redis_settings().clone().set_protocol(protocol);
                let client = redis::Client::open(info.clone().set_redis_settings(settings))?;
                Live::Node(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Source::Sentinel { .. } => {
                let mut guard = self.sentinel.lock().await;
                if guard.is_none() {
                    *guard = Some(self.sentinel_client(protocol)?);
                }
                let sentinel = guard.as_mut().expect("set above");
                let c = sentinel.get_async_connection_with_config(&config).await?;
                tracing::info!("connected to the Redis master named by Sentinel");
                Live::Node(c)
            }
            Source::Cluster(nodes, user, pass) => {
                let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.response_timeout());
                if let Some(u) = user {
                    builder = builder.username(u);
                }
                if let Some(p) = pass {
                    builder = builder.password(p);
                }
                if let Some(cache) = &tracking {
                    // Every node connection the driver makes speaks RESP3
                    // and reports pushes here; tracking itself is switched
                    // on by each tracked command's pipeline (the driver
                    // has no hook for its per-node connection setup).
                    let cache = cache.clone();
                    builder =
                        builder
                            .use_protocol(protocol)
                            .push_sender(move |info: redis::PushInfo| {
                                cache.on_push(info);
                                Ok::<(), std::convert::Infallible>(())
                            });
                }
                Live::Cluster(builder.build()?.get_async_connection().await?)
            }
        };
        if let (Some(_), Live::Node(_)) = (&tracking, &live) {
            // Only this node's own reads (after `CLIENT CACHING yes`) are
            // tracked, and its own writes do not invalidate its cache.
            // The cache is not cleared here: a connection is only replaced
            // after `reset` or a `Disconnection` push, which clear it; one
            // more connection in the pool leaves the others' copies good.
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("OPTIN")
                .arg("NOLOOP")
                .query_async::<()>(&mut live)
                .await?;
        }
        Ok(live)
    }

    fn sentinel_client(&self, protocol: ProtocolVersion) -> Result<SentinelClient, RedisError> {
        let Source::Sentinel {
            addrs,
            master,
            user,
            pass,
            db,
        } = &self.source
        else {
            unreachable!("only for Sentinel sources")
        };
        let mut builder =
            SentinelClientBuilder::new(addrs.clone(), master.clone(), SentinelServerType::Master)?
                .set_client_to_redis_protocol(protocol);
        if let Some(u) = user {
            builder = builder.set_client_to_redis_username(u.clone());
        }
        if let Some(p) = pass {
            builder = builder.set_client_to_redis_password(p.clone());
        }
        if let Some(db) = db {
            builder = builder.set_client_to_redis_db(*db);
        }
        builder.build()
    }

    /// The connections made so far.
    async fn existing(&self) -> Vec<Live> {
        let mut all = Vec::new();
        for slot in std::iter::once(&self.current).chain(&self.waited) {
            if let Some(live) = slot.lock().await.as_ref() {
                all.push(live.clone());
            }
        }
        all
    }

    /// Pings every connection each `HEARTBEAT` and drops them all (and the
    /// near cache) when one does not answer within `HEARTBEAT_TIMEOUT`.
    ///
    /// A connection cut without a FIN or RST (a partition, a dead host)
    /// looks alive to the client; while it does, the invalidations of
    /// other clients' writes are lost and the near cache would serve old
    /// values for as long as the kernel takes to notice. The heartbeat
    /// bounds that to `HEARTBEAT + HEARTBEAT_TIMEOUT`.
    pub(crate) async fn heartbeat(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            for mut live in self.existing().await {
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<Value>(&mut live);
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if !must_reconnect(&e) => {}
                    outcome => {
                        tracing::warn!(
                            ?outcome,
                            "a Redis connection did not answer its heartbeat; reconnecting and \
                             dropping the near cache"
                        );
                        self.reset().await;
                        break;
                    }
                }
            }
        }
    }

    /// Drops the shared connection after `error` if it says the connection
    /// (or the node's role) is no longer good.
    pub(crate) async fn on_error(&self, error: &RedisError) {
        if must_reconnect(error) && !self.is_cluster() {
            self.reset().await;
        }
    }

    /// Drops the connections (Sentinel announced a new master), and what
    /// the near cache learnt through them.
    pub(crate) async fn reset(&self) {
        *self.current.lock().await = None;
        for w in &self.waited {
            *w.lock().await = None;
        }
        if let Some(cache) = self.tracking.get() {
            cache.clear();
        }
    }
}

/// Failures after which the connection must not be used again: I/O, a
/// dropped connection, or a node that is no longer a writable master (a
/// demoted master answers READONLY).
pub(crate) fn must_reconnect(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_match_redis() {
        // From the Redis Cluster specification's examples.
        assert_eq!(super::slot("123456789"), 0x31C3);
        assert_eq!(super::slot("user1000"), 3443);
    }
}
