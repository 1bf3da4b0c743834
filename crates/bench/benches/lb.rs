//! `tether lb` against nginx and HAProxy, in the same run.
//!
//! Every balancer gets one worker (`--threads 1`, `worker_processes 1`,
//! `nbthread 1`); rounds alternate between them. Shapes (`--shape`, default
//! all of them):
//!
//! - `cookie`: two `tether node` backends; nginx `ip_hash`, HAProxy `cookie
//!   insert`, `tether lb --policy cookie`; `wrk` as one client pinned to one
//!   backend (the steady state of a sticky session), `GET /health`.
//! - `ip-hash`: two nginx origins (a static `200`); nginx `ip_hash`, HAProxy
//!   `balance source`, `tether lb --policy ip-hash`; `wrk`.
//! - `tls`: the same origins and policies behind TLS with one certificate
//!   (made for the run): HTTP/1.1 kept alive and with a new connection (and
//!   handshake) per request (`wrk`), HTTP/2 kept alive and one request per
//!   connection (`h2load`).
//! - `websockets`: `--tunnels` idle WebSockets (default 10 000, fewer when
//!   the open-file limit cannot hold them) held open through each balancer
//!   to an in-process backend; the balancer's resident memory per tunnel.
//! - `uploads`: 100 clients that send half of a 1 MB upload and stall; the
//!   memory each balancer holds for them.
//!
//! Run it with `scripts/bench-lb`, which builds the release binary and
//! installs the peers and load generators.
//!
//! ```text
//! cargo bench -p tether-bench --bench lb -- [--shape cookie|ip-hash|tls|websockets|uploads] [--seconds 5] [--rounds 3] [--connections 32] [--tunnels 10000]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_bench::{arg, h2load, median, rss_kib, wrk};
use tether_testkit::{eventually, free_port, lb_args, node_args, Client, Process, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

fn tether_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TETHER_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/tether")
}

/// Starts `program args`, killed on drop, and waits until `port` accepts.
async fn start_peer(program: &str, args: &[String], port: u16) -> Child {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}); scripts/bench-lb installs it"));
    eventually(Duration::from_secs(10), program, || async move {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await
    .unwrap();
    child
}

/// The `http {}` preamble of a 1-worker nginx writing only into `dir`.
fn nginx_preamble(dir: &Path, name: &str, connections: u32) -> String {
    let d = dir.display();
    format!(
        // One process that is its own worker: killing it (the bench drops
        // it with SIGKILL) leaves no orphaned worker behind.
        "master_process off;\nworker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log warn;\n\
         worker_rlimit_nofile {};\nevents {{ worker_connections {connections}; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/{name}-body;\n  proxy_temp_path {d}/{name}-proxy;\n\
           fastcgi_temp_path {d}/{name}-fcgi;\n  uwsgi_temp_path {d}/{name}-uwsgi;\n  scgi_temp_path {d}/{name}-scgi;\n",
        fd_limit()
    )
}

/// Two origin servers in one nginx: a static `200 ok` on each port.
fn origins_conf(dir: &Path, ports: [u16; 2]) -> String {
    let mut c = nginx_preamble(dir, "origins", 4096);
    for p in ports {
        c.push_str(&format!(
            "  server {{ listen 127.0.0.1:{p}; keepalive_requests 100000; location / {{ return 200 \"ok\\n\"; }} }}\n"
        ));
    }
    c.push_str("}\n");
    c
}

/// The TLS part of a listener, when there is one.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
}

/// nginx balancing `backends` with `ip_hash` (and TLS + HTTP/2 with `cert`).
fn nginx_conf(dir: &Path, port: u16, backends: &[SocketAddr], cert: Option<&Cert>) -> String {
    // nginx counts client and upstream connections alike: a tunnel is two.
    let connections = u32::try_from(fd_limit().saturating_sub(100))
        .unwrap_or(30_000)
        .min(60_000);
    let mut c = nginx_preamble(dir, "nginx", connections);
    let servers: String = backends.iter().map(|b| format!("server {b}; ")).collect();
    let listen = match cert {
        Some(t) => format!(
            // nginx 1.22 offers only up to TLS 1.2 by default, whose
            // resumed handshakes skip the key exchange TLS 1.3 always does:
            // the same protocols as the others, or the figures compare
            // protocols, not balancers.
            "listen 127.0.0.1:{port} ssl http2; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; keepalive_requests 100000;",
            t.cert.display(),
            t.key.display()
        ),
        None => format!("listen 127.0.0.1:{port}; keepalive_requests 100000;"),
    };
    c.push_str(&format!(
        "  upstream backend {{ ip_hash; {servers}keepalive 512; }}\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
           server {{ {listen} location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
             proxy_set_header Connection $connection_upgrade; proxy_read_timeout 1h; \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}\n}}\n"
    ));
    c
}

/// HAProxy with `balance` (and `cookie insert` when `cookie`), TLS with `cert`.
fn haproxy_cfg(
    dir: &Path,
    port: u16,
    backends: &[SocketAddr],
    balance: &str,
    cookie: bool,
    cert: Option<&Cert>,
) -> String {
    let bind = match cert {
        Some(t) => {
            // HAProxy takes the chain and key in one file.
            let both = dir.join("haproxy.pem");
            let mut pem = std::fs::read(&t.cert).unwrap();
            pem.extend(std::fs::read(&t.key).unwrap());
            std::fs::write(&both, pem).unwrap();
            format!(
                "bind 127.0.0.1:{port} ssl crt {} alpn h2,http/1.1",
                both.display()
            )
        }
        None => format!("bind 127.0.0.1:{port}"),
    };
    // Two descriptors per connection must fit the open-file limit.
    let maxconn = (fd_limit() / 2).saturating_sub(100).min(30_000);
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn {maxconn}\n  tune.ssl.default-dh-param 2048\ndefaults\n  mode http\n  \
         timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  timeout tunnel 1h\n  \
         option http-keep-alive\n  option forwardfor\n\
         frontend fe\n  {bind}\n  default_backend be\n\
         backend be\n  balance {balance}\n  http-reuse always\n"
    );
    if cookie {
        c.push_str("  cookie SRV insert indirect nocache\n");
    }
    for (i, b) in backends.iter().enumerate() {
        let name = ["A", "B", "C"][i];
        let ck = if cookie {
            format!(" cookie {name}")
        } else {
            String::new()
        };
        c.push_str(&format!("  server {name} {b}{ck}\n"));
    }
    c
}

/// One row of a results table: a name, the figures of each round.
struct Row {
    name: String,
    rps: Vec<f64>,
    latency_ms: Vec<f64>,
    /// The balancer's CPU time (user + system) per request, µs.
    cpu_us: Vec<f64>,
}

impl Row {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            rps: Vec::new(),
            latency_ms: Vec::new(),
            cpu_us: Vec::new(),
        }
    }
}

/// A balancer under test: its name, URL, extra request headers, process.
struct Target {
    name: String,
    url: String,
    headers: Vec<String>,
    pid: u32,
}

/// CPU time used so far by process `pid` (user + system), in µs.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) / hz * 1e6)
}

fn print_table(title: &str, latency: &str, rows: &[Row], note: &str) {
    let base = median(rows[0].rps.clone());
    let base_cpu = median(rows[0].cpu_us.clone());
    println!("\n### {title}\n");
    println!(
        "| balancer | req/s (median) | {latency} ms | CPU µs/req | req/s vs {0} | CPU/req vs {0} |",
        rows[0].name
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let rps = median(r.rps.clone());
        let cpu = median(r.cpu_us.clone());
        println!(
            "| {} | {rps:.0} | {:.3} | {cpu:.1} | {:.2} | {:.2} |",
            r.name,
            median(r.latency_ms.clone()),
            rps / base,
            cpu / base_cpu
        );
    }
    println!("\n{note}");
}

/// Settings shared by the throughput shapes.
#[derive(Clone, Copy)]
struct Load {
    seconds: u32,
    rounds: u32,
    connections: u32,
}

/// `wrk` against each target in turn, `rounds` times.
async fn wrk_rounds(load: Load, targets: &[Target]) -> Vec<Row> {
    let mut rows: Vec<Row> = targets.iter().map(|t| Row::new(&t.name)).collect();
    for round in 1..=load.rounds {
        for (row, t) in rows.iter_mut().zip(targets) {
            let cpu_before = cpu_us(t.pid);
            let r = wrk(&t.url, &t.headers, load.connections, load.seconds)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let cpu = (cpu_us(t.pid) - cpu_before) / (r.rps * f64::from(load.seconds));
            eprintln!(
                "round {round} {:<28} {:>9.0} req/s  p50 {:>8.1?}  p99 {:>8.1?}  {cpu:>5.1} µs CPU/req  errors {}",
                t.name, r.rps, r.p50, r.p99, r.errors
            );
            assert_eq!(r.errors, 0, "{} answered errors", t.name);
            row.rps.push(r.rps);
            row.latency_ms.push(r.p99.as_secs_f64() * 1e3);
            row.cpu_us.push(cpu);
        }
    }
    rows
}

fn target(name: &str, url: String, headers: Vec<String>, pid: Option<u32>) -> Target {
    Target {
        name: name.to_string(),
        url,
        headers,
        pid: pid.expect("a running balancer"),
    }
}

/// `tether lb` with `policy` over `backends`, one worker thread.
async fn tether_lb(policy: &str, backends: &[SocketAddr], extra: &[&str]) -> Process {
    let named: Vec<(&str, SocketAddr)> = ["A", "B", "C"]
        .into_iter()
        .zip(backends.iter().copied())
        .collect();
    let mut args = lb_args(policy, &named);
    args.extend(["--threads", "1", "--log-level", "warn"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn_n(&tether_bin(), &args, 2)
        .await
        .expect("tether lb")
}

/// Two nginx origins on free ports.
async fn origins(dir: &Path) -> (Child, Vec<SocketAddr>) {
    let ports = [free_port().unwrap(), free_port().unwrap()];
    let conf = dir.join("origins.conf");
    std::fs::write(&conf, origins_conf(dir, ports)).unwrap();
    let child = start_peer(
        "nginx",
        &["-c".into(), conf.display().to_string()],
        ports[1],
    )
    .await;
    let addrs = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    (child, addrs)
}

async fn nginx(dir: &Path, backends: &[SocketAddr], cert: Option<&Cert>) -> (Child, u16) {
    let port = free_port().unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, port, backends, cert)).unwrap();
    (
        start_peer("nginx", &["-c".into(), conf.display().to_string()], port).await,
        port,
    )
}

async fn haproxy(
    dir: &Path,
    backends: &[SocketAddr],
    balance: &str,
    cookie: bool,
    cert: Option<&Cert>,
) -> (Child, u16) {
    let port = free_port().unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        haproxy_cfg(dir, port, backends, balance, cookie, cert),
    )
    .unwrap();
    (
        start_peer("haproxy", &["-f".into(), cfg.display().to_string()], port).await,
        port,
    )
}

async fn shape_cookie(load: Load, dir: &Path) {
    let bin = tether_bin();
    let a = Process::spawn(&bin, &node_args("A", "memory"))
        .await
        .expect("node A");
    let b = Process::spawn(&bin, &node_args("B", "memory"))
        .await
        .expect("node B");
    let nodes = [a.addr(), b.addr()];
    let (nginx_child, nginx_port) = nginx(dir, &nodes, None).await;
    let (haproxy_child, haproxy_port) = haproxy(dir, &nodes, "roundrobin", true, None).await;
    let tether = tether_lb("cookie", &nodes, &[]).await;
    // Pin one client per balancer to a backend, as a logged-in user is.
    let pin = Client::new();
    pin.get(&tether.url("/health")).await.unwrap();
    let route = pin.cookie("TETHER_ROUTE").expect("route cookie");
    let targets = vec![
        target(
            "nginx (ip_hash)",
            format!("http://127.0.0.1:{nginx_port}/health"),
            vec![],
            nginx_child.id(),
        ),
        target(
            "haproxy (cookie insert)",
            format!("http://127.0.0.1:{haproxy_port}/health"),
            vec!["Cookie: SRV=A".into()],
            haproxy_child.id(),
        ),
        target(
            "tether lb (cookie)",
            tether.url("/health"),
            vec![format!("Cookie: TETHER_ROUTE={route}")],
            tether.pid(),
        ),
    ];
    let rows = wrk_rounds(load, &targets).await;
    print_table(
        "HTTP/1.1, cookie shape: in front of two tether nodes",
        "p99",
        &rows,
        &format!("{} s per round, {} rounds alternating, wrk -t1 -c{}, GET /health of a tether node, one client pinned to one backend", load.seconds, load.rounds, load.connections),
    );
}

async fn shape_ip_hash(load: Load, dir: &Path) {
    let (_origins, backends) = origins(dir).await;
    let (nginx_child, nginx_port) = nginx(dir, &backends, None).await;
    let (haproxy_child, haproxy_port) = haproxy(dir, &backends, "source", false, None).await;
    let tether = tether_lb("ip-hash", &backends, &["--health-path", ""]).await;
    let targets = vec![
        target(
            "nginx (ip_hash)",
            format!("http://127.0.0.1:{nginx_port}/"),
            vec![],
            nginx_child.id(),
        ),
        target(
            "haproxy (balance source)",
            format!("http://127.0.0.1:{haproxy_port}/"),
            vec![],
            haproxy_child.id(),
        ),
        target("tether lb (ip-hash)", tether.url("/"), vec![], tether.pid()),
    ];
    let rows = wrk_rounds(load, &targets).await;
    print_table(
        "HTTP/1.1, ip-hash shape: in front of two nginx origins",
        "p99",
        &rows,
        &format!("{} s per round, {} rounds alternating, wrk -t1 -c{}, GET / (a static 200 from an nginx origin)", load.seconds, load.rounds, load.connections),
    );
}

async fn shape_tls(load: Load, dir: &Path) {
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca.issue(dir, "bench", &["localhost"]).unwrap();
    let tls = Cert { cert, key };
    let (_origins, backends) = origins(dir).await;
    let (nginx_child, nginx_port) = nginx(dir, &backends, Some(&tls)).await;
    let (haproxy_child, haproxy_port) = haproxy(dir, &backends, "source", false, Some(&tls)).await;
    let cert_args = [
        "--tls-cert",
        tls.cert.to_str().unwrap(),
        "--tls-key",
        tls.key.to_str().unwrap(),
        "--health-path",
        "",
    ];
    let tether = tether_lb("ip-hash", &backends, &cert_args).await;
    let urls = [
        (
            "nginx (ip_hash)",
            format!("https://127.0.0.1:{nginx_port}/"),
            nginx_child.id(),
        ),
        (
            "haproxy (balance source)",
            format!("https://127.0.0.1:{haproxy_port}/"),
            haproxy_child.id(),
        ),
        (
            "tether lb (ip-hash)",
            format!("https://{}/", tether.addr()),
            tether.pid(),
        ),
    ];
    let targets = |headers: Vec<String>| -> Vec<Target> {
        urls.iter()
            .map(|(n, u, pid)| target(n, u.clone(), headers.clone(), *pid))
            .collect()
    };
    let rows = wrk_rounds(load, &targets(vec![])).await;
    print_table(
        "TLS + HTTP/1.1, kept alive",
        "p99",
        &rows,
        &format!(
            "wrk -t1 -c{} over TLS 1.3, one certificate (ECDSA P-256) for all",
            load.connections
        ),
    );
    let rows = wrk_rounds(load, &targets(vec!["Connection: close".into()])).await;
    print_table(
        "TLS + HTTP/1.1, a new connection (and handshake) per request",
        "p99",
        &rows,
        &format!(
            "wrk -t1 -c{} -H 'Connection: close' over TLS",
            load.connections
        ),
    );
    let h2_runs = [
        (
            "TLS + HTTP/2, kept alive",
            vec![
                "-c".into(),
                load.connections.to_string(),
                "-m".into(),
                "10".into(),
                "-D".into(),
                load.seconds.to_string(),
            ],
            format!("h2load -c{} -m10 -D{}", load.connections, load.seconds),
        ),
        (
            "TLS + HTTP/2, one request per connection",
            vec![
                "-c".into(),
                "500".into(),
                "-n".into(),
                "500".into(),
                "-m".into(),
                "1".into(),
            ],
            "h2load -c500 -n500 -m1 (500 connections at once, one request each), 3 runs per round"
                .into(),
        ),
    ];
    for (title, args, note) in h2_runs {
        let mut rows: Vec<Row> = urls.iter().map(|(n, _, _)| Row::new(n)).collect();
        let repeat = if args.contains(&"-D".to_string()) {
            1
        } else {
            3
        };
        for round in 1..=load.rounds {
            for (row, (name, url, pid)) in rows.iter_mut().zip(&urls) {
                let pid = pid.expect("a running balancer");
                for _ in 0..repeat {
                    let cpu_before = cpu_us(pid);
                    let r = h2load(url, &args).await.unwrap_or_else(|e| panic!("{e}"));
                    let cpu = (cpu_us(pid) - cpu_before) / r.done.max(1) as f64;
                    eprintln!(
                        "round {round} {title} {name:<28} {:>9.0} req/s  mean {:>8.1?}  {cpu:>5.1} µs CPU/req  errors {}",
                        r.rps, r.mean, r.errors
                    );
                    assert_eq!(r.errors, 0, "{name} answered errors");
                    row.rps.push(r.rps);
                    row.latency_ms.push(r.mean.as_secs_f64() * 1e3);
                    row.cpu_us.push(cpu);
                }
            }
        }
        print_table(title, "mean", &rows, &note);
    }
}

/// A WebSocket backend that answers every upgrade with 101 and holds it.
async fn ws_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let reply: &[u8] = if text.contains("upgrade: websocket") {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bench\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                };
                if s.write_all(reply).await.is_err() {
                    return;
                }
                // Hold the tunnel until the balancer closes it.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Opens `n` WebSocket tunnels through `addr`, 200 at a time.
async fn open_tunnels(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(n);
    let request = b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    while open.len() < n {
        let batch = (n - open.len()).min(200);
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..batch {
            // Spread client addresses over 127.0.0.0/8 so no source runs out of ports.
            let from = SocketAddr::from(([127, 0, (k % 200) as u8 + 1, 1], 0));
            tasks.spawn(async move {
                let e = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
                let socket = tokio::net::TcpSocket::new_v4().map_err(e("socket"))?;
                socket.bind(from).map_err(e("bind"))?;
                let mut s = socket.connect(addr).await.map_err(e("connect"))?;
                s.write_all(request).await.map_err(e("write"))?;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.map_err(e("read"))?;
                    if n == 0 {
                        return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)));
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                if head.starts_with(b"HTTP/1.1 101") {
                    Ok(s)
                } else {
                    Err(String::from_utf8_lossy(&head).into_owned())
                }
            });
        }
        while let Some(t) = tasks.join_next().await {
            match t.unwrap() {
                Ok(s) => open.push(s),
                Err(e) => panic!(
                    "a tunnel failed to open through {addr} after {} were open: {e}",
                    open.len()
                ),
            }
        }
    }
    open
}

/// The resident memory of `pid` and its children (nginx's worker), KiB.
fn tree_rss(pid: u32) -> u64 {
    let mut total = rss_kib(pid).unwrap_or(0);
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            total += rss_kib(c).unwrap_or(0);
        }
    }
    total
}

/// The open-file limit now.
fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on our own process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The three balancers, round robin over one [`ws_backend`], for the memory
/// shapes: what keeps them running, and (name, process, address) of each.
async fn memory_peers(dir: &Path) -> (impl Sized, [(&'static str, u32, SocketAddr); 3]) {
    let backends = [ws_backend().await];
    let (nginx_child, nginx_port) = nginx(dir, &backends, None).await;
    let (haproxy_child, haproxy_port) = haproxy(dir, &backends, "roundrobin", false, None).await;
    let tether = tether_lb("round-robin", &backends, &["--health-path", ""]).await;
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let peers = [
        ("nginx", nginx_child.id().unwrap(), at(nginx_port)),
        ("haproxy", haproxy_child.id().unwrap(), at(haproxy_port)),
        ("tether lb", tether.pid().unwrap(), tether.addr()),
    ];
    ((nginx_child, haproxy_child, tether), peers)
}

/// The resident memory of `pid`'s tree once it stops changing (up to 5 s).
async fn settled_rss(pid: u32) -> u64 {
    let mut last = tree_rss(pid);
    let _ = eventually(Duration::from_secs(5), "RSS settles", || {
        let now = tree_rss(pid);
        let settled = now == last;
        last = now;
        async move { settled.then_some(()) }
    })
    .await;
    last
}

/// Raises the open-file limit as far as allowed (a tunnel costs the bench
/// two descriptors, and the balancer two).
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn shape_websockets(dir: &Path, tunnels: usize, limit: u64) {
    // The bench holds both ends of each tunnel and the balancer two sockets
    // per tunnel: both must fit the open-file limit (20 000 on a machine
    // without CAP_SYS_RESOURCE).
    let tunnels = tunnels.min(
        usize::try_from(limit / 2)
            .unwrap_or(usize::MAX)
            .saturating_sub(300),
    );
    let (_running, peers) = memory_peers(dir).await;
    println!("\n### {tunnels} idle WebSockets: resident memory per tunnel\n");
    println!(
        "| balancer | RSS before, MiB | RSS with tunnels, MiB | KiB per tunnel | vs haproxy |"
    );
    println!("|---|---|---|---|---|");
    let mut per: Vec<(String, u64, u64, f64)> = Vec::new();
    for (name, pid, addr) in peers {
        // Warm up: one tunnel, so lazily made state is in "before".
        drop(open_tunnels(addr, 1).await);
        let before = tree_rss(pid);
        let open = open_tunnels(addr, tunnels).await;
        let after = settled_rss(pid).await;
        let kib = (after.saturating_sub(before)) as f64 / tunnels as f64;
        eprintln!(
            "{name}: {before} KiB -> {after} KiB with {} tunnels: {kib:.1} KiB each",
            open.len()
        );
        per.push((name.to_string(), before, after, kib));
        drop(open);
    }
    let haproxy = per[1].3;
    for (name, before, after, kib) in &per {
        println!(
            "| {name} | {:.1} | {:.1} | {kib:.1} | {:.2} |",
            *before as f64 / 1024.0,
            *after as f64 / 1024.0,
            kib / haproxy
        );
    }
    println!("\nEach tunnel: client → balancer → in-process backend over loopback, opened 200 at a time, then idle; RSS from /proc");
}

/// Opens `n` uploads through `addr` that send the head and half of a 1 MB
/// body, then stall (a slow or malicious client).
async fn stalled_uploads(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let head = b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n";
    let half = vec![b'x'; 512 * 1024];
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(head).await.expect("head");
        // What the kernel takes without the balancer reading: never block.
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&half)).await;
        open.push(s);
    }
    open
}

async fn shape_uploads(dir: &Path) {
    let clients = 100;
    let (_running, peers) = memory_peers(dir).await;
    println!("\n### {clients} stalled 1 MB uploads (half sent): resident memory\n");
    println!("| balancer | RSS before, MiB | RSS with the uploads, MiB | added, MiB |");
    println!("|---|---|---|---|");
    for (name, pid, addr) in peers {
        let before = tree_rss(pid);
        let open = stalled_uploads(addr, clients).await;
        let after = settled_rss(pid).await;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / 1024.0
        );
        drop(open);
    }
    println!("\nEach client sends the head and 512 KiB of a 1 MiB body, then nothing; nginx buffers bodies to disk beyond client_body_buffer_size, HAProxy and tether stream them to the backend");
}

fn main() {
    let shape: String = arg("--shape", "all".to_string());
    let load = Load {
        seconds: arg("--seconds", 5),
        rounds: arg("--rounds", 3),
        connections: arg("--connections", 32),
    };
    let tunnels = arg("--tunnels", 10_000usize);
    // The peers inherit it: HAProxy's `maxconn 30000` needs 60 000 descriptors.
    let limit = raise_fd_limit(100_000);
    assert!(
        tether_bin().exists(),
        "{} missing: run scripts/bench-lb (it builds the release binary)",
        tether_bin().display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = shape == "all";
        if all || shape == "cookie" {
            shape_cookie(load, dir.path()).await;
        }
        if all || shape == "ip-hash" {
            shape_ip_hash(load, dir.path()).await;
        }
        if all || shape == "tls" {
            shape_tls(load, dir.path()).await;
        }
        if all || shape == "websockets" {
            shape_websockets(dir.path(), tunnels, limit).await;
        }
        if all || shape == "uploads" {
            shape_uploads(dir.path()).await;
        }
    });
}
