//! One run: a strategy's fleet and balancer, its users, and what the
//! scenario does to the fleet while they shop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tether_testkit::{eventually, RedisSentinels, RedisServer};

use super::measure::{redis_command, redis_round_trips, Event, Row, Snapshot};
use super::workload::{self, Shopping};
use super::{DemoConfig, Scenario};
use crate::fleet::{balancer, Fleet, READY_WITHIN};
use crate::strategy::Strategy;

/// The Redis the Redis strategies share in the scenarios that do not kill
/// it: the one `--redis-url` names, or a private `redis-server` started on
/// first use.
pub(crate) struct SharedRedis {
    url: Option<String>,
    private: Option<Result<RedisServer, String>>,
}

impl SharedRedis {
    pub(crate) fn new(url: Option<String>) -> Self {
        Self { url, private: None }
    }

    async fn url(&mut self) -> Result<String, String> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        if self.private.is_none() {
            self.private = Some(RedisServer::start().await.map_err(|e| e.to_string()));
        }
        match self.private.as_ref() {
            Some(Ok(r)) => Ok(r.url()),
            Some(Err(e)) => Err(e.clone()),
            None => unreachable!("started above"),
        }
    }
}

/// What a run's Redis is.
enum Backing {
    /// The strategy needs none.
    None,
    /// The shared one: its statistics can be reset and read.
    Shared(String),
    /// A Sentinel set of its own, for the outage.
    Sentinel(Box<RedisSentinels>),
}

impl Backing {
    fn url(&self) -> Option<String> {
        match self {
            Self::None => None,
            Self::Shared(url) => Some(url.clone()),
            Self::Sentinel(s) => Some(s.url()),
        }
    }

    /// Processes it takes besides the nodes and the balancer.
    fn processes(&self) -> usize {
        match self {
            Self::None => 0,
            Self::Shared(_) => 1,
            // A master, a replica and three sentinels.
            Self::Sentinel(_) => 5,
        }
    }
}

/// Runs `strategy` through `scenario`; a run that cannot start or breaks
/// down says why in `skipped`.
pub(crate) async fn run(
    bin: &Path,
    config: &DemoConfig,
    scenario: Scenario,
    strategy: Strategy,
    redis: &mut SharedRedis,
) -> Row {
    let mut row = Row::new(scenario, strategy);
    if let Err(why) = attempt(bin, config, &mut row, redis).await {
        row.skipped = Some(why);
    }
    row
}

fn event(shopping: &Shopping, what: impl Into<String>) -> Event {
    Event {
        at_ms: shopping.now().as_secs_f64() * 1e3,
        what: what.into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sessions each running node holds (`None`: not in the node's own store).
async fn held(fleet: &Fleet) -> BTreeMap<String, Option<u64>> {
    fleet
        .stats()
        .await
        .into_iter()
        .map(|(id, s)| (id, s["sessions"].as_u64()))
        .collect()
}

async fn attempt(
    bin: &Path,
    config: &DemoConfig,
    row: &mut Row,
    redis: &mut SharedRedis,
) -> Result<(), String> {
    let (scenario, strategy) = (row.scenario, row.strategy);
    let outage = scenario == Scenario::StoreOutage;
    let mut backing = match (strategy.needs_redis(), strategy == Strategy::Jwt) {
        // The outage kills a master: a Sentinel set of the run's own. For
        // `jwt` it holds the revocation list, the one store jwt can have.
        (true, _) | (_, true) if outage => Backing::Sentinel(Box::new(
            RedisSentinels::start("tether-demo")
                .await
                .map_err(|e| format!("no Redis Sentinel set: {e}"))?,
        )),
        (true, _) => Backing::Shared(redis.url().await?),
        _ => Backing::None,
    };
    if let (Backing::Sentinel(_), Strategy::Jwt) = (&backing, strategy) {
        row.note = format!("{}; revocations checked in Redis under Sentinel", row.note);
    }
    row.extra_processes = backing.processes();
    let mut fleet = Fleet::start(bin, strategy, &["A", "B", "C"], backing.url()).await?;
    row.node_store_flags = fleet.store_flags();
    let lb = balancer(bin, fleet.dir(), strategy, &fleet.backends()).await?;
    let base = lb.url("");
    (
        row.login_node,
        row.next_node,
        row.still_logged_in_after_switch,
    ) = workload::log_in_then_next_page(&base).await;
    let (users, failed) = workload::log_in(&base, config.users).await;
    row.users_failed_login = failed.len();
    row.login_failures = failed.into_iter().take(5).collect();

    // Counters from here on are the workload's.
    let stats_url = match &backing {
        Backing::Shared(url) => Some(url.clone()),
        _ => None,
    };
    if let Some(url) = &stats_url {
        redis_command(url, &["CONFIG", "RESETSTAT"]).await;
    }
    let start = Snapshot::take(&fleet).await;
    let shopping = Shopping::start(users, config.rate);
    let t0 = shopping.t0();
    let event_at = config.event_at();
    shopping.until(event_at).await;
    row.sessions_per_node = held(&fleet).await;
    // Three nodes serving, nothing happened yet: the steady state's costs.
    let at_event = Snapshot::take(&fleet).await;
    let t_event = shopping.now();

    // What the scenario does; `join` keeps the counters when the fleet
    // grew (scale-out), to tell the cost at 3 nodes from the cost at 4.
    let mut join = None;
    match scenario {
        Scenario::Kill => {
            row.events.push(event(&shopping, "B killed (SIGKILL)"));
            fleet.kill("B").await?;
            shopping.until(config.duration).await;
        }
        Scenario::ScaleOut => {
            let calls3 = redis_calls(stats_url.as_deref()).await;
            let (t3, joining) = (shopping.now(), Instant::now());
            row.events.push(event(&shopping, "D starts"));
            fleet.add("D");
            fleet.boot("D").await?;
            fleet.wait_ready().await?;
            row.join_ms = Some(ms(joining.elapsed()));
            lb.balance(&fleet.backends(), READY_WITHIN)
                .await
                .map_err(|e| e.to_string())?;
            row.events.push(event(&shopping, "D in the balancer"));
            let (t4, at4) = (shopping.now(), Snapshot::take(&fleet).await);
            let calls4 = redis_calls(stats_url.as_deref()).await;
            if strategy.is_replicated() {
                row.transfer_bytes = Some(at4.since(&at_event).transfer_bytes as u64);
            }
            // A second of four nodes serving, at the least.
            shopping
                .until(config.duration.max(t4 + Duration::from_secs(1)))
                .await;
            join = Some(Join {
                t3,
                calls3,
                t4,
                at4,
                calls4,
            });
        }
        Scenario::RollingRestart => {
            let deploy = Instant::now();
            for id in ["A", "B", "C"] {
                row.events
                    .push(event(&shopping, format!("{id} stops (SIGTERM)")));
                fleet.stop(id).await?;
                fleet.boot(id).await?;
                fleet.wait_ready().await?;
                lb.wait_up(&fleet.backends(), READY_WITHIN)
                    .await
                    .map_err(|e| e.to_string())?;
                row.events.push(event(&shopping, format!("{id} back")));
            }
            row.deploy_ms = Some(ms(deploy.elapsed()));
            shopping
                .until(config.duration.max(shopping.now() + Duration::from_secs(1)))
                .await;
        }
        Scenario::StoreOutage => {
            if let Backing::Sentinel(set) = &mut backing {
                let old = set.master_port().await;
                row.events
                    .push(event(&shopping, "Redis master killed (SIGKILL)"));
                set.master.stop().await;
                let failing = Instant::now();
                let set = &*set;
                eventually(
                    Duration::from_secs(30),
                    "Sentinel to promote the replica",
                    || async { (set.master_port().await? != old?).then_some(()) },
                )
                .await
                .map_err(|e| e.to_string())?;
                row.failover_ms = Some(ms(failing.elapsed()));
                row.events
                    .push(event(&shopping, "Sentinel promoted the replica"));
            } else {
                // The nodes are the store: two of three go at once.
                row.events
                    .push(event(&shopping, "B and C killed (SIGKILL)"));
                fleet.kill_together(&["B", "C"]).await?;
            }
            // Until the users have been served without a failure for a
            // second (or 20 s passed): the outage, then the recovery.
            shopping
                .quiet_for(Duration::from_secs(1), Duration::from_secs(20))
                .await;
            shopping.until(config.duration).await;
        }
    }
    let took = shopping.stop();
    // The workload's counters, not the final check's writes.
    let end = Snapshot::take(&fleet).await;
    let calls_end = redis_calls(stats_url.as_deref()).await;
    let (tally, seen) = shopping.check().await?;
    row.answers(&tally, &seen, t0, took);

    let requests = |from: Duration, to: Duration| {
        seen.iter()
            .filter(|s| (from..to).contains(&s.at.saturating_duration_since(t0)))
            .count()
            .max(1) as f64
    };
    let whole = Duration::from_secs(u64::MAX >> 2);
    // At three nodes, before the event.
    let three = at_event.since(&start);
    if strategy.is_replicated() {
        row.replication_messages_per_write = three.messages_per_write();
        row.replication_bytes_per_write = three.bytes_per_write();
        // Hops to the owner on another node, before the event: a killed or
        // restarted node's count dies with its process.
        row.store_round_trips_per_request =
            Some(three.forwarded / requests(Duration::ZERO, t_event));
    } else if let Some(calls) = calls_end {
        row.store_round_trips_per_request = Some(calls / requests(Duration::ZERO, whole));
    } else if matches!(backing, Backing::None) {
        row.store_round_trips_per_request = Some(0.0);
    }
    if let Some(j) = &join {
        let (at3, at4) = (requests(Duration::ZERO, j.t3), requests(j.t4, whole));
        if strategy.is_replicated() {
            row.replication_messages_per_write_after_join = end.since(&j.at4).messages_per_write();
            row.store_round_trips_per_request = Some(three.forwarded / at3);
            row.store_round_trips_per_request_after_join = Some(end.since(&j.at4).forwarded / at4);
        } else if let (Some(c3), Some(c4), Some(end)) = (j.calls3, j.calls4, calls_end) {
            row.store_round_trips_per_request = Some(c3 / at3);
            row.store_round_trips_per_request_after_join = Some((end - c4) / at4);
        } else if matches!(backing, Backing::None) {
            row.store_round_trips_per_request_after_join = Some(0.0);
        }
        row.new_node_share = Some(Row::share_since(&seen, t0, "D", ms(j.t4)));
    }
    row.session_bytes_per_node = fleet
        .stats()
        .await
        .into_iter()
        .filter(|(_, s)| s["sessions"].is_number())
        .map(|(id, s)| (id, s["session_bytes"].as_u64().unwrap_or(0)))
        .collect();
    Ok(())
}

/// The counters when a fourth node joined.
struct Join {
    /// When D began to join, from the users' start.
    t3: Duration,
    calls3: Option<f64>,
    /// When the balancer sent D its first requests.
    t4: Duration,
    at4: Snapshot,
    calls4: Option<f64>,
}

/// Commands clients sent to the shared Redis so far (`None`: no such Redis).
async fn redis_calls(url: Option<&str>) -> Option<f64> {
    redis_round_trips(url?).await
}
