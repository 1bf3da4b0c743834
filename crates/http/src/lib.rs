//! tether keeps users logged in when many servers sit behind a load balancer.
//!
//! Handlers use one [`Session`] API; where sessions live is configuration:
//! this process's memory ([`MemoryStore`], the `local` strategy), Redis, a
//! replicated cluster of the servers themselves, or a signed token.
//!
//! ```
//! use axum::{routing::{get, post}, Json, Router};
//! use tether::{MemoryStore, Session, SessionConfig, SessionError, SessionLayer};
//!
//! async fn login(session: Session, Json(member): Json<u64>) -> Result<&'static str, SessionError> {
//!     session.cycle_id().await?; // fixation defence
//!     session.insert("loginMember", member).await?;
//!     Ok("welcome")
//! }
//!
//! async fn mypage(session: Session) -> Result<String, SessionError> {
//!     Ok(match session.get::<u64>("loginMember").await? {
//!         Some(member) => format!("member {member}"),
//!         None => "not logged in".into(),
//!     })
//! }
//!
//! let app: Router = Router::new()
//!     .route("/login", post(login))
//!     .route("/mypage", get(mypage))
//!     .layer(SessionLayer::new(MemoryStore::default()).with_config(SessionConfig::default()));
//! ```
//!
//! # Life cycle of a request
//! 1. The layer reads the ID from the `SESSION` cookie (or a configured header
//!    such as `X-Auth-Token`). A value that does not parse is "no session".
//! 2. The handler's first read loads the session: one store operation, which
//!    also records the access once a quarter of the inactivity window has
//!    passed. A handler that never reads costs nothing.
//! 3. Writes are collected as a delta of the attributes that changed.
//!    [`Session::modify`] is the exception: it writes at once, conditionally
//!    on the value it read, and runs again on a fresh value if another
//!    request changed the attribute meanwhile, so concurrent changes of one
//!    attribute never lose each other. [`Session::insert`] is a blind write
//!    (the last writer wins).
//! 4. After the handler, unless the response is a 5xx, the delta is saved in
//!    one store operation, and a new or rotated ID goes back in `Set-Cookie`.
//!
//! # Failure
//! If the store fails during the request, the response is 503 with a plain
//! explanation and `Retry-After`, whatever the handler returned: an outage
//! never looks like a logout, and a session is never silently replaced.
//! A session over the store's size limit is refused (413) and the stored one
//! is untouched.
//!
//! # Security notes
//! - IDs are 128-bit CSPRNG values; forged, truncated or over-long cookies never reach the store.
//! - Call [`Session::cycle_id`] at login: the pre-login ID stops working.
//! - The cookie is `HttpOnly`, `SameSite=Lax` and `Secure` by default; the
//!   removal cookie repeats every attribute so browsers really drop it.
//! - A response that sets the cookie is marked `Cache-Control: private`
//!   (unless the handler chose a policy) so a shared cache cannot hand one
//!   user's session to others.

mod config;
mod error;
mod extract;
mod jwt;
mod layer;
mod session;
mod users;

pub use config::{Clock, SameSite, SessionConfig};
pub use error::SessionError;
pub use jwt::JwtSessions;
pub use layer::{SessionLayer, SessionService};
pub use session::Session;
pub use tether_core::{
    Delta, Expiry, LimitPolicy, Load, MemoryStore, Record, SessionId, SessionLimit, SessionStore,
    StoreError, Timestamp,
};
pub use users::{EndReason, EventKind, Listener, Principals, SessionEvent, SessionInfo};
