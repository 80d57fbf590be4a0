//! The sagas as pure state machines: which step runs next, given how the
//! last one ended. No I/O and no clock: the orchestrator runs the steps,
//! keeps the time and persists [`SagaState`] after every transition, so a
//! restart resumes from the last persisted state.
//!
//! A forward step that fails for good (a decline, a business rule) has no
//! effect to undo, unless it is made of several commands of which some
//! may have succeeded (reserving each product of an order). One that timed
//! out, or kept failing in a way worth a retry, may have had its effect (the provider may have authorized before
//! the answer was lost), so its compensation runs too: compensations are
//! idempotent, and undoing what did not happen is a no-op.

use std::time::Duration;

use eventfold_store::Backoff;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The kinds of saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaType {
    /// reserve inventory → authorize payment → create shipping label →
    /// confirm order; compensated by cancel label → void authorization →
    /// release inventory → cancel order.
    OrderFulfilment,
    /// withdraw from the source → deposit to the target; compensated by
    /// refunding the source.
    MoneyTransfer,
}

impl SagaType {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaType::OrderFulfilment => "ORDER_FULFILMENT",
            SagaType::MoneyTransfer => "MONEY_TRANSFER",
        }
    }

    /// The forward steps, in order.
    pub fn forward(self) -> &'static [Step] {
        match self {
            SagaType::OrderFulfilment => {
                &[Step::ReserveInventory, Step::AuthorizePayment, Step::CreateShippingLabel, Step::ConfirmOrder]
            }
            SagaType::MoneyTransfer => &[Step::Withdraw, Step::Deposit],
        }
    }

    /// The compensation that always ends a failed saga of this type, after
    /// the undoing of each effect (an order that cannot be fulfilled is
    /// cancelled, with the reason).
    fn closing_compensation(self) -> Option<Step> {
        match self {
            SagaType::OrderFulfilment => Some(Step::CancelOrder),
            SagaType::MoneyTransfer => None,
        }
    }
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Running,
    Compensating,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "RUNNING",
            Status::Compensating => "COMPENSATING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// Every step of every saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Step {
    ReserveInventory,
    AuthorizePayment,
    CreateShippingLabel,
    ConfirmOrder,
    CancelShippingLabel,
    VoidAuthorization,
    ReleaseInventory,
    CancelOrder,
    Withdraw,
    Deposit,
    RefundSource,
}

impl Step {
    /// UPPER_SNAKE_CASE, as stored and as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::ReserveInventory => "RESERVE_INVENTORY",
            Step::AuthorizePayment => "AUTHORIZE_PAYMENT",
            Step::CreateShippingLabel => "CREATE_SHIPPING_LABEL",
            Step::ConfirmOrder => "CONFIRM_ORDER",
            Step::CancelShippingLabel => "CANCEL_SHIPPING_LABEL",
            Step::VoidAuthorization => "VOID_AUTHORIZATION",
            Step::ReleaseInventory => "RELEASE_INVENTORY",
            Step::CancelOrder => "CANCEL_ORDER",
            Step::Withdraw => "WITHDRAW",
            Step::Deposit => "DEPOSIT",
            Step::RefundSource => "REFUND_SOURCE",
        }
    }

    /// The step that undoes this one's effect, if it has one to undo. The
    /// last forward step of a saga has none: nothing after it can fail.
    pub fn compensation(self) -> Option<Step> {
        match self {
            Step::ReserveInventory => Some(Step::ReleaseInventory),
            Step::AuthorizePayment => Some(Step::VoidAuthorization),
            Step::CreateShippingLabel => Some(Step::CancelShippingLabel),
            Step::Withdraw => Some(Step::RefundSource),
            _ => None,
        }
    }

    /// Whether a rejection may leave part of the step's effect in place:
    /// reserving an order's products is one command per product, and the
    /// second may be refused after the first reserved.
    pub fn partial_when_rejected(self) -> bool {
        matches!(self, Step::ReserveInventory)
    }

    /// The idempotency key of this step of saga `saga_id`: the same for
    /// every attempt, so that a retry, a redelivered event or a restart
    /// never applies the step twice (the command bus and the providers
    /// answer a key they have seen with the first answer). Doing and
    /// undoing are different steps, so they have different keys.
    pub fn request_id(self, saga_id: &str) -> String {
        format!("saga:{saga_id}:{}", self.as_str().to_ascii_lowercase())
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect is in place.
    Done,
    /// Refused for good (a decline, a business rule): a retry cannot help,
    /// and nothing happened. `reason` is an UPPER_SNAKE_CASE code, e.g.
    /// `PAYMENT_DECLINED`.
    Rejected { reason: String },
    /// Failed in a way worth a retry (a dependency away, a conflict); the
    /// effect may or may not be in place.
    Transient { error: String },
    /// No answer before the step's deadline; the effect may or may not be
    /// in place.
    TimedOut,
}

/// Retries of a step: exponential backoff ([`Backoff`]) with jitter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts of a forward step before the saga compensates.
    /// Compensations are retried until they succeed (or an operator
    /// aborts the saga).
    pub max_attempts: u32,
    /// The pause after the first failure, doubled after each further one.
    pub base_ms: u64,
    /// The longest pause.
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, base_ms: 100, max_delay_ms: 10_000 }
    }
}

impl RetryPolicy {
    /// The exponential waits of this policy, from `base_ms` up to
    /// `max_delay_ms`, without a random part (see [`RetryPolicy::delay`]).
    pub fn backoff(&self) -> Backoff {
        let first = Duration::from_millis(self.base_ms);
        Backoff::new(first, Duration::from_millis(self.max_delay_ms).max(first)).exact()
    }

    /// The pause after failure number `failures` (1 for the first): half
    /// of the backoff's wait, plus up to the other half by `jitter` (0..1),
    /// so sagas that failed together do not retry together, while a
    /// replayed transition waits the same.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let full = self.backoff().delay(failures.saturating_sub(1));
        let half = full.checked_div(2).unwrap_or_default();
        half.saturating_add(half.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

/// A jitter in 0..1 that differs between sagas and attempts but is the same
/// for the same ones (no random source: a replayed transition waits the
/// same).
pub fn jitter(saga_id: &str, step: Step, failures: u32) -> f64 {
    let digest = Sha256::new()
        .chain_update(saga_id.as_bytes())
        .chain_update(step.as_str().as_bytes())
        .chain_update(failures.to_be_bytes())
        .finalize();
    // A SHA-256 digest has 32 bytes: the first 8 are always there.
    let n = digest.first_chunk().copied().map_or(0, u64::from_be_bytes);
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// What the orchestrator does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Run this step now.
    Run(Step),
    /// Run this step again after the pause.
    RetryAfter(Step, Duration),
    /// The saga ended with this status.
    Finished(Status),
}

/// A saga's progress: everything the orchestrator persists besides the
/// saga's own data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub saga_type: SagaType,
    pub status: Status,
    /// The step running or due; None once finished.
    pub step: Option<Step>,
    /// Failed attempts of the current step.
    pub failures: u32,
    /// Forward steps whose effect is, or may be, in place, in order.
    pub effects: Vec<Step>,
    /// The compensations still to run after the current one, in order.
    pub pending: Vec<Step>,
    /// Why the saga compensates: an UPPER_SNAKE_CASE code.
    pub reason: Option<String>,
    /// Compensations that were refused for good (the saga then needs an
    /// operator), as `STEP: reason`.
    pub compensation_errors: Vec<String>,
}

impl SagaState {
    /// A new saga of `saga_type`, and its first step.
    pub fn start(saga_type: SagaType) -> (SagaState, Next) {
        let first = saga_type.forward()[0];
        let state = SagaState {
            saga_type,
            status: Status::Running,
            step: Some(first),
            failures: 0,
            effects: Vec::new(),
            pending: Vec::new(),
            reason: None,
            compensation_errors: Vec::new(),
        };
        (state, Next::Run(first))
    }

    /// Whether a failed saga undid everything it had done.
    pub fn compensated(&self) -> bool {
        self.status == Status::Failed && self.compensation_errors.is_empty()
    }

    /// The transition for `outcome` of the current step. `jitter` (0..1)
    /// spreads the retry pause (see [`jitter`]). A finished saga stays
    /// finished whatever it is told.
    pub fn on_outcome(&mut self, outcome: Outcome, policy: &RetryPolicy, jitter: f64) -> Next {
        let Some(step) = self.step else {
            return Next::Finished(self.status);
        };
        match (self.status, outcome) {
            (Status::Running, Outcome::Done) => {
                self.effects.push(step);
                self.failures = 0;
                match self.next_forward(step) {
                    Some(next) => {
                        self.step = Some(next);
                        Next::Run(next)
                    }
                    None => self.finish(Status::Completed),
                }
            }
            (Status::Running, Outcome::Rejected { reason }) => {
                if step.partial_when_rejected() {
                    self.effects.push(step);
                }
                self.compensate(reason)
            }
            (Status::Running, Outcome::TimedOut) => {
                self.effects.push(step);
                self.compensate(format!("{}_TIMED_OUT", step.as_str()))
            }
            (Status::Running, Outcome::Transient { .. }) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < policy.max_attempts.max(1) {
                    Next::RetryAfter(step, policy.delay(self.failures, jitter))
                } else {
                    self.effects.push(step);
                    self.compensate(format!("{}_FAILED", step.as_str()))
                }
            }
            (Status::Compensating, Outcome::Done) => self.next_compensation(),
            (Status::Compensating, Outcome::Rejected { reason }) => {
                self.compensation_errors.push(format!("{}: {reason}", step.as_str()));
                self.next_compensation()
            }
            (Status::Compensating, Outcome::Transient { .. } | Outcome::TimedOut) => {
                self.failures = self.failures.saturating_add(1);
                Next::RetryAfter(step, policy.delay(self.failures, jitter))
            }
            (Status::Completed | Status::Failed, _) => Next::Finished(self.status),
        }
    }

    /// An operator's abort: compensate what was done (reason
    /// `ABORTED`), unless the saga already finished or compensates.
    pub fn abort(&mut self) -> Option<Next> {
        (self.status == Status::Running).then(|| self.compensate("ABORTED".to_owned()))
    }

    /// An operator's retry of a failed saga whose compensations were
    /// refused: runs them again. None when there is nothing to retry.
    pub fn retry(&mut self) -> Option<Next> {
        if self.status != Status::Failed || self.compensation_errors.is_empty() {
            return None;
        }
        let mut again: Vec<Step> = self
            .compensation_errors
            .iter()
            .filter_map(|e| e.split_once(':').and_then(|(s, _)| step_named(s)))
            .collect();
        // `pending` is popped from the end.
        again.reverse();
        let first = again.pop()?;
        self.compensation_errors.clear();
        self.pending = again;
        self.status = Status::Compensating;
        self.step = Some(first);
        self.failures = 0;
        Some(Next::Run(first))
    }

    fn next_forward(&self, step: Step) -> Option<Step> {
        let forward = self.saga_type.forward();
        let at = forward.iter().position(|s| *s == step)?;
        forward.get(at.checked_add(1)?).copied()
    }

    /// Starts compensating: every effect undone in reverse order, then the
    /// saga type's closing compensation.
    fn compensate(&mut self, reason: String) -> Next {
        self.reason = Some(reason);
        self.status = Status::Compensating;
        self.pending = self
            .effects
            .iter()
            .rev()
            .filter_map(|s| s.compensation())
            .chain(self.saga_type.closing_compensation())
            .collect();
        self.pending.reverse();
        self.next_compensation()
    }

    fn next_compensation(&mut self) -> Next {
        self.failures = 0;
        match self.pending.pop() {
            Some(next) => {
                self.step = Some(next);
                Next::Run(next)
            }
            None => self.finish(Status::Failed),
        }
    }

    fn finish(&mut self, status: Status) -> Next {
        self.status = status;
        self.step = None;
        self.failures = 0;
        Next::Finished(status)
    }
}

/// The step named `name` (as [`Step::as_str`] writes it).
pub fn step_named(name: &str) -> Option<Step> {
    ALL_STEPS.iter().copied().find(|s| s.as_str() == name)
}

const ALL_STEPS: [Step; 11] = [
    Step::ReserveInventory,
    Step::AuthorizePayment,
    Step::CreateShippingLabel,
    Step::ConfirmOrder,
    Step::CancelShippingLabel,
    Step::VoidAuthorization,
    Step::ReleaseInventory,
    Step::CancelOrder,
    Step::Withdraw,
    Step::Deposit,
    Step::RefundSource,
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 3, base_ms: 100, max_delay_ms: 1_000 }
    }

    /// Runs `outcomes` in order from a new saga; the steps that ran and the
    /// end state.
    fn run(saga_type: SagaType, outcomes: &[Outcome]) -> (Vec<Step>, SagaState) {
        let (mut state, mut next) = SagaState::start(saga_type);
        let mut ran = Vec::new();
        for outcome in outcomes {
            match next {
                Next::Run(step) | Next::RetryAfter(step, _) => ran.push(step),
                Next::Finished(_) => panic!("finished before {outcome:?}"),
            }
            next = state.on_outcome(outcome.clone(), &policy(), 0.5);
        }
        assert!(matches!(next, Next::Finished(_)), "not finished: {next:?}");
        (ran, state)
    }

    fn rejected(reason: &str) -> Outcome {
        Outcome::Rejected { reason: reason.to_owned() }
    }

    fn transient() -> Outcome {
        Outcome::Transient { error: "unavailable".to_owned() }
    }

    use Outcome::{Done, TimedOut};
    use Step::*;

    #[test]
    fn the_happy_path_runs_every_forward_step_once() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[Done, Done, Done, Done]);
        assert_eq!(ran, [ReserveInventory, AuthorizePayment, CreateShippingLabel, ConfirmOrder]);
        assert_eq!(state.status, Status::Completed);
        assert_eq!(state.step, None);
        assert!(!state.compensated());
    }

    #[test]
    fn scarce_stock_releases_what_was_reserved_and_cancels() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[rejected("INSUFFICIENT_STOCK"), Done, Done]);
        assert_eq!(ran, [ReserveInventory, ReleaseInventory, CancelOrder], "other products may be reserved");
        assert_eq!(state.reason.as_deref(), Some("INSUFFICIENT_STOCK"));
        assert!(state.compensated());
    }

    #[test]
    fn a_decline_releases_the_inventory_and_cancels_the_order_with_its_reason() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[Done, rejected("PAYMENT_DECLINED"), Done, Done]);
        assert_eq!(ran, [ReserveInventory, AuthorizePayment, ReleaseInventory, CancelOrder]);
        assert_eq!(state.status, Status::Failed);
        assert_eq!(state.reason.as_deref(), Some("PAYMENT_DECLINED"));
        assert!(state.compensated());
    }

    #[test]
    fn a_carrier_failure_voids_releases_and_cancels_in_reverse() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[Done, Done, rejected("LABEL_REJECTED"), Done, Done, Done]);
        assert_eq!(
            ran,
            [ReserveInventory, AuthorizePayment, CreateShippingLabel, VoidAuthorization, ReleaseInventory, CancelOrder]
        );
        assert!(state.compensated());
    }

    #[test]
    fn a_timed_out_step_is_undone_too_because_it_may_have_happened() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[Done, TimedOut, Done, Done, Done]);
        assert_eq!(ran, [ReserveInventory, AuthorizePayment, VoidAuthorization, ReleaseInventory, CancelOrder]);
        assert_eq!(state.reason.as_deref(), Some("AUTHORIZE_PAYMENT_TIMED_OUT"));
        assert!(state.compensated());
    }

    #[test]
    fn transient_failures_retry_with_growing_pauses_then_compensate() {
        let (mut state, _) = SagaState::start(SagaType::OrderFulfilment);
        assert_eq!(
            state.on_outcome(transient(), &policy(), 0.0),
            Next::RetryAfter(ReserveInventory, Duration::from_millis(50))
        );
        assert_eq!(
            state.on_outcome(transient(), &policy(), 1.0),
            Next::RetryAfter(ReserveInventory, Duration::from_millis(200))
        );
        // The third failure is the last attempt: the reservation may be in
        // place, so it is released, then the order cancelled.
        assert_eq!(state.on_outcome(transient(), &policy(), 0.5), Next::Run(ReleaseInventory));
        assert_eq!(state.reason.as_deref(), Some("RESERVE_INVENTORY_FAILED"));
        assert_eq!(state.on_outcome(Done, &policy(), 0.5), Next::Run(CancelOrder));
        assert_eq!(state.on_outcome(Done, &policy(), 0.5), Next::Finished(Status::Failed));
    }

    #[test]
    fn flaky_steps_that_recover_complete() {
        let (ran, state) = run(SagaType::OrderFulfilment, &[Done, transient(), transient(), Done, Done, Done]);
        assert_eq!(ran.iter().filter(|s| **s == AuthorizePayment).count(), 3);
        assert_eq!(state.status, Status::Completed);
    }

    #[test]
    fn compensations_retry_until_they_succeed() {
        let outcomes =
            [Done, rejected("PAYMENT_DECLINED"), transient(), transient(), transient(), TimedOut, Done, Done];
        let (ran, state) = run(SagaType::OrderFulfilment, &outcomes);
        assert_eq!(ran.iter().filter(|s| **s == ReleaseInventory).count(), 5, "past max_attempts");
        assert!(state.compensated());
    }

    #[test]
    fn a_refused_compensation_is_recorded_and_an_operator_can_retry_it() {
        let (_, mut state) =
            run(SagaType::OrderFulfilment, &[Done, rejected("PAYMENT_DECLINED"), rejected("NOPE"), Done]);
        assert_eq!(state.status, Status::Failed);
        assert!(!state.compensated());
        assert_eq!(state.compensation_errors, ["RELEASE_INVENTORY: NOPE"]);
        assert_eq!(state.retry(), Some(Next::Run(ReleaseInventory)));
        assert_eq!(state.on_outcome(Done, &policy(), 0.5), Next::Finished(Status::Failed));
        assert!(state.compensated());
        assert_eq!(state.retry(), None, "nothing left to retry");
    }

    #[test]
    fn a_transfer_refunds_the_source_when_the_deposit_is_refused() {
        let (ran, state) = run(SagaType::MoneyTransfer, &[Done, rejected("ACCOUNT_CLOSED"), Done]);
        assert_eq!(ran, [Withdraw, Deposit, RefundSource]);
        assert!(state.compensated());
        let (ran, state) = run(SagaType::MoneyTransfer, &[rejected("INSUFFICIENT_FUNDS")]);
        assert_eq!(ran, [Withdraw], "nothing withdrawn, nothing to refund");
        assert_eq!(state.status, Status::Failed);
        let (ran, state) = run(SagaType::MoneyTransfer, &[Done, Done]);
        assert_eq!(ran, [Withdraw, Deposit]);
        assert_eq!(state.status, Status::Completed);
    }

    #[test]
    fn an_abort_compensates_a_running_saga_only() {
        let (mut state, _) = SagaState::start(SagaType::OrderFulfilment);
        state.on_outcome(Done, &policy(), 0.5);
        assert_eq!(state.abort(), Some(Next::Run(ReleaseInventory)));
        assert_eq!(state.reason.as_deref(), Some("ABORTED"));
        assert_eq!(state.abort(), None, "already compensating");
    }

    #[test]
    fn request_ids_are_stable_per_saga_and_step() {
        assert_eq!(AuthorizePayment.request_id("s-1"), "saga:s-1:authorize_payment");
        assert_ne!(ReserveInventory.request_id("s-1"), ReleaseInventory.request_id("s-1"));
        assert_ne!(AuthorizePayment.request_id("s-1"), AuthorizePayment.request_id("s-2"));
        for step in ALL_STEPS {
            assert_eq!(step_named(step.as_str()), Some(step));
        }
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let (_, state) = run(SagaType::OrderFulfilment, &[Done, rejected("PAYMENT_DECLINED"), rejected("NOPE"), Done]);
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"RELEASE_INVENTORY: NOPE\""), "{json}");
        assert_eq!(serde_json::from_str::<SagaState>(&json).unwrap(), state);
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            4 => Just(Done),
            1 => Just(rejected("NO")),
            1 => Just(transient()),
            1 => Just(TimedOut),
        ]
    }

    proptest! {
        /// Whatever happens, a finished saga either completed every forward
        /// step or undid (or recorded the refusal of undoing) every effect
        /// it may have had, latest first, and a fulfilment cancels its
        /// order.
        #[test]
        fn every_effect_is_undone_in_reverse_or_the_saga_completed(
            transfer in any::<bool>(),
            outcomes in proptest::collection::vec(outcome(), 1..60),
        ) {
            let saga_type = if transfer { SagaType::MoneyTransfer } else { SagaType::OrderFulfilment };
            let (mut state, mut next) = SagaState::start(saga_type);
            let mut ran = Vec::new();
            for outcome in outcomes.into_iter().chain(std::iter::repeat_n(Done, 100)) {
                let step = match next {
                    Next::Run(step) | Next::RetryAfter(step, _) => step,
                    Next::Finished(_) => break,
                };
                ran.push((step, outcome.clone()));
                next = state.on_outcome(outcome, &policy(), 0.5);
            }
            let Next::Finished(status) = next else { panic!("not finished") };
            prop_assert!(state.status.is_final());
            let undone: Vec<Step> = ran
                .iter()
                .filter(|(s, _)| !saga_type.forward().contains(s))
                .map(|(s, _)| *s)
                .collect();
            if status == Status::Completed {
                prop_assert_eq!(state.effects.as_slice(), saga_type.forward());
                prop_assert!(undone.is_empty());
            } else {
                let mut expected: Vec<Step> = state.effects.iter().rev().filter_map(|s| s.compensation()).collect();
                expected.extend(saga_type.closing_compensation());
                let mut distinct = undone.clone();
                distinct.dedup();
                prop_assert_eq!(distinct, expected);
                prop_assert!(state.reason.is_some());
            }
        }
    }
}
