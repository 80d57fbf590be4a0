//! The projection engine on real PostgreSQL: crashes at random points lose
//! and double-apply nothing (tests/crash.rs crashes it at the instant that
//! matters, through a failpoint), poison events are parked and replayed, a
//! second version builds beside the first and takes over atomically, and a
//! supervised projector whose connections are cut recovers by itself.

mod common;

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::Money;
use eventfold_platform::runtime::{Backoff, CancellationToken};
use eventfold_projector::{ApplyError, OrderViews, Projection, Projector, status};
use eventfold_store::{Database, EventLog, RecordedEvent};
use eventfold_tests::orders::eur;
use tokio_postgres::Transaction;
use tower::ServiceExt;

use crate::common::{
    ANALYTICS_TABLES, Tally, append_counted, log_positions, options, setup, wait_until_at, write_orders,
};

fn random(below: u64) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(below);
    hasher.finish() % below.max(1)
}

/// Kills a projector of version 1 at random points, 8 times, while `writer`
/// appends; then lets two of them catch up, and builds version 2 from
/// scratch beside them. Returns the rows of `tables` (`(name, order by)`) for v1 and v2, and
/// asserts that both applied every event once and parked none.
async fn crash_then_rebuild(
    database: &Database,
    log: &Arc<dyn EventLog>,
    client: &tokio_postgres::Client,
    projection: Arc<dyn Projection>,
    writer: tokio::task::JoinHandle<()>,
    tables: &[(&str, &str)],
) -> (Vec<Vec<String>>, Vec<Vec<String>>, Projector) {
    for _ in 0..8 {
        // A pool of its own, whose connections die with the projector.
        let projector = Projector::new(database.without_flush_wait(2), log.clone(), projection.clone(), 1, options());
        let task = tokio::spawn(projector.run(CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(20 + random(200))).await;
        task.abort();
        let _ = task.await;
    }
    writer.await.expect("writer");
    let head = log.last_position().await.unwrap();
    let mine = |s: &eventfold_projector::Status| s.name == projection.name();
    let reached = status(database).await.unwrap().into_iter().find(mine).map_or(0, |s| s.position);
    assert!(reached > 0, "the killed projectors made progress before the last start");
    // Two instances of the version catch up at once: the checkpoint's lock
    // lets one apply each batch (events_applied counts a double apply).
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let projector = Projector::new(database.clone(), log.clone(), projection.clone(), 1, options());
        tasks.push(tokio::spawn(projector.run(stop.clone())));
    }
    let probe = Projector::new(database.clone(), log.clone(), projection.clone(), 1, options());
    wait_until_at(&probe, head).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }

    let rebuild = Projector::new(database.clone(), log.clone(), projection.clone(), 2, options());
    rebuild.prepare().await.unwrap();
    while rebuild.step().await.unwrap() > 0 {}
    let applied: Vec<(u32, u64, u64)> = status(database)
        .await
        .unwrap()
        .into_iter()
        .filter(mine)
        .map(|s| (s.version, s.events_applied, s.parked))
        .collect();
    let events = applied[0].1;
    assert!(events > 0);
    assert_eq!(applied, [(1, events, 0), (2, events, 0)], "every event applied exactly once, none parked");
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for (table, order) in tables {
        v1.push(eventfold_tests::table_rows(client, &format!("{table}_v1"), order).await);
        v2.push(eventfold_tests::table_rows(client, &format!("{table}_v2"), order).await);
    }
    (v1, v2, rebuild)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_neither_lose_nor_double_apply_and_a_rebuild_matches() {
    let (_db, database, log, client) = setup().await;
    let writer = tokio::spawn(write_orders(log.clone(), 0, 160));
    let (survived, rebuilt, rebuild) =
        crash_then_rebuild(&database, &log, &client, Arc::new(OrderViews), writer, &[("read.order_views", "order_id")])
            .await;
    assert_eq!(survived[0].len(), 160, "one row per order");
    assert_eq!(survived, rebuilt, "after the crashes, the read model equals a rebuild, row for row");
    assert_eq!(
        eventfold_tests::table_rows(&client, "read.order_views", "order_id").await,
        survived[0],
        "the view shows version 1"
    );

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

    // The set-based batches equal event-by-event application, row for row.
    let by_event = Projector::new(database.clone(), log.clone(), Arc::new(EventByEvent), 9, options());
    by_event.prepare().await.unwrap();
    while by_event.step().await.unwrap() > 0 {}
    assert_eq!(eventfold_tests::table_rows(&client, "read.order_views_v9", "order_id").await, survived[0]);

    // The switch is one transaction: the view shows version 2 afterwards.
    rebuild.activate().await.unwrap();
    let versions: Vec<(u32, bool)> = status(&database)
        .await
        .unwrap()
        .iter()
        .filter(|s| s.name == "order_views")
        .map(|s| (s.version, s.active))
        .collect();
    assert_eq!(versions, [(1, false), (2, true)]);
    assert_eq!(eventfold_tests::table_rows(&client, "read.order_views", "order_id").await, rebuilt[0]);
}

/// Stock moves through the real command bus: 5 products, reservations of
/// 60 orders, each later released, consumed or kept; then products 2, 3
/// and 4 are held down to 11, 10 and 9 available (around the low-stock
/// threshold of 10).
async fn write_stock(log: Arc<dyn EventLog>) {
    use eventfold_domain::inventory::{
        ConsumeReservation, RegisterProduct, ReleaseReservation, ReplenishStock, ReserveStock,
    };
    let bus = eventfold_command::bus(log, eventfold_command::BusOptions::default());
    let send = |product: usize, command: eventfold_domain::inventory::InventoryCommand| {
        let bus = bus.clone();
        async move {
            let envelope =
                Envelope::new(Command::Inventory { product_id: format!("sku-{product}"), command }, Meta::default());
            bus.oneshot(envelope).await
        }
    };
    for p in 0..5 {
        send(p, RegisterProduct { product_id: format!("sku-{p}"), name: format!("Product {p}") }.into()).await.unwrap();
        send(p, ReplenishStock { quantity: 40 }.into()).await.unwrap();
    }
    for o in 0..60usize {
        let (p, order_id) = (o % 5, format!("o-{o}"));
        let reserved = send(p, ReserveStock { order_id: order_id.clone(), quantity: 1 + (o % 4) as u32 }.into()).await;
        if reserved.is_err() {
            continue;
        }
        match o % 3 {
            0 => send(p, ReleaseReservation { order_id, reason: "cancelled".into() }.into()).await.unwrap(),
            1 => send(p, ConsumeReservation { order_id }.into()).await.unwrap(),
            _ => continue,
        };
    }
    for (p, quantity) in [(2, 9), (3, 10), (4, 11)] {
        send(p, ReserveStock { order_id: format!("hold-{p}"), quantity }.into()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_views_survive_crashes_and_agree_with_the_aggregates() {
    use eventfold_domain::inventory::Inventory;
    let (_db, database, log, client) = setup().await;
    let writer = tokio::spawn(write_stock(log.clone()));
    let tables = [("read.inventory_views", "product_id"), ("read.inventory_reservations", "product_id, order_id")];
    let (survived, rebuilt, _) = crash_then_rebuild(
        &database,
        &log,
        &client,
        Arc::new(eventfold_projector::InventoryViews::default()),
        writer,
        &tables,
    )
    .await;
    assert_eq!(survived, rebuilt, "row for row, both tables");

    let handler = eventfold_command::Handler::new(log.clone(), eventfold_command::SnapshotPolicy::default());
    let mut low = Vec::new();
    for p in 0..5 {
        let product = format!("sku-{p}");
        let state = handler.load::<Inventory>(&format!("inventory-{product}")).await.unwrap().state;
        let row = client
            .query_one(
                "SELECT available, reserved, shipped FROM read.inventory_views WHERE product_id = $1",
                &[&product],
            )
            .await
            .unwrap();
        let view: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            view,
            (state.available as i64, state.reserved() as i64, state.consumed as i64),
            "{product}: the view agrees with the aggregate"
        );
        let held: Vec<(String, i64)> = eventfold_tests::select(
            &client,
            "SELECT order_id, quantity FROM read.inventory_reservations WHERE product_id = $1 ORDER BY order_id",
            &[&product],
            |r| (r.get(0), r.get(1)),
        )
        .await;
        let expected: Vec<(String, i64)> = state.reservations.iter().map(|(o, q)| (o.clone(), i64::from(*q))).collect();
        assert_eq!(held, expected, "{product}: the open reservations");

        let row = client
            .query_one(
                "SELECT low_stock_threshold, low_stock FROM read.inventory_views WHERE product_id = $1",
                &[&product],
            )
            .await
            .unwrap();
        let threshold = eventfold_projector::DEFAULT_LOW_STOCK_THRESHOLD;
        assert_eq!(row.get::<_, i64>(0), threshold, "{product}: the threshold it was registered with");
        assert_eq!(
            row.get::<_, bool>(1),
            (state.available as i64) <= threshold,
            "{product}: low on stock exactly when at most {threshold} are available ({} are)",
            state.available
        );
        if state.available as i64 <= threshold {
            low.push(product);
        }
    }
    assert_eq!(low, ["sku-3", "sku-4"], "10 and 9 available are low, 11 and more are not");
    let flagged: Vec<String> = eventfold_tests::select(
        &client,
        "SELECT product_id FROM read.inventory_views WHERE low_stock ORDER BY product_id",
        &[],
        |r| r.get(0),
    )
    .await;
    assert_eq!(flagged, low, "the low-stock products");
}

/// `OrderViews` applied one event at a time (no `apply_batch`), beside it.
struct EventByEvent;

#[async_trait]
impl Projection for EventByEvent {
    fn name(&self) -> &'static str {
        "order_views_event_by_event"
    }

    fn create_sql(&self, version: u32) -> String {
        OrderViews.create_sql(version)
    }

    fn tables(&self, version: u32) -> Vec<String> {
        OrderViews.tables(version)
    }

    fn activate_sql(&self, _version: u32) -> String {
        "SELECT 1".to_owned()
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        OrderViews.apply(tx, version, event).await
    }
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

    fn tables(&self, version: u32) -> Vec<String> {
        OrderViews.tables(version)
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
    let (_db, database, log, client) = setup().await;
    write_orders(log.clone(), 0, 6).await;
    let flaky = Arc::new(Flaky { poison: "order-o-3".into(), fixed: AtomicBool::new(false) });
    let projector = Projector::new(database.clone(), log.clone(), flaky.clone(), 7, options());
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
    let ids: Vec<String> =
        eventfold_tests::select(&client, "SELECT order_id FROM read.order_views_v7 ORDER BY order_id", &[], |r| {
            r.get(0)
        })
        .await;
    assert_eq!(ids, ["o-0", "o-1", "o-2", "o-4", "o-5"], "the others applied; the failed attempts left nothing");

    flaky.fixed.store(true, Ordering::SeqCst);
    assert_eq!(projector.replay_parked().await.unwrap(), 4);
    let row = client.query_one("SELECT status FROM read.order_views_v7 WHERE order_id = 'o-3'", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "shipped", "replayed in order");
    assert_eq!(status(&database).await.unwrap()[0].parked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_reset_per_projection() {
    let (_db, database, log, client) = setup().await;
    write_orders(log.clone(), 0, 4).await;
    let projector = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, options());
    projector.prepare().await.unwrap();
    while projector.step().await.unwrap() > 0 {}
    let before = eventfold_tests::table_rows(&client, "read.order_views", "order_id").await;
    assert_eq!(before.len(), 4);

    assert!(eventfold_projector::set_stopped(&database, "order_views", true).await.unwrap());
    write_orders(log.clone(), 4, 2).await;
    let stopped_at = projector.position().await.unwrap();
    assert_eq!(projector.step().await.unwrap(), 0, "a stopped projection applies nothing");
    assert_eq!(projector.position().await.unwrap(), stopped_at);
    assert!(status(&database).await.unwrap()[0].stopped);
    assert!(!eventfold_projector::set_stopped(&database, "no_such", true).await.unwrap());

    assert!(eventfold_projector::set_stopped(&database, "order_views", false).await.unwrap());
    while projector.step().await.unwrap() > 0 {}
    assert_eq!(projector.position().await.unwrap(), log.last_position().await.unwrap(), "started again");
    let all = eventfold_tests::table_rows(&client, "read.order_views", "order_id").await;
    assert_eq!(all.len(), 6);

    assert_eq!(eventfold_projector::reset(&database, &OrderViews).await.unwrap(), Some(1));
    assert_eq!(projector.position().await.unwrap(), 0);
    assert!(eventfold_tests::table_rows(&client, "read.order_views", "order_id").await.is_empty(), "emptied");
    while projector.step().await.unwrap() > 0 {}
    assert_eq!(
        eventfold_tests::table_rows(&client, "read.order_views", "order_id").await,
        all,
        "applied again, row for row"
    );
    assert_eq!(status(&database).await.unwrap()[0].events_applied, log.last_position().await.unwrap());
}

/// The long-running projector follows a rebuild's switch: after the new
/// version is activated, new events reach it (and not the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_projector_follows_the_active_version() {
    let (_db, database, log, client) = setup().await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(eventfold_projector::run_active(
        database.clone(),
        log.clone(),
        Arc::new(OrderViews),
        options(),
        eventfold_projector::Attach::default(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    write_orders(log.clone(), 0, 4).await;
    let v1 = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, options());
    wait_until_at(&v1, log.last_position().await.unwrap()).await;

    let v2 = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options());
    v2.prepare().await.unwrap();
    while v2.step().await.unwrap() > 0 {}
    v2.activate().await.unwrap();
    let switched_at = v1.position().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_orders(log.clone(), 4, 3).await;
    wait_until_at(&v2, log.last_position().await.unwrap()).await;
    assert_eq!(
        eventfold_tests::table_rows(&client, "read.order_views", "order_id").await.len(),
        7,
        "the view shows the new orders"
    );
    assert_eq!(v1.position().await.unwrap(), switched_at, "the old version is no longer applied");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("stops on shutdown").unwrap().unwrap();
}

/// Deposits, withdrawals and transfers between 6 accounts through the real
/// command bus.
async fn write_money(log: Arc<dyn EventLog>) {
    use eventfold_domain::account::{
        AccountCommand, DepositMoney, OpenAccount, ReceiveTransfer, SendTransfer, WithdrawMoney,
    };
    let bus = eventfold_command::bus(log, eventfold_command::BusOptions::default());
    let send = |account: usize, command: AccountCommand| {
        let bus = bus.clone();
        async move {
            let envelope =
                Envelope::new(Command::Account { account_id: format!("a-{account}"), command }, Meta::default());
            bus.oneshot(envelope).await
        }
    };
    for a in 0..6 {
        let open = OpenAccount { account_id: format!("a-{a}"), owner_id: format!("u-{a}"), currency: eur() };
        send(a, open.into()).await.unwrap();
        let deposit = DepositMoney { transaction_id: format!("d-{a}"), amount: Money::new(10_000, eur()) };
        send(a, deposit.into()).await.unwrap();
    }
    for t in 0..60usize {
        let (from, to) = (t % 6, (t + 1 + t % 4) % 6);
        let amount = Money::new(100 + (t as i64 * 37) % 900, eur());
        if t % 5 == 0 {
            let withdraw = WithdrawMoney { transaction_id: format!("w-{t}"), amount };
            send(from, withdraw.into()).await.unwrap();
            continue;
        }
        let transfer_id = format!("t-{t}");
        let sent = SendTransfer { transfer_id: transfer_id.clone(), to_account_id: format!("a-{to}"), amount };
        if send(from, sent.into()).await.is_ok() {
            let received = ReceiveTransfer { transfer_id, from_account_id: format!("a-{from}"), amount };
            send(to, received.into()).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_analytics_and_user_activity_survive_crashes() {
    let (_db, database, log, client) = setup().await;
    let writer = tokio::spawn(write_orders(log.clone(), 0, 120));
    let analytics = Arc::new(eventfold_projector::OrderAnalytics);
    let (survived, rebuilt, _) =
        crash_then_rebuild(&database, &log, &client, analytics, writer, &ANALYTICS_TABLES).await;
    assert_eq!(survived[0].len(), 120, "one fact per order");
    assert_eq!(survived, rebuilt, "row for row, every table");

    // The same log again, for the user timelines.
    let writer = tokio::spawn(async {});
    let tables = [("read.user_activity", "user_id, global_position"), ("read.user_orders", "order_id")];
    let activity = Arc::new(eventfold_projector::UserActivity);
    let (survived, rebuilt, _) = crash_then_rebuild(&database, &log, &client, activity, writer, &tables).await;
    assert_eq!(survived[1].len(), 120);
    assert_eq!(survived, rebuilt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_views_survive_crashes() {
    let (_db, database, log, client) = setup().await;
    let writer = tokio::spawn(write_money(log.clone()));
    let tables = [("read.accounts", "account_id"), ("read.account_transactions", "account_id, stream_version")];
    let accounts = Arc::new(eventfold_projector::AccountViews);
    let (survived, rebuilt, _) = crash_then_rebuild(&database, &log, &client, accounts, writer, &tables).await;
    assert_eq!(survived[0].len(), 6);
    assert!(survived[1].len() > 60, "the movements: {}", survived[1].len());
    assert_eq!(survived, rebuilt);
}

/// The projector runs under the platform's supervisor while every
/// connection to its database (its pool's, the log's, the writer's) is cut
/// again and again during the appends: each cut that fails a run is logged
/// and the supervisor starts it again after its backoff, from the
/// checkpoint. In the end every event of the log is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_projector_whose_connections_are_cut_recovers_and_applies_every_event_once() {
    const EVENTS: usize = 300;
    let (db, database, log, admin) = setup().await;
    let token = CancellationToken::new();
    let runs = Arc::new(AtomicU32::new(0));
    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    let supervisor = tokio::spawn({
        let (database, log, runs) = (database.clone(), log.clone(), runs.clone());
        eventfold_platform::runtime::supervise("tally", token.clone(), backoff, move |token| {
            runs.fetch_add(1, Ordering::SeqCst);
            eventfold_projector::run_active(
                database.clone(),
                log.clone(),
                Arc::new(Tally),
                options(),
                eventfold_projector::Attach::default(),
                Duration::from_millis(50),
                token,
            )
        })
    });
    let appender = tokio::spawn(append_counted(log.clone(), 0, EVENTS));

    // Cut every connection but the admin's, every 150 ms, while the events
    // arrive and until the projector was started again twice (30 s at most).
    let cutting = Instant::now();
    let mut cut = 0;
    while !appender.is_finished() || (runs.load(Ordering::SeqCst) < 3 && cutting.elapsed() < Duration::from_secs(30)) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        cut += admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name()],
            )
            .await
            .expect("cut the connections")
            .len();
    }
    appender.await.expect("every append is acknowledged in the end");
    assert!(cut > 0, "connections were cut");

    let logged = log_positions(&log).await;
    assert_eq!(logged.len(), EVENTS, "each append is in the log once");
    let probe = Projector::new(database.clone(), log.clone(), Arc::new(Tally), 1, options());
    wait_until_at(&probe, *logged.last().unwrap() as u64).await;
    let applied: Vec<i64> = eventfold_tests::select(
        &admin,
        "SELECT global_position FROM read.tally_v1 ORDER BY global_position",
        &[],
        |r| r.get(0),
    )
    .await;
    assert_eq!(applied, logged, "every event of the log applied exactly once");
    let tally: Vec<(u64, u64)> = status(&database)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "tally")
        .map(|s| (s.events_applied, s.parked))
        .collect();
    assert_eq!(tally, [(EVENTS as u64, 0)], "counted once each, none parked");
    let started = runs.load(Ordering::SeqCst);
    assert!(started >= 2, "the cuts failed the projector and the supervisor started it again ({started} runs)");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), supervisor).await.expect("stops when cancelled").unwrap();
}
