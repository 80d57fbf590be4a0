//! `order_views`: one row per order with its items, total, status, payment
//! and shipping, as of its last event.

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, order::OrderEvent};
use eventfold_store::RecordedEvent;
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

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !event.stream_id.starts_with("order-") || OrderEvent::current_version(&event.event_type).is_none() {
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
