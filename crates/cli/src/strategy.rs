//! The strategies `tether demo` measures and `tether up` runs: what each one
//! is, in one place — where its sessions live (the node's store flags), the
//! balancer policy in front of it, and which column of the brief's table it
//! stands for.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use tether_lb::PolicyKind;

/// A way to keep users logged in behind a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Strategy {
    /// Each node's memory behind round robin: the problem itself.
    Local,
    /// Each node's memory, clients pinned by address (nginx `ip_hash`).
    StickyIp,
    /// Each node's memory, clients pinned by an inserted route cookie.
    StickyCookie,
    /// Every node holds every session (Tomcat's DeltaManager).
    ReplicatedAll,
    /// The owner and one backup hold each session (Tomcat's BackupManager).
    ReplicatedBackup,
    /// One shared Redis; nodes hold nothing.
    Redis,
    /// Redis, plus a near cache on the node a route cookie pins each user to.
    StickyRedis,
    /// Signed tokens held by the clients; nodes hold nothing.
    Jwt,
}

/// Where a strategy's nodes keep sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The node's own memory.
    Memory,
    /// Replicated among the nodes: `all` or owner + `backup`.
    Cluster(Replication),
    /// A Redis the run provides, with or without the near cache.
    Redis {
        /// Whether nodes keep a near cache kept coherent by Redis.
        near_cache: bool,
    },
    /// Nowhere on the server: a signed token (a revocation list in Redis
    /// when the run provides one).
    Jwt,
}

/// How the replicated store copies sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// To every node.
    All,
    /// To the owner and one backup.
    Backup,
}

/// The column of the brief's comparison a strategy stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Approach {
    /// No strategy: the problem the brief starts from.
    Problem,
    /// Sticky Session.
    Sticky,
    /// 세션 클러스터링: session clustering.
    Clustering,
    /// 외부 세션 저장소: an external session store.
    External,
    /// JWT: no session on the server.
    Stateless,
}

/// Everything a strategy is.
struct Spec {
    name: &'static str,
    policy: PolicyKind,
    store: Store,
    approach: Approach,
    note: &'static str,
}

impl Strategy {
    /// Every strategy, in the brief's order.
    pub const ALL: [Strategy; 8] = [
        Self::Local,
        Self::StickyIp,
        Self::StickyCookie,
        Self::ReplicatedAll,
        Self::ReplicatedBackup,
        Self::Redis,
        Self::StickyRedis,
        Self::Jwt,
    ];

    /// The one place that says what each strategy is.
    fn spec(self) -> Spec {
        let (name, policy, store, approach, note) = match self {
            Self::Local => (
                "local",
                PolicyKind::RoundRobin,
                Store::Memory,
                Approach::Problem,
                "each node holds only its own users' sessions",
            ),
            Self::StickyIp => (
                "sticky-ip",
                PolicyKind::IpHash,
                Store::Memory,
                Approach::Sticky,
                "each node holds only its own users' sessions; the balancer hashes the client's /24",
            ),
            Self::StickyCookie => (
                "sticky-cookie",
                PolicyKind::Cookie,
                Store::Memory,
                Approach::Sticky,
                "each node holds only its own users' sessions; a route cookie names the node",
            ),
            Self::ReplicatedAll => (
                "replicated-all",
                PolicyKind::RoundRobin,
                Store::Cluster(Replication::All),
                Approach::Clustering,
                "every node holds every session",
            ),
            Self::ReplicatedBackup => (
                "replicated-backup",
                PolicyKind::Owner,
                Store::Cluster(Replication::Backup),
                Approach::Clustering,
                "each session on its owner and one backup; the balancer routes to the owner",
            ),
            Self::Redis => (
                "redis",
                PolicyKind::RoundRobin,
                Store::Redis { near_cache: false },
                Approach::External,
                "sessions in one shared Redis: nodes hold none",
            ),
            // Sticky routing keeps each user on the node that has the session
            // cached; Redis keeps every session through any node's failure.
            Self::StickyRedis => (
                "sticky-redis",
                PolicyKind::Cookie,
                Store::Redis { near_cache: true },
                Approach::External,
                "sessions in Redis, each node caching its own users' (invalidated by Redis)",
            ),
            Self::Jwt => (
                "jwt",
                PolicyKind::RoundRobin,
                Store::Jwt,
                Approach::Stateless,
                "sessions in the clients' tokens: nodes hold none",
            ),
        };
        Spec {
            name,
            policy,
            store,
            approach,
            note,
        }
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The balancer policy in front of it.
    pub fn policy(self) -> PolicyKind {
        self.spec().policy
    }

    /// The policy as `tether lb --policy` spells it.
    pub fn policy_name(self) -> &'static str {
        match self.policy() {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastConn => "least-conn",
            PolicyKind::P2c => "p2c",
            PolicyKind::IpHash => "ip-hash",
            PolicyKind::IpHashFull => "ip-hash-full",
            PolicyKind::Cookie => "cookie",
            PolicyKind::Hash => "hash",
            PolicyKind::Owner => "owner",
        }
    }

    /// Where its nodes keep sessions.
    pub fn store(self) -> Store {
        self.spec().store
    }

    /// The brief's column it stands for.
    pub fn approach(self) -> Approach {
        self.spec().approach
    }

    /// Where the sessions live, in a sentence.
    pub fn note(self) -> &'static str {
        self.spec().note
    }

    /// Whether it cannot run without a Redis.
    pub fn needs_redis(self) -> bool {
        matches!(self.store(), Store::Redis { .. })
    }

    /// Whether its nodes replicate among themselves.
    pub fn is_replicated(self) -> bool {
        matches!(self.store(), Store::Cluster(_))
    }

    /// Whether each node holds only its own users' sessions in memory.
    pub fn is_memory(self) -> bool {
        self.store() == Store::Memory
    }

    /// The `tether node` store flags: `redis` is the Redis the run provides
    /// (the store of the Redis strategies, the revocation list of `jwt`),
    /// `dir` a directory for the JWT key file, `cluster` the replication
    /// address and `peers` other nodes' (`ID=HOST:PORT`).
    ///
    /// # Errors
    /// A Redis strategy without a Redis, or a key file that cannot be written.
    pub fn store_args(
        self,
        redis: Option<&str>,
        dir: &Path,
        cluster: &str,
        peers: &[String],
    ) -> Result<Vec<String>, String> {
        let mut args: Vec<String> = Vec::new();
        let mut flag = |f: &str, v: &str| args.extend([f.to_string(), v.to_string()]);
        match self.store() {
            Store::Memory => flag("--store", "memory"),
            Store::Redis { near_cache } => {
                let url = redis.ok_or_else(|| format!("{self} needs a Redis"))?;
                flag("--store", url);
                if near_cache {
                    args.push("--redis-near-cache".into());
                }
            }
            Store::Jwt => {
                let keys = dir.join("keys.toml");
                if !keys.exists() {
                    std::fs::write(&keys, tether_jwt::generate_hs256_key_file("demo"))
                        .map_err(|e| format!("writing {}: {e}", keys.display()))?;
                }
                flag("--store", "jwt");
                flag("--jwt-key-file", &keys.display().to_string());
                if let Some(url) = redis {
                    flag("--jwt-revocation", url);
                }
            }
            Store::Cluster(mode) => {
                flag("--store", "cluster");
                flag("--cluster-listen", cluster);
                flag("--cluster-secret", "tether-demo-secret");
                let mode = match mode {
                    Replication::All => "all",
                    Replication::Backup => "backup",
                };
                flag("--replication", mode);
                for p in peers {
                    flag("--peer", p);
                }
            }
        }
        Ok(args)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown strategy {s:?}: use {}", names()))
    }
}

impl serde::Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Every strategy's name, comma-separated.
pub fn names() -> String {
    Strategy::ALL.map(Strategy::name).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_policies_parse() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
            assert_eq!(s.policy_name().parse::<PolicyKind>(), Ok(s.policy()));
        }
        assert!("sticky"
            .parse::<Strategy>()
            .unwrap_err()
            .contains("sticky-ip"));
    }

    #[test]
    fn store_args_say_where_sessions_live() {
        let dir = tempfile::tempdir().unwrap();
        let args = |s: Strategy, redis| s.store_args(redis, dir.path(), "127.0.0.1:0", &[]);
        assert!(
            args(Strategy::Redis, None).is_err(),
            "redis without a Redis"
        );
        let near = args(Strategy::StickyRedis, Some("redis://127.0.0.1:1")).unwrap();
        assert!(near.contains(&"--redis-near-cache".to_string()), "{near:?}");
        let jwt = args(Strategy::Jwt, None).unwrap();
        assert!(!jwt.contains(&"--jwt-revocation".to_string()), "{jwt:?}");
        let jwt = args(Strategy::Jwt, Some("redis://127.0.0.1:1")).unwrap();
        assert!(jwt.contains(&"--jwt-revocation".to_string()), "{jwt:?}");
        let all = args(Strategy::ReplicatedAll, None).unwrap();
        assert!(
            all.windows(2).any(|w| w == ["--replication", "all"]),
            "{all:?}"
        );
    }
}
