//! The `tether` command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand};
use tether_cli::demo::{Scenario, Tracker};
use tether_cli::node::{NodeConfig, StoreSpec};
use tether_cli::strategy::Strategy;

// glibc malloc returned and re-grew the heap with `brk` hundreds of times a
// second under proxy load; mimalloc keeps per-thread pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keep users logged in behind a load balancer: every strategy, measured.
#[derive(Parser, Debug)]
#[command(name = "tether", version, about)]
struct Cli {
    /// Log level for stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the reference app server (login, mypage, cart, logout, health).
    Node(Box<NodeArgs>),
    /// Replay the brief's scenario and print the measured comparison.
    Demo(DemoArgs),
    /// Run the load balancer (sticky sessions, health checks, failover).
    Lb(Box<LbArgs>),
    /// Print a new HS256 key file for `node --store jwt --jwt-key-file`.
    JwtKeygen(KeygenArgs),
    /// Keep a fleet running with a dashboard (kill and restart nodes, watch requests).
    Up(UpArgs),
    /// List or end a user's sessions in a live fleet (an operator's tool).
    #[command(subcommand)]
    Sessions(SessionsCommand),
}

#[derive(Subcommand, Debug)]
enum SessionsCommand {
    /// Print a user's sessions.
    List(SessionsArgs),
    /// End every session of a user ("disable the account").
    Revoke(SessionsArgs),
}

#[derive(clap::Args, Debug)]
struct SessionsArgs {
    /// The user (the session's principal; on the reference node, the member number).
    #[arg(long)]
    principal: String,
    /// The fleet's session store: redis://…, redis+sentinel://…, redis+cluster://….
    #[arg(long, conflicts_with = "node")]
    store: Option<String>,
    /// Or any node of the fleet (every strategy), through its operator
    /// endpoints: http://HOST:PORT, with --admin-token or TETHER_ADMIN_TOKEN.
    #[arg(long)]
    node: Option<String>,
    /// The node's operator token.
    #[arg(long)]
    admin_token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// local, sticky-ip, sticky-cookie, replicated-all, replicated-backup, redis,
    /// sticky-redis or jwt.
    #[arg(long, default_value = "replicated-backup")]
    strategy: Strategy,
    /// Where the app (the load balancer) listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the dashboard listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    dashboard: SocketAddr,
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// The key's ID (`kid`).
    #[arg(long, default_value = "k1")]
    kid: String,
}

#[derive(clap::Args, Debug)]
struct LbArgs {
    /// A TOML configuration file (reloaded on SIGHUP or POST /reload); other
    /// routing flags are then not allowed.
    #[arg(long, conflicts_with_all = ["listen", "backends", "policy", "tls_cert", "redirect_http", "h2c", "max_connections", "tunnel_timeout_ms", "body_timeout_ms", "drain_timeout_ms"])]
    config: Option<std::path::PathBuf>,
    /// Address for clients; port 0 picks a free port (printed on stdout).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin address for /status, /metrics, drain and reload.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// A backend as ID=HOST:PORT; repeat for each.
    #[arg(long = "backend", value_parser = tether_lb::parse_backend_flag)]
    backends: Vec<tether_lb::BackendConfig>,
    /// round-robin, least-conn, p2c, ip-hash, ip-hash-full, cookie, hash or owner.
    #[arg(long)]
    policy: Option<tether_lb::PolicyKind>,
    /// HMAC key of the route cookie; give every instance the same one.
    #[arg(long)]
    cookie_secret: Option<String>,
    /// Key of the `hash` policy: cookie:NAME, header:NAME or ip.
    #[arg(long)]
    hash_key: Option<String>,
    /// Bounded-load factor of the `hash` policy (e.g. 1.25).
    #[arg(long)]
    bounded_load: Option<f64>,
    /// A proxy address or CIDR whose X-Forwarded-For is trusted; repeatable.
    #[arg(long = "trusted-proxy")]
    trusted_proxies: Vec<String>,
    /// Path of active health checks (empty turns them off).
    #[arg(long)]
    health_path: Option<String>,
    /// Milliseconds between health checks.
    #[arg(long)]
    health_interval_ms: Option<u64>,
    /// Time a client has to send its request head (also the idle timeout), ms.
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Terminate TLS: the certificate chain (PEM, leaf first). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Also listen here for plain HTTP and redirect every request to HTTPS.
    #[arg(long, requires = "tls_cert")]
    redirect_http: Option<SocketAddr>,
    /// Accept HTTP/2 without TLS from clients that know it is spoken (h2c).
    #[arg(long)]
    h2c: bool,
    /// Client connections served at once; more wait in the accept queue.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Close a WebSocket tunnel after this long without traffic, ms.
    #[arg(long)]
    tunnel_timeout_ms: Option<u64>,
    /// Time a client has to send a whole request body, ms.
    #[arg(long)]
    body_timeout_ms: Option<u64>,
    /// On shutdown, cut requests and tunnels still open after this long, ms.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Token the admin listener requires (`Authorization: Bearer TOKEN`);
    /// also read from TETHER_ADMIN_TOKEN.
    #[arg(long)]
    admin_token: Option<String>,
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// This node's name, shown in every response (X-Tether-Node).
    #[arg(long)]
    id: String,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Where sessions live: `memory`, `redis://HOST:PORT`,
    /// `redis+sentinel://HOST:PORT[,…]/MASTER`, `redis+cluster://HOST:PORT[,…]`,
    /// `cluster` (replicated among the nodes) or `jwt` (signed tokens).
    #[arg(long, default_value = "memory")]
    store: StoreSpec,
    /// Mark the session cookie Secure; `false` only for plain-HTTP development.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    cookie_secure: bool,
    /// Inactivity timeout of sessions, in seconds.
    #[arg(long, default_value_t = 1800)]
    idle_timeout: u64,
    /// Largest session accepted, in bytes.
    #[arg(long, default_value_t = tether_core::DEFAULT_MAX_SIZE)]
    max_session_bytes: usize,
    /// Redis only: after every write, WAIT for N replicas up to MS
    /// milliseconds (N:MS); a write not replicated in time is answered 503.
    #[arg(long, value_parser = parse_wait)]
    redis_wait: Option<(u32, Duration)>,
    /// Redis only: keep recently used sessions in this node, kept coherent
    /// by Redis (RESP3 client tracking): reads of a cached session cost no
    /// round trip. Best behind a sticky balancer (`sticky-redis`).
    #[arg(long)]
    redis_near_cache: bool,
    /// Redis only: how many sessions the near cache holds (and at most
    /// 256 MiB of attributes). Implies --redis-near-cache.
    #[arg(long, value_name = "N")]
    redis_near_cache_size: Option<usize>,
    /// At most N sessions per user (the logged-in member); a login beyond
    /// follows --max-sessions-policy.
    #[arg(long, value_name = "N")]
    max_sessions_per_user: Option<usize>,
    /// What a login beyond --max-sessions-per-user does: refuse (409) or
    /// evict-oldest (ends the user's longest-standing session).
    #[arg(long, default_value = "evict-oldest")]
    max_sessions_policy: tether::LimitPolicy,
    /// Enables the operator endpoints (/admin/principals/{user}/sessions,
    /// …/revoke, used by `tether sessions --node`) for requests with
    /// `Authorization: Bearer TOKEN`. Also read from TETHER_ADMIN_TOKEN.
    #[arg(long)]
    admin_token: Option<String>,
    /// JWT only: the key file every node shares (`tether jwt-keygen` makes one).
    #[arg(long)]
    jwt_key_file: Option<std::path::PathBuf>,
    /// JWT only: keep revocations (logout) in this store: `memory` (this node
    /// only) or a Redis URL (every node). One store read per request.
    #[arg(long)]
    jwt_revocation: Option<StoreSpec>,
    /// Cluster only: TCP replication and UDP gossip address (port 0: a free one).
    #[arg(long)]
    cluster_listen: Option<SocketAddr>,
    /// Cluster only: another node as ID=HOST:PORT (its cluster address); repeat.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Cluster only: `all` (every node holds every session) or `backup` (owner + k).
    #[arg(long, default_value = "backup")]
    replication: String,
    /// Cluster only: backups per session in `backup` mode.
    #[arg(long, default_value_t = 1)]
    backups: usize,
    /// Cluster only: `sync` (answer after the backups acknowledged) or `async`.
    #[arg(long, default_value = "sync")]
    ack: String,
    /// Cluster only: the secret every node shares (or env TETHER_CLUSTER_SECRET).
    #[arg(long)]
    cluster_secret: Option<String>,
    /// Cluster only: not ready before this many nodes (itself included) were
    /// seen once (default: 2 with --peer, else 1). Set the fleet's size to
    /// keep a fresh fleet from serving before it has formed.
    #[arg(long)]
    cluster_min_nodes: Option<usize>,
    /// Cluster only: on SIGTERM, wait at most this many seconds for the
    /// sessions to be handed to the other nodes before exiting.
    #[arg(long, default_value_t = 30)]
    cluster_leave_timeout: u64,
}

fn cluster_config(
    id: &str,
    listen: &Option<SocketAddr>,
    peers: &[String],
    replication: &str,
    backups: usize,
    ack: &str,
    secret: Option<String>,
) -> anyhow::Result<tether_cluster::ClusterConfig> {
    let listen = listen.context("--store cluster needs --cluster-listen HOST:PORT")?;
    let secret = secret
        .or_else(|| std::env::var("TETHER_CLUSTER_SECRET").ok())
        .context("--store cluster needs --cluster-secret (or TETHER_CLUSTER_SECRET): nodes authenticate each other with it")?;
    anyhow::ensure!(
        secret.len() >= 8,
        "--cluster-secret must be at least 8 characters"
    );
    let mut config = tether_cluster::ClusterConfig::new(id, listen, secret.into_bytes());
    for p in peers {
        let (_, addr) = p
            .split_once('=')
            .with_context(|| format!("--peer {p:?}: expected ID=HOST:PORT"))?;
        config.seeds.push(addr.to_string());
    }
    config.replication = match replication {
        "all" => tether_cluster::Replication::All,
        "backup" => tether_cluster::Replication::Backup(backups),
        other => anyhow::bail!("--replication {other:?}: use all or backup"),
    };
    config.ack = match ack {
        "sync" => tether_cluster::Ack::Sync,
        "async" => tether_cluster::Ack::Async,
        other => anyhow::bail!("--ack {other:?}: use sync or async"),
    };
    Ok(config)
}

fn parse_wait(s: &str) -> Result<(u32, Duration), String> {
    let (n, ms) = s
        .split_once(':')
        .ok_or("expected REPLICAS:MILLISECONDS, e.g. 1:100")?;
    let n = n.parse().map_err(|_| format!("bad replica count {n:?}"))?;
    let ms = ms.parse().map_err(|_| format!("bad milliseconds {ms:?}"))?;
    Ok((n, Duration::from_millis(ms)))
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// What happens to each fleet: kill, scale-out, rolling-restart,
    /// store-outage (comma-separated), or all.
    #[arg(long, value_delimiter = ',', default_value = "kill,scale-out")]
    scenario: Vec<String>,
    /// Virtual users per run.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Requests per second, all users together.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Seconds the users shop in a run (the event comes a third of the way
    /// in; a deploy or an outage runs until it is over and a second more).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Use this Redis instead of starting a private redis-server (the
    /// store-outage scenario always starts its own Sentinel set).
    #[arg(long)]
    redis_url: Option<String>,
    /// Run only these strategies (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Strategy>,
    /// Also measure replication cost at these cluster sizes, e.g. 2,3,5,8.
    #[arg(long, value_delimiter = ',')]
    sweep_nodes: Vec<usize>,
    /// Also write one self-contained HTML page with the tables and charts.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .init();
    let threads = match &cli.command {
        Command::Lb(args) => args.threads,
        _ => None,
    };
    // One thread means one thread: a current-thread runtime, as nginx's
    // single worker, without cross-thread wake-ups.
    let mut runtime = match threads {
        Some(0) => anyhow::bail!("--threads must be positive"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Node(args) => node(*args).await,
            Command::Demo(args) => demo(args).await,
            Command::Lb(args) => lb(*args).await,
            Command::Up(args) => {
                let bin = std::env::current_exe().context("locating the tether executable")?;
                let config = tether_cli::up::UpConfig {
                    strategy: args.strategy,
                    listen: args.listen,
                    dashboard: args.dashboard,
                    redis_url: args.redis_url,
                };
                tether_cli::up::run(bin, config, shutdown_signal()?)
                    .await
                    .map_err(|e| anyhow::anyhow!("tether up: {e}"))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::JwtKeygen(args) => {
                print!("{}", tether_jwt::generate_hs256_key_file(&args.kid));
                Ok(ExitCode::SUCCESS)
            }
            Command::Sessions(command) => sessions(command).await,
        }
    })
}

async fn sessions(command: SessionsCommand) -> anyhow::Result<ExitCode> {
    use tether_cli::sessions::{render, run, Action, Target};
    let (action, args) = match command {
        SessionsCommand::List(a) => (Action::List, a),
        SessionsCommand::Revoke(a) => (Action::Revoke, a),
    };
    let target = match (args.store, args.node) {
        (Some(url), _) => Target::Store(url),
        (None, Some(url)) => Target::Node {
            url,
            token: admin_token(args.admin_token)
                .context("--node needs --admin-token (or TETHER_ADMIN_TOKEN)")?,
        },
        (None, None) => anyhow::bail!("say where the sessions are: --store URL or --node URL"),
    };
    let result = run(&target, action, &args.principal)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if args.json {
        println!("{result}");
    } else {
        print!("{}", render(&result));
    }
    Ok(ExitCode::SUCCESS)
}

/// An admin token from its flag or, kept out of `ps`, the environment.
fn admin_token(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("TETHER_ADMIN_TOKEN").ok())
}

fn lb_config(args: &LbArgs) -> anyhow::Result<tether_lb::Config> {
    if let Some(path) = &args.config {
        return tether_lb::Config::from_file(path)
            .with_context(|| format!("loading {}", path.display()));
    }
    let listen = args.listen.context("--listen (or --config) is required")?;
    let policy = args.policy.context("--policy (or --config) is required")?;
    anyhow::ensure!(
        !args.backends.is_empty(),
        "at least one --backend ID=HOST:PORT is required"
    );
    let mut config = tether_lb::Config::new(listen, policy, args.backends.clone());
    config.admin = args.admin;
    config.admin_token = admin_token(args.admin_token.clone());
    if let Some(secret) = &args.cookie_secret {
        config.cookie.secret.clone_from(secret);
    }
    if let Some(key) = &args.hash_key {
        config.hash.key.clone_from(key);
    }
    if let Some(f) = args.bounded_load {
        config.hash.bounded_load = f;
    }
    for p in &args.trusted_proxies {
        let net: Option<ipnet::IpNet> = if p.contains('/') {
            p.parse().ok()
        } else {
            p.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from)
        };
        config.trusted_proxies.push(
            net.with_context(|| format!("--trusted-proxy {p:?}: expected an address or CIDR"))?,
        );
    }
    if let Some(path) = &args.health_path {
        config.health.path.clone_from(path);
    }
    if let Some(ms) = args.health_interval_ms {
        config.health.interval_ms = ms;
        config.health.timeout_ms = config.health.timeout_ms.min(ms.max(1));
    }
    if let Some(ms) = args.header_timeout_ms {
        config.limits.header_timeout_ms = ms;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(tether_lb::TlsConfig::new(cert, key));
    }
    config.redirect_http = args.redirect_http;
    config.h2c = args.h2c;
    if let Some(n) = args.max_connections {
        config.limits.max_connections = n;
    }
    let limits = &mut config.limits;
    for (flag, field) in [
        (args.tunnel_timeout_ms, &mut limits.tunnel_timeout_ms),
        (args.body_timeout_ms, &mut limits.body_timeout_ms),
        (args.drain_timeout_ms, &mut limits.drain_timeout_ms),
    ] {
        if let Some(ms) = flag {
            *field = ms;
        }
    }
    config.resolve().context("invalid configuration")?;
    Ok(config)
}

async fn lb(args: LbArgs) -> anyhow::Result<ExitCode> {
    let mut config = lb_config(&args)?;
    if args.config.is_some() && args.admin.is_some() {
        config.admin = args.admin;
    }
    if args.config.is_some() {
        if let Some(token) = admin_token(args.admin_token.clone()) {
            config.admin_token = Some(token);
        }
    }
    let balancer = tether_lb::Balancer::bind(config.clone(), args.config.clone())
        .await
        .context("starting the load balancer")?;
    let addr = balancer.local_addr()?;
    tracing::info!(%addr, policy = ?config.policy, backends = config.backends.len(), "load balancer started");
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("tether lb listening on {scheme}://{addr}");
    if let Some(admin) = balancer.admin_addr() {
        println!("tether lb admin listening on http://{admin}");
    }
    if let Some(redirect) = balancer.redirect_addr() {
        println!("tether lb redirect listening on http://{redirect}");
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let handle = balancer.handle();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = handle.reload() {
                    tracing::error!(error = %anyhow::Error::new(e), "reload refused; keeping the running configuration");
                }
            }
        });
    }
    balancer.run(shutdown_signal()?).await?;
    tracing::info!("load balancer stopped");
    Ok(ExitCode::SUCCESS)
}

async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(!args.id.is_empty(), "--id must not be empty");
    anyhow::ensure!(args.idle_timeout > 0, "--idle-timeout must be positive");
    let redis_options =
        args.redis_wait.is_some() || args.redis_near_cache || args.redis_near_cache_size.is_some();
    anyhow::ensure!(
        !redis_options
            || matches!(args.store, StoreSpec::Redis(_))
            || matches!(args.jwt_revocation, Some(StoreSpec::Redis(_))),
        "--redis-wait and --redis-near-cache need --store redis://… (or redis+sentinel://, \
         redis+cluster://), or --jwt-revocation redis://…"
    );
    anyhow::ensure!(
        args.redis_near_cache_size != Some(0),
        "--redis-near-cache-size must be at least 1"
    );
    let config = NodeConfig {
        id: args.id,
        store: args.store,
        cookie_secure: args.cookie_secure,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_session_bytes: args.max_session_bytes,
        redis_wait: args.redis_wait,
        redis_near_cache: match (args.redis_near_cache, args.redis_near_cache_size) {
            (_, Some(n)) => Some(n),
            (true, None) => Some(100_000),
            (false, None) => None,
        },
        jwt_key_file: args.jwt_key_file,
        jwt_revocation: args.jwt_revocation,
        cluster: None,
        max_sessions: match args.max_sessions_per_user {
            Some(0) => anyhow::bail!("--max-sessions-per-user must be at least 1"),
            Some(max) => Some(tether::SessionLimit {
                max,
                policy: args.max_sessions_policy,
            }),
            None => None,
        },
        admin_token: admin_token(args.admin_token).filter(|t| !t.is_empty()),
    };
    let mut config = config;
    if config.store == StoreSpec::Cluster {
        config.cluster = Some(cluster_config(
            &config.id,
            &args.cluster_listen,
            &args.peers,
            &args.replication,
            args.backups,
            &args.ack,
            args.cluster_secret.clone(),
        )?);
        if let Some(c) = config.cluster.as_mut() {
            if let Some(n) = args.cluster_min_nodes {
                anyhow::ensure!(n >= 1, "--cluster-min-nodes must be at least 1");
                c.min_nodes = Some(n);
            }
            c.leave_timeout = Duration::from_secs(args.cluster_leave_timeout);
        }
    }
    anyhow::ensure!(
        config.store != StoreSpec::Jwt || config.jwt_key_file.is_some(),
        "--store jwt needs --jwt-key-file FILE (make one with `tether jwt-keygen > keys.toml`)"
    );
    tether_cli::node::serve(config, args.listen, shutdown_signal()?)
        .await
        .with_context(|| format!("serving on {}", args.listen))?;
    Ok(ExitCode::SUCCESS)
}

/// The scenarios `--scenario` names, in the order they run.
fn scenarios(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    let mut chosen = Vec::new();
    for name in names {
        if name == "all" {
            chosen.extend(Scenario::ALL);
        } else {
            chosen.push(
                name.parse()
                    .map_err(|e: String| anyhow::anyhow!("--scenario: {e}"))?,
            );
        }
    }
    Ok(Scenario::ALL
        .into_iter()
        .filter(|s| chosen.contains(s))
        .collect())
}

/// Follows the demo on stderr: a progress bar with the time left on a
/// terminal, a line per run otherwise.
fn follow(tracker: Tracker) -> tokio::task::JoinHandle<()> {
    use std::io::Write as _;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let p = tracker.now();
            if tty {
                eprint!("\r\x1b[2K{}", tether_cli::demo::progress_line(&p));
                let _ = std::io::stderr().flush();
            } else if p.current != last && !p.current.is_empty() {
                eprintln!("… {} (run {} of {})", p.current, p.done + 1, p.total);
                last.clone_from(&p.current);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.users > 0 && args.rate > 0,
        "--users and --rate must be positive"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && (0.5..=3600.0).contains(&args.seconds),
        "--seconds: from 0.5 to 3600"
    );
    anyhow::ensure!(
        args.sweep_nodes.iter().all(|n| (1..=16).contains(n)),
        "--sweep-nodes: sizes from 1 to 16"
    );
    let bin = tether_cli::demo::this_binary().context("locating the tether executable")?;
    let config = tether_cli::demo::DemoConfig {
        users: args.users,
        rate: args.rate,
        duration: Duration::from_secs_f64(args.seconds),
        scenarios: scenarios(&args.scenario)?,
        redis_url: args.redis_url,
        only: args.only,
    };
    let quiet = args.json;
    let mut follower = None;
    let run = tether_cli::demo::run(&bin, &config, |tracker| {
        if !quiet {
            follower = Some(follow(tracker));
        }
    });
    // Ctrl-C stops the run; dropping it kills every process it started.
    let rows = tokio::select! {
        rows = run => rows,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping every process the demo started");
            return Ok(ExitCode::from(130));
        }
    };
    if let Some(f) = follower {
        f.abort();
        eprintln!();
    }
    let mut sweep_failed = false;
    let sweep = if args.sweep_nodes.is_empty() {
        None
    } else {
        if !quiet {
            eprintln!("… sweeping cluster sizes {:?}", args.sweep_nodes);
        }
        // A sweep that fails keeps the scenarios' results: they are printed
        // and reported without it, and the exit status says it failed.
        match tether_cli::demo::sweep(&bin, &args.sweep_nodes, 100).await {
            Ok(rows) => Some(rows),
            Err(e) => {
                eprintln!("tether demo: the sweep failed: {e}");
                sweep_failed = true;
                None
            }
        }
    };
    if let Some(path) = &args.report {
        let page = tether_cli::demo::report::html(&rows, &config, sweep.as_deref())
            .map_err(|e| anyhow::anyhow!("report: {e}"))?;
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        if !quiet {
            eprintln!("… report written to {}", path.display());
        }
    }
    if args.json {
        let doc = match &sweep {
            Some(s) => serde_json::json!({ "strategies": rows, "sweep": s }),
            None => serde_json::to_value(&rows)?,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", tether_cli::demo::render(&rows, &config));
        if let Some(s) = &sweep {
            print!("{}", tether_cli::demo::render_sweep(s));
        }
    }
    Ok(if sweep_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A future that resolves on SIGINT or SIGTERM.
///
/// The handlers are installed here, before the caller announces it is
/// listening: a signal that arrives between the announcement and the first
/// poll must not kill the process with the default action.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// A future that resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
