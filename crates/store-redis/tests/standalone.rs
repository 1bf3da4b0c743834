//! `RedisStore` against a real, private `redis-server`.

use std::sync::Arc;

use axum::http::StatusCode;
use tether_core::testing::record_with;
use tether_core::{Load, SessionId, SessionStore, Timestamp};
use tether_redis::RedisStore;
use tether_testkit::RedisServer;

mod common;
use common::{app, call, round_trips};

async fn fixture() -> (RedisStore, RedisServer) {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url()).unwrap();
    (store, server)
}

tether_core::store_conformance!(fixture());

#[tokio::test]
async fn a_session_is_one_readable_hash_with_a_ttl() {
    let (store, server) = fixture().await;
    let now = Timestamp::now();
    let r = record_with(now, &[("loginMember", "7"), ("cart", "[\"book\"]")]);
    store.create(&r).await.unwrap();
    let mut c = server.connect().await.unwrap();
    let key = format!("tether:session:{{{}}}", r.id);
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields["attr:loginMember"], "7");
    assert_eq!(fields["attr:cart"], "[\"book\"]");
    // The metadata, packed: version,last,idle,deadline,created,size,gc.
    let meta: Vec<u64> = fields["m"].split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!(meta.len(), 7, "{fields:?}");
    assert_eq!(meta[0], 1, "version");
    assert_eq!(meta[5], r.size() as u64, "size");
    // Redis keeps the key a quarter of the inactivity window past the
    // expiry, so most writes need no PEXPIRE.
    assert_eq!(meta[6], meta[1] + meta[2] + meta[2] / 4, "gc");
    assert_eq!(
        fields.len(),
        3,
        "two attributes and the metadata: {fields:?}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((2_150_000..=2_250_000).contains(&ttl), "{ttl}");
}

/// Calls of each command since the last reset, and resets.
async fn calls(
    c: &mut redis::aio::MultiplexedConnection,
) -> std::collections::HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let n = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), n))
        })
        .collect()
}

/// A write after a read sends the metadata it read; Redis compares it and
/// writes, without parsing or measuring anything. When another node wrote
/// in between, the script does the work itself, and both changes survive.
#[tokio::test]
async fn a_write_after_a_read_takes_the_short_path_unless_another_wrote() {
    let (a, server) = fixture().await;
    let b = RedisStore::open(&server.url()).unwrap();
    let now = Timestamp::now();
    let r = record_with(now, &[("n", "1")]);
    a.create(&r).await.unwrap();
    let mut c = server.connect().await.unwrap();
    let set = |name: &str, v: &str| {
        let mut d = tether_core::Delta::default();
        d.set(name, tether_core::testing::json(v));
        d
    };
    a.load(&r.id, Load::at(now)).await.unwrap().unwrap();
    calls(&mut c).await;
    assert_eq!(a.apply(&r.id, &set("n", "2"), now).await.unwrap(), Some(2));
    let short = calls(&mut c).await;
    assert!(
        !short.contains_key("hstrlen"),
        "the long path ran: {short:?}"
    );
    // B writes behind A's back: A's base is stale.
    b.load(&r.id, Load::at(now)).await.unwrap().unwrap();
    assert_eq!(
        b.apply(&r.id, &set("other", "true"), now).await.unwrap(),
        Some(3)
    );
    calls(&mut c).await;
    assert_eq!(a.apply(&r.id, &set("n", "3"), now).await.unwrap(), Some(4));
    let long = calls(&mut c).await;
    assert_eq!(long.get("hstrlen"), Some(&1), "{long:?}");
    let back = a.load(&r.id, Load::at(now)).await.unwrap().unwrap();
    assert_eq!(back.attributes["n"].get(), "3");
    assert_eq!(back.attributes["other"].get(), "true");
    assert_eq!(back.version, 4);
    // The size kept by both paths is the size of what is there.
    let m: String = redis::cmd("HGET")
        .arg(a.key(&r.id))
        .arg("m")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(m.split(',').nth(5), Some(back.size().to_string().as_str()));
}

#[tokio::test]
async fn round_trips_per_request_are_counted() {
    let (store, server) = fixture().await;
    assert_eq!(
        round_trips(store, &[&server]).await,
        [1, 1, 1, 1, 2],
        "read, blind write, create, rotate, read-then-write: one each, two for the last"
    );
}

#[tokio::test]
async fn the_near_cache_saves_the_read_round_trip() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_near_cache(1000, 1 << 20);
    assert_eq!(
        round_trips(store, &[&server]).await,
        [0, 1, 1, 1, 1],
        "read, blind write, create, rotate, read-then-write: the reads are local"
    );
}

/// `--redis-wait` adds no round trip: `WAIT` travels with the write.
#[tokio::test]
async fn waiting_for_replicas_adds_no_round_trip() {
    let server = RedisServer::start().await.expect("redis-server");
    // No replica here: WAIT 0 answers at once, and the count is checked.
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_wait(0, std::time::Duration::from_millis(100))
        .with_near_cache(1000, 1 << 20);
    assert_eq!(round_trips(store, &[&server]).await, [0, 1, 1, 1, 1]);
}

/// A write that `WAIT` could not promise is refused (503), though Redis
/// holds it: "acknowledged" means replicated as configured.
#[tokio::test]
async fn a_write_no_replica_acknowledged_is_unavailable() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::open(&server.url())
        .unwrap()
        .with_wait(1, std::time::Duration::from_millis(50));
    let now = Timestamp::now();
    let r = record_with(now, &[("a", "1")]);
    let err = store.create(&r).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let why = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(
        why.as_deref(),
        Some("written on the Redis master but acknowledged by 0 of 1 replicas within 50 ms")
    );
    let mut d = tether_core::Delta::default();
    d.set("a", tether_core::testing::json("2"));
    let err = store.apply(&r.id, &d, now).await.unwrap_err();
    let why = std::error::Error::source(&err).map(ToString::to_string);
    assert!(why.unwrap_or_default().contains("acknowledged by 0 of 1"));
    assert!(store.delete(&r.id).await.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn redis_down_is_503_and_recovery_needs_no_restart() {
    let (store, mut server) = fixture().await;
    let app = app(Arc::new(store));
    let (_, cookie, _) = call(&app, "POST", "/login", None).await;
    let id = cookie.unwrap();
    assert_eq!(
        call(&app, "GET", "/mypage", Some(&id)).await.0,
        StatusCode::OK
    );

    server.stop().await;
    for path in ["/mypage", "/set", "/login"] {
        let method = if path == "/mypage" { "GET" } else { "POST" };
        let started = std::time::Instant::now();
        let (status, cookie, body) = call(&app, method, path, Some(&id)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(body.contains("session store unavailable"), "{body}");
        assert!(
            cookie.is_none(),
            "{path} changed the cookie during the outage"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(8),
            "{path} hung"
        );
    }
    // The data is gone with this private, non-persistent server, but the
    // store reconnects by itself: a new login works without a restart.
    server.restart().await.unwrap();
    let (status, cookie, body) = call(&app, "POST", "/login", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = call(&app, "GET", "/mypage", cookie.as_deref()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_requests_on_different_attributes_both_survive_in_redis() {
    let (store, _server) = fixture().await;
    let store = Arc::new(store);
    let r = record_with(Timestamp::now(), &[]);
    store.create(&r).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..10 {
        let store = store.clone();
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            let mut d = tether_core::Delta::default();
            d.set(
                format!("w{w}"),
                serde_json::value::to_raw_value(&w).unwrap(),
            );
            store
                .apply(&id, &d, Timestamp::now())
                .await
                .unwrap()
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let back = store
        .load(&r.id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.attributes.len(), 10);
    assert_eq!(back.version, 11);
    let _ = SessionId::random();
}

/// Regression (found in review): Lua's `unpack` limit made sessions with a
/// few thousand attributes fail for good, reported as "try again later".
#[tokio::test]
async fn thousands_of_attributes_fit_one_script_call() {
    let (store, _server) = fixture().await;
    let now = Timestamp::now();
    let names: Vec<String> = (0..4100).map(|i| format!("a{i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let r = record_with(now, &pairs);
    store.create(&r).await.unwrap();
    let mut d = tether_core::Delta::default();
    for n in &names {
        d.set(n.as_str(), tether_core::testing::json("2"));
    }
    assert_eq!(store.apply(&r.id, &d, now).await.unwrap(), Some(2));
    let back = store.load(&r.id, Load::at(now)).await.unwrap().unwrap();
    assert_eq!(back.attributes.len(), 4100);
    assert!(back.attributes.values().all(|v| v.get() == "2"));
}

/// What a user's session index costs at the wire: a login that names a
/// principal reads the index and writes it conditionally before the
/// session's own write (a user's first login also enters the reaper's
/// directory); a logout reads the session (whose index to leave), deletes
/// it and writes the index.
#[tokio::test]
async fn round_trips_of_logins_and_logouts_with_a_principal() {
    let (store, server) = fixture().await;
    let layer = tether::SessionLayer::from_arc(Arc::new(store))
        .with_config(tether::SessionConfig::default().with_principal_attribute("loginMember"));
    let app = common::app_with(layer);
    // Warm up: scripts loaded, the directory shard of member 7 exists.
    let (_, warm, _) = call(&app, "POST", "/login", None).await;
    let mut c = common::RoundTrips::new(&[&server]).await;
    let (_, second, _) = call(&app, "POST", "/login", None).await;
    let login = c.take().await;
    call(&app, "POST", "/logout", second.as_deref()).await;
    let logout = c.take().await;
    call(&app, "POST", "/logout", warm.as_deref()).await;
    c.take().await;
    eprintln!("with a principal: login {login} round trips, logout {logout}");
    assert_eq!((login, logout), (3, 3));
}

/// No leak: 10 000 sessions of 1 000 users expire without a logout; the
/// reaper reports each once, and then nothing of them is left in Redis —
/// no session, no index, no directory entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_expired_sessions_leave_an_empty_keyspace() {
    use tether_core::principal::{InStore, PrincipalIndex};
    let (store, server) = fixture().await;
    let store: Arc<dyn SessionStore> = Arc::new(store);
    let index = PrincipalIndex::new(store.clone());
    // Long enough that none expires before all are written, on a busy machine.
    let idle = std::time::Duration::from_secs(8);
    let start = Timestamp::now();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (store, index) = (store.clone(), index.clone());
        tasks.push(tokio::spawn(async move {
            let alive = InStore(store.clone());
            for i in (t..10_000).step_by(16) {
                let principal = format!("user-{}", i % 1000);
                let now = Timestamp::now();
                let (r, member) = tether_core::testing::principal_session(&principal, now, idle);
                index
                    .admit(&principal, &r.id, member, None, &alive, now)
                    .await
                    .unwrap();
                store.create(&r).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = server.connect().await.unwrap();
    let keys = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            // KEYS expires what it meets: it counts only live keys.
            let k: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut c)
                .await
                .unwrap();
            k.len()
        }
    };
    assert!(keys(&mut c).await >= 10_000 + 1000);
    eprintln!(
        "10k sessions written in {:?}",
        Timestamp::now().since(start)
    );
    let alive = InStore(store.clone());
    let reported = std::sync::atomic::AtomicUsize::new(0);
    let count = |_: tether_core::principal::Expired| {
        reported.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    tether_testkit::eventually(
        std::time::Duration::from_secs(60),
        "every expiry reported",
        || async {
            index.reap(&alive, Timestamp::now(), &count).await.unwrap();
            (reported.load(std::sync::atomic::Ordering::Relaxed) >= 10_000).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(reported.into_inner(), 10_000, "reported more than once");
    tether_testkit::eventually(
        std::time::Duration::from_secs(30),
        "an empty keyspace",
        || {
            let mut c = c.clone();
            async move { (keys(&mut c).await == 0).then_some(()) }
        },
    )
    .await
    .unwrap();
}
