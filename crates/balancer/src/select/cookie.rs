//! The `cookie` policy: the balancer inserts a route cookie naming the
//! backend, authenticated with an HMAC so a client cannot pick its server.
//!
//! The value is `PRIMARY.BACKUP.MAC`: stable backend IDs (never an index or an
//! address, which change when the backend list does), and a truncated
//! HMAC-SHA256 over both. Because the cookie carries everything, any balancer
//! with the same secret routes it the same way: there is no stick table to
//! replicate between instances.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{complete, cookie_value, Choice, RequestInfo, RoundRobin, Select};
use crate::pool::Pool;

/// MAC bytes kept: 128 bits, ample against forgery by guessing.
const MAC_LEN: usize = 16;

/// A decoded, authenticated route cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The backend the client is pinned to.
    pub primary: String,
    /// Where to go when the primary is down.
    pub backup: Option<String>,
}

/// Encodes and verifies route cookies.
#[derive(Clone)]
pub struct RouteCodec {
    name: String,
    key: Vec<u8>,
    secure: bool,
}

impl std::fmt::Debug for RouteCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCodec")
            .field("name", &self.name)
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

impl RouteCodec {
    /// A codec for cookie `name` keyed by `secret`.
    pub fn new(name: &str, secret: &[u8], secure: bool) -> Self {
        Self {
            name: name.to_string(),
            key: secret.to_vec(),
            secure,
        }
    }

    /// The cookie name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// The cookie value for `route`.
    pub fn encode(&self, route: &Route) -> String {
        let payload = format!(
            "{}.{}",
            route.primary,
            route.backup.as_deref().unwrap_or("")
        );
        let tag = self.mac(&payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(&tag[..MAC_LEN]))
    }

    /// The route in `value`, if it is well formed and authentic.
    pub fn decode(&self, value: &str) -> Option<Route> {
        let (payload, tag) = value.rsplit_once('.')?;
        let (primary, backup) = payload.split_once('.')?;
        if primary.is_empty() || backup.contains('.') {
            return None;
        }
        let mut tag_bytes = [0u8; MAC_LEN];
        match URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes) {
            Ok(MAC_LEN) => {}
            _ => return None,
        }
        // Constant-time comparison: timing must not reveal how much of a forged tag was right.
        self.mac(payload).verify_truncated_left(&tag_bytes).ok()?;
        Some(Route {
            primary: primary.to_string(),
            backup: (!backup.is_empty()).then(|| backup.to_string()),
        })
    }

    /// The `Set-Cookie` value pinning the client to `route`; `Secure` when
    /// configured so or when the client came over TLS (`tls`).
    pub fn set_cookie(&self, route: &Route, tls: bool) -> String {
        let mut c = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax",
            self.name,
            self.encode(route)
        );
        if self.secure || tls {
            c.push_str("; Secure");
        }
        c
    }
}

/// Pools up to this size have every valid cookie value computed up front.
const PRECOMPUTED_UP_TO: usize = 32;

/// Route-cookie stickiness over round robin for new clients.
#[derive(Debug)]
pub struct CookiePolicy {
    codec: RouteCodec,
    fallback: RoundRobin,
    /// Every cookie value this configuration can issue, verified once: a
    /// route cookie depends only on its (primary, backup) pair, so a few
    /// values cover every client, and a lookup replaces an HMAC per request.
    known: HashMap<String, Route>,
}

impl CookiePolicy {
    /// The policy for `pool`, signing with `codec`.
    pub fn new(codec: RouteCodec, pool: &Pool) -> Self {
        let mut known = HashMap::new();
        if pool.len() <= PRECOMPUTED_UP_TO {
            let ids: Vec<&str> = pool.members.iter().map(|m| &*m.id).collect();
            for primary in &ids {
                let backups = ids.iter().filter(|b| *b != primary).map(|b| Some(*b));
                for backup in std::iter::once(None).chain(backups) {
                    let route = Route {
                        primary: (*primary).to_string(),
                        backup: backup.map(str::to_string),
                    };
                    known.insert(codec.encode(&route), route);
                }
            }
        }
        Self {
            codec,
            fallback: RoundRobin::new(pool),
            known,
        }
    }
}

impl Select for CookiePolicy {
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        // Values not computed up front (a larger pool, a backup that left
        // the configuration) are verified the slow way.
        let route = cookie_value(req.headers, self.codec.name())
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| self.known.get(v).cloned().or_else(|| self.codec.decode(v)));
        // A cookie naming a backend that no longer exists is stale: treat it as absent.
        let primary = route.as_ref().and_then(|r| pool.index_of(&r.primary));
        let Some(primary) = primary else {
            return Choice {
                order: self.fallback.order(pool.len()),
                ..Choice::default()
            };
        };
        let mut order = vec![primary];
        if let Some(b) = route
            .as_ref()
            .and_then(|r| r.backup.as_deref())
            .and_then(|b| pool.index_of(b))
        {
            if b != primary {
                order.push(b);
            }
        }
        for i in self.fallback.order(pool.len()) {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        complete(&mut order, pool.len(), primary);
        Choice {
            order,
            bound: Some(primary),
            route,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> RouteCodec {
        RouteCodec::new("TETHER_ROUTE", b"secret", false)
    }

    #[test]
    fn round_trips() {
        let c = codec();
        for route in [
            Route {
                primary: "A".into(),
                backup: Some("B".into()),
            },
            Route {
                primary: "node-1".into(),
                backup: None,
            },
        ] {
            assert_eq!(c.decode(&c.encode(&route)), Some(route));
        }
    }

    #[test]
    fn forged_tampered_and_foreign_cookies_are_refused() {
        let c = codec();
        let good = c.encode(&Route {
            primary: "A".into(),
            backup: Some("B".into()),
        });
        let other_key = RouteCodec::new("TETHER_ROUTE", b"other", false);
        let tag = good.rsplit_once('.').unwrap().1;
        let cases = [
            good.replacen('A', "B", 1),         // re-pinned by hand
            format!("A.C.{tag}"),               // backup swapped
            good[..good.len() - 1].to_string(), // truncated tag
            format!("{good}A"),                 // extended tag
            "A.B.".to_string(),                 // no tag
            "A".to_string(),
            "".to_string(),
            "..".to_string(),
            format!(".B.{tag}"),
            other_key.encode(&Route {
                primary: "A".into(),
                backup: Some("B".into()),
            }),
            format!("A.B.C.{tag}"),
        ];
        for bad in cases {
            assert_eq!(c.decode(&bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn the_policy_accepts_exactly_what_the_codec_verifies() {
        let pool = crate::pool::test_pool(&["A", "B", "C"]);
        let policy = CookiePolicy::new(codec(), &pool);
        assert_eq!(
            policy.known.len(),
            9,
            "3 primaries x (no backup + 2 backups)"
        );
        let c = codec();
        let good = c.encode(&Route {
            primary: "C".into(),
            backup: Some("A".into()),
        });
        let tag = good.rsplit_once('.').unwrap().1.to_string();
        let choose = |value: &str| {
            let cookie = format!("TETHER_ROUTE={value}");
            let fields = [httparse::Header {
                name: "Cookie",
                value: cookie.as_bytes(),
            }];
            let req = RequestInfo {
                client_ip: "127.0.0.1".parse().unwrap(),
                headers: super::super::Headers::new(&fields),
            };
            policy.choose(&req, &pool)
        };
        let chosen = choose(&good);
        assert_eq!((chosen.bound, &chosen.order[..2]), (Some(2), &[2, 0][..]));
        // A backup outside the configuration is not precomputed: the codec
        // still verifies it, and the primary holds.
        let gone = c.encode(&Route {
            primary: "B".into(),
            backup: Some("Z".into()),
        });
        assert_eq!(choose(&gone).bound, Some(1));
        for forged in [
            format!("A.C.{tag}"),
            format!("C.A.{tag}x"),
            "C.A.".into(),
            String::new(),
        ] {
            let chosen = choose(&forged);
            assert_eq!((chosen.bound, chosen.route), (None, None), "{forged:?}");
        }
    }

    #[test]
    fn set_cookie_has_safe_attributes() {
        let c = RouteCodec::new("R", b"k", true);
        let route = Route {
            primary: "A".into(),
            backup: None,
        };
        let s = c.set_cookie(&route, false);
        assert!(s.starts_with("R=A.."), "{s}");
        assert!(
            s.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
            "{s}"
        );
        // Behind TLS it is Secure even when not configured so.
        let plain = RouteCodec::new("R", b"k", false);
        assert!(!plain.set_cookie(&route, false).contains("Secure"));
        assert!(plain.set_cookie(&route, true).ends_with("; Secure"));
    }
}
