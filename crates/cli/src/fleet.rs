//! A strategy's fleet: `tether node` processes on loopback ports, started,
//! killed, stopped, restarted and joined as a deploy would, and the `tether
//! lb` process in front of them. `tether demo` and `tether up` both run
//! their nodes through it.
//!
//! A node keeps its addresses across restarts (the OS picks them at its
//! first start), so the balancer's configuration stays true and a restarted
//! replicated node comes back where its peers look for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_testkit::{eventually, Balancer, Client, Process};

use crate::strategy::Strategy;

/// How long a node may take to be ready (a replicated node: to hold its share).
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(30);

/// One node: its name, its addresses, its process while it runs.
pub struct Node {
    /// Its name (`--id`), which the balancer routes by.
    pub id: String,
    /// Its HTTP address (port 0 until it first started).
    pub http: SocketAddr,
    /// Its replication address (replicated strategies).
    pub cluster: Option<SocketAddr>,
    process: Option<Process>,
}

impl Node {
    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// `http://addr` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Its process ID while it runs: a restarted node is a new process,
    /// whose counters start again from zero.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

/// The nodes of one strategy. Dropping it kills them.
pub struct Fleet {
    bin: PathBuf,
    strategy: Strategy,
    redis: Option<String>,
    nodes: Vec<Node>,
    store_flags: usize,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts nodes `ids` of `strategy` one after the other (each replicated
    /// node joins the ones before), with `redis` as the Redis the strategy
    /// uses (the store, or `jwt`'s revocation list), and waits until every
    /// node is ready.
    ///
    /// # Errors
    /// If a node does not start or the fleet is not ready within 30 s.
    pub async fn start(
        bin: &Path,
        strategy: Strategy,
        ids: &[&str],
        redis: Option<String>,
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut fleet = Self {
            bin: bin.to_path_buf(),
            strategy,
            redis,
            nodes: Vec::new(),
            store_flags: 0,
            dir,
        };
        for id in ids {
            fleet.add(id);
            fleet.boot(id).await?;
        }
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// A directory that lives as long as the fleet.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The most store flags a node was started with (one joining the
    /// others names them as peers): what the strategy asks of a node's
    /// configuration beyond the default `--store memory`.
    pub fn store_flags(&self) -> usize {
        self.store_flags
    }

    /// Every node, running or not, in the order they were added.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `id`.
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: &str) -> Result<&mut Node, String> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| format!("no node {id}"))
    }

    /// The running nodes as the balancer names them: (`ID`, HTTP address).
    pub fn backends(&self) -> Vec<(&str, SocketAddr)> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| (n.id.as_str(), n.http))
            .collect()
    }

    /// Adds node `id`, not started, on addresses the OS will pick.
    pub fn add(&mut self, id: &str) {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        self.nodes.push(Node {
            id: id.to_string(),
            http: any,
            cluster: None,
            process: None,
        });
    }

    /// Starts node `id` on its addresses; a replicated node is given every
    /// running node as a peer. Does not wait until it is ready.
    ///
    /// # Errors
    /// If it is running already or does not start.
    pub async fn boot(&mut self, id: &str) -> Result<(), String> {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id && n.is_running())
            .filter_map(|n| Some(format!("{}={}", n.id, n.cluster?)))
            .collect();
        let (bin, strategy) = (self.bin.clone(), self.strategy);
        let redis = self.redis.clone();
        let dir = self.dir.path().to_path_buf();
        let node = self.node_mut(id)?;
        if node.is_running() {
            return Err(format!("{id} runs already"));
        }
        let cluster = node
            .cluster
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let mut args: Vec<String> = ["node", "--id", id, "--listen"].map(String::from).to_vec();
        args.push(node.http.to_string());
        args.extend(["--cookie-secure".into(), "false".into()]);
        let store = strategy.store_args(redis.as_deref(), &dir, &cluster, &peers)?;
        // What the strategy asks of a node beyond the default `--store memory`.
        let flags = if strategy.is_memory() {
            0
        } else {
            store.iter().filter(|a| a.starts_with("--")).count()
        };
        args.extend(store);
        args.extend(["--log-level".into(), "error".into()]);
        let announced = if strategy.is_replicated() { 2 } else { 1 };
        let p = Process::spawn_n(&bin, &args, announced)
            .await
            .map_err(|e| format!("node {id}: {e}"))?;
        node.http = p.addr();
        node.cluster = p.addrs().get(1).copied();
        node.process = Some(p);
        self.store_flags = self.store_flags.max(flags);
        Ok(())
    }

    /// SIGKILL, as a crash: no draining, no goodbye.
    ///
    /// # Errors
    /// If `id` is not running.
    pub async fn kill(&mut self, id: &str) -> Result<(), String> {
        self.kill_together(&[id]).await
    }

    /// SIGKILLs the nodes `ids` at the same instant, then reaps them: a
    /// double failure. Killing them one after the other gives the
    /// survivors time to re-replicate the first one's sessions, which is a
    /// single failure twice.
    ///
    /// # Errors
    /// If one of `ids` is not running (none is killed then).
    pub async fn kill_together(&mut self, ids: &[&str]) -> Result<(), String> {
        for id in ids {
            if self.node_mut(id)?.process.is_none() {
                return Err(format!("{id} is not running"));
            }
        }
        let mut dying = Vec::with_capacity(ids.len());
        for id in ids {
            dying.push(self.take(id)?);
        }
        for p in &mut dying {
            p.start_kill();
        }
        for p in &mut dying {
            p.kill().await;
        }
        Ok(())
    }

    /// SIGTERM, as a deploy stops a node: it stops being ready, a
    /// replicated node hands its sessions off, then it exits.
    ///
    /// # Errors
    /// If `id` is not running or does not exit within 60 s (it is killed).
    pub async fn stop(&mut self, id: &str) -> Result<(), String> {
        let mut p = self.take(id)?;
        p.terminate(Duration::from_secs(60))
            .await
            .map(drop)
            .map_err(|e| format!("{id}: {e}\n{}", p.log()))
    }

    fn take(&mut self, id: &str) -> Result<Process, String> {
        self.node_mut(id)?
            .process
            .take()
            .ok_or_else(|| format!("{id} is not running"))
    }

    /// Waits until every running node answers `/health` with 200 and, for a
    /// replicated strategy, every one sees exactly the running nodes and
    /// holds every copy it should: the next step of a deploy may go.
    ///
    /// # Errors
    /// After 30 s, with the late node's log.
    pub async fn wait_ready(&self) -> Result<(), String> {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
        for n in &running {
            let health = n.url("/health");
            eventually(READY_WITHIN, "/health 200", || {
                let health = health.clone();
                async move { (Client::new().get(&health).await.ok()?.status == 200).then_some(()) }
            })
            .await
            .map_err(|e| format!("node {}: {e}\n{}", n.id, n.log()))?;
        }
        if self.strategy.is_replicated() {
            let members: Vec<(String, SocketAddr)> =
                running.iter().map(|n| (n.id.clone(), n.http)).collect();
            tether_testkit::cluster_settled(&members, READY_WITHIN)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Each running node's `/stats`, by name (a node that does not answer
    /// is left out).
    pub async fn stats(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            if let Ok(s) = Client::new().get(&n.url("/stats")).await {
                if let Ok(v) = s.json() {
                    out.push((n.id.clone(), v));
                }
            }
        }
        out
    }

    /// Each running node's `/metrics` text, by name and process ID.
    pub async fn metrics(&self) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            if let (Ok(m), Some(pid)) = (Client::new().get(&n.url("/metrics")).await, n.pid()) {
                out.push((n.id.clone(), pid, m.text()));
            }
        }
        out
    }
}

/// The balancer of `strategy` over `backends` (health checks every 200 ms),
/// its configuration in `dir`, once it considers every backend up. A reload
/// ([`Balancer::reload`]) adds and removes backends while clients stay
/// connected.
///
/// # Errors
/// If it does not start, or a backend is not up within 30 s.
pub async fn balancer(
    bin: &Path,
    dir: &Path,
    strategy: Strategy,
    backends: &[(&str, SocketAddr)],
) -> Result<Balancer, String> {
    let lb = Balancer::spawn(
        bin,
        dir.join("lb.toml"),
        strategy.policy_name(),
        backends,
        &["--log-level", "error"],
    )
    .await
    .map_err(|e| format!("balancer: {e}"))?;
    lb.wait_up(backends, READY_WITHIN)
        .await
        .map_err(|e| e.to_string())?;
    Ok(lb)
}
