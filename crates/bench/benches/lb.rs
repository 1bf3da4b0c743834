//! `tether lb` against nginx and HAProxy, in the same run.
//!
//! Two `tether node` backends; in front of them, in turn: nginx (`ip_hash`,
//! 1 worker, upstream keep-alive), HAProxy (`cookie insert`, 1 thread) and
//! `tether lb` (`cookie` policy, 1 worker thread). `wrk` drives each through a
//! client pinned to one backend (the steady state of a sticky session),
//! alternating rounds. Run it with `scripts/bench-lb`, which builds the
//! release binary and installs the peers.
//!
//! ```text
//! cargo bench -p tether-bench --bench lb -- [--seconds 5] [--rounds 3] [--connections 32]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_bench::{arg, median, wrk, WrkResult};
use tether_testkit::{eventually, free_port, lb_args, node_args, Client, Process};
use tokio::process::{Child, Command};

fn tether_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TETHER_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/tether")
}

/// Starts `program args`, killed on drop, and waits until `port` answers HTTP.
async fn start_peer(program: &str, args: &[String], port: u16) -> Child {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}); scripts/bench-lb installs it"));
    let url = format!("http://127.0.0.1:{port}/health");
    eventually(Duration::from_secs(10), program, || {
        let url = url.clone();
        async move { Client::new().get(&url).await.ok().map(|_| ()) }
    })
    .await
    .unwrap();
    child
}

fn nginx_conf(dir: &Path, port: u16, a: SocketAddr, b: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream backend {{ ip_hash; server {a}; server {b}; keepalive 64; }}\n\
           server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}\n}}\n"
    )
}

fn haproxy_cfg(port: u16, a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  option forwardfor\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  cookie SRV insert indirect nocache\n  \
         http-reuse always\n  server A {a} cookie A\n  server B {b} cookie B\n"
    )
}

fn main() {
    let seconds = arg("--seconds", 5);
    let rounds = arg("--rounds", 3);
    let connections = arg("--connections", 32);
    let bin = tether_bin();
    assert!(
        bin.exists(),
        "{} missing: run scripts/bench-lb (it builds the release binary)",
        bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Process::spawn(&bin, &node_args("A", "memory")).await.expect("node A");
        let b = Process::spawn(&bin, &node_args("B", "memory")).await.expect("node B");
        let (a_addr, b_addr) = (a.addr(), b.addr());

        let nginx_port = free_port().unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir.path(), nginx_port, a_addr, b_addr)).unwrap();
        let _nginx = start_peer("nginx", &["-c".into(), conf.display().to_string()], nginx_port).await;

        let haproxy_port = free_port().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_cfg(haproxy_port, a_addr, b_addr)).unwrap();
        let _haproxy = start_peer("haproxy", &["-f".into(), cfg.display().to_string()], haproxy_port).await;

        let mut args = lb_args("cookie", &[("A", a_addr), ("B", b_addr)]);
        args.extend(["--threads".into(), "1".into(), "--log-level".into(), "warn".into()]);
        let tether = Process::spawn_n(&bin, &args, 2).await.expect("tether lb");

        // Pin one client per balancer to a backend, as a logged-in user is.
        let pin = Client::new();
        pin.get(&tether.url("/health")).await.unwrap();
        let route = pin.cookie("TETHER_ROUTE").expect("route cookie");
        let targets: Vec<(&str, String, Vec<String>)> = vec![
            ("nginx (ip_hash)", format!("http://127.0.0.1:{nginx_port}/health"), vec![]),
            ("haproxy (cookie insert)", format!("http://127.0.0.1:{haproxy_port}/health"), vec!["Cookie: SRV=A".into()]),
            ("tether lb (cookie)", tether.url("/health"), vec![format!("Cookie: TETHER_ROUTE={route}")]),
        ];
        let mut results: Vec<Vec<WrkResult>> = vec![Vec::new(); targets.len()];
        for round in 1..=rounds {
            for (i, (name, url, headers)) in targets.iter().enumerate() {
                let r = wrk(url, headers, connections, seconds).await.unwrap_or_else(|e| panic!("{e}"));
                eprintln!(
                    "round {round} {name:<24} {:>9.0} req/s  p50 {:>8.1?}  p99 {:>8.1?}  errors {}",
                    r.rps, r.p50, r.p99, r.errors
                );
                assert_eq!(r.errors, 0, "{name} answered errors");
                results[i].push(r);
            }
        }
        let summary: Vec<(f64, f64, f64)> = results
            .iter()
            .map(|rs| {
                (
                    median(rs.iter().map(|r| r.rps).collect()),
                    median(rs.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect()),
                    median(rs.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect()),
                )
            })
            .collect();
        let (base_rps, _, base_p99) = summary[0];
        println!("\n| balancer | req/s (median of {rounds}) | p50 ms | p99 ms | req/s vs nginx | p99 vs nginx |");
        println!("|---|---|---|---|---|---|");
        for ((name, _, _), (rps, p50, p99)) in targets.iter().zip(&summary) {
            println!(
                "| {name} | {rps:.0} | {p50:.3} | {p99:.3} | {:.2} | {:.2} |",
                rps / base_rps,
                p99 / base_p99
            );
        }
        println!("\n{seconds} s per round, {rounds} rounds alternating, wrk -t1 -c{connections}, GET /health of a tether node, one client pinned to one backend");
    });
}
