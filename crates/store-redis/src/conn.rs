//! Connections for the three deployments, re-established after failures.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::Mutex;

/// Where connections come from.
pub(crate) enum Source {
    /// One server.
    Single(redis::Client),
    /// The master named by Sentinel, resolved at every (re)connect.
    Sentinel(Mutex<SentinelClient>),
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

/// Hands out a shared connection, making one when there is none, and
/// forgets it after a connection-level failure so the next call reconnects
/// (and, for Sentinel, asks the sentinels where the master is now).
pub(crate) struct Connector {
    source: Source,
    current: Mutex<Option<Live>>,
    /// A second connection for writes followed by `WAIT`, which blocks the
    /// connection it is sent on: other requests must not queue behind it.
    waited: Mutex<Option<Live>>,
    /// When the last connection attempt failed: for a short while after,
    /// callers fail at once instead of queueing for their own attempt.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
    connect_timeout: Duration,
    response_timeout_ms: std::sync::atomic::AtomicU64,
}

impl Connector {
    pub(crate) fn new(
        source: Source,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            current: Mutex::new(None),
            waited: Mutex::new(None),
            failed_at: std::sync::Mutex::new(None),
            connect_timeout,
            response_timeout_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(response_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
        })
    }

    /// Makes the response timeout at least `min` (a `WAIT` must be able to
    /// outlast its own timeout). Applies to connections made afterwards.
    pub(crate) fn raise_response_timeout(&self, min: Duration) {
        let ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
        self.response_timeout_ms
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn response_timeout(&self) -> Duration {
        Duration::from_millis(
            self.response_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster(..))
    }

    /// The shared connection, connecting if needed.
    pub(crate) async fn get(&self) -> Result<Live, RedisError> {
        self.get_slot(&self.current).await
    }

    /// The connection for writes that are followed by `WAIT`.
    pub(crate) async fn get_waited(&self) -> Result<Live, RedisError> {
        self.get_slot(&self.waited).await
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
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500));
        if recently_failed {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "Redis unreachable (reconnecting)",
            )));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout()));
        let connect = async {
            match &self.source {
                Source::Single(client) => client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Live::Node),
                Source::Sentinel(sentinel) => {
                    let mut sentinel = sentinel.lock().await;
                    let live = sentinel
                        .get_async_connection_with_config(&config)
                        .await
                        .map(Live::Node);
                    if live.is_ok() {
                        tracing::info!("connected to the Redis master named by Sentinel");
                    }
                    live
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
                    builder
                        .build()?
                        .get_async_connection()
                        .await
                        .map(Live::Cluster)
                }
            }
        };
        // Sentinel resolution and cluster discovery talk to several nodes:
        // bound the whole attempt, not just one socket.
        let live = tokio::time::timeout(self.connect_timeout * 3, connect)
            .await
            .map_err(|_| {
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to Redis timed out",
                ))
            })??;
        *current = Some(live.clone());
        Ok(live)
    }

    /// Drops the shared connection after `error` if it says the connection
    /// (or the node's role) is no longer good.
    pub(crate) async fn on_error(&self, error: &RedisError) {
        if must_reconnect(error) && !self.is_cluster() {
            self.reset().await;
        }
    }

    /// Drops the connections (Sentinel announced a new master).
    pub(crate) async fn reset(&self) {
        *self.current.lock().await = None;
        *self.waited.lock().await = None;
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
