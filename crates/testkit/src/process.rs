use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::Result;

/// The marker a server prints on stdout once it accepts connections,
/// followed by `SCHEME://ADDR`.
const LISTENING: &str = "listening on ";

/// A server running as a child process.
///
/// Dropping it kills the process (SIGKILL). On Linux the kernel also kills it
/// if the process that started it dies, so a crashed test leaves no orphans.
pub struct Process {
    child: Child,
    addrs: Vec<SocketAddr>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.child.id())
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Makes the child die with the process that started it (Linux), so a
/// test that crashes leaves no orphans.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Arguments of `tether node` for node `id` on a free loopback port with `store`.
pub fn node_args(id: &str, store: &str) -> Vec<String> {
    [
        "node",
        "--id",
        id,
        "--listen",
        "127.0.0.1:0",
        "--store",
        store,
        "--cookie-secure",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Arguments of `tether lb` on free loopback ports (client and admin) with
/// `policy` over `backends` (`ID`, address), health checks every 200 ms.
pub fn lb_args(policy: &str, backends: &[(&str, SocketAddr)]) -> Vec<String> {
    let mut args: Vec<String> = [
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--policy",
        policy,
        "--health-interval-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (id, addr) in backends {
        args.push("--backend".into());
        args.push(format!("{id}={addr}"));
    }
    args
}

/// A `tether lb --config` file: free loopback ports (client and admin),
/// `policy` over `backends` (`ID`, address), health checks every 200 ms. A
/// reload (`POST /reload` on the admin address) reads it again.
pub fn lb_config(policy: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\npolicy = \"{policy}\"\n[health]\ninterval_ms = 200\n"
    );
    for (id, addr) in backends {
        text.push_str(&format!("[[backend]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
    }
    text
}

impl Process {
    /// Starts `bin args…` and waits (up to 30 s) for its `listening on` line.
    ///
    /// # Errors
    /// If it cannot start, exits, or does not announce an address in time;
    /// the error includes its log.
    pub async fn spawn(bin: &Path, args: &[String]) -> Result<Self> {
        Self::spawn_n(bin, args, 1).await
    }

    /// As [`Process::spawn`], waiting for `n` announced addresses (a load
    /// balancer announces its client and its admin listener).
    ///
    /// # Errors
    /// As [`Process::spawn`].
    pub async fn spawn_n(bin: &Path, args: &[String], n: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tether-proc-").tempdir()?;
        let log = dir.path().join("stderr.log");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Keep draining stdout for the child's whole life so it never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split(LISTENING).nth(1) {
                    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
                    let addr = rest.split(['/', ' ']).next().unwrap_or_default();
                    if let Ok(addr) = addr.parse::<SocketAddr>() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let announced = tokio::time::timeout(Duration::from_secs(30), async {
            let mut addrs = Vec::new();
            while addrs.len() < n {
                addrs.push(rx.recv().await?);
            }
            Some(addrs)
        })
        .await;
        let addrs = match announced {
            Ok(Some(addrs)) => addrs,
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "{} {:?} did not announce its address; log:\n{text}",
                    bin.display(),
                    args
                )
                .into());
            }
        };
        Ok(Self {
            child,
            addrs,
            log,
            _dir: dir,
        })
    }

    /// The (first) address it announced.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every address it announced, in order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `http://addr` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    /// Its process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub async fn kill(&mut self) {
        self.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends SIGKILL without waiting: to kill several processes at the same
    /// instant, signal them all, then [`Process::kill`] each to reap it.
    pub fn start_kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// Sends signal `sig` (a `libc::SIG*` number), e.g. SIGHUP to reload.
    pub fn signal(&self, sig: i32) {
        signal_child(&self.child, sig);
    }

    /// Sends SIGTERM and waits up to `within` for it to exit; kills it after that.
    ///
    /// # Errors
    /// If it had to be killed.
    pub async fn terminate(&mut self, within: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.kill().await;
                Err("did not exit after SIGTERM".into())
            }
        }
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// An axum router served in this process on a free loopback port.
///
/// Dropping it stops the server.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Serves `router` on `127.0.0.1:0`.
    ///
    /// # Errors
    /// If binding fails.
    pub async fn serve(router: axum::Router) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The processes whose environment holds `key=value`, with their command
/// lines: whatever a test started with that variable set, however far its
/// descendants moved away (a new session, a new parent). This process is
/// left out.
pub fn processes_with_env(key: &str, value: &str) -> Vec<(u32, String)> {
    env_values(key)
        .into_iter()
        .filter(|(_, v)| v == value)
        .map(|(pid, _)| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

/// Every process with `key` in its environment, and the value it has
/// there. This process is left out.
pub fn env_values(key: &str) -> Vec<(u32, String)> {
    let prefix = format!("{key}=");
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Gone meanwhile, or not ours to read: not ours to care about.
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if let Some(value) = env
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        {
            found.push((pid, String::from_utf8_lossy(value).into_owned()));
        }
    }
    found
}

/// Sends `sig` to `child` unless it has been reaped.
pub(crate) fn signal_child(child: &tokio::process::Child, sig: i32) {
    if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
