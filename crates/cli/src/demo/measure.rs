//! What a run measured ([`Row`]), built from every answer the users saw,
//! the nodes' counters and Redis's own; and the brief's claims checked
//! against the rows ([`claims`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;
use tether_testkit::{Seen, Step, Tally};

use super::render::opt;
use super::Scenario;
use crate::fleet::Fleet;
use crate::strategy::{Approach, Strategy};

/// The width of a timeline window, in milliseconds.
pub const WINDOW_MS: u64 = 100;

/// Answers per window of [`WINDOW_MS`] from the moment the users started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// The window's width, ms.
    pub window_ms: u64,
    /// Answers 2xx (that did not show the user logged out), by the window
    /// they arrived in.
    pub ok: Vec<u32>,
    /// Answers that showed the user logged out: 401, or a cart that lost
    /// the items acknowledged before.
    pub logged_out: Vec<u32>,
    /// Answers 5xx or other errors, and requests that got no answer.
    pub failed: Vec<u32>,
}

/// Something the scenario did, on the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When, ms from the moment the users started.
    pub at_ms: f64,
    /// What.
    pub what: String,
}

/// What was measured for one strategy in one scenario. The keys are
/// documented in README.md; `scenario`, `strategy`, `users_logged_out` and
/// `acknowledged_writes_lost` are fixed.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario.
    pub scenario: Scenario,
    /// The strategy.
    pub strategy: Strategy,
    /// Why the row could not run (e.g. `redis-server` missing), if it did not.
    pub skipped: Option<String>,
    /// Load balancer policy used.
    pub policy: String,
    /// Where the sessions live.
    pub note: String,
    /// The brief's scenario: node that served the login.
    pub login_node: String,
    /// The brief's scenario: node that served the next page.
    pub next_node: String,
    /// The brief's scenario: still logged in on the next page.
    pub still_logged_in_after_switch: bool,
    /// Users that logged in.
    pub users: usize,
    /// Users whose login was refused (they did not shop).
    pub users_failed_login: usize,
    /// Why, for the first few of them.
    pub login_failures: Vec<String>,
    /// Users logged out at some point after logging in (a 401, a cart
    /// that lost acknowledged items, or not logged in at the end).
    pub users_logged_out: usize,
    /// Of those, users logged out before the scenario's first event (the
    /// kill, the join, the first restart, the outage).
    pub users_logged_out_before_kill: usize,
    /// Users logged out for the first time after the first event.
    pub users_logged_out_after_kill: usize,
    /// Cart items the users saw acknowledged.
    pub acknowledged_writes: u64,
    /// Acknowledged items missing from the carts at the end.
    pub acknowledged_writes_lost: u64,
    /// Requests sent after the logins (logins again included).
    pub requests: u64,
    /// Logins again by users who found they were logged out.
    pub logins_again: u64,
    /// Requests failed (5xx, other errors, no answer) before the first event.
    pub failed_before_kill: u64,
    /// Requests failed after the first event.
    pub failed_after_kill: u64,
    /// Users who saw a failed request after the first event.
    pub users_failed_after_kill: usize,
    /// Failed requests by answer: an HTTP status, or `no answer`.
    pub failures: BTreeMap<String, u64>,
    /// From the first event to the end of the last window with a failed or
    /// logged-out answer, ms (0: the users never noticed).
    pub disrupted_ms: f64,
    /// Requests served per node.
    pub requests_per_node: BTreeMap<String, u64>,
    /// Busiest node's share over the mean, before the first event.
    pub imbalance: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// Latency percentiles, ms.
    pub p99_ms: f64,
    /// Requests per second over the run.
    pub rps: f64,
    /// Latency at percentiles 0, 5, …, 95 and 99, ms.
    pub latency_curve_ms: Vec<f64>,
    /// The slowest request, ms.
    pub latency_max_ms: f64,
    /// When each logged-out user found out, ms from the first event.
    pub logged_out_at_ms: Vec<f64>,
    /// Round trips to the external store per request (Redis: commands
    /// clients sent, counted by Redis; replicated: hops to the owner on
    /// another node; 0 where sessions never leave the nodes).
    pub store_round_trips_per_request: Option<f64>,
    /// Replication messages per write (replicated rows), three nodes
    /// serving, before the first event.
    pub replication_messages_per_write: Option<f64>,
    /// Replication bytes per write (replicated rows), likewise.
    pub replication_bytes_per_write: Option<f64>,
    /// Sessions each node held just before the first event (`null`
    /// entries: the node's store is not its own, e.g. Redis).
    pub sessions_per_node: BTreeMap<String, Option<u64>>,
    /// Session bytes held per running node at the end (in-process stores).
    pub session_bytes_per_node: BTreeMap<String, u64>,
    /// Scale-out: from the new node's start until it was ready (a
    /// replicated node: holding its share), ms.
    pub join_ms: Option<f64>,
    /// Scale-out: bytes the replicated nodes sent in transfer rounds while
    /// the new node joined.
    pub transfer_bytes: Option<u64>,
    /// Scale-out: replication messages per write once 4 nodes served.
    pub replication_messages_per_write_after_join: Option<f64>,
    /// Scale-out: Redis round trips per request once 4 nodes served.
    pub store_round_trips_per_request_after_join: Option<f64>,
    /// Scale-out: the new node's share of the requests after it joined.
    pub new_node_share: Option<f64>,
    /// Store outage (Redis): from the master's death until Sentinel named
    /// another, ms.
    pub failover_ms: Option<f64>,
    /// Rolling restart: how long the whole deploy took, ms.
    pub deploy_ms: Option<f64>,
    /// Store flags a node needed beyond `--store memory`.
    pub node_store_flags: usize,
    /// Processes the strategy needed besides the nodes and the balancer
    /// (Redis servers and sentinels).
    pub extra_processes: usize,
    /// How long the users shopped, ms.
    pub duration_ms: f64,
    /// Answers per window.
    pub timeline: Timeline,
    /// What the scenario did, when.
    pub events: Vec<Event>,
}

impl Row {
    /// An empty row for `strategy` in `scenario`.
    pub fn new(scenario: Scenario, strategy: Strategy) -> Self {
        Self {
            scenario,
            strategy,
            skipped: None,
            policy: strategy.policy_name().into(),
            note: strategy.note().into(),
            login_node: String::new(),
            next_node: String::new(),
            still_logged_in_after_switch: false,
            users: 0,
            users_failed_login: 0,
            login_failures: Vec::new(),
            users_logged_out: 0,
            users_logged_out_before_kill: 0,
            users_logged_out_after_kill: 0,
            acknowledged_writes: 0,
            acknowledged_writes_lost: 0,
            requests: 0,
            logins_again: 0,
            failed_before_kill: 0,
            failed_after_kill: 0,
            users_failed_after_kill: 0,
            failures: BTreeMap::new(),
            disrupted_ms: 0.0,
            requests_per_node: BTreeMap::new(),
            imbalance: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            rps: 0.0,
            latency_curve_ms: Vec::new(),
            latency_max_ms: 0.0,
            logged_out_at_ms: Vec::new(),
            store_round_trips_per_request: None,
            replication_messages_per_write: None,
            replication_bytes_per_write: None,
            sessions_per_node: BTreeMap::new(),
            session_bytes_per_node: BTreeMap::new(),
            join_ms: None,
            transfer_bytes: None,
            replication_messages_per_write_after_join: None,
            store_round_trips_per_request_after_join: None,
            new_node_share: None,
            failover_ms: None,
            deploy_ms: None,
            node_store_flags: 0,
            extra_processes: 0,
            duration_ms: 0.0,
            timeline: Timeline::default(),
            events: Vec::new(),
        }
    }

    /// Whether it ran.
    pub fn ran(&self) -> bool {
        self.skipped.is_none()
    }

    /// When the first event came, ms (the end when there was none).
    pub fn first_event_ms(&self) -> f64 {
        self.events.first().map_or(self.duration_ms, |e| e.at_ms)
    }

    /// Fills in what the users saw: `tally` from the final check, `seen`
    /// every answer, `t0` when they started, `took` how long they shopped.
    pub(crate) fn answers(&mut self, tally: &Tally, seen: &[Seen], t0: Instant, took: Duration) {
        let ms = |at: Instant| at.saturating_duration_since(t0).as_secs_f64() * 1e3;
        let event = self.first_event_ms();
        self.duration_ms = took.as_secs_f64() * 1e3;
        self.users = tally.users;
        self.users_logged_out = tally.logged_out;
        self.acknowledged_writes = tally.acked;
        self.acknowledged_writes_lost = tally.lost;
        self.requests = tally.requests;
        self.logins_again = tally.logins_again;
        self.rps = tally.requests as f64 / took.as_secs_f64().max(1e-3);

        let windows = (self.duration_ms / WINDOW_MS as f64).ceil() as usize + 1;
        let mut t = Timeline {
            window_ms: WINDOW_MS,
            ok: vec![0; windows],
            logged_out: vec![0; windows],
            failed: vec![0; windows],
        };
        let mut first_out: BTreeMap<usize, f64> = BTreeMap::new();
        let mut failed_after: BTreeSet<usize> = BTreeSet::new();
        let mut before_event: BTreeMap<String, u64> = BTreeMap::new();
        let mut last_trouble: Option<f64> = None;
        let mut latencies = Vec::with_capacity(seen.len());
        for s in seen {
            // When the user saw the answer: a request sent just before a
            // kill and answered after it belongs after it.
            let at = ms(s.at + s.took);
            let w = ((at / WINDOW_MS as f64) as usize).min(windows - 1);
            let ok = matches!(s.status, Some(200..=299));
            if let Some(node) = &s.node {
                *self.requests_per_node.entry(node.clone()).or_default() += 1;
                if at < event {
                    *before_event.entry(node.clone()).or_default() += 1;
                }
            }
            if s.step != Step::Login {
                latencies.push(s.took);
            }
            if s.logged_out {
                t.logged_out[w] += 1;
                first_out.entry(s.user).or_insert(at);
            } else if ok {
                t.ok[w] += 1;
                continue;
            } else {
                t.failed[w] += 1;
                let why = s.status.map_or("no answer".to_string(), |c| c.to_string());
                *self.failures.entry(why).or_default() += 1;
                if at < event {
                    self.failed_before_kill += 1;
                } else {
                    self.failed_after_kill += 1;
                    failed_after.insert(s.user);
                }
            }
            if at >= event {
                let end = (w as f64 + 1.0) * WINDOW_MS as f64;
                last_trouble = Some(last_trouble.map_or(end, |l: f64| l.max(end)));
            }
        }
        self.timeline = t;
        self.users_failed_after_kill = failed_after.len();
        self.disrupted_ms = last_trouble.map_or(0.0, |l| (l - event).max(0.0));
        self.users_logged_out_before_kill = first_out.values().filter(|at| **at < event).count();
        // The final check finds users who never came back after the event.
        self.users_logged_out_after_kill = tally
            .logged_out
            .saturating_sub(self.users_logged_out_before_kill);
        let mut outs: Vec<f64> = first_out.values().map(|at| at - event).collect();
        outs.sort_by(f64::total_cmp);
        self.logged_out_at_ms = outs;
        let mean = before_event.values().sum::<u64>() as f64 / before_event.len().max(1) as f64;
        self.imbalance = before_event.values().copied().max().unwrap_or(0) as f64 / mean.max(1.0);

        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len().max(1) - 1) as f64 * p).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        self.latency_curve_ms = (0..20)
            .map(|i| pct(f64::from(i) / 20.0))
            .chain([pct(0.99)])
            .collect();
        self.latency_max_ms = pct(1.0);
        self.p50_ms = pct(0.5);
        self.p99_ms = pct(0.99);
    }

    /// The share of requests sent at or after `from_ms` that `node` answered.
    pub(crate) fn share_since(seen: &[Seen], t0: Instant, node: &str, from_ms: f64) -> f64 {
        let after: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.at.saturating_duration_since(t0).as_secs_f64() * 1e3 >= from_ms)
            .collect();
        let by_node = after
            .iter()
            .filter(|s| s.node.as_deref() == Some(node))
            .count();
        by_node as f64 / after.len().max(1) as f64
    }
}

/// The value of metric `name` in Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The replicated store's counters, summed over nodes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub(crate) messages: f64,
    pub(crate) bytes: f64,
    pub(crate) writes: f64,
    pub(crate) forwarded: f64,
    pub(crate) transfer_bytes: f64,
}

impl Counters {
    fn of(text: &str) -> Self {
        Self {
            messages: metric(text, "tether_cluster_replication_messages_total"),
            bytes: metric(text, "tether_cluster_replication_bytes_total"),
            writes: metric(text, "tether_cluster_writes_total"),
            forwarded: metric(text, "tether_cluster_forwarded_total"),
            transfer_bytes: metric(text, "tether_cluster_transfer_bytes_total"),
        }
    }

    /// Replication messages per write.
    pub(crate) fn messages_per_write(&self) -> Option<f64> {
        (self.writes > 0.0).then(|| self.messages / self.writes)
    }

    /// Replication bytes per write.
    pub(crate) fn bytes_per_write(&self) -> Option<f64> {
        (self.writes > 0.0).then(|| self.bytes / self.writes)
    }
}

/// Every running node's counters at one moment, per process: a restarted
/// or new node counts from zero, a dead one's counts are lost with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot(BTreeMap<(String, u32), Counters>);

impl Snapshot {
    pub(crate) async fn take(fleet: &Fleet) -> Self {
        Self(
            fleet
                .metrics()
                .await
                .into_iter()
                .map(|(id, pid, text)| ((id, pid), Counters::of(&text)))
                .collect(),
        )
    }

    /// What the processes running now counted since `earlier`.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Counters {
        let mut d = Counters::default();
        for (k, now) in &self.0 {
            let was = earlier.0.get(k).copied().unwrap_or_default();
            d.messages += now.messages - was.messages;
            d.bytes += now.bytes - was.bytes;
            d.writes += now.writes - was.writes;
            d.forwarded += now.forwarded - was.forwarded;
            d.transfer_bytes += now.transfer_bytes - was.transfer_bytes;
        }
        d
    }
}

/// Sends one command to the Redis at `url` and returns its text answer.
pub(crate) async fn redis_command(url: &str, args: &[&str]) -> Option<String> {
    use tether_testkit::redis_client as redis;
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let v: redis::Value = cmd.query_async(&mut conn).await.ok()?;
    redis::from_redis_value::<String>(v).ok()
}

/// The commands clients sent to the Redis at `url` since its statistics
/// were reset, as Redis counts them. The commands our scripts run inside
/// Redis are not round trips, nor are `CLIENT CACHING` and `WAIT`, which
/// travel in the pipeline of the command they serve.
pub(crate) async fn redis_round_trips(url: &str) -> Option<f64> {
    let info = redis_command(url, &["INFO", "commandstats"]).await?;
    let sent = info
        .lines()
        .filter(|l| {
            [
                "cmdstat_hgetall:",
                "cmdstat_evalsha:",
                "cmdstat_eval:",
                "cmdstat_del:",
                "cmdstat_script",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    Some(sent)
}

/// What a claim of the brief came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The measurement agrees with the brief.
    Confirmed,
    /// The measurement says otherwise, or more precisely.
    Corrected,
    /// The scenario that measures it did not run.
    NotMeasured,
}

impl Verdict {
    /// As printed.
    pub fn word(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::Corrected => "corrected",
            Self::NotMeasured => "not measured",
        }
    }
}

/// One claim of the brief beside what this run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    /// The row of the brief's table (or its pros and cons).
    pub row: &'static str,
    /// The column: the brief's approach.
    pub column: &'static str,
    /// What the brief says, in its words and in English.
    pub brief: &'static str,
    /// What this run measured.
    pub measured: String,
    /// Whether the measurement confirms it.
    pub verdict: Verdict,
}

/// Rows that ran, by scenario and strategy.
struct Ran<'a>(&'a [Row]);

impl<'a> Ran<'a> {
    fn get(&self, sc: Scenario, st: Strategy) -> Option<&'a Row> {
        self.0
            .iter()
            .find(|r| r.scenario == sc && r.strategy == st && r.ran())
    }

    /// The rows of `approach` in `sc`.
    fn of(&self, sc: Scenario, approach: Approach) -> Vec<&'a Row> {
        self.0
            .iter()
            .filter(|r| r.scenario == sc && r.strategy.approach() == approach && r.ran())
            .collect()
    }
}

/// What measures a claim: a scenario, with some strategies.
struct Needs(Scenario, &'static str);

impl fmt::Display for Needs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--scenario {}", self.0)?;
        if !self.1.is_empty() {
            write!(f, " with {}", self.1)?;
        }
        Ok(())
    }
}

/// Both rows of a comparison, or none.
fn pair_or_none(rows: Vec<&Row>) -> Vec<&Row> {
    if rows.len() == 2 {
        rows
    } else {
        Vec::new()
    }
}

fn pct(part: usize, whole: usize) -> String {
    format!("{part} of {whole}")
}

/// Copies of each session the nodes held: sessions held over sessions
/// made, the users' and the brief's scenario's login.
fn copies(r: &Row) -> Option<f64> {
    let held: Vec<u64> = r.sessions_per_node.values().filter_map(|v| *v).collect();
    let made = r.users + usize::from(!r.login_node.is_empty());
    (!held.is_empty() && r.users > 0).then(|| held.iter().sum::<u64>() as f64 / made as f64)
}

fn per_node(r: &Row) -> String {
    r.sessions_per_node
        .values()
        .map(|v| v.map_or("-".into(), |v| v.to_string()))
        .collect::<Vec<_>>()
        .join("/")
}

/// A claim measured by `rows`, or not measured when they are missing
/// (`needs` says what would measure it).
fn claim(
    row: &'static str,
    column: &'static str,
    brief: &'static str,
    needs: impl fmt::Display,
    rows: &[&Row],
    judge: impl FnOnce() -> (String, bool),
) -> Claim {
    if rows.is_empty() {
        return Claim {
            row,
            column,
            brief,
            measured: format!("not run: needs {needs}"),
            verdict: Verdict::NotMeasured,
        };
    }
    // A run in which nobody logged in, or no write was acknowledged, loses
    // nothing because it did nothing: it cannot confirm or correct.
    if let Some(r) = rows
        .iter()
        .find(|r| r.users == 0 || r.acknowledged_writes == 0)
    {
        return Claim {
            row,
            column,
            brief,
            measured: format!(
                "{} in {}: {} users logged in, {} writes acknowledged; nothing to judge",
                r.strategy, r.scenario, r.users, r.acknowledged_writes
            ),
            verdict: Verdict::NotMeasured,
        };
    }
    let (measured, confirmed) = judge();
    Claim {
        row,
        column,
        brief,
        measured,
        verdict: if confirmed {
            Verdict::Confirmed
        } else {
            Verdict::Corrected
        },
    }
}

/// The brief's table, row by row, beside what `rows` measured. Every
/// verdict is computed from the figures it quotes.
pub fn claims(rows: &[Row]) -> Vec<Claim> {
    use Scenario::*;
    let ran = Ran(rows);
    let mut out = Vec::new();
    let lines = |rs: &[&Row], f: &dyn Fn(&Row) -> String| {
        rs.iter()
            .map(|r| format!("{}: {}", r.strategy, f(r)))
            .collect::<Vec<_>>()
            .join("; ")
    };

    // 세션 위치: where the session lives.
    let row = "세션 위치 (where the session lives)";
    let sticky = ran.of(Kill, Approach::Sticky);
    out.push(claim(
        row,
        "Sticky Session",
        "각 서버 메모리 (each server's memory)",
        Needs(Kill, "sticky-ip or sticky-cookie"),
        &sticky,
        || {
            let text = lines(&sticky, &|r| {
                format!("{} sessions on A/B/C for {} users", per_node(r), r.users)
            });
            let one_copy = sticky.iter().all(|r| {
                copies(r).is_some_and(|c| (0.9..1.2).contains(&c))
                    && r.sessions_per_node
                        .values()
                        .all(|v| v.unwrap_or(0) < r.users as u64)
            });
            (text, one_copy)
        },
    ));
    // Copies of each session: every node's, or the owner's and a backup's.
    let replicas: [(Strategy, &str, &str, &str, std::ops::Range<f64>); 2] = [
        (
            Strategy::ReplicatedAll,
            "세션 클러스터링 (All-to-All)",
            "모든 서버 메모리 (every server's memory)",
            "replicated-all",
            2.9..3.1,
        ),
        (
            Strategy::ReplicatedBackup,
            "세션 클러스터링 (Primary-Backup)",
            "Primary + Backup만 보유 (only the owner and its backup)",
            "replicated-backup",
            1.9..2.2,
        ),
    ];
    for (strategy, column, brief, name, expected) in replicas {
        let held: Vec<&Row> = ran.get(Kill, strategy).into_iter().collect();
        out.push(claim(row, column, brief, Needs(Kill, name), &held, || {
            let r = held[0];
            let c = copies(r).unwrap_or(0.0);
            (
                format!(
                    "{}: {} sessions on A/B/C for {} users ({c:.1} copies each)",
                    r.strategy,
                    per_node(r),
                    r.users
                ),
                expected.contains(&c),
            )
        }));
    }
    let external = ran.of(Kill, Approach::External);
    out.push(claim(
        row,
        "외부 세션 저장소",
        "Redis 등 외부 (Redis, outside the servers)",
        Needs(Kill, "redis or sticky-redis"),
        &external,
        || {
            let none = external
                .iter()
                .all(|r| r.session_bytes_per_node.values().all(|b| *b == 0) && copies(r).is_none());
            (
                lines(&external, &|r| {
                    format!(
                        "the nodes' own stores held {} session bytes",
                        r.session_bytes_per_node.values().sum::<u64>()
                    )
                }),
                none,
            )
        },
    ));

    // 서버 확장: scaling out.
    let row = "서버 확장 (scaling out)";
    let sticky = ran.of(ScaleOut, Approach::Sticky);
    out.push(claim(
        row,
        "Sticky Session",
        "제한적 (limited)",
        Needs(ScaleOut, "sticky-ip or sticky-cookie"),
        &sticky,
        || {
            let text = lines(&sticky, &|r| {
                format!(
                    "{} users logged out by the join, D then served {:.0}% of requests",
                    pct(r.users_logged_out_after_kill, r.users),
                    r.new_node_share.unwrap_or(0.0) * 100.0
                )
            });
            // Limited: the join logs users out, or the new node takes less than
            // half its fair share (the users stay where they were pinned).
            let limited = sticky.iter().all(|r| {
                r.users_logged_out_after_kill > 0 || r.new_node_share.unwrap_or(0.0) < 0.125
            });
            (text, limited)
        },
    ));
    let clustering = ran.of(ScaleOut, Approach::Clustering);
    out.push(claim(row, "세션 클러스터링", "복제 비용 증가 (replication cost grows)", Needs(ScaleOut, "a replicated strategy"), &clustering, || {
        let text = lines(&clustering, &|r| format!(
            "{} → {} replication messages per write at 3 → 4 nodes; D held its share after {:.0} ms, {} transfer bytes, {} failed requests",
            opt(r.replication_messages_per_write, 2), opt(r.replication_messages_per_write_after_join, 2),
            r.join_ms.unwrap_or(0.0), r.transfer_bytes.unwrap_or(0), r.failed_after_kill
        ));
        let grows = clustering.iter().any(|r| {
            matches!((r.replication_messages_per_write, r.replication_messages_per_write_after_join), (Some(a), Some(b)) if b > a + 0.5)
        });
        (text, grows)
    }));
    let mut free = ran.of(ScaleOut, Approach::External);
    free.extend(ran.of(ScaleOut, Approach::Stateless));
    out.push(claim(
        row,
        "외부 세션 저장소",
        "자유로움 (free)",
        Needs(ScaleOut, "redis, sticky-redis or jwt"),
        &free,
        || {
            let text = lines(&free, &|r| {
                format!(
                    "{} logged out, {} failed requests, D served {:.0}% after joining",
                    pct(r.users_logged_out, r.users),
                    r.failed_after_kill,
                    r.new_node_share.unwrap_or(0.0) * 100.0
                )
            });
            (
                text,
                free.iter()
                    .all(|r| r.users_logged_out == 0 && r.failed_after_kill == 0),
            )
        },
    ));

    // 장애 대응: failure handling.
    let row = "장애 대응 (a server fails)";
    let sticky = ran.of(Kill, Approach::Sticky);
    out.push(claim(
        row,
        "Sticky Session",
        "세션 유실 (its sessions are lost)",
        Needs(Kill, "sticky-ip or sticky-cookie"),
        &sticky,
        || {
            let text = lines(&sticky, &|r| {
                format!(
                    "{} users logged out by the kill, {} acknowledged writes lost",
                    pct(r.users_logged_out_after_kill, r.users),
                    r.acknowledged_writes_lost
                )
            });
            (
                text,
                sticky.iter().all(|r| r.users_logged_out_after_kill > 0),
            )
        },
    ));
    let mut clustering = ran.of(Kill, Approach::Clustering);
    clustering.extend(ran.of(RollingRestart, Approach::Clustering));
    out.push(claim(
        row,
        "세션 클러스터링",
        "복제본으로 복구 (recovered from the replicas)",
        Needs(Kill, "a replicated strategy"),
        &clustering,
        || {
            let text = lines(&clustering, &|r| {
                format!(
                    "{}: {} logged out, {} acknowledged writes lost, {} failed requests",
                    r.scenario,
                    pct(r.users_logged_out, r.users),
                    r.acknowledged_writes_lost,
                    r.failed_after_kill
                )
            });
            // Recovered: nobody logged out, nothing lost, and the fleet
            // answered (at most 1% of all requests failed after the event:
            // writes in flight to the dead node are not resent).
            (
                text,
                clustering.iter().all(|r| {
                    r.users_logged_out == 0
                        && r.acknowledged_writes_lost == 0
                        && r.failed_after_kill * 100 <= r.requests
                }),
            )
        },
    ));
    let backup: Vec<&Row> = ran
        .get(StoreOutage, Strategy::ReplicatedBackup)
        .into_iter()
        .collect();
    out.push(claim(
        row,
        "세션 클러스터링 (Primary-Backup)",
        "Primary + Backup 동시 장애 시 유실 가능 (both failing together loses sessions)",
        Needs(StoreOutage, "replicated-backup"),
        &backup,
        || {
            let r = backup[0];
            let all = ran.get(StoreOutage, Strategy::ReplicatedAll);
            let text = format!(
                "two of three nodes SIGKILLed at once: {} {} users logged out{}",
                r.strategy,
                pct(r.users_logged_out, r.users),
                all.map_or(String::new(), |a| format!(
                    ", {} {}",
                    a.strategy,
                    pct(a.users_logged_out, a.users)
                ))
            );
            (text, r.users_logged_out > 0)
        },
    ));
    let external = ran.of(StoreOutage, Approach::External);
    out.push(claim(row, "외부 세션 저장소", "Redis HA로 대응 (Redis HA keeps the sessions)", Needs(StoreOutage, "redis or sticky-redis"), &external, || {
        let text = lines(&external, &|r| format!(
            "Redis master SIGKILLed: Sentinel promoted the replica after {:.0} ms; {} failed requests over {:.0} ms; {} logged out; {} of {} acknowledged writes lost",
            r.failover_ms.unwrap_or(0.0), r.failed_after_kill, r.disrupted_ms,
            pct(r.users_logged_out, r.users), r.acknowledged_writes_lost, r.acknowledged_writes
        ));
        (text, external.iter().all(|r| r.users_logged_out == 0 && r.acknowledged_writes_lost == 0))
    }));
    let external = ran.of(StoreOutage, Approach::External);
    out.push(claim(
        row,
        "외부 세션 저장소",
        "Redis 장애 시 전체 세션 영향 (a Redis failure touches every session)",
        Needs(StoreOutage, "redis or sticky-redis"),
        &external,
        || {
            let text = lines(&external, &|r| {
                format!(
                    "{} users saw a failed request during the outage",
                    pct(r.users_failed_after_kill, r.users)
                )
            });
            (
                text,
                external
                    .iter()
                    .all(|r| r.users_failed_after_kill * 10 >= r.users * 9),
            )
        },
    ));
    let calm: Vec<&Row> = [Kill, ScaleOut, RollingRestart]
        .into_iter()
        .filter_map(|sc| ran.get(sc, Strategy::Jwt))
        .collect();
    out.push(claim(row, "JWT", "세션 공유 문제 자체가 사라짐 (no session to share)", Needs(Kill, "jwt"), &calm, || {
        let outage = ran.get(StoreOutage, Strategy::Jwt);
        let jwt: Vec<&Row> = calm.iter().copied().chain(outage).collect();
        let text = lines(&jwt, &|r| format!(
            "{}: {} logged out, {} failed requests",
            r.scenario, pct(r.users_logged_out, r.users), r.failed_after_kill
        ));
        let text = match outage {
            Some(_) => format!("{text} (the outage: its revocation list in Redis under Sentinel lost its master)"),
            None => text,
        };
        (text, calm.iter().all(|r| r.users_logged_out == 0))
    }));

    // 구현 난이도: what it took.
    let row = "구현 난이도 (what it takes)";
    let all_kill: Vec<&Row> = rows
        .iter()
        .filter(|r| r.scenario == Kill && r.ran())
        .collect();
    let effort = |rs: &[&Row]| {
        lines(rs, &|r| {
            format!(
                "{} node store flags, {} more processes",
                r.node_store_flags, r.extra_processes
            )
        })
    };
    let sticky = ran.of(Kill, Approach::Sticky);
    out.push(claim(
        row,
        "Sticky Session",
        "가장 쉬움 (easiest)",
        Needs(Kill, "sticky-ip or sticky-cookie"),
        &sticky,
        || {
            let least = all_kill
                .iter()
                .map(|r| r.node_store_flags + r.extra_processes)
                .min()
                .unwrap_or(0);
            (
                format!("{} (only the balancer's policy changes)", effort(&sticky)),
                sticky
                    .iter()
                    .all(|r| r.node_store_flags + r.extra_processes == least),
            )
        },
    ));
    let (clustering, external) = (
        ran.of(Kill, Approach::Clustering),
        ran.of(Kill, Approach::External),
    );
    let both: Vec<&Row> = if clustering.is_empty() || external.is_empty() {
        Vec::new()
    } else {
        clustering.into_iter().chain(external).collect()
    };
    out.push(claim(row, "클러스터링 / 외부 저장소", "중간 / 쉬움 (medium / easy)", Needs(Kill, "a replicated and a Redis strategy"), &both, || {
        let flags = |a: Approach| both.iter().filter(|r| r.strategy.approach() == a).map(|r| r.node_store_flags).max();
        let text = format!("{}; every row ran the same `tether node` binary, unchanged", effort(&both));
        (text, matches!((flags(Approach::Clustering), flags(Approach::External)), (Some(c), Some(e)) if c > e))
    }));

    // 적합 규모: what size of fleet.
    let row = "적합 규모 (suitable scale)";
    let clustering = ran.of(ScaleOut, Approach::Clustering);
    out.push(claim(row, "세션 클러스터링", "소~중규모 (small to medium)", Needs(ScaleOut, "a replicated strategy"), &clustering, || {
        let text = lines(&clustering, &|r| format!(
            "{} → {} messages per write at 3 → 4 nodes",
            opt(r.replication_messages_per_write, 2), opt(r.replication_messages_per_write_after_join, 2)
        ));
        // Limited to small fleets only if every replicated strategy's cost per write grows with N.
        let all_grow = clustering.iter().all(|r| {
            matches!((r.replication_messages_per_write, r.replication_messages_per_write_after_join), (Some(a), Some(b)) if b > a + 0.5)
        });
        (text, all_grow)
    }));
    out.push(claim(
        row,
        "세션 클러스터링",
        "복제 비용 기하급수적 증가 (cost grows exponentially with N)",
        Needs(ScaleOut, "a replicated strategy"),
        &clustering,
        || {
            let text = lines(&clustering, &|r| {
                let grew = r.replication_messages_per_write_after_join.unwrap_or(0.0)
                    - r.replication_messages_per_write.unwrap_or(0.0);
                format!("+{grew:.2} messages per write for the 4th node")
            });
            // N−1 messages per write grows by one per node: linear. More than
            // 1.5 per node would be worse than linear.
            let worse = clustering.iter().any(|r| {
                matches!(
                    (r.replication_messages_per_write, r.replication_messages_per_write_after_join),
                    (Some(a), Some(b)) if b - a > 1.5
                )
            });
            (text, worse)
        },
    ));
    let external: Vec<&Row> = ran.get(ScaleOut, Strategy::Redis).into_iter().collect();
    out.push(claim(
        row,
        "외부 세션 저장소",
        "중~대규모 (medium to large)",
        Needs(ScaleOut, "redis"),
        &external,
        || {
            let r = external[0];
            let (a, b) = (
                r.store_round_trips_per_request,
                r.store_round_trips_per_request_after_join,
            );
            let text = format!(
                "{}: {} → {} Redis round trips per request at 3 → 4 nodes",
                r.strategy,
                opt(a, 2),
                opt(b, 2)
            );
            (
                text,
                matches!((a, b), (Some(a), Some(b)) if (b - a).abs() < 0.25),
            )
        },
    ));

    // The pros and cons tables.
    let row = "장단점 (pros and cons)";
    let pair = pair_or_none(
        [Strategy::Local, Strategy::StickyIp]
            .into_iter()
            .filter_map(|s| ran.get(Kill, s))
            .collect(),
    );
    out.push(claim(
        row,
        "Sticky Session",
        "특정 서버에 트래픽 집중 (traffic concentrates)",
        Needs(Kill, "local and sticky-ip"),
        &pair,
        || {
            let text = lines(&pair, &|r| {
                format!("busiest node {:.2}× the mean before the kill", r.imbalance)
            });
            let sticky = pair
                .iter()
                .find(|r| r.strategy == Strategy::StickyIp)
                .map_or(0.0, |r| r.imbalance);
            (text, sticky >= 1.1)
        },
    ));
    let pair = pair_or_none(
        [Strategy::StickyCookie, Strategy::Redis]
            .into_iter()
            .filter_map(|s| ran.get(Kill, s))
            .collect(),
    );
    out.push(claim(row, "외부 세션 저장소", "네트워크 I/O로 인한 약간의 지연 (a little latency)", Needs(Kill, "sticky-cookie and redis"), &pair, || {
        let text = lines(&pair, &|r| format!("p50 {:.2} ms, p99 {:.2} ms, {} store round trips per request", r.p50_ms, r.p99_ms, opt(r.store_round_trips_per_request, 2)));
        let p50 = |s| pair.iter().find(|r| r.strategy == s).map(|r| r.p50_ms);
        (text, matches!((p50(Strategy::StickyCookie), p50(Strategy::Redis)), (Some(m), Some(r)) if r > m))
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: Scenario, strategy: Strategy) -> Row {
        let mut r = Row::new(scenario, strategy);
        r.users = 30;
        r.acknowledged_writes = 90;
        r.requests = 360;
        r
    }

    fn verdict(claims: &[Claim], column: &str, brief: &str) -> Verdict {
        claims
            .iter()
            .find(|c| c.column == column && c.brief.starts_with(brief))
            .unwrap_or_else(|| panic!("no claim {column} / {brief}"))
            .verdict
    }

    #[test]
    fn verdicts_follow_the_figures_they_quote() {
        let mut ip = row(Scenario::Kill, Strategy::StickyIp);
        ip.users_logged_out_after_kill = 10;
        let mut backup = row(Scenario::Kill, Strategy::ReplicatedBackup);
        backup.acknowledged_writes_lost = 0;
        let mut all = row(Scenario::ScaleOut, Strategy::ReplicatedAll);
        all.replication_messages_per_write = Some(2.0);
        all.replication_messages_per_write_after_join = Some(3.0);
        let check = |rows: &[Row], wanted: &[(&str, &str, Verdict)]| {
            let claims = claims(rows);
            for (column, brief, v) in wanted {
                assert_eq!(verdict(&claims, column, brief), *v, "{column} / {brief}");
            }
        };
        use Verdict::*;
        check(
            &[ip.clone(), backup.clone(), all.clone()],
            &[
                ("Sticky Session", "세션 유실", Confirmed),
                ("세션 클러스터링", "복제본으로 복구", Confirmed),
                ("세션 클러스터링", "복제 비용 증가", Confirmed),
                // One message more per node is linear, not exponential.
                ("세션 클러스터링", "복제 비용 기하급수적", Corrected),
                // Not run: not measured, whatever the other rows say.
                ("외부 세션 저장소", "Redis HA", NotMeasured),
            ],
        );
        // The same claims, contradicted by the figures.
        ip.users_logged_out_after_kill = 0;
        backup.users_logged_out = 3;
        all.replication_messages_per_write_after_join = Some(2.0);
        check(
            &[ip, backup, all],
            &[
                ("Sticky Session", "세션 유실", Corrected),
                ("세션 클러스터링", "복제본으로 복구", Corrected),
                ("세션 클러스터링", "복제 비용 증가", Corrected),
            ],
        );
    }

    #[test]
    fn a_skipped_row_measures_nothing() {
        let mut ip = row(Scenario::Kill, Strategy::StickyIp);
        ip.users_logged_out_after_kill = 10;
        ip.skipped = Some("could not start".into());
        let claims = claims(&[ip]);
        assert_eq!(
            verdict(&claims, "Sticky Session", "세션 유실"),
            Verdict::NotMeasured
        );
    }

    #[test]
    fn a_run_that_did_nothing_lost_nothing_and_judges_nothing() {
        // Every login refused: no user, nothing acknowledged, nothing lost.
        let mut backup = row(Scenario::Kill, Strategy::ReplicatedBackup);
        backup.users = 0;
        backup.acknowledged_writes = 0;
        assert_eq!(
            verdict(
                &claims(&[backup.clone()]),
                "세션 클러스터링",
                "복제본으로 복구"
            ),
            Verdict::NotMeasured
        );
        // Users, but every answer after the kill a 503: not recovered.
        backup.users = 30;
        backup.acknowledged_writes = 30;
        backup.failed_after_kill = 200;
        assert_eq!(
            verdict(&claims(&[backup]), "세션 클러스터링", "복제본으로 복구"),
            Verdict::Corrected
        );
    }

    #[test]
    fn answers_land_in_windows_by_when_they_arrived() {
        use tether_testkit::{Seen, Step};
        let t0 = Instant::now();
        let seen = |user, sent_ms: u64, took_ms: u64, status: Option<u16>, out: bool| Seen {
            user,
            at: t0 + Duration::from_millis(sent_ms),
            took: Duration::from_millis(took_ms),
            step: Step::Read,
            status,
            node: Some("A".into()),
            logged_out: out,
        };
        let mut r = row(Scenario::Kill, Strategy::StickyCookie);
        r.events.push(Event {
            at_ms: 250.0,
            what: "B killed".into(),
        });
        let tally = Tally {
            users: 2,
            requests: 4,
            logged_out: 1,
            ..Tally::default()
        };
        let answers = [
            seen(0, 10, 5, Some(200), false),
            // Sent before the kill, answered after it: after.
            seen(1, 240, 30, None, false),
            seen(1, 300, 5, Some(401), true),
            seen(0, 320, 5, Some(200), false),
        ];
        r.answers(&tally, &answers, t0, Duration::from_millis(400));
        assert_eq!(r.timeline.ok, [1, 0, 0, 1, 0]);
        assert_eq!(r.timeline.failed, [0, 0, 1, 0, 0]);
        assert_eq!(r.timeline.logged_out, [0, 0, 0, 1, 0]);
        assert_eq!((r.failed_before_kill, r.failed_after_kill), (0, 1));
        assert_eq!(
            (
                r.users_logged_out_before_kill,
                r.users_logged_out_after_kill
            ),
            (0, 1)
        );
        // From the kill to the end of the last window with trouble.
        assert_eq!(r.disrupted_ms, 150.0);
        assert_eq!(r.failures.get("no answer"), Some(&1));
    }
}
