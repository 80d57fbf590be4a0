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

use std::{collections::BTreeMap, time::SystemTime};

use async_trait::async_trait;
use eventfold_domain::{
    DomainEvent,
    order::{OrderEvent, OrderItem},
};
use eventfold_store::RecordedEvent;
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection};

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

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !event.stream_id.starts_with("order-") || OrderEvent::current_version(&event.event_type).is_none() {
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
