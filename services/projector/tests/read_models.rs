//! The read models `order_analytics`, `account_views` and `user_activity`
//! on real PostgreSQL: fed through the real command bus, projected to the
//! head, checked against what the test sent and against the aggregates,
//! and rebuilt as version 2 equal to version 1 row for row.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use eventfold_command::{Bus, Command, Envelope, Meta, Reply};
use eventfold_domain::{
    Currency, Money,
    account::{
        Account, AccountCommand, CloseAccount, DepositMoney, OpenAccount, ReceiveTransfer, RefundTransfer,
        SendTransfer, WithdrawMoney,
    },
    order::{CancelOrder, ConfirmOrder, CreateOrder, OrderCommand, OrderItem, ProcessPayment, ShipOrder},
    user::{RecordAction, RecordLogin, RegisterUser, User, UserCommand},
};
use eventfold_projector::{AccountViews, OrderAnalytics, Projection, Projector, ProjectorOptions, UserActivity};
use eventfold_store::{AllRead, Database, EventFilter, EventLog, RecordedEvent};
use eventfold_tests::TestDatabase;
use tokio_postgres::Client;
use tower::ServiceExt;

use crate::common::ANALYTICS_TABLES;

/// A migrated database, the pool of its projectors, the log, a client and
/// the command bus.
async fn setup() -> (TestDatabase, Database, Arc<dyn EventLog>, Client, Bus) {
    let (db, database, log, client) = common::setup().await;
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    (db, database, log, client, bus)
}

async fn send(bus: &Bus, command: Command) -> eventfold_command::Result<Reply> {
    bus.clone().oneshot(Envelope::new(command, Meta::default())).await
}

/// Sends `command`, which must be accepted; the position of its (single)
/// write's last event.
async fn accepted(bus: &Bus, command: Command) -> u64 {
    let what = format!("{command:?}");
    let reply = send(bus, command).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(!reply.changed_nothing(), "{what} appended events");
    reply.first().global_position
}

fn order(order_id: &str, command: impl Into<OrderCommand>) -> Command {
    Command::Order { order_id: order_id.into(), command: command.into() }
}

fn account(account_id: &str, command: impl Into<AccountCommand>) -> Command {
    Command::Account { account_id: account_id.into(), command: command.into() }
}

fn user(user_id: &str, command: impl Into<UserCommand>) -> Command {
    Command::User { user_id: user_id.into(), command: command.into() }
}

fn currency(code: &str) -> Currency {
    code.parse().unwrap()
}

/// Days since 1970-01-01 of the UTC date of `at`.
fn utc_day(at: SystemTime) -> i32 {
    (at.duration_since(UNIX_EPOCH).unwrap().as_secs() / 86_400) as i32
}

/// Every event of the log, in position order.
async fn all_events(log: &Arc<dyn EventLog>) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let slice = log.read_all(AllRead { after, max_count: 500, filter: EventFilter::default() }).await.unwrap();
        events.extend(slice.events);
        if slice.end_of_log || slice.next_position <= after {
            return events;
        }
        after = slice.next_position;
    }
}

/// Builds versions 1 (which becomes active) and 2 of `projection` from
/// scratch to the head, in batches of 25. Asserts that both applied the
/// same events and parked none, that each of `tables` (`(name, order by)`)
/// is equal in both row for row, and that the views show version 1.
async fn build_twice(
    database: &Database,
    log: &Arc<dyn EventLog>,
    client: &Client,
    projection: Arc<dyn Projection>,
    tables: &[(&str, &str)],
) {
    let head = log.last_position().await.unwrap();
    for version in [1, 2] {
        let options = ProjectorOptions { batch_size: 25, ..ProjectorOptions::default() };
        let projector = Projector::new(database.clone(), log.clone(), projection.clone(), version, options);
        projector.prepare().await.unwrap();
        while projector.step().await.unwrap() > 0 {}
        assert_eq!(projector.position().await.unwrap(), head, "version {version} reached the head");
    }
    let parked: Vec<String> = eventfold_tests::select(
        client,
        "SELECT version || ': ' || error FROM projections.parked WHERE name = $1",
        &[&projection.name()],
        |r| r.get(0),
    )
    .await;
    assert_eq!(parked, Vec::<String>::new(), "no event parked");
    let statuses: Vec<(u32, u64, bool)> = eventfold_projector::status(database)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == projection.name())
        .map(|s| (s.version, s.events_applied, s.active))
        .collect();
    let applied = statuses[0].1;
    assert!(applied > 0);
    assert_eq!(statuses, [(1, applied, true), (2, applied, false)], "both versions applied the same events");
    for (table, order) in tables {
        let v1 = eventfold_tests::table_rows(client, &format!("{table}_v1"), order).await;
        let v2 = eventfold_tests::table_rows(client, &format!("{table}_v2"), order).await;
        assert!(!v1.is_empty(), "{table} has rows");
        assert_eq!(v1, v2, "{table}: the rebuild equals the original row for row");
        assert_eq!(eventfold_tests::table_rows(client, table, order).await, v1, "{table}: the view shows version 1");
    }
}

// --- order_analytics ---------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Created,
    Confirmed,
    Paid,
    Shipped,
    /// Cancelled after the listed steps (0: right after creation, 1:
    /// confirmed, 2: confirmed and paid).
    Cancelled(u8),
}

impl Fate {
    fn status(self) -> &'static str {
        match self {
            Fate::Created => "created",
            Fate::Confirmed => "confirmed",
            Fate::Paid => "paid",
            Fate::Shipped => "shipped",
            Fate::Cancelled(_) => "cancelled",
        }
    }

    fn paid(self) -> bool {
        matches!(self, Fate::Paid | Fate::Shipped | Fate::Cancelled(2))
    }
}

struct SentOrder {
    id: String,
    customer: String,
    currency: Currency,
    items: Vec<OrderItem>,
    fate: Fate,
}

impl SentOrder {
    fn total(&self) -> i64 {
        self.items.iter().map(|i| i.unit_price.minor * i64::from(i.quantity)).sum()
    }
}

/// 42 orders of 5 customers in EUR and USD: all created first, then moved
/// to their fates in reverse order.
async fn write_orders(bus: &Bus) -> Vec<SentOrder> {
    let (eur, usd) = (currency("EUR"), currency("USD"));
    let mut orders = Vec::new();
    for o in 0..42usize {
        let currency = if o % 3 == 2 { usd } else { eur };
        let price = |minor: usize| Money::new(minor as i64, currency);
        let mut items = vec![OrderItem {
            product_id: format!("sku-{}", o % 4),
            quantity: 1 + (o % 3) as u32,
            unit_price: price(100 + 7 * o),
        }];
        if o % 2 == 0 {
            items.push(OrderItem { product_id: format!("sku-{}", (o + 1) % 4), quantity: 2, unit_price: price(250) });
        }
        if o % 8 == 2 {
            // The same product twice in one order, at another price.
            items.push(OrderItem { product_id: format!("sku-{}", o % 4), quantity: 3, unit_price: price(99) });
        }
        let fate = match o % 7 {
            0 => Fate::Cancelled(0),
            1 => Fate::Confirmed,
            2 => Fate::Paid,
            3 => Fate::Shipped,
            4 => Fate::Cancelled(2),
            5 => Fate::Created,
            _ => Fate::Cancelled(1),
        };
        if fate == Fate::Cancelled(0) {
            // Sold only in orders that get cancelled.
            items.push(OrderItem { product_id: "sku-withdrawn".into(), quantity: 1, unit_price: price(5000) });
        }
        let sent = SentOrder { id: format!("o-{o}"), customer: format!("c-{}", o % 5), currency, items, fate };
        let create = CreateOrder {
            order_id: sent.id.clone(),
            customer_id: sent.customer.clone(),
            currency,
            items: sent.items.clone(),
            payment_token: None,
            carrier: None,
        };
        accepted(bus, order(&sent.id, create)).await;
        orders.push(sent);
    }
    for sent in orders.iter().rev() {
        let id = &sent.id;
        let cancel = || order(id, CancelOrder { reason: "customer asked".into() });
        let pay = || {
            order(id, ProcessPayment { payment_id: format!("p-{id}"), amount: Money::new(sent.total(), sent.currency) })
        };
        match sent.fate {
            Fate::Created => {}
            Fate::Cancelled(0) => {
                accepted(bus, cancel()).await;
            }
            _ => {
                accepted(bus, order(id, ConfirmOrder)).await;
                if matches!(sent.fate, Fate::Paid | Fate::Shipped | Fate::Cancelled(2)) {
                    accepted(bus, pay()).await;
                }
                if sent.fate == Fate::Shipped {
                    accepted(bus, order(id, ShipOrder { carrier: "DHL".into(), tracking_number: format!("T-{id}") }))
                        .await;
                }
                if matches!(sent.fate, Fate::Cancelled(_)) {
                    accepted(bus, cancel()).await;
                }
            }
        }
    }
    // Refused commands append nothing and must not show.
    assert!(send(bus, order("o-3", CancelOrder { reason: "too late".into() })).await.is_err(), "o-3 is shipped");
    assert!(send(bus, order("o-0", ConfirmOrder)).await.is_err(), "o-0 is cancelled");
    orders
}

/// Orders, cancellations, amount paid, last order id and time.
type CustomerTotals = (i64, i64, i64, String, SystemTime);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_analytics_agree_with_the_orders_sent() {
    let (_db, database, log, client, bus) = setup().await;
    let orders = write_orders(&bus).await;
    build_twice(&database, &log, &client, Arc::new(OrderAnalytics), &ANALYTICS_TABLES).await;

    // When each order event was stored: (stream, type) → created_at.
    let mut stored: HashMap<(String, String), SystemTime> = HashMap::new();
    for e in all_events(&log).await {
        assert!(stored.insert((e.stream_id.clone(), e.event_type.clone()), e.created_at).is_none());
    }
    let at = |o: &SentOrder, event_type: &str| stored[&(format!("order-{}", o.id), event_type.to_owned())];

    // Per customer and currency: orders, cancellations, payments (kept
    // when a paid order is cancelled later), the last order created.
    let mut customers: BTreeMap<(String, String), CustomerTotals> = BTreeMap::new();
    for o in &orders {
        let entry = customers.entry((o.customer.clone(), o.currency.to_string())).or_insert((
            0,
            0,
            0,
            String::new(),
            UNIX_EPOCH,
        ));
        entry.0 += 1;
        entry.1 += i64::from(matches!(o.fate, Fate::Cancelled(_)));
        entry.2 += if o.fate.paid() { o.total() } else { 0 };
        (entry.3, entry.4) = (o.id.clone(), at(o, "OrderCreated"));
    }
    let rows = client
        .query(
            "SELECT customer_id, currency, order_count, cancelled_count, total_spent_minor, last_order_id, \
                    last_order_at FROM read.customer_orders ORDER BY customer_id, currency",
            &[],
        )
        .await
        .unwrap();
    let view: BTreeMap<(String, String), CustomerTotals> =
        rows.iter().map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))).collect();
    assert_eq!(customers.len(), 10, "5 customers, 2 currencies each");
    assert_eq!(view, customers, "customer totals");

    // Per UTC day and currency: created, cancelled, paid, revenue, each on
    // the day of its own event.
    let mut sales: BTreeMap<(i32, String), (i64, i64, i64, i64)> = BTreeMap::new();
    for o in &orders {
        let cur = o.currency.to_string();
        sales.entry((utc_day(at(o, "OrderCreated")), cur.clone())).or_default().0 += 1;
        if matches!(o.fate, Fate::Cancelled(_)) {
            sales.entry((utc_day(at(o, "OrderCancelled")), cur.clone())).or_default().1 += 1;
        }
        if o.fate.paid() {
            let day = sales.entry((utc_day(at(o, "PaymentProcessed")), cur)).or_default();
            day.2 += 1;
            day.3 += o.total();
        }
    }
    let view: BTreeMap<(i32, String), (i64, i64, i64, i64)> = eventfold_tests::select(
        &client,
        "SELECT day - DATE '1970-01-01', currency, orders_created, orders_cancelled, orders_paid, revenue_minor \
           FROM read.daily_sales",
        &[],
        |r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5))),
    )
    .await;
    assert_eq!(view, sales, "daily sales by the UTC day of each event");
    let revenue: i64 =
        orders.iter().filter(|o| o.fate.paid() && o.currency == currency("EUR")).map(SentOrder::total).sum();
    assert!(revenue > 0);
    assert_eq!(view.iter().filter(|((_, c), _)| c == "EUR").map(|(_, s)| s.3).sum::<i64>(), revenue);

    // Orders by creation day and current status.
    let mut statuses: BTreeMap<(i32, String), i64> = BTreeMap::new();
    for o in &orders {
        *statuses.entry((utc_day(at(o, "OrderCreated")), o.fate.status().to_owned())).or_default() += 1;
    }
    let view: BTreeMap<(i32, String), i64> = eventfold_tests::select(
        &client,
        "SELECT day - DATE '1970-01-01', status, orders FROM read.daily_status",
        &[],
        |r| ((r.get(0), r.get(1)), r.get(2)),
    )
    .await;
    assert_eq!(view, statuses, "orders by creation day and status");
    assert_eq!(view.values().sum::<i64>(), orders.len() as i64, "every order counted once");
    let per_status: BTreeMap<&str, i64> = view.iter().fold(BTreeMap::new(), |mut m, ((_, s), n)| {
        *m.entry(s.as_str()).or_default() += n;
        m
    });
    assert_eq!(
        per_status,
        BTreeMap::from([("cancelled", 18), ("confirmed", 6), ("created", 6), ("paid", 6), ("shipped", 6)])
    );

    // Product sales of the orders not cancelled, on their creation day.
    let mut products: BTreeMap<(i32, String, String), (i64, i64)> = BTreeMap::new();
    for o in orders.iter().filter(|o| !matches!(o.fate, Fate::Cancelled(_))) {
        for item in &o.items {
            let key = (utc_day(at(o, "OrderCreated")), item.product_id.clone(), o.currency.to_string());
            let line = products.entry(key).or_default();
            line.0 += i64::from(item.quantity);
            line.1 += i64::from(item.quantity) * item.unit_price.minor;
        }
    }
    let view: BTreeMap<(i32, String, String), (i64, i64)> = eventfold_tests::select(
        &client,
        "SELECT day - DATE '1970-01-01', product_id, currency, quantity, revenue_minor FROM read.product_sales",
        &[],
        |r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4))),
    )
    .await;
    assert_eq!(view, products, "product sales without the cancelled orders");
    assert!(view.keys().all(|(_, p, _)| p != "sku-withdrawn"), "a product of cancelled orders only is gone");
    let top: Vec<(String, i64)> = eventfold_tests::select(
        &client,
        "SELECT product_id, sum(quantity)::bigint FROM read.product_sales WHERE currency = 'EUR' \
          GROUP BY product_id ORDER BY 2 DESC, 1",
        &[],
        |r| (r.get(0), r.get(1)),
    )
    .await;
    let mut expected_top: BTreeMap<String, i64> = BTreeMap::new();
    for ((_, p, c), (q, _)) in &products {
        if c == "EUR" {
            *expected_top.entry(p.clone()).or_default() += q;
        }
    }
    let mut expected_top: Vec<(String, i64)> = expected_top.into_iter().collect();
    expected_top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    assert_eq!(top, expected_top, "top products in EUR");

    // The helper table: status and what was paid, per order.
    let facts: Vec<(String, String, i64)> = eventfold_tests::select(
        &client,
        "SELECT order_id, status, paid_minor FROM read.order_facts ORDER BY order_id",
        &[],
        |r| (r.get(0), r.get(1), r.get(2)),
    )
    .await;
    let mut expected: Vec<(String, String, i64)> = orders
        .iter()
        .map(|o| (o.id.clone(), o.fate.status().to_owned(), if o.fate.paid() { o.total() } else { 0 }))
        .collect();
    expected.sort();
    assert_eq!(facts, expected);
}

// --- account_views -----------------------------------------------------------

/// One expected history row: kind, transaction id, counterparty, amount,
/// balance after, reason.
type Movement = (String, String, Option<String>, i64, i64, Option<String>);

/// The test's own ledger of what it sent.
#[derive(Default)]
struct Ledger {
    balances: BTreeMap<String, i64>,
    history: BTreeMap<String, Vec<Movement>>,
}

impl Ledger {
    fn record(
        &mut self,
        account: &str,
        kind: &str,
        id: &str,
        counterparty: Option<&str>,
        amount: i64,
        reason: Option<String>,
    ) {
        let balance = self.balances.entry(account.to_owned()).or_default();
        *balance += if matches!(kind, "withdrawal" | "transfer_sent") { -amount } else { amount };
        let row = (kind.to_owned(), id.to_owned(), counterparty.map(str::to_owned), amount, *balance, reason);
        self.history.entry(account.to_owned()).or_default().push(row);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_views_agree_with_the_aggregates_and_the_ledger() {
    let (_db, database, log, client, bus) = setup().await;
    let (eur, usd) = (currency("EUR"), currency("USD"));
    let accounts =
        [("a-0", "u-0", eur), ("a-1", "u-0", eur), ("a-2", "u-1", eur), ("a-3", "u-2", usd), ("a-4", "u-1", eur)];
    let mut ledger = Ledger::default();
    for (id, owner, currency) in accounts {
        accepted(&bus, account(id, OpenAccount { account_id: id.into(), owner_id: owner.into(), currency })).await;
        ledger.balances.insert(id.into(), 0);
    }
    let deposit = |id: &str, tx: &str, minor: i64, currency: Currency| {
        account(id, DepositMoney { transaction_id: tx.into(), amount: Money::new(minor, currency) })
    };
    let withdraw = |id: &str, tx: &str, minor: i64| {
        account(id, WithdrawMoney { transaction_id: tx.into(), amount: Money::new(minor, eur) })
    };
    for (id, minor, currency) in [("a-0", 10_000, eur), ("a-1", 5_000, eur), ("a-2", 2_500, eur), ("a-3", 7_000, usd)] {
        accepted(&bus, deposit(id, &format!("d-{id}"), minor, currency)).await;
        ledger.record(id, "deposit", &format!("d-{id}"), None, minor, None);
    }
    accepted(&bus, withdraw("a-0", "w-0", 1_200)).await;
    ledger.record("a-0", "withdrawal", "w-0", None, 1_200, None);
    assert!(send(&bus, withdraw("a-2", "w-1", 9_999)).await.is_err(), "never overdrawn");
    let repeat = send(&bus, deposit("a-0", "d-a-0", 10_000, eur)).await.unwrap();
    assert!(repeat.changed_nothing(), "a repeated deposit is a no-op");

    // A transfer as the money transfer saga makes it: debit the source,
    // credit the target, and give the source its money back if the target
    // refuses (the answer is the refusal).
    let transfer = async |id: &str, from: &str, to: &str, minor: i64| -> eventfold_command::Result<()> {
        let amount = Money::new(minor, eur);
        let sent = SendTransfer { transfer_id: id.into(), to_account_id: to.into(), amount };
        accepted(&bus, account(from, sent)).await;
        let received = ReceiveTransfer { transfer_id: id.into(), from_account_id: from.into(), amount };
        let refused = match send(&bus, account(to, received)).await {
            Ok(_) => return Ok(()),
            Err(refused) => refused,
        };
        accepted(&bus, account(from, RefundTransfer { transfer_id: id.into(), reason: refused.to_string() })).await;
        Err(refused)
    };
    for (id, from, to, minor) in [("t-0", "a-0", "a-1", 3_000), ("t-1", "a-1", "a-2", 500)] {
        transfer(id, from, to, minor).await.unwrap();
        ledger.record(from, "transfer_sent", id, Some(to), minor, None);
        ledger.record(to, "transfer_received", id, Some(from), minor, None);
    }
    accepted(&bus, deposit("a-4", "d-a-4", 100, eur)).await;
    ledger.record("a-4", "deposit", "d-a-4", None, 100, None);
    accepted(&bus, withdraw("a-4", "w-a-4", 100)).await;
    ledger.record("a-4", "withdrawal", "w-a-4", None, 100, None);
    accepted(&bus, account("a-4", CloseAccount)).await;
    // Refused by the target (closed, missing, other currency): refunded.
    for (id, from, to, minor) in [("t-2", "a-2", "a-4", 700), ("t-3", "a-0", "a-9", 50), ("t-4", "a-1", "a-3", 100)] {
        let refused = transfer(id, from, to, minor).await.expect_err("the target refuses");
        ledger.record(from, "transfer_sent", id, Some(to), minor, None);
        ledger.record(from, "transfer_refunded", id, Some(to), minor, Some(refused.to_string()));
    }
    for i in 0..10 {
        let (to, from) = (format!("a-{}", i % 3), format!("a-{}", (i + 1) % 3));
        accepted(&bus, deposit(&to, &format!("d-{i}"), 100 + i, eur)).await;
        ledger.record(&to, "deposit", &format!("d-{i}"), None, 100 + i, None);
        accepted(&bus, withdraw(&from, &format!("w-{i}"), 50)).await;
        ledger.record(&from, "withdrawal", &format!("w-{i}"), None, 50, None);
    }

    let tables = [("read.accounts", "account_id"), ("read.account_transactions", "account_id, stream_version")];
    build_twice(&database, &log, &client, Arc::new(AccountViews), &tables).await;

    let events = all_events(&log).await;
    let handler = eventfold_command::Handler::new(log.clone(), eventfold_command::SnapshotPolicy::default());
    let listed: Vec<String> =
        eventfold_tests::select(&client, "SELECT account_id FROM read.accounts ORDER BY account_id", &[], |r| r.get(0))
            .await;
    assert_eq!(listed, ["a-0", "a-1", "a-2", "a-3", "a-4"], "a-9 never existed");
    for (id, owner, currency) in accounts {
        let loaded = handler.load::<Account>(&format!("account-{id}")).await.unwrap();
        let state = loaded.state;
        let stream: Vec<&RecordedEvent> = events.iter().filter(|e| e.stream_id == format!("account-{id}")).collect();
        let (first, last) = (stream[0], stream[stream.len() - 1]);
        let row = client
            .query_one(
                "SELECT owner_id, currency, balance_minor, status, opened_at, updated_at, stream_version, \
                        last_position FROM read.accounts WHERE account_id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let balance = state.balance.unwrap();
        assert_eq!(balance.minor, ledger.balances[id], "{id}: the aggregate agrees with the ledger");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, String>(3)),
            (
                owner.to_owned(),
                currency.to_string(),
                balance.minor,
                if state.closed { "closed" } else { "open" }.to_owned()
            ),
            "{id}"
        );
        assert_eq!(row.get::<_, SystemTime>(4), first.created_at, "{id}: opened at");
        assert_eq!(row.get::<_, SystemTime>(5), last.created_at, "{id}: updated at");
        assert_eq!(row.get::<_, i64>(6) as u64, loaded.version.unwrap(), "{id}: stream version");
        assert_eq!(row.get::<_, i64>(7) as u64, last.global_position, "{id}: last position");

        let rows = client
            .query(
                "SELECT kind, transaction_id, counterparty_account_id, amount_minor, balance_minor, reason, \
                        stream_version, global_position, occurred_at \
                   FROM read.account_transactions WHERE account_id = $1 ORDER BY stream_version",
                &[&id],
            )
            .await
            .unwrap();
        let history: Vec<Movement> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
        assert_eq!(history, ledger.history[id], "{id}: the history");
        assert_eq!(history.last().map(|m| m.4), Some(balance.minor), "{id}: the last balance is the balance");
        // Each row is the event at its stream version.
        for r in &rows {
            let event = stream.iter().find(|e| e.version as i64 == r.get::<_, i64>(6)).expect("the event");
            assert_eq!(
                (r.get::<_, i64>(7) as u64, r.get::<_, SystemTime>(8)),
                (event.global_position, event.created_at)
            );
        }
        // The aggregate's movements, by transaction id.
        let mut movements: Vec<(String, String, i64)> = history
            .iter()
            .map(|(kind, tx, _, amount, _, _)| {
                let key = if kind == "transfer_refunded" { format!("refund:{tx}") } else { tx.clone() };
                (key, kind.clone(), *amount)
            })
            .collect();
        movements.sort();
        let aggregate: Vec<(String, String, i64)> = state
            .movements
            .iter()
            .filter_map(|(key, m)| {
                use eventfold_domain::account::Movement as M;
                let (kind, amount) = match *m {
                    M::Deposit(a) => ("deposit", a),
                    M::Withdrawal(a) => ("withdrawal", a),
                    M::TransferOut(a) => ("transfer_sent", a),
                    M::TransferIn(a) => ("transfer_received", a),
                    M::Refund(a) => ("transfer_refunded", a),
                    // A request moves no money: not a transaction.
                    M::Request(_) => return None,
                };
                Some((key.clone(), kind.to_owned(), amount))
            })
            .collect();
        assert_eq!(movements, aggregate, "{id}: the movements of the aggregate");
    }
    let refunds: i64 = client
        .query_one("SELECT count(*) FROM read.account_transactions WHERE kind = 'transfer_refunded'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(refunds, 3);
}

// --- user_activity -----------------------------------------------------------

/// What the test expects of a registered user: email, name, logins,
/// actions, and the positions of its registration and last user event.
struct SentUser {
    email: String,
    name: String,
    logins: i64,
    actions: i64,
    registered: u64,
    last: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_activity_is_each_users_timeline_including_orders() {
    let (_db, database, log, client, bus) = setup().await;
    let mut users: BTreeMap<String, SentUser> = BTreeMap::new();
    // user → (position, kind, detail), in position order.
    let mut timeline: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
    let mut note = |user: &str, position: u64, kind: &str, detail: &str| {
        timeline.entry(user.to_owned()).or_default().push((position, kind.to_owned(), detail.to_owned()));
    };
    for u in 0..3 {
        let (id, email, name) = (format!("u-{u}"), format!("user{u}@example.com"), format!("User {u}"));
        let register = RegisterUser { user_id: id.clone(), email: email.clone().into(), display_name: name.clone() };
        let position = accepted(&bus, user(&id, register)).await;
        note(&id, position, "registered", &email);
        users.insert(id, SentUser { email, name, logins: 0, actions: 0, registered: position, last: position });
    }
    assert!(send(&bus, user("u-9", RecordLogin { source: "web".into() })).await.is_err(), "u-9 is not registered");

    let eur = currency("EUR");
    let create = |id: &str, customer: &str| {
        let items = vec![OrderItem { product_id: "sku-1".into(), quantity: 2, unit_price: Money::new(500, eur) }];
        order(
            id,
            CreateOrder {
                order_id: id.into(),
                customer_id: customer.into(),
                currency: eur,
                items,
                payment_token: None,
                carrier: None,
            },
        )
    };
    let pay = |id: &str| order(id, ProcessPayment { payment_id: format!("p-{id}"), amount: Money::new(1000, eur) });
    enum Step {
        Login(&'static str, &'static str),
        Action(&'static str, &'static str, &'static str),
        Order(&'static str, &'static str, &'static str),
    }
    use Step::{Action, Login, Order};
    let steps = [
        Login("u-0", "web"),
        Login("u-0", "app"),
        Login("u-1", "web"),
        Action("u-0", "viewed_product", "sku-1"),
        Order("o-0", "u-0", "create"),
        Action("u-2", "searched", ""),
        Order("o-1", "u-1", "create"),
        Order("o-2", "guest-7", "create"),
        Order("o-0", "u-0", "confirm"),
        Order("o-1", "u-1", "cancel"),
        Login("u-0", "web"),
        Order("o-0", "u-0", "pay"),
        Order("o-2", "guest-7", "confirm"),
        Order("o-3", "u-0", "create"),
        Order("o-0", "u-0", "ship"),
        Order("o-3", "u-0", "confirm"),
        Order("o-3", "u-0", "pay"),
        Order("o-3", "u-0", "cancel"),
        Action("u-1", "viewed_product", "sku-2"),
        Action("u-2", "logout", ""),
    ];
    for step in steps {
        match step {
            Login(id, source) => {
                let position = accepted(&bus, user(id, RecordLogin { source: source.into() })).await;
                note(id, position, "logged_in", source);
                let u = users.get_mut(id).unwrap();
                (u.logins, u.last) = (u.logins + 1, position);
            }
            Action(id, action, subject) => {
                let command = RecordAction { action: action.into(), subject: subject.into() };
                let position = accepted(&bus, user(id, command)).await;
                let detail = if subject.is_empty() { action.to_owned() } else { format!("{action} {subject}") };
                note(id, position, "action", &detail);
                let u = users.get_mut(id).unwrap();
                (u.actions, u.last) = (u.actions + 1, position);
            }
            Order(id, customer, what) => {
                let (command, kind, detail) = match what {
                    "create" => (create(id, customer), "order_created", id.to_owned()),
                    "confirm" => (order(id, ConfirmOrder), "order_confirmed", id.to_owned()),
                    "pay" => (pay(id), "order_paid", id.to_owned()),
                    "ship" => (
                        order(id, ShipOrder { carrier: "DHL".into(), tracking_number: format!("T-{id}") }),
                        "order_shipped",
                        id.to_owned(),
                    ),
                    _ => (
                        order(id, CancelOrder { reason: format!("no longer wanted by {customer}") }),
                        "order_cancelled",
                        format!("{id}: no longer wanted by {customer}"),
                    ),
                };
                let position = accepted(&bus, command).await;
                note(customer, position, kind, &detail);
            }
        }
    }

    let tables = [("read.users", "user_id"), ("read.user_activity", "user_id, global_position")];
    build_twice(&database, &log, &client, Arc::new(UserActivity), &tables).await;
    // The helper read.user_orders has no view: compare its versions directly.
    assert_eq!(
        eventfold_tests::table_rows(&client, "read.user_orders_v1", "order_id").await,
        eventfold_tests::table_rows(&client, "read.user_orders_v2", "order_id").await
    );
    let orders: Vec<(String, String)> = eventfold_tests::select(
        &client,
        "SELECT order_id, user_id FROM read.user_orders_v1 ORDER BY order_id",
        &[],
        |r| (r.get(0), r.get(1)),
    )
    .await;
    let expected: Vec<(String, String)> =
        [("o-0", "u-0"), ("o-1", "u-1"), ("o-2", "guest-7"), ("o-3", "u-0")].map(|(o, u)| (o.into(), u.into())).into();
    assert_eq!(orders, expected);

    let created_at: HashMap<u64, SystemTime> =
        all_events(&log).await.into_iter().map(|e| (e.global_position, e.created_at)).collect();
    let rows = client
        .query(
            "SELECT user_id, global_position, kind, detail, occurred_at FROM read.user_activity \
              ORDER BY user_id, global_position",
            &[],
        )
        .await
        .unwrap();
    let mut view: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
    for r in &rows {
        let position = r.get::<_, i64>(1) as u64;
        assert_eq!(r.get::<_, SystemTime>(4), created_at[&position], "occurred at the event's time");
        view.entry(r.get(0)).or_default().push((position, r.get(2), r.get(3)));
    }
    assert_eq!(view, timeline, "every user's timeline, the guest's included");
    assert_eq!(view["guest-7"].len(), 2);
    assert_eq!(view["u-0"].len(), 13);

    let handler = eventfold_command::Handler::new(log.clone(), eventfold_command::SnapshotPolicy::default());
    let rows = client
        .query(
            "SELECT user_id, email, display_name, registered_at, logins, actions, last_seen_at, last_position \
               FROM read.users ORDER BY user_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), ["u-0", "u-1", "u-2"], "no guest");
    for r in &rows {
        let id: String = r.get(0);
        let sent = &users[&id];
        let state = handler.load::<User>(&format!("user-{id}")).await.unwrap().state;
        assert_eq!((state.logins as i64, state.actions as i64), (sent.logins, sent.actions), "{id}: the aggregate");
        assert_eq!(
            (r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, i64>(4), r.get::<_, i64>(5)),
            (state.email.into_inner(), state.display_name, sent.logins, sent.actions),
            "{id}"
        );
        assert_eq!((sent.email.as_str(), sent.name.as_str()), (r.get::<_, &str>(1), r.get::<_, &str>(2)));
        assert_eq!(r.get::<_, SystemTime>(3), created_at[&sent.registered], "{id}: registered at");
        assert_eq!(r.get::<_, SystemTime>(6), created_at[&sent.last], "{id}: last seen at");
        assert_eq!(r.get::<_, i64>(7) as u64, sent.last, "{id}: last position");
    }
}

// --- inconsistencies -----------------------------------------------------------

/// Appends `events` to `stream` as they are, past the command side's rules.
async fn append_raw<E: eventfold_domain::DomainEvent>(log: &Arc<dyn EventLog>, stream: &str, events: Vec<E>) {
    use eventfold_store::{AppendRequest, ExpectedVersion, NewEvent};
    let events = events
        .iter()
        .map(|e| NewEvent { schema_version: e.schema_version(), ..NewEvent::new(e.event_type(), e.to_data()) })
        .collect();
    log.append(AppendRequest::new(stream, ExpectedVersion::Any, events)).await.expect("append");
}

type Parked = (&'static str, &'static str, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_do_not_fit_the_model_are_parked_not_ignored() {
    use eventfold_domain::{account as a, order as o, user as u};
    let (_db, database, log, client, _) = setup().await;
    let eur = currency("EUR");
    let money = |minor| Money::new(minor, eur);
    // Confirmed without being created.
    append_raw(&log, "order-x", vec![o::OrderEvent::from(o::OrderConfirmed { order_id: "x".into() })]).await;
    // Paid without being confirmed.
    let items = vec![OrderItem { product_id: "sku-1".into(), quantity: 1, unit_price: money(700) }];
    let created = o::OrderCreated {
        order_id: "y".into(),
        customer_id: "u-1".into(),
        currency: eur,
        items,
        total: money(700),
        payment_token: None,
        carrier: None,
    };
    let paid = o::PaymentProcessed { order_id: "y".into(), payment_id: "p-y".into(), amount: money(700) };
    append_raw(&log, "order-y", vec![o::OrderEvent::from(created), paid.into()]).await;
    // A withdrawal whose balance does not follow from the one before.
    let opened = a::AccountOpened { account_id: "a-1".into(), owner_id: "u-1".into(), currency: eur };
    let deposited = a::MoneyDeposited {
        account_id: "a-1".into(),
        transaction_id: "d-1".into(),
        amount: money(500),
        balance: money(500),
    };
    let withdrawn = a::MoneyWithdrawn {
        account_id: "a-1".into(),
        transaction_id: "w-1".into(),
        amount: money(100),
        balance: money(300),
    };
    append_raw(&log, "account-a-1", vec![a::AccountEvent::from(opened), deposited.into(), withdrawn.into()]).await;
    // A login of a user who never registered.
    append_raw(&log, "user-z", vec![u::UserEvent::from(u::UserLoggedIn { user_id: "z".into(), source: "web".into() })])
        .await;

    // Per projection, what it parks: (stream, event type, part of the error).
    let expected: [(Arc<dyn Projection>, &[Parked]); 3] = [
        (
            Arc::new(OrderAnalytics),
            &[
                ("order-x", "OrderConfirmed", "order x is not in read.order_facts_v1"),
                ("order-y", "PaymentProcessed", "order y is created, not confirmed"),
            ],
        ),
        (Arc::new(AccountViews), &[("account-a-1", "MoneyWithdrawn", "with balance 400 before the withdrawal of 100")]),
        (
            Arc::new(UserActivity),
            &[
                ("order-x", "OrderConfirmed", "order x is not in read.user_orders_v1"),
                ("user-z", "UserLoggedIn", "user z is not in read.users_v1"),
            ],
        ),
    ];
    for (projection, parked) in expected {
        let options = ProjectorOptions { max_attempts: 1, ..ProjectorOptions::default() };
        let projector = Projector::new(database.clone(), log.clone(), projection.clone(), 1, options);
        projector.prepare().await.unwrap();
        while projector.step().await.unwrap() > 0 {}
        let found: Vec<(String, String, String)> = eventfold_tests::select(
            &client,
            "SELECT stream_id, event_type, error FROM projections.parked WHERE name = $1 ORDER BY global_position",
            &[&projection.name()],
            |r| (r.get(0), r.get(1), r.get(2)),
        )
        .await;
        assert_eq!(found.len(), parked.len(), "{}: {found:?}", projection.name());
        for ((stream, event_type, error), (want_stream, want_type, want_error)) in found.iter().zip(parked) {
            assert_eq!((stream.as_str(), event_type.as_str()), (*want_stream, *want_type), "{}", projection.name());
            assert!(error.contains(want_error), "{}: {error:?} should say {want_error:?}", projection.name());
        }
    }
    // What did fit was applied: the account keeps its deposit, y its user.
    let balance: i64 =
        client.query_one("SELECT balance_minor FROM read.accounts WHERE account_id = 'a-1'", &[]).await.unwrap().get(0);
    assert_eq!(balance, 500);
    let kinds: Vec<String> = eventfold_tests::select(
        &client,
        "SELECT kind FROM read.user_activity WHERE user_id = 'u-1' ORDER BY global_position",
        &[],
        |r| r.get(0),
    )
    .await;
    assert_eq!(kinds, ["order_created", "order_paid"]);
}
