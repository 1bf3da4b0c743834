//! Test kit for tether: real processes and servers on free loopback ports.
//!
//! - [`Process`] runs a server binary as a child (killed on drop, and by the
//!   kernel if the test process dies) and learns its address from the
//!   `listening on http://…` line it prints, so ports are chosen by the OS and
//!   never collide between parallel tests.
//! - [`TestServer`] serves an axum router in process on `127.0.0.1:0`.
//! - [`Client`] is an HTTP client with a cookie jar shared across hosts and
//!   ports, as a browser shares `localhost` cookies across ports: exactly the
//!   situation of one user talking to several servers.
//! - [`RedisServer`] starts a private `redis-server` in a temp dir.
//! - [`TestCa`] issues certificates for TLS tests, made fresh in each run.
//! - [`eventually`] polls a condition with a deadline instead of sleeping.
//! - [`Shoppers`] keep writing through a balancer while a test breaks
//!   things, and check every acknowledged write at the end.

mod client;
mod fault;
mod fleet;
mod process;
mod redis;
mod tls;
mod workload;

/// The Redis client the kit uses, for tests that talk to its servers.
pub use ::redis as redis_client;

pub use client::{Client, Response};
pub use fault::Isolation;
pub use fleet::{cluster_settled, loopback, Balancer, Fleet, Member};
pub use process::{
    env_values, lb_args, lb_config, node_args, processes_with_env, Process, TestServer,
};
pub use redis::{ping as redis_ping, RedisCluster, RedisSentinels, RedisServer};
pub use tls::{tls_connect, TestCa};
pub use workload::{Observer, Plan, Progress, Running, Seen, Shoppers, Step, Tally};

/// Signal numbers for [`Process::signal`].
pub use libc::{SIGCONT, SIGHUP, SIGINT, SIGKILL, SIGSTOP, SIGTERM};

use std::future::Future;
use std::time::{Duration, Instant};

/// Errors from the test kit; tests unwrap them.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// Results from the test kit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A port that was free a moment ago on 127.0.0.1, for programs that cannot
/// bind port 0 themselves. Callers must retry if it was taken meanwhile.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `within`
/// naming `what` was awaited.
///
/// # Errors
/// When `within` passes without `check` succeeding.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {within:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
