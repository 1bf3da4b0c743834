//! Stateless sessions: the session's attributes travel in a signed token.
//!
//! No server holds state, so every node accepts every node's token and the
//! brief's problem disappears. What makes token sessions hard in practice is
//! handled here too:
//!
//! - **Algorithm pinning.** The accepted algorithm comes from the key file,
//!   never from the token header: `alg: none` and algorithm confusion (an
//!   HS256 token "signed" with an EdDSA public key) are refused.
//! - **Key rotation.** Keys have IDs (`kid`); one signs, the others still
//!   verify until they are marked `retired` (or removed), so a rotation logs
//!   nobody out.
//! - **Revocation.** A token is valid until it expires unless a store says
//!   otherwise: [`Revocation`] keeps denied token IDs (`jti`) and a per-user
//!   "not before" time in any [`tether_core::SessionStore`] (memory, Redis, cluster).
//!   The check costs one store read per request, so it is optional.
//! - **Size.** A token larger than the limit (default 3900 bytes, so the
//!   cookie fits in 4 KB) is refused when an attribute is inserted, not
//!   silently dropped by a browser later.
//!
//! # Key file (TOML), shared by every node
//! ```toml
//! algorithm = "HS256"          # or "EdDSA", "ES256"
//! signing_kid = "2026-11"
//! # issuer = "tether"; audience = "app"; leeway_secs = 30; max_token_bytes = 3900
//! [[key]]
//! kid = "2026-11"
//! secret_base64 = "…"          # HS256: at least 32 random bytes
//! [[key]]
//! kid = "2026-10"
//! secret_base64 = "…"
//! retired = false              # true: tokens signed with it are refused
//! ```
//! EdDSA and ES256 keys use `private_pem` (the signing key) and `public_pem`.

mod revocation;

pub use revocation::Revocation;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tether_core::{Expiry, Record, SessionId, Timestamp};

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema.
    #[error("invalid key file")]
    Parse(#[source] toml::de::Error),
    /// A value is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A key did not parse.
    #[error("key {kid:?} is not a valid {alg} key")]
    Key {
        /// The key's ID.
        kid: String,
        /// The algorithm.
        alg: &'static str,
        /// The cause.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

/// Why a token was refused. Every variant means "no session" (HTTP 401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts of a JWT, or claims of the wrong shape.
    #[error("malformed token")]
    Malformed,
    /// The header names another algorithm than the configured one.
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The header has no `kid`, or one no key has.
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    /// The key that signed it has been retired.
    #[error("signing key {0:?} is retired")]
    RetiredKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` or `aud` do not match.
    #[error("token issued for another party")]
    WrongParty,
    /// The header lists critical extensions (`crit`, RFC 7515 §4.1.11):
    /// this verifier implements none, so it must refuse the token.
    #[error("token requires header extensions this verifier does not implement")]
    CriticalExtension,
    /// An ES256 signature whose `s` is in the upper half of the curve order:
    /// the same token has a second valid encoding (`n - s`), which a
    /// signer never produces here. Only the low-`s` form is accepted.
    #[error("non-canonical (high-S) ECDSA signature")]
    HighS,
    /// Longer than the limit.
    #[error("token of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Signing failed (a key problem, not the client's).
#[derive(Debug, thiserror::Error)]
#[error("signing the session token failed")]
pub struct SignError(#[source] jsonwebtoken::errors::Error);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    algorithm: String,
    signing_kid: String,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
    #[serde(default = "default_max")]
    max_token_bytes: usize,
    #[serde(rename = "key")]
    keys: Vec<KeyEntry>,
}

fn default_leeway() -> u64 {
    30
}

fn default_max() -> usize {
    3900
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    #[serde(default)]
    secret_base64: Option<String>,
    #[serde(default)]
    private_pem: Option<String>,
    #[serde(default)]
    public_pem: Option<String>,
    #[serde(default)]
    retired: bool,
}

/// The claims of a tether session token.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    jti: SessionId,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    /// Session creation, ms.
    ct: u64,
    /// Last recorded access, ms (seconds are too coarse for sliding refresh).
    la: u64,
    /// Inactivity timeout, ms.
    idl: u64,
    /// Absolute deadline, ms (0 = none).
    dl: u64,
    /// Version.
    v: u64,
    attrs: BTreeMap<String, Box<RawValue>>,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The session it carries (its ID is the token's `jti`).
    pub record: Record,
    /// The `sub` claim, if the session had a subject.
    pub subject: Option<String>,
    /// When the token expires.
    pub expires: Timestamp,
}

/// Encodes and verifies session tokens with a key set.
pub struct JwtCodec {
    alg: Algorithm,
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    retired: HashSet<String>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    max_len: usize,
    jwks: serde_json::Value,
    subject_attribute: Option<String>,
}

impl std::fmt::Debug for JwtCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtCodec")
            .field("alg", &self.alg)
            .field("signing_kid", &self.signing_kid)
            .field("verifying", &self.verifying.keys().collect::<Vec<_>>())
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> KeyError {
    KeyError::Invalid(msg.into())
}

/// The raw public key bytes at the end of a SubjectPublicKeyInfo.
fn spki_tail(pem_text: &str, n: usize) -> Option<Vec<u8>> {
    let der = pem::parse(pem_text).ok()?.into_contents();
    (der.len() >= n).then(|| der[der.len() - n..].to_vec())
}

impl JwtCodec {
    /// Reads a key file.
    ///
    /// # Errors
    /// If it cannot be read or validated.
    pub fn from_key_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses key-file TOML.
    ///
    /// # Errors
    /// If it does not parse or a key is invalid.
    pub fn from_toml(text: &str) -> Result<Self, KeyError> {
        let file: KeyFile = toml::from_str(text).map_err(KeyError::Parse)?;
        let alg = match file.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(invalid(format!(
                    "algorithm {other:?}: use HS256, EdDSA or ES256"
                )))
            }
        };
        let alg_name: &'static str = match alg {
            Algorithm::HS256 => "HS256",
            Algorithm::EdDSA => "EdDSA",
            _ => "ES256",
        };
        let key_err = |kid: &str| {
            let kid = kid.to_string();
            move |source| KeyError::Key {
                kid,
                alg: alg_name,
                source,
            }
        };
        let mut verifying = HashMap::new();
        let mut retired = HashSet::new();
        let mut signing = None;
        let mut jwks = Vec::new();
        for k in &file.keys {
            if k.kid.is_empty() || verifying.contains_key(&k.kid) || retired.contains(&k.kid) {
                return Err(invalid(format!("key id {:?} is empty or repeated", k.kid)));
            }
            if k.retired {
                if k.kid == file.signing_kid {
                    return Err(invalid("the signing key cannot be retired"));
                }
                retired.insert(k.kid.clone());
                continue;
            }
            let (enc, dec) = match alg {
                Algorithm::HS256 => {
                    let secret = k.secret_base64.as_deref().ok_or_else(|| {
                        invalid(format!("key {:?}: HS256 needs secret_base64", k.kid))
                    })?;
                    let secret = STANDARD.decode(secret.trim()).map_err(|_| {
                        invalid(format!("key {:?}: secret_base64 is not base64", k.kid))
                    })?;
                    if secret.len() < 32 {
                        return Err(invalid(format!(
                            "key {:?}: an HS256 secret needs at least 32 bytes",
                            k.kid
                        )));
                    }
                    (
                        Some(EncodingKey::from_secret(&secret)),
                        DecodingKey::from_secret(&secret),
                    )
                }
                _ => {
                    let public = k.public_pem.as_deref().ok_or_else(|| {
                        invalid(format!("key {:?}: {alg_name} needs public_pem", k.kid))
                    })?;
                    let (dec, jwk) = if alg == Algorithm::EdDSA {
                        let dec =
                            DecodingKey::from_ed_pem(public.as_bytes()).map_err(key_err(&k.kid))?;
                        let x = spki_tail(public, 32)
                            .ok_or_else(|| invalid(format!("key {:?}: bad public_pem", k.kid)))?;
                        (
                            dec,
                            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(x)}),
                        )
                    } else {
                        let dec =
                            DecodingKey::from_ec_pem(public.as_bytes()).map_err(key_err(&k.kid))?;
                        let point = spki_tail(public, 65)
                            .ok_or_else(|| invalid(format!("key {:?}: bad public_pem", k.kid)))?;
                        (
                            dec,
                            serde_json::json!({
                                "kty": "EC", "crv": "P-256",
                                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
                            }),
                        )
                    };
                    let mut jwk = jwk;
                    jwk["kid"] = k.kid.clone().into();
                    jwk["alg"] = alg_name.into();
                    jwk["use"] = "sig".into();
                    jwks.push(jwk);
                    let enc = match k.private_pem.as_deref() {
                        Some(p) if alg == Algorithm::EdDSA => {
                            Some(EncodingKey::from_ed_pem(p.as_bytes()).map_err(key_err(&k.kid))?)
                        }
                        Some(p) => {
                            Some(EncodingKey::from_ec_pem(p.as_bytes()).map_err(key_err(&k.kid))?)
                        }
                        None => None,
                    };
                    (enc, dec)
                }
            };
            if k.kid == file.signing_kid {
                signing =
                    Some(enc.ok_or_else(|| invalid("the signing key needs its private_pem"))?);
            }
            verifying.insert(k.kid.clone(), dec);
        }
        let signing = signing.ok_or_else(|| {
            invalid(format!(
                "signing_kid {:?} names no active key",
                file.signing_kid
            ))
        })?;
        if file.max_token_bytes < 256 {
            return Err(invalid("max_token_bytes must be at least 256"));
        }
        Ok(Self {
            alg,
            signing_kid: file.signing_kid,
            signing,
            verifying,
            retired,
            issuer: file.issuer,
            audience: file.audience,
            leeway: Duration::from_secs(file.leeway_secs),
            max_len: file.max_token_bytes,
            jwks: serde_json::json!({ "keys": jwks }),
            subject_attribute: None,
        })
    }

    /// Puts the value of this attribute (e.g. `loginMember`) in the `sub`
    /// claim; revocation by user ("log out everywhere") keys on it.
    #[must_use]
    pub fn with_subject_attribute(mut self, name: impl Into<String>) -> Self {
        self.subject_attribute = Some(name.into());
        self
    }

    /// The public keys as a JWKS document (empty for HS256: secrets are never published).
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// The largest token accepted or issued, in bytes.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The subject `record` would carry.
    pub fn subject_of(&self, record: &Record) -> Option<String> {
        let raw = record.attributes.get(self.subject_attribute.as_deref()?)?;
        // A JSON string is used as is; a number or other value by its JSON text.
        Some(match serde_json::from_str::<String>(raw.get()) {
            Ok(s) => s,
            Err(_) => raw.get().to_string(),
        })
    }

    /// Signs `record` as a token.
    ///
    /// # Errors
    /// If signing fails (a broken key).
    pub fn encode(&self, record: &Record) -> Result<String, SignError> {
        let secs = |t: Timestamp| t.0 / 1000;
        let claims = Claims {
            jti: record.id,
            iat: secs(record.last_access),
            nbf: secs(record.last_access),
            // Round up so a token never expires before the session does.
            exp: record.expires_at().0.div_ceil(1000),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: self.subject_of(record),
            ct: record.created.0,
            la: record.last_access.0,
            idl: record.idle_ms,
            dl: record.deadline.deadline_to_wire(),
            v: record.version,
            attrs: record.attributes.clone(),
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.signing_kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.signing).map_err(SignError)?;
        Ok(if self.alg == Algorithm::ES256 {
            low_s(token)
        } else {
            token
        })
    }

    /// Verifies `token` at `now`.
    ///
    /// # Errors
    /// [`JwtError`] saying why the token is not a session.
    pub fn decode(&self, token: &str, now: Timestamp) -> Result<Verified, JwtError> {
        if token.len() > self.max_len {
            return Err(JwtError::Oversized {
                len: token.len(),
                max: self.max_len,
            });
        }
        // Read from the raw header: the library's header type does not keep
        // `crit` (it drops or refuses members it does not know).
        if names_critical_extensions(token)? {
            return Err(JwtError::CriticalExtension);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if self.alg == Algorithm::ES256 && has_high_s(token)? {
            return Err(JwtError::HighS);
        }
        // Pinned: whatever the header says, only the configured algorithm verifies.
        if header.alg != self.alg {
            return Err(JwtError::WrongAlgorithm);
        }
        let kid = header.kid.unwrap_or_default();
        if self.retired.contains(&kid) {
            return Err(JwtError::RetiredKey(kid));
        }
        let key = self.verifying.get(&kid).ok_or(JwtError::UnknownKey(kid))?;
        let mut validation = Validation::new(self.alg);
        // Times are checked below against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                ErrorKind::InvalidAlgorithm => JwtError::WrongAlgorithm,
                _ => JwtError::Malformed,
            }
        })?;
        let c = data.claims;
        let leeway = self.leeway.as_secs();
        let now_s = now.0 / 1000;
        if now_s >= c.exp.saturating_add(leeway) {
            return Err(JwtError::Expired);
        }
        if now_s.saturating_add(leeway) < c.nbf {
            return Err(JwtError::NotYetValid);
        }
        if c.iss != self.issuer || c.aud != self.audience {
            return Err(JwtError::WrongParty);
        }
        let record = Record {
            id: c.jti,
            attributes: c.attrs,
            created: Timestamp(c.ct),
            last_access: Timestamp(c.la),
            idle_ms: c.idl,
            deadline: Timestamp::deadline_from_wire(c.dl),
            version: c.v,
        };
        // The token's own expiry is authoritative, the record's a cross-check.
        if record.is_expired(now) && now_s >= c.exp {
            return Err(JwtError::Expired);
        }
        Ok(Verified {
            record,
            subject: c.sub,
            expires: Timestamp(c.exp * 1000),
        })
    }

    /// The expiry policy implied by `idle` and `absolute` for new sessions
    /// (helper for callers that build records).
    pub fn expiry(idle: Duration, absolute: Option<Duration>) -> Expiry {
        Expiry { idle, absolute }
    }
}

/// The order `n` of P-256's group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
/// `n / 2` (rounded down): a canonical `s` is at most this.
const P256_HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// The `s` half of an ES256 token's signature (`r || s`, 32 bytes each).
fn es256_s(token: &str) -> Result<[u8; 32], JwtError> {
    let sig = token.rsplit('.').next().ok_or(JwtError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| JwtError::Malformed)?;
    sig.get(32..64)
        .filter(|_| sig.len() == 64)
        .and_then(|s| s.try_into().ok())
        .ok_or(JwtError::Malformed)
}

fn has_high_s(token: &str) -> Result<bool, JwtError> {
    // Big-endian byte arrays of one length compare as the numbers do.
    Ok(es256_s(token)? > P256_HALF_N)
}

/// `token` with its ECDSA `s` replaced by `n - s` when it is in the upper
/// half: both verify, and only the low one is accepted by [`JwtCodec::decode`].
fn low_s(token: String) -> String {
    let Ok(s) = es256_s(&token) else {
        return token;
    };
    if s <= P256_HALF_N {
        return token;
    }
    let mut neg = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        neg[i] = d.rem_euclid(256) as u8;
    }
    let (signed, sig) = token.rsplit_once('.').expect("three parts");
    let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("decoded above");
    raw[32..64].copy_from_slice(&neg);
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(raw))
}

/// Whether the token's header has a `crit` member.
fn names_critical_extensions(token: &str) -> Result<bool, JwtError> {
    let header = token.split('.').next().ok_or(JwtError::Malformed)?;
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    Ok(header.contains_key("crit"))
}

/// A random HS256 key file with one key, for `tether jwt-keygen` and tests.
pub fn generate_hs256_key_file(kid: &str) -> String {
    let mut secret = Vec::with_capacity(32);
    for _ in 0..2 {
        secret.extend_from_slice(SessionId::random().as_bytes());
    }
    format!(
        "algorithm = \"HS256\"\nsigning_kid = \"{kid}\"\n\n[[key]]\nkid = \"{kid}\"\nsecret_base64 = \"{}\"\n",
        STANDARD.encode(secret)
    )
}
