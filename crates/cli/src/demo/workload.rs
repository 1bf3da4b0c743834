//! The users of a run and the clock they run against: each logs in from an
//! address of its own (so `ip-hash` spreads them as it would real clients),
//! then shops at a fixed pace (three reads of `/mypage` for each write to
//! `/cart`) until told to stop; a logged-out user logs in again, as a
//! person would. Every answer is recorded with its time; every
//! acknowledged item is checked at the end (the test kit's [`Shoppers`]).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tether_testkit::{Client, Plan, Running, Seen, Shoppers, Tally};
use tokio::sync::watch;

/// A client whose address is its own: a loopback address drawn from the
/// user's number (seeded, so every run has the same ones). Real clients'
/// addresses are scattered, not consecutive; `ip-hash` spreads them as it
/// would real clients, unevenly.
pub(crate) fn user_client(i: usize) -> Client {
    let mut rng = fastrand::Rng::with_seed(i as u64);
    let ip = IpAddr::from([127, rng.u8(..), rng.u8(..), rng.u8(1..255)]);
    Client::from_address(ip)
}

/// The brief's scenario: log in, then the next page. Returns the node
/// that served each and whether the user was still logged in.
pub(crate) async fn log_in_then_next_page(base: &str) -> (String, String, bool) {
    // An address none of the shoppers has.
    let user = user_client(100_000);
    let Ok(login) = user
        .post_json(&format!("{base}/login"), &json!({"member": 1}))
        .await
    else {
        return Default::default();
    };
    let login_node = login.node().unwrap_or_default();
    if login.status != 200 {
        // A refused login says nothing of the next server.
        return (login_node, String::new(), false);
    }
    match user.get(&format!("{base}/mypage")).await {
        Ok(next) => (
            login_node,
            next.node().unwrap_or_default(),
            next.status == 200,
        ),
        Err(_) => (login_node, String::new(), false),
    }
}

/// Logs `n` users in through `base`; returns them and, for each user who
/// could not log in, why. A refused login is tried again for a moment: a
/// ready fleet that refuses longer than that is a finding, reported as such.
pub(crate) async fn log_in(base: &str, n: usize) -> (Shoppers, Vec<String>) {
    let clients = (0..n).map(user_client).collect();
    Shoppers::log_in_as(base, clients, Duration::from_millis(300)).await
}

/// Users shopping, against a clock that started when they did.
pub(crate) struct Shopping {
    t0: Instant,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: watch::Sender<bool>,
    running: Running,
}

impl Shopping {
    /// `users` start shopping: `rate` requests per second, all together.
    pub(crate) fn start(users: Shoppers, rate: u32) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let sink = seen.clone();
        let per_user = Duration::from_secs_f64(users.len().max(1) as f64 / f64::from(rate.max(1)));
        let plan = Plan {
            pace: per_user,
            fixed_rate: true,
            reads: 3,
            writes: 1,
            log_in_again: true,
            observer: Some(Arc::new(move |s| {
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(s);
            })),
        };
        let (stop, stopped) = watch::channel(false);
        let t0 = Instant::now();
        let running = users.shop_with(plan, stopped);
        Self {
            t0,
            seen,
            stop,
            running,
        }
    }

    /// When the users started.
    pub(crate) fn t0(&self) -> Instant {
        self.t0
    }

    /// Time since the users started.
    pub(crate) fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Waits until `at` after the users started (at once if that passed).
    pub(crate) async fn until(&self, at: Duration) {
        tokio::time::sleep_until((self.t0 + at).into()).await;
    }

    /// Waits until no request has failed for `quiet` (counting from now at
    /// the earliest) while the users were being served, or until `cap`
    /// passed. Silence is not recovery: requests that hang answer nothing,
    /// so the quiet must also hold successful answers.
    pub(crate) async fn quiet_for(&self, quiet: Duration, cap: Duration) {
        // Enough answers to say the fleet serves, not one lucky request.
        const SERVED: usize = 10;
        let (from, deadline) = (Instant::now(), Instant::now() + cap);
        loop {
            let (since, served) = {
                let seen = self
                    .seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let since = seen
                    .iter()
                    .rev()
                    .find(|s| !s.logged_out && !matches!(s.status, Some(200..=299)))
                    .map_or(from, |s| (s.at + s.took).max(from));
                let served = seen
                    .iter()
                    .rev()
                    .take_while(|s| s.at + s.took > since)
                    .filter(|s| matches!(s.status, Some(200..=299)))
                    .count();
                (since, served)
            };
            if (since.elapsed() >= quiet && served >= SERVED) || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the users (each finishes the request it is in) and returns
    /// how long they shopped.
    pub(crate) fn stop(&self) -> Duration {
        let _ = self.stop.send(true);
        self.t0.elapsed()
    }

    /// Checks every user's cart and login after [`Shopping::stop`]; returns
    /// what they saw and every answer.
    ///
    /// # Errors
    /// If a cart cannot be read for 30 s.
    pub(crate) async fn check(self) -> Result<(Tally, Vec<Seen>), String> {
        let _ = self.stop.send(true);
        let tally = self.running.check().await.map_err(|e| e.to_string())?;
        let seen = std::mem::take(
            &mut *self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Ok((tally, seen))
    }
}
