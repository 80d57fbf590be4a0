//! Shared setup of the store's integration tests.

#![allow(dead_code, unreachable_pub)]

pub mod conformance;

use std::sync::Arc;

use eventfold_store::{PostgresConfig, PostgresEventLog};
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;

/// A migrated database and a PostgreSQL event log on it.
pub async fn postgres() -> (TestDatabase, Arc<PostgresEventLog>) {
    let db = TestDatabase::migrated().await;
    let log = PostgresEventLog::connect(
        eventfold_store::Database::from_url(db.url()).expect("a PostgreSQL URL"),
        PostgresConfig::default(),
    )
    .await
    .expect("connect");
    (db, Arc::new(log))
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}
