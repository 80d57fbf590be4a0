//! Shared setup of the projector's integration tests.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::TestDatabase;
use tokio_postgres::{Client, NoTls};

/// The tables of `order_analytics`, each with the columns that order its
/// rows.
pub const ANALYTICS_TABLES: [(&str, &str); 5] = [
    ("read.order_facts", "order_id"),
    ("read.customer_orders", "customer_id, currency"),
    ("read.daily_sales", "day, currency"),
    ("read.daily_status", "day, status"),
    ("read.product_sales", "day, product_id, currency"),
];

/// A migrated database, the pool of its projectors (sessions that do not
/// wait for the WAL flush, as a process gives them), the log (upcasting,
/// as the services read it) and a client.
pub async fn setup() -> (TestDatabase, Database, Arc<dyn EventLog>, Client) {
    let db = TestDatabase::migrated().await;
    let server = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let store = PostgresEventLog::connect(server.clone(), PostgresConfig::default()).await.expect("connect the log");
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.expect("connect");
    tokio::spawn(connection);
    (db, server.without_flush_wait(4), log, client)
}
