//! `tether lb`: a load balancer for session-holding fleets.
//!
//! It pins clients to servers (nginx-compatible `ip-hash`, an authenticated
//! route cookie), routes sessions to their owner for the replicated store,
//! spreads load (`round-robin`, `least-conn`, `p2c`, consistent `hash` with
//! bounded load), checks health actively and passively, and fails over.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_lb::{Balancer, BackendConfig, Config, PolicyKind};
//! let config = Config::new(
//!     "127.0.0.1:8080".parse()?,
//!     PolicyKind::Cookie,
//!     vec![
//!         BackendConfig { id: "A".into(), addr: "127.0.0.1:9001".into(), weight: 1 },
//!         BackendConfig { id: "B".into(), addr: "127.0.0.1:9002".into(), weight: 1 },
//!     ],
//! );
//! let lb = Balancer::bind(config, None).await?;
//! lb.run(std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! # How a request is served
//! 1. The client address is the peer, or, from a trusted proxy, the first
//!    untrusted hop of `X-Forwarded-For`.
//! 2. The policy orders the backends for this request; backends that are
//!    down are skipped, and draining ones serve only clients bound to them.
//! 3. Bodies up to `limits.buffer_body_bytes` are buffered so the request can
//!    be retried: a connect failure moves to the next backend for any method
//!    (nothing was sent); a reset or timeout before the response headers is
//!    retried only for idempotent methods. Tries and total time are bounded.
//! 4. The response streams back; the `cookie` policy adds or rewrites its
//!    route cookie. No backend usable: 503; none reachable or a broken
//!    answer: 502; a timeout: 504. A `101` to a forwarded WebSocket upgrade
//!    turns the connection into a tunnel to that backend.
//!
//! Clients speak HTTP/1.1 or HTTP/2, in the clear or over TLS (rustls,
//! certificates chosen by SNI); backends are always reached over pooled
//! HTTP/1.1 connections, and every protocol goes through the same planning,
//! policies and retries (`proxy` documents the stages).
//!
//! # Security notes
//! Route cookies carry an HMAC: a forged, tampered or stale one is ignored,
//! so a client cannot choose its server. `X-Forwarded-For` is believed only
//! from `trusted_proxies`. Request heads are limited in size and time
//! (`limits`), which also bounds idle keep-alive connections; bodies in
//! time as a whole; HTTP/2 streams, header lists, windows and resets have
//! their own limits. Fields a client lists in `Connection` are not removed
//! (they could strip `Authorization`). The admin API refuses requests from
//! web pages and can require a bearer token.

mod admin;
mod config;
mod h1;
mod health;
mod listener;
mod pool;
mod proxy;
mod redirect;
pub mod select;
mod tls;
mod upstream;

pub use admin::constant_time_eq;
pub use config::{
    parse_backend_flag, Backend, BackendConfig, Config, ConfigError, CookieConfig, HashConfig,
    HashKey, HealthConfig, LimitsConfig, PolicyKind, RetryConfig, SniCert, TlsConfig,
};
pub use pool::{Histogram, Member, Pool, State, Stats};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use select::{RouteCodec, Select};

/// One configuration generation; swapped whole on reload, so a request sees
/// one consistent configuration from start to end.
pub(crate) struct Generation {
    pub(crate) config: Config,
    pub(crate) pool: Pool,
    pub(crate) select: Box<dyn Select>,
    pub(crate) codec: Option<RouteCodec>,
    /// The TLS server configuration (certificates), when TLS is on.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

/// Balancer-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) reloads: AtomicU64,
    pub(crate) bad_gateway: AtomicU64,
    pub(crate) no_backend: AtomicU64,
    pub(crate) timeouts: AtomicU64,
}

impl Totals {
    /// Counts an error answer the balancer made itself (502, 503, 504).
    pub(crate) fn count_generated(&self, refusal: proxy::refusal::Refusal) {
        let counter = match refusal.status() {
            502 => &self.bad_gateway,
            503 => &self.no_backend,
            504 => &self.timeouts,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request as the balancer saw it, for live views.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestEvent {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    /// The node that answered (`X-Tether-Node`), if one did.
    pub backend: Option<String>,
    /// Time to response headers, ms.
    pub ms: f64,
}

pub(crate) struct Shared {
    pub(crate) current: ArcSwap<Generation>,
    pub(crate) events: tokio::sync::broadcast::Sender<RequestEvent>,
    pub(crate) totals: Totals,
    started: Instant,
    config_path: Option<PathBuf>,
    secret: Vec<u8>,
    resumption: tls::Resumption,
    /// The admin token, fixed at start like the admin address.
    pub(crate) admin_token: Option<String>,
    health_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set when the balancer stops: connections close once idle.
    pub(crate) stopping: AtomicBool,
    /// Wakes idle connections when `stopping` is set.
    pub(crate) stop: tokio::sync::Notify,
}

impl Shared {
    /// A try on backend `i` failed: count it, and eject the backend after
    /// too many in a row, unless that would eject more than the allowed share.
    pub(crate) fn record_failure(&self, g: &Generation, i: usize) {
        let h = &g.config.health;
        let stats = &g.pool.members[i].stats;
        let n = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if h.passive_failures == 0 || n < h.passive_failures {
            return;
        }
        let now = g.pool.now_ms();
        let eject = Config::ms(h.eject_ms);
        if stats.is_down(now, eject) {
            return;
        }
        let down = g
            .pool
            .members
            .iter()
            .filter(|m| m.stats.is_down(now, eject))
            .count();
        let allowed = g.pool.len() * h.max_ejected_percent as usize / 100;
        if down + 1 > allowed {
            tracing::warn!(backend = %g.pool.members[i].id, failures = n, "not ejecting: ejection cap reached");
            return;
        }
        if stats.mark_down(true, now) {
            tracing::warn!(backend = %g.pool.members[i].id, failures = n, "backend ejected after consecutive failures");
        }
    }

    /// A try on backend `i` succeeded.
    pub(crate) fn record_success(&self, g: &Generation, i: usize) {
        let stats = &g.pool.members[i].stats;
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        // Only a half-open retry of an ejected backend can succeed while it
        // is marked down: it is healthy again.
        if stats.is_ejected() && stats.mark_up() {
            tracing::info!(backend = %g.pool.members[i].id, "ejected backend answered again");
        }
    }
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The balancer was started from flags, not a file.
    #[error("no configuration file to reload (started without --config)")]
    NoFile,
    /// The new file is invalid.
    #[error("the new configuration is invalid")]
    Config(#[from] ConfigError),
}

fn build_generation(
    config: Config,
    previous: Option<&Pool>,
    started: Instant,
    secret: &[u8],
    resumption: &tls::Resumption,
) -> Result<Generation, ConfigError> {
    let backends = config.resolve()?;
    let tls = match &config.tls {
        Some(t) => Some(tls::server_config(t, resumption)?),
        None => None,
    };
    let pool = Pool::new(&backends, previous, started);
    let codec = (config.policy == PolicyKind::Cookie)
        .then(|| RouteCodec::new(&config.cookie.name, secret, config.cookie.secure));
    let select = select::build(&config, &pool, codec.as_ref())?;
    Ok(Generation {
        config,
        pool,
        select,
        codec,
        tls,
    })
}

/// Re-reads the configuration file and swaps it in without dropping
/// connections; backends keep their health and counters by ID.
///
/// # Errors
/// If there is no file or the new one is invalid; nothing changes then.
pub(crate) fn reload(shared: &Arc<Shared>) -> Result<(), ReloadError> {
    let path = shared.config_path.as_ref().ok_or(ReloadError::NoFile)?;
    let config = Config::from_file(path)?;
    let old = shared.current.load_full();
    if config.listen != old.config.listen
        || config.admin != old.config.admin
        || config.redirect_http != old.config.redirect_http
        || config.admin_token != old.config.admin_token
    {
        tracing::warn!(
            "listen, admin and redirect addresses and the admin token change only on restart; keeping the current ones"
        );
    }
    if config.tls.is_some() != old.config.tls.is_some() {
        return Err(ReloadError::Config(ConfigError::Invalid(
            "turning TLS on or off needs a restart (the listener would change protocol)".into(),
        )));
    }
    let generation = build_generation(
        config,
        Some(&old.pool),
        shared.started,
        &shared.secret,
        &shared.resumption,
    )?;
    shared.current.store(Arc::new(generation));
    restart_health(shared);
    shared.totals.reloads.fetch_add(1, Ordering::Relaxed);
    tracing::info!(path = %path.display(), "configuration reloaded");
    Ok(())
}

fn restart_health(shared: &Arc<Shared>) {
    let tasks = health::spawn_all(shared);
    let old = std::mem::replace(
        &mut *shared
            .health_tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        tasks,
    );
    for t in old {
        t.abort();
    }
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A handle for operating a running balancer from the same process.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Reloads the configuration file (what SIGHUP does).
    ///
    /// # Errors
    /// As the admin `/reload` call: no file, or an invalid one.
    pub fn reload(&self) -> Result<(), ReloadError> {
        reload(&self.shared)
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        admin::status_json(&self.shared)
    }

    /// A live stream of the requests served (lagging receivers skip).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<RequestEvent> {
        self.shared.events.subscribe()
    }
}

/// A bound, not yet running balancer.
pub struct Balancer {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    redirect: Option<TcpListener>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Connections the kernel queues for a listener before it refuses more
/// (capped by `net.core.somaxconn`). Rust's and tokio's default of 128
/// overflowed under bursts of new connections (500 TLS clients at once):
/// the dropped SYNs were retried a second later, which is a second of
/// latency for those clients. With `limits.max_connections`, this queue is
/// where connections beyond the limit wait.
const BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

impl Balancer {
    /// Validates `config` and binds its listeners. `config_path` is the file
    /// reloads re-read, if any.
    ///
    /// # Errors
    /// An invalid configuration or a port that cannot be bound.
    pub async fn bind(config: Config, config_path: Option<PathBuf>) -> Result<Self, StartError> {
        let secret = if config.cookie.secret.is_empty() {
            if config.policy == PolicyKind::Cookie {
                tracing::warn!("no cookie secret configured: using a random one; other balancer instances will not accept this one's route cookies");
            }
            let mut s = vec![0u8; 32];
            getrandom_fill(&mut s);
            s
        } else {
            config.cookie.secret.as_bytes().to_vec()
        };
        let started = Instant::now();
        let listener = bind(config.listen)?;
        let admin = match config.admin {
            Some(a) => Some(bind(a)?),
            None => None,
        };
        let redirect = match config.redirect_http {
            Some(a) => Some(bind(a)?),
            None => None,
        };
        let resumption = tls::Resumption::new()?;
        let admin_token = config.admin_token.clone();
        let generation = build_generation(config, None, started, &secret, &resumption)?;
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(generation),
            events: tokio::sync::broadcast::channel(1024).0,
            totals: Totals::default(),
            started,
            config_path,
            secret,
            resumption,
            admin_token,
            health_tasks: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
        });
        Ok(Self {
            shared,
            listener,
            admin,
            redirect,
        })
    }

    /// The client listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The redirect-to-HTTPS listener's address, if there is one.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// A handle for reloads and status.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests and tunnels finish (up to `limits.drain_timeout_ms`).
    ///
    /// # Errors
    /// Only for failures of the listener itself.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let Self {
            shared,
            listener,
            admin,
            redirect,
        } = self;
        restart_health(&shared);
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        if let Some(admin) = admin {
            let router = admin::router(shared.clone());
            let mut stopped = admin_stopped.clone();
            tokio::spawn(async move {
                let _ = axum::serve(admin, router)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
            });
        }
        if let Some(redirect) = redirect {
            let https_port = listener.local_addr()?.port();
            let mut stopped = admin_stopped.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = redirect::serve(redirect, https_port) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            });
        }
        let tls = shared.current.load().tls.is_some();
        let connections = listener::accept_loop(&shared, listener, tls, shutdown).await;
        let _ = stop_admin.send(true);
        listener::drain(&shared, connections).await;
        for t in shared
            .health_tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
        Ok(())
    }
}

fn getrandom_fill(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *b = fastrand::u8(..);
    }
    // Mix in the OS generator through a session ID so the key is unpredictable.
    for chunk in buf.chunks_mut(16) {
        let id = tether_core::SessionId::random();
        for (b, r) in chunk.iter_mut().zip(id.as_bytes()) {
            *b ^= r;
        }
    }
}
