//! The projection engine on real PostgreSQL: crashes at random points lose
//! and double-apply nothing, poison events are parked and replayed, and a
//! second version builds beside the first and takes over atomically.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    order::{CancelOrder, ConfirmOrder, CreateOrder, OrderCommand, OrderItem, ProcessPayment, ShipOrder},
};
use eventfold_projector::{ApplyError, OrderViews, Projection, Projector, ProjectorOptions, status};
use eventfold_store::{EventLog, PostgresConfig, PostgresEventLog, RecordedEvent, Upcasting};
use eventfold_tests::TestDatabase;
use tokio::sync::watch;
use tokio_postgres::{NoTls, Transaction};
use tower::ServiceExt;

fn random(below: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(below);
    hasher.finish() % below.max(1)
}

async fn setup() -> (TestDatabase, Arc<dyn EventLog>, tokio_postgres::Client) {
    let db = TestDatabase::migrated().await;
    let store = PostgresEventLog::connect(PostgresConfig::new(db.url())).await.expect("connect the log");
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.expect("connect");
    tokio::spawn(connection);
    (db, log, client)
}

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

/// Orders through the real command bus: each is created, and by its number
/// confirmed, paid, shipped or cancelled along the way.
async fn write_orders(log: Arc<dyn EventLog>, from: usize, count: usize) {
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
        send(
            CreateOrder { order_id: order_id.clone(), customer_id: format!("c-{}", o % 5), currency: eur(), items }
                .into(),
        )
        .await;
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

async fn wait_until_at(projector: &Projector, head: u64) {
    for _ in 0..600 {
        if projector.position().await.expect("position") >= head {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the projector did not reach position {head} within 30 s");
}

async fn rows(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT to_jsonb(t)::text FROM {table} t ORDER BY order_id"), &[])
        .await
        .expect("read the view")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn options() -> ProjectorOptions {
    ProjectorOptions { batch_size: 25, ..ProjectorOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_neither_lose_nor_double_apply_and_a_rebuild_matches() {
    let (db, log, client) = setup().await;
    let writer = tokio::spawn(write_orders(log.clone(), 0, 160));

    // The projector is killed at random points while orders stream in, and
    // started again, several times.
    for _ in 0..8 {
        let projector = Projector::new(db.url(), log.clone(), Arc::new(OrderViews), 1, options()).await.unwrap();
        let (_stop, stop) = watch::channel(false);
        let task = tokio::spawn(projector.run(stop));
        tokio::time::sleep(Duration::from_millis(20 + random(200))).await;
        task.abort();
        let _ = task.await;
    }
    writer.await.expect("writer");
    let head = log.last_position().await.unwrap();
    let reached = status(&client).await.unwrap()[0].position;
    assert!(reached > 0, "the killed projectors made progress before the last start");
    let projector = Projector::new(db.url(), log.clone(), Arc::new(OrderViews), 1, options()).await.unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(projector.run(stop));
    let probe = Projector::new(db.url(), log.clone(), Arc::new(OrderViews), 1, options()).await.unwrap();
    wait_until_at(&probe, head).await;
    let _ = stop_tx.send(true);
    task.await.unwrap();

    // Version 2 from scratch, beside version 1 (which keeps serving).
    let rebuild = Projector::new(db.url(), log.clone(), Arc::new(OrderViews), 2, options()).await.unwrap();
    rebuild.prepare().await.unwrap();
    while rebuild.step().await.unwrap() > 0 {}
    let survived = rows(&client, "read.order_views_v1").await;
    let rebuilt = rows(&client, "read.order_views_v2").await;
    assert_eq!(survived.len(), 160, "one row per order");
    assert_eq!(survived, rebuilt, "after the crashes, the read model equals a rebuild, row for row");
    assert_eq!(rows(&client, "read.order_views").await, survived, "the view shows version 1");

    let statuses = client
        .query("SELECT status, count(*) FROM read.order_views GROUP BY 1 ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>();
    assert_eq!(
        statuses,
        [("cancelled".into(), 40), ("confirmed".into(), 40), ("paid".into(), 40), ("shipped".into(), 40)]
    );
    let applied: Vec<(u32, u64, u64)> =
        status(&client).await.unwrap().iter().map(|s| (s.version, s.events_applied, s.parked)).collect();
    let events = applied[0].1;
    assert_eq!(applied, [(1, events, 0), (2, events, 0)], "every event applied exactly once, none parked");

    // The switch is one transaction: the view shows version 2 afterwards.
    rebuild.activate().await.unwrap();
    let versions: Vec<(u32, bool)> = status(&client).await.unwrap().iter().map(|s| (s.version, s.active)).collect();
    assert_eq!(versions, [(1, false), (2, true)]);
    assert_eq!(rows(&client, "read.order_views").await, rebuilt);
}

/// `OrderViews`, except that it fails on one event until fixed.
struct Flaky {
    poison: String,
    fixed: AtomicBool,
}

#[async_trait]
impl Projection for Flaky {
    fn name(&self) -> &'static str {
        "flaky_order_views"
    }

    fn create_sql(&self, version: u32) -> String {
        OrderViews.create_sql(version)
    }

    fn activate_sql(&self, version: u32) -> String {
        OrderViews.activate_sql(version)
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if event.stream_id == self.poison && !self.fixed.load(Ordering::SeqCst) {
            // Some of the work happens before the failure: the savepoint
            // must undo it.
            tx.execute("DELETE FROM read.order_views_v7", &[]).await?;
            return Err(ApplyError::Event("the projection has a bug".into()));
        }
        OrderViews.apply(tx, version, event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_parked_the_rest_applies_and_a_replay_after_the_fix_applies_it() {
    let (db, log, client) = setup().await;
    write_orders(log.clone(), 0, 6).await;
    let flaky = Arc::new(Flaky { poison: "order-o-3".into(), fixed: AtomicBool::new(false) });
    let projector = Projector::new(db.url(), log.clone(), flaky.clone(), 7, options()).await.unwrap();
    projector.prepare().await.unwrap();
    while projector.step().await.unwrap() > 0 {}
    assert_eq!(projector.position().await.unwrap(), log.last_position().await.unwrap(), "the projection went on");

    let parked = client
        .query("SELECT stream_id, event_type, attempts, error FROM projections.parked ORDER BY global_position", &[])
        .await
        .unwrap();
    // o-3's first event fails, and so does every later one of o-3.
    let parked: Vec<(String, String, i32)> = parked.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(parked.len(), 4, "{parked:?}");
    assert!(parked.iter().all(|(s, _, a)| s == "order-o-3" && *a == 3), "{parked:?}");
    let ids: Vec<String> = client
        .query("SELECT order_id FROM read.order_views_v7 ORDER BY order_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["o-0", "o-1", "o-2", "o-4", "o-5"], "the others applied; the failed attempts left nothing");

    flaky.fixed.store(true, Ordering::SeqCst);
    assert_eq!(projector.replay_parked().await.unwrap(), 4);
    let row = client.query_one("SELECT status FROM read.order_views_v7 WHERE order_id = 'o-3'", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "shipped", "replayed in order");
    assert_eq!(status(&client).await.unwrap()[0].parked, 0);
}
