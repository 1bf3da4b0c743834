//! The `tether` command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand};
use tether_cli::node::{NodeConfig, StoreSpec};

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
    Node(NodeArgs),
    /// Replay the brief's scenario and print the measured comparison.
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// This node's name, shown in every response (X-Tether-Node).
    #[arg(long)]
    id: String,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Where sessions live: `memory`.
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
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Node(args) => node(args).await,
            Command::Demo(args) => demo(args).await,
        }
    })
}

async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(!args.id.is_empty(), "--id must not be empty");
    anyhow::ensure!(args.idle_timeout > 0, "--idle-timeout must be positive");
    let config = NodeConfig {
        id: args.id,
        store: args.store,
        cookie_secure: args.cookie_secure,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_session_bytes: args.max_session_bytes,
    };
    tether_cli::node::serve(config, args.listen, shutdown_signal()?)
        .await
        .with_context(|| format!("serving on {}", args.listen))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let bin = std::env::current_exe().context("locating the tether executable")?;
    let result = tether_cli::demo::run_local(&bin)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let results = [result];
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", tether_cli::demo::render(&results));
    }
    Ok(ExitCode::SUCCESS)
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
