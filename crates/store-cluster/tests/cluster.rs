//! `ClusterStore` on live three-node clusters in this process: real TCP
//! replication and real gossip over loopback.

use std::time::Duration;

use tether_cluster::{Ack, ClusterConfig, ClusterStore, Replication};
use tether_core::testing::record_with;
use tether_core::{Delta, Load, SessionStore, Timestamp};
use tether_testkit::eventually;

const SECRET: &[u8] = b"test-cluster-secret";

async fn node(id: &str, seeds: &[std::net::SocketAddr], replication: Replication) -> ClusterStore {
    let mut config = ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap(), SECRET);
    config.seeds = seeds.iter().map(ToString::to_string).collect();
    config.replication = replication;
    ClusterStore::start(config).await.unwrap()
}

/// Three nodes that all see each other and are ready.
async fn cluster(replication: Replication) -> (ClusterStore, ClusterStore, ClusterStore) {
    let a = node("A", &[], replication).await;
    let b = node("B", &[a.addr()], replication).await;
    let c = node("C", &[a.addr()], replication).await;
    for n in [&a, &b, &c] {
        eventually(
            Duration::from_secs(20),
            "three live nodes, ready",
            || async { (n.live_nodes().len() == 3 && n.is_ready()).then_some(()) },
        )
        .await
        .unwrap();
    }
    (a, b, c)
}

async fn backup_fixture() -> (ClusterStore, (ClusterStore, ClusterStore)) {
    let (a, b, c) = cluster(Replication::Backup(1)).await;
    (a, (b, c))
}

mod backup_mode {
    use super::*;
    tether_core::store_conformance!(backup_fixture());
}

async fn all_fixture() -> (ClusterStore, (ClusterStore, ClusterStore)) {
    let (a, b, c) = cluster(Replication::All).await;
    (a, (b, c))
}

mod all_mode {
    use super::*;
    tether_core::store_conformance!(all_fixture());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_every_session_and_writes_reach_the_backups() {
    let (a, b, c) = cluster(Replication::Backup(1)).await;
    let now = Timestamp::now();
    let mut ids = Vec::new();
    for i in 0..30 {
        let r = record_with(now, &[("n", &i.to_string())]);
        a.create(&r).await.unwrap();
        ids.push(r.id);
    }
    for store in [&a, &b, &c] {
        for id in &ids {
            assert!(store.load(id, Load::at(now)).await.unwrap().is_some());
        }
    }
    // Each session is held by exactly two nodes: owner and one backup.
    let held: usize = [&a, &b, &c]
        .iter()
        .map(|s| s.holdings().0 + s.holdings().1)
        .sum();
    assert_eq!(held, 60);
    let mut d = Delta::default();
    d.set("x", tether_core::testing::json("1"));
    b.apply(&ids[0], &d, now).await.unwrap().unwrap();
    let writes: u64 = [&a, &b, &c]
        .iter()
        .map(|s| {
            s.metrics()
                .writes
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(writes, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposed_ids_are_owned_by_the_proposing_node() {
    let (a, b, _c) = cluster(Replication::Backup(1)).await;
    for store in [&a, &b] {
        let live = store.live_nodes();
        for _ in 0..20 {
            let id = store.propose_id();
            let owner = tether_core::placement::owner(id.as_bytes(), &live).unwrap();
            assert_eq!(
                Some(owner.as_str()),
                store
                    .live_nodes()
                    .iter()
                    .find(|n| *n == owner)
                    .map(String::as_str)
            );
        }
    }
    let id = a.propose_id();
    assert_eq!(
        tether_core::placement::owner(id.as_bytes(), &a.live_nodes()).unwrap(),
        "A"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_with_the_wrong_secret_cannot_join_or_write() {
    let (a, _b, _c) = cluster(Replication::Backup(1)).await;
    let mut config = ClusterConfig::new("X", "127.0.0.1:0".parse().unwrap(), b"wrong".to_vec());
    config.seeds = vec![a.addr().to_string()];
    let stranger = ClusterStore::start(config).await.unwrap();
    let r = record_with(Timestamp::now(), &[("a", "1")]);
    // Its own view has only itself, so it keeps the session to itself…
    let _ = stranger.create(&r).await;
    // …and it never appears in the cluster.
    assert!(!a.live_nodes().contains(&"X".to_string()));
    assert!(a
        .load(&r.id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_the_connection_not_the_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, _b, _c) = cluster(Replication::Backup(1)).await;
    for payload in [
        b"\x00\x00\x00\x05hello".to_vec(),
        // A length prefix of 2 GiB: over the frame limit.
        b"\x7f\xff\xff\xffxxxx".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut s = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
        s.write_all(&payload).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    }
    // Still serving.
    let r = record_with(Timestamp::now(), &[("a", "1")]);
    a.create(&r).await.unwrap();
    assert!(a
        .load(&r.id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .is_some());
    let _ = Ack::Sync;
}
