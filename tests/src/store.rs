//! Event logs to serve in tests: in memory, on a fresh migrated database of
//! the test server, or on a PostgreSQL server that is not there or does
//! not answer.

use std::{sync::Arc, time::Duration};

use eventfold_store::{Database, DatabaseOptions, EventLog, MemoryEventLog, PostgresConfig, PostgresEventLog};

use crate::TestDatabase;

/// An event log as it is stored (no upcasting), and the database it lives
/// in, kept as long as the log.
pub struct Backend {
    pub log: Arc<dyn EventLog>,
    pub db: Option<TestDatabase>,
}

/// The in-memory log (async like [`postgres`], for `backends!`).
pub async fn memory() -> Backend {
    Backend { log: Arc::new(MemoryEventLog::new()), db: None }
}

/// A PostgreSQL log on a fresh migrated database.
///
/// # Panics
///
/// If the database cannot be created or the log cannot connect.
pub async fn postgres() -> Backend {
    let (db, _, log) = migrated().await;
    Backend { log: Arc::new(log), db: Some(db) }
}

/// A fresh migrated database, the pool of it, and a PostgreSQL log on it.
///
/// # Panics
///
/// If the database cannot be created or the log cannot connect.
pub async fn migrated() -> (TestDatabase, Database, PostgresEventLog) {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let log = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.expect("connect the log");
    (db, database, log)
}

/// A PostgreSQL log on `url` that waits at most 1 s for a connection: for a
/// server that is unreachable ([`crate::unreachable_database_url`]) or
/// silent. Connecting is lazy, so this succeeds anyway.
///
/// # Panics
///
/// If `url` is not a PostgreSQL URL.
pub async fn unanswered(url: &str) -> PostgresEventLog {
    let options = DatabaseOptions { connect_timeout: Duration::from_secs(1), ..Default::default() };
    PostgresEventLog::connect(Database::open(url, &options).expect("a PostgreSQL URL"), PostgresConfig::default())
        .await
        .expect("connecting is lazy")
}
