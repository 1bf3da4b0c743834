//! Shoppers: logged-in users who keep adding unique items to their carts
//! through a balancer while a test breaks things, and a checker that keeps
//! every item a user saw acknowledged and verifies it at the end.
//!
//! A user whose cart comes back without an item it was acknowledged
//! before, or whose `/mypage` answers 401, was logged out or lost writes:
//! both are counted as they happen, not only at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::{Client, Result};

/// What the users saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Users logged in.
    pub users: usize,
    /// Requests sent.
    pub requests: u64,
    /// Items acknowledged (200 with the item in the returned cart).
    pub acked: u64,
    /// Requests answered 5xx or not at all (allowed: not acknowledged).
    pub refused: u64,
    /// Users who were logged out at some point (401, or a cart that lost
    /// items they had seen acknowledged).
    pub logged_out: usize,
    /// Acknowledged items missing from the final carts.
    pub lost: u64,
    /// What went wrong, per user, for the test's message.
    pub problems: Vec<String>,
    /// Refusals by answer (status and the start of the body).
    pub refusals: std::collections::BTreeMap<String, u64>,
}

struct Shopper {
    client: Client,
    member: u64,
    acked: Vec<String>,
    /// Acknowledged items already reported missing.
    missing: usize,
    requests: u64,
    refused: u64,
    refusals: std::collections::BTreeMap<String, u64>,
    problems: Vec<String>,
}

/// Users logged in through `base` (a balancer's URL).
pub struct Shoppers {
    base: String,
    users: Vec<Shopper>,
}

/// Cart items as strings.
fn cart_of(body: &serde_json::Value) -> Option<Vec<String>> {
    serde_json::from_value(body.get("cart")?.clone()).ok()
}

impl Shoppers {
    /// Logs `n` users in through `base`, retrying refusals for up to 30 s.
    ///
    /// # Errors
    /// If a user cannot log in.
    pub async fn log_in(base: &str, n: usize) -> Result<Self> {
        let mut users = Vec::with_capacity(n);
        for i in 0..n {
            let client = Client::new();
            let member = 1000 + i as u64;
            let url = format!("{base}/login");
            crate::eventually(Duration::from_secs(30), "a login", || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let r = client
                        .post_json(&url, &json!({ "member": member }))
                        .await
                        .ok()?;
                    (r.status == 200).then_some(())
                }
            })
            .await?;
            users.push(Shopper {
                client,
                member,
                acked: Vec::new(),
                missing: 0,
                requests: 0,
                refused: 0,
                refusals: Default::default(),
                problems: Vec::new(),
            });
        }
        Ok(Self {
            base: base.to_string(),
            users,
        })
    }

    /// Every user adds items (one request at a time, `pause` between them)
    /// until `stop` says so; returns the users when they stopped.
    pub fn shop(self, pause: Duration, stop: watch::Receiver<bool>) -> Running {
        let base: Arc<str> = self.base.into();
        let progress = Arc::new(AtomicU64::new(0));
        let tasks = self
            .users
            .into_iter()
            .enumerate()
            .map(|(u, mut s)| {
                let base = base.clone();
                let mut stop = stop.clone();
                let progress = progress.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !*stop.borrow_and_update() {
                        n += 1;
                        let before = s.acked.len();
                        s.step(&base, u, n).await;
                        progress.fetch_add((s.acked.len() - before) as u64, Ordering::Relaxed);
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    s
                })
            })
            .collect();
        Running {
            base: base.to_string(),
            tasks,
            progress,
        }
    }
}

impl Shopper {
    fn refuse(&mut self, why: String) {
        self.refused += 1;
        *self.refusals.entry(why).or_default() += 1;
    }

    async fn step(&mut self, base: &str, u: usize, n: u64) {
        self.requests += 1;
        if n % 5 == 0 {
            match self.client.get(&format!("{base}/mypage")).await {
                Ok(r) if r.status == 401 => {
                    self.problems.push(format!(
                        "user {u}: 401 on /mypage after {} items",
                        self.acked.len()
                    ));
                }
                Ok(r) if r.status == 200 => {}
                Ok(r) => {
                    let body: String = r.text().chars().take(90).collect();
                    self.refuse(format!("{} {body}", r.status.as_u16()));
                }
                Err(e) => self.refuse(format!("no answer: {e}")),
            }
            return;
        }
        let item = format!("u{u}-{n}");
        let r = self
            .client
            .post_json(&format!("{base}/cart"), &json!({ "item": item }))
            .await;
        let r = match r {
            Ok(r) if r.status == 200 => r,
            Ok(r) => {
                let body: String = r.text().chars().take(90).collect();
                self.refuse(format!("{} {body}", r.status.as_u16()));
                return;
            }
            Err(e) => {
                self.refuse(format!("no answer: {e}"));
                return;
            }
        };
        let Some(cart) = r.json().ok().as_ref().and_then(cart_of) else {
            self.problems
                .push(format!("user {u}: a 200 without a cart: {}", r.text()));
            return;
        };
        let missing = self.acked.iter().filter(|i| !cart.contains(i)).count();
        if missing > self.missing {
            self.problems.push(format!(
                "user {u}: the cart lost {missing} of {} acknowledged items (served by {:?})",
                self.acked.len(),
                r.node()
            ));
            self.missing = missing;
        }
        if cart.contains(&item) {
            self.acked.push(item);
        }
    }
}

/// Counts the writes the users saw acknowledged, while they shop.
#[derive(Clone)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Waits (up to `within`) until `more` further writes were acknowledged:
    /// the fleet serves again after whatever the test just did.
    ///
    /// # Errors
    /// If the users could not write that much in time.
    pub async fn more(&self, more: u64, within: Duration) -> Result<()> {
        let target = self.acked() + more;
        crate::eventually(within, "users' writes acknowledged", || async {
            (self.acked() >= target).then_some(())
        })
        .await
    }
}

/// Shoppers at work.
pub struct Running {
    base: String,
    tasks: Vec<tokio::task::JoinHandle<Shopper>>,
    progress: Arc<AtomicU64>,
}

impl Running {
    /// A handle on the number of writes acknowledged so far.
    pub fn progress(&self) -> Progress {
        Progress(self.progress.clone())
    }

    /// Waits for the users to stop (after `stop` was set), then checks every
    /// user: logged in, and every acknowledged item in the cart.
    ///
    /// # Errors
    /// If a user task panicked.
    pub async fn check(self) -> Result<Tally> {
        let mut tally = Tally::default();
        for t in self.tasks {
            let mut s = t.await?;
            tally.users += 1;
            tally.requests += s.requests;
            tally.refused += s.refused;
            for (why, n) in std::mem::take(&mut s.refusals) {
                *tally.refusals.entry(why).or_default() += n;
            }
            let acked = s.acked.len() as u64;
            // The final look, retried while the fleet answers 503.
            let url = format!("{}/cart", self.base);
            let client = s.client.clone();
            let cart = crate::eventually(Duration::from_secs(30), "a final cart", || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let r = client
                        .post_json(&url, &json!({ "item": "final" }))
                        .await
                        .ok()?;
                    (r.status == 200).then(|| r.json().ok().as_ref().and_then(cart_of))?
                }
            })
            .await?;
            let lost = s.acked.iter().filter(|i| !cart.contains(i)).count() as u64;
            if lost > 0 {
                s.problems.push(format!(
                    "member {}: {lost} acknowledged items missing at the end",
                    s.member
                ));
            }
            let me = s.client.get(&format!("{}/mypage", self.base)).await?;
            if me.status != 200 {
                s.problems.push(format!(
                    "member {}: /mypage {} at the end",
                    s.member, me.status
                ));
            }
            tally.acked += acked;
            tally.lost += lost;
            if !s.problems.is_empty() {
                tally.logged_out += 1;
                tally.problems.append(&mut s.problems);
            }
        }
        Ok(tally)
    }
}
