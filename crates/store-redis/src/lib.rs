//! Sessions in Redis: standalone, Sentinel or Cluster.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_redis::RedisStore;
//! let store = RedisStore::open("redis://127.0.0.1:6379")?;
//! // or "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"
//! // or "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
//! let layer = tether::SessionLayer::new(store);
//! # let _ = layer; Ok(()) }
//! ```
//!
//! # What it does better than the usual Redis session stores
//! - **Deltas, atomically.** A save writes only the attributes the request
//!   changed, in one Lua script that also refuses to resurrect a deleted or
//!   expired session and enforces the size limit before writing anything.
//!   Two requests changing different attributes both survive (stores that
//!   rewrite the whole session lose one).
//! - **One round trip.** Loading (with the lazy expiry refresh) is one
//!   `EVALSHA`; a write is one; creating is one. A request that reads and
//!   then writes costs two.
//! - **Readable.** One hash per session; attributes are JSON
//!   (`HGETALL tether:session:{ID}` in `redis-cli`).
//! - **Failover.** Sentinel: the master is re-resolved on every reconnect,
//!   after a `READONLY` answer (a demoted master) and when a sentinel
//!   announces `+switch-master`. Cluster: redirections and topology refresh
//!   by the driver. While Redis is unreachable every operation fails fast
//!   with [`StoreError::Unavailable`] (HTTP 503) and recovers by itself.
//!
//! # Rotation on Redis Cluster
//! The old and new IDs hash to different slots, so `RENAME` (Spring
//! Session's way) fails there. On a cluster, rotation reads the session,
//! creates it under the new ID (insert-if-absent) and deletes the old key:
//! three round trips, and a write to the old ID by a concurrent request in
//! that instant is lost. On one node it is one atomic script.
//!
//! # Durability knob
//! [`RedisStore::with_wait`] sends `WAIT n timeout` after creations and
//! rotations (logins), so an acknowledged login has reached `n` replicas
//! before the user sees it. It narrows, but cannot close, the window in
//! which a failover loses a write: Redis replication stays asynchronous and
//! a replica that acknowledged may still not be the one promoted.

mod conn;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, Script, Value};
use serde_json::value::RawValue;
use tether_core::{
    BoxError, Delta, Load, Record, SessionId, SessionStore, StoreError, Timestamp, DEFAULT_MAX_SIZE,
};

use conn::{Connector, Live, Source};

/// The URL could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL is malformed or names an unknown scheme.
    #[error("invalid Redis URL {url:?}: {reason}")]
    Url {
        /// The URL, password removed.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The driver refused the configuration.
    #[error("invalid Redis configuration")]
    Redis(#[source] RedisError),
}

/// A [`SessionStore`] in Redis.
pub struct RedisStore {
    conn: Arc<Connector>,
    prefix: String,
    max_size: usize,
    wait: Option<(u32, Duration)>,
    load: Script,
    create: Script,
    apply: Script,
    rotate: Script,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("max_size", &self.max_size)
            .field("cluster", &self.conn.is_cluster())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn url_error(url: &str, reason: impl Into<String>) -> OpenError {
    OpenError::Url {
        url: redact(url),
        reason: reason.into(),
    }
}

/// `user:pass@` (either part optional) and the rest.
fn split_auth(rest: &str) -> (Option<String>, Option<String>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, hosts)) => {
            let (user, pass) = match auth.split_once(':') {
                Some((u, p)) => (u, Some(p.to_string())),
                None => ("", Some(auth.to_string())),
            };
            ((!user.is_empty()).then(|| user.to_string()), pass, hosts)
        }
        None => (None, None, rest),
    }
}

fn host_port(url: &str, s: &str) -> Result<(String, u16), OpenError> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| url_error(url, format!("{s:?} is not host:port")))?;
    let port = p
        .parse()
        .map_err(|_| url_error(url, format!("bad port in {s:?}")))?;
    if h.is_empty() {
        return Err(url_error(url, format!("no host in {s:?}")));
    }
    Ok((h.trim_matches(['[', ']']).to_string(), port))
}

impl RedisStore {
    /// Connects lazily to the deployment named by `url`:
    ///
    /// - `redis://[user:pass@]host:port[/db]` (`rediss://` with feature `tls`);
    /// - `redis+sentinel://[user:pass@]host:port[,host:port…]/MASTER[/db]`
    ///   (the credentials are the Redis nodes'; sentinels are open);
    /// - `redis+cluster://[user:pass@]host:port[,host:port…]`.
    ///
    /// Nothing is contacted until the first operation, so a node starts
    /// (and answers 503) while Redis is down.
    ///
    /// # Errors
    /// A malformed URL or one the driver rejects.
    pub fn open(url: &str) -> Result<Self, OpenError> {
        let source = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (user, pass, rest) = split_auth(rest);
            let mut parts = rest.split('/');
            let hosts = parts.next().unwrap_or_default();
            let master = parts.next().filter(|m| !m.is_empty()).ok_or_else(|| {
                url_error(url, "missing /MASTER_NAME after the sentinel addresses")
            })?;
            let db: Option<i64> = match parts.next() {
                Some(d) => Some(d.parse().map_err(|_| url_error(url, "bad db number"))?),
                None => None,
            };
            let mut addrs = Vec::new();
            for h in hosts.split(',') {
                let (host, port) = host_port(url, h)?;
                addrs.push(redis::ConnectionAddr::Tcp(host, port));
            }
            let mut builder = redis::sentinel::SentinelClientBuilder::new(
                addrs,
                master,
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(OpenError::Redis)?;
            if let Some(u) = user {
                builder = builder.set_client_to_redis_username(u);
            }
            if let Some(p) = pass {
                builder = builder.set_client_to_redis_password(p);
            }
            if let Some(db) = db {
                builder = builder.set_client_to_redis_db(db);
            }
            Source::Sentinel(tokio::sync::Mutex::new(
                builder.build().map_err(OpenError::Redis)?,
            ))
        } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (user, pass, hosts) = split_auth(rest.trim_end_matches('/'));
            let mut nodes = Vec::new();
            for h in hosts.split(',') {
                let (host, port) = host_port(url, h)?;
                nodes.push(format!("redis://{host}:{port}"));
            }
            // Validate now so a bad URL fails at startup, not at first use.
            redis::cluster::ClusterClient::new(nodes.clone()).map_err(OpenError::Redis)?;
            Source::Cluster(nodes, user, pass)
        } else if url.starts_with("redis://") || url.starts_with("rediss://") {
            if url.starts_with("rediss://") && !cfg!(feature = "tls") {
                return Err(url_error(
                    url,
                    "TLS needs tether-redis built with the `tls` feature",
                ));
            }
            Source::Single(redis::Client::open(url).map_err(OpenError::Redis)?)
        } else {
            return Err(url_error(
                url,
                "use redis://, rediss://, redis+sentinel:// or redis+cluster://",
            ));
        };
        let conn = Connector::new(source, Duration::from_secs(1), Duration::from_secs(2));
        let watcher = sentinel_watch(url, &conn);
        Ok(Self {
            conn,
            prefix: "tether:session:".into(),
            max_size: DEFAULT_MAX_SIZE,
            wait: None,
            load: Script::new(&scripts::load()),
            create: Script::new(&scripts::create()),
            apply: Script::new(&scripts::apply()),
            rotate: Script::new(&scripts::rotate()),
            watcher,
        })
    }

    /// Sets the key prefix (default `tether:session:`).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the largest session accepted, in bytes of attribute names and JSON.
    #[must_use]
    pub fn with_max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// After creations and rotations, waits until `replicas` replicas have
    /// the write or `timeout` passes (`WAIT`); see the crate docs for limits.
    #[must_use]
    pub fn with_wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.conn
            .raise_response_timeout(timeout + Duration::from_secs(1));
        self.wait = Some((replicas, timeout));
        self
    }

    /// The Redis key of session `id`.
    pub fn key(&self, id: &SessionId) -> String {
        format!("{}{{{}}}", self.prefix, id)
    }

    async fn live(&self) -> Result<Live, StoreError> {
        match self.conn.get().await {
            Ok(l) => Ok(l),
            Err(e) => Err(StoreError::Unavailable(Box::new(e))),
        }
    }

    async fn fail(&self, e: RedisError) -> StoreError {
        self.conn.on_error(&e).await;
        classify(e)
    }

    /// The connection for a login write: the dedicated one when `WAIT`
    /// follows (it must be the connection that made the write).
    async fn live_for_login(&self) -> Result<Live, StoreError> {
        if self.wait.is_none() {
            return self.live().await;
        }
        self.conn
            .get_waited()
            .await
            .map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    async fn wait_for_replicas(&self, live: Live, id: &SessionId) -> Result<(), StoreError> {
        let Some((n, timeout)) = self.wait else {
            return Ok(());
        };
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(n)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let got: Result<i64, RedisError> = match live {
            Live::Node(mut c) => cmd.query_async(&mut c).await,
            Live::Cluster(mut c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(slot(&id.to_string()), SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
                .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
            }
        };
        match got {
            Ok(acked) if acked >= i64::from(n) => Ok(()),
            Ok(acked) => {
                tracing::warn!(
                    acked,
                    wanted = n,
                    "WAIT timed out: the login is written but not yet replicated as configured"
                );
                Ok(())
            }
            Err(e) => Err(self.fail(e).await),
        }
    }

    fn delta_args(&self, inv: &mut redis::ScriptInvocation<'_>, delta: &Delta, now: Timestamp) {
        inv.arg(now.0)
            .arg(self.max_size)
            .arg(u8::from(delta.clear))
            .arg(
                delta
                    .idle_ms
                    .map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX)),
            );
        let sets: Vec<(&String, &RawValue)> = delta
            .changes
            .iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
            .collect();
        inv.arg(sets.len());
        for (k, v) in sets {
            inv.arg(k.as_str()).arg(v.get());
        }
        let removes: Vec<&String> = delta
            .changes
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        inv.arg(removes.len());
        for k in removes {
            inv.arg(k.as_str());
        }
        inv.arg(delta.expect.len());
        for (k, v) in &delta.expect {
            match v {
                Some(v) => inv.arg(k.as_str()).arg("1").arg(v.get()),
                None => inv.arg(k.as_str()).arg("0").arg(""),
            };
        }
    }
}

/// The cluster slot of a hash tag (CRC16/XMODEM mod 16384).
fn slot(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// Watches Sentinel's `+switch-master` announcements and drops the
/// connection at once, instead of waiting for a failed request to notice.
fn sentinel_watch(url: &str, conn: &Arc<Connector>) -> Option<tokio::task::JoinHandle<()>> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    let (_, _, rest) = split_auth(rest);
    let mut parts = rest.split('/');
    let hosts: Vec<String> = parts.next()?.split(',').map(str::to_string).collect();
    let master = parts.next()?.to_string();
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let conn = conn.clone();
    Some(runtime.spawn(async move {
        use futures_util::StreamExt;
        loop {
            for h in &hosts {
                let Ok(client) = redis::Client::open(format!("redis://{h}")) else {
                    continue;
                };
                let Ok(Ok(mut pubsub)) =
                    tokio::time::timeout(Duration::from_secs(1), client.get_async_pubsub()).await
                else {
                    continue;
                };
                if pubsub.subscribe("+switch-master").await.is_err() {
                    continue;
                }
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if payload.split(' ').next() == Some(master.as_str()) {
                        tracing::warn!(%payload, "Sentinel switched the master; reconnecting");
                        conn.reset().await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

fn classify(e: RedisError) -> StoreError {
    // Unreachable, busy or failing over: retry later (503). Anything else the
    // server refused (a script error, a key of the wrong type) will not pass
    // by retrying: report it as such (500) instead of "try again".
    let transient = conn::must_reconnect(&e)
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some("CLUSTERDOWN" | "TRYAGAIN" | "BUSY" | "MASTERDOWN" | "LOADING" | "READONLY")
        );
    if transient {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Corrupt(Box::new(e))
    }
}

fn corrupt(msg: impl Into<String>) -> StoreError {
    let e: BoxError = msg.into().into();
    StoreError::Corrupt(e)
}

fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn num(fields: &std::collections::HashMap<&str, &str>, name: &str) -> Result<u64, StoreError> {
    fields
        .get(name)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(format!("session hash field {name} missing or not a number")))
}

/// Rebuilds a record from `HGETALL` output.
fn parse_record(id: SessionId, items: Vec<Value>) -> Result<Record, StoreError> {
    let mut meta = std::collections::HashMap::new();
    let mut attributes = std::collections::BTreeMap::new();
    let mut it = items.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = std::str::from_utf8(text(k).ok_or_else(|| corrupt("non-string field"))?)
            .map_err(|_| corrupt("non-UTF-8 field name"))?;
        let v = std::str::from_utf8(text(v).ok_or_else(|| corrupt("non-string value"))?)
            .map_err(|_| corrupt("non-UTF-8 value"))?;
        if let Some(name) = k.strip_prefix("attr:") {
            let raw = RawValue::from_string(v.to_string())
                .map_err(|e| StoreError::Corrupt(Box::new(e)))?;
            attributes.insert(name.to_string(), raw);
        } else {
            meta.insert(k, v);
        }
    }
    let deadline = num(&meta, "meta:deadline")?;
    Ok(Record {
        id,
        attributes,
        created: Timestamp(num(&meta, "meta:created")?),
        last_access: Timestamp(num(&meta, "meta:last")?),
        idle_ms: num(&meta, "meta:idle")?,
        deadline: if deadline == 0 {
            Timestamp::MAX
        } else {
            Timestamp(deadline)
        },
        version: num(&meta, "meta:version")?,
    })
}

/// Reads a script's answer: a version, nothing, or a refusal.
fn applied(v: Value) -> Result<Option<u64>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(n) => Ok(Some(
            u64::try_from(n).map_err(|_| corrupt("negative version"))?,
        )),
        Value::Array(items) => {
            let tag = items.first().and_then(text);
            match tag {
                Some(b"too_large") => {
                    let size = items
                        .get(1)
                        .and_then(text)
                        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
                        .unwrap_or(0);
                    Err(StoreError::TooLarge { size, limit: 0 })
                }
                Some(b"collision") => Err(StoreError::Collision),
                Some(b"conflict") => Err(StoreError::Conflict),
                _ => Err(corrupt("unexpected script answer")),
            }
        }
        other => Err(corrupt(format!("unexpected script answer {other:?}"))),
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        let size = record.size();
        if size > self.max_size {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_size,
            });
        }
        let now = record.last_access;
        let ttl = record.expires_at().0.saturating_sub(now.0).max(1);
        let deadline = if record.deadline == Timestamp::MAX {
            0
        } else {
            record.deadline.0
        };
        let mut inv = self.create.key(self.key(&record.id));
        inv.arg(now.0).arg(ttl);
        inv.arg("meta:created").arg(record.created.0);
        inv.arg("meta:last").arg(record.last_access.0);
        inv.arg("meta:idle").arg(record.idle_ms);
        inv.arg("meta:deadline").arg(deadline);
        inv.arg("meta:version").arg(record.version);
        inv.arg("meta:size").arg(size);
        for (k, v) in &record.attributes {
            inv.arg(format!("attr:{k}")).arg(v.get());
        }
        let mut live = self.live_for_login().await?;
        let created: i64 = match inv.invoke_async(&mut live).await {
            Ok(n) => n,
            Err(e) => return Err(self.fail(e).await),
        };
        if created == 0 {
            return Err(StoreError::Collision);
        }
        self.wait_for_replicas(live, &record.id).await
    }

    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        let refresh = load
            .refresh_after
            .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let fraction = load.refresh_fraction.unwrap_or(-1.0);
        // A load is safe to repeat, so one reconnect-and-retry hides a
        // connection that died while idle (Redis restarted, failover).
        let mut tries = 0;
        loop {
            tries += 1;
            let mut live = self.live().await?;
            let mut inv = self.load.key(self.key(id));
            inv.arg(load.now.0).arg(refresh).arg(fraction);
            match inv.invoke_async::<Value>(&mut live).await {
                Ok(Value::Nil) => return Ok(None),
                Ok(Value::Array(items)) => return parse_record(*id, items).map(Some),
                Ok(other) => return Err(corrupt(format!("unexpected load answer {other:?}"))),
                Err(e) if tries == 1 && conn::must_reconnect(&e) => self.conn.on_error(&e).await,
                Err(e) => return Err(self.fail(e).await),
            }
        }
    }

    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let mut inv = self.apply.key(self.key(id));
        self.delta_args(&mut inv, delta, now);
        let mut live = self.live().await?;
        match inv.invoke_async::<Value>(&mut live).await {
            Ok(v) => applied(v).map_err(|e| self.with_limit(e)),
            Err(e) => Err(self.fail(e).await),
        }
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut live = self.live().await?;
            match redis::cmd("DEL")
                .arg(self.key(id))
                .query_async::<i64>(&mut live)
                .await
            {
                Ok(n) => return Ok(n > 0),
                Err(e) if tries == 1 && conn::must_reconnect(&e) => self.conn.on_error(&e).await,
                Err(e) => return Err(self.fail(e).await),
            }
        }
    }

    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        if self.conn.is_cluster() {
            // Different slots: read, create under the new ID, delete the old.
            let Some(mut record) = self.load(old, Load::at(now)).await? else {
                return Ok(None);
            };
            if !record.meets(delta) {
                return Err(StoreError::Conflict);
            }
            let size = record.size_after(delta);
            if size > self.max_size {
                return Err(StoreError::TooLarge {
                    size,
                    limit: self.max_size,
                });
            }
            record.apply(delta, now);
            record.id = *new;
            self.create(&record).await?;
            self.delete(old).await?;
            return Ok(Some(record.version));
        }
        let mut inv = self.rotate.key(self.key(old));
        inv.key(self.key(new));
        self.delta_args(&mut inv, delta, now);
        let mut live = self.live_for_login().await?;
        let version = match inv.invoke_async::<Value>(&mut live).await {
            Ok(v) => applied(v).map_err(|e| self.with_limit(e))?,
            Err(e) => return Err(self.fail(e).await),
        };
        if version.is_some() {
            self.wait_for_replicas(live, new).await?;
        }
        Ok(version)
    }

    fn max_size(&self) -> usize {
        self.max_size
    }
}

impl RedisStore {
    /// Scripts report the size; the limit is ours.
    fn with_limit(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::TooLarge { size, .. } => StoreError::TooLarge {
                size,
                limit: self.max_size,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(RedisStore::open("redis://127.0.0.1:6379").is_ok());
        assert!(RedisStore::open("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").is_ok());
        assert!(RedisStore::open("redis+sentinel://127.0.0.1:26379/mymaster").is_ok());
        for (bad, why) in [
            ("mongodb://x", "use redis://"),
            ("redis+sentinel://127.0.0.1:26379", "MASTER_NAME"),
            ("redis+sentinel://127.0.0.1/m", "host:port"),
            ("redis+cluster://:7000", "no host"),
            ("redis+cluster://h:port", "bad port"),
        ] {
            let err = RedisStore::open(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_never_show_the_password() {
        let err = RedisStore::open("redis+sentinel://u:s3cret@h:1")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn slots_match_redis() {
        // From the Redis Cluster specification's examples.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("user1000"), 3443);
    }
}
