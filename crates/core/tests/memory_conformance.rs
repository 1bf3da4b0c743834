//! `MemoryStore` against the store conformance suite, plus its eviction.

use std::time::Duration;

use tether_core::testing::record_expiring;
use tether_core::{Expiry, MemoryStore, SessionStore, Timestamp};

tether_core::store_conformance!(async { (MemoryStore::new(), ()) });

#[tokio::test]
async fn expired_sessions_are_evicted_from_memory() {
    let store = MemoryStore::new().with_sweep_interval(Duration::from_secs(16));
    let t0 = Timestamp::now();
    let short = Expiry {
        idle: Duration::from_secs(10),
        absolute: None,
    };
    for _ in 0..200 {
        store
            .create(&record_expiring(t0, short, &[("a", "\"x\"")]))
            .await
            .unwrap();
    }
    let keeper = record_expiring(t0, Expiry::default(), &[("a", "1")]);
    store.create(&keeper).await.unwrap();
    assert_eq!(store.stats().sessions, 201);
    assert_eq!(store.stats().bytes, 200 * 4 + 2);

    // Ordinary traffic past the expiry drives the incremental sweep: one
    // shard per operation that finds a sweep due (every second here).
    for s in 11..40 {
        let now = t0.plus(Duration::from_secs(s));
        store
            .load(&keeper.id, tether_core::Load::at(now))
            .await
            .unwrap();
    }
    assert_eq!(store.stats().sessions, 1, "expired sessions still held");
    assert_eq!(store.stats().bytes, 2);
}

#[tokio::test]
async fn explicit_sweep_evicts_everything_expired() {
    let store = MemoryStore::new();
    let t0 = Timestamp::now();
    let short = Expiry {
        idle: Duration::from_secs(1),
        absolute: None,
    };
    for _ in 0..50 {
        store
            .create(&record_expiring(t0, short, &[]))
            .await
            .unwrap();
    }
    assert_eq!(store.sweep(t0), 0);
    assert_eq!(store.sweep(t0.plus(Duration::from_secs(1))), 50);
    assert_eq!(store.stats().sessions, 0);
}
