//! The order read models: one view per order (`read.order_views`), the
//! customers' totals and the sales per day, status and product
//! (`order_analytics`); and an order as of a time or version, folded from
//! its events.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventfold_domain::{
    Aggregate, DomainEvent,
    order::{Order, OrderEvent, OrderItem, OrderStatus},
};
use eventfold_store::{RecordedEvent, StreamRead, from_bigint};
use prost::Message;
use tokio_postgres::{Row, types::ToSql};

use crate::{Amount, Error, Kind, Query, Result, column, one_page};

/// The projection of order views.
pub(crate) const ORDERS: &str = "order_views";
/// The projection of customer totals and sales.
pub(crate) const ANALYTICS: &str = "order_analytics";
const COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, payment_id, carrier, \
                       tracking_number, cancel_reason, created_at, updated_at, stream_version, last_position";

/// An order as its view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderRecord {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    /// `New` for a status this code does not know.
    pub(crate) status: OrderStatus,
    pub(crate) items: Vec<OrderItem>,
    pub(crate) total: Option<Amount>,
    pub(crate) payment_id: Option<String>,
    pub(crate) carrier: Option<String>,
    pub(crate) tracking_number: Option<String>,
    pub(crate) cancel_reason: Option<String>,
    pub(crate) created_at: SystemTime,
    pub(crate) updated_at: SystemTime,
    pub(crate) stream_version: u64,
    pub(crate) last_position: u64,
}

/// The status stored as `name`.
pub(crate) fn status_of(name: &str) -> OrderStatus {
    match name {
        "created" => OrderStatus::Created,
        "confirmed" => OrderStatus::Confirmed,
        "paid" => OrderStatus::Paid,
        "shipped" => OrderStatus::Shipped,
        "cancelled" => OrderStatus::Cancelled,
        _ => OrderStatus::New,
    }
}

/// A row of [`COLUMNS`].
fn order(row: &Row) -> Result<OrderRecord> {
    let order_id: String = column(row, 0)?;
    let stored: serde_json::Value = column(row, 5)?;
    let items: Vec<OrderItem> = serde_json::from_value(stored)
        .map_err(|e| Error::Internal(format!("order {order_id} has unreadable items: {e}")))?;
    let currency: String = column(row, 3)?;
    Ok(OrderRecord {
        customer_id: column(row, 1)?,
        status: status_of(column(row, 2)?),
        items,
        total: Some(Amount { minor: column(row, 4)?, currency }),
        payment_id: column(row, 6)?,
        carrier: column(row, 7)?,
        tracking_number: column(row, 8)?,
        cancel_reason: column(row, 9)?,
        created_at: column(row, 10)?,
        updated_at: column(row, 11)?,
        stream_version: from_bigint(column(row, 12)?),
        last_position: from_bigint(column(row, 13)?),
        order_id,
    })
}

/// Keyset cursor of order lists: (created_at in µs since the epoch, id).
pub(crate) type OrderCursor = (i64, String);

/// µs since the epoch (negative before it), saturating.
pub(crate) fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, i64::saturating_neg),
    }
}

/// The time `micros` µs from the epoch, if within the years 0001 to 9999:
/// a cursor from a page token (which a client can forge) goes through the
/// same check as a request time.
fn from_micros(micros: i64) -> Option<SystemTime> {
    let seconds = micros.div_euclid(1_000_000);
    let nanos = i32::try_from(micros.rem_euclid(1_000_000).checked_mul(1000)?).ok()?;
    eventfold_platform::input::system_time(prost_types::Timestamp { seconds, nanos }, "page_token", &mut Vec::new())
}

/// Filters of an order list, newest first.
#[derive(Debug, Default)]
pub(crate) struct OrderFilter {
    pub(crate) customer_id: Option<String>,
    /// The stored name of a status.
    pub(crate) status: Option<&'static str>,
    pub(crate) from: Option<SystemTime>,
    pub(crate) until: Option<SystemTime>,
}

impl OrderFilter {
    /// What a page token of this list is bound to.
    pub(crate) fn fingerprint(&self) -> String {
        format!(
            "orders|{:?}|{:?}|{:?}|{:?}",
            self.customer_id,
            self.status,
            self.from.map(micros),
            self.until.map(micros)
        )
    }
}

/// A customer's totals in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CustomerTotalsRecord {
    pub(crate) order_count: i64,
    pub(crate) cancelled_count: i64,
    pub(crate) total_spent: Amount,
    pub(crate) last_order_id: String,
    pub(crate) last_order_at: SystemTime,
}

/// The sales of one day in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DailySalesRecord {
    /// `YYYY-MM-DD`.
    pub(crate) day: String,
    pub(crate) orders_created: i64,
    pub(crate) orders_cancelled: i64,
    pub(crate) orders_paid: i64,
    pub(crate) revenue: Amount,
}

/// Orders that reached a status over a range of days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusCountRecord {
    pub(crate) status: OrderStatus,
    pub(crate) orders: i64,
}

/// A product's sales over a range of days, in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProductSalesRecord {
    pub(crate) product_id: String,
    pub(crate) quantity: i64,
    pub(crate) revenue: Amount,
}

/// Sales over a range of days.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SalesRecord {
    pub(crate) days: Vec<DailySalesRecord>,
    pub(crate) statuses: Vec<StatusCountRecord>,
    pub(crate) top_products: Vec<ProductSalesRecord>,
}

impl Query {
    /// The order's view from PostgreSQL.
    pub(crate) async fn load_order(&self, order_id: &str) -> Result<Option<OrderRecord>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(&format!("SELECT {COLUMNS} FROM read.order_views WHERE order_id = $1"), &[&order_id])
            .await?;
        row.as_ref().map(order).transpose()
    }

    /// Caches the `count` most recently changed orders.
    pub(crate) async fn warm(&self, count: u32) {
        let Some(cache) = &self.cache else { return };
        // The positions follower needs a moment for its first read.
        for _ in 0..50 {
            if self.positions.get(ORDERS).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(active) = self.positions.get(ORDERS) else { return };
        let rows = match self.recent_orders(count).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "cache warm-up skipped");
                return;
            }
        };
        let mut warmed: u64 = 0;
        for row in &rows {
            if let Ok(record) = order(row) {
                let view = crate::grpc::order_view(&record);
                cache
                    .fill(Kind::Order, active.version, &view.order_id, view.last_position, &view.encode_to_vec())
                    .await;
                warmed = warmed.saturating_add(1);
            }
        }
        tracing::info!(orders = warmed, "cache warmed");
    }

    /// The rows of the `count` most recently changed orders.
    async fn recent_orders(&self, count: u32) -> Result<Vec<Row>> {
        let conn = self.conn().await?;
        let sql = format!("SELECT {COLUMNS} FROM read.order_views ORDER BY updated_at DESC LIMIT $1");
        Ok(conn.query(&sql, &[&i64::from(count)]).await?)
    }

    /// One page of at most `size` orders matching `filter`, newest first,
    /// after `after`; and whether more follow.
    pub(crate) async fn list_orders(
        &self,
        filter: &OrderFilter,
        size: i64,
        after: Option<OrderCursor>,
    ) -> Result<(Vec<OrderRecord>, bool)> {
        let mut conditions = Vec::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut push = |condition: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            conditions.push(condition.replace('$', &format!("${}", params.len())));
        };
        if let Some(customer) = &filter.customer_id {
            push("customer_id = $", Box::new(customer.clone()));
        }
        if let Some(status) = filter.status {
            push("status = $", Box::new(status));
        }
        if let Some(from) = filter.from {
            push("created_at >= $", Box::new(from));
        }
        if let Some(until) = filter.until {
            push("created_at < $", Box::new(until));
        }
        if let Some((at, id)) = after {
            let at =
                from_micros(at).ok_or_else(|| Error::invalid("page_token", "is not a token this service issued"))?;
            params.push(Box::new(at));
            let at = params.len();
            params.push(Box::new(id));
            conditions.push(format!("(created_at, order_id) < (${at}, ${})", params.len()));
        }
        params.push(Box::new(size.saturating_add(1)));
        let limit = params.len();
        let condition = if conditions.is_empty() { "true".to_owned() } else { conditions.join(" AND ") };
        let sql = format!(
            "SELECT {COLUMNS} FROM read.order_views WHERE {condition} \
              ORDER BY created_at DESC, order_id DESC LIMIT ${limit}"
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let conn = self.conn().await?;
        let rows = conn.query(&sql, &refs).await?;
        let orders = rows.iter().map(order).collect::<Result<Vec<_>>>()?;
        Ok(one_page(orders, size))
    }

    /// The totals of `customer_id`, one per currency.
    pub(crate) async fn customer_totals(&self, customer_id: &str) -> Result<Vec<CustomerTotalsRecord>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT currency, order_count, cancelled_count, total_spent_minor, last_order_id, last_order_at \
                   FROM read.customer_orders WHERE customer_id = $1 ORDER BY currency",
                &[&customer_id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(CustomerTotalsRecord {
                    order_count: column(row, 1)?,
                    cancelled_count: column(row, 2)?,
                    total_spent: Amount { minor: column(row, 3)?, currency: column(row, 0)? },
                    last_order_id: column(row, 4)?,
                    last_order_at: column(row, 5)?,
                })
            })
            .collect()
    }

    /// The sales from day `from` to day `until` (`YYYY-MM-DD`, both
    /// included): per day, per status, and the `top` products.
    pub(crate) async fn sales(&self, from: &str, until: &str, top: i64) -> Result<SalesRecord> {
        let conn = self.conn().await?;
        let days = conn
            .query(
                "SELECT day::text, currency, orders_created, orders_cancelled, orders_paid, revenue_minor \
                   FROM read.daily_sales WHERE day BETWEEN $1::text::date AND $2::text::date ORDER BY day, currency",
                &[&from, &until],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(DailySalesRecord {
                    day: column(row, 0)?,
                    orders_created: column(row, 2)?,
                    orders_cancelled: column(row, 3)?,
                    orders_paid: column(row, 4)?,
                    revenue: Amount { minor: column(row, 5)?, currency: column(row, 1)? },
                })
            })
            .collect::<Result<_>>()?;
        let statuses = conn
            .query(
                "SELECT status, sum(orders)::bigint FROM read.daily_status \
                  WHERE day BETWEEN $1::text::date AND $2::text::date GROUP BY status HAVING sum(orders) > 0 \
                  ORDER BY status",
                &[&from, &until],
            )
            .await?
            .iter()
            .map(|row| Ok(StatusCountRecord { status: status_of(column(row, 0)?), orders: column(row, 1)? }))
            .collect::<Result<_>>()?;
        let top_products = conn
            .query(
                "SELECT product_id, currency, sum(quantity)::bigint AS q, sum(revenue_minor)::bigint \
                   FROM read.product_sales WHERE day BETWEEN $1::text::date AND $2::text::date \
                  GROUP BY product_id, currency HAVING sum(quantity) > 0 \
                  ORDER BY q DESC, product_id, currency LIMIT $3",
                &[&from, &until, &top],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(ProductSalesRecord {
                    product_id: column(row, 0)?,
                    quantity: column(row, 2)?,
                    revenue: Amount { minor: column(row, 3)?, currency: column(row, 1)? },
                })
            })
            .collect::<Result<_>>()?;
        Ok(SalesRecord { days, statuses, top_products })
    }

    /// The order as of `time` (the events recorded at or before it) or, with
    /// no time, as of `version`; None when it did not exist then.
    pub(crate) async fn order_at(
        &self,
        order_id: &str,
        time: Option<SystemTime>,
        version: Option<u64>,
    ) -> Result<Option<OrderRecord>> {
        let mut read = StreamRead::forwards(format!("order-{order_id}"), 10_000);
        // "At" a time includes the events recorded at that instant, and not
        // one a microsecond later.
        read.end_time = time.and_then(eventfold_store::end_at_or_before);
        read.max_version = if time.is_none() { version } else { None };
        match self.log.read_stream(read).await {
            Ok(slice) => folded(&slice.events),
            Err(eventfold_store::Error::StreamNotFound(_) | eventfold_store::Error::StreamDeleted(_)) => {
                Err(Error::NotFound { what: "order", reason: "ORDER_NOT_FOUND", id: order_id.to_owned() })
            }
            Err(e) => Err(Error::Store(e)),
        }
    }

    /// The rows of the orders of `ids` changed after position `since`, and
    /// those of `fresh` (a subset of `ids`) whatever their position: each
    /// order's id and its record (or why it cannot be read).
    pub(crate) async fn changed_orders(
        &self,
        ids: &[String],
        since: i64,
        fresh: &[String],
    ) -> Result<Vec<(String, Result<OrderRecord>)>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM read.order_views \
                      WHERE order_id = ANY($1) AND (last_position > $2 OR order_id = ANY($3))"
                ),
                &[&ids, &since, &fresh],
            )
            .await?;
        rows.iter().map(|row| Ok((column(row, 0)?, order(row)))).collect()
    }
}

/// The order as of the events folded; None before its first.
fn folded(events: &[RecordedEvent]) -> Result<Option<OrderRecord>> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else { return Ok(None) };
    let decoded = events
        .iter()
        .map(|e| {
            OrderEvent::from_data(&e.event_type, e.schema_version, e.data.clone()).map_err(|error| {
                Error::Internal(format!("event {} of {} cannot be read: {error}", e.version, e.stream_id))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let order = Order::default().fold(&decoded);
    if order.status == OrderStatus::New {
        return Ok(None);
    }
    Ok(Some(OrderRecord {
        order_id: order.id,
        customer_id: order.customer_id,
        status: order.status,
        items: order.items,
        total: order.total.map(|t| Amount::new(t.minor, t.currency.as_str())),
        payment_id: order.payment_id,
        carrier: order.carrier,
        tracking_number: order.tracking_number,
        cancel_reason: order.cancel_reason,
        created_at: first.created_at,
        updated_at: last.created_at,
        stream_version: last.version,
        last_position: last.global_position,
    }))
}
