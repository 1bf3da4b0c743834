//! Membership: chitchat's gossip and failure detector, turned into the
//! member lists the core takes.
//!
//! Two refinements over chitchat's live set:
//! - a node that announced it is leaving (the `leaving` key) is not a
//!   member, so its sessions move before it exits;
//! - a node chitchat stops hearing from leaves the member list only when
//!   its replication port refuses connections (the process is gone: at
//!   once) or after `suspect_timeout` (a frozen or cut-off node). Phi
//!   accrual with a 100 ms gossip interval flags a node after a few
//!   hundred milliseconds of silence, which a loaded 2-core machine
//!   produces; every such flap would be a view change and a transfer;
//! - a node whose replication port refused a message is probed at once
//!   (the driver says so), so every node that talks to a crashed node
//!   drops it within a round trip instead of after its own failure
//!   detector fires: views agree again sooner, and writes wait less.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};

use crate::core::view::Member;
use crate::core::Input;
use crate::driver::Driver;
use crate::gossip;
use crate::{ClusterConfig, StartError};

/// The key a node sets in its gossip state when it starts leaving.
pub(crate) const LEAVING: &str = "leaving";
/// The key holding a node's replication address.
const REPL: &str = "repl";
/// How often the member list is re-evaluated without gossip news.
const POLL: Duration = Duration::from_millis(100);
/// A member is probed at most this often.
const PROBE_GAP: Duration = Duration::from_millis(20);

/// Starts gossip for `config` (whose `listen` is already bound for TCP).
pub(crate) async fn start(
    config: &ClusterConfig,
    generation: u64,
) -> Result<ChitchatHandle, StartError> {
    let cluster_id = {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&config.secret)
            .expect("any key length");
        mac.update(b"tether-cluster-id");
        let tag = mac.finalize().into_bytes();
        tag[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let listen = config.listen;
    let chitchat_config = ChitchatConfig {
        chitchat_id: ChitchatId::new(config.node_id.clone(), generation, listen),
        cluster_id,
        gossip_interval: config.gossip_interval,
        listen_addr: listen,
        seed_nodes: config.seeds.clone(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: config.gossip_interval,
            dead_node_grace_period: Duration::from_secs(3600),
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let transport = gossip::AuthUdp::new(&config.secret);
    spawn_chitchat(
        chitchat_config,
        vec![(REPL.into(), listen.to_string())],
        &transport,
    )
    .await
    .map_err(|e| StartError::Gossip(format!("{e:#}")))
}

/// What is known of one node.
struct Known {
    member: Member,
    addr: SocketAddr,
    /// Last time chitchat listed it live.
    seen: Instant,
    /// Its replication port refused a connection after chitchat dropped it.
    refused: bool,
    probing: bool,
    /// When it was last probed (hints come in bursts).
    probed: Option<Instant>,
}

/// Checks whether `k`'s replication port refuses connections (its process
/// is gone); the answer comes back on `tx`.
fn probe(k: &mut Known, tx: &tokio::sync::mpsc::UnboundedSender<(Member, bool)>) {
    if k.probed.is_some_and(|t| t.elapsed() < PROBE_GAP) {
        return;
    }
    k.probed = Some(Instant::now());
    k.probing = true;
    let (m, addr, tx) = (k.member.clone(), k.addr, tx.clone());
    tokio::spawn(async move {
        let refused = matches!(
            tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
        let _ = tx.send((m, refused));
    });
}

/// Feeds the core the member list whenever it changes.
pub(crate) async fn watch(
    driver: Arc<Driver>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    me: Member,
    suspect: Duration,
    mut hints: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut watcher = chitchat.lock().await.live_nodes_watcher();
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut last: Option<Vec<Member>> = None;
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel::<(Member, bool)>();
    loop {
        let live: Vec<(Member, SocketAddr, bool)> = watcher
            .borrow_and_update()
            .iter()
            .filter(|(id, _)| id.node_id != me.name || id.generation_id == me.generation)
            .filter_map(|(id, state)| {
                let addr = state.get(REPL)?.parse().ok()?;
                let member = Member::new(id.node_id.clone(), id.generation_id);
                Some((member, addr, state.get(LEAVING).is_some()))
            })
            .collect();
        let now = Instant::now();
        let mut leaving = Vec::new();
        for (member, addr, is_leaving) in live {
            if is_leaving {
                leaving.push(member.name.clone());
            }
            let newer = known.get(&member.name).is_none_or(|k| {
                k.member.generation < member.generation
                    // A refusal is final for a generation: only a restart
                    // (a new one) brings the name back.
                    || (k.member.generation == member.generation && !k.refused)
            });
            if newer {
                known.insert(
                    member.name.clone(),
                    Known {
                        member,
                        addr,
                        seen: now,
                        refused: false,
                        probing: false,
                        probed: None,
                    },
                );
            }
        }
        for name in &leaving {
            known.remove(name);
        }
        // Nodes chitchat no longer lists: probe their port.
        for k in known.values_mut() {
            if k.seen != now && !k.refused && !k.probing && k.member != me {
                probe(k, &probe_tx);
            }
        }
        // A refused member stays known (refused), so that chitchat, which
        // may list it live a while longer, cannot bring it back; only a new
        // generation replaces it.
        let member =
            |k: &Known| k.member == me || (!k.refused && now.duration_since(k.seen) < suspect);
        known.retain(|_, k| k.refused || member(k));
        let members: Vec<Member> = known
            .values()
            .filter(|k| member(k))
            .map(|k| k.member.clone())
            .collect();
        if last.as_ref() != Some(&members) {
            let addrs: HashMap<String, SocketAddr> = known
                .values()
                .filter(|k| member(k))
                .map(|k| (k.member.name.clone(), k.addr))
                .collect();
            driver.set_addrs(addrs);
            driver.feed(Input::Members(members.clone()));
            last = Some(members);
        }
        tokio::select! {
            changed = watcher.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            Some((m, refused)) = probe_rx.recv() => {
                if let Some(k) = known.get_mut(&m.name).filter(|k| k.member == m) {
                    k.probing = false;
                    k.refused = refused;
                }
            }
            Some(name) = hints.recv() => {
                if let Some(k) = known.get_mut(&name).filter(|k| !k.refused && !k.probing && k.member != me) {
                    probe(k, &probe_tx);
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}
