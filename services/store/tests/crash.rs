//! A crash of the group-commit writer at the instant that matters: its
//! batch's transaction committed, its appenders not yet answered (failpoint
//! `store::after_commit`). The appender must get an error rather than wait
//! for good, the writer must come back, and a retry with the same request
//! id must get the first answer without storing the events twice.
//!
//! The only test of its binary: the failpoint registry is process-wide and
//! every append of the PostgreSQL log passes through this failpoint.

use std::time::Duration;

use eventfold_store::{
    AppendRequest, Database, Error, EventLog, ExpectedVersion, NewEvent, PostgresConfig, PostgresEventLog, StreamRead,
    failpoint,
};
use serde_json::json;
use tokio_postgres::NoTls;
use uuid::Uuid;

const AFTER_COMMIT: &str = "store::after_commit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_crash_after_commit_answers_an_error_and_a_retry_gets_the_first_answer() {
    let db = eventfold_tests::TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    // One writer: an append after the crash goes through only if that writer
    // was restarted.
    let config = PostgresConfig { writers: 1, ..PostgresConfig::default() };
    let log = PostgresEventLog::connect(database, config).await.expect("connect the log");

    let events: Vec<NewEvent> = (0..3).map(|n| NewEvent::new("Crashed", json!({ "n": n }))).collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    // `Any`: without the request-id dedupe a retry would be stored again.
    let mut request = AppendRequest::new("crash", ExpectedVersion::Any, events);
    request.request_id = Some("crash-request-1".to_owned());

    let armed = failpoint::arm(AFTER_COMMIT, "1*panic");
    let crashed = tokio::time::timeout(Duration::from_secs(10), log.append(request.clone()))
        .await
        .expect("the appender of the crashed batch is answered within 10 s, not left waiting");
    assert_eq!(failpoint::fired(AFTER_COMMIT), 1, "the writer crashed at store::after_commit");
    drop(armed);
    assert!(matches!(crashed, Err(Error::Unavailable(_))), "the crashed append answers Unavailable: {crashed:?}");

    // The batch had committed: the events are stored although their
    // appender heard an error.
    let stored = log.read_stream(StreamRead::forwards("crash", 10)).await.expect("read the stream");
    assert_eq!(stored.events.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids, "the crashed batch committed");
    let stored_positions: Vec<u64> = stored.events.iter().map(|e| e.global_position).collect();

    // The retry reaches a writer again (the crashed one, restarted) and gets
    // the first answer.
    let retried = tokio::time::timeout(Duration::from_secs(10), log.append(request.clone()))
        .await
        .expect("the writer is back within 10 s")
        .expect("the retry with the same request id succeeds");
    assert_eq!(
        (retried.stream_id.as_str(), retried.first_version, retried.last_version, retried.duplicate),
        ("crash", 0, 2, true),
        "the retry answers the first append's versions, as a repeat"
    );
    assert_eq!(retried.positions, stored_positions, "the retry answers the positions the crashed batch stored");
    assert!(failpoint::hits(AFTER_COMMIT) >= 2, "the retry passed the failpoint again, unarmed");

    // Exactly once: the stream and the whole log hold the three events once.
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.expect("connect");
    tokio::spawn(connection);
    let rows = client
        .query("SELECT event_id FROM eventstore.events ORDER BY global_position", &[])
        .await
        .expect("read the events table");
    assert_eq!(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>(), ids, "every event stored once");
    assert_eq!(log.stream_info("crash").await.expect("stream info").version, Some(2));

    // A new append goes through the restarted writer as usual.
    let next = log
        .append(AppendRequest::new("crash", ExpectedVersion::Exact(2), vec![NewEvent::new("After", json!({}))]))
        .await
        .expect("an append after the crash");
    assert_eq!((next.first_version, next.duplicate), (3, false));
}
