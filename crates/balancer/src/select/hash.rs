//! Sticky policies that derive the backend from a key: nginx's `ip_hash`,
//! rendezvous on the full address, a consistent-hash ring with bounded
//! load, and the session owner.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use tether_core::placement;
use tether_core::SessionId;

use super::{complete, cookie_value, key_bytes, Choice, RequestInfo, RoundRobin, Select};
use crate::config::HashKey;
use crate::pool::Pool;

/// The backend order nginx's `ip_hash` produces for `ip` over backends with
/// `weights`: the first choice, then each re-hash it would try when the
/// previous one is down (nginx tries 20), then everything else.
///
/// IPv4 (and IPv4-mapped IPv6) hashes only the first three octets, so a whole
/// /24 shares a backend, exactly as nginx does; IPv6 hashes all 16 bytes.
pub fn nginx_ip_hash_order(ip: IpAddr, weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    nginx_ip_hash_order_in(ip, weights, total)
}

/// [`nginx_ip_hash_order`] with the weights' sum computed once.
fn nginx_ip_hash_order_in(ip: IpAddr, weights: &[u32], total: u64) -> Vec<usize> {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    // The hashed bytes, without an allocation: this runs per request.
    let mut key = [0u8; 16];
    let bytes: &[u8] = match (v4, ip) {
        (Some(v4), _) => {
            key[..3].copy_from_slice(&v4.octets()[..3]);
            &key[..3]
        }
        (None, IpAddr::V6(v6)) => {
            key = v6.octets();
            &key
        }
        (None, IpAddr::V4(_)) => unreachable!("IPv4 handled above"),
    };
    let mut order = Vec::with_capacity(weights.len());
    let mut hash: u64 = 89;
    for _ in 0..20 {
        for b in bytes {
            hash = (hash * 113 + u64::from(*b)) % 6271;
        }
        let mut w = hash % total;
        let mut p = 0;
        while w >= u64::from(weights[p]) {
            w -= u64::from(weights[p]);
            p += 1;
        }
        if !order.contains(&p) {
            order.push(p);
            if order.len() == weights.len() {
                break;
            }
        }
    }
    let last = order.last().copied().unwrap_or(0);
    complete(&mut order, weights.len(), last);
    order
}

/// nginx-compatible `ip_hash`.
#[derive(Debug, Default)]
pub struct IpHash {
    /// The pool's weights and their sum, read once per configuration
    /// instead of per request.
    weights: Vec<u32>,
    total: u64,
}

impl IpHash {
    /// The policy for `pool`.
    pub fn new(pool: &Pool) -> Self {
        let weights: Vec<u32> = pool.members.iter().map(|m| m.weight).collect();
        let total = weights.iter().map(|w| u64::from(*w)).sum();
        Self { weights, total }
    }
}

impl Select for IpHash {
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        debug_assert_eq!(self.weights.len(), pool.len());
        let order = nginx_ip_hash_order_in(req.client_ip, &self.weights, self.total);
        Choice {
            bound: order.first().copied(),
            order,
            route: None,
        }
    }
}

/// Rendezvous hashing of the full client address: unlike nginx's /24 mode,
/// clients behind one /24 spread out, and removing a backend moves only its
/// own clients.
#[derive(Debug, Default)]
pub struct IpHashFull;

fn rendezvous(key: &[u8], pool: &Pool) -> Vec<usize> {
    let ids: Vec<&str> = pool.members.iter().map(|m| &*m.id).collect();
    placement::preference(key, &ids)
        .into_iter()
        .map(|id| pool.index_of(id).expect("id from the pool"))
        .collect()
}

impl Select for IpHashFull {
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        // On the stack: this runs per request.
        let mut key = [0u8; 16];
        let len = match req.client_ip {
            IpAddr::V4(v4) => {
                key[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    key[..4].copy_from_slice(&v4.octets());
                    4
                }
                None => {
                    key = v6.octets();
                    16
                }
            },
        };
        let order = rendezvous(&key[..len], pool);
        Choice {
            bound: order.first().copied(),
            order,
            route: None,
        }
    }
}

/// A consistent-hash ring: 160 points per unit of weight (as ketama), keyed
/// by backend ID so the ring does not change when an address does.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// The ring of `pool`.
    pub fn new(pool: &Pool) -> Self {
        let mut points = Vec::new();
        for (i, m) in pool.members.iter().enumerate() {
            for v in 0..160 * m.weight {
                points.push((
                    placement::stable_hash(format!("{}#{v}", m.id).as_bytes()),
                    i,
                ));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Backends clockwise from `key`'s point, each once.
    pub fn walk(&self, key: &[u8], n: usize) -> Vec<usize> {
        let h = placement::stable_hash(key);
        let start = self.points.partition_point(|(p, _)| *p < h);
        let mut order = Vec::with_capacity(n);
        for k in 0..self.points.len() {
            let (_, i) = self.points[(start + k) % self.points.len()];
            if !order.contains(&i) {
                order.push(i);
                if order.len() == n {
                    break;
                }
            }
        }
        order
    }
}

/// Consistent hashing on a cookie, header or the client address, with an
/// optional bound on load (Mirrokni et al., "Consistent Hashing with Bounded
/// Loads"): a backend already above `factor ×` the mean in-flight load is
/// passed over for the next one on the ring.
#[derive(Debug)]
pub struct KeyHash {
    pub(crate) key: HashKey,
    pub(crate) ring: Ring,
    pub(crate) bounded: Option<f64>,
    pub(crate) fallback: RoundRobin,
}

impl Select for KeyHash {
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        let mut buf = [0u8; 16];
        let Some(key) = key_bytes(&self.key, req, &mut buf) else {
            return Choice {
                order: self.fallback.order(pool.len()),
                ..Choice::default()
            };
        };
        let mut order = self.ring.walk(key, pool.len());
        let bound = order.first().copied();
        if let Some(factor) = self.bounded {
            let load = |i: usize| pool.members[i].stats.in_flight.load(Ordering::Relaxed);
            let total: usize = (0..pool.len()).map(load).sum();
            let cap = (factor * (total + 1) as f64 / pool.len() as f64).ceil() as usize;
            // Over-capacity backends keep their ring order, after the others.
            let (fit, over): (Vec<usize>, Vec<usize>) =
                order.into_iter().partition(|i| load(*i) < cap);
            order = fit.into_iter().chain(over).collect();
        }
        Choice {
            order,
            bound,
            route: None,
        }
    }
}

/// The session's owner: rendezvous hashing of the session's segment over
/// backend IDs, the same function the replicated store uses to place it
/// ([`placement::session_preference`]).
#[derive(Debug)]
pub struct Owner {
    pub(crate) cookie: String,
    pub(crate) fallback: RoundRobin,
}

impl Select for Owner {
    fn choose(&self, req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        // A malformed cookie is "no session", exactly as the nodes treat it.
        let id = cookie_value(req.headers, &self.cookie)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| SessionId::parse(v).ok());
        match id {
            Some(id) => {
                let order = rendezvous(&placement::segment(&id).to_le_bytes(), pool);
                Choice {
                    bound: order.first().copied(),
                    order,
                    route: None,
                }
            }
            None => Choice {
                order: self.fallback.order(pool.len()),
                ..Choice::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ip_hash_keeps_a_slash_24_together_and_spreads_slash_24s() {
        let weights = [1, 1, 1];
        let first = |ip: Ipv4Addr| nginx_ip_hash_order(IpAddr::V4(ip), &weights)[0];
        for c in 0..=255u8 {
            let base = first(Ipv4Addr::new(10, 1, c, 1));
            for d in [2u8, 77, 254] {
                assert_eq!(first(Ipv4Addr::new(10, 1, c, d)), base);
            }
        }
        let mut counts = [0; 3];
        for c in 0..=255u8 {
            counts[first(Ipv4Addr::new(10, 1, c, 1))] += 1;
        }
        assert!(counts.iter().all(|n| *n > 40), "{counts:?}");
    }

    #[test]
    fn ip_hash_matches_nginx_arithmetic() {
        // Worked by hand from ngx_http_upstream_ip_hash_module.c: for
        // 127.0.0.x, hash = ((89*113+127)*113+0)%6271 ... then *113+0.
        let mut h: u64 = 89;
        for b in [127u64, 0, 0] {
            h = (h * 113 + b) % 6271;
        }
        let expected = (h % 3) as usize;
        assert_eq!(
            nginx_ip_hash_order("127.0.0.9".parse().unwrap(), &[1, 1, 1])[0],
            expected
        );
        // Mapped IPv6 behaves as IPv4.
        assert_eq!(
            nginx_ip_hash_order("::ffff:127.0.0.9".parse().unwrap(), &[1, 1, 1])[0],
            expected
        );
    }

    #[test]
    fn ip_hash_order_lists_every_backend_once() {
        for last in 0..=255u8 {
            let mut o =
                nginx_ip_hash_order(IpAddr::V4(Ipv4Addr::new(192, 168, last, 1)), &[2, 1, 1, 3]);
            o.sort_unstable();
            assert_eq!(o, vec![0, 1, 2, 3]);
        }
    }
}
