//! The tower middleware that gives every request a [`Session`].

mod service;

pub(crate) use service::Device;
pub use service::SessionService;

use std::sync::Arc;

use tether_core::SessionStore;
use tower_layer::Layer;

use crate::config::SessionConfig;
use crate::jwt::JwtSessions;
use crate::session::{principals_of, Backend};
use crate::users::Principals;
#[cfg(doc)]
use crate::Session;

/// Wraps a service so each request carries a [`Session`] backed by a store.
///
/// ```
/// use tether::{MemoryStore, SessionConfig, SessionLayer};
/// let layer = SessionLayer::new(MemoryStore::default())
///     .with_config(SessionConfig::default().with_secure(false));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct SessionLayer {
    backend: Backend,
    config: Arc<SessionConfig>,
}

impl std::fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// A layer over `store` with the default configuration.
    pub fn new(store: impl SessionStore) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A layer over a store shared with other code (to read its statistics, say).
    pub fn from_arc(store: Arc<dyn SessionStore>) -> Self {
        Self {
            backend: Backend::Store(store, Arc::default()),
            config: Arc::new(SessionConfig::default()),
        }
    }

    /// A layer whose sessions live in signed tokens held by the client.
    pub fn jwt(sessions: JwtSessions) -> Self {
        Self {
            backend: Backend::Jwt(Arc::new(sessions)),
            config: Arc::new(SessionConfig::default()),
        }
    }

    /// How many times `Session::modify` read again and retried because
    /// another request changed the attribute first, and how many times it
    /// gave up (409), through this layer so far.
    pub fn modify_retries(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Store(_, turns) => (
                turns.retries.load(std::sync::atomic::Ordering::Relaxed),
                turns.gave_up.load(std::sync::atomic::Ordering::Relaxed),
            ),
            Backend::Jwt(_) => (0, 0),
        }
    }

    /// Replaces the configuration.
    #[must_use]
    pub fn with_config(mut self, config: SessionConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// Every user's sessions, for operators: list and end them by principal
    /// (an admin page, `tether sessions`). `None` for tokens without a
    /// revocation store. Take it after [`SessionLayer::with_config`] (it
    /// reports to the configured listener).
    pub fn principals(&self) -> Option<Principals> {
        principals_of(&self.backend, self.config.listener.clone())
    }

    /// Runs the expiry reaper every `every` on the current Tokio runtime:
    /// sessions with a principal that expired are reported to the
    /// configured listener as [`crate::EventKind::Expired`] (at least once;
    /// every server may run one) and dropped from their user's index.
    /// `None` when there is no index (tokens without a revocation store).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn_reaper(&self, every: std::time::Duration) -> Option<tokio::task::JoinHandle<()>> {
        let principals = self.principals()?;
        let clock = self.config.clock.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = principals.reap(clock()).await {
                    tracing::warn!(error = %e, "the session expiry reaper failed; trying again");
                }
            }
        }))
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, self.backend.clone(), self.config.clone())
    }
}
