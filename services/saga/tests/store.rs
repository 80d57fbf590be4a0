//! Saga instances on a real PostgreSQL: started once per correlation,
//! saved with optimistic versions, found by due time and deadline with
//! skip-locked sharing, and their step history.

use std::time::{Duration, SystemTime};

use eventfold_saga::{
    model::{Outcome, RetryPolicy, SagaState, SagaType, Status, Step},
    store::{self, SagaRecord, StepLog, StoreError},
};
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;

async fn connect(db: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

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

#[tokio::test]
async fn a_saga_starts_once_and_saves_with_its_version() {
    let db = TestDatabase::migrated().await;
    let client = connect(&db).await;
    let now = SystemTime::now();
    let mut saga = new_saga("s-1", "o-1", now);
    assert!(store::start(&client, &saga).await.unwrap());
    assert!(!store::start(&client, &new_saga("s-2", "o-1", now)).await.unwrap(), "one saga per order");
    assert!(store::load(&client, "s-2").await.unwrap().is_none());

    let loaded = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(loaded.state, saga.state);
    assert_eq!(loaded.data["payment_token"], "tok_visa");
    assert_eq!(store::find(&client, SagaType::OrderFulfilment, "o-1").await.unwrap().unwrap().saga_id, "s-1");
    assert!(store::find(&client, SagaType::MoneyTransfer, "o-1").await.unwrap().is_none());

    // A step done: the state moves on and the attempt is logged.
    let stale = loaded.clone();
    saga.state.on_outcome(Outcome::Done, &RetryPolicy::default(), 0.5);
    let log = StepLog {
        step: Step::ReserveInventory,
        outcome: "DONE".into(),
        detail: None,
        started_at: now,
        ended_at: now + Duration::from_millis(3),
    };
    store::save(&client, &mut saga, std::slice::from_ref(&log)).await.unwrap();
    assert_eq!(saga.version, 1);
    let loaded = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(loaded.state.step, Some(Step::AuthorizePayment));
    assert_eq!(loaded.version, 1);

    // A save from the old version (a second orchestrator) is refused and
    // changes nothing.
    let mut racing = stale;
    racing.state.on_outcome(Outcome::Rejected { reason: "X".into() }, &RetryPolicy::default(), 0.5);
    assert!(matches!(store::save(&client, &mut racing, &[]).await, Err(StoreError::Conflict { expected: 0, .. })));
    let after = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(after.state.status, Status::Running);
    assert_eq!(after.version, 1);

    let mut second = log.clone();
    second.step = Step::AuthorizePayment;
    second.outcome = "TRANSIENT".into();
    second.detail = Some("provider unavailable".into());
    store::save(&client, &mut saga, std::slice::from_ref(&second)).await.unwrap();
    let history = store::steps(&client, "s-1").await.unwrap();
    assert_eq!(history.iter().map(|s| s.step).collect::<Vec<_>>(), [Step::ReserveInventory, Step::AuthorizePayment]);
    assert_eq!(history[1].detail.as_deref(), Some("provider unavailable"));
}

#[tokio::test]
async fn due_sagas_come_by_due_time_or_deadline_and_are_shared_without_overlap() {
    let db = TestDatabase::migrated().await;
    let mut first = connect(&db).await;
    let mut second = connect(&db).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    store::start(&first, &new_saga("later", "o-later", now + hour)).await.unwrap();
    store::start(&first, &new_saga("due-2", "o-2", now - Duration::from_secs(2))).await.unwrap();
    store::start(&first, &new_saga("due-1", "o-1", now - Duration::from_secs(5))).await.unwrap();
    // Not due, but past its deadline (it timed out while nobody ran).
    let mut timed_out = new_saga("deadline", "o-3", now + hour);
    timed_out.deadline_at = Some(now - Duration::from_secs(1));
    store::start(&first, &timed_out).await.unwrap();
    let mut done = new_saga("done", "o-4", now - hour);
    done.state.status = Status::Completed;
    done.state.step = None;
    store::start(&first, &done).await.unwrap();

    let tx = first.transaction().await.unwrap();
    let ids: Vec<String> = store::due(&tx, now, 2).await.unwrap().into_iter().map(|r| r.saga_id).collect();
    assert_eq!(ids, ["due-1", "due-2"], "earliest first, finished and not-yet-due ones left out");
    // A second orchestrator meanwhile skips the locked ones.
    let other = second.transaction().await.unwrap();
    let ids: Vec<String> = store::due(&other, now, 10).await.unwrap().into_iter().map(|r| r.saga_id).collect();
    assert_eq!(ids, ["deadline"]);
    other.rollback().await.unwrap();
    tx.rollback().await.unwrap();
    let ids: Vec<String> = store::due(&second, now, 10).await.unwrap().into_iter().map(|r| r.saga_id).collect();
    assert_eq!(ids, ["due-1", "due-2", "deadline"], "released at rollback");
}
