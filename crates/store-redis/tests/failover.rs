//! Sentinel and Cluster failover with real processes: a master is killed
//! with SIGKILL and sessions must be readable again through the store.

use std::time::{Duration, Instant};

use tether_core::testing::record_with;
use tether_core::{Delta, Load, Record, SessionId, SessionStore, Timestamp};
use tether_redis::RedisStore;
use tether_testkit::{eventually, RedisCluster, RedisSentinels};

async fn readable(store: &RedisStore, id: &SessionId) -> Option<Record> {
    store
        .load(id, Load::at(Timestamp::now()))
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_acknowledged_sessions() {
    let mut set = RedisSentinels::start("tethermaster").await.unwrap();
    // WAIT 1: a login is acknowledged only once the replica has it.
    let store = RedisStore::open(&set.url())
        .unwrap()
        .with_wait(1, Duration::from_secs(2));
    let now = Timestamp::now();
    let r = record_with(now, &[("loginMember", "7")]);
    store.create(&r).await.unwrap();
    assert!(readable(&store, &r.id).await.is_some());
    let old_master = set.master.port();

    set.master.stop().await;
    let killed = Instant::now();
    // Requests during the outage fail as Unavailable (HTTP 503), never as
    // "no session" (a silent logout).
    let refused = std::sync::atomic::AtomicU32::new(0);
    let back = eventually(
        Duration::from_secs(30),
        "the session through the new master",
        || async {
            match store.load(&r.id, Load::at(Timestamp::now())).await {
                Ok(Some(rec)) => Some(rec),
                Ok(None) => panic!("the session was reported missing during failover"),
                Err(e) => {
                    assert!(e.is_unavailable(), "{e:?}");
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    None
                }
            }
        },
    )
    .await
    .unwrap();
    let outage = killed.elapsed();
    eprintln!(
        "sentinel failover: session readable again after {outage:?} ({} refused attempts)",
        refused.into_inner()
    );
    assert_eq!(back.attributes["loginMember"].get(), "7");
    assert_ne!(
        set.master_port().await,
        Some(old_master),
        "sentinel did not promote the replica"
    );
    // The new master has no replica: a write cannot be promised as
    // configured, and is refused (503) rather than acknowledged.
    let mut d = Delta::default();
    d.set("after", tether_core::testing::json("true"));
    let refused = store.apply(&r.id, &d, Timestamp::now()).await.unwrap_err();
    assert!(refused.is_unavailable(), "{refused:?}");
    // The old master comes back; Sentinel makes it the new master's
    // replica, and writes are acknowledged again.
    set.master.restart().await.unwrap();
    eventually(
        Duration::from_secs(30),
        "a write acknowledged by the returning replica",
        || async {
            let fresh = record_with(Timestamp::now(), &[("n", "1")]);
            store.create(&fresh).await.ok()
        },
    )
    .await
    .unwrap();
    assert!(store
        .apply(&r.id, &d, Timestamp::now())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_sessions_rotates_and_survives_a_master_kill() {
    let mut cluster = RedisCluster::start(3).await.unwrap();
    let store = RedisStore::open(&cluster.url())
        .unwrap()
        .with_wait(1, Duration::from_secs(2));
    let mut ids = Vec::new();
    for i in 0..60 {
        let r = record_with(Timestamp::now(), &[("n", &i.to_string())]);
        store.create(&r).await.unwrap();
        ids.push(r.id);
    }
    // Spread: every master holds some.
    for m in cluster.masters().await {
        let mut c = cluster.nodes[m].connect().await.unwrap();
        let n: u64 = tether_testkit::redis_client::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(n > 0, "master {m} holds no sessions");
    }
    // Rotation across slots.
    let new = SessionId::random();
    let mut d = Delta::default();
    d.set("loginMember", tether_core::testing::json("9"));
    let v = store
        .rotate(&ids[0], &new, &d, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(v, Some(2));
    assert!(readable(&store, &ids[0]).await.is_none());
    assert_eq!(
        readable(&store, &new).await.unwrap().attributes["loginMember"].get(),
        "9"
    );
    ids[0] = new;

    // Kill one master.
    let victim = cluster.masters().await[0];
    cluster.nodes[victim].stop().await;
    let killed = Instant::now();
    cluster.wait_ok().await.unwrap();
    eventually(
        Duration::from_secs(30),
        "every session readable after failover",
        || async {
            for id in &ids {
                readable(&store, id).await?;
            }
            Some(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "cluster failover: all sessions readable again after {:?}",
        killed.elapsed()
    );
    for (i, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(
            readable(&store, id).await.unwrap().attributes["n"].get(),
            i.to_string()
        );
    }
}

/// What [`lagging_replica_then_master_kill`] saw.
#[derive(Debug, Default)]
struct Outcome {
    /// Writes answered as done.
    acked: usize,
    /// Acknowledged writes missing at the end.
    lost: usize,
    /// Writes answered 503 (not promised).
    refused: usize,
}

/// 16 writers each add unique attributes to their own session without
/// pause; the replica's replication link is cut (its own loopback source
/// address, dropped by the firewall; the sentinels still reach it) for half
/// a second, so it lags, then the master is SIGKILLed and the cut heals
/// once Sentinel promoted the replica, which misses the last half second. (Stopping the replica with SIGSTOP does not make
/// it lag reliably: the kernel keeps receiving the replication stream for
/// it, and it catches up when continued.) Every acknowledged write is
/// recorded and checked at the end through a fresh store (no cache).
async fn lagging_replica_then_master_kill(
    name: &str,
    replica_ip: [u8; 4],
    configure: fn(RedisStore) -> RedisStore,
) -> Outcome {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let ip = std::net::IpAddr::from(replica_ip).to_string();
    let mut set = RedisSentinels::start_with_replica(
        name,
        &[
            "--bind",
            "127.0.0.1",
            &ip,
            "--bind-source-addr",
            &ip,
            // Sentinels reach it on 127.0.0.1, which the cut spares.
            "--replica-announce-ip",
            "127.0.0.1",
        ],
    )
    .await
    .unwrap();
    let store = Arc::new(configure(RedisStore::open(&set.url()).unwrap()));
    let mut ids = Vec::new();
    for _ in 0..16 {
        let r = record_with(Timestamp::now(), &[]);
        eventually(Duration::from_secs(10), "a session created", || async {
            store.create(&r).await.ok()
        })
        .await
        .unwrap();
        ids.push(r.id);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for id in ids.clone() {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut d = Delta::default();
                d.set(format!("i{n}"), tether_core::testing::json(&n.to_string()));
                match store.apply(&id, &d, Timestamp::now()).await {
                    Ok(Some(_)) => acked.push(n),
                    Ok(None) => panic!("session {id} vanished: an acknowledged creation lost"),
                    Err(e) => {
                        assert!(e.is_unavailable(), "{e:?}");
                        refused += 1;
                        // A failing store answers at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (id, acked, refused)
        }));
    }
    // Let writes flow, then make the replica lag and kill the master.
    let flowing = Instant::now();
    eventually(Duration::from_secs(10), "writes flowing", || async {
        (flowing.elapsed() > Duration::from_millis(500)).then_some(())
    })
    .await
    .unwrap();
    let cut = tether_testkit::Isolation::isolate(replica_ip.into()).unwrap();
    let stopped = Instant::now();
    eventually(Duration::from_secs(5), "half a second of lag", || async {
        (stopped.elapsed() > Duration::from_millis(500)).then_some(())
    })
    .await
    .unwrap();
    let old_master = set.master.port();
    set.master.stop().await;
    // The link stays cut until the replica is promoted: the dead master's
    // kernel would otherwise deliver what it still had queued.
    eventually(Duration::from_secs(30), "the replica promoted", || async {
        (set.master_port().await != Some(old_master)).then_some(())
    })
    .await
    .unwrap();
    drop(cut);
    // Writes go on through the new master for a while, then stop.
    let promoted = Instant::now();
    eventually(Duration::from_secs(10), "writes after failover", || async {
        (promoted.elapsed() > Duration::from_secs(1)).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let check = RedisStore::open(&set.url()).unwrap();
    let mut outcome = Outcome::default();
    for w in writers {
        let (id, acked, refused) = w.await.unwrap();
        outcome.refused += refused;
        outcome.acked += acked.len();
        let back = eventually(Duration::from_secs(10), "the session read back", || async {
            check.load(&id, Load::at(Timestamp::now())).await.ok()
        })
        .await
        .unwrap();
        let Some(back) = back else {
            outcome.lost += acked.len();
            continue;
        };
        outcome.lost += acked
            .iter()
            .filter(|n| !back.attributes.contains_key(&format!("i{n}")))
            .count();
    }
    outcome
}

/// The reproduction: without `WAIT`, the half second the replica
/// missed is lost although every write in it was acknowledged. This is the
/// control for the next test (the scenario does endanger writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_a_lagging_replica_loses_acknowledged_writes() {
    let o = lagging_replica_then_master_kill("lagplain", [127, 0, 79, 1], |s| s).await;
    eprintln!("no WAIT: {o:?}");
    assert!(o.acked > 0, "{o:?}");
    assert!(
        o.lost > 0,
        "the lag lost nothing: the scenario did not happen {o:?}"
    );
}

/// With `WAIT 1` on every write a write the replica did not confirm is
/// answered 503, never acknowledged: nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_a_lagging_replica_loses_no_acknowledged_write() {
    let o = lagging_replica_then_master_kill("lagwait", [127, 0, 79, 2], |s| {
        s.with_wait(1, Duration::from_millis(100))
            .with_near_cache(1000, 1 << 20)
    })
    .await;
    eprintln!("WAIT 1 100 ms: {o:?}");
    assert!(o.acked > 0 && o.refused > 0, "{o:?}");
    assert_eq!(o.lost, 0, "{o:?}");
}
