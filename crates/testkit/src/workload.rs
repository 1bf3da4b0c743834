//! Shoppers: logged-in users who keep adding unique items to their carts
//! through a balancer while a test breaks things, and a checker that keeps
//! every item a user saw acknowledged and verifies it at the end.
//!
//! A user whose cart comes back without an item it was acknowledged
//! before, or whose `/mypage` answers 401, was logged out or lost writes:
//! both are counted as they happen, not only at the end.
//!
//! A [`Plan`] sets the pace (a pause between requests, or a fixed rate),
//! the mix of reads and writes, whether a logged-out user logs in again (as
//! a person would), and an observer told about every answer (`tether demo`
//! draws its timelines from it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Logins again after being logged out ([`Plan::log_in_again`]).
    pub logins_again: u64,
    /// What went wrong, per user, for the test's message.
    pub problems: Vec<String>,
    /// Refusals by answer (status and the start of the body).
    pub refusals: std::collections::BTreeMap<String, u64>,
}

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `GET /mypage`.
    Read,
    /// `POST /cart` with a new item.
    Write,
    /// `POST /login` again, after the user found they were logged out.
    Login,
}

/// One answer a user saw, for a [`Plan`]'s observer.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The user (its index in the order they logged in).
    pub user: usize,
    /// When the request was sent.
    pub at: Instant,
    /// How long the answer took.
    pub took: Duration,
    /// What the request was.
    pub step: Step,
    /// The status, or `None` when no answer came.
    pub status: Option<u16>,
    /// The node that answered (`X-Tether-Node`).
    pub node: Option<String>,
    /// This answer showed the user logged out: a 401, or a cart without an
    /// item acknowledged before (the session was replaced by a new one).
    pub logged_out: bool,
}

/// Told about every answer, from the users' tasks.
pub type Observer = Arc<dyn Fn(Seen) + Send + Sync>;

/// How the users shop.
#[derive(Clone)]
pub struct Plan {
    /// Between one user's requests: a pause after each answer, or (`fixed_rate`)
    /// the time between the starts of its requests.
    pub pace: Duration,
    /// Whether `pace` is the mean time between starts (a fixed request
    /// rate) rather than a pause. Each gap is drawn between half and one
    /// and a half times `pace` (seeded per user): clients in step with each
    /// other would meet a round robin in the same order every round, and
    /// each would always land on the same node.
    pub fixed_rate: bool,
    /// Of every `reads + writes` requests, this many read `/mypage`…
    pub reads: u64,
    /// …and this many add an item.
    pub writes: u64,
    /// A user who finds they were logged out logs in again, as a person
    /// would, instead of going on with an anonymous session.
    pub log_in_again: bool,
    /// Told about every answer.
    pub observer: Option<Observer>,
}

impl Plan {
    /// Four writes for every read, `pause` after each answer, no observer:
    /// what the replication tests run.
    pub fn pausing(pause: Duration) -> Self {
        Self {
            pace: pause,
            fixed_rate: false,
            reads: 1,
            writes: 4,
            log_in_again: false,
            observer: None,
        }
    }

    /// Tells the observer, if any, what user `u` saw.
    fn tell(
        &self,
        u: usize,
        at: Instant,
        took: Duration,
        step: Step,
        answer: Option<&crate::Response>,
        logged_out: bool,
    ) {
        if let Some(observe) = &self.observer {
            observe(Seen {
                user: u,
                at,
                took,
                step,
                status: answer.map(|r| r.status.as_u16()),
                node: answer.and_then(crate::Response::node),
                logged_out,
            });
        }
    }

    /// Whether step `n` (from 1) of a user is a read.
    fn reads_at(&self, n: u64) -> bool {
        // With 1 read and 4 writes: steps 5, 10, … read, as the kit always did.
        n % (self.reads + self.writes).max(1) < self.reads
    }
}

struct Shopper {
    client: Client,
    member: u64,
    acked: Vec<String>,
    /// Acknowledged items already reported missing.
    missing: usize,
    requests: u64,
    refused: u64,
    logins_again: u64,
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

/// `POST /login` as `member`: `Ok` on 200, else what came back.
async fn log_in(client: &Client, base: &str, member: u64) -> Result<(), String> {
    let r = client
        .post_json(&format!("{base}/login"), &json!({ "member": member }))
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    if r.status == 200 {
        Ok(())
    } else {
        let body: String = r.text().chars().take(90).collect();
        Err(format!("{} {body}", r.status.as_u16()))
    }
}

impl Shoppers {
    /// Logs `n` users in through `base`, retrying refusals for up to 30 s.
    ///
    /// # Errors
    /// If a user cannot log in.
    pub async fn log_in(base: &str, n: usize) -> Result<Self> {
        let clients = (0..n).map(|_| Client::new()).collect();
        let (users, failed) = Self::log_in_as(base, clients, Duration::from_secs(30)).await;
        match failed.first() {
            Some(why) => Err(format!("a login failed: {why}").into()),
            None => Ok(users),
        }
    }

    /// Logs one user in per client (a client per address, say) through
    /// `base`, retrying refusals for up to `retry` each; returns the users
    /// who logged in and, for each who could not, what the last answer was.
    pub async fn log_in_as(
        base: &str,
        clients: Vec<Client>,
        retry: Duration,
    ) -> (Self, Vec<String>) {
        let mut users = Vec::with_capacity(clients.len());
        let mut failed = Vec::new();
        for (i, client) in clients.into_iter().enumerate() {
            let member = 1000 + i as u64;
            let deadline = Instant::now() + retry;
            let outcome = loop {
                match log_in(&client, base, member).await {
                    Ok(()) => break Ok(()),
                    Err(why) if Instant::now() >= deadline => break Err(why),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            match outcome {
                Ok(()) => users.push(Shopper {
                    client,
                    member,
                    acked: Vec::new(),
                    missing: 0,
                    requests: 0,
                    refused: 0,
                    logins_again: 0,
                    refusals: Default::default(),
                    problems: Vec::new(),
                }),
                Err(why) => failed.push(format!("member {member}: {why}")),
            }
        }
        let users = Self {
            base: base.to_string(),
            users,
        };
        (users, failed)
    }

    /// How many users logged in.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user logged in.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Every user adds items (one request at a time, `pause` between them)
    /// until `stop` says so; returns the users when they stopped.
    pub fn shop(self, pause: Duration, stop: watch::Receiver<bool>) -> Running {
        self.shop_with(Plan::pausing(pause), stop)
    }

    /// Every user shops as `plan` says until `stop` says so.
    pub fn shop_with(self, plan: Plan, stop: watch::Receiver<bool>) -> Running {
        let base: Arc<str> = self.base.into();
        let progress = Arc::new(AtomicU64::new(0));
        let count = self.users.len().max(1) as u32;
        let plan = Arc::new(plan);
        let tasks = self
            .users
            .into_iter()
            .enumerate()
            .map(|(u, mut s)| {
                let base = base.clone();
                let mut stop = stop.clone();
                let progress = progress.clone();
                let plan = plan.clone();
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(u as u64);
                    // At a fixed rate, the users' first requests are spread
                    // over one period: no burst of every user at once.
                    let first = if plan.fixed_rate {
                        plan.pace / count * u as u32
                    } else {
                        Duration::ZERO
                    };
                    let mut next = tokio::time::Instant::now() + first;
                    let mut n = 0u64;
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep_until(next) => {}
                            changed = stop.changed() => {
                                // Whoever could say stop is gone (a run
                                // that failed half-way): stop, rather than
                                // spin on a channel that is always ready.
                                if changed.is_err() {
                                    break;
                                }
                            }
                        }
                        if *stop.borrow_and_update() {
                            break;
                        }
                        n += 1;
                        let before = s.acked.len();
                        s.step(&base, u, n, &plan).await;
                        progress.fetch_add((s.acked.len() - before) as u64, Ordering::Relaxed);
                        next = if plan.fixed_rate {
                            // A slow answer delays the next request rather
                            // than bunching the missed ones together.
                            let gap = plan.pace.mul_f64(0.5 + rng.f64());
                            (next + gap).max(tokio::time::Instant::now())
                        } else {
                            tokio::time::Instant::now() + plan.pace
                        };
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

    async fn step(&mut self, base: &str, u: usize, n: u64, plan: &Plan) {
        self.requests += 1;
        let at = Instant::now();
        let (step, r) = if plan.reads_at(n) {
            (Step::Read, self.client.get(&format!("{base}/mypage")).await)
        } else {
            let item = format!("u{u}-{n}");
            let url = format!("{base}/cart");
            let r = self.client.post_json(&url, &json!({ "item": item })).await;
            (Step::Write, r)
        };
        let took = at.elapsed();
        let logged_out = match &r {
            Ok(r) if r.status == 200 && step == Step::Write => self.take_cart(u, n, r),
            Ok(r) if r.status == 200 => false,
            Ok(r) if r.status == 401 => {
                self.problems.push(format!(
                    "user {u}: 401 on /mypage after {} items",
                    self.acked.len()
                ));
                true
            }
            Ok(r) => {
                let body: String = r.text().chars().take(90).collect();
                self.refuse(format!("{} {body}", r.status.as_u16()));
                false
            }
            Err(e) => {
                self.refuse(format!("no answer: {e}"));
                false
            }
        };
        plan.tell(u, at, took, step, r.as_ref().ok(), logged_out);
        if logged_out && plan.log_in_again {
            self.log_in_again(base, u, plan).await;
        }
    }

    /// Reads the cart a write answered: keeps the item if it is there;
    /// returns whether items acknowledged before are missing (the session
    /// was replaced: the user was logged out).
    fn take_cart(&mut self, u: usize, n: u64, r: &crate::Response) -> bool {
        let Some(cart) = r.json().ok().as_ref().and_then(cart_of) else {
            self.problems
                .push(format!("user {u}: a 200 without a cart: {}", r.text()));
            return false;
        };
        let missing = self.acked.iter().filter(|i| !cart.contains(i)).count();
        let lost_more = missing > self.missing;
        if lost_more {
            self.problems.push(format!(
                "user {u}: the cart lost {missing} of {} acknowledged items (served by {:?})",
                self.acked.len(),
                r.node()
            ));
            self.missing = missing;
        }
        let item = format!("u{u}-{n}");
        if cart.contains(&item) {
            self.acked.push(item);
        }
        lost_more
    }

    async fn log_in_again(&mut self, base: &str, u: usize, plan: &Plan) {
        self.requests += 1;
        self.logins_again += 1;
        let at = Instant::now();
        let url = format!("{base}/login");
        let r = self
            .client
            .post_json(&url, &json!({ "member": self.member }))
            .await;
        plan.tell(u, at, at.elapsed(), Step::Login, r.as_ref().ok(), false);
        match r {
            // A new session, an empty cart: what was acknowledged before is
            // gone from this user's view, and already counted.
            Ok(r) if r.status == 200 => self.missing = self.acked.len(),
            Ok(r) => {
                let body: String = r.text().chars().take(90).collect();
                self.refuse(format!("{} {body}", r.status.as_u16()));
            }
            Err(e) => self.refuse(format!("no answer: {e}")),
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

/// Users nobody checked (a run that failed half-way) stop with it.
impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
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
    /// If a user task panicked, or a user's cart could not be read for 30 s.
    pub async fn check(mut self) -> Result<Tally> {
        let mut tally = Tally::default();
        for t in std::mem::take(&mut self.tasks) {
            let mut s = t.await?;
            tally.users += 1;
            tally.requests += s.requests;
            tally.refused += s.refused;
            tally.logins_again += s.logins_again;
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
            // One unanswered look is this user's problem, not the run's.
            match s.client.get(&format!("{}/mypage", self.base)).await {
                Ok(me) if me.status == 200 => {}
                Ok(me) => s.problems.push(format!(
                    "member {}: /mypage {} at the end",
                    s.member, me.status
                )),
                Err(e) => s.problems.push(format!(
                    "member {}: /mypage unanswered at the end: {e}",
                    s.member
                )),
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
