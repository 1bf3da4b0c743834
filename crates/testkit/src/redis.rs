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
        let dir = tempfile::Builder::new().prefix("tether-redis-").tempdir()?;
        let mut last = String::new();
        // Another process may grab the port between probing and binding; try a few.
        for _ in 0..5 {
            let port = free_port()?;
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
        let child = spawn(self.dir.path(), port, &[])?;
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
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches only this child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "redis-server not found on PATH: install it with `apt-get install -y redis-server` (scripts/test does)".into()
        } else {
            format!("spawn redis-server: {e}").into()
        }
    })
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
