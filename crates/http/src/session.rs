//! The per-request [`Session`] handle.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use tether_core::principal::{InStore, Member, PrincipalIndex, PRINCIPAL};
use tether_core::{millis, Delta, Load, Record, SessionId, SessionStore, StoreError, Timestamp};
use tokio::sync::OnceCell;

use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::users::{emit, EndReason, EventKind, Principals, SessionInfo};

/// Handle to the current request's session.
///
/// Cheap to clone; every clone sees the same state. Nothing touches the store
/// until a method needs stored data, so a handler that never reads the session
/// costs no store I/O. Writes are collected as a [`Delta`] (only the
/// attributes this request changed) and saved once, after the handler, by the
/// [`crate::SessionLayer`] — unless the response is a 5xx.
///
/// Handlers take it as an axum extractor:
///
/// ```
/// use axum::{routing::post, Json, Router};
/// use tether::{MemoryStore, Session, SessionError, SessionLayer};
///
/// async fn login(session: Session, Json(member): Json<u64>) -> Result<&'static str, SessionError> {
///     session.cycle_id().await?; // a new ID at login defeats session fixation
///     session.insert("loginMember", member).await?;
///     Ok("ok")
/// }
///
/// let app: Router = Router::new()
///     .route("/login", post(login))
///     .layer(SessionLayer::new(MemoryStore::default()));
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    config: Arc<SessionConfig>,
    now: Timestamp,
    incoming: Option<SessionId>,
    /// The token the client sent (stateless mode).
    token: Option<String>,
    loaded: OnceCell<Option<Record>>,
    /// What the store holds after this request's own writes and re-reads
    /// (`modify`); when set it supersedes `loaded`.
    fresh: Mutex<Option<Option<Record>>>,
    /// Subject and expiry of the verified token (stateless mode).
    verified: std::sync::OnceLock<tether_jwt::Verified>,
    /// What the request says of the client's device (recorded at login).
    device: crate::layer::Device,
    /// The layer's user-session index (built once per layer, not per request).
    principals: Option<Principals>,
    state: Mutex<State>,
}

/// Where sessions live for a layer.
#[derive(Clone)]
pub(crate) enum Backend {
    /// Server-side, in a store; the client holds the ID. `Turns` lets
    /// this node's `modify`s of one session take turns.
    Store(Arc<dyn SessionStore>, Arc<Turns>),
    /// Client-side, in a signed token.
    Jwt(Arc<crate::jwt::JwtSessions>),
}

#[derive(Default)]
struct State {
    delta: Delta,
    /// The ID a new or rotated session will get.
    next_id: Option<SessionId>,
    rotate: bool,
    destroyed: bool,
    /// A store operation failed while the handler ran.
    failed: bool,
    /// The session ended (logout, expiry, a concurrent login) while this
    /// request was changing it.
    gone: bool,
}

/// What saving the session asks of the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Leave the response alone.
    Nothing,
    /// Hand this ID to the client (new, rotated, or re-sent to slide `Max-Age`).
    Issue(SessionId),
    /// Hand this token to the client (stateless mode).
    IssueToken(String),
    /// Tell the client to forget its ID.
    Remove,
    /// The session disappeared before this request's writes could be saved.
    Gone,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("incoming", &self.inner.incoming)
            .finish_non_exhaustive()
    }
}

/// A lock that a panic elsewhere does not poison for every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `modify`s of one session on this node, one at a time, and how
/// often they had to retry.
#[derive(Default)]
pub(crate) struct Turns {
    held: Mutex<std::collections::HashMap<SessionId, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    pub(crate) retries: std::sync::atomic::AtomicU64,
    pub(crate) gave_up: std::sync::atomic::AtomicU64,
}

impl Turns {
    fn of(&self, id: &SessionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut held = lock(&self.held);
        if let Some(turn) = held.get(id).and_then(std::sync::Weak::upgrade) {
            return turn;
        }
        if held.len() >= 1024 {
            held.retain(|_, t| t.strong_count() > 0);
        }
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        held.insert(*id, Arc::downgrade(&turn));
        turn
    }
}

/// The user-session index of `backend`: in the session store, or for
/// tokens in the revocation store (none without one).
pub(crate) fn principals_of(
    backend: &Backend,
    listener: Option<crate::users::Listener>,
) -> Option<Principals> {
    match backend {
        Backend::Store(store, _) => Some(Principals::new(
            PrincipalIndex::new(store.clone()),
            Arc::new(InStore(store.clone())),
            listener,
        )),
        Backend::Jwt(jwt) => jwt.revocation.as_ref().map(|r| {
            Principals::new(
                PrincipalIndex::new(r.store().clone()),
                Arc::new(crate::jwt::Tokens(r.clone())),
                listener,
            )
        }),
    }
}

/// The principal a record names.
fn principal_of(record: &Record) -> Option<String> {
    record
        .attributes
        .get(PRINCIPAL)
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
}

/// What `delta` does to the principal: `Some(Some(p))` names `p`,
/// `Some(None)` removes it, `None` leaves it.
fn principal_change(delta: &Delta) -> Option<Option<String>> {
    if let Some(change) = delta.changes.get(PRINCIPAL) {
        return Some(
            change
                .as_deref()
                .and_then(|raw| serde_json::from_str(raw.get()).ok()),
        );
    }
    delta.clear.then_some(None)
}

/// How many times `modify` reads again and retries after another request
/// changed the attribute first, before answering 409.
const MODIFY_TRIES: u32 = 16;

/// A random wait before try `attempt` of `modify`: up to 0.25 ms doubled
/// per lost race, at most 20 ms.
fn backoff(attempt: u32) -> std::time::Duration {
    let cap_us = (250u64 << attempt.min(7)).min(20_000);
    let r = u64::from_le_bytes(
        SessionId::random().as_bytes()[..8]
            .try_into()
            .unwrap_or_default(),
    );
    std::time::Duration::from_micros(r % cap_us)
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Box<RawValue>, SessionError> {
    serde_json::value::to_raw_value(value).map_err(|source| SessionError::Encode {
        key: key.to_string(),
        source,
    })
}

fn decode<T: DeserializeOwned>(key: &str, raw: &RawValue) -> Result<T, SessionError> {
    serde_json::from_str(raw.get()).map_err(|source| SessionError::Decode {
        key: key.to_string(),
        source,
    })
}

impl Session {
    pub(crate) fn new(
        backend: Backend,
        config: Arc<SessionConfig>,
        principals: Option<Principals>,
        incoming: Option<SessionId>,
        token: Option<String>,
        device: crate::layer::Device,
    ) -> Self {
        let now = (config.clock)();
        Self {
            inner: Arc::new(Inner {
                backend,
                config,
                now,
                incoming,
                token,
                loaded: OnceCell::new(),
                fresh: Mutex::new(None),
                verified: std::sync::OnceLock::new(),
                device,
                principals,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Verifies the client's token (stateless mode): a token that does not
    /// verify is "no session"; a revocation check that cannot be made is an error.
    async fn open_token(
        &self,
        jwt: &crate::jwt::JwtSessions,
    ) -> Result<Option<Record>, StoreError> {
        let Some(token) = &self.inner.token else {
            return Ok(None);
        };
        let verified = match jwt.codec.decode(token, self.inner.now) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(reason = %e, "session token refused");
                return Ok(None);
            }
        };
        if let Some(revocation) = &jwt.revocation {
            if revocation.is_revoked(&verified, self.inner.now).await? {
                tracing::debug!("session token revoked");
                return Ok(None);
            }
        }
        let record = verified.record.clone();
        let _ = self.inner.verified.set(verified);
        Ok(Some(record))
    }

    /// The stored session, loaded at most once per request.
    async fn record(&self) -> Result<Option<&Record>, SessionError> {
        let loaded = match &self.inner.backend {
            Backend::Store(store, _) => {
                let Some(id) = self.inner.incoming else {
                    return Ok(None);
                };
                let load =
                    Load::refreshing_fraction(self.inner.now, self.inner.config.refresh_fraction);
                self.inner
                    .loaded
                    .get_or_try_init(|| store.load(&id, load))
                    .await
            }
            Backend::Jwt(jwt) => {
                self.inner
                    .loaded
                    .get_or_try_init(|| self.open_token(jwt))
                    .await
            }
        };
        match loaded {
            Ok(record) => Ok(record.as_ref()),
            Err(e) => {
                lock(&self.inner.state).failed = true;
                Err(SessionError::Store(e))
            }
        }
    }

    /// Reads attribute `key`.
    ///
    /// ```
    /// # async fn handler(session: tether::Session) -> Result<(), tether::SessionError> {
    /// let member: Option<u64> = session.get("loginMember").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`SessionError::Store`] if the session had to be loaded and the store
    /// failed; [`SessionError::Decode`] if the value is not a `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        {
            let state = lock(&self.inner.state);
            if let Some(change) = state.delta.changes.get(key) {
                return change.as_deref().map(|raw| decode(key, raw)).transpose();
            }
            if state.delta.clear || state.destroyed {
                return Ok(None);
            }
        }
        if let Some(fresh) = &*lock(&self.inner.fresh) {
            return fresh
                .as_ref()
                .and_then(|r| r.attributes.get(key))
                .map(|raw| decode(key, raw))
                .transpose();
        }
        let record = self.record().await?;
        record
            .and_then(|r| r.attributes.get(key))
            .map(|raw| decode(key, raw))
            .transpose()
    }

    /// Sets attribute `key` to `value`, creating the session if there is none.
    ///
    /// Does not load the session: a request that only writes costs one store
    /// operation, at save time. A blind write: if another request changes
    /// the same attribute at the same time, the last one saved wins. To
    /// change a value from what it was (a cart, a counter), use
    /// [`Session::modify`].
    ///
    /// ```
    /// # async fn handler(session: tether::Session) -> Result<(), tether::SessionError> {
    /// session.insert("loginMember", 7).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`SessionError::Encode`] if `value` does not serialize to JSON;
    /// [`SessionError::TooLarge`] if it alone, or the loaded session with it,
    /// exceeds the store's size limit. Nothing is changed on error.
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        let raw = encode(key, &value)?;
        // A token carries the whole session, so writing one needs the rest.
        if matches!(self.inner.backend, Backend::Jwt(_)) {
            self.record().await?;
        }
        if self.inner.config.principal_attribute.as_deref() == Some(key) {
            let principal =
                serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_string());
            self.set_raw(PRINCIPAL, Some(encode(PRINCIPAL, &principal)?))?;
        }
        self.set_raw(key, Some(raw))
    }

    /// Names the session's principal (the logged-in user): the session
    /// joins the user's session list, counts against the session limit,
    /// and ends with "log out everywhere". Call it at login, with
    /// [`Session::cycle_id`]. (Or configure
    /// [`SessionConfig::with_principal_attribute`].)
    ///
    /// # Errors
    /// As [`Session::insert`].
    pub async fn set_principal(&self, principal: impl Into<String>) -> Result<(), SessionError> {
        self.insert(PRINCIPAL, principal.into()).await
    }

    /// The session's principal, if it has one.
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn principal(&self) -> Result<Option<String>, SessionError> {
        self.get(PRINCIPAL).await
    }

    /// The user's sessions: every live session of this session's principal
    /// (this one marked `current`), longest-standing first; empty when the
    /// session has no principal.
    ///
    /// # Errors
    /// [`SessionError::Store`]; [`SessionError::Unsupported`] for tokens
    /// without a revocation store (there is nowhere to list them).
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, SessionError> {
        let Some(principal) = self.principal().await? else {
            return Ok(Vec::new());
        };
        let principals = self.principals()?;
        let current = self.current_id();
        let listed = principals
            .index()
            .sessions(&principal, principals.sessions(), self.inner.now)
            .await
            .map_err(|e| self.store_failed(e))?;
        Ok(listed
            .iter()
            .map(|l| SessionInfo::of(&l.id, &l.member, l.record.as_ref(), current.as_ref()))
            .collect())
    }

    /// Ends the user's session named `reference` ([`SessionInfo::reference`]);
    /// `Ok(false)` if no session of this user has that name. Ending the
    /// current session is a logout.
    ///
    /// # Errors
    /// As [`Session::sessions`].
    pub async fn end_session(&self, reference: &str) -> Result<bool, SessionError> {
        let Some(principal) = self.principal().await? else {
            return Ok(false);
        };
        let principals = self.principals()?;
        let now = self.inner.now;
        let listed = principals
            .index()
            .sessions(&principal, principals.sessions(), now)
            .await
            .map_err(|e| self.store_failed(e))?;
        let Some(target) = listed.iter().find(|l| l.id.reference() == reference) else {
            return Ok(false);
        };
        if Some(target.id) == self.current_id() {
            self.destroy().await?;
            return Ok(true);
        }
        let ended = principals
            .index()
            .end_one(&principal, &target.id, principals.sessions(), now)
            .await
            .map_err(|e| self.store_failed(e))?;
        if ended {
            emit(
                principals.listener(),
                EventKind::Destroyed {
                    reason: EndReason::Revoked,
                },
                &target.id,
                Some(&principal),
                now,
            );
        }
        Ok(ended)
    }

    /// Ends every session of the user ("log out everywhere"), or every one
    /// but this (`keep_current`); returns how many ended. Without
    /// `keep_current` this session ends too (a logout).
    ///
    /// # Errors
    /// As [`Session::sessions`].
    pub async fn end_all_sessions(&self, keep_current: bool) -> Result<usize, SessionError> {
        let Some(principal) = self.principal().await? else {
            return Ok(0);
        };
        let principals = self.principals()?;
        let now = self.inner.now;
        let current = self.current_id();
        let keep = if keep_current { current } else { None };
        let ended = principals
            .index()
            .end_all(&principal, keep.as_ref(), principals.sessions(), now)
            .await
            .map_err(|e| self.store_failed(e))?;
        if !keep_current {
            // Tokens issued before the index knew them (or whose index
            // write was lost) end too: a "not before" for the user.
            if let Backend::Jwt(jwt) = &self.inner.backend {
                if let Some(r) = &jwt.revocation {
                    r.revoke_subject(&principal, now)
                        .await
                        .map_err(|e| self.store_failed(e))?;
                }
            }
        }
        for id in &ended {
            // This request's own session ends by logging out.
            let reason = if Some(*id) == current {
                EndReason::Logout
            } else {
                EndReason::Revoked
            };
            emit(
                principals.listener(),
                EventKind::Destroyed { reason },
                id,
                Some(&principal),
                now,
            );
        }
        let mut count = ended.len();
        if let (false, Some(current)) = (keep_current, current) {
            self.destroy().await?;
            if !ended.contains(&current) {
                count += 1;
            }
        }
        Ok(count)
    }

    /// The ID this request's session has now (before this response).
    fn current_id(&self) -> Option<SessionId> {
        match &self.inner.backend {
            Backend::Store(..) => self
                .inner
                .loaded
                .get()
                .and_then(Option::as_ref)
                .map(|r| r.id)
                .or(self.inner.incoming),
            Backend::Jwt(_) => self.inner.verified.get().map(|v| v.record.id),
        }
    }

    /// The user-session index for this layer's sessions.
    fn principals(&self) -> Result<Principals, SessionError> {
        self.inner
            .principals
            .clone()
            .ok_or(SessionError::Unsupported(
                "listing and ending a user's sessions with tokens needs a revocation store",
            ))
    }

    /// Removes attribute `key` and returns its old value (saved with the
    /// response; against a concurrent [`Session::insert`] of the same
    /// attribute, the last one saved wins).
    ///
    /// ```
    /// # async fn handler(session: tether::Session) -> Result<(), tether::SessionError> {
    /// let old: Option<Vec<String>> = session.remove("cart").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Session::get`].
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let old = self.get::<T>(key).await?;
        if old.is_some() {
            self.set_raw(key, None)?;
        }
        Ok(old)
    }

    /// Changes attribute `key` in place, atomically: `f` gets the value as
    /// stored and its change is written only if nobody changed the
    /// attribute meanwhile; if another request did, the session is read
    /// again and `f` runs again on the fresh value (so `f` may run more than
    /// once and must only compute). Returns what the run that was stored
    /// returned. `None` means absent; leaving `None` removes it.
    ///
    /// Two tabs adding to one cart both land, on every store (memory,
    /// Redis, the replicated store): the write is conditional on the value
    /// read, in the same atomic step. Unlike [`Session::insert`] the change
    /// is written at once (together with this request's earlier changes),
    /// not after the handler; a response that then fails still keeps it.
    /// Costs one store round trip more than a read, and one more per lost
    /// race. With signed tokens (`jwt`) there is no shared state to
    /// condition on: two concurrent requests each issue a token and the
    /// client keeps the last, so one of the two changes wins, whole.
    ///
    /// A session that is new in this request, or that this request clears,
    /// destroys or rotates ([`Session::cycle_id`]), is changed in memory and
    /// saved after the handler like any change: no other request can hold
    /// its new ID yet.
    ///
    /// ```
    /// # async fn handler(session: tether::Session) -> Result<(), tether::SessionError> {
    /// let items = session
    ///     .modify("cart", |cart: &mut Option<Vec<String>>| {
    ///         let cart = cart.get_or_insert_with(Vec::new);
    ///         cart.push("book".into());
    ///         cart.len()
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Session::get`] and [`Session::insert`];
    /// [`SessionError::Contention`] (409) when the attribute changed under it
    /// on every one of 16 tries (nothing of this change is saved);
    /// [`SessionError::Gone`] (409) when the session ended meanwhile.
    pub async fn modify<T, R>(
        &self,
        key: &str,
        mut f: impl FnMut(&mut Option<T>) -> R,
    ) -> Result<R, SessionError>
    where
        T: Serialize + DeserializeOwned,
    {
        let Backend::Store(store, turns) = &self.inner.backend else {
            return self.modify_here(key, f).await;
        };
        let Some(id) = self.raceable().await? else {
            return self.modify_here(key, f).await;
        };
        let store = store.clone();
        // Requests of one session on this node change it one at a time:
        // they never collide in the store (those on other nodes still can,
        // and retry).
        let turn = turns.of(&id);
        let (_turn, waited) = match turn.try_lock() {
            Ok(t) => (t, false),
            Err(_) => (turn.lock().await, true),
        };
        if waited {
            // The request before this one has probably changed it.
            match store.load(&id, Load::at(self.inner.now)).await {
                Ok(fresh) => *lock(&self.inner.fresh) = Some(fresh),
                Err(e) => return Err(self.store_failed(e)),
            }
        }
        let now = self.inner.now;
        for attempt in 0..MODIFY_TRIES {
            let stored = {
                let fresh = lock(&self.inner.fresh);
                let current = match &*fresh {
                    Some(r) => r.as_ref(),
                    None => self.inner.loaded.get().and_then(Option::as_ref),
                };
                let Some(current) = current else {
                    drop(fresh);
                    return Err(self.ended());
                };
                current.attributes.get(key).cloned()
            };
            // This request's own earlier change of the key, if any, is what
            // `f` builds on; the condition is on the stored value.
            let pending = lock(&self.inner.state).delta.changes.get(key).cloned();
            let start = pending.unwrap_or_else(|| stored.clone());
            let mut value: Option<T> = start.as_deref().map(|raw| decode(key, raw)).transpose()?;
            let out = f(&mut value);
            let after = value.as_ref().map(|v| encode(key, v)).transpose()?;
            if start.as_ref().map(|r| r.get()) == after.as_ref().map(|r| r.get()) {
                return Ok(out);
            }
            let mut write = lock(&self.inner.state).delta.clone();
            write.changes.insert(key.to_string(), after);
            write.expect(key, stored);
            match store.apply(&id, &write, now).await {
                Ok(Some(_)) => {
                    self.written(&write);
                    return Ok(out);
                }
                Ok(None) => return Err(self.ended()),
                Err(StoreError::Conflict) => {
                    turns
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Another request changed it first: read it again.
                    // Writers that keep colliding take turns: a random wait,
                    // growing with each lost race, before the read (the
                    // first retry goes at once).
                    if attempt > 0 {
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                    match store.load(&id, Load::at(now)).await {
                        Ok(fresh) => *lock(&self.inner.fresh) = Some(fresh),
                        Err(e) => return Err(self.store_failed(e)),
                    }
                }
                Err(StoreError::TooLarge { size, .. }) => {
                    return Err(SessionError::TooLarge {
                        size,
                        limit: store.max_size(),
                    })
                }
                Err(e) => return Err(self.store_failed(e)),
            }
        }
        turns
            .gave_up
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(SessionError::Contention {
            key: key.to_string(),
            tries: MODIFY_TRIES,
        })
    }

    /// `modify` without a race to guard against: in this request's memory,
    /// saved after the handler.
    async fn modify_here<T, R>(
        &self,
        key: &str,
        f: impl FnOnce(&mut Option<T>) -> R,
    ) -> Result<R, SessionError>
    where
        T: Serialize + DeserializeOwned,
    {
        let mut value = self.get::<T>(key).await?;
        let before = value.as_ref().map(|v| encode(key, v)).transpose()?;
        let out = f(&mut value);
        let after = value.as_ref().map(|v| encode(key, v)).transpose()?;
        if before.as_ref().map(|r| r.get()) != after.as_ref().map(|r| r.get()) {
            self.set_raw(key, after)?;
        }
        Ok(out)
    }

    /// The session's ID when other requests can be changing it at the same
    /// time: it exists in the store and this request neither clears,
    /// destroys nor rotates it.
    async fn raceable(&self) -> Result<Option<SessionId>, SessionError> {
        {
            let state = lock(&self.inner.state);
            if state.destroyed || state.rotate || state.delta.clear {
                return Ok(None);
            }
        }
        let Some(id) = self.inner.incoming else {
            return Ok(None);
        };
        let exists = lock(&self.inner.fresh).as_ref().map(Option::is_some);
        let exists = match exists {
            Some(e) => e,
            None => self.record().await?.is_some(),
        };
        Ok(exists.then_some(id))
    }

    /// `write` is stored: it is no longer this request's to save, and the
    /// session as this request sees it moves on.
    fn written(&self, write: &Delta) {
        {
            let mut state = lock(&self.inner.state);
            for (k, v) in &write.changes {
                let same =
                    state.delta.changes.get(k).is_some_and(|p| {
                        p.as_ref().map(|r| r.get()) == v.as_ref().map(|r| r.get())
                    });
                if same {
                    state.delta.changes.remove(k);
                }
            }
            if state.delta.idle_ms == write.idle_ms {
                state.delta.idle_ms = None;
            }
        }
        let mut fresh = lock(&self.inner.fresh);
        // Copied from what was loaded once; later writes change it in place.
        let base = fresh.get_or_insert_with(|| self.inner.loaded.get().cloned().flatten());
        if let Some(r) = base {
            r.apply(write, self.inner.now);
        }
    }

    /// The session ended while this request changed it.
    fn ended(&self) -> SessionError {
        lock(&self.inner.state).gone = true;
        *lock(&self.inner.fresh) = Some(None);
        SessionError::Gone
    }

    fn store_failed(&self, e: StoreError) -> SessionError {
        lock(&self.inner.state).failed = true;
        SessionError::Store(e)
    }

    /// Removes every attribute; the session (and its ID) stays.
    pub async fn clear(&self) {
        if matches!(self.inner.backend, Backend::Jwt(_)) {
            // A failure is recorded and answered with 503 by the layer.
            let _ = self.record().await;
        }
        let mut state = lock(&self.inner.state);
        state.delta.changes.clear();
        state.delta.clear = true;
    }

    /// Gives the session a new ID when the response is sent, keeping its
    /// attributes; the old ID stops working. Call it at login and on any
    /// privilege change to defeat session fixation.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for stores that rotate eagerly.
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        if matches!(self.inner.backend, Backend::Jwt(_)) {
            self.record().await?;
        }
        let mut state = lock(&self.inner.state);
        if !state.destroyed {
            state.rotate = true;
            state.next_id = Some(self.fresh_id());
        }
        Ok(())
    }

    /// Ends the session: it is deleted from the store when the response is
    /// sent, and the client is told to drop its cookie. Attributes set after
    /// this call start a new session with a new ID.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for stores that delete eagerly.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        if matches!(self.inner.backend, Backend::Jwt(_)) {
            // The token's ID and subject are needed to revoke it.
            self.record().await?;
        }
        let mut state = lock(&self.inner.state);
        state.destroyed = true;
        state.rotate = false;
        state.delta = Delta::default();
        state.next_id = None;
        Ok(())
    }

    /// Sets this session's inactivity timeout (for example a longer one for
    /// "remember me"); saved with the response.
    pub fn set_idle_timeout(&self, idle: std::time::Duration) {
        lock(&self.inner.state).delta.idle_ms = Some(millis(idle));
    }

    /// The ID the client will hold after this response, if it will hold one.
    ///
    /// # Errors
    /// [`SessionError::Store`] if the session had to be loaded and the store failed.
    pub async fn id(&self) -> Result<Option<SessionId>, SessionError> {
        let new_id = |state: &mut State| {
            let sets = state.delta.changes.values().any(Option::is_some);
            sets.then(|| *state.next_id.get_or_insert_with(|| self.fresh_id()))
        };
        {
            let mut state = lock(&self.inner.state);
            if state.destroyed {
                return Ok(new_id(&mut state));
            }
            if state.rotate {
                return Ok(state.next_id);
            }
        }
        if let Some(r) = self.record().await? {
            return Ok(Some(r.id));
        }
        Ok(new_id(&mut lock(&self.inner.state)))
    }

    /// A fresh identifier: the store's choice (a replicated store picks one
    /// it owns), random for tokens.
    fn fresh_id(&self) -> SessionId {
        match &self.inner.backend {
            Backend::Store(store, _) => store.propose_id(),
            Backend::Jwt(_) => SessionId::random(),
        }
    }

    /// Whether a store operation failed while the handler ran; the layer then
    /// answers 503 whatever the handler did, so a failure is never mistaken
    /// for "not logged in".
    pub(crate) fn failed(&self) -> bool {
        lock(&self.inner.state).failed
    }

    fn set_raw(&self, key: &str, value: Option<Box<RawValue>>) -> Result<(), SessionError> {
        if let Backend::Jwt(jwt) = &self.inner.backend {
            return self.set_raw_token(jwt, key, value);
        }
        let Backend::Store(store, _) = &self.inner.backend else {
            unreachable!("matched above")
        };
        let limit = store.max_size();
        if let Some(raw) = &value {
            let size = key.len() + raw.get().len();
            if size > limit {
                return Err(SessionError::TooLarge { size, limit });
            }
        }
        let mut state = lock(&self.inner.state);
        let previous = state.delta.changes.insert(key.to_string(), value);
        // When the stored session is at hand, check the whole projected size
        // now, so the handler (not the save) sees the error.
        let fresh = lock(&self.inner.fresh);
        let current = match &*fresh {
            Some(r) => r.as_ref(),
            None => self.inner.loaded.get().and_then(Option::as_ref),
        };
        if let Some(record) = current {
            if !state.destroyed {
                let size = record.size_after(&state.delta);
                if size > limit {
                    match previous {
                        Some(p) => state.delta.changes.insert(key.to_string(), p),
                        None => state.delta.changes.remove(key),
                    };
                    return Err(SessionError::TooLarge { size, limit });
                }
            }
        }
        Ok(())
    }

    /// In stateless mode the limit is the token's length: sign the projected
    /// session and measure it, so the handler sees the error at `insert`.
    fn set_raw_token(
        &self,
        jwt: &crate::jwt::JwtSessions,
        key: &str,
        value: Option<Box<RawValue>>,
    ) -> Result<(), SessionError> {
        let mut state = lock(&self.inner.state);
        let previous = state.delta.changes.insert(key.to_string(), value);
        let base = match (state.destroyed, self.inner.loaded.get()) {
            (false, Some(Some(r))) => Some(r.clone()),
            _ => None,
        };
        let record = self.project(base, &state.delta, state.next_id);
        let len = jwt
            .codec
            .encode(&record)
            .map(|t| t.len())
            .unwrap_or(usize::MAX);
        if len > jwt.codec.max_len() {
            match previous {
                Some(p) => state.delta.changes.insert(key.to_string(), p),
                None => state.delta.changes.remove(key),
            };
            return Err(SessionError::TooLarge {
                size: len,
                limit: jwt.codec.max_len(),
            });
        }
        Ok(())
    }

    /// The session after `delta`: `base` changed, or a new one.
    fn project(&self, base: Option<Record>, delta: &Delta, id: Option<SessionId>) -> Record {
        let now = self.inner.now;
        match base {
            Some(mut r) => {
                if !delta.is_empty() {
                    r.apply(delta, now);
                }
                r
            }
            None => self.new_record(delta, id.unwrap_or_else(SessionId::random)),
        }
    }

    /// A new session `id` holding the sets (and idle change) of `delta`.
    fn new_record(&self, delta: &Delta, id: SessionId) -> Record {
        let mut r = Record::new(id, self.inner.now, self.inner.config.expiry);
        r.insert_sets(delta);
        if let Some(idle) = delta.idle_ms {
            r.idle_ms = idle;
        }
        r
    }

    /// Stateless save: sign a new token when anything changed or the sliding
    /// refresh is due; revoke on logout.
    async fn save_token(&self, jwt: &crate::jwt::JwtSessions) -> Result<Outcome, StoreError> {
        let now = self.inner.now;
        let (delta, rotate, destroyed, next_id) = {
            let mut state = lock(&self.inner.state);
            (
                std::mem::take(&mut state.delta),
                state.rotate,
                state.destroyed,
                state.next_id,
            )
        };
        if self.inner.loaded.get().is_none() && (!delta.is_empty() || rotate || destroyed) {
            // A handler that only set the idle timeout never read the token.
            if let Err(SessionError::Store(e)) = self.record().await {
                return Err(e);
            }
        }
        let current = self.inner.loaded.get().cloned().flatten();
        let revoke_current = |why: &'static str| async move {
            if let (Some(revocation), Some(verified)) = (&jwt.revocation, self.inner.verified.get())
            {
                tracing::debug!(why, "revoking the session token");
                revocation.revoke(verified, now).await?;
            }
            Ok::<(), StoreError>(())
        };
        let principals = &self.inner.principals;
        if destroyed {
            revoke_current("logout").await?;
            if let (Some(principals), Some(r)) = (principals, &current) {
                let p = principal_of(r);
                if let Some(p) = &p {
                    principals.index().remove(p, &[r.id], now).await?;
                }
                let reason = EndReason::Logout;
                emit(
                    principals.listener(),
                    EventKind::Destroyed { reason },
                    &r.id,
                    p.as_deref(),
                    now,
                );
            }
            let has_sets = delta.changes.values().any(Option::is_some);
            if !has_sets {
                return Ok(if self.inner.token.is_some() {
                    Outcome::Remove
                } else {
                    Outcome::Nothing
                });
            }
            let record = self.project(None, &delta, next_id);
            self.index_token(principals.as_ref(), None, &record, &delta)
                .await?;
            return self.issue(jwt, record);
        }
        let has_sets = delta.changes.values().any(Option::is_some);
        let mut record = match current.clone() {
            Some(r) => r,
            None if has_sets => {
                let record = self.project(None, &delta, next_id);
                self.index_token(principals.as_ref(), None, &record, &delta)
                    .await?;
                return self.issue(jwt, record);
            }
            None => return Ok(Outcome::Nothing),
        };
        let refresh = Load::refreshing_fraction(now, self.inner.config.refresh_fraction)
            .should_refresh(&record);
        if !rotate && delta.is_empty() && !refresh {
            return Ok(Outcome::Nothing);
        }
        if rotate {
            // The pre-login token stays valid until it expires unless revoked.
            revoke_current("rotation").await?;
            record.id = next_id.unwrap_or_else(SessionId::random);
            // "Log out everywhere" revokes sessions created before it; a
            // login after it must not inherit an older creation time.
            record.created = now;
        }
        if delta.is_empty() {
            record.last_access = record.last_access.max(now);
        } else {
            record.apply(&delta, now);
        }
        self.index_token(principals.as_ref(), current.as_ref(), &record, &delta)
            .await?;
        self.issue(jwt, record)
    }

    /// Keeps the user's token index (in the revocation store) in step with
    /// the token about to be issued: a login joins (within the session
    /// limit), a rotation renames, a later expiry extends.
    async fn index_token(
        &self,
        principals: Option<&Principals>,
        before: Option<&Record>,
        after: &Record,
        delta: &Delta,
    ) -> Result<(), StoreError> {
        let now = self.inner.now;
        let Some(principals) = principals else {
            return Ok(());
        };
        let (was, is) = (before.and_then(principal_of), principal_of(after));
        let rotated = before.is_some_and(|b| b.id != after.id);
        if let Some(p) = is.as_ref().filter(|p| was.as_ref() != Some(*p)) {
            self.admit(principals, p, &after.id, delta).await?;
            let kind = match before {
                Some(b) if rotated => EventKind::Rotated {
                    from: b.id.reference(),
                },
                _ => EventKind::Created,
            };
            emit(principals.listener(), kind, &after.id, Some(p), now);
        } else if let (Some(p), Some(b)) = (&is, before) {
            if rotated {
                principals.index().rename(p, &b.id, &after.id, now).await?;
                let from = b.id.reference();
                emit(
                    principals.listener(),
                    EventKind::Rotated { from },
                    &after.id,
                    Some(p),
                    now,
                );
            } else if after.expires_at() > b.expires_at() {
                if let Err(e) = principals
                    .index()
                    .extend(p, &after.id, after.expires_at().0, now)
                    .await
                {
                    tracing::warn!(error = %e, "could not extend a user's token index");
                }
            }
        }
        if let (Some(p), Some(b)) = (was.as_ref().filter(|p| is.as_ref() != Some(*p)), before) {
            principals.index().remove(p, &[b.id], now).await?;
        }
        Ok(())
    }

    fn issue(&self, jwt: &crate::jwt::JwtSessions, record: Record) -> Result<Outcome, StoreError> {
        let token = jwt
            .codec
            .encode(&record)
            .map_err(|e| StoreError::Corrupt(Box::new(e)))?;
        if token.len() > jwt.codec.max_len() {
            return Err(StoreError::TooLarge {
                size: token.len(),
                limit: jwt.codec.max_len(),
            });
        }
        Ok(Outcome::IssueToken(token))
    }

    /// Writes what this request changed; called once, after the handler.
    pub(crate) async fn save(&self) -> Result<Outcome, StoreError> {
        let store = match &self.inner.backend {
            Backend::Store(store, _) => store,
            Backend::Jwt(jwt) => return self.save_token(jwt).await,
        };
        let now = self.inner.now;
        let (delta, rotate, destroyed, next_id, gone) = {
            let mut state = lock(&self.inner.state);
            (
                std::mem::take(&mut state.delta),
                state.rotate,
                state.destroyed,
                state.next_id,
                state.gone,
            )
        };
        if gone && !destroyed {
            return Ok(Outcome::Gone);
        }
        // What the handler saw: Some(true) a live session, Some(false) none,
        // None not loaded (the cookie's ID is unverified).
        let seen = self.inner.loaded.get().map(Option::is_some);
        let existing = match seen {
            Some(false) => None,
            _ => self.inner.incoming,
        };

        let principals = self
            .inner
            .principals
            .as_ref()
            .expect("stores always have an index");
        let loaded = self.inner.loaded.get().and_then(Option::as_ref);
        let mut before = loaded.and_then(principal_of);

        if destroyed {
            if let Some(id) = existing {
                if seen.is_none() {
                    // The logout did not read the session: read it once to
                    // know whose index to leave.
                    before = match self.record().await {
                        Ok(r) => r.and_then(principal_of),
                        Err(SessionError::Store(e)) => return Err(e),
                        Err(_) => None,
                    };
                }
                let deleted = store.delete(&id).await?;
                if let Some(p) = &before {
                    principals.index().remove(p, &[id], now).await?;
                }
                if deleted {
                    let reason = EndReason::Logout;
                    emit(
                        principals.listener(),
                        EventKind::Destroyed { reason },
                        &id,
                        before.as_deref(),
                        now,
                    );
                }
            }
            if delta.is_empty() {
                return Ok(if self.inner.incoming.is_some() {
                    Outcome::Remove
                } else {
                    Outcome::Nothing
                });
            }
            return Ok(match self.create(&delta, next_id).await? {
                Outcome::Nothing if self.inner.incoming.is_some() => Outcome::Remove,
                outcome => outcome,
            });
        }

        // A session not read this request is taken to have no principal:
        // a login must not cost a read. (Had it one, its old ID is gone
        // after the rotation: a dead member, skipped and reaped.)
        let after = match principal_change(&delta) {
            Some(change) => change,
            None => before.clone(),
        };
        let joins = after.as_ref().filter(|p| before.as_ref() != Some(*p));
        match existing {
            Some(old) if rotate => {
                let mut new = next_id.unwrap_or_else(|| self.fresh_id());
                for _ in 0..8 {
                    if let Some(p) = joins {
                        self.admit(principals, p, &new, &delta).await?;
                    }
                    let rotated = store.rotate(&old, &new, &delta, now).await;
                    if let (Some(p), false) = (joins, matches!(rotated, Ok(Some(_)))) {
                        // Not written: the reservation goes (best effort; a
                        // member without a session holds no slot anyway).
                        let _ = principals.index().remove(p, &[new], now).await;
                    }
                    match rotated {
                        Ok(Some(_)) => {
                            if let Some(p) = &before {
                                if after.as_ref() == Some(p) {
                                    principals.index().rename(p, &old, &new, now).await?;
                                } else {
                                    principals.index().remove(p, &[old], now).await?;
                                }
                            }
                            let from = old.reference();
                            emit(
                                principals.listener(),
                                EventKind::Rotated { from },
                                &new,
                                after.as_deref(),
                                now,
                            );
                            return Ok(Outcome::Issue(new));
                        }
                        Ok(None) => return self.create(&delta, Some(new)).await,
                        Err(StoreError::Collision) => new = self.fresh_id(),
                        Err(e) => return Err(e),
                    }
                }
                Err(StoreError::Collision)
            }
            Some(id) if !delta.is_empty() => {
                if let Some(p) = joins {
                    self.admit(principals, p, &id, &delta).await?;
                }
                let applied = store.apply(&id, &delta, now).await;
                if let (Some(p), false) = (joins, matches!(applied, Ok(Some(_)))) {
                    let _ = principals.index().remove(p, &[id], now).await;
                }
                match applied? {
                    Some(_) => {
                        if let Some(p) = before.as_ref().filter(|p| after.as_ref() != Some(*p)) {
                            principals.index().remove(p, &[id], now).await?;
                        }
                        Ok(self.slide(id))
                    }
                    // Gone meanwhile: expired, logged out, or rotated by a
                    // concurrent login. A client-supplied ID is never brought
                    // back, and a fresh session's cookie could overwrite the one
                    // the concurrent login just issued: save nothing, say so.
                    None => Ok(Outcome::Gone),
                }
            }
            Some(id) => {
                let refreshed = loaded.filter(|r| r.last_access == now);
                if let (Some(r), Some(p)) = (refreshed, &before) {
                    // The session's expiry slid: its index must outlive it.
                    // A hint only (the reaper checks before reporting), so
                    // a failure here fails nothing.
                    if let Err(e) = principals
                        .index()
                        .extend(p, &id, r.expires_at().0, now)
                        .await
                    {
                        tracing::warn!(error = %e, "could not extend a user's session index");
                    }
                }
                Ok(if refreshed.is_some() {
                    self.slide(id)
                } else {
                    Outcome::Nothing
                })
            }
            None => self.create(&delta, next_id).await,
        }
    }

    /// Reserves session `id` in principal `p`'s index within the session
    /// limit, and reports the sessions evicted to make room.
    async fn admit(
        &self,
        principals: &Principals,
        p: &str,
        id: &SessionId,
        delta: &Delta,
    ) -> Result<(), StoreError> {
        let now = self.inner.now;
        let idle = delta
            .idle_ms
            .unwrap_or_else(|| millis(self.inner.config.expiry.idle));
        let mut device = self.inner.device.describe();
        if let Some(node) = &self.inner.config.node {
            device.insert("node".into(), node.clone());
        }
        let member = Member {
            joined: now.0,
            expires: now.0.saturating_add(idle),
            device,
            lease: 0,
        };
        let evicted = principals
            .index()
            .admit(
                p,
                id,
                member,
                self.inner.config.session_limit,
                principals.sessions(),
                now,
            )
            .await?;
        for e in &evicted {
            let reason = EndReason::Evicted;
            emit(
                principals.listener(),
                EventKind::Destroyed { reason },
                e,
                Some(p),
                now,
            );
        }
        Ok(())
    }

    /// Re-sends the cookie when it has a `Max-Age`, so the browser's expiry
    /// slides with the session's.
    fn slide(&self, id: SessionId) -> Outcome {
        if self.inner.config.max_age.is_some() {
            Outcome::Issue(id)
        } else {
            Outcome::Nothing
        }
    }

    /// Creates a new session from the sets in `delta`; nothing if it sets nothing.
    async fn create(&self, delta: &Delta, id: Option<SessionId>) -> Result<Outcome, StoreError> {
        let mut record = self.new_record(delta, id.unwrap_or_else(|| self.fresh_id()));
        // No removal cookie for a stale ID here: a concurrent request may
        // just have rotated it, and removing the cookie would log the user out.
        if record.attributes.is_empty() {
            return Ok(Outcome::Nothing);
        }
        let Backend::Store(store, _) = &self.inner.backend else {
            unreachable!("stateless sessions are never created in a store")
        };
        let principals = self
            .inner
            .principals
            .as_ref()
            .expect("stores always have an index");
        let principal = principal_of(&record);
        let now = self.inner.now;
        for _ in 0..8 {
            if let Some(p) = &principal {
                self.admit(principals, p, &record.id, delta).await?;
            }
            let created = store.create(&record).await;
            if let (Some(p), false) = (&principal, created.is_ok()) {
                let _ = principals.index().remove(p, &[record.id], now).await;
            }
            match created {
                Ok(()) => {
                    emit(
                        principals.listener(),
                        EventKind::Created,
                        &record.id,
                        principal.as_deref(),
                        now,
                    );
                    return Ok(Outcome::Issue(record.id));
                }
                Err(StoreError::Collision) => record.id = self.fresh_id(),
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Collision)
    }
}
