//! The near cache against a real `redis-server`: the store contract, two
//! nodes writing one session, broken and silently cut connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_core::testing::{json, record_with};
use tether_core::{Delta, Load, Record, SessionStore, StoreError, Timestamp};
use tether_redis::RedisStore;
use tether_testkit::{eventually, RedisServer};

fn cached(url: &str) -> RedisStore {
    RedisStore::open(url)
        .unwrap()
        .with_near_cache(10_000, 16 << 20)
}

async fn fixture() -> (RedisStore, RedisServer) {
    let server = RedisServer::start().await.expect("redis-server");
    let store = cached(&server.url());
    (store, server)
}

tether_core::store_conformance!(fixture());

async fn load(store: &RedisStore, r: &Record) -> Option<Record> {
    store.load(&r.id, Load::at(Timestamp::now())).await.unwrap()
}

fn set(name: &str, value: &str) -> Delta {
    let mut d = Delta::default();
    d.set(name, json(value));
    d
}

#[tokio::test]
async fn a_node_keeps_its_own_writes_and_reads_them_without_redis() {
    let (a, _server) = fixture().await;
    let r = record_with(Timestamp::now(), &[("n", "0")]);
    a.create(&r).await.unwrap();
    for i in 1..=20 {
        let got = load(&a, &r).await.unwrap();
        assert_eq!(got.attributes["n"].get(), (i - 1).to_string());
        let v = a
            .apply(&r.id, &set("n", &i.to_string()), Timestamp::now())
            .await
            .unwrap();
        assert_eq!(v, Some(i + 1));
    }
    let stats = a.near_cache_stats().unwrap();
    assert_eq!(
        (stats.hits, stats.misses),
        (20, 0),
        "every read after the node's own writes is local: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_write_reaches_this_nodes_copy() {
    let (a, server) = fixture().await;
    let b = cached(&server.url());
    let r = record_with(Timestamp::now(), &[("n", "0")]);
    a.create(&r).await.unwrap();
    // Both nodes hold the session.
    assert!(load(&b, &r).await.is_some());
    assert!(load(&a, &r).await.is_some());
    let mut stale_at_once = 0;
    let rounds = 200;
    for i in 1..=rounds {
        let (writer, reader) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        writer
            .apply(&r.id, &set("n", &i.to_string()), Timestamp::now())
            .await
            .unwrap()
            .unwrap();
        let want = i.to_string();
        if load(reader, &r).await.unwrap().attributes["n"].get() != want {
            stale_at_once += 1;
        }
        // Whatever the race, the invalidation arrives: the copy catches up.
        eventually(Duration::from_secs(5), "the other node's write", || async {
            (load(reader, &r).await?.attributes["n"].get() == want).then_some(())
        })
        .await
        .unwrap();
    }
    let (sa, sb) = (a.near_cache_stats().unwrap(), b.near_cache_stats().unwrap());
    eprintln!("{rounds} alternating writes: {stale_at_once} reads right after the other node's write were stale; a {sa:?}; b {sb:?}");
    assert!(
        sa.invalidations + sb.invalidations >= rounds - stale_at_once,
        "Redis pushed the invalidations: {sa:?} {sb:?}"
    );
    // Writes by any client count, not just tether's.
    let mut c = server.connect().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(a.key(&r.id))
        .arg("attr:other")
        .arg("true")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "a foreign write", || async {
        load(&a, &r).await?.attributes.get("other").map(|_| ())
    })
    .await
    .unwrap();
}

/// Two nodes incrementing one counter through cached copies: a stale copy
/// makes the conditional write fail and the retry reads Redis; no
/// increment is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_through_two_caches_lose_nothing() {
    let (a, server) = fixture().await;
    let b = cached(&server.url());
    let (a, b) = (Arc::new(a), Arc::new(b));
    let r = record_with(Timestamp::now(), &[("n", "0")]);
    a.create(&r).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..50 {
                loop {
                    let now = Timestamp::now();
                    let got = store.load(&id, Load::at(now)).await.unwrap().unwrap();
                    let n: u64 = got.attributes["n"].get().parse().unwrap();
                    let mut d = set("n", &(n + 1).to_string());
                    d.expect("n", Some(json(&n.to_string())));
                    match store.apply(&id, &d, now).await {
                        Ok(Some(_)) => break,
                        Err(StoreError::Conflict) => conflicts += 1,
                        other => panic!("{other:?}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let back = load(&a, &r).await.unwrap();
    assert_eq!(back.attributes["n"].get(), "400", "{conflicts} conflicts");
}

#[tokio::test]
async fn a_broken_tracking_connection_drops_the_whole_cache() {
    let (a, server) = fixture().await;
    let r = record_with(Timestamp::now(), &[("side", "\"before\"")]);
    a.create(&r).await.unwrap();
    assert!(load(&a, &r).await.is_some());
    let flushes = a.near_cache_stats().unwrap().flushes;
    let mut c = server.connect().await.unwrap();
    // Kill the store's connections (not this one), then change the session
    // behind its back: no invalidation can reach it any more.
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the cache dropped", || async {
        (a.near_cache_stats().unwrap().flushes > flushes).then_some(())
    })
    .await
    .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(a.key(&r.id))
        .arg("attr:side")
        .arg("\"after\"")
        .query_async(&mut c)
        .await
        .unwrap();
    let got = load(&a, &r).await.unwrap();
    assert_eq!(got.attributes["side"].get(), "\"after\"");
}

/// A connection cut without a FIN (a partition): the client cannot tell it
/// from a quiet one, and invalidations stop. The heartbeat drops the cache
/// within about 1.5 s; after that the node answers 503, never the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_cut_connection_stops_serving_copies_within_the_heartbeat() {
    // The server listens on a second loopback address that the test cuts
    // off; the writer reaches it on 127.0.0.1, untouched.
    let cut_ip: std::net::IpAddr = [127, 0, 78, 1].into();
    let server = RedisServer::start_with(&["--bind", "127.0.0.1", "127.0.78.1"])
        .await
        .expect("redis-server");
    let a = cached(&format!("redis://127.0.78.1:{}", server.port()));
    let writer = RedisStore::open(&server.url()).unwrap();
    let r = record_with(Timestamp::now(), &[("side", "\"before\"")]);
    writer.create(&r).await.unwrap();
    assert!(load(&a, &r).await.is_some());
    assert_eq!(a.near_cache_stats().unwrap().entries, 1);

    let cut = tether_testkit::Isolation::isolate(cut_ip).unwrap();
    let cut_at = Instant::now();
    writer
        .apply(&r.id, &set("side", "\"after\""), Timestamp::now())
        .await
        .unwrap()
        .unwrap();
    // Until the heartbeat notices, the old copy may be served; from then on
    // only errors (the store is unreachable), never the old value again.
    let noticed = eventually(Duration::from_secs(10), "the cache dropped", || async {
        match a.load(&r.id, Load::at(Timestamp::now())).await {
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                Some(cut_at.elapsed())
            }
            Ok(Some(got)) => {
                assert_eq!(got.attributes["side"].get(), "\"before\"");
                None
            }
            Ok(None) => panic!("a silent logout"),
        }
    })
    .await
    .unwrap();
    eprintln!(
        "a silently cut connection: old copies until the heartbeat dropped them, \
         the first 503 after {noticed:?} (that includes a reconnect attempt)"
    );
    assert!(noticed < Duration::from_secs(4), "{noticed:?}");
    for _ in 0..5 {
        let got = a.load(&r.id, Load::at(Timestamp::now())).await;
        assert!(matches!(&got, Err(e) if e.is_unavailable()), "{got:?}");
    }
    drop(cut);
    let back = eventually(Duration::from_secs(15), "reconnected", || async {
        a.load(&r.id, Load::at(Timestamp::now()))
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    assert_eq!(back.attributes["side"].get(), "\"after\"");
}

#[tokio::test]
async fn the_cache_is_bounded_and_counts() {
    let server = RedisServer::start().await.expect("redis-server");
    let a = RedisStore::open(&server.url())
        .unwrap()
        .with_near_cache(64, 1 << 20);
    let now = Timestamp::now();
    for _ in 0..500 {
        let r = record_with(now, &[("blob", &format!("\"{}\"", "x".repeat(100)))]);
        a.create(&r).await.unwrap();
    }
    let s = a.near_cache_stats().unwrap();
    assert!(s.entries <= 64, "{s:?}");
    assert!(s.evictions >= 400, "{s:?}");
    assert!(s.bytes <= 64 * 400, "{s:?}");
}

/// One node's requests of one session overlap: their answers reach the
/// cache in any order, and Redis tells a node nothing of its own writes.
/// After every round the cached copy must be what Redis holds, never an
/// older state that answered last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_own_writes_leave_the_newest_state_cached() {
    let (store, server) = fixture().await;
    let store = Arc::new(store);
    let plain = RedisStore::open(&server.url()).unwrap();
    let r = record_with(Timestamp::now(), &[("n", "0")]);
    store.create(&r).await.unwrap();
    for round in 0..40 {
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                let id = r.id;
                tokio::spawn(async move {
                    let d = set(&format!("w{w}"), &format!("{round}"));
                    store.apply(&id, &d, Timestamp::now()).await.unwrap()
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap().expect("the session lives");
        }
        let state = |r: Record| {
            let attrs: Vec<(String, String)> = r
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.get().to_string()))
                .collect();
            (r.version, attrs)
        };
        let truth = state(load(&plain, &r).await.unwrap());
        let seen = state(load(&store, &r).await.unwrap());
        assert_eq!(
            seen, truth,
            "round {round}: the cache kept an older state than Redis holds"
        );
    }
}
