//! Round trips per request on Sentinel and Cluster, counted at the
//! servers (MONITOR on the master, or on every master of the cluster):
//! `(read, blind write, create, rotate, read-then-write)`. The standalone
//! counts are in `standalone.rs`.

use tether_redis::RedisStore;
use tether_testkit::{RedisCluster, RedisSentinels};

mod common;
use common::round_trips;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_as_on_one_server() {
    let set = RedisSentinels::start("trips").await.unwrap();
    let plain = RedisStore::open(&set.url()).unwrap();
    assert_eq!(round_trips(plain, &[&set.master]).await, [1, 1, 1, 1, 2]);
    let cached = RedisStore::open(&set.url())
        .unwrap()
        .with_near_cache(1000, 1 << 20);
    assert_eq!(round_trips(cached, &[&set.master]).await, [0, 1, 1, 1, 1]);
}

/// On a cluster, rotation reads the session, creates it under the new ID
/// (another slot) and deletes the old key: three round trips (see the crate
/// docs); everything else is as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_only_rotation_costs_more() {
    let cluster = RedisCluster::start(3).await.unwrap();
    let masters: Vec<_> = cluster
        .masters()
        .await
        .into_iter()
        .map(|m| &cluster.nodes[m])
        .collect();
    let plain = RedisStore::open(&cluster.url()).unwrap();
    assert_eq!(round_trips(plain, &masters).await, [1, 1, 1, 3, 2]);
    let cached = RedisStore::open(&cluster.url())
        .unwrap()
        .with_near_cache(1000, 1 << 20);
    assert_eq!(round_trips(cached, &masters).await, [0, 1, 1, 3, 1]);
}
