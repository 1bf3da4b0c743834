//! Policies that spread load without stickiness: round robin, least
//! connections, power of two choices.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{complete, Choice, RequestInfo, Select};
use crate::pool::Pool;

/// nginx's smooth weighted round robin, unrolled into one cycle: weights
/// 5,1,1 give `a a b a c a a` rather than `a a a a a b c`, so a heavy
/// backend never receives a burst.
pub fn smooth_weighted_sequence(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut seq = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let best = (0..weights.len())
            .max_by(|a, b| current[*a].cmp(&current[*b]).then(b.cmp(a)))
            .expect("at least one backend");
        current[best] -= total;
        seq.push(best);
    }
    seq
}

/// Weighted round robin.
#[derive(Debug)]
pub struct RoundRobin {
    sequence: Vec<usize>,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Round robin over `pool` by weight.
    pub fn new(pool: &Pool) -> Self {
        let weights: Vec<u32> = pool.members.iter().map(|m| m.weight).collect();
        Self {
            sequence: smooth_weighted_sequence(&weights),
            // Start at a random place so restarted or parallel balancers do
            // not all send their first requests to the first backend.
            next: AtomicUsize::new(fastrand::usize(..weights.len().max(1) * 64)),
        }
    }

    /// The next order: the next backend in the cycle, then the others.
    ///
    /// The fallbacks start at a place that moves every cycle, so when a
    /// backend is down its share is spread over the others instead of all
    /// landing on its neighbour in the list.
    pub fn order(&self, n: usize) -> Vec<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let first = self.sequence[i % self.sequence.len()];
        let mut order = Vec::with_capacity(n);
        order.push(first);
        let shift = (i / self.sequence.len()) % n.saturating_sub(1).max(1);
        complete(&mut order, n, first + shift);
        order
    }
}

impl Select for RoundRobin {
    fn choose(&self, _req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        Choice {
            order: self.order(pool.len()),
            ..Choice::default()
        }
    }
}

/// `a` is less loaded than `b`, relative to weight.
fn lighter(pool: &Pool, a: usize, b: usize) -> std::cmp::Ordering {
    let (ma, mb) = (&pool.members[a], &pool.members[b]);
    let la = ma.stats.in_flight.load(Ordering::Relaxed) as u64 * u64::from(mb.weight);
    let lb = mb.stats.in_flight.load(Ordering::Relaxed) as u64 * u64::from(ma.weight);
    la.cmp(&lb)
}

/// Fewest requests in flight relative to weight; ties rotate.
#[derive(Debug, Default)]
pub struct LeastConn {
    rotate: AtomicUsize,
}

impl Select for LeastConn {
    fn choose(&self, _req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        let n = pool.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        // A stable sort keeps the rotation among equally loaded backends.
        order.sort_by(|a, b| lighter(pool, *a, *b));
        Choice {
            order,
            ..Choice::default()
        }
    }
}

/// Two random backends, the less loaded first (Mitzenmacher's power of two
/// choices: near least-conn balance without scanning every backend).
#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl Select for PowerOfTwo {
    fn choose(&self, _req: &RequestInfo<'_>, pool: &Pool) -> Choice {
        let n = pool.len();
        let a = fastrand::usize(..n);
        let mut order = vec![a];
        if n > 1 {
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            if lighter(pool, b, a).is_lt() {
                order.insert(0, b);
            } else {
                order.push(b);
            }
        }
        complete(&mut order, n, a);
        Choice {
            order,
            ..Choice::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_backends_share_is_spread_over_the_others() {
        let pool = crate::pool::test_pool(&["A", "B", "C", "D"]);
        let rr = RoundRobin::new(&pool);
        let mut fallback = [0usize; 4];
        for _ in 0..1200 {
            let order = rr.order(4);
            // B (index 1) is down: the request goes to the first other.
            let served = order.into_iter().find(|i| *i != 1).unwrap();
            fallback[served] += 1;
        }
        // 300 each from their own turns, plus B's 300 spread evenly.
        assert_eq!(fallback[1], 0);
        for i in [0, 2, 3] {
            assert_eq!(fallback[i], 400, "{fallback:?}");
        }
    }

    #[test]
    fn smooth_sequence_interleaves_by_weight() {
        assert_eq!(
            smooth_weighted_sequence(&[5, 1, 1]),
            vec![0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(smooth_weighted_sequence(&[1, 1, 1]), vec![0, 1, 2]);
        let seq = smooth_weighted_sequence(&[3, 2]);
        assert_eq!(seq.iter().filter(|i| **i == 0).count(), 3);
        assert_eq!(seq.len(), 5);
    }
}
