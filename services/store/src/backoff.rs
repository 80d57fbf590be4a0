//! The one retry policy of every eventfold process: exponential, capped and
//! jittered. Background loops (the listener here, the relay, projectors,
//! consumers, the saga orchestrator) and per-item retries (a poison event, a
//! conflict) all use it; `eventfold_platform::runtime` re-exports it beside
//! the supervisor that drives most of them.

use std::time::Duration;

/// A retry policy: the `n`th wait is `first × factor^n`, at most `max`,
/// with up to `jitter` of it taken off at random so that many retriers do
/// not knock on a recovering dependency in step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub factor: u32,
    /// Share (0 to 1) of each wait that may be taken off at random.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { first: Duration::from_millis(100), max: Duration::from_secs(5), factor: 2, jitter: 0.2 }
    }
}

impl Backoff {
    /// Waits from `first` to `max`, doubling, with the default jitter.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, ..Self::default() }
    }

    /// The same policy without jitter (waits exactly as computed).
    pub fn exact(self) -> Self {
        Self { jitter: 0.0, ..self }
    }

    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let growth = self.factor.max(1).checked_pow(attempt.min(32)).unwrap_or(u32::MAX);
        let full = self.first.checked_mul(growth).unwrap_or(self.max).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return full;
        }
        full.mul_f64(1.0 - jitter * random_unit())
    }

    /// A fresh sequence of waits for one run of retries.
    pub fn start(&self) -> Retries {
        Retries { policy: *self, attempt: 0 }
    }
}

/// The waits of one run of retries (see [`Backoff::start`]).
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    attempt: u32,
}

impl Retries {
    /// The next wait; each call waits longer, up to the policy's `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Sleep the next wait.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A number in [0, 1) good enough to spread retries (not for secrets).
fn random_unit() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() >> 75;
    // 53 random bits over 2^53.
    #[allow(clippy::cast_precision_loss)]
    let unit = (bits as f64) / ((1u64 << 53) as f64);
    unit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_jitter_only_shortens_them() {
        let exact = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).exact();
        let waits: Vec<_> = (0..6).map(|n| exact.delay(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(exact.delay(u32::MAX), Duration::from_secs(1));
        let jittered = Backoff { jitter: 0.5, ..exact };
        for n in 0..50 {
            let d = jittered.delay(n % 6);
            let full = exact.delay(n % 6);
            assert!(d <= full && d >= full / 2, "{d:?} outside [{:?}, {full:?}]", full / 2);
        }
        let mut retries = exact.start();
        assert_eq!(retries.next_delay(), Duration::from_millis(100));
        assert_eq!(retries.next_delay(), Duration::from_millis(200));
        retries.reset();
        assert_eq!(retries.next_delay(), Duration::from_millis(100));
    }
}
