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
    // Writes work on the new master.
    let mut d = Delta::default();
    d.set("after", tether_core::testing::json("true"));
    assert!(store
        .apply(&r.id, &d, Timestamp::now())
        .await
        .unwrap()
        .is_some());
    let fresh = record_with(Timestamp::now(), &[("n", "1")]);
    store.create(&fresh).await.unwrap();
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
