//! Views: the members a node believes live, and where each segment lives
//! under them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_core::placement::{self, SEGMENTS};

/// One incarnation of a node: a restarted node is a new member (a new
/// generation) even under the same name. Encoded as `[name, generation]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "(String, u64)", into = "(String, u64)")]
pub struct Member {
    /// The node's name (its backend ID at the balancer).
    pub name: String,
    /// When this incarnation started (a number that grows across restarts).
    pub generation: u64,
}

impl From<(String, u64)> for Member {
    fn from((name, generation): (String, u64)) -> Self {
        Self { name, generation }
    }
}

impl From<Member> for (String, u64) {
    fn from(m: Member) -> Self {
        (m.name, m.generation)
    }
}

impl Member {
    /// A member named `name` of generation `generation`.
    pub fn new(name: impl Into<String>, generation: u64) -> Self {
        Self {
            name: name.into(),
            generation,
        }
    }
}

/// Names a view: equal IDs mean equal member sets (names and generations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ViewId(pub u64);

/// The live members as one node sees them, with the placement of every
/// segment under them computed once.
#[derive(Debug, Clone)]
pub struct View {
    id: ViewId,
    members: Vec<Member>,
    /// For each segment, the members' indices in preference order (owner
    /// first), `members.len()` entries per segment.
    order: Vec<u16>,
}

impl Default for View {
    fn default() -> Self {
        Self::new(std::iter::empty())
    }
}

impl View {
    /// The view of `members`; when a name appears with several generations
    /// (a restarted node whose previous life is not yet declared dead), the
    /// newest counts.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Self {
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        for m in members {
            let g = newest.entry(m.name).or_insert(m.generation);
            *g = (*g).max(m.generation);
        }
        let members: Vec<Member> = newest
            .into_iter()
            .map(|(name, generation)| Member { name, generation })
            .collect();
        let mut text = Vec::new();
        for m in &members {
            text.extend_from_slice(m.name.as_bytes());
            text.push(0xff);
            text.extend_from_slice(&m.generation.to_le_bytes());
        }
        let id = ViewId(placement::stable_hash(&text));
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        let mut order = Vec::with_capacity(usize::from(SEGMENTS) * members.len());
        for seg in 0..SEGMENTS {
            for name in placement::segment_preference(seg, &names) {
                let i = names.iter().position(|n| n == name).expect("a member");
                order.push(i as u16);
            }
        }
        Self { id, members, order }
    }

    /// This view's ID.
    pub fn id(&self) -> ViewId {
        self.id
    }

    /// The members, sorted by name.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the view has no member (a leaving node alone).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Whether `name` is a member.
    pub fn contains(&self, name: &str) -> bool {
        self.member(name).is_some()
    }

    /// The members' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The members of segment `seg` in preference order: owner first.
    pub fn preference(&self, seg: u16) -> impl Iterator<Item = &str> + '_ {
        let n = self.members.len();
        let start = usize::from(seg) * n;
        self.order[start..start + n]
            .iter()
            .map(|i| self.members[usize::from(*i)].name.as_str())
    }

    /// The owner of segment `seg`.
    pub fn owner(&self, seg: u16) -> Option<&str> {
        self.preference(seg).next()
    }

    /// The first `copies` members of segment `seg`'s preference: the
    /// nodes that hold its sessions.
    pub fn holders(&self, seg: u16, copies: usize) -> impl Iterator<Item = &str> + '_ {
        self.preference(seg).take(copies)
    }

    /// Whether `name` is one of the first `copies` members for `seg`.
    pub fn holds(&self, seg: u16, copies: usize, name: &str) -> bool {
        self.holders(seg, copies).any(|n| n == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generation_of_a_name_counts_and_ids_follow_generations() {
        let a = View::new([Member::new("B", 1), Member::new("A", 1)]);
        let b = View::new([
            Member::new("A", 1),
            Member::new("B", 1),
            Member::new("B", 0),
        ]);
        assert_eq!(a.id(), b.id());
        assert_eq!(a.names(), ["A", "B"]);
        let restarted = View::new([Member::new("A", 1), Member::new("B", 2)]);
        assert_ne!(a.id(), restarted.id());
        assert_eq!(restarted.member("B").unwrap().generation, 2);
    }

    #[test]
    fn placement_matches_the_shared_function() {
        let v = View::new(["A", "B", "C", "D"].map(|n| Member::new(n, 7)));
        let names = ["A", "B", "C", "D"];
        for seg in 0..SEGMENTS {
            let want: Vec<&str> = placement::segment_preference(seg, &names)
                .into_iter()
                .copied()
                .collect();
            assert_eq!(v.preference(seg).collect::<Vec<_>>(), want);
            assert_eq!(v.holders(seg, 2).count(), 2);
        }
        assert!(View::default().owner(3).is_none());
    }
}
