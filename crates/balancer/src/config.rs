//! Configuration: a TOML file or command-line flags, validated before use.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration")]
    Parse(#[source] toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// How a backend is chosen for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Weighted round robin (nginx's smooth interleaving).
    RoundRobin,
    /// Fewest requests in flight, relative to weight.
    LeastConn,
    /// Power of two random choices, the less loaded wins.
    P2c,
    /// nginx-compatible `ip_hash`: the first three octets of an IPv4 address.
    IpHash,
    /// Rendezvous hashing of the full client address.
    IpHashFull,
    /// An inserted, HMAC-authenticated route cookie naming the backend.
    Cookie,
    /// Consistent hashing (ring) on a cookie, header or the client address.
    Hash,
    /// Rendezvous hashing of the session cookie: the session's owner node.
    Owner,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde::Deserialize::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s),
        )
        .map_err(|_| {
            format!(
                "unknown policy {s:?}; one of round-robin, least-conn, p2c, ip-hash, \
                 ip-hash-full, cookie, hash, owner"
            )
        })
    }
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Stable name: routing (cookies, hashing) uses it, never the address, so
    /// a backend can move to a new address without re-pinning its clients.
    pub id: String,
    /// `host:port`.
    pub addr: String,
    /// Relative share of new clients (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The route cookie of the `cookie` policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookieConfig {
    /// Cookie name.
    pub name: String,
    /// HMAC key shared by every balancer instance; random per process if empty
    /// (then two instances do not accept each other's cookies).
    pub secret: String,
    /// Send the cookie with `Secure`.
    pub secure: bool,
}

impl Default for CookieConfig {
    fn default() -> Self {
        Self {
            name: "TETHER_ROUTE".into(),
            secret: String::new(),
            secure: false,
        }
    }
}

/// The key of the `hash` policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashConfig {
    /// `cookie:NAME`, `header:NAME` or `ip`.
    pub key: String,
    /// Bounded-load factor (≥ 1.0; e.g. 1.25): no backend takes more than
    /// this multiple of the mean in-flight load. 0 turns it off.
    pub bounded_load: f64,
}

impl Default for HashConfig {
    fn default() -> Self {
        Self {
            key: "cookie:SESSION".into(),
            bounded_load: 0.0,
        }
    }
}

/// Active and passive health checking.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Path probed with `GET` (empty: no active checks).
    pub path: String,
    /// Between probes, in milliseconds (HAProxy's `inter`, 2000).
    pub interval_ms: u64,
    /// Probe timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up (HAProxy 2).
    pub rise: u32,
    /// Consecutive failures that take an up backend down (HAProxy 3).
    pub fall: u32,
    /// Consecutive request failures (connect errors, timeouts, 5xx) that
    /// eject a backend passively; 0 turns passive ejection off.
    pub passive_failures: u32,
    /// Count 5xx answers as passive failures (not only connect errors).
    pub passive_5xx: bool,
    /// Never eject passively beyond this share of backends, in percent.
    pub max_ejected_percent: u32,
    /// An ejected backend is tried again after this long when no active
    /// check brings it back sooner, in milliseconds.
    pub eject_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            passive_failures: 3,
            passive_5xx: true,
            max_ejected_percent: 50,
            eject_ms: 30_000,
        }
    }
}

/// Retries and upstream timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Backends tried per request at most.
    pub tries: u32,
    /// Time budget for all tries of one request, in milliseconds.
    pub timeout_ms: u64,
    /// TCP connect timeout per try, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Wait for response headers per try, in milliseconds.
    pub response_timeout_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            tries: 3,
            timeout_ms: 15_000,
            connect_timeout_ms: 2_000,
            response_timeout_ms: 60_000,
        }
    }
}

/// Defences against slow or oversized clients.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Time a client has to send a complete request head, counted from the
    /// first byte or from the end of the previous response on a kept-alive
    /// connection (so it is also the idle timeout), in milliseconds.
    pub header_timeout_ms: u64,
    /// Largest request head accepted, in bytes (at least 8192); larger gets 431.
    pub max_header_bytes: usize,
    /// Request bodies up to this size are buffered so they can be retried on
    /// another backend; larger ones stream as they arrive and are tried once
    /// (a stalled upload then holds a read buffer, not its whole body).
    pub buffer_body_bytes: usize,
    /// Time a client has to send a whole request body, from the end of its
    /// head, in milliseconds: one deadline for the upload, not one per read,
    /// so a client trickling a byte at a time is cut off too.
    pub body_timeout_ms: u64,
    /// A WebSocket (or other upgraded) tunnel closes after this long without
    /// a byte either way, in milliseconds (HAProxy's `timeout tunnel`).
    pub tunnel_timeout_ms: u64,
    /// On shutdown, requests and tunnels still open after this long are cut,
    /// in milliseconds.
    pub drain_timeout_ms: u64,
    /// Client connections served at once (HAProxy's `maxconn`); more wait in
    /// the kernel's accept queue. 0: no limit.
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            max_header_bytes: 64 * 1024,
            buffer_body_bytes: 16 * 1024,
            body_timeout_ms: 60_000,
            tunnel_timeout_ms: 600_000,
            drain_timeout_ms: 10_000,
            max_connections: 0,
        }
    }
}

/// The whole balancer configuration, as in `lb.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Admin listener (`/status`, `/metrics`, drain, reload); none if absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Selection policy.
    pub policy: PolicyKind,
    /// Addresses (CIDR) whose `X-Forwarded-For` is trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Backends.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Route cookie settings (policy `cookie`).
    #[serde(default)]
    pub cookie: CookieConfig,
    /// Hash key settings (policy `hash`).
    #[serde(default)]
    pub hash: HashConfig,
    /// Name of the session cookie hashed by the `owner` policy.
    #[serde(default = "session_cookie")]
    pub session_cookie: String,
    /// Health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Retries and timeouts.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Client limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// TLS termination on the client listener; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Accept HTTP/2 without TLS from clients that know it is spoken
    /// (h2c with prior knowledge) on a plain listener.
    #[serde(default)]
    pub h2c: bool,
    /// A plain-HTTP listener that answers every request with a redirect to
    /// the same URL over HTTPS (needs `tls`).
    #[serde(default)]
    pub redirect_http: Option<SocketAddr>,
    /// Bearer token the admin listener requires on every request
    /// (`Authorization: Bearer TOKEN`). Required when the admin listener is
    /// not on a loopback address.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// TLS termination: certificate chains and keys in PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The default certificate chain (leaf first), served when the client's
    /// server name matches no `sni` entry or it sends none.
    pub cert: PathBuf,
    /// The default certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// More certificates, chosen by the server name the client asks for.
    #[serde(default)]
    pub sni: Vec<SniCert>,
}

/// A certificate served for some server names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Server names it serves: exact (`a.example`) or one wildcard label
    /// (`*.example`, which matches `x.example`, not `example` or `x.y.example`).
    pub names: Vec<String>,
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl TlsConfig {
    /// A single certificate for every name.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            sni: Vec::new(),
        }
    }
}

fn session_cookie() -> String {
    "SESSION".into()
}

/// A backend after validation: its address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable name.
    pub id: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Weight (≥ 1).
    pub weight: u32,
}

/// Where the `hash` policy reads its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A cookie's value.
    Cookie(String),
    /// A header's value.
    Header(http::HeaderName),
    /// The client address.
    Ip,
}

impl Config {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(listen: SocketAddr, policy: PolicyKind, backends: Vec<BackendConfig>) -> Self {
        Self {
            listen,
            admin: None,
            policy,
            trusted_proxies: Vec::new(),
            backends,
            cookie: CookieConfig::default(),
            hash: HashConfig::default(),
            session_cookie: session_cookie(),
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            limits: LimitsConfig::default(),
            tls: None,
            h2c: false,
            redirect_http: None,
            admin_token: None,
        }
    }

    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// If the file cannot be read, parsed or validated.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::from_toml(&text)?;
        // Certificate paths in a file are relative to the file, so a
        // configuration directory can move as a whole.
        if let (Some(tls), Some(dir)) = (&mut config.tls, path.parent()) {
            let join = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            };
            join(&mut tls.cert);
            join(&mut tls.key);
            for e in &mut tls.sni {
                join(&mut e.cert);
                join(&mut e.key);
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// If it does not parse or validate.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(ConfigError::Parse)?;
        config.resolve()?;
        Ok(config)
    }

    /// Checks every value and resolves backend addresses.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first problem.
    pub fn resolve(&self) -> Result<Vec<Backend>, ConfigError> {
        if self.backends.is_empty() {
            return Err(invalid("at least one backend is required"));
        }
        let mut out: Vec<Backend> = Vec::new();
        for b in &self.backends {
            let valid_id = !b.id.is_empty()
                && b.id.len() <= 64
                && b.id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !valid_id {
                return Err(invalid(format!(
                    "backend id {:?}: use 1-64 letters, digits, '-' or '_'",
                    b.id
                )));
            }
            if out.iter().any(|o| o.id == b.id) {
                return Err(invalid(format!("backend id {:?} appears twice", b.id)));
            }
            if b.weight == 0 || b.weight > 1000 {
                return Err(invalid(format!(
                    "backend {}: weight must be 1..=1000",
                    b.id
                )));
            }
            let addr = b
                .addr
                .to_socket_addrs()
                .map_err(|e| {
                    invalid(format!(
                        "backend {}: cannot resolve {:?}: {e}",
                        b.id, b.addr
                    ))
                })?
                .next()
                .ok_or_else(|| {
                    invalid(format!(
                        "backend {}: {:?} resolves to nothing",
                        b.id, b.addr
                    ))
                })?;
            out.push(Backend {
                id: b.id.clone(),
                addr,
                weight: b.weight,
            });
        }
        if self.policy == PolicyKind::Hash {
            self.hash_key()?;
            let f = self.hash.bounded_load;
            if f != 0.0 && !(1.0..=100.0).contains(&f) {
                return Err(invalid("hash.bounded_load must be 0 (off) or at least 1.0"));
            }
        }
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        };
        if !name_ok(&self.cookie.name) || !name_ok(&self.session_cookie) {
            return Err(invalid(
                "cookie names must be letters, digits, '-', '_' or '.'",
            ));
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
            return Err(invalid(
                "health interval, timeout, rise and fall must be positive",
            ));
        }
        if h.max_ejected_percent > 100 {
            return Err(invalid("health.max_ejected_percent must be 0..=100"));
        }
        let r = &self.retry;
        if r.tries == 0
            || r.timeout_ms == 0
            || r.connect_timeout_ms == 0
            || r.response_timeout_ms == 0
        {
            return Err(invalid("retry tries and timeouts must be positive"));
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(invalid("limits.max_header_bytes must be at least 8192"));
        }
        let l = &self.limits;
        if l.header_timeout_ms == 0
            || l.body_timeout_ms == 0
            || l.tunnel_timeout_ms == 0
            || l.drain_timeout_ms == 0
        {
            return Err(invalid(
                "limits: header, body, tunnel and drain timeouts must be positive",
            ));
        }
        if self.redirect_http.is_some() && self.tls.is_none() {
            return Err(invalid(
                "redirect_http needs tls: there is nothing to redirect to",
            ));
        }
        if let Some(tls) = &self.tls {
            for entry in &tls.sni {
                if entry.names.is_empty() {
                    return Err(invalid(format!(
                        "tls.sni entry for {}: list at least one name",
                        entry.cert.display()
                    )));
                }
            }
        }
        match (&self.admin_token, self.admin) {
            (Some(t), _) if t.len() < 16 => {
                return Err(invalid("admin_token must be at least 16 characters"));
            }
            (None, Some(a)) if !a.ip().is_loopback() => {
                return Err(invalid(format!(
                    "admin listener {a} is not on loopback: set admin_token (or --admin-token) so that not anyone who reaches it can drain backends"
                )));
            }
            _ => {}
        }
        Ok(out)
    }

    /// The `hash` policy's key source.
    ///
    /// # Errors
    /// If `hash.key` is not `cookie:NAME`, `header:NAME` or `ip`.
    pub fn hash_key(&self) -> Result<HashKey, ConfigError> {
        let key = self.hash.key.as_str();
        if key == "ip" {
            return Ok(HashKey::Ip);
        }
        if let Some(name) = key.strip_prefix("cookie:").filter(|n| !n.is_empty()) {
            return Ok(HashKey::Cookie(name.to_string()));
        }
        if let Some(name) = key.strip_prefix("header:") {
            if let Ok(h) = http::HeaderName::from_bytes(name.as_bytes()) {
                return Ok(HashKey::Header(h));
            }
        }
        Err(invalid(format!(
            "hash.key {key:?}: use cookie:NAME, header:NAME or ip"
        )))
    }

    /// Whether `ip` may set `X-Forwarded-For`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// Milliseconds as a duration (helper for the many `_ms` fields).
    pub(crate) fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

/// Parses `ID=host:port` as given to `--backend`.
///
/// # Errors
/// If there is no `=`.
pub fn parse_backend_flag(s: &str) -> Result<BackendConfig, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT, e.g. A=127.0.0.1:9001"))?;
    Ok(BackendConfig {
        id: id.to_string(),
        addr: addr.to_string(),
        weight: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let c = Config::from_toml(
            r#"
            listen = "127.0.0.1:8080"
            admin = "127.0.0.1:8081"
            policy = "cookie"
            trusted_proxies = ["10.0.0.0/8"]
            [cookie]
            secret = "s3cret"
            [health]
            interval_ms = 500
            [[backend]]
            id = "A"
            addr = "127.0.0.1:9001"
            weight = 3
            [[backend]]
            id = "B"
            addr = "localhost:9002"
            "#,
        )
        .unwrap();
        assert_eq!(c.policy, PolicyKind::Cookie);
        assert_eq!(c.backends[0].weight, 3);
        assert_eq!(c.backends[1].weight, 1);
        assert_eq!(c.health.interval_ms, 500);
        assert_eq!(c.health.fall, 3);
        assert!(c.is_trusted("10.1.2.3".parse().unwrap()));
        assert!(!c.is_trusted("127.0.0.1".parse().unwrap()));
        let resolved = c.resolve().unwrap();
        assert_eq!(resolved[1].addr.port(), 9002);
    }

    #[test]
    fn rejects_bad_configurations_with_a_reason() {
        let base = |extra: &str, backends: &str| {
            format!("listen = \"127.0.0.1:1\"\npolicy = \"hash\"\n{extra}\n{backends}")
        };
        let one = "[[backend]]\nid = \"A\"\naddr = \"127.0.0.1:1\"";
        let cases = [
            (base("", ""), "backend"),
            (
                base("", "[[backend]]\nid = \"A.B\"\naddr = \"127.0.0.1:1\""),
                "backend id",
            ),
            (base("", &format!("{one}\n{one}")), "twice"),
            (
                base(
                    "",
                    "[[backend]]\nid = \"A\"\naddr = \"127.0.0.1:1\"\nweight = 0",
                ),
                "weight",
            ),
            (base("[hash]\nkey = \"body\"", one), "hash.key"),
            (base("[hash]\nbounded_load = 0.5", one), "bounded_load"),
            (
                base("[limits]\nmax_header_bytes = 10", one),
                "max_header_bytes",
            ),
            (base("[retry]\ntries = 0", one), "tries"),
            (base("typo = 1", one), "typo"),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml(&text).unwrap_err();
            let msg = format!(
                "{err}: {:?}",
                std::error::Error::source(&err).map(ToString::to_string)
            );
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!("ip-hash".parse::<PolicyKind>(), Ok(PolicyKind::IpHash));
        assert_eq!("owner".parse::<PolicyKind>(), Ok(PolicyKind::Owner));
        assert!("sticky"
            .parse::<PolicyKind>()
            .unwrap_err()
            .contains("one of"));
    }
}
