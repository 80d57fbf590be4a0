//! `order_views`: one row per order with its items, total, status, payment
//! and shipping, as of its last event.

use std::{collections::HashMap, time::SystemTime};

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, order::OrderEvent};
use eventfold_store::{EventFilter, RecordedEvent};
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection};

/// The order view read model (`read.order_views`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderViews;

fn table(version: u32) -> String {
    format!("read.order_views_v{version}")
}

#[async_trait]
impl Projection for OrderViews {
    fn name(&self) -> &'static str {
        "order_views"
    }

    fn create_sql(&self, version: u32) -> String {
        let t = table(version);
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                order_id        text COLLATE \"C\" PRIMARY KEY,
                customer_id     text NOT NULL,
                status          text NOT NULL,
                currency        text NOT NULL,
                total_minor     bigint NOT NULL,
                items           jsonb NOT NULL,
                payment_id      text,
                carrier         text,
                tracking_number text,
                cancel_reason   text,
                created_at      timestamptz NOT NULL,
                updated_at      timestamptz NOT NULL,
                stream_version  bigint NOT NULL,
                last_position   bigint NOT NULL
            );
            CREATE INDEX IF NOT EXISTS order_views_v{version}_customer ON {t} (customer_id, created_at);
            CREATE INDEX IF NOT EXISTS order_views_v{version}_status ON {t} (status, created_at);"
        )
    }

    fn tables(&self, version: u32) -> Vec<String> {
        vec![table(version)]
    }

    fn activate_sql(&self, version: u32) -> String {
        format!(
            "DROP VIEW IF EXISTS read.order_views; CREATE VIEW read.order_views AS SELECT * FROM {};",
            table(version)
        )
    }

    fn event_filter(&self) -> EventFilter {
        crate::reads_of::<OrderEvent>("order-")
    }

    /// The batch folded in memory per order, then one upsert of every
    /// order it touched (a rebuild's speed comes from here).
    async fn apply_batch(
        &self,
        tx: &Transaction<'_>,
        version: u32,
        events: &[RecordedEvent],
    ) -> Result<bool, ApplyError> {
        let t = table(version);
        let mut decoded = Vec::new();
        let mut to_load: Vec<String> = Vec::new();
        for event in events {
            if !is_order_event(event) {
                continue;
            }
            let e = OrderEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            if !matches!(e, OrderEvent::Created(_)) {
                to_load.push(order_id(&e).to_owned());
            }
            decoded.push((event, e));
        }
        if decoded.is_empty() {
            return Ok(true);
        }
        let mut rows: HashMap<String, Row> = HashMap::new();
        if !to_load.is_empty() {
            to_load.sort_unstable();
            to_load.dedup();
            let loaded = tx
                .query(
                    &format!(
                        "SELECT order_id, customer_id, status, currency, total_minor, items, payment_id, carrier, \
                                tracking_number, cancel_reason, created_at, updated_at, stream_version, last_position \
                           FROM {t} WHERE order_id = ANY($1)"
                    ),
                    &[&to_load],
                )
                .await?;
            for r in loaded {
                let row = Row {
                    stored: true,
                    customer_id: r.get(1),
                    status: r.get(2),
                    currency: r.get(3),
                    total_minor: r.get(4),
                    items: r.get(5),
                    payment_id: r.get(6),
                    carrier: r.get(7),
                    tracking_number: r.get(8),
                    cancel_reason: r.get(9),
                    created_at: r.get(10),
                    updated_at: r.get(11),
                    stream_version: r.get(12),
                    last_position: r.get(13),
                };
                rows.insert(r.get(0), row);
            }
        }
        let mut touched: Vec<String> = Vec::new();
        for (event, e) in decoded {
            let (at, stream_version, position) = (event.created_at, event.version as i64, event.global_position as i64);
            let id = order_id(&e).to_owned();
            if let OrderEvent::Created(c) = &e {
                if rows.contains_key(&id) {
                    return Err(ApplyError::Event(format!("order {id} is created twice")));
                }
                let items = serde_json::to_value(&c.items).map_err(|e| ApplyError::Event(e.to_string()))?;
                rows.insert(
                    id.clone(),
                    Row {
                        stored: false,
                        customer_id: c.customer_id.clone(),
                        status: "created".to_owned(),
                        currency: c.currency.as_str().to_owned(),
                        total_minor: c.total.minor,
                        items,
                        payment_id: None,
                        carrier: None,
                        tracking_number: None,
                        cancel_reason: None,
                        created_at: at,
                        updated_at: at,
                        stream_version,
                        last_position: position,
                    },
                );
            } else {
                let row = rows
                    .get_mut(&id)
                    .ok_or_else(|| ApplyError::Event(format!("{} for unknown order {id}", event.event_type)))?;
                match e {
                    OrderEvent::Created(_) => {}
                    OrderEvent::Confirmed(_) => row.status = "confirmed".to_owned(),
                    OrderEvent::PaymentProcessed(p) => {
                        row.status = "paid".to_owned();
                        row.payment_id = Some(p.payment_id);
                    }
                    OrderEvent::Shipped(s) => {
                        row.status = "shipped".to_owned();
                        row.carrier = Some(s.carrier);
                        row.tracking_number = Some(s.tracking_number);
                    }
                    OrderEvent::Cancelled(c) => {
                        row.status = "cancelled".to_owned();
                        row.cancel_reason = Some(c.reason);
                    }
                }
                row.updated_at = at;
                row.stream_version = stream_version;
                row.last_position = position;
            }
            touched.push(id);
        }
        touched.sort_unstable();
        touched.dedup();
        let (mut inserts, mut updates) = (Columns::default(), Columns::default());
        for id in touched {
            if let Some(row) = rows.remove(&id) {
                if row.stored { updates.push(id, row) } else { inserts.push(id, row) }
            }
        }
        inserts.write(tx, &t, false).await?;
        updates.write(tx, &t, true).await?;
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !is_order_event(event) {
            return Ok(());
        }
        let decoded = OrderEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
            .map_err(|e| ApplyError::Event(e.to_string()))?;
        let t = table(version);
        let (at, stream_version, position) = (event.created_at, event.version as i64, event.global_position as i64);
        let changed = match decoded {
            OrderEvent::Created(e) => {
                let items = serde_json::to_value(&e.items).map_err(|e| ApplyError::Event(e.to_string()))?;
                tx.execute(
                    &format!(
                        "INSERT INTO {t} (order_id, customer_id, status, currency, total_minor, items, created_at, \
                                          updated_at, stream_version, last_position) \
                         VALUES ($1, $2, 'created', $3, $4, $5, $6, $6, $7, $8)"
                    ),
                    &[
                        &e.order_id,
                        &e.customer_id,
                        &e.currency.as_str(),
                        &e.total.minor,
                        &items,
                        &at,
                        &stream_version,
                        &position,
                    ],
                )
                .await?
            }
            OrderEvent::Confirmed(e) => {
                tx.execute(
                    &format!(
                        "UPDATE {t} SET status = 'confirmed', updated_at = $2, stream_version = $3, \
                                        last_position = $4 WHERE order_id = $1"
                    ),
                    &[&e.order_id, &at, &stream_version, &position],
                )
                .await?
            }
            OrderEvent::PaymentProcessed(e) => {
                tx.execute(
                    &format!(
                        "UPDATE {t} SET status = 'paid', payment_id = $2, updated_at = $3, stream_version = $4, \
                                        last_position = $5 WHERE order_id = $1"
                    ),
                    &[&e.order_id, &e.payment_id, &at, &stream_version, &position],
                )
                .await?
            }
            OrderEvent::Shipped(e) => {
                tx.execute(
                    &format!(
                        "UPDATE {t} SET status = 'shipped', carrier = $2, tracking_number = $3, updated_at = $4, \
                                        stream_version = $5, last_position = $6 WHERE order_id = $1"
                    ),
                    &[&e.order_id, &e.carrier, &e.tracking_number, &at, &stream_version, &position],
                )
                .await?
            }
            OrderEvent::Cancelled(e) => {
                tx.execute(
                    &format!(
                        "UPDATE {t} SET status = 'cancelled', cancel_reason = $2, updated_at = $3, \
                                        stream_version = $4, last_position = $5 WHERE order_id = $1"
                    ),
                    &[&e.order_id, &e.reason, &at, &stream_version, &position],
                )
                .await?
            }
        };
        if changed == 1 {
            Ok(())
        } else {
            Err(ApplyError::Event(format!(
                "{} at position {} changed {changed} rows of {t}, not 1",
                event.event_type, event.global_position
            )))
        }
    }
}

pub(crate) fn is_order_event(event: &RecordedEvent) -> bool {
    event.stream_id.starts_with("order-") && OrderEvent::current_version(&event.event_type).is_some()
}

pub(crate) fn order_id(event: &OrderEvent) -> &str {
    match event {
        OrderEvent::Created(e) => &e.order_id,
        OrderEvent::Confirmed(e) => &e.order_id,
        OrderEvent::PaymentProcessed(e) => &e.order_id,
        OrderEvent::Shipped(e) => &e.order_id,
        OrderEvent::Cancelled(e) => &e.order_id,
    }
}

/// One order view row, as folded in memory.
#[derive(Debug)]
struct Row {
    /// Read from the table (updated) rather than created in this batch
    /// (inserted).
    stored: bool,
    customer_id: String,
    status: String,
    currency: String,
    total_minor: i64,
    items: serde_json::Value,
    payment_id: Option<String>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    cancel_reason: Option<String>,
    created_at: SystemTime,
    updated_at: SystemTime,
    stream_version: i64,
    last_position: i64,
}

/// Rows as column arrays, for one `INSERT … SELECT FROM unnest(…)`.
#[derive(Debug, Default)]
struct Columns {
    order_id: Vec<String>,
    customer_id: Vec<String>,
    status: Vec<String>,
    currency: Vec<String>,
    total_minor: Vec<i64>,
    items: Vec<serde_json::Value>,
    payment_id: Vec<Option<String>>,
    carrier: Vec<Option<String>>,
    tracking_number: Vec<Option<String>>,
    cancel_reason: Vec<Option<String>>,
    created_at: Vec<SystemTime>,
    updated_at: Vec<SystemTime>,
    stream_version: Vec<i64>,
    last_position: Vec<i64>,
}

impl Columns {
    fn push(&mut self, order_id: String, row: Row) {
        self.order_id.push(order_id);
        self.customer_id.push(row.customer_id);
        self.status.push(row.status);
        self.currency.push(row.currency);
        self.total_minor.push(row.total_minor);
        self.items.push(row.items);
        self.payment_id.push(row.payment_id);
        self.carrier.push(row.carrier);
        self.tracking_number.push(row.tracking_number);
        self.cancel_reason.push(row.cancel_reason);
        self.created_at.push(row.created_at);
        self.updated_at.push(row.updated_at);
        self.stream_version.push(row.stream_version);
        self.last_position.push(row.last_position);
    }

    /// One `INSERT` of new rows, or one `UPDATE` of stored ones, from the
    /// column arrays.
    async fn write(&self, tx: &Transaction<'_>, table: &str, update: bool) -> Result<(), ApplyError> {
        const COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, payment_id, carrier, \
                               tracking_number, cancel_reason, created_at, updated_at, stream_version, last_position";
        const UNNEST: &str = "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::jsonb[], \
                              $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], \
                              $12::timestamptz[], $13::int8[], $14::int8[])";
        if self.order_id.is_empty() {
            return Ok(());
        }
        let sql = if update {
            format!(
                "UPDATE {table} t SET customer_id = u.customer_id, status = u.status, currency = u.currency, \
                        total_minor = u.total_minor, items = u.items, payment_id = u.payment_id, \
                        carrier = u.carrier, tracking_number = u.tracking_number, cancel_reason = u.cancel_reason, \
                        created_at = u.created_at, updated_at = u.updated_at, stream_version = u.stream_version, \
                        last_position = u.last_position \
                   FROM {UNNEST} AS u({COLUMNS}) WHERE t.order_id = u.order_id"
            )
        } else {
            format!("INSERT INTO {table} ({COLUMNS}) SELECT * FROM {UNNEST}")
        };
        let changed = tx
            .execute(
                &sql,
                &[
                    &self.order_id,
                    &self.customer_id,
                    &self.status,
                    &self.currency,
                    &self.total_minor,
                    &self.items,
                    &self.payment_id,
                    &self.carrier,
                    &self.tracking_number,
                    &self.cancel_reason,
                    &self.created_at,
                    &self.updated_at,
                    &self.stream_version,
                    &self.last_position,
                ],
            )
            .await?;
        if changed == self.order_id.len() as u64 {
            Ok(())
        } else {
            Err(ApplyError::Event(format!("{changed} of {} order views written to {table}", self.order_id.len())))
        }
    }
}
