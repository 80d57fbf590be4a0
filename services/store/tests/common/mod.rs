//! Shared setup of the store's integration tests.

#![allow(dead_code, unreachable_pub)]

pub mod conformance;

use std::sync::Arc;

use eventfold_store::PostgresEventLog;
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;

/// A migrated database and a PostgreSQL event log on it.
pub async fn postgres() -> (TestDatabase, Arc<PostgresEventLog>) {
    let (db, _, log) = eventfold_tests::store::migrated().await;
    (db, Arc::new(log))
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}
