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
    let writes: u64 = [&a, &b, &c].iter().map(|s| s.metrics().writes).sum();
    assert_eq!(writes, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposed_ids_are_owned_by_the_proposing_node() {
    let (a, b, _c) = cluster(Replication::Backup(1)).await;
    for store in [&a, &b] {
        let live = store.live_nodes();
        for _ in 0..20 {
            let id = store.propose_id();
            let owner = tether_core::placement::session_owner(&id, &live).unwrap();
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
        tether_core::placement::session_owner(&id, &a.live_nodes()).unwrap(),
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

/// A partition, made by the kernel's firewall around node C's address.
///
/// What happens, by design (there is no quorum):
/// - during the partition the majority side (A, B) serves C's sessions from
///   their backups and accepts writes to them; C, alone, serves and writes
///   its own sessions too (split brain);
/// - after healing, each session converges to one copy: the higher version
///   wins, and at equal versions the later write. The other side's writes to
///   that session are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_splits_the_brain_and_healing_converges() {
    let ip = |n: u8| -> std::net::IpAddr { [127, 0, 77, n].into() };
    let start = |id: &'static str, n: u8, seed: Option<std::net::SocketAddr>| async move {
        let mut config = ClusterConfig::new(id, std::net::SocketAddr::new(ip(n), 0), SECRET);
        config.seeds = seed.iter().map(ToString::to_string).collect();
        config.anti_entropy_interval = Duration::from_millis(500);
        ClusterStore::start(config).await.unwrap()
    };
    let a = start("A", 1, None).await;
    let b = start("B", 2, Some(a.addr())).await;
    let c = start("C", 3, Some(a.addr())).await;
    let see = |n: &ClusterStore, count: usize| {
        let live = n.live_nodes().len();
        async move { (live == count).then_some(()) }
    };
    for n in [&a, &b, &c] {
        eventually(Duration::from_secs(20), "three live nodes", || see(n, 3))
            .await
            .unwrap();
        eventually(Duration::from_secs(20), "ready", || async {
            n.is_ready().then_some(())
        })
        .await
        .unwrap();
    }
    // A session owned by C.
    let id = c.propose_id();
    let r = tether_core::Record {
        id,
        ..record_with(Timestamp::now(), &[("side", "\"before\"")])
    };
    c.create(&r).await.unwrap();

    let cut = tether_testkit::Isolation::isolate(ip(3)).unwrap();
    for (n, count) in [(&a, 2), (&b, 2), (&c, 1)] {
        eventually(Duration::from_secs(30), "the partition noticed", || {
            see(n, count)
        })
        .await
        .unwrap();
    }
    // Both sides read and write the session.
    let from_backup = a
        .load(&id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .expect("majority serves it from the backup");
    assert_eq!(from_backup.attributes["side"].get(), "\"before\"");
    let mut d = Delta::default();
    d.set("side", tether_core::testing::json("\"majority\""));
    assert!(a.apply(&id, &d, Timestamp::now()).await.unwrap().is_some());
    let mut d = Delta::default();
    d.set("side", tether_core::testing::json("\"minority\""));
    assert!(c
        .apply(&id, &d, Timestamp(Timestamp::now().0 + 1))
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        c.load(&id, Load::at(Timestamp::now()))
            .await
            .unwrap()
            .unwrap()
            .attributes["side"]
            .get(),
        "\"minority\""
    );

    cut.heal();
    for n in [&a, &b, &c] {
        eventually(Duration::from_secs(30), "the partition healed", || {
            see(n, 3)
        })
        .await
        .unwrap();
    }
    // The owner and its backup hold one and the same copy again: equal
    // versions, so the later write (the minority's) won; every node answers it.
    let converged = eventually(
        Duration::from_secs(30),
        "one copy of the session",
        || async {
            let copies: Vec<_> = [&a, &b, &c]
                .iter()
                .filter_map(|n| n.local_copy(&id))
                .map(|r| (r.version, r.attributes["side"].get().to_string()))
                .collect();
            (copies.len() == 2 && copies[0] == copies[1]).then(|| copies[0].clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(converged, (2, "\"minority\"".to_string()));
    for n in [&a, &b, &c] {
        let r = n
            .load(&id, Load::at(Timestamp::now()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.attributes["side"].get(), "\"minority\"");
    }
}

/// Regression (found in review): a rebalance re-sent copies taken before a
/// delete, bringing logged-out sessions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_sessions_stay_deleted_when_a_node_joins() {
    let (a, _b, _c) = cluster(Replication::Backup(1)).await;
    let now = Timestamp::now();
    let mut ids = Vec::new();
    for _ in 0..300 {
        let r = record_with(now, &[("a", "1")]);
        a.create(&r).await.unwrap();
        ids.push(r.id);
    }
    // A node joins (every node rebalances) while the sessions are deleted.
    let seeds = [a.addr()];
    let d = node("D", &seeds, Replication::Backup(1));
    let deleting = async {
        for id in &ids {
            a.delete(id).await.unwrap();
        }
    };
    let (d, ()) = tokio::join!(d, deleting);
    eventually(Duration::from_secs(20), "four live nodes", || async {
        (a.live_nodes().len() == 4 && d.is_ready()).then_some(())
    })
    .await
    .unwrap();
    for store in [&a, &d] {
        for id in &ids {
            assert!(
                store
                    .load(id, Load::at(Timestamp::now()))
                    .await
                    .unwrap()
                    .is_none(),
                "a deleted session came back"
            );
        }
    }
}

#[tokio::test]
async fn a_session_limit_that_cannot_fit_a_frame_is_refused_at_start() {
    let mut config = ClusterConfig::new("A", "127.0.0.1:0".parse().unwrap(), SECRET);
    config.max_size = 2 * 1024 * 1024;
    let err = ClusterStore::start(config).await.unwrap_err().to_string();
    assert!(err.contains("frame limit"), "{err}");
}

/// A stranger that learned the cluster ID (it travels in every gossip
/// datagram) but not the secret cannot announce itself as a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_gossip_is_ignored() {
    use hmac::{Hmac, KeyInit, Mac};
    let (a, _b, _c) = cluster(Replication::Backup(1)).await;
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
    mac.update(b"tether-cluster-id");
    let sniffed_id: String = mac.finalize().into_bytes()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let port = tether_testkit::free_port().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = chitchat::ChitchatConfig {
        chitchat_id: chitchat::ChitchatId::new("intruder".into(), 1, listen),
        cluster_id: sniffed_id,
        gossip_interval: Duration::from_millis(50),
        listen_addr: listen,
        seed_nodes: vec![a.addr().to_string()],
        failure_detector_config: Default::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let _intruder = chitchat::spawn_chitchat(
        config,
        vec![("repl".into(), listen.to_string())],
        &chitchat::transport::UdpTransport,
    )
    .await
    .unwrap();
    // Give it many gossip rounds; it must never appear.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert!(
            !a.live_nodes().contains(&"intruder".to_string()),
            "an unauthenticated node joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
