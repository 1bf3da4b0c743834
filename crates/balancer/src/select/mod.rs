//! Selection policies: each maps a request to backends in order of preference.
//!
//! Selection never looks at health: it returns an order, and the proxy walks
//! it skipping backends that are down (or draining, unless the request is
//! bound to them). Keeping the two apart means every policy fails over the
//! same way and a policy can be tested without a clock or a network.

mod cookie;
mod hash;
mod load;

pub use cookie::{CookiePolicy, Route, RouteCodec};
pub use hash::{nginx_ip_hash_order, IpHash, Ring};
pub use load::{smooth_weighted_sequence, LeastConn, PowerOfTwo, RoundRobin};

use std::net::IpAddr;

use crate::config::{Config, ConfigError, HashKey, PolicyKind};
use crate::pool::Pool;

/// What selection may look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The client's address (after trusted `X-Forwarded-For`).
    pub client_ip: IpAddr,
    /// The request headers.
    pub headers: Headers<'a>,
}

/// A request's header fields as they arrived, in order (names compare
/// case-insensitively). The proxy parses heads in place and selection reads
/// them there: no header map is built per request.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    fields: &'a [httparse::Header<'a>],
}

impl<'a> Headers<'a> {
    /// A view of parsed header fields.
    pub fn new(fields: &'a [httparse::Header<'a>]) -> Self {
        Self { fields }
    }

    /// Every value of field `name`, in order.
    pub fn get_all<'n>(self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.fields
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The first value of field `name`.
    pub fn get(self, name: &str) -> Option<&'a [u8]> {
        self.fields
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// A policy's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    /// Backend indices, most preferred first.
    pub order: Vec<usize>,
    /// The backend this client is bound to (by cookie or key), if any; a
    /// draining backend still serves its bound clients.
    pub bound: Option<usize>,
    /// The route cookie the request carried, when valid (cookie policy).
    pub route: Option<Route>,
}

/// A selection policy.
pub trait Select: Send + Sync {
    /// Orders the backends of `pool` for this request.
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice;
}

/// The value of cookie `name` in the request, if present.
///
/// Cookies are split as bytes: a browser may send any byte in another
/// cookie's value, and one that is not UTF-8 must not hide this one.
pub fn cookie_value<'a>(headers: Headers<'a>, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all("cookie")
        .flat_map(|v| v.split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
        })
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| v)
}

/// Builds the configured policy.
///
/// # Errors
/// If the configuration is invalid for the policy.
pub fn build(
    config: &Config,
    pool: &Pool,
    codec: Option<&RouteCodec>,
) -> Result<Box<dyn Select>, ConfigError> {
    let rr = RoundRobin::new(pool);
    Ok(match config.policy {
        PolicyKind::RoundRobin => Box::new(rr),
        PolicyKind::LeastConn => Box::new(LeastConn::default()),
        PolicyKind::P2c => Box::new(PowerOfTwo),
        PolicyKind::IpHash => Box::new(hash::IpHash::new(pool)),
        PolicyKind::IpHashFull => Box::new(hash::IpHashFull),
        PolicyKind::Hash => {
            let bounded = (config.hash.bounded_load > 0.0).then_some(config.hash.bounded_load);
            Box::new(hash::KeyHash {
                key: config.hash_key()?,
                ring: Ring::new(pool),
                bounded,
                fallback: rr,
            })
        }
        PolicyKind::Owner => Box::new(hash::Owner {
            cookie: config.session_cookie.clone(),
            fallback: rr,
        }),
        PolicyKind::Cookie => Box::new(cookie::CookiePolicy::new(
            codec
                .cloned()
                .ok_or_else(|| ConfigError::Invalid("cookie policy without a codec".into()))?,
            pool,
        )),
    })
}

/// Appends every index of `pool` not yet in `order`, in configuration order
/// starting after `from`, so any policy's list ends with all backends.
pub(crate) fn complete(order: &mut Vec<usize>, n: usize, from: usize) {
    for k in 1..=n {
        let i = (from + k) % n;
        if !order.contains(&i) {
            order.push(i);
        }
    }
}

/// The hash key of the `hash` policy for this request.
pub(crate) fn key_bytes<'a>(
    key: &HashKey,
    req: &RequestInfo<'a>,
    ip_buf: &'a mut [u8; 16],
) -> Option<&'a [u8]> {
    match key {
        HashKey::Cookie(name) => cookie_value(req.headers, name),
        HashKey::Header(name) => req.headers.get(name.as_str()),
        HashKey::Ip => {
            let n = match req.client_ip {
                IpAddr::V4(v4) => {
                    ip_buf[..4].copy_from_slice(&v4.octets());
                    4
                }
                IpAddr::V6(v6) => {
                    *ip_buf = v6.octets();
                    16
                }
            };
            Some(&ip_buf[..n])
        }
    }
}
