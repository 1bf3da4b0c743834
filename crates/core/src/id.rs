//! Session identifiers.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Length of the textual form: 16 bytes in base64url without padding.
pub const ID_LEN: usize = 22;

/// The bit of the last byte that marks [`SessionId::derived`] identifiers;
/// random ones have it clear (127 random bits).
const DERIVED: u8 = 0x80;

/// A session identifier: 127 bits from the operating system's CSPRNG (one
/// bit tells sessions from the store's own records, see
/// [`SessionId::derived`]).
///
/// Its textual form is 22 characters of base64url without padding. The parser
/// is strict: anything that is not exactly the canonical encoding of 16 bytes is
/// rejected, so a forged, truncated or padded cookie never reaches a store.
///
/// ```
/// use tether_core::SessionId;
/// let id = SessionId::random();
/// let text = id.to_string();
/// assert_eq!(text.len(), 22);
/// assert_eq!(text.parse::<SessionId>().unwrap(), id);
/// assert!("not-an-id".parse::<SessionId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId([u8; 16]);

/// The textual form did not decode to a session identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed session id")]
pub struct ParseIdError;

impl SessionId {
    /// Draws a fresh identifier from the OS CSPRNG.
    ///
    /// # Panics
    /// Only if the operating system cannot supply randomness, in which case no
    /// safe session can be issued at all.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        bytes[15] &= !DERIVED;
        Self(bytes)
    }

    /// The identifier of a store record that is not a session (a user's
    /// session index, a token deny-list), named by `kind` and `value`.
    ///
    /// Such IDs are computable by anyone, so they are marked (a bit no
    /// random ID has) and the session layer never accepts a marked ID from
    /// a client: a cookie cannot read, write or delete these records.
    pub fn derived(kind: &str, value: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"tether\0")
            .chain_update(kind.as_bytes())
            .chain_update(b"\0")
            .chain_update(value.as_bytes())
            .finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        bytes[15] |= DERIVED;
        Self(bytes)
    }

    /// Whether this is a [`SessionId::derived`] identifier (never a session).
    pub const fn is_derived(&self) -> bool {
        self.0[15] & DERIVED != 0
    }

    /// A stable, non-secret name for this session (16 hex digits of a
    /// hash): what a user's device list shows and a revoke button sends.
    /// The ID cannot be recovered from it.
    pub fn reference(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"tether-ref\0")
            .chain_update(self.0)
            .finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Builds an identifier from raw bytes (for tests and wire decoding).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Strict parse of the 22-character textual form.
    ///
    /// # Errors
    /// [`ParseIdError`] for any other length, any character outside the
    /// base64url alphabet, padding, or non-canonical trailing bits.
    pub fn parse(text: &str) -> Result<Self, ParseIdError> {
        if text.len() != ID_LEN {
            return Err(ParseIdError);
        }
        let mut bytes = [0u8; 16];
        // The base64 engine rejects non-canonical trailing bits by default, so
        // two different strings never name the same session.
        match URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut bytes) {
            Ok(16) => Ok(Self(bytes)),
            _ => Err(ParseIdError),
        }
    }

    /// Writes the textual form into a stack buffer (no allocation).
    pub fn encode(&self) -> EncodedId {
        let mut buf = [0u8; ID_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut buf)
            .expect("16 bytes always encode to 22 characters");
        debug_assert_eq!(n, ID_LEN);
        EncodedId(buf)
    }
}

/// The textual form of a [`SessionId`], held on the stack.
#[derive(Clone, Copy)]
pub struct EncodedId([u8; ID_LEN]);

impl EncodedId {
    /// The 22 characters.
    pub fn as_str(&self) -> &str {
        // The buffer only ever holds base64url characters.
        std::str::from_utf8(&self.0).expect("base64url is ASCII")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode().as_str())
    }
}

impl fmt::Debug for SessionId {
    // Session IDs are bearer credentials: logs show only a prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({}…)", &self.encode().as_str()[..6])
    }
}

impl FromStr for SessionId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.encode().as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_22_chars() {
        for _ in 0..1000 {
            let id = SessionId::random();
            let text = id.to_string();
            assert_eq!(text.len(), ID_LEN);
            assert_eq!(SessionId::parse(&text), Ok(id));
        }
    }

    #[test]
    fn derived_ids_are_marked_and_random_ones_never() {
        for _ in 0..1000 {
            assert!(!SessionId::random().is_derived());
        }
        let a = SessionId::derived("principal", "member-7");
        assert!(a.is_derived());
        assert_eq!(a, SessionId::derived("principal", "member-7"));
        assert_ne!(a, SessionId::derived("principal", "member-8"));
        assert_ne!(a, SessionId::derived("principals", "member-7"));
        let r = a.reference();
        assert_eq!(r.len(), 16);
        assert!(!a.to_string().contains(&r));
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(SessionId::random(), SessionId::random());
    }

    #[test]
    fn rejects_malformed_text() {
        let good = SessionId::random().to_string();
        let cases = [
            String::new(),
            good[..21].to_string(),      // truncated
            format!("{good}A"),          // over-long
            format!("{good}=="),         // padded
            format!("{}+", &good[..21]), // standard alphabet, not url-safe
            format!("{}/", &good[..21]), // standard alphabet, not url-safe
            format!("{}!", &good[..21]), // not base64 at all
            "ééééééééééé".to_string(),   // 22 bytes of non-ASCII
            " ".repeat(22),
        ];
        for case in cases {
            assert_eq!(SessionId::parse(&case), Err(ParseIdError), "{case:?}");
        }
    }

    #[test]
    fn rejects_non_canonical_trailing_bits() {
        // 16 bytes use 128 of the 132 bits of 22 characters; the last
        // character's low 4 bits must be zero. 'B' sets one of them.
        let mut text = SessionId::from_bytes([0; 16]).to_string();
        assert!(text.ends_with('A'));
        text.pop();
        text.push('B');
        assert_eq!(SessionId::parse(&text), Err(ParseIdError));
    }

    #[test]
    fn debug_does_not_leak_the_whole_id() {
        let id = SessionId::random();
        let debug = format!("{id:?}");
        assert!(!debug.contains(&id.to_string()));
    }
}
