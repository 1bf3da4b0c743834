//! The attempt policy: which backend to try next, and when to give up. A
//! pure state machine (no I/O, time passed in), so every retry rule is a
//! unit test.
//!
//! - A connect failure moves to the next candidate: nothing was sent.
//! - A kept-alive connection that turns out closed (nothing reached the
//!   application) is retried once on a fresh connection to the same backend.
//! - Any other failure before the response head moves on only when the
//!   request can be replayed: an idempotent method and a body the balancer
//!   still holds.
//! - Tries are bounded by `retry.tries`, and retries by the `retry.timeout_ms`
//!   budget counted from the first try.

use std::time::{Duration, Instant};

use super::refusal::Refusal;

/// How one try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection could be opened.
    Connect,
    /// No response head in time.
    Timeout,
    /// Reset, closed or invalid before a usable response head.
    Broken,
}

impl Failure {
    /// The client's answer when this was the last failure.
    pub(crate) fn refusal(self) -> Refusal {
        match self {
            Self::Connect => Refusal::Unreachable,
            Self::Timeout => Refusal::Timeout,
            Self::Broken => Refusal::BadGateway,
        }
    }
}

/// The next thing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Try candidate `slot` (an index into the plan's candidates).
    Try {
        /// Index into the candidates.
        slot: usize,
        /// Open a new connection instead of taking a pooled one.
        fresh: bool,
        /// It counts as a retry (a different backend after a failure).
        retry: bool,
        /// How long to wait for the response head.
        wait: Duration,
    },
    /// Stop; answer with this failure's refusal.
    GiveUp(Failure),
}

/// The state of one request's tries.
#[derive(Debug)]
pub(crate) struct Attempts {
    /// Candidates that may be tried (fewer than the plan's when `tries` caps it).
    limit: usize,
    slot: usize,
    fresh: bool,
    last: Failure,
    replayable: bool,
    idempotent: bool,
    first: Instant,
    budget: Duration,
    per_try: Duration,
    over: bool,
}

impl Attempts {
    /// Tries for a request with `candidates` usable backends, first tried at
    /// `first`. `replayable`: the balancer holds the whole body (or there is none).
    pub(crate) fn new(
        candidates: usize,
        tries: u32,
        (budget, per_try): (Duration, Duration),
        first: Instant,
        replayable: bool,
        idempotent: bool,
    ) -> Self {
        Self {
            limit: candidates.min(usize::try_from(tries).unwrap_or(usize::MAX)),
            slot: 0,
            fresh: false,
            last: Failure::Connect,
            replayable,
            idempotent,
            first,
            budget,
            per_try,
            over: false,
        }
    }

    /// Tries for a request under the `retry` settings.
    pub(crate) fn for_request(
        retry: &crate::config::RetryConfig,
        candidates: usize,
        first: Instant,
        replayable: bool,
        idempotent: bool,
    ) -> Self {
        let ms = crate::config::Config::ms;
        let times = (ms(retry.timeout_ms), ms(retry.response_timeout_ms));
        Self::new(
            candidates,
            retry.tries,
            times,
            first,
            replayable,
            idempotent,
        )
    }

    /// What to do at `now`.
    pub(crate) fn next(&mut self, now: Instant) -> Step {
        if self.over || self.slot >= self.limit {
            return Step::GiveUp(self.last);
        }
        let remaining = self
            .budget
            .saturating_sub(now.saturating_duration_since(self.first));
        let retry = self.slot > 0 && !self.fresh;
        if retry && remaining.is_zero() {
            return Step::GiveUp(self.last);
        }
        let wait = if self.slot == 0 {
            self.per_try
        } else {
            self.per_try.min(remaining.max(Duration::from_millis(1)))
        };
        Step::Try {
            slot: self.slot,
            fresh: self.fresh,
            retry,
            wait,
        }
    }

    /// Whether nothing has been tried yet (the first try is timed from
    /// the request's planning, later ones from when they start).
    pub(crate) fn untried(&self) -> bool {
        self.slot == 0 && !self.fresh
    }

    /// The connection could not be opened.
    pub(crate) fn connect_failed(&mut self) {
        self.last = Failure::Connect;
        self.fresh = false;
        self.slot += 1;
    }

    /// The try failed after connecting. `maybe_unsent`: a kept-alive
    /// connection failed before the application can have seen the request.
    /// Returns whether the failure counts against the backend (a stale
    /// pooled connection does not).
    pub(crate) fn failed(&mut self, failure: Failure, maybe_unsent: bool) -> bool {
        if maybe_unsent && self.replayable && !self.fresh {
            self.fresh = true;
            return false;
        }
        self.last = failure;
        if !self.idempotent || !self.replayable {
            self.over = true;
        }
        self.fresh = false;
        self.slot += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn attempts(candidates: usize, replayable: bool, idempotent: bool) -> (Attempts, Instant) {
        let t0 = Instant::now();
        let a = Attempts::new(candidates, 3, (15 * S, 60 * S), t0, replayable, idempotent);
        (a, t0)
    }

    fn slot(step: Step) -> (usize, bool, bool) {
        match step {
            Step::Try {
                slot, fresh, retry, ..
            } => (slot, fresh, retry),
            Step::GiveUp(f) => panic!("gave up: {f:?}"),
        }
    }

    #[test]
    fn connect_failures_walk_the_candidates_up_to_the_try_limit() {
        let (mut a, t0) = attempts(5, false, false);
        assert_eq!(slot(a.next(t0)), (0, false, false));
        a.connect_failed();
        assert_eq!(slot(a.next(t0)), (1, false, true));
        a.connect_failed();
        assert_eq!(slot(a.next(t0)), (2, false, true));
        a.connect_failed();
        assert_eq!(a.next(t0), Step::GiveUp(Failure::Connect));
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_once_fresh_on_the_same_backend() {
        let (mut a, t0) = attempts(2, true, false);
        a.next(t0);
        assert!(!a.failed(Failure::Broken, true), "not the backend's fault");
        assert_eq!(slot(a.next(t0)), (0, true, false));
        // Failing again on the fresh connection is real: a POST stops there.
        assert!(a.failed(Failure::Broken, true));
        assert_eq!(a.next(t0), Step::GiveUp(Failure::Broken));
    }

    #[test]
    fn only_replayable_idempotent_requests_move_on_after_a_failure() {
        for (replayable, idempotent, moves) in [
            (true, true, true),
            (true, false, false),
            (false, true, false),
        ] {
            let (mut a, t0) = attempts(3, replayable, idempotent);
            a.next(t0);
            a.failed(Failure::Timeout, false);
            let step = a.next(t0);
            assert_eq!(
                matches!(step, Step::Try { slot: 1, .. }),
                moves,
                "{replayable} {idempotent}: {step:?}"
            );
            if !moves {
                assert_eq!(step, Step::GiveUp(Failure::Timeout));
            }
        }
        // A streamed body is gone after its one try, even on a stale
        // pooled connection.
        let (mut a, t0) = attempts(3, false, true);
        a.next(t0);
        assert!(a.failed(Failure::Broken, true));
        assert_eq!(a.next(t0), Step::GiveUp(Failure::Broken));
    }

    #[test]
    fn retries_stop_when_the_budget_is_spent_and_wait_no_longer_than_it() {
        let (mut a, t0) = attempts(3, true, true);
        a.next(t0);
        a.failed(Failure::Broken, false);
        match a.next(t0 + 14 * S) {
            Step::Try { wait, retry, .. } => assert!(retry && wait == S, "{wait:?}"),
            s => panic!("{s:?}"),
        }
        a.failed(Failure::Broken, false);
        assert_eq!(a.next(t0 + 16 * S), Step::GiveUp(Failure::Broken));
    }
}
