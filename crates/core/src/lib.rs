//! The session model of tether: identifiers, records, deltas, expiry, the
//! [`SessionStore`] contract every strategy implements, and [`MemoryStore`].
//!
//! This crate does no network I/O. The HTTP side (cookies, the axum
//! extractor) lives in the `tether` crate; Redis and the replicated cluster
//! store live in their own crates and pass the same conformance suite
//! (`testing`, feature `testing`).
//!
//! # Life cycle of a session in a store
//! 1. [`SessionStore::create`] inserts a [`Record`] if its [`SessionId`] is free
//!    (a collision is reported, never overwritten).
//! 2. [`SessionStore::load`] returns it while live, recording the access lazily
//!    ([`Load::refresh_fraction`]).
//! 3. [`SessionStore::apply`] applies one request's [`Delta`] atomically: only
//!    the attributes that request changed, so concurrent requests that change
//!    different attributes never lose each other's writes.
//! 4. [`SessionStore::rotate`] moves it to a new ID (login, privilege change).
//! 5. [`SessionStore::delete`] ends it, or it expires: after [`Expiry::idle`]
//!    without a recorded access, or at its absolute deadline.
//!
//! # Security notes
//! Identifiers carry 128 bits from the OS CSPRNG and parse strictly; their
//! `Debug` form shows only a prefix, so logging a `SessionId` does not leak a
//! credential.

mod id;
mod memory;
pub mod placement;
pub mod principal;
mod record;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use id::{EncodedId, ParseIdError, SessionId, ID_LEN};
pub use memory::{MemoryStats, MemoryStore};
pub use principal::{LimitPolicy, PrincipalIndex, SessionLimit, PRINCIPAL};
pub use record::{millis, Delta, Expiry, Record, Timestamp};
pub use store::{BoxError, Load, SessionStore, StoreError, DEFAULT_MAX_SIZE};
