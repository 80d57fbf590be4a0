//! The inventory read model: stock per product (`read.inventory_views`)
//! and its reservations.

use std::time::SystemTime;

use eventfold_store::from_bigint;
use tokio_postgres::Row;

use crate::{Query, Result, column, one_page};

/// The projection of inventory views.
pub(crate) const INVENTORY: &str = "inventory_views";

const COLUMNS: &str = "product_id, name, available, reserved, shipped, low_stock, low_stock_threshold, \
                       updated_at, stream_version, last_position";

/// A product's stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InventoryRecord {
    pub(crate) product_id: String,
    pub(crate) name: String,
    pub(crate) available: i64,
    pub(crate) reserved: i64,
    pub(crate) shipped: i64,
    pub(crate) low_stock: bool,
    pub(crate) low_stock_threshold: i64,
    /// Read with the product by [`Query::inventory`]; empty in lists.
    pub(crate) reservations: Vec<ReservationRecord>,
    pub(crate) updated_at: SystemTime,
    pub(crate) stream_version: u64,
    pub(crate) last_position: u64,
}

/// Stock an order holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReservationRecord {
    pub(crate) order_id: String,
    pub(crate) quantity: i64,
    pub(crate) reserved_at: SystemTime,
}

/// A row of [`COLUMNS`].
fn inventory(row: &Row) -> Result<InventoryRecord> {
    Ok(InventoryRecord {
        product_id: column(row, 0)?,
        name: column(row, 1)?,
        available: column(row, 2)?,
        reserved: column(row, 3)?,
        shipped: column(row, 4)?,
        low_stock: column(row, 5)?,
        low_stock_threshold: column(row, 6)?,
        reservations: Vec::new(),
        updated_at: column(row, 7)?,
        stream_version: from_bigint(column(row, 8)?),
        last_position: from_bigint(column(row, 9)?),
    })
}

impl Query {
    /// The stock of `product_id` and its reservations, in one snapshot.
    pub(crate) async fn inventory(&self, product_id: &str) -> Result<Option<InventoryRecord>> {
        let mut conn = self.conn().await?;
        let tx = conn.build_transaction().read_only(true).start().await?;
        let Some(row) = tx
            .query_opt(&format!("SELECT {COLUMNS} FROM read.inventory_views WHERE product_id = $1"), &[&product_id])
            .await?
        else {
            return Ok(None);
        };
        let mut record = inventory(&row)?;
        record.reservations = tx
            .query(
                "SELECT order_id, quantity, reserved_at FROM read.inventory_reservations \
                  WHERE product_id = $1 ORDER BY order_id",
                &[&product_id],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(ReservationRecord {
                    order_id: column(row, 0)?,
                    quantity: column(row, 1)?,
                    reserved_at: column(row, 2)?,
                })
            })
            .collect::<Result<_>>()?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// One page of at most `size` products low on stock, by id, after
    /// `after`; and whether more follow.
    pub(crate) async fn low_stock(&self, size: i64, after: &str) -> Result<(Vec<InventoryRecord>, bool)> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM read.inventory_views \
                      WHERE low_stock AND product_id > $1 ORDER BY product_id LIMIT $2"
                ),
                &[&after, &size.saturating_add(1)],
            )
            .await?;
        let products = rows.iter().map(inventory).collect::<Result<Vec<_>>>()?;
        Ok(one_page(products, size))
    }
}
