//! Saga instances on a real PostgreSQL: started once per correlation,
//! saved with optimistic versions, found by due time and deadline, and
//! their step history; claims that share the due sagas without overlap,
//! and sagas in memory. That a claim saves the state with its lifecycle
//! events or neither is in `claim_save.rs` (it arms a failpoint every save
//! passes through).

use std::time::{Duration, SystemTime};

use eventfold_saga::{
    Error, MemorySagas, Repository,
    model::{Outcome, RetryPolicy, SagaState, SagaType, Status, Step},
    store::{self, SagaRecord, StepLog},
};
use eventfold_store::{Database, EventLog, MemoryEventLog};
use eventfold_tests::TestDatabase;

/// The sagas of `db`, through a pool of their own.
fn repository(db: &TestDatabase) -> Repository {
    Repository::postgres(Database::from_url(db.url()).unwrap())
}

async fn connect(db: &TestDatabase) -> tokio_postgres::Client {
    Database::from_url(db.url()).unwrap().connect().await.unwrap()
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
    store::save(&client, &mut saga, std::slice::from_ref(&log), &[]).await.unwrap();
    assert_eq!(saga.version, 1);
    let loaded = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(loaded.state.step, Some(Step::AuthorizePayment));
    assert_eq!(loaded.version, 1);

    // A save from the old version (a second orchestrator) is refused and
    // changes nothing.
    let mut racing = stale;
    racing.state.on_outcome(Outcome::Rejected { reason: "X".into() }, &RetryPolicy::default(), 0.5);
    assert!(matches!(store::save(&client, &mut racing, &[], &[]).await, Err(Error::Conflict { expected: 0, .. })));
    let after = store::load(&client, "s-1").await.unwrap().unwrap();
    assert_eq!(after.state.status, Status::Running);
    assert_eq!(after.version, 1);

    let mut second = log.clone();
    second.step = Step::AuthorizePayment;
    second.outcome = "TRANSIENT".into();
    second.detail = Some("provider unavailable".into());
    store::save(&client, &mut saga, std::slice::from_ref(&second), &[]).await.unwrap();
    let history = store::steps(&client, "s-1").await.unwrap();
    assert_eq!(history.iter().map(|s| s.step).collect::<Vec<_>>(), [Step::ReserveInventory, Step::AuthorizePayment]);
    assert_eq!(history[1].detail.as_deref(), Some("provider unavailable"));
}

#[tokio::test]
async fn due_sagas_come_by_due_time_or_deadline_and_are_shared_without_overlap() {
    let db = TestDatabase::migrated().await;
    let first = connect(&db).await;
    let second = connect(&db).await;
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

    let ids: Vec<String> = store::due(&first, now, 2).await.unwrap().into_iter().map(|r| r.saga_id).collect();
    assert_eq!(ids, ["due-1", "due-2"], "earliest first, finished and not-yet-due ones left out");
    let ids: Vec<String> = store::due(&second, now, 10).await.unwrap().into_iter().map(|r| r.saga_id).collect();
    assert_eq!(ids, ["due-1", "due-2", "deadline"]);

    // Two orchestrators' claims share them: each due saga goes to one.
    let one = repository(&db);
    let other = repository(&db);
    let a = one.claim_due(now).await.unwrap().expect("due-1");
    let b = other.claim_due(now).await.unwrap().expect("due-2");
    let c = other.claim_due(now).await.unwrap().expect("deadline");
    let held = [&a, &b, &c].map(|c| c.record.saga_id.clone());
    assert_eq!(held, ["due-1", "due-2", "deadline"]);
    assert!(one.claim_due(now).await.unwrap().is_none(), "all held");
    assert!(other.claim("due-1").await.unwrap().is_none(), "held by the other orchestrator");
    assert!(one.claim("done").await.unwrap().is_none(), "finished sagas are not claimed");
    a.release().await.unwrap();
    assert_eq!(other.claim_due(now).await.unwrap().expect("let go").record.saga_id, "due-1");
    // A claim dropped (its task aborted) lets go in the background.
    drop(b);
    let again = loop {
        if let Some(claim) = one.claim("due-2").await.unwrap() {
            break claim;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(again.record.version, 0);
    drop(c);
}

fn ended(step: Step, outcome: &str) -> (StepLog, u32) {
    let now = SystemTime::now();
    (StepLog { step, outcome: outcome.into(), detail: None, started_at: now, ended_at: now }, 1)
}

#[tokio::test]
async fn memory_sagas_start_once_are_held_by_one_claim_and_write_their_events() {
    let log: std::sync::Arc<dyn EventLog> = std::sync::Arc::new(MemoryEventLog::new());
    let memory = MemorySagas::new(log.clone());
    let now = SystemTime::now();
    assert!(memory.start(&new_saga("s-1", "o-1", now)));
    assert!(!memory.start(&new_saga("s-2", "o-1", now)), "one saga per order");
    let mut later = new_saga("s-3", "o-3", now + Duration::from_secs(3600));
    later.correlation_id = "o-3".into();
    assert!(memory.start(&later));
    let sagas = Repository::Memory(memory);

    let mut claim = sagas.claim_due(now).await.unwrap().expect("due");
    assert_eq!(claim.record.saga_id, "s-1");
    assert!(sagas.claim_due(now).await.unwrap().is_none(), "s-1 is held and s-3 not due");
    claim.record.state.on_outcome(Outcome::Rejected { reason: "OUT_OF_STOCK".into() }, &RetryPolicy::default(), 0.5);
    claim.save(Some(ended(Step::ReserveInventory, "REJECTED"))).await.unwrap();
    claim.release().await.unwrap();
    let stored = sagas.load("s-1").await.unwrap().unwrap();
    assert_eq!((stored.version, stored.state.status), (1, Status::Compensating));
    assert_eq!(sagas.steps("s-1").await.unwrap().len(), 1);
    let events = log
        .read_stream(eventfold_store::StreamRead::forwards("saga-s-1", 100))
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.event_type)
        .collect::<Vec<_>>();
    assert_eq!(events, ["SagaStarted", "SagaStepEnded", "SagaCompensating"]);
    let listed = sagas.list(None, None, None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    let compensating = sagas.list(None, Some(Status::Compensating), None, 10).await.unwrap();
    assert_eq!(compensating.iter().map(|(r, _)| r.saga_id.as_str()).collect::<Vec<_>>(), ["s-1"]);
}
