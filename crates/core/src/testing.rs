//! The store conformance suite and a failure-injecting store (feature `testing`).
//!
//! Every [`SessionStore`] runs the same suite, so `MemoryStore`, Redis and the
//! replicated store are held to one contract. The suite passes explicit times,
//! starting at the real current time, so a store with its own physical expiry
//! (Redis TTLs) never evicts a session before the suite means it to, and the
//! logical expiry rules are checked without sleeping.
//!
//! ```text
//! tether_core::store_conformance!(async { (tether_core::MemoryStore::new(), ()) });
//! ```
//! expands to one `#[tokio::test]` per case; the expression yields the store
//! and a guard kept alive for the test (a Redis server, say).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::store::{Load, SessionStore, StoreError};
use crate::{Delta, Expiry, Record, SessionId, Timestamp};

/// JSON text as an attribute value.
pub fn json(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).expect("valid JSON in a test")
}

/// A record created now with attributes `pairs` and the default expiry.
pub fn record_with(now: Timestamp, pairs: &[(&str, &str)]) -> Record {
    record_expiring(now, Expiry::default(), pairs)
}

/// A record created at `now` with `expiry` and attributes `pairs`.
pub fn record_expiring(now: Timestamp, expiry: Expiry, pairs: &[(&str, &str)]) -> Record {
    let mut r = Record::new(SessionId::random(), now, expiry);
    for (k, v) in pairs {
        r.attributes.insert((*k).to_string(), json(v));
    }
    r
}

fn delta(sets: &[(&str, &str)], removes: &[&str]) -> Delta {
    let mut d = Delta::default();
    for (k, v) in sets {
        d.set(*k, json(v));
    }
    for k in removes {
        d.remove(*k);
    }
    d
}

fn attr(record: &Record, key: &str) -> Option<String> {
    record.attributes.get(key).map(|v| v.get().to_string())
}

async fn must_load(store: &impl SessionStore, id: &SessionId, now: Timestamp) -> Record {
    store
        .load(id, Load::at(now))
        .await
        .expect("load failed")
        .expect("session missing")
}

/// Create, then load: attributes, times and version 1 come back as written.
pub async fn create_then_load(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("loginMember", "7"), ("name", "\"kim\"")]);
    store.create(&r).await.unwrap();
    let back = must_load(store, &r.id, now).await;
    assert_eq!(back, r);
    assert_eq!(back.version, 1);
}

/// Loading an unknown identifier is `None`, not an error.
pub async fn load_missing_is_none(store: &impl SessionStore) {
    let got = store
        .load(&SessionId::random(), Load::at(Timestamp::now()))
        .await;
    assert!(matches!(got, Ok(None)), "{got:?}");
}

/// Create is insert-if-absent: a second create with the same ID collides and
/// leaves the first intact.
pub async fn create_collision(store: &impl SessionStore) {
    let now = Timestamp::now();
    let first = record_with(now, &[("a", "1")]);
    store.create(&first).await.unwrap();
    let mut second = record_with(now, &[("a", "2")]);
    second.id = first.id;
    let got = store.create(&second).await;
    assert!(matches!(got, Err(StoreError::Collision)), "{got:?}");
    assert_eq!(must_load(store, &first.id, now).await, first);
}

/// A delta writes only what it names and bumps the version by one.
pub async fn apply_sets_and_removes(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("a", "1"), ("b", "2"), ("c", "3")]);
    store.create(&r).await.unwrap();
    let later = now.plus(Duration::from_secs(1));
    let v = store
        .apply(&r.id, &delta(&[("a", "10"), ("d", "[4]")], &["b"]), later)
        .await
        .unwrap();
    assert_eq!(v, Some(2));
    let back = must_load(store, &r.id, later).await;
    assert_eq!(back.version, 2);
    assert_eq!(attr(&back, "a").as_deref(), Some("10"));
    assert_eq!(attr(&back, "b"), None);
    assert_eq!(attr(&back, "c").as_deref(), Some("3"));
    assert_eq!(attr(&back, "d").as_deref(), Some("[4]"));
    assert_eq!(back.created, r.created);
    assert_eq!(back.last_access, later, "a write records the access");
}

/// `clear` empties the session before the delta's own sets.
pub async fn apply_clear(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("a", "1"), ("b", "2")]);
    store.create(&r).await.unwrap();
    let mut d = delta(&[("c", "3")], &[]);
    d.clear = true;
    store.apply(&r.id, &d, now).await.unwrap();
    let back = must_load(store, &r.id, now).await;
    assert_eq!(back.attributes.len(), 1);
    assert_eq!(attr(&back, "c").as_deref(), Some("3"));
}

/// A delta for a session that does not exist creates nothing.
pub async fn apply_missing_does_not_resurrect(store: &impl SessionStore) {
    let now = Timestamp::now();
    let id = SessionId::random();
    assert_eq!(
        store
            .apply(&id, &delta(&[("a", "1")], &[]), now)
            .await
            .unwrap(),
        None
    );
    assert!(store.load(&id, Load::at(now)).await.unwrap().is_none());

    let r = record_with(now, &[("a", "1")]);
    store.create(&r).await.unwrap();
    assert!(store.delete(&r.id).await.unwrap());
    assert_eq!(
        store
            .apply(&r.id, &delta(&[("a", "2")], &[]), now)
            .await
            .unwrap(),
        None,
        "a deleted session must not come back"
    );
    assert!(store.load(&r.id, Load::at(now)).await.unwrap().is_none());
}

/// Delete removes the session; a second delete reports nothing deleted.
pub async fn delete_removes(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("a", "1")]);
    store.create(&r).await.unwrap();
    assert!(store.delete(&r.id).await.unwrap());
    assert!(store.load(&r.id, Load::at(now)).await.unwrap().is_none());
    assert!(!store.delete(&r.id).await.unwrap());
}

/// Rotation moves the session to a new ID with the delta applied; the old ID is dead.
pub async fn rotate_moves_session(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("cart", "[\"book\"]")]);
    store.create(&r).await.unwrap();
    let new = SessionId::random();
    let v = store
        .rotate(&r.id, &new, &delta(&[("loginMember", "7")], &[]), now)
        .await
        .unwrap();
    assert_eq!(v, Some(2));
    assert!(store.load(&r.id, Load::at(now)).await.unwrap().is_none());
    let back = must_load(store, &new, now).await;
    assert_eq!(back.id, new);
    assert_eq!(back.created, r.created);
    assert_eq!(attr(&back, "cart").as_deref(), Some("[\"book\"]"));
    assert_eq!(attr(&back, "loginMember").as_deref(), Some("7"));
    // The old ID cannot be written back into existence either.
    assert_eq!(
        store
            .apply(&r.id, &delta(&[("x", "1")], &[]), now)
            .await
            .unwrap(),
        None
    );
}

/// Rotating a missing session is `None`; rotating onto a taken ID collides and changes nothing.
pub async fn rotate_missing_and_collision(store: &impl SessionStore) {
    let now = Timestamp::now();
    let got = store
        .rotate(
            &SessionId::random(),
            &SessionId::random(),
            &Delta::default(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(got, None);

    let a = record_with(now, &[("who", "\"a\"")]);
    let b = record_with(now, &[("who", "\"b\"")]);
    store.create(&a).await.unwrap();
    store.create(&b).await.unwrap();
    let got = store
        .rotate(&a.id, &b.id, &delta(&[("x", "1")], &[]), now)
        .await;
    assert!(matches!(got, Err(StoreError::Collision)), "{got:?}");
    assert_eq!(must_load(store, &a.id, now).await, a);
    assert_eq!(must_load(store, &b.id, now).await, b);
}

/// Sliding inactivity: a session not accessed for its idle timeout is gone;
/// recorded accesses keep it alive.
pub async fn sliding_expiry(store: &impl SessionStore) {
    let t0 = Timestamp::now();
    let expiry = Expiry {
        idle: Duration::from_secs(60),
        absolute: None,
    };
    let r = record_expiring(t0, expiry, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let at = |s: u64| t0.plus(Duration::from_secs(s));

    // Refreshing reads at 50 s and 100 s keep it alive past the first 60 s.
    let refresh = |s| Load::refreshing(at(s), Duration::ZERO);
    let r1 = store.load(&r.id, refresh(50)).await.unwrap().unwrap();
    assert_eq!(r1.last_access, at(50));
    assert!(store.load(&r.id, refresh(100)).await.unwrap().is_some());
    // A write also records the access.
    store
        .apply(&r.id, &delta(&[("b", "2")], &[]), at(150))
        .await
        .unwrap()
        .expect("alive at 150 s");
    // A pure read does not: 209 s is 59 s after the write.
    assert!(store
        .load(&r.id, Load::at(at(209)))
        .await
        .unwrap()
        .is_some());
    // 210 s is a full idle window after the last recorded access.
    assert!(store
        .load(&r.id, Load::at(at(210)))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .apply(&r.id, &delta(&[("c", "3")], &[]), at(211))
            .await
            .unwrap(),
        None,
        "an expired session must not be resurrected by a write"
    );
}

/// Absolute lifetime: however active, a session ends at its deadline.
pub async fn absolute_expiry(store: &impl SessionStore) {
    let t0 = Timestamp::now();
    let expiry = Expiry {
        idle: Duration::from_secs(60),
        absolute: Some(Duration::from_secs(100)),
    };
    let r = record_expiring(t0, expiry, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let at = |s: u64| t0.plus(Duration::from_secs(s));
    for s in [30, 60, 90] {
        store
            .apply(&r.id, &delta(&[("n", &s.to_string())], &[]), at(s))
            .await
            .unwrap()
            .expect("alive before the deadline");
    }
    assert!(store.load(&r.id, Load::at(at(99))).await.unwrap().is_some());
    assert!(store
        .load(&r.id, Load::at(at(100)))
        .await
        .unwrap()
        .is_none());
}

/// The lazy refresh writes the access only once the threshold has passed.
pub async fn lazy_refresh(store: &impl SessionStore) {
    let t0 = Timestamp::now();
    let r = record_with(t0, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let after = Duration::from_secs(60);
    let early = store
        .load(
            &r.id,
            Load::refreshing(t0.plus(Duration::from_secs(30)), after),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.last_access, t0, "no refresh before the threshold");
    let late_at = t0.plus(Duration::from_secs(61));
    let late = store
        .load(&r.id, Load::refreshing(late_at, after))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.last_access, late_at);
    assert_eq!(must_load(store, &r.id, late_at).await.last_access, late_at);
    assert_eq!(late.version, 1, "a refresh is not a delta");
}

/// The refresh threshold can be a fraction of the session's own inactivity
/// timeout, so a session given a short timeout refreshes soon enough.
pub async fn lazy_refresh_by_fraction(store: &impl SessionStore) {
    let t0 = Timestamp::now();
    let expiry = Expiry {
        idle: Duration::from_secs(60),
        absolute: None,
    };
    let r = record_expiring(t0, expiry, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let at = |s: u64| t0.plus(Duration::from_secs(s));
    let early = store
        .load(&r.id, Load::refreshing_fraction(at(10), 0.25))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.last_access, t0, "10 s is under a quarter of 60 s");
    let late = store
        .load(&r.id, Load::refreshing_fraction(at(16), 0.25))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.last_access, at(16));
    // Kept alive by reads every 16 s well past the first 60 s.
    for s in [32, 48, 64, 80] {
        assert!(store
            .load(&r.id, Load::refreshing_fraction(at(s), 0.25))
            .await
            .unwrap()
            .is_some());
    }
}

/// A delta can change this session's inactivity timeout.
pub async fn idle_change(store: &impl SessionStore) {
    let t0 = Timestamp::now();
    let r = record_with(t0, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let d = Delta {
        idle_ms: Some(5_000),
        ..Delta::default()
    };
    store.apply(&r.id, &d, t0).await.unwrap().unwrap();
    let back = must_load(store, &r.id, t0).await;
    assert_eq!(back.idle_ms, 5_000);
    assert!(store
        .load(&r.id, Load::at(t0.plus(Duration::from_secs(5))))
        .await
        .unwrap()
        .is_none());
}

/// Two requests changing different attributes of one session concurrently
/// both survive, and every delta bumps the version exactly once.
pub async fn concurrent_deltas_on_different_attributes<S: SessionStore>(store: Arc<S>) {
    let now = Timestamp::now();
    let r = record_with(now, &[]);
    store.create(&r).await.unwrap();
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let d = delta(&[(&format!("w{w}"), &i.to_string())], &[]);
                store.apply(&id, &d, now).await.unwrap().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let back = must_load(&*store, &r.id, now).await;
    for w in 0..WRITERS {
        assert_eq!(
            attr(&back, &format!("w{w}")),
            Some((EACH - 1).to_string()),
            "writer {w}'s attribute was lost"
        );
    }
    assert_eq!(back.version, 1 + (WRITERS * EACH) as u64);
}

/// A conditional delta applies only while its conditions hold, and a
/// refused one changes nothing.
pub async fn conditional_apply(store: &impl SessionStore) {
    let now = Timestamp::now();
    let r = record_with(now, &[("cart", "[\"a\"]"), ("other", "1")]);
    store.create(&r).await.unwrap();

    let mut d = delta(&[("cart", "[\"a\",\"b\"]")], &[]);
    d.expect("cart", Some(json("[\"a\"]")));
    assert_eq!(store.apply(&r.id, &d, now).await.unwrap(), Some(2));

    // The same condition again: the attribute moved on, nothing is written.
    let mut stale = delta(&[("cart", "[\"a\",\"c\"]"), ("other", "2")], &[]);
    stale.expect("cart", Some(json("[\"a\"]")));
    let got = store.apply(&r.id, &stale, now).await;
    assert!(matches!(got, Err(StoreError::Conflict)), "{got:?}");
    let back = must_load(store, &r.id, now).await;
    assert_eq!(attr(&back, "cart").as_deref(), Some("[\"a\",\"b\"]"));
    assert_eq!(
        attr(&back, "other").as_deref(),
        Some("1"),
        "a refused delta wrote"
    );
    assert_eq!(back.version, 2);

    // "Still absent" is a condition too.
    let mut first = delta(&[("new", "1")], &[]);
    first.expect("new", None);
    assert_eq!(store.apply(&r.id, &first, now).await.unwrap(), Some(3));
    let got = store.apply(&r.id, &first, now).await;
    assert!(matches!(got, Err(StoreError::Conflict)), "{got:?}");
    // A condition on a session that is gone is "no session", not a conflict.
    assert_eq!(
        store
            .apply(&SessionId::random(), &first, now)
            .await
            .unwrap(),
        None
    );
}

/// Many tasks append to one attribute at once, each by read, change and
/// conditional write, again on a conflict: every append is there at the end.
pub async fn concurrent_modifies_of_one_attribute<S: SessionStore>(store: Arc<S>) {
    let now = Timestamp::now();
    let r = record_with(now, &[]);
    store.create(&r).await.unwrap();
    const TASKS: usize = 8;
    const EACH: usize = 20;
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, conflicts) = (store.clone(), conflicts.clone());
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                loop {
                    let current = store.load(&id, Load::at(now)).await.unwrap().unwrap();
                    let old = current.attributes.get("cart").cloned();
                    let mut cart: Vec<String> = old
                        .as_deref()
                        .map(|v| serde_json::from_str(v.get()).unwrap())
                        .unwrap_or_default();
                    cart.push(format!("t{t}-{i}"));
                    let mut d = Delta::default();
                    d.set("cart", serde_json::value::to_raw_value(&cart).unwrap());
                    d.expect("cart", old);
                    match store.apply(&id, &d, now).await {
                        Ok(Some(_)) => break,
                        Err(StoreError::Conflict) => {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let back = must_load(&*store, &r.id, now).await;
    let cart: Vec<String> = serde_json::from_str(back.attributes["cart"].get()).unwrap();
    assert_eq!(cart.len(), TASKS * EACH, "updates lost");
    for t in 0..TASKS {
        for i in 0..EACH {
            assert!(cart.contains(&format!("t{t}-{i}")), "t{t}-{i} lost");
        }
    }
    assert_eq!(
        back.version,
        1 + (TASKS * EACH) as u64,
        "only successful writes count"
    );
}

/// A session over the size limit is refused and the stored one is untouched.
pub async fn oversized_refused_without_damage(store: &impl SessionStore) {
    let now = Timestamp::now();
    let limit = store.max_size();
    let big = format!("\"{}\"", "x".repeat(limit));

    let too_big = record_with(now, &[("blob", &big)]);
    let got = store.create(&too_big).await;
    assert!(matches!(got, Err(StoreError::TooLarge { .. })), "{got:?}");
    assert!(store
        .load(&too_big.id, Load::at(now))
        .await
        .unwrap()
        .is_none());

    let r = record_with(now, &[("a", "1")]);
    store.create(&r).await.unwrap();
    let got = store
        .apply(&r.id, &delta(&[("b", "2"), ("blob", &big)], &[]), now)
        .await;
    assert!(matches!(got, Err(StoreError::TooLarge { .. })), "{got:?}");
    assert_eq!(
        must_load(store, &r.id, now).await,
        r,
        "stored session damaged"
    );

    let got = store
        .rotate(
            &r.id,
            &SessionId::random(),
            &delta(&[("blob", &big)], &[]),
            now,
        )
        .await;
    assert!(matches!(got, Err(StoreError::TooLarge { .. })), "{got:?}");
    assert_eq!(
        must_load(store, &r.id, now).await,
        r,
        "stored session damaged"
    );

    // Exactly at the limit is accepted.
    let fill = limit - r.size() - "pad".len() - 2;
    let pad = format!("\"{}\"", "y".repeat(fill));
    store
        .apply(&r.id, &delta(&[("pad", &pad)], &[]), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(must_load(store, &r.id, now).await.size(), limit);
}

/// Values of every JSON kind and non-ASCII names round-trip byte for byte.
pub async fn values_round_trip(store: &impl SessionStore) {
    let now = Timestamp::now();
    let pairs = [
        ("null", "null"),
        ("bool", "true"),
        ("int", "-9007199254740993"),
        ("float", "1.5e300"),
        ("str", "\"line\\nbreak \\\"quoted\\\" 한국어 \\u0000\""),
        ("arr", "[1,\"two\",{\"three\":3}]"),
        ("obj", "{\"nested\":{\"deep\":[true,false]}}"),
        ("이름", "\"홍길동\""),
        ("with:colon and space", "1"),
    ];
    let r = record_with(now, &pairs);
    store.create(&r).await.unwrap();
    assert_eq!(must_load(store, &r.id, now).await, r);
}

/// A session of `principal` created at `now`, living `idle`, and its
/// entry for the principal's index.
pub fn principal_session(
    principal: &str,
    now: Timestamp,
    idle: Duration,
) -> (Record, crate::principal::Member) {
    let mut r = record_expiring(
        now,
        Expiry {
            idle,
            absolute: None,
        },
        &[("loginMember", "1")],
    );
    r.attributes.insert(
        crate::principal::PRINCIPAL.into(),
        json(&serde_json::to_string(principal).expect("a string")),
    );
    let member = crate::principal::Member {
        joined: now.0,
        expires: r.expires_at().0,
        device: [("user_agent".to_string(), "test".to_string())].into(),
        lease: 0,
    };
    (r, member)
}

/// Creates a session of `principal` in `store` (see [`principal_session`]).
async fn session_of(
    store: &dyn SessionStore,
    principal: &str,
    now: Timestamp,
    idle: Duration,
) -> SessionId {
    let (r, _) = principal_session(principal, now, idle);
    store.create(&r).await.expect("create");
    r.id
}

fn member_at(now: Timestamp, idle: Duration) -> crate::principal::Member {
    let (_, m) = principal_session("", now, idle);
    m
}

fn test_index<S: SessionStore>(store: &Arc<S>) -> crate::principal::PrincipalIndex {
    // Each case in its own namespace: stores may be shared between cases.
    crate::principal::PrincipalIndex::new(store.clone())
        .with_namespace(&SessionId::random().to_string())
}

/// A principal's index lists its live sessions, ends one, renames one,
/// ends all but one, then all.
pub async fn principal_index_lists_and_ends<S: SessionStore>(store: Arc<S>) {
    use crate::principal::InStore;
    let idx = test_index(&store);
    let alive = InStore(store.clone());
    let now = Timestamp::now();
    let idle = Duration::from_secs(600);
    let mut alice = Vec::new();
    for _ in 0..3 {
        let id = session_of(&*store, "alice", now, idle).await;
        idx.admit("alice", &id, member_at(now, idle), None, &alive, now)
            .await
            .unwrap();
        alice.push(id);
    }
    let bob = session_of(&*store, "bob", now, idle).await;
    idx.admit("bob", &bob, member_at(now, idle), None, &alive, now)
        .await
        .unwrap();
    let listed = |l: Vec<crate::principal::Listed>| l.iter().map(|l| l.id).collect::<Vec<_>>();
    let mut want = alice.clone();
    want.sort();
    let mut got = listed(idx.sessions("alice", &alive, now).await.unwrap());
    got.sort();
    assert_eq!(got, want);
    assert_eq!(
        listed(idx.sessions("bob", &alive, now).await.unwrap()),
        vec![bob]
    );
    let first = &idx.sessions("alice", &alive, now).await.unwrap()[0];
    assert_eq!(
        first.member.device.get("user_agent").map(String::as_str),
        Some("test")
    );
    assert!(
        first.record.is_some(),
        "a store's listing carries the session"
    );

    // End one: the session is gone from the store and the list.
    assert!(idx.end_one("alice", &alice[1], &alive, now).await.unwrap());
    assert!(store
        .load(&alice[1], Load::at(now))
        .await
        .unwrap()
        .is_none());
    assert!(
        !idx.end_one("alice", &bob, &alive, now).await.unwrap(),
        "not alice's"
    );
    assert!(store.load(&bob, Load::at(now)).await.unwrap().is_some());

    // Rotation renames.
    let renamed = SessionId::random();
    store
        .rotate(&alice[0], &renamed, &Delta::default(), now)
        .await
        .unwrap()
        .unwrap();
    idx.rename("alice", &alice[0], &renamed, now).await.unwrap();
    let got = listed(idx.sessions("alice", &alive, now).await.unwrap());
    assert!(
        got.contains(&renamed) && !got.contains(&alice[0]),
        "{got:?}"
    );

    // Everywhere else, then everywhere.
    let ended = idx
        .end_all("alice", Some(&alice[2]), &alive, now)
        .await
        .unwrap();
    assert_eq!(ended, vec![renamed]);
    assert!(store.load(&renamed, Load::at(now)).await.unwrap().is_none());
    assert_eq!(
        listed(idx.sessions("alice", &alive, now).await.unwrap()),
        vec![alice[2]]
    );
    idx.end_all("alice", None, &alive, now).await.unwrap();
    assert!(idx.sessions("alice", &alive, now).await.unwrap().is_empty());
    assert!(idx.members("alice", now).await.unwrap().is_empty());
    assert!(store
        .load(&alice[2], Load::at(now))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        listed(idx.sessions("bob", &alive, now).await.unwrap()),
        vec![bob]
    );
}

/// Logins racing for the last slot: exactly one wins (refuse); with
/// eviction, the principal ends with `max` live sessions and every evicted
/// one is gone from the store.
pub async fn principal_limit_under_concurrent_logins<S: SessionStore>(store: Arc<S>) {
    use crate::principal::{InStore, LimitPolicy, SessionLimit};
    let idx = test_index(&store);
    let now = Timestamp::now();
    let idle = Duration::from_secs(600);
    const LOGINS: usize = 8;
    for (policy, max) in [(LimitPolicy::Refuse, 1), (LimitPolicy::EvictOldest, 2)] {
        let principal = format!("{policy:?}");
        let mut tasks = Vec::new();
        for i in 0..LOGINS {
            let (idx, store) = (idx.clone(), store.clone());
            let principal = principal.clone();
            tasks.push(tokio::spawn(async move {
                let id = session_of(&*store, &principal, now, idle).await;
                let mut m = member_at(now, idle);
                m.joined += i as u64;
                let got = idx
                    .admit(
                        &principal,
                        &id,
                        m,
                        Some(SessionLimit { max, policy }),
                        &InStore(store.clone()),
                        now,
                    )
                    .await;
                (id, got)
            }));
        }
        let mut admitted = Vec::new();
        let mut evicted = Vec::new();
        for t in tasks {
            let (id, got) = t.await.unwrap();
            match got {
                Ok(e) => {
                    admitted.push(id);
                    evicted.extend(e);
                }
                Err(StoreError::LimitReached { max: m }) => assert_eq!(m, max),
                Err(e) => panic!("{e:?}"),
            }
        }
        let live = idx
            .sessions(&principal, &InStore(store.clone()), now)
            .await
            .unwrap();
        match policy {
            LimitPolicy::Refuse => {
                assert_eq!(
                    admitted.len(),
                    1,
                    "{max} slot, {} logins won",
                    admitted.len()
                );
                assert_eq!(live.len(), 1);
            }
            LimitPolicy::EvictOldest => {
                assert_eq!(admitted.len(), LOGINS, "evicting never refuses");
                assert_eq!(live.len(), max, "{live:?}");
                for e in &evicted {
                    assert!(
                        store.load(e, Load::at(now)).await.unwrap().is_none(),
                        "an evicted session still works"
                    );
                }
                assert_eq!(evicted.len(), LOGINS - max);
            }
        }
    }
}

/// Sessions that expire without a logout are reported once by the
/// reaper, and their user's index then holds nothing: no leak.
pub async fn principal_expiry_is_reported_once_and_leaves_nothing<S: SessionStore>(store: Arc<S>) {
    use crate::principal::InStore;
    let idx = test_index(&store);
    let alive = InStore(store.clone());
    let now = Timestamp::now();
    let idle = Duration::from_millis(500);
    let mut all = std::collections::BTreeSet::new();
    for p in 0..10 {
        let principal = format!("user-{p}");
        for _ in 0..3 {
            let id = session_of(&*store, &principal, now, idle).await;
            idx.admit(&principal, &id, member_at(now, idle), None, &alive, now)
                .await
                .unwrap();
            all.insert((principal.clone(), id));
        }
    }
    // One survives: it was used (its expiry slid past the hint).
    let (keep_p, keep_id) = all.iter().next().cloned().unwrap();
    let later = now.plus(Duration::from_millis(400));
    store
        .load(&keep_id, Load::refreshing(later, Duration::ZERO))
        .await
        .unwrap()
        .unwrap();
    all.remove(&(keep_p.clone(), keep_id));

    // Nothing is due yet.
    let reports = std::sync::Mutex::new(Vec::new());
    let record = |e: crate::principal::Expired| reports.lock().unwrap().push((e.principal, e.id));
    assert_eq!(idx.reap(&alive, now, &record).await.unwrap(), 0);
    // After the expiry (times come from the caller: no waiting).
    let after = now.plus(Duration::from_millis(600));
    let n = idx.reap(&alive, after, &record).await.unwrap();
    assert_eq!(n, all.len());
    assert_eq!(
        idx.reap(&alive, after, &record).await.unwrap(),
        0,
        "reported twice"
    );
    let got: std::collections::BTreeSet<_> = reports.lock().unwrap().iter().cloned().collect();
    assert_eq!(got, all);
    for p in 0..10 {
        let principal = format!("user-{p}");
        let members = idx.members(&principal, after).await.unwrap();
        if principal == keep_p {
            assert_eq!(members.len(), 1, "the used session stays indexed");
            assert!(members[0].1.expires > after.0, "its hint followed it");
        } else {
            assert!(members.is_empty(), "{principal}: {members:?}");
        }
    }
    // The survivor expires too, later; then nothing at all is left.
    let end = later.plus(Duration::from_millis(600));
    assert_eq!(idx.reap(&alive, end, &record).await.unwrap(), 1);
    assert!(idx.members(&keep_p, end).await.unwrap().is_empty());
}

/// Generates one `#[tokio::test]` per conformance case.
///
/// `$make` is an `async` expression yielding `(store, guard)`; the guard
/// (a server process, say) lives until the test ends.
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@cases $make;
            create_then_load, load_missing_is_none, create_collision,
            apply_sets_and_removes, apply_clear, apply_missing_does_not_resurrect,
            delete_removes, rotate_moves_session, rotate_missing_and_collision,
            sliding_expiry, absolute_expiry, lazy_refresh, lazy_refresh_by_fraction, idle_change,
            oversized_refused_without_damage, values_round_trip, conditional_apply);

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_deltas_on_different_attributes() {
            let (store, _guard) = $make.await;
            $crate::testing::concurrent_deltas_on_different_attributes(
                ::std::sync::Arc::new(store),
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn principal_limit_under_concurrent_logins() {
            let (store, _guard) = $make.await;
            $crate::testing::principal_limit_under_concurrent_logins(::std::sync::Arc::new(store))
                .await;
        }

        #[tokio::test]
        async fn principal_index_lists_and_ends() {
            let (store, _guard) = $make.await;
            $crate::testing::principal_index_lists_and_ends(::std::sync::Arc::new(store)).await;
        }

        #[tokio::test]
        async fn principal_expiry_is_reported_once_and_leaves_nothing() {
            let (store, _guard) = $make.await;
            $crate::testing::principal_expiry_is_reported_once_and_leaves_nothing(
                ::std::sync::Arc::new(store),
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_modifies_of_one_attribute() {
            let (store, _guard) = $make.await;
            $crate::testing::concurrent_modifies_of_one_attribute(::std::sync::Arc::new(store))
                .await;
        }
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (store, _guard) = $make.await;
                $crate::testing::$case(&store).await;
            }
        )*
    };
}

/// A store wrapper whose operations fail with [`StoreError::Unavailable`]
/// while switched off, for testing how callers survive an outage.
#[derive(Debug, Clone)]
pub struct FailingStore<S> {
    inner: S,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

/// The error a [`FailingStore`] reports while down.
#[derive(Debug, thiserror::Error)]
#[error("connection refused (injected)")]
pub struct Injected;

impl<S: SessionStore> FailingStore<S> {
    /// Wraps `inner`, initially up.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Makes every following operation fail (`true`) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Operations attempted so far, successful or not.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::unavailable(Injected))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: SessionStore> SessionStore for FailingStore<S> {
    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.check()?;
        self.inner.create(record).await
    }
    async fn load(&self, id: &SessionId, load: Load) -> Result<Option<Record>, StoreError> {
        self.check()?;
        self.inner.load(id, load).await
    }
    async fn apply(
        &self,
        id: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.apply(id, delta, now).await
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(id).await
    }
    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        delta: &Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.rotate(old, new, delta, now).await
    }
    fn max_size(&self) -> usize {
        self.inner.max_size()
    }
}
