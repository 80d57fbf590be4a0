//! Shared setup of the store's integration tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use eventfold_store::{PostgresConfig, PostgresEventLog};
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;

/// A migrated database and a PostgreSQL event log on it.
pub async fn postgres() -> (TestDatabase, Arc<PostgresEventLog>) {
    let db = TestDatabase::create().await;
    migrate(db.url()).await;
    let log = PostgresEventLog::connect(PostgresConfig::new(db.url())).await.expect("connect");
    (db, Arc::new(log))
}

pub async fn migrate(url: &str) {
    let mut client = client(url).await;
    eventfold_migrations::up(&mut client).await.expect("migrations apply");
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}
