//! Shared setup of the projector's integration tests.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    order::{CancelOrder, ConfirmOrder, OrderCommand, OrderItem, ProcessPayment, ShipOrder},
};
use eventfold_platform::runtime::Backoff;
use eventfold_projector::{ApplyError, Projection, Projector, ProjectorOptions};
use eventfold_store::{
    AllRead, AppendRequest, Database, EventFilter, EventLog, ExpectedVersion, NewEvent, PostgresConfig,
    PostgresEventLog, RecordedEvent, Upcasting,
};
use eventfold_tests::{
    TestDatabase,
    orders::{self, eur},
};
use tokio_postgres::{Client, NoTls, Transaction};
use tower::ServiceExt;

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

/// Orders through the real command bus: each is created, and by its number
/// confirmed, paid, shipped or cancelled along the way.
pub async fn write_orders(log: Arc<dyn EventLog>, from: usize, count: usize) {
    let bus = eventfold_command::bus(log, eventfold_command::BusOptions::default());
    for o in from..from + count {
        let order_id = format!("o-{o}");
        let send = |command: OrderCommand| {
            let bus = bus.clone();
            let order_id = order_id.clone();
            async move {
                let envelope = Envelope::new(Command::Order { order_id, command }, Meta::default());
                bus.oneshot(envelope).await.expect("command")
            }
        };
        let price = Money::new(100 + o as i64, eur());
        let items =
            vec![OrderItem { product_id: format!("sku-{}", o % 7), quantity: 1 + (o % 3) as u32, unit_price: price }];
        let total = Money::new(price.minor * i64::from(1 + (o % 3) as u32), eur());
        send(orders::created(&order_id, &format!("c-{}", o % 5), items).into()).await;
        if o % 4 == 0 {
            send(CancelOrder { reason: "changed mind".into() }.into()).await;
            continue;
        }
        send(ConfirmOrder.into()).await;
        if o % 4 == 1 {
            continue;
        }
        send(ProcessPayment { payment_id: format!("p-{o}"), amount: total }.into()).await;
        if o % 4 == 3 {
            send(ShipOrder { carrier: "DHL".into(), tracking_number: format!("T-{o}") }.into()).await;
        }
    }
}

pub async fn wait_until_at(projector: &Projector, head: u64) {
    for _ in 0..600 {
        if projector.position().await.expect("position") >= head {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the projector did not reach position {head} within 30 s");
}

pub fn options() -> ProjectorOptions {
    ProjectorOptions { batch_size: 25, ..ProjectorOptions::default() }
}

/// One row per event it is given, in a table without a key: an event
/// applied twice shows as two rows. Each event takes a few milliseconds,
/// so that its projector is mostly inside a transaction.
pub struct Tally;

#[async_trait]
impl Projection for Tally {
    fn name(&self) -> &'static str {
        "tally"
    }

    fn create_sql(&self, version: u32) -> String {
        format!("CREATE TABLE IF NOT EXISTS read.tally_v{version} (global_position bigint NOT NULL)")
    }

    fn tables(&self, version: u32) -> Vec<String> {
        vec![format!("read.tally_v{version}")]
    }

    fn activate_sql(&self, _version: u32) -> String {
        "SELECT 1".to_owned()
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        tx.execute("SELECT pg_sleep(0.002)", &[]).await?;
        tx.execute(
            &format!("INSERT INTO read.tally_v{version} (global_position) VALUES ($1)"),
            &[&(event.global_position as i64)],
        )
        .await?;
        Ok(())
    }
}

/// Appends `count` events numbered from `from`, one per request, each
/// retried with its request id until the log answers: an append whose
/// outcome was unknown is stored once all the same.
pub async fn append_counted(log: Arc<dyn EventLog>, from: usize, count: usize) {
    let policy = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
    for n in from..from + count {
        let event = NewEvent::new("Counted", serde_json::json!({ "n": n }));
        let mut request = AppendRequest::new(format!("tally-{}", n % 10), ExpectedVersion::Any, vec![event]);
        request.request_id = Some(format!("count-{n}"));
        let mut retries = policy.start();
        while let Err(error) = log.append(request.clone()).await {
            assert!(retries.attempts() < 100, "append {n} keeps failing: {error}");
            retries.wait().await;
        }
    }
}

/// Every position of the log, in order.
pub async fn log_positions(log: &Arc<dyn EventLog>) -> Vec<i64> {
    let mut positions = Vec::new();
    let mut after = 0;
    loop {
        let slice = log.read_all(AllRead { after, max_count: 500, filter: EventFilter::default() }).await.unwrap();
        positions.extend(slice.events.iter().map(|e| e.global_position as i64));
        if slice.end_of_log || slice.next_position <= after {
            return positions;
        }
        after = slice.next_position;
    }
}
