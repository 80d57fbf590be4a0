//! A circuit breaker in front of Redis: after `failures` consecutive errors
//! or slow answers it opens and every call skips Redis; after `cool_down`
//! one call is let through (half-open) and its outcome closes or reopens it.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The breaker's state, as the `eventfold_cache_breaker_state` gauge shows
/// it (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    /// A half-open trial is under way.
    probing: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Breaker {
    failures: u32,
    cool_down: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub(crate) fn new(failures: u32, cool_down: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cool_down,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: None,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether a call may go to Redis now. When it returns true, the caller
    /// must report the outcome with [`Breaker::success`] or
    /// [`Breaker::failure`].
    pub(crate) fn allow(&self) -> bool {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if inner.opened_at.is_some_and(|at| at.elapsed() >= self.cool_down) {
                    inner.state = BreakerState::HalfOpen;
                    inner.probing = true;
                    publish(BreakerState::HalfOpen);
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if inner.probing {
                    false
                } else {
                    inner.probing = true;
                    true
                }
            }
        }
    }

    pub(crate) fn success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        inner.probing = false;
        if inner.state != BreakerState::Closed {
            tracing::info!("Redis answers again: cache circuit closed");
            inner.state = BreakerState::Closed;
            inner.opened_at = None;
            publish(BreakerState::Closed);
        }
    }

    pub(crate) fn failure(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        inner.probing = false;
        let open = match inner.state {
            BreakerState::Closed => inner.consecutive_failures >= self.failures,
            BreakerState::HalfOpen | BreakerState::Open => true,
        };
        if open {
            if inner.state == BreakerState::Closed {
                tracing::warn!(failures = inner.consecutive_failures, "Redis failing: cache circuit open");
            }
            inner.state = BreakerState::Open;
            inner.opened_at = Some(Instant::now());
            publish(BreakerState::Open);
        }
    }
}

fn publish(state: BreakerState) {
    metrics::gauge!("eventfold_cache_breaker_state").set(f64::from(state as u8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_half_opens_after_cool_down_and_closes_on_success() {
        let breaker = Breaker::new(2, Duration::from_millis(30));
        assert!(breaker.allow());
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Closed, "one failure is not enough");
        assert!(breaker.allow());
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow(), "open: calls skip Redis");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow(), "after the cool-down one trial goes through");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(!breaker.allow(), "only one trial at a time");
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Open, "a failed trial reopens");
        assert!(!breaker.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow());
        breaker.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow() && breaker.allow());
    }
}
