use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{eventually, free_port, Result};

/// A private `redis-server` on a free loopback port, in its own temp dir,
/// with persistence off. Killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Starts `redis-server` from `PATH`.
    ///
    /// # Errors
    /// If `redis-server` is missing (the message says how to install it) or
    /// does not answer `PING` within 10 s.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts `redis-server` with extra configuration arguments (`--name value`).
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        Self::start_on(extra, free_port).await
    }

    /// As [`RedisServer::start_with`], choosing ports with `pick`.
    async fn start_on(extra: &[&str], pick: fn() -> Result<u16>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tether-redis-").tempdir()?;
        let mut last = String::new();
        // Another process may grab the port between probing and binding; try a few.
        for _ in 0..5 {
            let port = pick()?;
            let mut child = spawn(dir.path(), port, extra)?;
            let up = eventually(Duration::from_secs(10), "redis PING", || {
                let exited = matches!(child.try_wait(), Ok(Some(_)));
                async move {
                    if exited {
                        return Some(false);
                    }
                    ping(port).await.then_some(true)
                }
            })
            .await;
            match up {
                Ok(true) => {
                    return Ok(Self {
                        child: Some(child),
                        port,
                        dir,
                        extra: extra.iter().map(|s| s.to_string()).collect(),
                    })
                }
                _ => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    last =
                        std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
                }
            }
        }
        Err(format!("redis-server did not start; log:\n{last}").into())
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection for assertions and administration.
    ///
    /// # Errors
    /// If the server does not answer.
    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (e.g. [`crate::SIGSTOP`] to make a replica lag,
    /// [`crate::SIGCONT`] to let it go on); nothing if it is not running.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            crate::process::signal_child(child, signal);
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same port (after [`RedisServer::stop`]).
    ///
    /// # Errors
    /// If it does not answer `PING` within 10 s.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let port = self.port;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let child = spawn(self.dir.path(), port, &extra)?;
        eventually(
            Duration::from_secs(10),
            "redis PING after restart",
            || async move { ping(port).await.then_some(()) },
        )
        .await?;
        self.child = Some(child);
        Ok(())
    }
}

fn spawn(dir: &Path, port: u16, extra: &[&str]) -> Result<Child> {
    let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
    // Protected mode accepts 127.0.0.1 only; tests also connect from other
    // loopback addresses (to cut them off). Every server binds loopback.
    args.extend(
        [
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from),
    );
    args.extend(["--dir".into(), dir.display().to_string()]);
    args.extend([
        "--logfile".into(),
        dir.join("redis.log").display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_program("redis-server", &args)
}

/// Whether a Redis server answers `PING` on 127.0.0.1:`port`.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `redis-server` or `redis-sentinel`, killed on drop and with its parent.
fn spawn_program(program: &str, args: &[String]) -> Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    crate::process::die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} not found on PATH: install it with `apt-get install -y redis-server redis-sentinel` (scripts/test does)").into()
        } else {
            format!("spawn {program}: {e}").into()
        }
    })
}

async fn query(port: u16, cmd: &redis::Cmd) -> Result<redis::Value> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    Ok(cmd.query_async(&mut c).await?)
}

async fn info(port: u16, section: &str) -> Option<String> {
    let v = query(port, redis::cmd("INFO").arg(section)).await.ok()?;
    redis::from_redis_value(v).ok()
}

/// A master, one replica and three sentinels watching them, on free ports.
///
/// `down-after-milliseconds` is 1000 so a killed master fails over in a few
/// seconds.
pub struct RedisSentinels {
    /// The master at start.
    pub master: RedisServer,
    /// The replica at start.
    pub replica: RedisServer,
    sentinels: Vec<(Child, u16)>,
    name: String,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisSentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinels")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl RedisSentinels {
    /// Starts the set and waits until the sentinels know the replica and each other.
    ///
    /// # Errors
    /// If a process does not start or the set does not form within 30 s.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with_replica(name, &[]).await
    }

    /// As [`RedisSentinels::start`], the replica started with `extra`
    /// configuration arguments too: `["--bind", "127.0.0.1", IP,
    /// "--bind-source-addr", IP]` puts its replication link and the
    /// sentinels' view of it on a loopback address of its own, which
    /// [`crate::Isolation`] can cut (a replica that lags behind a network
    /// fault, with nothing buffered by the kernel).
    ///
    /// # Errors
    /// As [`RedisSentinels::start`].
    pub async fn start_with_replica(name: &str, extra: &[&str]) -> Result<Self> {
        let master = RedisServer::start().await?;
        let mport = master.port().to_string();
        let mut args = vec!["--replicaof", "127.0.0.1", &mport];
        args.extend_from_slice(extra);
        let replica = RedisServer::start_with(&args).await?;
        let rport = replica.port();
        eventually(
            Duration::from_secs(30),
            "the replica to sync",
            || async move {
                info(rport, "replication")
                    .await
                    .filter(|i| i.contains("master_link_status:up"))
                    .map(|_| ())
            },
        )
        .await?;
        let dir = tempfile::Builder::new()
            .prefix("tether-sentinel-")
            .tempdir()?;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let mut started = None;
            for _ in 0..5 {
                let port = free_port()?;
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {d}\nlogfile {d}/sentinel-{i}.log\n\
                         sentinel monitor {name} 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 3000\n\
                         sentinel parallel-syncs {name} 1\n",
                        d = dir.path().display()
                    ),
                )?;
                let mut child = spawn_program("redis-sentinel", &[conf.display().to_string()])?;
                let up = eventually(Duration::from_secs(5), "sentinel PING", || async move {
                    ping(port).await.then_some(())
                })
                .await;
                if up.is_ok() {
                    started = Some((child, port));
                    break;
                }
                let _ = child.start_kill();
            }
            sentinels.push(started.ok_or("redis-sentinel did not start")?);
        }
        let set = Self {
            master,
            replica,
            sentinels,
            name: name.to_string(),
            _dir: dir,
        };
        for (_, port) in &set.sentinels {
            let port = *port;
            let name = set.name.clone();
            eventually(
                Duration::from_secs(30),
                "sentinels to discover each other and the replica",
                || {
                    let name = name.clone();
                    async move {
                        let peers = query(port, redis::cmd("SENTINEL").arg("SENTINELS").arg(&name))
                            .await
                            .ok()?;
                        let replicas =
                            query(port, redis::cmd("SENTINEL").arg("REPLICAS").arg(&name))
                                .await
                                .ok()?;
                        let count = |v: &redis::Value| match v {
                            redis::Value::Array(a) => a.len(),
                            _ => 0,
                        };
                        (count(&peers) == 2 && count(&replicas) == 1).then_some(())
                    }
                },
            )
            .await?;
        }
        Ok(set)
    }

    /// `redis+sentinel://…/NAME` for the store.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.name)
    }

    /// The master's port according to the first sentinel that answers.
    pub async fn master_port(&self) -> Option<u16> {
        for (_, port) in &self.sentinels {
            let v = query(
                *port,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.name),
            )
            .await;
            if let Ok(v) = v {
                if let Ok((_, p)) = redis::from_redis_value::<(String, u16)>(v) {
                    return Some(p);
                }
            }
        }
        None
    }
}

/// Picks a port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port pair for a cluster node".into())
}

/// A Redis Cluster of `masters` masters with one replica each, made with
/// `redis-cli --cluster create`; `cluster-node-timeout` is 2000 ms.
pub struct RedisCluster {
    /// The nodes, masters first as `redis-cli` assigned them.
    pub nodes: Vec<RedisServer>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("url", &self.url())
            .finish()
    }
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until it is `ok`.
    ///
    /// # Errors
    /// If a node does not start or the cluster does not form within 60 s.
    pub async fn start(masters: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ];
            nodes.push(RedisServer::start_on(&args, cluster_port).await?);
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend([
            "--cluster-replicas".into(),
            "1".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            )
            .into());
        }
        let cluster = Self { nodes };
        cluster.wait_ok().await?;
        // Replicas still syncing would make the first WAITs time out.
        for n in &cluster.nodes {
            let port = n.port();
            eventually(
                Duration::from_secs(30),
                "replication links up",
                || async move {
                    let text = info(port, "replication").await?;
                    let linked = text.contains("connected_slaves:1")
                        || text.contains("master_link_status:up");
                    linked.then_some(())
                },
            )
            .await?;
        }
        Ok(cluster)
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees
    /// that every slot is served.
    ///
    /// # Errors
    /// After 60 s.
    pub async fn wait_ok(&self) -> Result<()> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::port)
            .collect();
        eventually(
            Duration::from_secs(60),
            "cluster_state:ok on every node",
            || {
                let ports = ports.clone();
                async move {
                    for p in ports {
                        let v = query(p, &redis::cmd("CLUSTER").arg("INFO").clone())
                            .await
                            .ok()?;
                        let text: String = redis::from_redis_value(v).ok()?;
                        if !(text.contains("cluster_state:ok")
                            && text.contains("cluster_slots_ok:16384"))
                        {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await
    }

    /// `redis+cluster://…` naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Indices of the nodes that are masters now.
    pub async fn masters(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_running() {
                continue;
            }
            if let Some(text) = info(n.port(), "replication").await {
                if text.contains("role:master") {
                    out.push(i);
                }
            }
        }
        out
    }
}
