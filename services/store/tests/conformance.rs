//! The conformance suite (`common::conformance`) run against the memory,
//! the file-system and the PostgreSQL adapters (the Azure Blob adapter runs
//! it in tests/blob.rs, against Azurite).

mod common;

use std::{sync::Arc, time::Duration};

use common::conformance::*;
use eventfold_store::{Error, EventLog, ExpectedVersion, MemoryEventLog};

conformance!(memory, || async {
    let guard: Box<dyn std::any::Any + Send> = Box::new(());
    let log: Arc<dyn EventLog> = Arc::new(MemoryEventLog::new());
    (guard, log)
});

/// The memory adapter forgets request ids after its retention too.
#[tokio::test]
async fn memory_request_ids_are_forgotten_after_their_retention() {
    let log = MemoryEventLog::with_request_retention(Duration::from_millis(10));
    let request = |n: u64| {
        let mut r = append("expiring", ExpectedVersion::Any, vec![event("E", n)]);
        r.request_id = Some("req-expiring".into());
        r
    };
    log.append(request(0)).await.expect("first use");
    assert!(matches!(log.append(request(1)).await, Err(Error::RequestIdReused { .. })), "remembered");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = log.append(request(1)).await.expect("a forgotten id is free");
    assert!(!again.duplicate);
}

conformance!(postgres, || async {
    let (db, log) = common::postgres().await;
    let guard: Box<dyn std::any::Any + Send> = Box::new(db);
    let log: Arc<dyn EventLog> = log;
    (guard, log)
});

conformance!(fs, || async {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = eventfold_store::FsEventLog::open(dir.path(), eventfold_store::FsConfig::default())
        .await
        .expect("open a file-system log");
    let guard: Box<dyn std::any::Any + Send> = Box::new(dir);
    let log: Arc<dyn EventLog> = Arc::new(log);
    (guard, log)
});

// A topic's tables: its own schema and events table (two topics in one
// schema, to show that they share nothing), created by Tables::migrate.
conformance!(postgres_topic, || async {
    let db = eventfold_tests::TestDatabase::create().await;
    let (mut client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let neighbour = eventfold_store::Tables::topic("shop", "neighbour").expect("plain names");
    neighbour.migrate(&mut client).await.expect("create the neighbour's tables");
    let tables = eventfold_store::Tables::topic("shop", "orders").expect("plain names");
    tables.migrate(&mut client).await.expect("create the topic's tables");
    tables.migrate(&mut client).await.expect("a second migrate does nothing");
    let database = eventfold_store::Database::from_url(db.url()).expect("a URL");
    let config = eventfold_store::PostgresConfig { tables, ..Default::default() };
    let log = eventfold_store::PostgresEventLog::connect(database, config).await.expect("connect the log");
    let guard: Box<dyn std::any::Any + Send> = Box::new(db);
    let log: Arc<dyn EventLog> = Arc::new(log);
    (guard, log)
});
