//! Every read model rebuilt set-based (`Projection::apply_batch`) equals
//! the same model applied one event at a time (`Projection::apply`), row
//! for row, on a generated workload holding every event type each model
//! handles: once with batches of thousands of events (a rebuild), once
//! with batches of 7 (so that state crosses batch boundaries and is read
//! back from the tables).

mod common;

use std::{collections::BTreeSet, sync::Arc};

use async_trait::async_trait;
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    account::{
        AccountCommand, CloseAccount, DepositMoney, OpenAccount, ReceiveTransfer, RefundTransfer, RequestTransfer,
        SendTransfer, WithdrawMoney,
    },
    inventory::{
        ConsumeReservation, InventoryCommand, RegisterProduct, ReleaseReservation, ReplenishStock, ReserveStock,
    },
    order::{CancelOrder, ConfirmOrder, CreateOrder, OrderCommand, OrderItem, ProcessPayment, ShipOrder},
    user::{RecordAction, RecordLogin, RegisterUser, UserCommand},
};
use eventfold_projector::{ApplyError, Projection, Projector, ProjectorOptions};
use eventfold_store::{AllRead, EventFilter, EventLog, RecordedEvent};
use tokio_postgres::Transaction;
use tower::ServiceExt;

use crate::common::{ANALYTICS_TABLES, setup};

type Bus = eventfold_command::Bus;

async fn send(bus: &Bus, command: Command) -> bool {
    bus.clone().oneshot(Envelope::new(command, Meta::default())).await.is_ok()
}

/// Orders in EUR and USD with one to three lines (a product twice in some),
/// by customers `u-0` … `u-8`, each taken along one of seven paths: left
/// created, cancelled when created, confirmed, cancelled when confirmed,
/// paid, shipped, cancelled when paid.
async fn write_orders(bus: Bus) {
    for o in 0..210usize {
        let order_id = format!("o-{o}");
        let order = |command: OrderCommand| Command::Order { order_id: order_id.clone(), command };
        let currency = if o % 5 == 4 { "USD" } else { "EUR" }.parse().unwrap();
        let items: Vec<OrderItem> = (0..1 + o % 3)
            .map(|line| OrderItem {
                product_id: format!("sku-{}", (o + line * (o % 2)) % 7),
                quantity: 1 + ((o + line) % 4) as u32,
                unit_price: Money::new(100 + (o as i64 * 13 + line as i64 * 7) % 900, currency),
            })
            .collect();
        let total = Money::new(items.iter().map(|i| i.unit_price.minor * i64::from(i.quantity)).sum(), currency);
        let create = CreateOrder {
            order_id: order_id.clone(),
            customer_id: format!("u-{}", o % 9),
            currency,
            items,
            payment_token: None,
            carrier: None,
        };
        assert!(send(&bus, order(create.into())).await, "create {order_id}");
        let cancel = || order(CancelOrder { reason: format!("reason {o}") }.into());
        let path = o % 7;
        if path == 0 {
            continue;
        }
        if path == 1 {
            assert!(send(&bus, cancel()).await);
            continue;
        }
        assert!(send(&bus, order(ConfirmOrder.into())).await);
        match path {
            2 => continue,
            3 => {
                assert!(send(&bus, cancel()).await);
                continue;
            }
            _ => {}
        }
        let pay = ProcessPayment { payment_id: format!("p-{o}"), amount: total };
        assert!(send(&bus, order(pay.into())).await);
        match path {
            5 => assert!(
                send(&bus, order(ShipOrder { carrier: "DHL".into(), tracking_number: format!("T-{o}") }.into())).await
            ),
            6 => assert!(send(&bus, cancel()).await),
            _ => {}
        }
    }
}

/// Users `u-0` … `u-5` (the orders' customers `u-6` … `u-8` never
/// register), their logins and actions (with and without a subject).
async fn write_users(bus: Bus) {
    for round in 0..40usize {
        let u = round % 6;
        let user = |command: UserCommand| Command::User { user_id: format!("u-{u}"), command };
        if round < 6 {
            let register = RegisterUser {
                user_id: format!("u-{u}"),
                email: format!("u{u}@example.com").into(),
                display_name: format!("User {u}"),
            };
            assert!(send(&bus, user(register.into())).await);
        }
        assert!(send(&bus, user(RecordLogin { source: format!("10.0.0.{round}") }.into())).await);
        let subject = if round % 3 == 0 { String::new() } else { format!("sku-{}", round % 7) };
        assert!(send(&bus, user(RecordAction { action: "viewed_product".into(), subject }.into())).await);
    }
}

/// Products `sku-0` … `sku-4`: registered, replenished, reserved for
/// orders, the reservations released, consumed or kept, and some orders
/// reserving the same product again after a release.
async fn write_stock(bus: Bus) {
    let stock = |p: usize, command: InventoryCommand| Command::Inventory { product_id: format!("sku-{p}"), command };
    for p in 0..5 {
        let register = RegisterProduct { product_id: format!("sku-{p}"), name: format!("Product {p}") };
        assert!(send(&bus, stock(p, register.into())).await);
        assert!(send(&bus, stock(p, ReplenishStock { quantity: 60 }.into())).await);
    }
    for o in 0..90usize {
        let (p, order_id) = (o % 5, format!("r-{o}"));
        if !send(&bus, stock(p, ReserveStock { order_id: order_id.clone(), quantity: 1 + (o % 4) as u32 }.into())).await
        {
            continue;
        }
        match o % 4 {
            0 => {
                let release = ReleaseReservation { order_id: order_id.clone(), reason: "cancelled".into() };
                assert!(send(&bus, stock(p, release.into())).await);
                // The same order reserves again (a new row for a key just removed).
                send(&bus, stock(p, ReserveStock { order_id, quantity: 1 }.into())).await;
            }
            1 => assert!(send(&bus, stock(p, ConsumeReservation { order_id }.into())).await),
            _ => {}
        }
        if o % 10 == 9 {
            assert!(send(&bus, stock(p, ReplenishStock { quantity: 5 }.into())).await);
        }
    }
}

/// Accounts in EUR and one in USD: deposits, withdrawals, requested,
/// sent, received and refunded transfers, and an account closed at 0.
async fn write_money(bus: Bus) {
    let eur = "EUR".parse().unwrap();
    let account = |a: usize, command: AccountCommand| Command::Account { account_id: format!("a-{a}"), command };
    for a in 0..8 {
        let currency = if a == 6 { "USD".parse().unwrap() } else { eur };
        let open = OpenAccount { account_id: format!("a-{a}"), owner_id: format!("u-{a}"), currency };
        assert!(send(&bus, account(a, open.into())).await);
        if a != 7 {
            let deposit = DepositMoney { transaction_id: format!("d-{a}"), amount: Money::new(10_000, currency) };
            assert!(send(&bus, account(a, deposit.into())).await);
        }
    }
    assert!(send(&bus, account(7, CloseAccount.into())).await);
    for t in 0..80usize {
        let (from, to) = (t % 6, (t + 1 + t % 4) % 6);
        let amount = Money::new(100 + (t as i64 * 37) % 900, eur);
        match t % 5 {
            0 => {
                let withdraw = WithdrawMoney { transaction_id: format!("w-{t}"), amount };
                assert!(send(&bus, account(from, withdraw.into())).await);
                continue;
            }
            1 => {
                let request =
                    RequestTransfer { transfer_id: format!("q-{t}"), to_account_id: format!("a-{to}"), amount };
                assert!(send(&bus, account(from, request.into())).await);
            }
            _ => {}
        }
        let transfer_id = format!("t-{t}");
        let sent = SendTransfer { transfer_id: transfer_id.clone(), to_account_id: format!("a-{to}"), amount };
        if !send(&bus, account(from, sent.into())).await {
            continue;
        }
        if t % 7 == 3 {
            let refund = RefundTransfer { transfer_id, reason: "recipient refused".into() };
            assert!(send(&bus, account(from, refund.into())).await);
        } else {
            let received = ReceiveTransfer { transfer_id, from_account_id: format!("a-{from}"), amount };
            assert!(send(&bus, account(to, received.into())).await);
        }
    }
}

/// A read model to check: the name of its event-by-event twin, the model,
/// its tables with the columns that order their rows.
type Model = (&'static str, Arc<dyn Projection>, Vec<(&'static str, &'static str)>);

/// A projection applied one event at a time: its own name (and so its own
/// checkpoint), the tables of `inner`, every event of the log (no filter:
/// the reference shows that the model's filter leaves out nothing it needs).
struct EventByEvent {
    name: &'static str,
    inner: Arc<dyn Projection>,
}

#[async_trait]
impl Projection for EventByEvent {
    fn name(&self) -> &'static str {
        self.name
    }

    fn create_sql(&self, version: u32) -> String {
        self.inner.create_sql(version)
    }

    fn tables(&self, version: u32) -> Vec<String> {
        self.inner.tables(version)
    }

    fn activate_sql(&self, _version: u32) -> String {
        "SELECT 1".to_owned()
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        self.inner.apply(tx, version, event).await
    }
}

/// A projection that must apply every batch set-based: a batch refused
/// (`Ok(false)` or an error, after which the engine would go event by
/// event) fails the test.
struct SetBased(Arc<dyn Projection>);

#[async_trait]
impl Projection for SetBased {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn create_sql(&self, version: u32) -> String {
        self.0.create_sql(version)
    }

    fn tables(&self, version: u32) -> Vec<String> {
        self.0.tables(version)
    }

    fn event_filter(&self) -> eventfold_store::EventFilter {
        self.0.event_filter()
    }

    fn activate_sql(&self, _version: u32) -> String {
        "SELECT 1".to_owned()
    }

    async fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        version: u32,
        events: &[RecordedEvent],
    ) -> Result<bool, ApplyError> {
        match self.0.apply_batch(tx, version, events).await {
            Ok(true) => Ok(true),
            Ok(false) => panic!("{}: no set-based batches", self.name()),
            Err(error) => panic!("{}: a batch of {} events refused: {error}", self.name(), events.len()),
        }
    }

    async fn apply(&self, _tx: &Transaction<'_>, _version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        panic!("{}: event {} applied on its own", self.name(), event.global_position)
    }
}

/// Builds `projection` as `version` from the whole log; returns how many
/// events it applied and how many it parked.
async fn build(
    database: &eventfold_store::Database,
    log: &Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    version: u32,
    batch_size: usize,
) -> (u64, u64) {
    let options = ProjectorOptions { batch_size, ..ProjectorOptions::default() };
    let projector = Projector::new(database.clone(), log.clone(), projection.clone(), version, options);
    projector.prepare().await.unwrap();
    while projector.step().await.unwrap() > 0 {}
    let status = eventfold_projector::status(database).await.unwrap();
    let mine = status.iter().find(|s| s.name == projection.name() && s.version == version).expect("its status");
    (mine.events_applied, mine.parked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_rebuilt_set_based_equals_it_applied_event_by_event() {
    let (_db, database, log, client) = setup().await;
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    tokio::join!(write_orders(bus.clone()), write_users(bus.clone()), write_stock(bus.clone()), write_money(bus));

    // The workload holds every event type the read models handle.
    let mut types = BTreeSet::new();
    let mut after = 0;
    loop {
        let slice = log.read_all(AllRead { after, max_count: 1000, filter: EventFilter::default() }).await.unwrap();
        types.extend(slice.events.iter().map(|e| e.event_type.clone()));
        if slice.end_of_log {
            break;
        }
        after = slice.next_position;
    }
    let handled = [
        "OrderCreated",
        "OrderConfirmed",
        "PaymentProcessed",
        "OrderShipped",
        "OrderCancelled",
        "ProductRegistered",
        "StockReplenished",
        "InventoryReserved",
        "InventoryReleased",
        "InventoryConsumed",
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "TransferRequested",
        "TransferSent",
        "TransferReceived",
        "TransferRefunded",
        "AccountClosed",
        "UserRegistered",
        "UserLoggedIn",
        "UserActionRecorded",
    ];
    let missing: Vec<&str> = handled.iter().copied().filter(|t| !types.contains(*t)).collect();
    assert!(missing.is_empty(), "the workload lacks {missing:?}");

    let models: [Model; 5] = [
        ("order_views_by_event", Arc::new(eventfold_projector::OrderViews), vec![("read.order_views", "order_id")]),
        (
            "inventory_views_by_event",
            Arc::new(eventfold_projector::InventoryViews::default()),
            vec![("read.inventory_views", "product_id"), ("read.inventory_reservations", "product_id, order_id")],
        ),
        ("order_analytics_by_event", Arc::new(eventfold_projector::OrderAnalytics), ANALYTICS_TABLES.to_vec()),
        (
            "account_views_by_event",
            Arc::new(eventfold_projector::AccountViews),
            vec![("read.accounts", "account_id"), ("read.account_transactions", "account_id, stream_version")],
        ),
        (
            "user_activity_by_event",
            Arc::new(eventfold_projector::UserActivity),
            vec![
                ("read.users", "user_id"),
                ("read.user_activity", "user_id, global_position"),
                ("read.user_orders", "order_id"),
            ],
        ),
    ];
    for (by_event_name, projection, tables) in models {
        let name = projection.name();
        let by_event = Arc::new(EventByEvent { name: by_event_name, inner: projection.clone() });
        let reference = build(&database, &log, by_event, 9, 500).await;
        let set_based: Arc<dyn Projection> = Arc::new(SetBased(projection.clone()));
        let rebuilt = build(&database, &log, set_based.clone(), 1, 5000).await;
        let small = build(&database, &log, set_based, 2, 7).await;
        // Parked: none. Applied: every event of the log by the reference,
        // those of the model's filter set-based.
        assert_eq!(reference.1, 0, "{name}: event by event parks nothing");
        assert_eq!(rebuilt, small, "{name}: batches of 5000 and of 7 applied the same events");
        assert_eq!(rebuilt.1, 0, "{name}: set-based parks nothing");
        assert!(rebuilt.0 > 0 && rebuilt.0 <= reference.0, "{name}: {rebuilt:?} against {reference:?}");
        for (table, order) in &tables {
            let want = eventfold_tests::table_rows(&client, &format!("{table}_v9"), order).await;
            assert!(!want.is_empty(), "{name}: {table} has rows");
            for version in [1, 2] {
                let got = eventfold_tests::table_rows(&client, &format!("{table}_v{version}"), order).await;
                assert_eq!(got, want, "{name}: {table}_v{version} equals event by event, row for row");
            }
        }
    }
}
