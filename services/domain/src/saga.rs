//! The lifecycle events of the sagas (order fulfilment, money transfer),
//! stored in the saga's own stream `saga-{saga_id}` beside every saved
//! step, so that the event store, Kafka and anyone subscribed see how each
//! saga went. Sagas are not aggregates: no command decides these events,
//! the orchestrator records them.
//!
//! Names are the saga crate's: types `ORDER_FULFILMENT` / `MONEY_TRANSFER`,
//! steps like `RESERVE_INVENTORY`, outcomes `DONE`, `REJECTED`,
//! `TRANSIENT`, `TIMED_OUT` and `PARKED`, reasons UPPER_SNAKE_CASE codes
//! like `PAYMENT_DECLINED`.

use serde::{Deserialize, Serialize};

use crate::event::domain_events;

/// The stream category of saga lifecycle events: saga `fulfil-o-1` writes
/// to `saga-fulfil-o-1`.
pub const CATEGORY: &str = "saga";

/// The stream of saga `saga_id`'s lifecycle events.
pub fn stream_id(saga_id: &str) -> String {
    format!("{CATEGORY}-{saga_id}")
}

/// The id of the order fulfilment saga of order `order_id` (one per order).
pub fn fulfilment_saga_id(order_id: &str) -> String {
    format!("fulfil-{order_id}")
}

/// The id of the money transfer saga of transfer `transfer_id` (one per
/// transfer): what a client of `RequestTransfer` watches.
pub fn transfer_saga_id(transfer_id: &str) -> String {
    format!("transfer-{transfer_id}")
}

/// A saga was started (once per type and correlation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStarted {
    pub saga_id: String,
    pub saga_type: String,
    /// What it is about: the order id, the transfer id.
    pub correlation_id: String,
}

/// One attempt of a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStepEnded {
    pub saga_id: String,
    pub step: String,
    pub outcome: String,
    /// The attempt of the step, from 1.
    pub attempt: u32,
    /// The reason of a rejection, the error of a transient failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The saga started undoing what it did (a step failed for good, or an
/// operator aborted it or retried its refused compensations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCompensating {
    pub saga_id: String,
    pub reason: String,
}

/// Every step of the saga succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCompleted {
    pub saga_id: String,
}

/// The saga ended without reaching its goal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaFailed {
    pub saga_id: String,
    pub reason: String,
    /// Whether everything it did was undone.
    pub compensated: bool,
    /// Compensations refused for good, as `STEP: reason` (an operator's
    /// RetrySaga runs them again).
    #[serde(default)]
    pub compensation_errors: Vec<String>,
}

domain_events! {
    pub enum SagaEvent {
        Started(SagaStarted) = 1,
        StepEnded(SagaStepEnded) = 1,
        Compensating(SagaCompensating) = 1,
        Completed(SagaCompleted) = 1,
        Failed(SagaFailed) = 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DomainEvent;

    #[test]
    fn lifecycle_events_round_trip_through_their_json() {
        let events = [
            SagaEvent::from(SagaStarted {
                saga_id: "fulfil-o-1".into(),
                saga_type: "ORDER_FULFILMENT".into(),
                correlation_id: "o-1".into(),
            }),
            SagaEvent::from(SagaStepEnded {
                saga_id: "fulfil-o-1".into(),
                step: "AUTHORIZE_PAYMENT".into(),
                outcome: "REJECTED".into(),
                attempt: 1,
                detail: Some("PAYMENT_DECLINED".into()),
            }),
            SagaEvent::from(SagaFailed {
                saga_id: "fulfil-o-1".into(),
                reason: "PAYMENT_DECLINED".into(),
                compensated: true,
                compensation_errors: vec![],
            }),
        ];
        for event in events {
            let back = SagaEvent::from_data(event.event_type(), event.schema_version(), event.to_data()).unwrap();
            assert_eq!(back, event);
        }
        assert_eq!(stream_id("fulfil-o-1"), "saga-fulfil-o-1");
        assert_eq!((fulfilment_saga_id("o-1"), transfer_saga_id("t-1")), ("fulfil-o-1".into(), "transfer-t-1".into()));
    }
}
