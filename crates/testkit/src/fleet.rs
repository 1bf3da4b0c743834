//! A fleet of replicated nodes behind a balancer, for tests and benchmarks
//! of what fleets live through: restarts, joins, departures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{eventually, free_port, Client, Process};

const SECRET: &str = "fleet-test-secret";

/// One node of a [`Fleet`]: its addresses (kept across restarts) and its
/// process while it runs.
pub struct Member {
    /// HTTP address.
    pub http: SocketAddr,
    /// Cluster (replication and gossip) address.
    pub cluster: SocketAddr,
    /// The running process.
    pub process: Option<Process>,
}

/// `tether node --store cluster` processes behind `tether lb --policy
/// owner` (health checks every 200 ms), each node on fixed loopback ports
/// so a restart comes back where it was, as in a deploy.
pub struct Fleet {
    bin: PathBuf,
    mode: String,
    /// The nodes by name.
    pub nodes: BTreeMap<String, Member>,
    lb: Option<Balancer>,
    _dir: tempfile::TempDir,
}

/// A free loopback address.
///
/// # Panics
/// If no port can be had.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port().expect("a free port")))
}

/// Waits (up to `within` per node) until every node of a replicated fleet
/// (`name`, HTTP address) sees exactly these nodes, this life of each (a
/// restarted node is a new member), and says it is fully replicated: the
/// next node of a deploy may go.
///
/// # Errors
/// Naming the first node that did not settle in time.
pub async fn cluster_settled(
    nodes: &[(String, SocketAddr)],
    within: Duration,
) -> crate::Result<()> {
    let stats = |http: SocketAddr| async move {
        let url = format!("http://{http}/stats");
        Client::new().get(&url).await.ok()?.json().ok()
    };
    let mut lives = Vec::new();
    for (n, http) in nodes {
        let g = eventually(within, "the node's generation", || async {
            stats(*http).await?["cluster"]["generation"].as_u64()
        })
        .await
        .map_err(|e| format!("{n}: {e}"))?;
        lives.push(format!("{n}@{g}"));
    }
    lives.sort();
    for (n, http) in nodes {
        eventually(within, "every node fully replicated", || async {
            let s: Value = stats(*http).await?;
            let c = &s["cluster"];
            let mut members: Vec<String> = serde_json::from_value(c["members"].clone()).ok()?;
            members.sort();
            (members == lives && c["fully_replicated"] == true).then_some(())
        })
        .await
        .map_err(|e| format!("{n}: {e}"))?;
    }
    Ok(())
}

impl Fleet {
    /// Starts nodes `names` of `bin` (`tether`) in replication `mode`
    /// (`backup` or `all`), the balancer, and waits until every node is
    /// fully replicated.
    ///
    /// # Panics
    /// If a process cannot start or the fleet does not form in time.
    pub async fn start(bin: &Path, mode: &str, names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut nodes = BTreeMap::new();
        for n in names {
            nodes.insert(
                n.to_string(),
                Member {
                    http: loopback(),
                    cluster: loopback(),
                    process: None,
                },
            );
        }
        let mut fleet = Self {
            bin: bin.to_path_buf(),
            mode: mode.to_string(),
            nodes,
            lb: None,
            _dir: dir,
        };
        for n in names {
            fleet.boot(n).await;
        }
        let lb = Balancer::spawn(
            bin,
            fleet._dir.path().join("lb.toml"),
            "owner",
            &fleet.backends(names),
            &[],
        )
        .await
        .unwrap();
        fleet.lb = Some(lb);
        fleet.wait_replicated().await;
        fleet
    }

    /// Adds node `name` on new addresses (not started).
    pub fn add(&mut self, name: &str) {
        self.nodes.insert(
            name.to_string(),
            Member {
                http: loopback(),
                cluster: loopback(),
                process: None,
            },
        );
    }

    /// Starts node `name` on its addresses, with every other node as a seed.
    ///
    /// # Panics
    /// If it does not start.
    pub async fn boot(&mut self, name: &str) {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(n, m)| format!("{n}={}", m.cluster))
            .collect();
        let m = &self.nodes[name];
        let mut args: Vec<String> = [
            "node",
            "--id",
            name,
            "--listen",
            &m.http.to_string(),
            "--store",
            "cluster",
            "--cookie-secure",
            "false",
            "--cluster-listen",
            &m.cluster.to_string(),
            "--cluster-secret",
            SECRET,
            "--replication",
            &self.mode,
        ]
        .map(String::from)
        .to_vec();
        for s in seeds {
            args.extend(["--peer".to_string(), s]);
        }
        let p = Process::spawn_n(&self.bin, &args, 2).await.expect("a node");
        self.nodes.get_mut(name).unwrap().process = Some(p);
    }

    fn backends<'a>(&self, names: &[&'a str]) -> Vec<(&'a str, SocketAddr)> {
        names.iter().map(|n| (*n, self.nodes[*n].http)).collect()
    }

    /// The balancer.
    ///
    /// # Panics
    /// Before [`Fleet::start`] finished.
    pub fn lb(&self) -> &Process {
        self.balancer().process()
    }

    fn balancer(&self) -> &Balancer {
        self.lb.as_ref().expect("the balancer runs")
    }

    /// A URL of the balancer's admin listener.
    pub fn admin(&self, path: &str) -> String {
        self.balancer().admin(path)
    }

    /// Points the balancer at `names` (a reload keeps its connections).
    ///
    /// # Panics
    /// If the balancer refuses the new configuration.
    pub async fn balance(&self, names: &[&str]) {
        self.balancer()
            .reload(&self.backends(names))
            .await
            .expect("reload");
    }

    /// The balancer's base URL.
    pub fn url(&self) -> String {
        self.lb().url("")
    }

    /// The nodes running now.
    pub fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, m)| m.process.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Node `name`'s `/stats`.
    pub async fn stats(&self, name: &str) -> Option<Value> {
        let url = format!("http://{}/stats", self.nodes[name].http);
        Client::new().get(&url).await.ok()?.json().ok()
    }

    /// Waits until every running node sees exactly the running nodes (this
    /// life of each: a restarted node is a new member) and says it is fully
    /// replicated: the next node may go.
    ///
    /// # Panics
    /// After 60 s.
    pub async fn wait_replicated(&self) {
        let running: Vec<(String, SocketAddr)> = self
            .running()
            .into_iter()
            .map(|n| {
                let http = self.nodes[&n].http;
                (n, http)
            })
            .collect();
        if let Err(e) = cluster_settled(&running, Duration::from_secs(60)).await {
            let logs: Vec<String> = running.iter().map(|(n, _)| self.log(n)).collect();
            panic!("{e}\n{}", logs.join("\n"));
        }
    }

    /// What node `name` logged so far.
    pub fn log(&self, name: &str) -> String {
        self.nodes[name]
            .process
            .as_ref()
            .map(Process::log)
            .unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    ///
    /// # Panics
    /// If `name` is not running.
    pub async fn kill(&mut self, name: &str) {
        let mut p = self.take(name);
        if let Ok(dir) = std::env::var("KEEP_LOGS") {
            std::fs::write(
                format!("{dir}/{name}-{}.log", p.pid().unwrap_or(0)),
                p.log(),
            )
            .unwrap();
        }
        p.kill().await;
    }

    fn take(&mut self, name: &str) -> Process {
        self.nodes
            .get_mut(name)
            .and_then(|m| m.process.take())
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// Restarts node `name` on its addresses, gracefully (SIGTERM: it hands
    /// its sessions off first) or not (SIGKILL), and waits until every node
    /// is fully replicated again, as a deploy script would.
    ///
    /// # Panics
    /// As [`Fleet::stop`], [`Fleet::boot`] and [`Fleet::wait_replicated`].
    pub async fn restart(&mut self, name: &str, graceful: bool) {
        if graceful {
            self.stop(name).await;
        } else {
            self.kill(name).await;
        }
        self.boot(name).await;
        self.wait_replicated().await;
    }

    /// SIGTERM: the node hands its sessions off, then exits.
    ///
    /// # Panics
    /// If it does not exit, or exits without saying it handed off.
    pub async fn stop(&mut self, name: &str) {
        let mut p = self.take(name);
        let status = p.terminate(Duration::from_secs(60)).await;
        assert!(
            status.is_ok(),
            "{name} did not exit after SIGTERM:\n{}",
            p.log()
        );
        assert!(
            p.log().contains("sessions handed off"),
            "{name} exited without handing off:\n{}",
            p.log()
        );
    }
}

/// A `tether lb` process reading a configuration file, so that a reload
/// (`POST /reload`) can add and remove backends while clients stay
/// connected.
pub struct Balancer {
    process: Process,
    config: PathBuf,
    policy: String,
}

impl Balancer {
    /// Starts `bin lb` with `policy` over `backends` (health checks every
    /// 200 ms), its configuration written to `config`, with `args` added to
    /// its command line. Does not wait for the backends: see
    /// [`Balancer::wait_up`].
    ///
    /// # Errors
    /// If the configuration cannot be written or the balancer does not start.
    pub async fn spawn(
        bin: &Path,
        config: PathBuf,
        policy: &str,
        backends: &[(&str, SocketAddr)],
        args: &[&str],
    ) -> crate::Result<Self> {
        std::fs::write(&config, crate::lb_config(policy, backends))?;
        let mut all = vec![
            "lb".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let process = Process::spawn_n(bin, &all, 2).await?;
        Ok(Self {
            process,
            config,
            policy: policy.to_string(),
        })
    }

    /// The process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// `http://addr` of the client listener followed by `path`.
    pub fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// A URL of the admin listener.
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.process.addrs()[1])
    }

    /// Points the balancer at `backends`: rewrites its configuration and
    /// reloads it (its connections stay).
    ///
    /// # Errors
    /// If the file cannot be written or the reload is refused.
    pub async fn reload(&self, backends: &[(&str, SocketAddr)]) -> crate::Result<()> {
        std::fs::write(&self.config, crate::lb_config(&self.policy, backends))?;
        let r = Client::new().post_form(&self.admin("/reload"), "").await?;
        if r.status != 200 {
            return Err(format!("reload refused: {}", r.text()).into());
        }
        Ok(())
    }

    /// [`Balancer::reload`], then [`Balancer::wait_up`].
    ///
    /// # Errors
    /// As theirs.
    pub async fn balance(
        &self,
        backends: &[(&str, SocketAddr)],
        within: Duration,
    ) -> crate::Result<()> {
        self.reload(backends).await?;
        self.wait_up(backends, within).await
    }

    /// Waits (up to `within`) until the balancer's `/status` says each of
    /// `backends` is up.
    ///
    /// # Errors
    /// When `within` passed, with the balancer's log.
    pub async fn wait_up(
        &self,
        backends: &[(&str, SocketAddr)],
        within: Duration,
    ) -> crate::Result<()> {
        let status = self.admin("/status");
        let want: Vec<String> = backends.iter().map(|(id, _)| id.to_string()).collect();
        eventually(within, "the balancer to see every backend up", || {
            let (status, want) = (status.clone(), want.clone());
            async move {
                let s = Client::new().get(&status).await.ok()?.json().ok()?;
                let up: Vec<String> = s["backends"]
                    .as_array()?
                    .iter()
                    .filter(|b| b["state"] == "up")
                    .filter_map(|b| Some(b["id"].as_str()?.to_string()))
                    .collect();
                want.iter().all(|w| up.contains(w)).then_some(())
            }
        })
        .await
        .map_err(|e| format!("{e}\n{}", self.process.log()).into())
    }
}
