//! A saga's lifecycle events (`eventfold_domain::saga`), derived from what
//! a save changes: the state before, the state after and the step attempt
//! that ended. They are stored in the saga's stream `saga-{saga_id}` in the
//! same transaction as the saved state, so the events and the state never
//! part.

use eventfold_domain::saga::{SagaCompensating, SagaCompleted, SagaEvent, SagaFailed, SagaStarted, SagaStepEnded};
use eventfold_store::{AppendRequest, EventMetadata, ExpectedVersion};

use crate::{
    model::{SagaState, Status},
    store::{SagaRecord, StepLog},
};

/// The lifecycle events of a save of `after` (the saga as it will be
/// stored), coming from `before`: `started` when this is the saga's first
/// save, and `ended` with its attempt number when a step attempt ended.
pub fn lifecycle(
    before: &SagaState,
    after: &SagaRecord,
    started: bool,
    ended: Option<(&StepLog, u32)>,
) -> Vec<SagaEvent> {
    let saga_id = || after.saga_id.clone();
    let state = &after.state;
    let mut events = Vec::new();
    if started {
        events.push(SagaEvent::from(SagaStarted {
            saga_id: saga_id(),
            saga_type: state.saga_type.as_str().to_owned(),
            correlation_id: after.correlation_id.clone(),
        }));
    }
    if let Some((log, attempt)) = ended {
        events.push(SagaEvent::from(SagaStepEnded {
            saga_id: saga_id(),
            step: log.step.as_str().to_owned(),
            outcome: log.outcome.clone(),
            attempt,
            detail: log.detail.clone(),
        }));
    }
    let reason = || state.reason.clone().unwrap_or_default();
    // A saga that fails without anything to undo goes from RUNNING to
    // FAILED directly; one retried by an operator from FAILED to
    // COMPENSATING.
    if state.status != before.status {
        match state.status {
            Status::Compensating => {
                events.push(SagaEvent::from(SagaCompensating { saga_id: saga_id(), reason: reason() }));
            }
            Status::Completed => events.push(SagaEvent::from(SagaCompleted { saga_id: saga_id() })),
            Status::Failed => events.push(SagaEvent::from(SagaFailed {
                saga_id: saga_id(),
                reason: reason(),
                compensated: state.compensated(),
                compensation_errors: state.compensation_errors.clone(),
            })),
            Status::Running => {}
        }
    }
    events
}

/// The append of `events` to the stream of `record`'s saga, with its
/// correlation id in the metadata. The caller holds the saga (its lock),
/// so nobody appends to the stream meanwhile.
pub fn append_request(record: &SagaRecord, events: &[SagaEvent]) -> AppendRequest {
    let metadata = EventMetadata { correlation_id: Some(record.correlation_id.clone()), ..EventMetadata::default() };
    let events = eventfold_command::new_events(events, &metadata);
    AppendRequest::new(eventfold_domain::saga::stream_id(&record.saga_id), ExpectedVersion::Any, events)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use eventfold_domain::DomainEvent;

    use super::*;
    use crate::model::{Outcome, RetryPolicy, SagaType, Step};

    fn record(state: SagaState) -> SagaRecord {
        SagaRecord {
            saga_id: "fulfil-o-1".into(),
            correlation_id: "o-1".into(),
            state,
            data: serde_json::json!({}),
            due_at: SystemTime::now(),
            deadline_at: None,
            version: 0,
        }
    }

    fn log(step: Step, outcome: &str, detail: Option<&str>) -> StepLog {
        let now = SystemTime::now();
        StepLog { step, outcome: outcome.into(), detail: detail.map(Into::into), started_at: now, ended_at: now }
    }

    fn types(events: &[SagaEvent]) -> Vec<&'static str> {
        events.iter().map(DomainEvent::event_type).collect()
    }

    #[test]
    fn a_decline_records_the_step_then_the_compensation_then_the_failure() {
        let policy = RetryPolicy::default();
        let (start, _) = SagaState::start(SagaType::OrderFulfilment);
        assert_eq!(types(&lifecycle(&start, &record(start.clone()), true, None)), ["SagaStarted"]);

        let mut reserved = start.clone();
        reserved.on_outcome(Outcome::Done, &policy, 0.5);
        let done = log(Step::ReserveInventory, "DONE", None);
        assert_eq!(types(&lifecycle(&start, &record(reserved.clone()), false, Some((&done, 1)))), ["SagaStepEnded"]);

        let mut declined = reserved.clone();
        declined.on_outcome(Outcome::Rejected { reason: "PAYMENT_DECLINED".into() }, &policy, 0.5);
        let rejected = log(Step::AuthorizePayment, "REJECTED", Some("PAYMENT_DECLINED"));
        let events = lifecycle(&reserved, &record(declined.clone()), false, Some((&rejected, 1)));
        assert_eq!(types(&events), ["SagaStepEnded", "SagaCompensating"]);
        assert_eq!(
            events[1],
            SagaEvent::from(SagaCompensating { saga_id: "fulfil-o-1".into(), reason: "PAYMENT_DECLINED".into() })
        );

        let mut released = declined.clone();
        released.on_outcome(Outcome::Done, &policy, 0.5);
        let mut cancelled = released.clone();
        cancelled.on_outcome(Outcome::Done, &policy, 0.5);
        let events = lifecycle(&released, &record(cancelled), false, Some((&log(Step::CancelOrder, "DONE", None), 1)));
        assert_eq!(
            events[1],
            SagaEvent::from(SagaFailed {
                saga_id: "fulfil-o-1".into(),
                reason: "PAYMENT_DECLINED".into(),
                compensated: true,
                compensation_errors: vec![],
            })
        );
    }

    #[test]
    fn a_retry_pause_changes_no_status_and_records_only_the_attempt() {
        let (start, _) = SagaState::start(SagaType::MoneyTransfer);
        let mut failed_once = start.clone();
        failed_once.on_outcome(Outcome::Transient { error: "away".into() }, &RetryPolicy::default(), 0.5);
        let attempt = log(Step::Withdraw, "TRANSIENT", Some("away"));
        let events = lifecycle(&start, &record(failed_once), false, Some((&attempt, 1)));
        assert_eq!(types(&events), ["SagaStepEnded"]);
        let request = append_request(&record(start), &events);
        assert_eq!(request.stream_id, "saga-fulfil-o-1");
        assert_eq!(request.events[0].metadata.correlation_id.as_deref(), Some("o-1"));
    }
}
