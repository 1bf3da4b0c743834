//! Sessions in Redis: standalone, Sentinel or Cluster, with an optional
//! near cache that Redis keeps coherent.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_redis::RedisStore;
//! let store = RedisStore::open("redis://127.0.0.1:6379")?
//!     // Recently used sessions kept in this process, invalidated by Redis.
//!     .with_near_cache(100_000, 256 << 20);
//! // or "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"
//! // or "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
//! let layer = tether::SessionLayer::new(store);
//! # let _ = layer; Ok(()) }
//! ```
//!
//! # What it costs Redis
//! - **A read is one `HGETALL`**: no script. Expiry is checked by the
//!   client; the lazy refresh of the inactivity timer (a small script that
//!   rewrites one field) runs only once a fraction of the window has passed.
//! - **A write is one `EVALSHA`.** The store sends the metadata it read
//!   (it keeps the sessions it read lately); when Redis holds exactly that,
//!   the script compares one string and writes what the store computed:
//!   one `HSET`, and `PEXPIRE` only when the expiry passes the key's TTL
//!   (kept a quarter of the inactivity window beyond it). Otherwise the
//!   script does the work itself. Either way it refuses to resurrect a
//!   deleted or expired session, and checks the size limit and
//!   [`Delta::expect`]'s conditions before writing anything.
//! - **Deltas.** A write carries only the attributes the request changed:
//!   two requests changing different attributes both survive, and a 10 KB
//!   session changed by one attribute sends one attribute.
//!
//! # Near cache
//! [`RedisStore::with_near_cache`] keeps recently used sessions in the
//! process, coherent through Redis's server-assisted client-side caching
//! (RESP3 `CLIENT TRACKING ON OPTIN NOLOOP`): Redis remembers which sessions
//! this process read and pushes an invalidation when another client changes
//! one. A read of a cached session costs **no round trip**; a read-then-write
//! costs **one** (the cache is updated from the write's answer when the
//! version shows nobody else wrote in between). [`Session::modify`]'s
//! conditions are checked by Redis, so a stale cached value costs a retry,
//! never a lost update.
//!
//! What it promises: a session changed on another node is invalidated here
//! as soon as Redis's push reaches this process, which Redis sends before it
//! answers the writer; a request that reaches this node *after* the
//! writer's answer reached its client can still, rarely, be served the old
//! value if the push is still in flight (see `docs/BENCHMARKS.md` for the
//! measured rate). The whole cache is dropped when a tracking connection
//! breaks or is replaced (failover, `+switch-master`, `FLUSHALL`).
//!
//! [`Session::modify`]: https://docs.rs/tether/latest/tether/struct.Session.html#method.modify
//!
//! # Failover
//! Sentinel: the master is re-resolved on every reconnect, after a
//! `READONLY` answer (a demoted master) and when a sentinel announces
//! `+switch-master`. Cluster: redirections and topology refresh by the
//! driver. While Redis is unreachable every operation fails fast with
//! [`StoreError::Unavailable`] (HTTP 503) and recovers by itself.
//!
//! # Rotation on Redis Cluster
//! The old and new IDs hash to different slots, so `RENAME` (Spring
//! Session's way) fails there. On a cluster, rotation reads the session,
//! creates it under the new ID (insert-if-absent) and deletes the old key:
//! three round trips, and a write to the old ID by a concurrent request in
//! that instant is lost. On one node it is one atomic script.
//!
//! # Durability: [`RedisStore::with_wait`]
//! Redis replicates asynchronously: a master that dies loses the writes its
//! replicas had not received, and it acknowledged them. With
//! `with_wait(n, timeout)` every write (creation, change, rotation,
//! deletion) is followed by `WAIT n timeout` on the same connection, and a
//! write that did not reach `n` replicas in time is answered
//! [`StoreError::Unavailable`] (503): it is on the master but not promised.
//! That closes the window for a failover that promotes a replica that had
//! acknowledged; it is still not strong consistency (a replica that
//! acknowledged is not necessarily the one Sentinel promotes when there are
//! several, and a partitioned master keeps accepting writes until
//! `min-replicas-to-write` stops it).

mod cache;
mod conn;
mod layout;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, Script, Value};
use tether_core::{
    Delta, Load, Record, SessionId, SessionStore, StoreError, Timestamp, DEFAULT_MAX_SIZE,
};

pub use cache::NearCacheStats;
use cache::{Cached, NearCache, Ticket};

/// Without a near cache, how many sessions' metadata a store keeps for the
/// write that usually follows a read (a handler's read-then-write).
const WRITE_BASES: usize = 4096;
/// And at most this many attribute bytes of them.
const WRITE_BASE_BYTES: usize = 8 << 20;
use conn::{Connector, Live, Source};
use layout::{corrupt, text, Meta};

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

/// A write Redis made on the master but could not promise was replicated.
#[derive(Debug, thiserror::Error)]
#[error(
    "written on the Redis master but acknowledged by {acked} of {wanted} replicas within {timeout_ms} ms"
)]
struct NotReplicated {
    acked: i64,
    wanted: u32,
    timeout_ms: u64,
}

/// The write scripts, loaded into Redis on first use.
struct Scripts {
    create: Script,
    apply: Script,
    touch: Script,
    rotate: Script,
}

/// A [`SessionStore`] in Redis.
pub struct RedisStore {
    conn: Arc<Connector>,
    prefix: String,
    max_size: usize,
    wait: Option<(u32, Duration)>,
    /// Sessions this node read or wrote lately, with their metadata as
    /// stored: a write sends the metadata it started from, so Redis
    /// compares one string instead of redoing the checks. Reads are served
    /// from it only when it is a near cache (`near`), kept coherent by
    /// Redis; otherwise a stale entry costs nothing but the slower path.
    cache: Arc<NearCache>,
    near: bool,
    scripts: Scripts,
    watcher: Option<tokio::task::JoinHandle<()>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("max_size", &self.max_size)
            .field("cluster", &self.conn.is_cluster())
            .field("wait", &self.wait)
            .field("near_cache", &self.near)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        for task in [self.watcher.take(), self.heartbeat.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
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

fn source(url: &str) -> Result<Source, OpenError> {
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        let (user, pass, rest) = split_auth(rest);
        let mut parts = rest.split('/');
        let hosts = parts.next().unwrap_or_default();
        let master = parts
            .next()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| url_error(url, "missing /MASTER_NAME after the sentinel addresses"))?;
        let db = match parts.next() {
            Some(d) => Some(d.parse().map_err(|_| url_error(url, "bad db number"))?),
            None => None,
        };
        let mut addrs = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = host_port(url, h)?;
            addrs.push(redis::ConnectionAddr::Tcp(host, port));
        }
        // Validate now so a bad URL fails at startup, not at first use.
        redis::sentinel::SentinelClientBuilder::new(
            addrs.clone(),
            master,
            redis::sentinel::SentinelServerType::Master,
        )
        .and_then(redis::sentinel::SentinelClientBuilder::build)
        .map_err(OpenError::Redis)?;
        Ok(Source::Sentinel {
            addrs,
            master: master.to_string(),
            user,
            pass,
            db,
        })
    } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let (user, pass, hosts) = split_auth(rest.trim_end_matches('/'));
        let mut nodes = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = host_port(url, h)?;
            nodes.push(format!("redis://{host}:{port}"));
        }
        redis::cluster::ClusterClient::new(nodes.clone()).map_err(OpenError::Redis)?;
        Ok(Source::Cluster(nodes, user, pass))
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        if url.starts_with("rediss://") && !cfg!(feature = "tls") {
            return Err(url_error(
                url,
                "TLS needs tether-redis built with the `tls` feature",
            ));
        }
        Ok(Source::Single(
            url.into_connection_info().map_err(OpenError::Redis)?,
        ))
    } else {
        Err(url_error(
            url,
            "use redis://, rediss://, redis+sentinel:// or redis+cluster://",
        ))
    }
}

/// `EVALSHA` of `script` on `keys`; arguments follow.
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}

/// What one write's pipeline answered: the script's value, and `WAIT`'s
/// count when one was sent.
struct Written {
    value: Value,
    replicas: Option<i64>,
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
        let conn = Connector::new(source(url)?, Duration::from_secs(1), Duration::from_secs(2));
        let watcher = sentinel_watch(url, &conn);
        Ok(Self {
            conn,
            prefix: "tether:session:".into(),
            max_size: DEFAULT_MAX_SIZE,
            wait: None,
            cache: NearCache::new(WRITE_BASES, WRITE_BASE_BYTES),
            near: false,
            scripts: Scripts {
                create: Script::new(&scripts::create()),
                apply: Script::new(&scripts::apply()),
                touch: Script::new(&scripts::touch()),
                rotate: Script::new(&scripts::rotate()),
            },
            watcher,
            heartbeat: None,
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

    /// Follows every write with `WAIT replicas timeout` and answers
    /// [`StoreError::Unavailable`] when fewer replicas acknowledged it in
    /// time; see the crate docs for what this does and does not promise.
    #[must_use]
    pub fn with_wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.conn
            .raise_response_timeout(timeout + Duration::from_secs(1));
        self.wait = Some((replicas, timeout));
        self
    }

    /// Keeps up to `entries` recently used sessions (and at most `bytes` of
    /// their attributes) in this process, kept coherent by Redis (see the
    /// crate docs). Call before the store is first used.
    ///
    /// Call it inside a Tokio runtime: the connections' heartbeat (which
    /// bounds how long a silently cut connection can leave the cache
    /// unaware of other nodes' writes) runs on it.
    #[must_use]
    pub fn with_near_cache(mut self, entries: usize, bytes: usize) -> Self {
        let cache = NearCache::new(entries, bytes);
        self.conn.track(cache.clone());
        self.cache = cache;
        self.near = true;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.heartbeat = Some(runtime.spawn(self.conn.clone().heartbeat()));
        }
        self
    }

    /// What the near cache did so far; `None` without one.
    pub fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near.then(|| self.cache.stats())
    }

    /// The Redis key of session `id`.
    pub fn key(&self, id: &SessionId) -> String {
        format!("{}{{{}}}", self.prefix, id)
    }

    fn tracking(&self) -> bool {
        self.near
    }

    /// The connection for session `id`: with `WAIT`, one of the dedicated
    /// connections (a `WAIT` blocks the connection it is sent on), always
    /// the same for one session (see [`Connector::get_waited`]).
    async fn live_for(&self, id: &SessionId) -> Result<Live, StoreError> {
        let got = if self.wait.is_some() {
            let affinity = usize::from(id.as_bytes()[0]) | usize::from(id.as_bytes()[1]) << 8;
            self.conn.get_waited(affinity).await
        } else {
            self.conn.get().await
        };
        got.map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    async fn fail(&self, e: RedisError) -> StoreError {
        self.conn.on_error(&e).await;
        classify(e)
    }

    /// A pipeline that starts with what makes the next command's reads
    /// tracked: `CLIENT CACHING yes` (OPTIN mode), and on a cluster the
    /// tracking switch itself, since the driver's per-node connections
    /// cannot be set up otherwise (re-enabling is cheap and idempotent).
    /// [`Self::send`] drops their answers.
    fn pipeline(&self) -> Pipeline {
        let mut pipe = redis::pipe();
        if self.tracking() {
            if self.conn.is_cluster() {
                pipe.cmd("CLIENT")
                    .arg("TRACKING")
                    .arg("ON")
                    .arg("OPTIN")
                    .arg("NOLOOP");
            }
            pipe.cmd("CLIENT").arg("CACHING").arg("YES");
        }
        pipe
    }

    /// How many commands [`Self::pipeline`] starts with.
    fn prelude(&self) -> usize {
        match (self.tracking(), self.conn.is_cluster()) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        }
    }

    /// Reads session `id`'s hash (tracked when the near cache is on).
    async fn read(&self, id: &SessionId) -> Result<Option<(Record, Meta)>, StoreError> {
        let mut pipe = self.pipeline();
        pipe.cmd("HGETALL").arg(self.key(id));
        // A read is safe to repeat, so one reconnect-and-retry hides a
        // connection that died while idle (Redis restarted, failover).
        let mut tries = 0;
        loop {
            tries += 1;
            let mut live = self.live_for(id).await?;
            let got = live
                .exec(&pipe, id)
                .await
                .and_then(|mut v| v.pop().unwrap_or(Value::Nil).extract_error());
            match got {
                Ok(v) => return layout::parse_hash(*id, v),
                Err(e) if tries == 1 && conn::must_reconnect(&e) => self.conn.on_error(&e).await,
                Err(e) => return Err(self.fail(e).await),
            }
        }
    }

    /// Sends one write: `pipe` (from [`Self::pipeline`], the script's
    /// command last) and `WAIT` when `waited` and configured.
    async fn write(
        &self,
        id: &SessionId,
        mut pipe: Pipeline,
        waited: bool,
    ) -> Result<Written, StoreError> {
        let wait = self.wait.filter(|_| waited);
        if let Some((n, timeout)) = wait {
            pipe.cmd("WAIT").arg(n).arg(tether_core::millis(timeout));
        }
        let mut out = self.send(id, &pipe).await?.into_iter();
        let value = match out.next().unwrap_or(Value::Nil).extract_error() {
            Ok(v) => v,
            Err(e) => return Err(self.fail(e).await),
        };
        let replicas = match out.next().map(Value::extract_error) {
            None => None,
            Some(Ok(Value::Int(n))) => Some(n),
            Some(Ok(other)) => return Err(corrupt(format!("unexpected WAIT answer {other:?}"))),
            Some(Err(e)) => return Err(self.fail(e).await),
        };
        Ok(Written { value, replicas })
    }

    /// Sends `pipe` and returns the answers after the prelude, loading the
    /// scripts and sending it again if Redis does not know them yet
    /// (`NOSCRIPT`: first use, a restart, a failover, `SCRIPT FLUSH`). Not
    /// retried otherwise: a write may have happened.
    async fn send(&self, id: &SessionId, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut loaded = false;
        loop {
            let mut live = self.live_for(id).await?;
            let mut out = match live.exec(pipe, id).await {
                Ok(out) => out,
                Err(e) => return Err(self.fail(e).await),
            };
            out.drain(..self.prelude().min(out.len()));
            let unknown = out
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if unknown && !loaded {
                loaded = true;
                self.load_scripts(&mut live).await?;
                continue;
            }
            return Ok(out);
        }
    }

    async fn load_scripts(&self, live: &mut Live) -> Result<(), StoreError> {
        let s = &self.scripts;
        for script in [&s.create, &s.apply, &s.touch, &s.rotate] {
            if let Err(e) = script.load_async(live).await {
                return Err(self.fail(e).await);
            }
        }
        Ok(())
    }

    /// `Err` when the write's `WAIT` fell short: written, not promised.
    fn replicated(&self, written: &Written) -> Result<(), StoreError> {
        match (self.wait, written.replicas) {
            (Some((wanted, timeout)), Some(acked)) if acked < i64::from(wanted) => {
                tracing::warn!(
                    acked,
                    wanted,
                    "WAIT timed out: the write is on the master but not replicated as configured"
                );
                Err(StoreError::Unavailable(Box::new(NotReplicated {
                    acked,
                    wanted,
                    timeout_ms: tether_core::millis(timeout),
                })))
            }
            _ => Ok(()),
        }
    }

    fn track_arg(&self) -> &'static str {
        if self.tracking() {
            "1"
        } else {
            "0"
        }
    }

    /// The arguments of a change (see `APPLY_FN` in `scripts.rs`). With
    /// `base` (what this node last read of the session) it also sends what
    /// the script needs to take the short path; with `base` gone stale, the
    /// script takes the long one.
    fn delta_args(&self, cmd: &mut Cmd, delta: &Delta, now: Timestamp, base: Option<&Cached>) {
        let fast = base.and_then(|b| self.prepared(b, delta, now));
        cmd.arg(now.0)
            .arg(self.max_size)
            .arg(u8::from(delta.clear))
            .arg(
                delta
                    .idle_ms
                    .map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX)),
            );
        match &fast {
            Some((base_m, new_m, ttl)) => cmd.arg(base_m).arg(new_m).arg(*ttl),
            None => cmd.arg("").arg("").arg(0),
        };
        let sets = delta.changes.values().filter(|v| v.is_some()).count();
        cmd.arg(sets);
        for (k, v) in &delta.changes {
            if let Some(v) = v {
                cmd.arg(k.as_str()).arg(v.get());
            }
        }
        match (&fast, base) {
            // The short path clears by removing what the base holds.
            (Some(_), Some(b)) if delta.clear => {
                let gone: Vec<&String> = b
                    .record
                    .attributes
                    .keys()
                    .filter(|k| !matches!(delta.changes.get(*k), Some(Some(_))))
                    .collect();
                cmd.arg(gone.len());
                for k in gone {
                    cmd.arg(k.as_str());
                }
            }
            // Removals of attributes the base has (the short path's HDEL).
            (Some(_), Some(b)) => {
                let gone: Vec<&String> = delta
                    .changes
                    .iter()
                    .filter(|(k, v)| v.is_none() && b.record.attributes.contains_key(*k))
                    .map(|(k, _)| k)
                    .collect();
                cmd.arg(gone.len());
                for k in gone {
                    cmd.arg(k.as_str());
                }
            }
            _ => {
                cmd.arg(delta.changes.len() - sets);
                for (k, v) in &delta.changes {
                    if v.is_none() {
                        cmd.arg(k.as_str());
                    }
                }
            }
        }
        cmd.arg(delta.expect.len());
        for (k, v) in &delta.expect {
            match v {
                Some(v) => cmd.arg(k.as_str()).arg("1").arg(v.get()),
                None => cmd.arg(k.as_str()).arg("0").arg(""),
            };
        }
        cmd.arg(self.track_arg());
    }

    /// The short path's arguments for `delta` on `base`: the metadata it
    /// read, the new metadata, and the TTL to set (0: keep). `None` when
    /// the base cannot decide alone (expired, a condition fails, too large):
    /// Redis then checks against what it holds.
    fn prepared(
        &self,
        base: &Cached,
        delta: &Delta,
        now: Timestamp,
    ) -> Option<(String, String, u64)> {
        let record = &base.record;
        if base.meta.version != record.version || record.is_expired(now) || !record.meets(delta) {
            return None;
        }
        let size = record.size_after(delta);
        if size > self.max_size {
            return None;
        }
        let mut meta = base.meta;
        meta.version += 1;
        meta.last = meta.last.max(now.0);
        if let Some(idle) = delta.idle_ms {
            // As the script: a new timeout sets the TTL afresh.
            meta.idle = idle;
            meta.gc = 0;
        }
        meta.size = size as u64;
        let ttl = meta.collect_after(now.0).unwrap_or(0);
        Some((base.meta.pack(), meta.pack(), ttl))
    }

    /// Records an access at `now` (the lazy refresh of the inactivity
    /// timer). `Ok(Ok(record))`: `record` with the access recorded, or
    /// `None` if the session is gone; `Ok(Err(()))`: the session changed
    /// since `record` was read (read it again).
    async fn touch(
        &self,
        mut record: Record,
        now: Timestamp,
    ) -> Result<Result<Option<Record>, ()>, StoreError> {
        let ticket = self.cache.ticket();
        let mut pipe = self.pipeline();
        let key = self.key(&record.id);
        let mut cmd = evalsha(&self.scripts.touch, &[&key]);
        cmd.arg(now.0).arg(self.track_arg());
        pipe.add_command(cmd);
        // A touch is not worth a `WAIT`: losing it moves the expiry back by
        // at most the refresh threshold.
        let written = self.write(&record.id, pipe, false).await?.value;
        let Some(meta) = answered_meta(&written)? else {
            self.cache.forget(&record.id);
            return Ok(Ok(None));
        };
        if meta.version != record.version {
            self.cache.forget(&record.id);
            return Ok(Err(()));
        }
        record.last_access = Timestamp(meta.last);
        self.cache.put(ticket, record.clone(), meta);
        Ok(Ok(Some(record)))
    }

    /// After this node's own write of `delta` to `id` answered `meta`: the
    /// cached copy becomes the new value if it was the one written over
    /// (nobody else wrote in between), else it is dropped.
    fn follow(
        &self,
        ticket: Ticket,
        (id, new_id): (&SessionId, &SessionId),
        base: Option<Arc<Cached>>,
        delta: &Delta,
        now: Timestamp,
        meta: Option<Meta>,
    ) {
        // Versions name states: the write was applied to the state one
        // version before its answer. That is the base the write started
        // from, or, when this node's requests of the session overlap, the
        // copy another answer left meanwhile.
        let written_over = [base, self.cache.peek(id)]
            .into_iter()
            .flatten()
            .find(|b| meta.is_some_and(|m| b.record.version + 1 == m.version));
        match (written_over, meta) {
            (Some(base), Some(meta)) => {
                let mut record = base.record.clone();
                record.apply(delta, now);
                record.id = *new_id;
                if new_id != id {
                    self.cache.forget(id);
                }
                // Kept only if nothing newer is cached meanwhile.
                self.cache.put(ticket, record, meta);
            }
            _ => self.cache.forget(id),
        }
    }

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

    /// Applies `delta` to session `id`, renaming it `new_id` when they
    /// differ (rotation on one node: the same script, then `RENAME`).
    async fn change(
        &self,
        id: &SessionId,
        new_id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let ticket = self.cache.ticket();
        let base = self.cache.peek(id);
        let key = self.key(id);
        let mut cmd = if id == new_id {
            evalsha(&self.scripts.apply, &[&key])
        } else {
            evalsha(&self.scripts.rotate, &[&key, &self.key(new_id)])
        };
        self.delta_args(&mut cmd, delta, now, base.as_deref());
        let mut pipe = self.pipeline();
        pipe.add_command(cmd);
        // A rotated session lives on the old ID's connection until the
        // answer is in: `WAIT` must follow on the connection that wrote.
        let written = match self.write(id, pipe, true).await {
            Ok(w) => w,
            Err(e) => {
                self.cache.forget(id);
                return Err(e);
            }
        };
        let meta = match applied(&written.value) {
            Ok(meta) => meta,
            Err(e) => {
                // A refused condition may mean the cached copy is behind:
                // the retry reads Redis.
                self.cache.forget(id);
                return Err(self.with_limit(e));
            }
        };
        self.follow(ticket, (id, new_id), base, delta, now, meta);
        self.replicated(&written)?;
        Ok(meta.map(|m| m.version))
    }

    async fn create_record(&self, record: &Record) -> Result<(), StoreError> {
        let size = record.size();
        if size > self.max_size {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_size,
            });
        }
        let now = record.last_access.0;
        let meta = Meta::of(record, now);
        let key = self.key(&record.id);
        let mut cmd = evalsha(&self.scripts.create, &[&key]);
        cmd.arg(now)
            .arg(meta.pack())
            .arg(meta.gc.saturating_sub(now).max(1))
            .arg(self.track_arg());
        let mut field = String::new();
        for (k, v) in &record.attributes {
            field.clear();
            field.push_str("attr:");
            field.push_str(k);
            cmd.arg(field.as_str()).arg(v.get());
        }
        let ticket = self.cache.ticket();
        let mut pipe = self.pipeline();
        pipe.add_command(cmd);
        let written = self.write(&record.id, pipe, true).await?;
        match written.value {
            Value::Int(1) => {}
            Value::Int(0) => return Err(StoreError::Collision),
            other => return Err(corrupt(format!("unexpected create answer {other:?}"))),
        }
        self.cache.put(ticket, record.clone(), meta);
        self.replicated(&written)
    }
}

/// Watches Sentinel's `+switch-master` announcements and drops the
/// connection (and the near cache) at once, instead of waiting for a failed
/// request to notice.
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

/// The metadata a script answered (`false`: the session is gone).
fn answered_meta(v: &Value) -> Result<Option<Meta>, StoreError> {
    match v {
        Value::Nil | Value::Boolean(false) => Ok(None),
        v => text(v)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(Meta::parse)
            .map(Some)
            .ok_or_else(|| corrupt(format!("unexpected script answer {v:?}"))),
    }
}

/// Reads a change's answer: the new metadata, nothing, or a refusal.
fn applied(v: &Value) -> Result<Option<Meta>, StoreError> {
    match v {
        Value::Array(items) => match items.first().and_then(text) {
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
        },
        v => answered_meta(v),
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.create_record(record).await
    }

    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        if self.near {
            if let Some(cached) = self.cache.get(id) {
                // Only a live copy is trusted: an expired-looking one may
                // have been extended by a touch whose push is in flight.
                if !cached.record.is_expired(load.now) {
                    if !load.should_refresh(&cached.record) {
                        return Ok(Some(cached.record.clone()));
                    }
                    if let Ok(answer) = self.touch(cached.record.clone(), load.now).await? {
                        return Ok(answer);
                    }
                }
                self.cache.forget(id);
            }
        }
        // Another writer may slip in between the read and the touch; a few
        // tries settle it (each is one round trip).
        for _ in 0..3 {
            let ticket = self.cache.ticket();
            let Some((record, meta)) = self.read(id).await? else {
                return Ok(None);
            };
            if record.is_expired(load.now) {
                // Redis drops the key at its TTL; nothing to write.
                return Ok(None);
            }
            if !load.should_refresh(&record) {
                self.cache.put(ticket, record.clone(), meta);
                return Ok(Some(record));
            }
            if let Ok(answer) = self.touch(record, load.now).await? {
                return Ok(answer);
            }
        }
        Err(StoreError::Unavailable(
            "the session kept changing while its access was recorded".into(),
        ))
    }

    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        self.change(id, id, delta, now).await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        // The prelude is useless before a `DEL` but cheap, and keeps one
        // shape for every pipeline `send` reads.
        let mut pipe = self.pipeline();
        pipe.cmd("DEL").arg(self.key(id));
        let written = self.write(id, pipe, true).await;
        self.cache.forget(id);
        let written = written?;
        let Value::Int(n) = written.value else {
            return Err(corrupt(format!(
                "unexpected DEL answer {:?}",
                written.value
            )));
        };
        self.replicated(&written)?;
        Ok(n > 0)
    }

    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        if !self.conn.is_cluster() {
            return self.change(old, new, delta, now).await;
        }
        // Different slots: read (from Redis, not the cache: this copy is
        // written back whole), create under the new ID, delete the old.
        let Some((mut record, _)) = self.read(old).await?.filter(|(r, _)| !r.is_expired(now))
        else {
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
        self.create_record(&record).await?;
        self.delete(old).await?;
        Ok(Some(record.version))
    }

    fn max_size(&self) -> usize {
        self.max_size
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
    fn script_answers_are_read() {
        let m = Value::BulkString(b"3,1000,1800000,0,900,12,1450000".to_vec());
        assert_eq!(applied(&m).unwrap().map(|m| m.version), Some(3));
        assert_eq!(applied(&Value::Nil).unwrap(), None);
        assert!(matches!(
            applied(&Value::Array(vec![Value::BulkString(b"conflict".to_vec())])),
            Err(StoreError::Conflict)
        ));
        assert!(matches!(
            applied(&Value::Array(vec![
                Value::BulkString(b"too_large".to_vec()),
                Value::BulkString(b"99".to_vec())
            ])),
            Err(StoreError::TooLarge { size: 99, .. })
        ));
        assert!(applied(&Value::BulkString(b"garbage".to_vec())).is_err());
    }
}
