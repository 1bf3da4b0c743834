//! Placement: which node owns a key, the same answer everywhere.
//!
//! The load balancer's `owner` policy and the replicated store both call
//! [`preference`], so a request for a session arrives at the node that owns
//! it and, when that node is gone, at the first backup, which holds a replica.
//! Rendezvous (highest-random-weight) hashing moves only the keys of a node
//! that leaves or joins; every other key keeps its owner.
//!
//! The hash is fixed (FNV-1a with a 64-bit finaliser), not `std`'s
//! `DefaultHasher`, whose algorithm may change between Rust releases: two
//! balancers built by different compilers must still agree.
//!
//! # Segments
//! Sessions are not placed one by one: the ID space is cut into
//! [`SEGMENTS`] segments (the first two bytes of the random ID), and each
//! segment is placed by rendezvous hashing ([`session_preference`]). Every
//! session of a segment has the same owner and backups, so replicas can be
//! compared, moved and dropped a segment at a time (Infinispan and
//! Hazelcast do the same with 256 and 271 segments), and a node computes
//! the placement of all segments once per membership change instead of
//! once per session.

use crate::SessionId;

/// How many segments the session ID space is cut into. 1024 keeps the
/// share of each of 3 nodes within a few percent of a third.
pub const SEGMENTS: u16 = 1024;

/// The segment of a session: its ID's first two bytes, modulo [`SEGMENTS`]
/// (IDs are uniformly random, so segments are evenly filled).
pub fn segment(id: &SessionId) -> u16 {
    let b = id.as_bytes();
    u16::from_le_bytes([b[0], b[1]]) % SEGMENTS
}

/// The nodes ordered by preference for segment `seg`: owner first.
pub fn segment_preference<N: AsRef<str>>(seg: u16, nodes: &[N]) -> Vec<&N> {
    preference(&seg.to_le_bytes(), nodes)
}

/// The nodes ordered by preference for session `id` (its segment's order):
/// what the replicated store and the balancer's `owner` policy both use.
pub fn session_preference<'a, N: AsRef<str>>(id: &SessionId, nodes: &'a [N]) -> Vec<&'a N> {
    segment_preference(segment(id), nodes)
}

/// The owner of session `id` among `nodes` (`None` if there are none).
pub fn session_owner<'a, N: AsRef<str>>(id: &SessionId, nodes: &'a [N]) -> Option<&'a N> {
    owner(&segment(id).to_le_bytes(), nodes)
}

/// A stable 64-bit hash of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fmix64(fnv1a(FNV_OFFSET, bytes))
}

/// The rendezvous score of `node` for `key`; the highest score owns the key.
pub fn score(key: &[u8], node: &str) -> u64 {
    // The node name goes first and a separator follows it, so ("ab", "c")
    // and ("a", "bc") never hash alike.
    let h = fnv1a(FNV_OFFSET, node.as_bytes());
    let h = fnv1a(h, &[0xff]);
    fmix64(fnv1a(h, key))
}

/// The nodes ordered by preference for `key`: owner first, then backups.
/// Ties (astronomically rare) break by name so every caller agrees.
pub fn preference<'a, N: AsRef<str>>(key: &[u8], nodes: &'a [N]) -> Vec<&'a N> {
    let mut scored: Vec<(u64, &N)> = nodes.iter().map(|n| (score(key, n.as_ref()), n)).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.as_ref().cmp(b.1.as_ref())));
    scored.into_iter().map(|(_, n)| n).collect()
}

/// The owner of `key` among `nodes` (`None` if there are none).
pub fn owner<'a, N: AsRef<str>>(key: &[u8], nodes: &'a [N]) -> Option<&'a N> {
    nodes.iter().max_by(|a, b| {
        score(key, a.as_ref())
            .cmp(&score(key, b.as_ref()))
            .then_with(|| b.as_ref().cmp(a.as_ref()))
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's finaliser: spreads FNV's weak low bits over the whole word.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic keys (no RNG): the figures below never change.
    fn keys(n: u32) -> impl Iterator<Item = [u8; 16]> {
        (0..n).map(|i| {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        })
    }

    const PINNED_HASH: u64 = 0xf56c_172d_8c99_6616;
    const PINNED_SCORE: u64 = 0x444e_996b_4da0_83d2;

    #[test]
    fn the_hash_is_pinned() {
        // Changing these values breaks routing between mixed versions.
        assert_eq!(
            stable_hash(b"tether"),
            PINNED_HASH,
            "{:#x}",
            stable_hash(b"tether")
        );
        assert_eq!(
            score(b"key", "A"),
            PINNED_SCORE,
            "{:#x}",
            score(b"key", "A")
        );
    }

    #[test]
    fn owners_are_spread_evenly() {
        let nodes = ["A", "B", "C"];
        let mut counts = [0u32; 3];
        for k in keys(30_000) {
            let o = owner(&k, &nodes).unwrap();
            counts[nodes.iter().position(|n| n == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn preference_starts_with_the_owner_and_lists_every_node_once() {
        let nodes = ["A", "B", "C", "D"];
        for k in keys(100) {
            let p = preference(&k, &nodes);
            assert_eq!(p[0], owner(&k, &nodes).unwrap());
            let mut sorted: Vec<_> = p.iter().map(|s| **s).collect();
            sorted.sort_unstable();
            assert_eq!(sorted, nodes);
        }
    }

    #[test]
    fn segments_are_spread_evenly_and_sessions_follow_their_segment() {
        let nodes = ["A", "B", "C"];
        let mut counts = [0u32; 3];
        for seg in 0..SEGMENTS {
            let o = segment_preference(seg, &nodes)[0];
            counts[nodes.iter().position(|n| n == o).unwrap()] += 1;
        }
        // 1024 segments over 3 nodes: each within 10% of a third.
        for c in counts {
            assert!((307..376).contains(&c), "{counts:?}");
        }
        for k in keys(200) {
            let id = SessionId::from_bytes(k);
            assert_eq!(
                session_preference(&id, &nodes),
                segment_preference(segment(&id), &nodes)
            );
            assert_eq!(
                session_owner(&id, &nodes),
                Some(session_preference(&id, &nodes)[0])
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys_to_their_first_backup() {
        let all = ["A", "B", "C"];
        let without_b = ["A", "C"];
        for k in keys(5_000) {
            let p = preference(&k, &all);
            let after = owner(&k, &without_b).unwrap();
            if *p[0] == "B" {
                assert_eq!(after, p[1], "a key of B must go to its first backup");
            } else {
                assert_eq!(after, p[0], "a key not owned by B moved");
            }
        }
    }
}
