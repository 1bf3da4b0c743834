//! The stateless (`jwt`) strategy for [`crate::SessionLayer`].

use tether_jwt::{JwtCodec, Revocation};

/// Stateless sessions: the layer keeps each session in a signed token the
/// client holds (cookie `SESSION`, or `Authorization: Bearer`), reissued
/// when it changes or nears expiry. Handlers use the same [`crate::Session`] API.
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tether::{JwtSessions, SessionLayer};
/// let codec = tether_jwt::JwtCodec::from_key_file("keys.toml".as_ref())?
///     .with_subject_attribute("loginMember");
/// let layer = SessionLayer::jwt(JwtSessions::new(codec));
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Debug)]
pub struct JwtSessions {
    pub(crate) codec: JwtCodec,
    pub(crate) revocation: Option<Revocation>,
}

impl JwtSessions {
    /// Tokens signed and verified by `codec`, without revocation: a token is
    /// valid until it expires, logout only drops the cookie.
    pub fn new(codec: JwtCodec) -> Self {
        Self {
            codec,
            revocation: None,
        }
    }

    /// Checks every token against `revocation` (one store read per request)
    /// so logout and "log out everywhere" take effect at once.
    #[must_use]
    pub fn with_revocation(mut self, revocation: Revocation) -> Self {
        self.revocation = Some(revocation);
        self
    }

    /// The codec (for the JWKS document, say).
    pub fn codec(&self) -> &JwtCodec {
        &self.codec
    }

    /// The revocation lists, if checked.
    pub fn revocation(&self) -> Option<&Revocation> {
        self.revocation.as_ref()
    }
}

/// Tokens seen by a user's session index: a token is live until its expiry
/// unless revoked; ending one revokes it. The index lives in the
/// revocation store (a token's session is nowhere else).
pub(crate) struct Tokens(pub(crate) Revocation);

#[async_trait::async_trait]
impl tether_core::principal::Sessions for Tokens {
    async fn live(
        &self,
        principal: &str,
        id: &tether_core::SessionId,
        member: &tether_core::principal::Member,
        now: tether_core::Timestamp,
    ) -> Result<Option<Option<tether_core::Record>>, tether_core::StoreError> {
        if member.expires <= now.0 {
            return Ok(None);
        }
        let revoked = self
            .0
            .is_revoked_id(
                Some(principal),
                id,
                tether_core::Timestamp(member.joined),
                now,
            )
            .await?;
        Ok((!revoked).then_some(None))
    }

    async fn end(
        &self,
        principal: &str,
        id: &tether_core::SessionId,
        member: &tether_core::principal::Member,
        now: tether_core::Timestamp,
    ) -> Result<(), tether_core::StoreError> {
        self.0
            .revoke_id(
                Some(principal),
                id,
                tether_core::Timestamp(member.expires),
                now,
            )
            .await
    }
}
