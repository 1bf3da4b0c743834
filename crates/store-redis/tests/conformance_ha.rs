//! The store conformance suite (concurrent modifies of one attribute
//! included) against Redis Sentinel and Redis Cluster, one set of real
//! processes per mode shared by every case of this binary.

use std::sync::OnceLock;

use tether_redis::RedisStore;
use tether_testkit::{RedisCluster, RedisSentinels};

/// Starts a server set on a thread of its own that lives as long as the
/// test process (the servers die with the thread that started them, so it
/// never ends); returns their URL.
fn on_own_thread<F, Fut>(f: F) -> String
where
    F: FnOnce(std::sync::mpsc::Sender<String>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f(tx));
    });
    rx.recv().expect("servers started")
}

fn sentinel_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        on_own_thread(|tx| async move {
            let set = RedisSentinels::start("conformance")
                .await
                .expect("sentinel set");
            tx.send(set.url()).expect("send");
            std::future::pending::<()>().await;
            drop(set);
        })
    })
    .clone()
}

fn cluster_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        on_own_thread(|tx| async move {
            let cluster = RedisCluster::start(3).await.expect("redis cluster");
            tx.send(cluster.url()).expect("send");
            std::future::pending::<()>().await;
            drop(cluster);
        })
    })
    .clone()
}

mod sentinel {
    use super::*;
    tether_core::store_conformance!(async {
        let url = tokio::task::spawn_blocking(sentinel_url).await.unwrap();
        (RedisStore::open(&url).unwrap(), ())
    });
}

mod cluster {
    use super::*;
    tether_core::store_conformance!(async {
        let url = tokio::task::spawn_blocking(cluster_url).await.unwrap();
        (RedisStore::open(&url).unwrap(), ())
    });
}

/// The same with the near cache (RESP3 client tracking through Sentinel's
/// master, and on every node of the cluster).
mod sentinel_near_cache {
    use super::*;
    tether_core::store_conformance!(async {
        let url = tokio::task::spawn_blocking(sentinel_url).await.unwrap();
        (
            RedisStore::open(&url)
                .unwrap()
                .with_near_cache(1000, 1 << 20),
            (),
        )
    });
}

mod cluster_near_cache {
    use super::*;
    tether_core::store_conformance!(async {
        let url = tokio::task::spawn_blocking(cluster_url).await.unwrap();
        (
            RedisStore::open(&url)
                .unwrap()
                .with_near_cache(1000, 1 << 20),
            (),
        )
    });
}
