//! Shared pieces of tether's benchmarks: driving `wrk` and reading its report.
//!
//! Every benchmark measures tether and a peer in the same run, alternating
//! rounds so drift on a shared machine hits both, and reports ratios.

use std::time::Duration;

/// One `wrk` run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// 50th percentile latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Non-2xx/3xx responses plus socket errors.
    pub errors: u64,
    /// Requests completed.
    pub requests: u64,
}

/// Parses a `wrk --latency` report.
pub fn parse_wrk(report: &str) -> Option<WrkResult> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0;
    let mut requests = 0;
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = parse_duration(v),
            ["99%", v] => p99 = parse_duration(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    Some(WrkResult {
        rps: rps?,
        p50: p50?,
        p99: p99?,
        errors,
        requests,
    })
}

fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Runs `wrk` against `url` with extra headers.
///
/// # Errors
/// If `wrk` is missing (the message says how to install it) or its report
/// cannot be read.
pub async fn wrk(
    url: &str,
    headers: &[String],
    connections: u32,
    seconds: u32,
) -> Result<WrkResult, String> {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args(["-t1", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out =
        cmd.arg(url).output().await.map_err(|e| {
            format!("cannot run wrk ({e}); install it with `apt-get install -y wrk`")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).ok_or_else(|| format!("unreadable wrk report:\n{text}"))
}

/// Runs `wrk` against `url` with a Lua `script` (its text; written to a
/// temp file).
///
/// # Errors
/// As [`wrk`].
pub async fn wrk_script(
    url: &str,
    script: &str,
    connections: u32,
    seconds: u32,
) -> Result<WrkResult, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("script.lua");
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let out = tokio::process::Command::new("wrk")
        .args(["-t1", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(&path)
        .arg(url)
        .output()
        .await
        .map_err(|e| format!("cannot run wrk ({e}); install it with `apt-get install -y wrk`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).ok_or_else(|| format!("unreadable wrk report:\n{text}"))
}

/// Serves the router `app` builds on its own thread with a single-threaded
/// runtime (one core per server); returns its address.
///
/// # Panics
/// If it cannot bind a loopback port.
pub fn serve_on_own_core(app: Box<dyn FnOnce() -> axum::Router + Send>) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            axum::serve(listener, app()).await.expect("serve");
        });
    });
    rx.recv().expect("server address")
}

/// One `h2load` run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2loadResult {
    /// Requests per second.
    pub rps: f64,
    /// Mean time per request.
    pub mean: Duration,
    /// Requests that failed or errored.
    pub errors: u64,
    /// Requests that succeeded.
    pub done: u64,
}

/// Parses an `h2load` report.
pub fn parse_h2load(report: &str) -> Option<H2loadResult> {
    let mut rps = None;
    let mut mean = None;
    let mut errors = None;
    let mut done = None;
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["finished", "in", _, v, "req/s,", ..] => rps = v.parse().ok(),
            ["requests:", _, "total,", _, "started,", _, "done,", ok, "succeeded,", failed, "failed,", errored, "errored,", ..] =>
            {
                errors = Some(failed.parse::<u64>().ok()? + errored.parse::<u64>().ok()?);
                done = ok.parse().ok();
            }
            ["time", "for", "request:", _, _, m, ..] => mean = parse_duration(m),
            _ => {}
        }
    }
    Some(H2loadResult {
        rps: rps?,
        mean: mean?,
        errors: errors?,
        done: done?,
    })
}

/// Runs `h2load` (HTTP/2) against `url` with `args` (e.g. `-c32 -m10 -D5`).
///
/// # Errors
/// If `h2load` is missing (the message says how to install it) or its
/// report cannot be read.
pub async fn h2load(url: &str, args: &[String]) -> Result<H2loadResult, String> {
    let out = tokio::process::Command::new("h2load")
        .args(args)
        .arg(url)
        .output()
        .await
        .map_err(|e| {
            format!("cannot run h2load ({e}); install it with `apt-get install -y nghttp2-client`")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).ok_or_else(|| format!("unreadable h2load report:\n{text}"))
}

/// Resident memory of process `pid`, in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The value of `--name N` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `values` (which must not be empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The options of the `wrk`-driven benchmarks, as `(seconds, rounds,
/// connections)`: `--seconds` per run (default 5), `--rounds` alternating
/// between the servers (3) and `wrk`'s `--connections` (16).
#[must_use]
pub fn wrk_options() -> (u32, u32, u32) {
    (
        arg("--seconds", 5),
        arg("--rounds", 3),
        arg("--connections", 16),
    )
}

/// Runs a benchmark's driver on a single-threaded runtime: the driver keeps
/// to one core, the servers under test have their own.
///
/// # Panics
/// If the runtime cannot be built.
pub fn block_on<F: std::future::Future>(driver: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 5s test @ http://127.0.0.1:1/mypage
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.00us   50.00us   2.00ms   90.00%
  Latency Distribution
     50%  140.00us
     75%  160.00us
     90%  200.00us
     99%    1.20ms
  500000 requests in 5.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec: 100000.50
Transfer/sec:     12.00MB
";
        let r = parse_wrk(report).unwrap();
        assert_eq!(r.rps, 100000.50);
        assert_eq!(r.p50, Duration::from_micros(140));
        assert_eq!(r.p99, Duration::from_micros(1200));
        assert_eq!(r.errors, 7);
        assert_eq!(r.requests, 500000);
    }

    #[test]
    fn reads_an_h2load_report() {
        let report = "finished in 5.00s, 41234.20 req/s, 3.10MB/s
requests: 206171 total, 206171 started, 206171 done, 206170 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 206171 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      120us      9.10ms       7.40ms      1.20ms    70.00%
";
        let r = parse_h2load(report).unwrap();
        assert_eq!(r.rps, 41234.20);
        assert_eq!(r.mean, Duration::from_micros(7400));
        assert_eq!((r.errors, r.done), (1, 206170));
    }

    #[test]
    fn an_incomplete_report_is_none() {
        assert_eq!(parse_wrk("Requests/sec: 5\n"), None);
    }
}
