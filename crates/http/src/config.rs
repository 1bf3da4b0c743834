//! How the session ID travels and how long sessions live.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tether_core::{Expiry, Timestamp};

/// The `SameSite` attribute of the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// Sent on same-site requests and top-level navigations (the default).
    Lax,
    /// Sent on same-site requests only.
    Strict,
    /// Sent on every request; browsers then require `Secure`.
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            Self::Lax => "Lax",
            Self::Strict => "Strict",
            Self::None => "None",
        }
    }
}

/// Where the time comes from; replaceable so tests can move time forward.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Configuration of a [`crate::SessionLayer`].
///
/// Defaults follow Spring Session: cookie `SESSION`, `Path=/`, `HttpOnly`,
/// `SameSite=Lax`, plus `Secure` (turn it off only for plain-HTTP development),
/// no `Max-Age` (a browser-session cookie), 1800 s inactivity timeout and a
/// 12 h absolute lifetime.
///
/// ```
/// use std::time::Duration;
/// use tether::{SameSite, SessionConfig};
/// let config = SessionConfig::default()
///     .with_cookie_name("APPSESSION")
///     .with_secure(false)
///     .with_same_site(SameSite::Strict)
///     .with_idle_timeout(Duration::from_secs(600))
///     .with_header("X-Auth-Token");
/// assert_eq!(config.cookie_name(), "APPSESSION");
/// ```
#[derive(Clone)]
pub struct SessionConfig {
    pub(crate) cookie_name: String,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) same_site: SameSite,
    pub(crate) max_age: Option<Duration>,
    pub(crate) header: Option<http::HeaderName>,
    pub(crate) expiry: Expiry,
    pub(crate) refresh_fraction: f64,
    pub(crate) clock: Clock,
    /// The attribute that names the principal when set (e.g. `loginMember`).
    pub(crate) principal_attribute: Option<String>,
    pub(crate) session_limit: Option<tether_core::SessionLimit>,
    /// Record the user agent and address of a session at login.
    pub(crate) record_device: bool,
    /// This server's name, recorded with a session at login.
    pub(crate) node: Option<String>,
    pub(crate) listener: Option<crate::users::Listener>,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("cookie_name", &self.cookie_name)
            .field("path", &self.path)
            .field("domain", &self.domain)
            .field("secure", &self.secure)
            .field("http_only", &self.http_only)
            .field("same_site", &self.same_site)
            .field("max_age", &self.max_age)
            .field("header", &self.header)
            .field("expiry", &self.expiry)
            .field("refresh_fraction", &self.refresh_fraction)
            .field("principal_attribute", &self.principal_attribute)
            .field("session_limit", &self.session_limit)
            .field("record_device", &self.record_device)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            cookie_name: "SESSION".into(),
            path: "/".into(),
            domain: None,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            max_age: None,
            header: None,
            expiry: Expiry::default(),
            refresh_fraction: 0.25,
            clock: Arc::new(Timestamp::now),
            principal_attribute: None,
            session_limit: None,
            record_device: true,
            node: None,
            listener: None,
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_attribute_value(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';')
}

impl SessionConfig {
    /// Sets the cookie name (default `SESSION`).
    ///
    /// # Panics
    /// If `name` is not an HTTP token (a configuration mistake, caught at startup).
    #[must_use]
    pub fn with_cookie_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(is_token(&name), "invalid cookie name {name:?}");
        self.cookie_name = name;
        self
    }

    /// Sets the cookie `Path` (default `/`).
    ///
    /// # Panics
    /// If `path` contains control characters or `;`.
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        assert!(is_attribute_value(&path), "invalid cookie path {path:?}");
        self.path = path;
        self
    }

    /// Sets the cookie `Domain` (default: none, host-only).
    ///
    /// # Panics
    /// If `domain` contains control characters or `;`.
    #[must_use]
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        let domain = domain.into();
        assert!(
            is_attribute_value(&domain),
            "invalid cookie domain {domain:?}"
        );
        self.domain = Some(domain);
        self
    }

    /// Sends the cookie with `Secure` (default `true`); `false` is for plain-HTTP development.
    #[must_use]
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sends the cookie with `HttpOnly` (default `true`).
    #[must_use]
    pub fn with_http_only(mut self, http_only: bool) -> Self {
        self.http_only = http_only;
        self
    }

    /// Sets the cookie's `SameSite` (default `Lax`).
    #[must_use]
    pub fn with_same_site(mut self, same_site: SameSite) -> Self {
        self.same_site = same_site;
        self
    }

    /// Gives the cookie a `Max-Age`, re-sent whenever the session's expiry
    /// moves so the browser's copy slides with it. Default: none.
    #[must_use]
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Also accepts the session ID in this request header and returns new IDs
    /// in it (as Spring Session's `X-Auth-Token`), for API clients without cookies.
    ///
    /// # Panics
    /// If `name` is not a valid header name.
    #[must_use]
    pub fn with_header(mut self, name: &str) -> Self {
        self.header =
            Some(http::HeaderName::from_bytes(name.as_bytes()).expect("invalid header name"));
        self
    }

    /// Sets the inactivity timeout of new sessions (default 1800 s).
    #[must_use]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.expiry.idle = idle;
        self
    }

    /// Sets the absolute lifetime cap of new sessions (default 12 h; `None` for no cap).
    #[must_use]
    pub fn with_absolute_timeout(mut self, absolute: Option<Duration>) -> Self {
        self.expiry.absolute = absolute;
        self
    }

    /// Sets after which fraction of the inactivity window a read records the
    /// access (default 0.25). Lower keeps expiry more exact; higher writes
    /// less. The effective inactivity timeout lies between
    /// `(1 - fraction) × idle` and `idle`.
    ///
    /// # Panics
    /// If `fraction` is not within `0.0..=1.0`.
    #[must_use]
    pub fn with_refresh_fraction(mut self, fraction: f64) -> Self {
        assert!((0.0..=1.0).contains(&fraction), "fraction out of range");
        self.refresh_fraction = fraction;
        self
    }

    /// Replaces the clock (for tests that move time forward).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Makes attribute `name` name the session's principal (the logged-in
    /// user) whenever it is set: `session.insert("loginMember", 7)` then
    /// also does `session.set_principal("7")`. A string value is used as
    /// is, any other by its JSON text.
    #[must_use]
    pub fn with_principal_attribute(mut self, name: impl Into<String>) -> Self {
        self.principal_attribute = Some(name.into());
        self
    }

    /// At most `limit.max` sessions per principal; a login beyond it is
    /// refused (409) or ends the longest-standing session, per
    /// `limit.policy`. Atomic under concurrent logins.
    ///
    /// # Panics
    /// If `limit.max` is 0.
    #[must_use]
    pub fn with_session_limit(mut self, limit: tether_core::SessionLimit) -> Self {
        assert!(
            limit.max >= 1,
            "a session limit must allow at least one session"
        );
        self.session_limit = Some(limit);
        self
    }

    /// Whether a session's user agent and address (the first
    /// `X-Forwarded-For` hop, else `X-Real-IP`) are recorded at login for
    /// the user's session list (default on).
    #[must_use]
    pub fn with_device_recording(mut self, record: bool) -> Self {
        self.record_device = record;
        self
    }

    /// This server's name, recorded with a session at login.
    #[must_use]
    pub fn with_node_name(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Calls `listener` with every session event this server sees: created,
    /// rotated, destroyed (logout, revocation, eviction) and expired (from
    /// [`crate::SessionLayer::spawn_reaper`]).
    #[must_use]
    pub fn with_listener(
        mut self,
        listener: impl Fn(crate::SessionEvent) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// The cookie name.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// The expiry policy for new sessions.
    pub fn expiry(&self) -> Expiry {
        self.expiry
    }

    /// The `Set-Cookie` value that hands `id` to the client.
    pub(crate) fn set_cookie(&self, id: &str) -> String {
        let mut c = format!("{}={}", self.cookie_name, id);
        if let Some(age) = self.max_age {
            c.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        self.push_attributes(&mut c);
        c
    }

    /// The `Set-Cookie` value that removes the cookie: the same attributes as
    /// the original, or the browser would keep it.
    pub(crate) fn removal_cookie(&self) -> String {
        let mut c = format!(
            "{}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            self.cookie_name
        );
        self.push_attributes(&mut c);
        c
    }

    fn push_attributes(&self, c: &mut String) {
        c.push_str("; Path=");
        c.push_str(&self.path);
        if let Some(domain) = &self.domain {
            c.push_str("; Domain=");
            c.push_str(domain);
        }
        if self.secure {
            c.push_str("; Secure");
        }
        if self.http_only {
            c.push_str("; HttpOnly");
        }
        c.push_str("; SameSite=");
        c.push_str(self.same_site.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cookie_attributes() {
        let c = SessionConfig::default();
        assert_eq!(
            c.set_cookie("abc"),
            "SESSION=abc; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn removal_cookie_repeats_every_attribute() {
        let c = SessionConfig::default()
            .with_path("/app")
            .with_domain("example.com")
            .with_same_site(SameSite::Strict)
            .with_max_age(Duration::from_secs(60));
        assert_eq!(
            c.set_cookie("abc"),
            "SESSION=abc; Max-Age=60; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict"
        );
        assert_eq!(
            c.removal_cookie(),
            "SESSION=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    #[should_panic(expected = "invalid cookie name")]
    fn rejects_bad_cookie_name() {
        let _ = SessionConfig::default().with_cookie_name("a b");
    }

    #[test]
    #[should_panic(expected = "invalid cookie path")]
    fn rejects_cookie_attribute_injection() {
        let _ = SessionConfig::default().with_path("/; Domain=evil.example");
    }
}
