//! Revoking stateless tokens through any session store.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tether_core::{Delta, Expiry, Load, Record, SessionId, SessionStore, StoreError, Timestamp};

use crate::Verified;

/// Deny-lists for tokens, kept in a [`SessionStore`].
///
/// - A token with a subject is checked against its user's entry, which
///   holds the revoked token IDs of that user and a "not before" time:
///   sessions created before it are revoked ("log out everywhere").
/// - A token without a subject is checked against an entry for its `jti`.
///
/// Either way the check is one store read per request. Entries live as long
/// as the tokens they revoke can (the store's own expiry removes them).
#[derive(Clone)]
pub struct Revocation {
    store: Arc<dyn SessionStore>,
    lifetime: Duration,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// How much longer than a token a deny entry lives: more than any leeway.
const MARGIN_MS: u64 = 10 * 60 * 1000;

fn derived(kind: &str, value: &str) -> SessionId {
    // Marked, so a deny entry can never be addressed by a client's cookie
    // in a store shared with sessions.
    SessionId::derived(&format!("jwt-{kind}"), value)
}

fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).expect("serde_json output is valid JSON")
}

impl Revocation {
    /// Deny-lists in `store`; `lifetime` is the longest a token can live
    /// (the absolute session lifetime), how long a user's entry is kept.
    pub fn new(store: Arc<dyn SessionStore>, lifetime: Duration) -> Self {
        Self { store, lifetime }
    }

    /// The store the deny-lists live in (a user's token index lives there
    /// too).
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Whether `token` has been revoked.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot answer: the caller
    /// must answer 503, not let a possibly revoked token through.
    pub async fn is_revoked(&self, token: &Verified, now: Timestamp) -> Result<bool, StoreError> {
        self.is_revoked_id(
            token.subject.as_deref(),
            &token.record.id,
            token.record.created,
            now,
        )
        .await
    }

    /// Whether the token `jti` of `subject`, whose session was created at
    /// `created`, has been revoked.
    ///
    /// # Errors
    /// As [`Revocation::is_revoked`].
    pub async fn is_revoked_id(
        &self,
        subject: Option<&str>,
        jti: &SessionId,
        created: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let jti = jti.to_string();
        match subject {
            Some(sub) => {
                let Some(entry) = self.store.load(&derived("sub", sub), Load::at(now)).await?
                else {
                    return Ok(false);
                };
                let not_before = entry
                    .attributes
                    .get("not_before")
                    .and_then(|v| v.get().parse::<u64>().ok())
                    .unwrap_or(0);
                // At or before: a session created in the same millisecond as
                // "log out everywhere" is one it meant to end.
                Ok(created.0 <= not_before || entry.attributes.contains_key(&format!("jti:{jti}")))
            }
            None => Ok(self
                .store
                .load(&derived("jti", &jti), Load::at(now))
                .await?
                .is_some()),
        }
    }

    /// Revokes one token (logout).
    ///
    /// # Errors
    /// When the store fails; the logout must then not be reported as done.
    pub async fn revoke(&self, token: &Verified, now: Timestamp) -> Result<(), StoreError> {
        self.revoke_id(
            token.subject.as_deref(),
            &token.record.id,
            token.expires,
            now,
        )
        .await
    }

    /// Revokes the token `jti` of `subject`, valid until `expires`.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn revoke_id(
        &self,
        subject: Option<&str>,
        jti: &SessionId,
        expires: Timestamp,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let jti = jti.to_string();
        match subject {
            Some(sub) => {
                let mut delta = Delta::default();
                delta.set(format!("jti:{jti}"), raw(expires.0.to_string()));
                // The entry must outlive the token it revokes.
                let needed = expires.0.saturating_sub(now.0) + MARGIN_MS;
                delta.idle_ms = Some(needed.max(tether_core::millis(self.lifetime)));
                match self.upsert(&derived("sub", sub), &delta, now).await {
                    // Too many revoked tokens for one user: revoking all
                    // of them is the safe answer.
                    Err(StoreError::TooLarge { .. }) => self.revoke_subject(sub, now).await,
                    other => other,
                }
            }
            None => {
                let until = expires.0.saturating_sub(now.0) + MARGIN_MS;
                let expiry = Expiry {
                    idle: Duration::from_millis(until),
                    absolute: None,
                };
                let mut entry = Record::new(derived("jti", &jti), now, expiry);
                entry
                    .attributes
                    .insert("revoked".into(), raw("true".into()));
                match self.store.create(&entry).await {
                    Ok(()) | Err(StoreError::Collision) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Revokes every session of `subject` created until now ("log out everywhere").
    ///
    /// # Errors
    /// When the store fails.
    pub async fn revoke_subject(&self, subject: &str, now: Timestamp) -> Result<(), StoreError> {
        let mut delta = Delta {
            clear: true,
            ..Delta::default()
        };
        delta.set("not_before", raw(now.0.to_string()));
        self.upsert(&derived("sub", subject), &delta, now).await
    }

    async fn upsert(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        for _ in 0..3 {
            if self.store.apply(id, delta, now).await?.is_some() {
                return Ok(());
            }
            let idle = delta.idle_ms.map_or(self.lifetime, Duration::from_millis);
            let expiry = Expiry {
                idle: idle + Duration::from_millis(MARGIN_MS),
                absolute: None,
            };
            let mut entry = Record::new(*id, now, expiry);
            entry.insert_sets(delta);
            match self.store.create(&entry).await {
                Ok(()) => return Ok(()),
                // Created concurrently: apply to it.
                Err(StoreError::Collision) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Collision)
    }
}
