//! `order_analytics`: orders per customer, sales per day, orders per
//! creation day and status, and product sales per day, from the order
//! events alone.
//!
//! The events after `OrderCreated` carry only the order id, so the helper
//! table `order_facts` keeps what they need: customer, currency, items,
//! creation time and current status.
//!
//! Money rules: revenue (`daily_sales.revenue_minor`,
//! `customer_orders.total_spent_minor`) is what `PaymentProcessed` events
//! took in; cancelling a paid order does not take it back (the order
//! events carry no refund, a refund belongs to the payment), so a cancelled
//! paid order keeps its payment in both. Product sales, on the other hand,
//! count only orders that are not cancelled: a cancellation subtracts the
//! order's items from the rows of its creation day.
//!
//! Days are the UTC dates of the events' `created_at`: an order counts as
//! created on the day of `OrderCreated`, as paid on the day of
//! `PaymentProcessed`, as cancelled on the day of `OrderCancelled`.
//! `daily_status` and `product_sales` rows that drop to zero are deleted.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use eventfold_domain::{
    DomainEvent,
    order::{OrderEvent, OrderItem},
};
use eventfold_store::{EventFilter, RecordedEvent};
use tokio_postgres::Transaction;

use crate::{
    ApplyError, Projection,
    orders::{is_order_event, order_id},
};

/// The order analytics read model (`read.customer_orders`,
/// `read.daily_sales`, `read.daily_status`, `read.product_sales`, and the
/// helper `read.order_facts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderAnalytics;

/// The tables of one version, in the order of [`Projection::tables`].
const TABLES: [&str; 5] = ["order_facts", "customer_orders", "daily_sales", "daily_status", "product_sales"];

/// The UTC date of the timestamptz parameter `$1` (whatever the session's
/// time zone).
const DAY_OF_1: &str = "(($1::timestamptz) AT TIME ZONE 'UTC')::date";

struct Tables {
    facts: String,
    customers: String,
    sales: String,
    status: String,
    products: String,
}

impl Tables {
    fn new(v: u32) -> Self {
        Self {
            facts: format!("read.order_facts_v{v}"),
            customers: format!("read.customer_orders_v{v}"),
            sales: format!("read.daily_sales_v{v}"),
            status: format!("read.daily_status_v{v}"),
            products: format!("read.product_sales_v{v}"),
        }
    }
}

fn inconsistent(message: impl Into<String>) -> ApplyError {
    ApplyError::Event(message.into())
}

#[async_trait]
impl Projection for OrderAnalytics {
    fn name(&self) -> &'static str {
        "order_analytics"
    }

    fn create_sql(&self, v: u32) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS read.order_facts_v{v} (
                order_id    text COLLATE \"C\" PRIMARY KEY,
                customer_id text COLLATE \"C\" NOT NULL,
                currency    text NOT NULL,
                total_minor bigint NOT NULL,
                items       jsonb NOT NULL,
                status      text NOT NULL,
                created_at  timestamptz NOT NULL,
                paid_minor  bigint NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS read.customer_orders_v{v} (
                customer_id       text COLLATE \"C\" NOT NULL,
                currency          text NOT NULL,
                order_count       bigint NOT NULL,
                cancelled_count   bigint NOT NULL,
                total_spent_minor bigint NOT NULL,
                last_order_id     text COLLATE \"C\" NOT NULL,
                last_order_at     timestamptz NOT NULL,
                PRIMARY KEY (customer_id, currency)
            );
            CREATE INDEX IF NOT EXISTS customer_orders_v{v}_spent
                ON read.customer_orders_v{v} (currency, total_spent_minor DESC);
            CREATE TABLE IF NOT EXISTS read.daily_sales_v{v} (
                day              date NOT NULL,
                currency         text NOT NULL,
                orders_created   bigint NOT NULL DEFAULT 0,
                orders_cancelled bigint NOT NULL DEFAULT 0,
                orders_paid      bigint NOT NULL DEFAULT 0,
                revenue_minor    bigint NOT NULL DEFAULT 0,
                PRIMARY KEY (day, currency)
            );
            CREATE TABLE IF NOT EXISTS read.daily_status_v{v} (
                day    date NOT NULL,
                status text NOT NULL,
                orders bigint NOT NULL,
                PRIMARY KEY (day, status)
            );
            CREATE TABLE IF NOT EXISTS read.product_sales_v{v} (
                day           date NOT NULL,
                product_id    text COLLATE \"C\" NOT NULL,
                currency      text NOT NULL,
                quantity      bigint NOT NULL,
                revenue_minor bigint NOT NULL,
                PRIMARY KEY (day, product_id, currency)
            );"
        )
    }

    fn tables(&self, v: u32) -> Vec<String> {
        TABLES.iter().map(|t| format!("read.{t}_v{v}")).collect()
    }

    fn activate_sql(&self, v: u32) -> String {
        TABLES
            .iter()
            .map(|t| format!("DROP VIEW IF EXISTS read.{t}; CREATE VIEW read.{t} AS SELECT * FROM read.{t}_v{v};\n"))
            .collect()
    }

    fn event_filter(&self) -> EventFilter {
        crate::reads_of::<OrderEvent>("order-")
    }

    /// The batch folded in memory: the facts of the orders it touches (read
    /// once), the counters as deltas per key; then one statement per table
    /// and kind of change.
    async fn apply_batch(&self, tx: &Transaction<'_>, v: u32, events: &[RecordedEvent]) -> Result<bool, ApplyError> {
        let mut decoded = Vec::new();
        for event in events.iter().filter(|e| is_order_event(e)) {
            let e = OrderEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            decoded.push((event, e));
        }
        if decoded.is_empty() {
            return Ok(true);
        }
        let t = Tables::new(v);
        let mut fold = AnalyticsFold::load(tx, &t, &decoded).await?;
        for (event, e) in decoded {
            fold.apply(event.created_at, e)?;
        }
        fold.write(tx, &t).await?;
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !is_order_event(event) {
            return Ok(());
        }
        let decoded = OrderEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
            .map_err(|e| ApplyError::Event(e.to_string()))?;
        apply_order_event(tx, &Tables::new(v), decoded, event.created_at).await.map_err(|e| match e {
            ApplyError::Event(message) => ApplyError::Event(format!(
                "{} at position {} ({}): {message}",
                event.event_type, event.global_position, event.stream_id
            )),
            other => other,
        })
    }
}

async fn apply_order_event(
    tx: &Transaction<'_>,
    t: &Tables,
    event: OrderEvent,
    at: SystemTime,
) -> Result<(), ApplyError> {
    match event {
        OrderEvent::Created(e) => {
            let currency = e.currency.as_str();
            let items = serde_json::to_value(&e.items).map_err(|e| inconsistent(e.to_string()))?;
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {} (order_id, customer_id, currency, total_minor, items, status, created_at) \
                         VALUES ($1, $2, $3, $4, $5, 'created', $6) ON CONFLICT (order_id) DO NOTHING",
                        t.facts
                    ),
                    &[&e.order_id, &e.customer_id, &currency, &e.total.minor, &items, &at],
                )
                .await?;
            if inserted != 1 {
                return Err(inconsistent(format!("order {} was created before", e.order_id)));
            }
            tx.execute(
                &format!(
                    "INSERT INTO {} AS c (customer_id, currency, order_count, cancelled_count, total_spent_minor, \
                                          last_order_id, last_order_at) \
                     VALUES ($1, $2, 1, 0, 0, $3, $4) \
                     ON CONFLICT (customer_id, currency) DO UPDATE \
                        SET order_count = c.order_count + 1, last_order_id = EXCLUDED.last_order_id, \
                            last_order_at = EXCLUDED.last_order_at",
                    t.customers
                ),
                &[&e.customer_id, &currency, &e.order_id, &at],
            )
            .await?;
            add_daily_sales(tx, t, at, currency, SalesDelta { created: 1, ..SalesDelta::default() }).await?;
            add_status(tx, t, at, "created").await?;
            for (product_id, (quantity, revenue)) in product_lines(&e.items, currency)? {
                tx.execute(
                    &format!(
                        "INSERT INTO {} AS p (day, product_id, currency, quantity, revenue_minor) \
                         VALUES ({}, $2, $3, $4, $5) \
                         ON CONFLICT (day, product_id, currency) DO UPDATE \
                            SET quantity = p.quantity + EXCLUDED.quantity, \
                                revenue_minor = p.revenue_minor + EXCLUDED.revenue_minor",
                        t.products, DAY_OF_1
                    ),
                    &[&at, &product_id, &currency, &quantity, &revenue],
                )
                .await?;
            }
            Ok(())
        }
        OrderEvent::Confirmed(e) => transition(tx, t, &e.order_id, &["created"], "confirmed", 0).await.map(drop),
        OrderEvent::PaymentProcessed(e) => {
            let fact = transition(tx, t, &e.order_id, &["confirmed"], "paid", e.amount.minor).await?;
            if fact.currency != e.amount.currency.as_str() {
                return Err(inconsistent(format!(
                    "payment in {}, order {} in {}",
                    e.amount.currency, e.order_id, fact.currency
                )));
            }
            let changed = tx
                .execute(
                    &format!(
                        "UPDATE {} SET total_spent_minor = total_spent_minor + $3 \
                          WHERE customer_id = $1 AND currency = $2",
                        t.customers
                    ),
                    &[&fact.customer_id, &fact.currency, &e.amount.minor],
                )
                .await?;
            if changed != 1 {
                return Err(inconsistent(format!(
                    "customer {} has no {} orders in {}",
                    fact.customer_id, fact.currency, t.customers
                )));
            }
            let delta = SalesDelta { paid: 1, revenue: e.amount.minor, ..SalesDelta::default() };
            add_daily_sales(tx, t, at, &fact.currency, delta).await
        }
        OrderEvent::Shipped(e) => transition(tx, t, &e.order_id, &["paid"], "shipped", 0).await.map(drop),
        OrderEvent::Cancelled(e) => {
            let fact = transition(tx, t, &e.order_id, &["created", "confirmed", "paid"], "cancelled", 0).await?;
            let changed = tx
                .execute(
                    &format!(
                        "UPDATE {} SET cancelled_count = cancelled_count + 1 WHERE customer_id = $1 AND currency = $2",
                        t.customers
                    ),
                    &[&fact.customer_id, &fact.currency],
                )
                .await?;
            if changed != 1 {
                return Err(inconsistent(format!(
                    "customer {} has no {} orders in {}",
                    fact.customer_id, fact.currency, t.customers
                )));
            }
            add_daily_sales(tx, t, at, &fact.currency, SalesDelta { cancelled: 1, ..SalesDelta::default() }).await?;
            // Top products count only orders that are not cancelled.
            let items: Vec<OrderItem> = serde_json::from_value(fact.items)
                .map_err(|err| inconsistent(format!("the items of order {} in {}: {err}", e.order_id, t.facts)))?;
            for (product_id, (quantity, revenue)) in product_lines(&items, &fact.currency)? {
                let changed = tx
                    .execute(
                        &format!(
                            "UPDATE {} SET quantity = quantity - $4, revenue_minor = revenue_minor - $5 \
                              WHERE day = {} AND product_id = $2 AND currency = $3 \
                                AND quantity >= $4 AND revenue_minor >= $5",
                            t.products, DAY_OF_1
                        ),
                        &[&fact.created_at, &product_id, &fact.currency, &quantity, &revenue],
                    )
                    .await?;
                if changed != 1 {
                    return Err(inconsistent(format!(
                        "{} holds less than {quantity} of {product_id} ({revenue} {}) on the creation day of {}",
                        t.products, fact.currency, e.order_id
                    )));
                }
                tx.execute(
                    &format!(
                        "DELETE FROM {} WHERE day = {} AND product_id = $2 AND currency = $3 \
                            AND quantity = 0 AND revenue_minor = 0",
                        t.products, DAY_OF_1
                    ),
                    &[&fact.created_at, &product_id, &fact.currency],
                )
                .await?;
            }
            Ok(())
        }
    }
}

/// What `order_facts` knows of an order.
struct Fact {
    customer_id: String,
    currency: String,
    created_at: SystemTime,
    /// As `OrderCreated` had them: a list of [`OrderItem`].
    items: serde_json::Value,
}

/// Moves an order from one of the statuses `from` to `to` (adding `paid`
/// to what was paid for it), in `order_facts` and `daily_status`.
async fn transition(
    tx: &Transaction<'_>,
    t: &Tables,
    order_id: &str,
    from: &[&str],
    to: &str,
    paid: i64,
) -> Result<Fact, ApplyError> {
    let row = tx
        .query_opt(
            &format!("SELECT customer_id, currency, status, created_at, items FROM {} WHERE order_id = $1", t.facts),
            &[&order_id],
        )
        .await?
        .ok_or_else(|| inconsistent(format!("order {order_id} is not in {}", t.facts)))?;
    let old: String = row.get(2);
    if !from.contains(&old.as_str()) {
        return Err(inconsistent(format!("order {order_id} is {old}, not {}", from.join(" or "))));
    }
    let fact = Fact { customer_id: row.get(0), currency: row.get(1), created_at: row.get(3), items: row.get(4) };
    tx.execute(
        &format!("UPDATE {} SET status = $2, paid_minor = paid_minor + $3 WHERE order_id = $1", t.facts),
        &[&order_id, &to, &paid],
    )
    .await?;
    let changed = tx
        .execute(
            &format!(
                "UPDATE {} SET orders = orders - 1 WHERE day = {} AND status = $2 AND orders > 0",
                t.status, DAY_OF_1
            ),
            &[&fact.created_at, &old],
        )
        .await?;
    if changed != 1 {
        return Err(inconsistent(format!("{} counts no {old} order on the creation day of {order_id}", t.status)));
    }
    tx.execute(
        &format!("DELETE FROM {} WHERE day = {} AND status = $2 AND orders = 0", t.status, DAY_OF_1),
        &[&fact.created_at, &old],
    )
    .await?;
    add_status(tx, t, fact.created_at, to).await?;
    Ok(fact)
}

/// One more order created on the day of `created_at` in `status`.
async fn add_status(tx: &Transaction<'_>, t: &Tables, created_at: SystemTime, status: &str) -> Result<(), ApplyError> {
    tx.execute(
        &format!(
            "INSERT INTO {} AS s (day, status, orders) VALUES ({}, $2, 1) \
             ON CONFLICT (day, status) DO UPDATE SET orders = s.orders + 1",
            t.status, DAY_OF_1
        ),
        &[&created_at, &status],
    )
    .await?;
    Ok(())
}

#[derive(Debug, Default)]
struct SalesDelta {
    created: i64,
    cancelled: i64,
    paid: i64,
    revenue: i64,
}

async fn add_daily_sales(
    tx: &Transaction<'_>,
    t: &Tables,
    at: SystemTime,
    currency: &str,
    d: SalesDelta,
) -> Result<(), ApplyError> {
    tx.execute(
        &format!(
            "INSERT INTO {} AS s (day, currency, orders_created, orders_cancelled, orders_paid, revenue_minor) \
             VALUES ({}, $2, $3, $4, $5, $6) \
             ON CONFLICT (day, currency) DO UPDATE \
                SET orders_created = s.orders_created + EXCLUDED.orders_created, \
                    orders_cancelled = s.orders_cancelled + EXCLUDED.orders_cancelled, \
                    orders_paid = s.orders_paid + EXCLUDED.orders_paid, \
                    revenue_minor = s.revenue_minor + EXCLUDED.revenue_minor",
            t.sales, DAY_OF_1
        ),
        &[&at, &currency, &d.created, &d.cancelled, &d.paid, &d.revenue],
    )
    .await?;
    Ok(())
}

/// Per product (in id order), the quantity and revenue of `items`, whose
/// prices must be in `currency`.
fn product_lines(items: &[OrderItem], currency: &str) -> Result<BTreeMap<String, (i64, i64)>, ApplyError> {
    let mut lines: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for item in items {
        if item.unit_price.currency.as_str() != currency {
            return Err(inconsistent(format!(
                "item {} is priced in {}, the order in {currency}",
                item.product_id, item.unit_price.currency
            )));
        }
        let quantity = i64::from(item.quantity);
        let revenue = item
            .unit_price
            .minor
            .checked_mul(quantity)
            .ok_or_else(|| inconsistent(format!("the revenue of item {} is out of range", item.product_id)))?;
        let line = lines.entry(item.product_id.clone()).or_default();
        line.0 += quantity;
        line.1 = line
            .1
            .checked_add(revenue)
            .ok_or_else(|| inconsistent(format!("the revenue of product {} is out of range", item.product_id)))?;
    }
    Ok(lines)
}

/// The UTC day of `at`, in days since 1970-01-01 (the SQL side adds it to
/// that date: the same day as [`DAY_OF_1`]).
fn day_of(at: SystemTime) -> i32 {
    const DAY_NANOS: i128 = 86_400_000_000_000;
    let nanos = match at.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    };
    // Event times lie in the years 0001 to 9999: the day fits an i32.
    nanos.div_euclid(DAY_NANOS) as i32
}

/// The day column of a `unnest(… $N::int4[] …) AS u(d, …)`.
const DAY_OF_D: &str = "(DATE '1970-01-01' + u.d)";

/// One `order_facts` row, as folded in memory.
#[derive(Debug)]
struct FactRow {
    /// Read from the table (updated) rather than created in this batch
    /// (inserted).
    stored: bool,
    customer_id: String,
    currency: String,
    total_minor: i64,
    items: serde_json::Value,
    status: &'static str,
    created_at: SystemTime,
    paid_minor: i64,
}

/// What the batch adds to one `customer_orders` row.
#[derive(Debug, Default)]
struct CustomerDelta {
    created: i64,
    cancelled: i64,
    spent: i64,
    /// The batch's last order of the customer, if it created one.
    last: Option<(String, SystemTime)>,
}

/// [`OrderAnalytics`]' batch.
#[derive(Debug, Default)]
struct AnalyticsFold {
    facts: HashMap<String, FactRow>,
    touched: BTreeSet<String>,
    customers: BTreeMap<(String, String), CustomerDelta>,
    /// (day, currency) → deltas
    sales: BTreeMap<(i32, String), SalesDelta>,
    /// (creation day, status) → orders
    status: BTreeMap<(i32, &'static str), i64>,
    /// (creation day, product, currency) → (quantity, revenue)
    products: BTreeMap<(i32, String, String), (i64, i64)>,
}

/// The statuses an order can be in, as `&'static str`.
fn status_name(status: &str) -> Result<&'static str, ApplyError> {
    ["created", "confirmed", "paid", "shipped", "cancelled"]
        .into_iter()
        .find(|s| *s == status)
        .ok_or_else(|| inconsistent(format!("unknown order status {status}")))
}

fn add(value: &mut i64, delta: i64) -> Result<(), ApplyError> {
    *value = value.checked_add(delta).ok_or_else(|| inconsistent("a counter is out of range"))?;
    Ok(())
}

impl AnalyticsFold {
    async fn load(
        tx: &Transaction<'_>,
        t: &Tables,
        decoded: &[(&RecordedEvent, OrderEvent)],
    ) -> Result<Self, ApplyError> {
        let mut ids: Vec<&str> = decoded.iter().map(|(_, e)| order_id(e)).collect();
        ids.sort_unstable();
        ids.dedup();
        let rows = tx
            .query(
                &format!(
                    "SELECT order_id, customer_id, currency, total_minor, items, status, created_at, paid_minor \
                       FROM {} WHERE order_id = ANY($1)",
                    t.facts
                ),
                &[&ids],
            )
            .await?;
        let mut fold = Self::default();
        for r in rows {
            let fact = FactRow {
                stored: true,
                customer_id: r.get(1),
                currency: r.get(2),
                total_minor: r.get(3),
                items: r.get(4),
                status: status_name(r.get(5))?,
                created_at: r.get(6),
                paid_minor: r.get(7),
            };
            fold.facts.insert(r.get(0), fact);
        }
        Ok(fold)
    }

    /// One event, with the checks of [`apply_order_event`].
    fn apply(&mut self, at: SystemTime, event: OrderEvent) -> Result<(), ApplyError> {
        match event {
            OrderEvent::Created(e) => {
                if self.facts.contains_key(&e.order_id) {
                    return Err(inconsistent(format!("order {} was created before", e.order_id)));
                }
                let currency = e.currency.as_str().to_owned();
                let lines = product_lines(&e.items, &currency)?;
                let items = serde_json::to_value(&e.items).map_err(|e| inconsistent(e.to_string()))?;
                let day = day_of(at);
                let customer = self.customers.entry((e.customer_id.clone(), currency.clone())).or_default();
                add(&mut customer.created, 1)?;
                customer.last = Some((e.order_id.clone(), at));
                add(&mut self.sales.entry((day, currency.clone())).or_default().created, 1)?;
                add(self.status.entry((day, "created")).or_default(), 1)?;
                for (product_id, (quantity, revenue)) in lines {
                    let line = self.products.entry((day, product_id, currency.clone())).or_default();
                    add(&mut line.0, quantity)?;
                    add(&mut line.1, revenue)?;
                }
                let fact = FactRow {
                    stored: false,
                    customer_id: e.customer_id,
                    currency,
                    total_minor: e.total.minor,
                    items,
                    status: "created",
                    created_at: at,
                    paid_minor: 0,
                };
                self.facts.insert(e.order_id.clone(), fact);
                self.touched.insert(e.order_id);
                Ok(())
            }
            OrderEvent::Confirmed(e) => self.transition(&e.order_id, &["created"], "confirmed", 0),
            OrderEvent::PaymentProcessed(e) => {
                self.transition(&e.order_id, &["confirmed"], "paid", e.amount.minor)?;
                let fact = &self.facts[&e.order_id];
                if fact.currency != e.amount.currency.as_str() {
                    return Err(inconsistent(format!(
                        "payment in {}, order {} in {}",
                        e.amount.currency, e.order_id, fact.currency
                    )));
                }
                let key = (fact.customer_id.clone(), fact.currency.clone());
                add(&mut self.customers.entry(key).or_default().spent, e.amount.minor)?;
                let sales = self.sales.entry((day_of(at), fact.currency.clone())).or_default();
                add(&mut sales.paid, 1)?;
                add(&mut sales.revenue, e.amount.minor)
            }
            OrderEvent::Shipped(e) => self.transition(&e.order_id, &["paid"], "shipped", 0),
            OrderEvent::Cancelled(e) => {
                self.transition(&e.order_id, &["created", "confirmed", "paid"], "cancelled", 0)?;
                let fact = &self.facts[&e.order_id];
                let key = (fact.customer_id.clone(), fact.currency.clone());
                add(&mut self.customers.entry(key).or_default().cancelled, 1)?;
                add(&mut self.sales.entry((day_of(at), fact.currency.clone())).or_default().cancelled, 1)?;
                let items: Vec<OrderItem> = serde_json::from_value(fact.items.clone())
                    .map_err(|err| inconsistent(format!("the items of order {}: {err}", e.order_id)))?;
                let (day, currency) = (day_of(fact.created_at), fact.currency.clone());
                for (product_id, (quantity, revenue)) in product_lines(&items, &currency)? {
                    let line = self.products.entry((day, product_id, currency.clone())).or_default();
                    add(&mut line.0, -quantity)?;
                    add(&mut line.1, -revenue)?;
                }
                Ok(())
            }
        }
    }

    /// [`transition`] on the folded facts.
    fn transition(&mut self, order_id: &str, from: &[&str], to: &'static str, paid: i64) -> Result<(), ApplyError> {
        let fact = self
            .facts
            .get_mut(order_id)
            .ok_or_else(|| inconsistent(format!("order {order_id} is not in the facts")))?;
        let old = fact.status;
        if !from.contains(&old) {
            return Err(inconsistent(format!("order {order_id} is {old}, not {}", from.join(" or "))));
        }
        fact.status = to;
        add(&mut fact.paid_minor, paid)?;
        let day = day_of(fact.created_at);
        add(self.status.entry((day, old)).or_default(), -1)?;
        add(self.status.entry((day, to)).or_default(), 1)?;
        self.touched.insert(order_id.to_owned());
        Ok(())
    }

    async fn write(self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        self.write_facts(tx, t).await?;
        self.write_customers(tx, t).await?;
        self.write_sales(tx, t).await?;
        self.write_status(tx, t).await?;
        self.write_products(tx, t).await
    }

    /// One `INSERT` of the new facts, one `UPDATE` of the stored ones.
    async fn write_facts(&self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        const COLUMNS: &str = "order_id, customer_id, currency, total_minor, items, status, created_at, paid_minor";
        const UNNEST: &str = "unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::jsonb[], $6::text[], \
                              $7::timestamptz[], $8::int8[])";
        for update in [false, true] {
            let rows: Vec<(&String, &FactRow)> = self
                .touched
                .iter()
                .filter_map(|id| self.facts.get(id).map(|f| (id, f)))
                .filter(|(_, f)| f.stored == update)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let sql = if update {
                format!(
                    "UPDATE {} t SET status = u.status, paid_minor = u.paid_minor \
                       FROM {UNNEST} AS u({COLUMNS}) WHERE t.order_id = u.order_id",
                    t.facts
                )
            } else {
                format!("INSERT INTO {} ({COLUMNS}) SELECT * FROM {UNNEST}", t.facts)
            };
            let changed = tx
                .execute(
                    &sql,
                    &[
                        &rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.customer_id.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.currency.as_str()).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.total_minor).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| &f.items).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.status).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.created_at).collect::<Vec<_>>(),
                        &rows.iter().map(|(_, f)| f.paid_minor).collect::<Vec<_>>(),
                    ],
                )
                .await?;
            if changed != rows.len() as u64 {
                return Err(inconsistent(format!("{changed} of {} facts written to {}", rows.len(), t.facts)));
            }
        }
        Ok(())
    }

    /// Customers with an order created in the batch: one upsert; the others
    /// (payments and cancellations only) must be there: one `UPDATE`.
    async fn write_customers(&self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        let (created, others): (Vec<_>, Vec<_>) = self.customers.iter().partition(|(_, d)| d.last.is_some());
        if !created.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {} AS c (customer_id, currency, order_count, cancelled_count, total_spent_minor, \
                                          last_order_id, last_order_at) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], \
                                          $7::timestamptz[]) \
                     ON CONFLICT (customer_id, currency) DO UPDATE \
                        SET order_count = c.order_count + EXCLUDED.order_count, \
                            cancelled_count = c.cancelled_count + EXCLUDED.cancelled_count, \
                            total_spent_minor = c.total_spent_minor + EXCLUDED.total_spent_minor, \
                            last_order_id = EXCLUDED.last_order_id, last_order_at = EXCLUDED.last_order_at",
                    t.customers
                ),
                &[
                    &created.iter().map(|((c, _), _)| c.as_str()).collect::<Vec<_>>(),
                    &created.iter().map(|((_, cur), _)| cur.as_str()).collect::<Vec<_>>(),
                    &created.iter().map(|(_, d)| d.created).collect::<Vec<_>>(),
                    &created.iter().map(|(_, d)| d.cancelled).collect::<Vec<_>>(),
                    &created.iter().map(|(_, d)| d.spent).collect::<Vec<_>>(),
                    &created.iter().map(|(_, d)| d.last.as_ref().map_or("", |l| l.0.as_str())).collect::<Vec<_>>(),
                    &created.iter().map(|(_, d)| d.last.as_ref().map_or(UNIX_EPOCH, |l| l.1)).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !others.is_empty() {
            let changed = tx
                .execute(
                    &format!(
                        "UPDATE {} c SET cancelled_count = c.cancelled_count + u.cancelled, \
                                total_spent_minor = c.total_spent_minor + u.spent \
                           FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) \
                                AS u(customer_id, currency, cancelled, spent) \
                          WHERE c.customer_id = u.customer_id AND c.currency = u.currency",
                        t.customers
                    ),
                    &[
                        &others.iter().map(|((c, _), _)| c.as_str()).collect::<Vec<_>>(),
                        &others.iter().map(|((_, cur), _)| cur.as_str()).collect::<Vec<_>>(),
                        &others.iter().map(|(_, d)| d.cancelled).collect::<Vec<_>>(),
                        &others.iter().map(|(_, d)| d.spent).collect::<Vec<_>>(),
                    ],
                )
                .await?;
            if changed != others.len() as u64 {
                return Err(inconsistent(format!(
                    "{} customers have no orders in {}",
                    (others.len() as u64).saturating_sub(changed),
                    t.customers
                )));
            }
        }
        Ok(())
    }

    async fn write_sales(&self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        if self.sales.is_empty() {
            return Ok(());
        }
        let s = &self.sales;
        tx.execute(
            &format!(
                "INSERT INTO {} AS s (day, currency, orders_created, orders_cancelled, orders_paid, revenue_minor) \
                 SELECT {DAY_OF_D}, u.currency, u.created, u.cancelled, u.paid, u.revenue \
                   FROM unnest($1::int4[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
                        AS u(d, currency, created, cancelled, paid, revenue) \
                 ON CONFLICT (day, currency) DO UPDATE \
                    SET orders_created = s.orders_created + EXCLUDED.orders_created, \
                        orders_cancelled = s.orders_cancelled + EXCLUDED.orders_cancelled, \
                        orders_paid = s.orders_paid + EXCLUDED.orders_paid, \
                        revenue_minor = s.revenue_minor + EXCLUDED.revenue_minor",
                t.sales
            ),
            &[
                &s.keys().map(|(d, _)| *d).collect::<Vec<_>>(),
                &s.keys().map(|(_, c)| c.as_str()).collect::<Vec<_>>(),
                &s.values().map(|d| d.created).collect::<Vec<_>>(),
                &s.values().map(|d| d.cancelled).collect::<Vec<_>>(),
                &s.values().map(|d| d.paid).collect::<Vec<_>>(),
                &s.values().map(|d| d.revenue).collect::<Vec<_>>(),
            ],
        )
        .await?;
        Ok(())
    }

    /// One upsert of the deltas; a count below zero is an inconsistency
    /// (the event-by-event path refuses to take from nothing); rows that
    /// reach zero are deleted.
    async fn write_status(&self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        let keys: Vec<_> = self.status.iter().filter(|(_, n)| **n != 0).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let days: Vec<i32> = keys.iter().map(|((d, _), _)| *d).collect();
        let statuses: Vec<&str> = keys.iter().map(|((_, s), _)| *s).collect();
        let deltas: Vec<i64> = keys.iter().map(|(_, n)| **n).collect();
        let rows = tx
            .query(
                &format!(
                    "INSERT INTO {} AS s (day, status, orders) \
                     SELECT {DAY_OF_D}, u.status, u.n FROM unnest($1::int4[], $2::text[], $3::int8[]) AS u(d, status, n) \
                     ON CONFLICT (day, status) DO UPDATE SET orders = s.orders + EXCLUDED.orders \
                     RETURNING orders",
                    t.status
                ),
                &[&days, &statuses, &deltas],
            )
            .await?;
        if rows.iter().any(|r| r.get::<_, i64>(0) < 0) {
            return Err(inconsistent(format!("{} would count fewer than no orders", t.status)));
        }
        tx.execute(
            &format!(
                "DELETE FROM {} s USING unnest($1::int4[], $2::text[]) AS u(d, status) \
                  WHERE s.day = {DAY_OF_D} AND s.status = u.status AND s.orders = 0",
                t.status
            ),
            &[&days, &statuses],
        )
        .await?;
        Ok(())
    }

    /// As [`AnalyticsFold::write_status`], for the product lines.
    async fn write_products(&self, tx: &Transaction<'_>, t: &Tables) -> Result<(), ApplyError> {
        let keys: Vec<_> = self.products.iter().filter(|(_, (q, r))| *q != 0 || *r != 0).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let days: Vec<i32> = keys.iter().map(|((d, _, _), _)| *d).collect();
        let products: Vec<&str> = keys.iter().map(|((_, p, _), _)| p.as_str()).collect();
        let currencies: Vec<&str> = keys.iter().map(|((_, _, c), _)| c.as_str()).collect();
        let quantities: Vec<i64> = keys.iter().map(|(_, (q, _))| *q).collect();
        let revenues: Vec<i64> = keys.iter().map(|(_, (_, r))| *r).collect();
        let rows = tx
            .query(
                &format!(
                    "INSERT INTO {} AS p (day, product_id, currency, quantity, revenue_minor) \
                     SELECT {DAY_OF_D}, u.product_id, u.currency, u.quantity, u.revenue \
                       FROM unnest($1::int4[], $2::text[], $3::text[], $4::int8[], $5::int8[]) \
                            AS u(d, product_id, currency, quantity, revenue) \
                     ON CONFLICT (day, product_id, currency) DO UPDATE \
                        SET quantity = p.quantity + EXCLUDED.quantity, \
                            revenue_minor = p.revenue_minor + EXCLUDED.revenue_minor \
                     RETURNING quantity, revenue_minor",
                    t.products
                ),
                &[&days, &products, &currencies, &quantities, &revenues],
            )
            .await?;
        if rows.iter().any(|r| r.get::<_, i64>(0) < 0 || r.get::<_, i64>(1) < 0) {
            return Err(inconsistent(format!("{} would hold less than nothing", t.products)));
        }
        tx.execute(
            &format!(
                "DELETE FROM {} p USING unnest($1::int4[], $2::text[], $3::text[]) AS u(d, product_id, currency) \
                  WHERE p.day = {DAY_OF_D} AND p.product_id = u.product_id AND p.currency = u.currency \
                    AND p.quantity = 0 AND p.revenue_minor = 0",
                t.products
            ),
            &[&days, &products, &currencies],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_day_of_a_time_is_its_utc_date_in_days_since_1970() {
        let day = Duration::from_secs(86_400);
        let nano = Duration::from_nanos(1);
        assert_eq!(day_of(UNIX_EPOCH), 0);
        assert_eq!(day_of(UNIX_EPOCH + day - nano), 0);
        assert_eq!(day_of(UNIX_EPOCH + day), 1);
        assert_eq!(day_of(UNIX_EPOCH - nano), -1, "before 1970 rounds down, not toward zero");
        assert_eq!(day_of(UNIX_EPOCH - day), -1);
        assert_eq!(day_of(UNIX_EPOCH - day - nano), -2);
        // 0001-01-01 and 9999-12-31, the ends of the range event times lie in.
        assert_eq!(day_of(UNIX_EPOCH - day * 719_162), -719_162);
        assert_eq!(day_of(UNIX_EPOCH + day * 2_932_896 + day - nano), 2_932_896);
    }
}
