//! A claim saves a saga's state, its step history and its lifecycle events
//! in one transaction: all of it or nothing. Its own test binary: it arms
//! the failpoint `saga::after_state`, which every save passes through, so
//! no other test may save meanwhile.

use std::time::{Duration, SystemTime};

use eventfold_saga::{
    Error, Repository,
    model::{Outcome, RetryPolicy, SagaState, SagaType, Status, Step},
    store::{self, SagaRecord, StepLog},
};
use eventfold_store::{Database, failpoint};
use eventfold_tests::TestDatabase;

const AFTER_STATE: &str = "saga::after_state";

fn new_saga(id: &str, order: &str, due_at: SystemTime) -> SagaRecord {
    let (state, _) = SagaState::start(SagaType::OrderFulfilment);
    SagaRecord {
        saga_id: id.to_owned(),
        correlation_id: order.to_owned(),
        state,
        data: serde_json::json!({"order_id": order, "payment_token": "tok_visa"}),
        due_at,
        deadline_at: None,
        version: 0,
    }
}

/// The lifecycle event types stored in stream `stream`, in order.
async fn event_types(client: &tokio_postgres::Client, stream: &str) -> Vec<String> {
    let rows = client
        .query("SELECT event_type FROM eventstore.events WHERE stream_id = $1 ORDER BY version", &[&stream])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn ended(step: Step, outcome: &str) -> (StepLog, u32) {
    let now = SystemTime::now();
    (StepLog { step, outcome: outcome.into(), detail: None, started_at: now, ended_at: now }, 1)
}

/// Claims saga `saga_id` once its last holder has let go (a claim dropped
/// by a panicking task lets go in the background).
async fn claim_when_free(sagas: &Repository, saga_id: &str) -> eventfold_saga::Claim {
    for _ in 0..500 {
        if let Some(claim) = sagas.claim(saga_id).await.unwrap() {
            return claim;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("saga {saga_id} was never let go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_saves_state_and_lifecycle_events_together_or_neither() {
    let db = TestDatabase::migrated().await;
    let client = Database::from_url(db.url()).unwrap().connect().await.unwrap();
    let now = SystemTime::now();
    store::start(&client, &new_saga("s-1", "o-1", now)).await.unwrap();
    let sagas = Repository::postgres(Database::from_url(db.url()).unwrap());

    let mut claim = sagas.claim_due(now).await.unwrap().expect("due");
    // Someone saves the saga behind the claim's back (no orchestrator
    // does: they hold it first): the claim's save changes nothing, not
    // even the event log.
    let mut behind = store::load(&client, "s-1").await.unwrap().unwrap();
    store::save(&client, &mut behind, &[], &[]).await.unwrap();
    claim.record.state.on_outcome(Outcome::Done, &RetryPolicy::default(), 0.5);
    let refused = claim.save(Some(ended(Step::ReserveInventory, "DONE"))).await;
    assert!(matches!(refused, Err(Error::Conflict { expected: 0, .. })), "{refused:?}");
    assert!(event_types(&client, "saga-s-1").await.is_empty(), "no event without its state");
    assert!(store::steps(&client, "s-1").await.unwrap().is_empty());
    assert_eq!(store::load(&client, "s-1").await.unwrap().unwrap().version, 1);
    claim.release().await.unwrap();

    // The save fails after its state UPDATE ran and before the step log
    // and the lifecycle events are written (the task panics there, as a
    // crashing orchestrator would): nothing of the save remains, the state
    // UPDATE included.
    let mut claim = claim_when_free(&sagas, "s-1").await;
    claim.record.state.on_outcome(Outcome::Done, &RetryPolicy::default(), 0.5);
    assert_eq!(claim.record.state.step, Some(Step::AuthorizePayment), "the state the failed save carries");
    let armed = failpoint::arm(AFTER_STATE, "1*panic");
    let fired_before = failpoint::fired(AFTER_STATE);
    let failed = tokio::spawn(async move { claim.save(Some(ended(Step::ReserveInventory, "DONE"))).await }).await;
    drop(armed);
    assert!(failed.as_ref().is_err_and(tokio::task::JoinError::is_panic), "the save panicked: {failed:?}");
    assert_eq!(failpoint::fired(AFTER_STATE) - fired_before, 1, "the failure came after the state UPDATE ran");
    let stored = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(
        (stored.version, stored.state.status, stored.state.step),
        (1, Status::Running, Some(Step::ReserveInventory)),
        "the state UPDATE of the failed save is gone"
    );
    assert!(event_types(&client, "saga-s-1").await.is_empty(), "no lifecycle event of the failed save");
    assert!(store::steps(&client, "s-1").await.unwrap().is_empty(), "no step log of the failed save");

    // The same save again, the failpoint off: all of it is there.
    let mut claim = claim_when_free(&sagas, "s-1").await;
    assert_eq!(claim.record.version, 1);
    claim.record.state.on_outcome(Outcome::Done, &RetryPolicy::default(), 0.5);
    claim.save(Some(ended(Step::ReserveInventory, "DONE"))).await.unwrap();
    // Saved is saved: the state and its events are there before the claim
    // lets go.
    assert_eq!(event_types(&client, "saga-s-1").await, ["SagaStepEnded"]);
    assert_eq!(store::steps(&client, "s-1").await.unwrap().len(), 1);
    assert_eq!(store::load(&client, "s-1").await.unwrap().unwrap().state.step, Some(Step::AuthorizePayment));
    claim.record.state.on_outcome(
        Outcome::Rejected { reason: "PAYMENT_DECLINED".into() },
        &RetryPolicy::default(),
        0.5,
    );
    claim.save(Some(ended(Step::AuthorizePayment, "REJECTED"))).await.unwrap();
    claim.release().await.unwrap();
    assert_eq!(event_types(&client, "saga-s-1").await, ["SagaStepEnded", "SagaStepEnded", "SagaCompensating"]);
    let stored = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!((stored.version, stored.state.status), (3, Status::Compensating));
    let correlation: Option<String> = client
        .query_one(
            "SELECT metadata->>'correlation_id' FROM eventstore.events WHERE stream_id = 'saga-s-1' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(correlation.as_deref(), Some("o-1"));

    // A new saga's first save records its start.
    store::start(&client, &new_saga("s-2", "o-2", now)).await.unwrap();
    let mut claim = sagas.claim("s-2").await.unwrap().expect("due");
    claim.save(None).await.unwrap();
    claim.release().await.unwrap();
    assert_eq!(event_types(&client, "saga-s-2").await, ["SagaStarted"]);
}
