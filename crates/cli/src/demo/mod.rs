//! `tether demo`: every strategy through what a fleet lives through, measured
//! on this machine.
//!
//! For each scenario and each strategy it starts three `tether node`
//! processes behind a `tether lb` on free loopback ports, with the
//! strategy's store; replays the brief's scenario (log in, then the next
//! page on another server where the policy allows it); logs users in and
//! has them shop at a fixed request rate for a fixed time (reads of
//! `/mypage`, writes to `/cart`, each acknowledged item checked at the
//! end) while the scenario happens:
//!
//! - `kill`: node B is SIGKILLed a third of the way in;
//! - `scale-out`: node D joins, and the balancer learns of it by a reload;
//! - `rolling-restart`: every node is stopped (SIGTERM) and started again in
//!   turn, each back and ready before the next, as a deploy;
//! - `store-outage`: what holds the sessions fails: the Redis master under
//!   Sentinel is SIGKILLed (the Redis strategies; `jwt`'s revocation list),
//!   or two of the three nodes (the others, whose nodes are the store).
//!
//! Every answer is counted per 100 ms window (ok, logged out, failed); then
//! everything it started is stopped. The modules: `workload` (the users
//! and the clock), `scenario` (what happens to the fleet, on
//! [`crate::fleet`]), `measure` (rows and the brief's claims), `render`
//! (the terminal) and [`report`] (the HTML page); `sweep` measures
//! replication cost against cluster size.

mod measure;
mod render;
pub mod report;
mod scenario;
mod sweep;
mod workload;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use measure::{claims, metric, Claim, Event, Row, Timeline, Verdict, WINDOW_MS};
pub use render::{progress_line, render, render_sweep};
pub use sweep::{sweep, SweepRow};

use crate::strategy::Strategy;

/// What happens to a fleet while its users shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    /// A node is SIGKILLed.
    Kill,
    /// A fourth node joins.
    ScaleOut,
    /// Every node is restarted in turn.
    RollingRestart,
    /// The session store fails (Redis master, or two of three nodes).
    StoreOutage,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 4] = [
        Self::Kill,
        Self::ScaleOut,
        Self::RollingRestart,
        Self::StoreOutage,
    ];

    /// What `tether demo` runs without `--scenario`.
    pub const DEFAULT: [Scenario; 2] = [Self::Kill, Self::ScaleOut];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::ScaleOut => "scale-out",
            Self::RollingRestart => "rolling-restart",
            Self::StoreOutage => "store-outage",
        }
    }

    /// What happens, in a few words.
    pub fn title(self) -> &'static str {
        match self {
            Self::Kill => "node B SIGKILLed",
            Self::ScaleOut => "node D joins, the balancer reloads",
            Self::RollingRestart => "every node restarted in turn (SIGTERM, start, ready)",
            Self::StoreOutage => {
                "the store fails: Redis master SIGKILLed under Sentinel, or two of three nodes"
            }
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scenario {s:?}: use {} or all",
                    Self::ALL.map(Self::name).join(", ")
                )
            })
    }
}

impl serde::Serialize for Scenario {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Virtual users per run.
    pub users: usize,
    /// Requests per second, all users together.
    pub rate: u32,
    /// How long the users shop in the `kill` and `scale-out` scenarios (the
    /// others run until their operations are done and the fleet served a
    /// second more).
    pub duration: Duration,
    /// The scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// An existing Redis to use instead of a private `redis-server` (not
    /// for `store-outage`, which kills its own).
    pub redis_url: Option<String>,
    /// Only these strategies (all when empty).
    pub only: Vec<Strategy>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            users: 100,
            rate: 400,
            duration: Duration::from_secs(3),
            scenarios: Scenario::DEFAULT.to_vec(),
            redis_url: None,
            only: Vec::new(),
        }
    }
}

impl DemoConfig {
    /// The strategies to run, in the brief's order.
    pub fn strategies(&self) -> Vec<Strategy> {
        Strategy::ALL
            .into_iter()
            .filter(|s| self.only.is_empty() || self.only.contains(s))
            .collect()
    }

    /// When the scenario's event comes: a third of the way in, so the
    /// timeline shows the fleet before, during and after.
    pub fn event_at(&self) -> Duration {
        self.duration / 3
    }

    /// How long a run of `scenario` for `strategy` is expected to take,
    /// fleet start and checks included (what this machine measured): what
    /// the progress bar's time left is made of.
    fn planned(&self, scenario: Scenario, strategy: Strategy) -> Duration {
        let overhead = Duration::from_millis(400);
        let s = Duration::from_secs_f64;
        let after_event = |d: f64| self.duration.max(self.event_at() + s(d));
        overhead
            + match scenario {
                Scenario::Kill => self.duration,
                Scenario::ScaleOut => after_event(1.5),
                // Three restarts of a second or more, then a second.
                Scenario::RollingRestart if strategy.is_replicated() => after_event(6.0),
                Scenario::RollingRestart => after_event(4.6),
                // A Sentinel set to start, a failover to wait for, a quiet second.
                Scenario::StoreOutage if strategy.needs_redis() || strategy == Strategy::Jwt => {
                    after_event(4.5) + s(6.0)
                }
                Scenario::StoreOutage => after_event(1.3),
            }
    }
}

/// Where a run is, for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Runs finished.
    pub done: usize,
    /// Runs in all.
    pub total: usize,
    /// The run under way (`scenario / strategy`), if any.
    pub current: String,
    /// Since the demo started.
    pub elapsed: Duration,
    /// The estimated time left.
    pub left: Duration,
}

/// The progress of a demo, shared with whoever draws it.
#[derive(Clone)]
pub struct Tracker(Arc<Mutex<TrackerState>>);

struct TrackerState {
    started: Instant,
    run_started: Instant,
    done: usize,
    total: usize,
    current: String,
    planned_done: Duration,
    planned_current: Duration,
    planned_total: Duration,
}

impl Tracker {
    fn new(total: usize, planned_total: Duration) -> Self {
        let now = Instant::now();
        Self(Arc::new(Mutex::new(TrackerState {
            started: now,
            run_started: now,
            done: 0,
            total,
            current: String::new(),
            planned_done: Duration::ZERO,
            planned_current: Duration::ZERO,
            planned_total,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(&self, current: String, planned: Duration) {
        let mut s = self.lock();
        s.current = current;
        s.run_started = Instant::now();
        s.planned_current = planned;
    }

    fn end(&self) {
        let mut s = self.lock();
        s.done += 1;
        let planned = s.planned_current;
        s.planned_done += planned;
        s.planned_current = Duration::ZERO;
        s.current.clear();
    }

    /// Where the demo is now. The time left is the plan still ahead, scaled
    /// by how the finished runs compared with their plan on this machine.
    pub fn now(&self) -> Progress {
        let s = self.lock();
        let elapsed = s.started.elapsed();
        let finished = elapsed.saturating_sub(s.run_started.elapsed());
        let pace = if s.planned_done.is_zero() {
            1.0
        } else {
            finished.as_secs_f64() / s.planned_done.as_secs_f64()
        };
        let ahead = s.planned_total.saturating_sub(s.planned_done);
        let left = ahead.mul_f64(pace).saturating_sub(s.run_started.elapsed());
        Progress {
            done: s.done,
            total: s.total,
            current: s.current.clone(),
            elapsed,
            left,
        }
    }
}

/// Runs every scenario for every strategy, in order; `tracker` is called
/// once with the handle to follow the progress with.
pub async fn run(bin: &Path, config: &DemoConfig, tracker: impl FnOnce(Tracker)) -> Vec<Row> {
    let strategies = config.strategies();
    let runs: Vec<(Scenario, Strategy)> = config
        .scenarios
        .iter()
        .flat_map(|sc| strategies.iter().map(move |st| (*sc, *st)))
        .collect();
    let planned_total = runs.iter().map(|(sc, st)| config.planned(*sc, *st)).sum();
    let progress = Tracker::new(runs.len(), planned_total);
    tracker(progress.clone());
    let mut redis = scenario::SharedRedis::new(config.redis_url.clone());
    let mut rows = Vec::new();
    for (sc, st) in runs {
        progress.begin(format!("{sc} / {st}"), config.planned(sc, st));
        rows.push(scenario::run(bin, config, sc, st, &mut redis).await);
        progress.end();
    }
    rows
}

/// Where this executable is, to start nodes and balancers from it.
///
/// # Errors
/// If the OS cannot say.
pub fn this_binary() -> std::io::Result<PathBuf> {
    std::env::current_exe()
}
