//! A user's sessions, seen from the app: the device list, revocation,
//! lifecycle events.

use std::sync::Arc;

use serde::Serialize;
use tether_core::principal::{InStore, Member, PrincipalIndex, Sessions};
use tether_core::{Record, SessionId, SessionStore, StoreError, Timestamp};

/// One of a user's sessions, as a device list shows it. The session's ID is
/// never shown: `reference` names it (see [`SessionId::reference`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// A stable, non-secret name for the session.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Whether it is the session of the request asking.
    pub current: bool,
    /// When the session was created, ms since the epoch.
    pub created: u64,
    /// When it was last used, as recorded (ms; the store records accesses
    /// lazily), when known.
    pub last_access: Option<u64>,
    /// When it logged in, ms.
    pub logged_in: u64,
    /// When it expires unless used, ms.
    pub expires: u64,
    /// The browser's `User-Agent` at login, if recorded.
    pub user_agent: Option<String>,
    /// The client's address at login, if recorded.
    pub address: Option<String>,
    /// The server that served the login, if named.
    pub node: Option<String>,
}

impl SessionInfo {
    pub(crate) fn of(
        id: &SessionId,
        member: &Member,
        record: Option<&Record>,
        current: Option<&SessionId>,
    ) -> Self {
        let device = |k: &str| member.device.get(k).cloned();
        Self {
            reference: id.reference(),
            current: current == Some(id),
            created: record.map_or(member.joined, |r| r.created.0),
            last_access: record.map(|r| r.last_access.0),
            logged_in: member.joined,
            expires: record.map_or(member.expires, |r| r.expires_at().0),
            user_agent: device("user_agent"),
            address: device("address"),
            node: device("node"),
        }
    }
}

/// Why a session ended before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The user logged out.
    Logout,
    /// The user, or an operator, revoked it.
    Revoked,
    /// A login beyond the session limit made room.
    Evicted,
}

/// What happened to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A session was created.
    Created,
    /// The session got a new ID (login); `from` is the old one's reference.
    Rotated {
        /// The old ID's reference.
        from: String,
    },
    /// The session was ended.
    Destroyed {
        /// Why.
        reason: EndReason,
    },
    /// The session expired (found by a reaper; reported at least once).
    Expired,
}

/// A session lifecycle event, for an audit log or a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionEvent {
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// Which session ([`SessionId::reference`]).
    #[serde(rename = "ref")]
    pub session: String,
    /// Whose, when it has a principal.
    pub principal: Option<String>,
    /// When, ms since the epoch.
    pub at: u64,
}

/// Receives [`SessionEvent`]s.
pub type Listener = Arc<dyn Fn(SessionEvent) + Send + Sync>;

pub(crate) fn emit(
    listener: Option<&Listener>,
    kind: EventKind,
    id: &SessionId,
    principal: Option<&str>,
    at: Timestamp,
) {
    if let Some(l) = listener {
        l(SessionEvent {
            kind,
            session: id.reference(),
            principal: principal.map(str::to_string),
            at: at.0,
        });
    }
}

/// Every user's sessions, for an operator (an admin endpoint, the
/// `tether sessions` command): list and end them by principal, without a
/// request of that user.
#[derive(Clone)]
pub struct Principals {
    index: PrincipalIndex,
    sessions: Arc<dyn Sessions>,
    listener: Option<Listener>,
}

impl std::fmt::Debug for Principals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principals").finish_non_exhaustive()
    }
}

impl Principals {
    /// The principals of sessions kept in `store`.
    pub fn in_store(store: Arc<dyn SessionStore>) -> Self {
        Self {
            index: PrincipalIndex::new(store.clone()),
            sessions: Arc::new(InStore(store)),
            listener: None,
        }
    }

    pub(crate) fn new(
        index: PrincipalIndex,
        sessions: Arc<dyn Sessions>,
        listener: Option<Listener>,
    ) -> Self {
        Self {
            index,
            sessions,
            listener,
        }
    }

    /// Reports ended sessions to `listener` too.
    #[must_use]
    pub fn with_listener(mut self, listener: Listener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// `principal`'s live sessions, longest-standing first.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn list(
        &self,
        principal: &str,
        now: Timestamp,
    ) -> Result<Vec<SessionInfo>, StoreError> {
        Ok(self
            .index
            .sessions(principal, self.sessions.as_ref(), now)
            .await?
            .iter()
            .map(|l| SessionInfo::of(&l.id, &l.member, l.record.as_ref(), None))
            .collect())
    }

    /// Ends every session of `principal` ("disable the account"); returns
    /// how many.
    ///
    /// # Errors
    /// When the store fails; sessions ended before stay ended.
    pub async fn end_all(&self, principal: &str, now: Timestamp) -> Result<usize, StoreError> {
        let ended = self
            .index
            .end_all(principal, None, self.sessions.as_ref(), now)
            .await?;
        for id in &ended {
            emit(
                self.listener.as_ref(),
                EventKind::Destroyed {
                    reason: EndReason::Revoked,
                },
                id,
                Some(principal),
                now,
            );
        }
        Ok(ended.len())
    }

    /// Finds sessions that expired since the last call and reports them to
    /// the listener; returns how many. Every server may run it (a reaper's
    /// lease keeps two from reporting one expiry together).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn reap(&self, now: Timestamp) -> Result<usize, StoreError> {
        let listener = self.listener.clone();
        self.index
            .reap(self.sessions.as_ref(), now, &move |e| {
                emit(
                    listener.as_ref(),
                    EventKind::Expired,
                    &e.id,
                    Some(&e.principal),
                    now,
                );
            })
            .await
    }

    pub(crate) fn index(&self) -> &PrincipalIndex {
        &self.index
    }

    pub(crate) fn sessions(&self) -> &dyn Sessions {
        self.sessions.as_ref()
    }

    pub(crate) fn listener(&self) -> Option<&Listener> {
        self.listener.as_ref()
    }
}
