//! `inventory_views`: per product its name, available, reserved and
//! shipped stock, whether it is low on stock, and the reservations it
//! holds.

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, inventory::InventoryEvent};
use eventfold_store::RecordedEvent;
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection};

/// The low-stock threshold of [`InventoryViews::default`].
pub const DEFAULT_LOW_STOCK_THRESHOLD: i64 = 10;

/// The inventory read model (`read.inventory_views`,
/// `read.inventory_reservations`).
#[derive(Debug, Clone, Copy)]
pub struct InventoryViews {
    /// A product is low on stock while `available <= low_stock_threshold`.
    /// Each row keeps the threshold it was registered with (set at
    /// `ProductRegistered`), so a rebuild with the same threshold equals the
    /// original; another threshold takes a new version.
    pub low_stock_threshold: i64,
}

impl Default for InventoryViews {
    fn default() -> Self {
        Self { low_stock_threshold: DEFAULT_LOW_STOCK_THRESHOLD }
    }
}

#[async_trait]
impl Projection for InventoryViews {
    fn name(&self) -> &'static str {
        "inventory_views"
    }

    fn create_sql(&self, v: u32) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS read.inventory_views_v{v} (
                product_id     text COLLATE \"C\" PRIMARY KEY,
                name           text NOT NULL,
                available      bigint NOT NULL,
                reserved       bigint NOT NULL,
                shipped        bigint NOT NULL,
                updated_at     timestamptz NOT NULL,
                stream_version bigint NOT NULL,
                last_position  bigint NOT NULL,
                low_stock_threshold bigint NOT NULL,
                low_stock      boolean GENERATED ALWAYS AS (available <= low_stock_threshold) STORED
            );
            CREATE INDEX IF NOT EXISTS inventory_views_v{v}_available ON read.inventory_views_v{v} (available);
            CREATE INDEX IF NOT EXISTS inventory_views_v{v}_low_stock ON read.inventory_views_v{v} (product_id)
                WHERE low_stock;
            CREATE TABLE IF NOT EXISTS read.inventory_reservations_v{v} (
                product_id  text COLLATE \"C\" NOT NULL,
                order_id    text COLLATE \"C\" NOT NULL,
                quantity    bigint NOT NULL,
                reserved_at timestamptz NOT NULL,
                PRIMARY KEY (product_id, order_id)
            );"
        )
    }

    fn tables(&self, v: u32) -> Vec<String> {
        vec![format!("read.inventory_views_v{v}"), format!("read.inventory_reservations_v{v}")]
    }

    fn activate_sql(&self, v: u32) -> String {
        format!(
            "DROP VIEW IF EXISTS read.inventory_views;
             CREATE VIEW read.inventory_views AS SELECT * FROM read.inventory_views_v{v};
             DROP VIEW IF EXISTS read.inventory_reservations;
             CREATE VIEW read.inventory_reservations AS SELECT * FROM read.inventory_reservations_v{v};"
        )
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !event.stream_id.starts_with("inventory-") || InventoryEvent::current_version(&event.event_type).is_none() {
            return Ok(());
        }
        let decoded = InventoryEvent::from_data(&event.event_type, event.schema_version, event.data.clone())
            .map_err(|e| ApplyError::Event(e.to_string()))?;
        let (at, version, position) = (event.created_at, event.version as i64, event.global_position as i64);
        let views = format!("read.inventory_views_v{v}");
        let reservations = format!("read.inventory_reservations_v{v}");
        // (available, reserved, shipped) deltas, and the reservation change.
        let (product_id, deltas): (String, (i64, i64, i64)) = match &decoded {
            InventoryEvent::Registered(e) => {
                tx.execute(
                    &format!(
                        "INSERT INTO {views} (product_id, name, available, reserved, shipped, updated_at, \
                                              stream_version, last_position, low_stock_threshold) \
                         VALUES ($1, $2, 0, 0, 0, $3, $4, $5, $6)"
                    ),
                    &[&e.product_id, &e.name, &at, &version, &position, &self.low_stock_threshold],
                )
                .await?;
                return Ok(());
            }
            InventoryEvent::Replenished(e) => (e.product_id.clone(), (i64::from(e.quantity), 0, 0)),
            InventoryEvent::Reserved(e) => {
                tx.execute(
                    &format!(
                        "INSERT INTO {reservations} (product_id, order_id, quantity, reserved_at) \
                         VALUES ($1, $2, $3, $4)"
                    ),
                    &[&e.product_id, &e.order_id, &i64::from(e.quantity), &at],
                )
                .await?;
                (e.product_id.clone(), (-i64::from(e.quantity), i64::from(e.quantity), 0))
            }
            InventoryEvent::Released(e) => {
                remove_reservation(tx, &reservations, &e.product_id, &e.order_id).await?;
                (e.product_id.clone(), (i64::from(e.quantity), -i64::from(e.quantity), 0))
            }
            InventoryEvent::Consumed(e) => {
                remove_reservation(tx, &reservations, &e.product_id, &e.order_id).await?;
                (e.product_id.clone(), (0, -i64::from(e.quantity), i64::from(e.quantity)))
            }
        };
        let changed = tx
            .execute(
                &format!(
                    "UPDATE {views} SET available = available + $2, reserved = reserved + $3, \
                            shipped = shipped + $4, updated_at = $5, stream_version = $6, last_position = $7 \
                      WHERE product_id = $1"
                ),
                &[&product_id, &deltas.0, &deltas.1, &deltas.2, &at, &version, &position],
            )
            .await?;
        if changed == 1 { Ok(()) } else { Err(ApplyError::Event(format!("product {product_id} is not in {views}"))) }
    }
}

async fn remove_reservation(
    tx: &Transaction<'_>,
    table: &str,
    product_id: &str,
    order_id: &str,
) -> Result<(), ApplyError> {
    let removed = tx
        .execute(&format!("DELETE FROM {table} WHERE product_id = $1 AND order_id = $2"), &[&product_id, &order_id])
        .await?;
    if removed == 1 {
        Ok(())
    } else {
        Err(ApplyError::Event(format!("order {order_id} holds no reservation of {product_id} in {table}")))
    }
}
