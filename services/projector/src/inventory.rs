//! `inventory_views`: per product its name, available, reserved and
//! shipped stock, whether it is low on stock, and the reservations it
//! holds.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

use async_trait::async_trait;
use eventfold_domain::{DomainEvent, inventory::InventoryEvent};
use eventfold_store::{EventFilter, RecordedEvent};
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

    fn event_filter(&self) -> EventFilter {
        crate::reads_of::<InventoryEvent>("inventory-")
    }

    /// The batch folded in memory per product and reservation, from the
    /// rows it touches (read once), then one statement per table and kind
    /// of change.
    async fn apply_batch(&self, tx: &Transaction<'_>, v: u32, events: &[RecordedEvent]) -> Result<bool, ApplyError> {
        let mut decoded = Vec::new();
        for event in events.iter().filter(|e| is_inventory_event(e)) {
            let e = InventoryEvent::from_data_ref(&event.event_type, event.schema_version, &event.data)
                .map_err(|e| ApplyError::Event(e.to_string()))?;
            decoded.push((event, e));
        }
        if decoded.is_empty() {
            return Ok(true);
        }
        let views = format!("read.inventory_views_v{v}");
        let reservations = format!("read.inventory_reservations_v{v}");
        let mut fold = StockFold::load(tx, &views, &reservations, &decoded).await?;
        for (event, e) in decoded {
            fold.apply(self.low_stock_threshold, event, e)?;
        }
        fold.write(tx, &views, &reservations).await?;
        Ok(true)
    }

    async fn apply(&self, tx: &Transaction<'_>, v: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !is_inventory_event(event) {
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

fn is_inventory_event(event: &RecordedEvent) -> bool {
    event.stream_id.starts_with("inventory-") && InventoryEvent::current_version(&event.event_type).is_some()
}

/// One product row, as folded in memory.
#[derive(Debug)]
struct Product {
    /// Read from the table (updated) rather than registered in this batch
    /// (inserted).
    stored: bool,
    name: String,
    available: i64,
    reserved: i64,
    shipped: i64,
    updated_at: SystemTime,
    stream_version: i64,
    last_position: i64,
    low_stock_threshold: i64,
}

/// One reservation, as folded in memory.
#[derive(Debug, Clone)]
struct Reservation {
    quantity: i64,
    reserved_at: SystemTime,
}

/// A reservation key's state: whether the table held it before the batch,
/// and what it holds now (`None`: no reservation).
#[derive(Debug)]
struct ReservationState {
    stored: bool,
    current: Option<Reservation>,
}

/// [`InventoryViews`]' batch: the products and reservations it touches.
#[derive(Debug, Default)]
struct StockFold {
    products: HashMap<String, Product>,
    /// Products changed by the batch, in id order.
    touched: BTreeSet<String>,
    reservations: BTreeMap<(String, String), ReservationState>,
}

impl StockFold {
    /// Reads the rows the batch touches that it does not create.
    async fn load(
        tx: &Transaction<'_>,
        views: &str,
        reservations: &str,
        decoded: &[(&RecordedEvent, InventoryEvent)],
    ) -> Result<Self, ApplyError> {
        let mut product_ids: Vec<&str> = Vec::new();
        let (mut res_products, mut res_orders): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for (_, e) in decoded {
            match e {
                InventoryEvent::Registered(e) => product_ids.push(&e.product_id),
                InventoryEvent::Replenished(e) => product_ids.push(&e.product_id),
                InventoryEvent::Reserved(e) => {
                    product_ids.push(&e.product_id);
                    res_products.push(&e.product_id);
                    res_orders.push(&e.order_id);
                }
                InventoryEvent::Released(e) => {
                    product_ids.push(&e.product_id);
                    res_products.push(&e.product_id);
                    res_orders.push(&e.order_id);
                }
                InventoryEvent::Consumed(e) => {
                    product_ids.push(&e.product_id);
                    res_products.push(&e.product_id);
                    res_orders.push(&e.order_id);
                }
            }
        }
        product_ids.sort_unstable();
        product_ids.dedup();
        let mut fold = Self::default();
        let rows = tx
            .query(
                &format!(
                    "SELECT product_id, name, available, reserved, shipped, updated_at, stream_version, \
                            last_position, low_stock_threshold \
                       FROM {views} WHERE product_id = ANY($1)"
                ),
                &[&product_ids],
            )
            .await?;
        for r in rows {
            let product = Product {
                stored: true,
                name: r.get(1),
                available: r.get(2),
                reserved: r.get(3),
                shipped: r.get(4),
                updated_at: r.get(5),
                stream_version: r.get(6),
                last_position: r.get(7),
                low_stock_threshold: r.get(8),
            };
            fold.products.insert(r.get(0), product);
        }
        if !res_products.is_empty() {
            let rows = tx
                .query(
                    &format!(
                        "SELECT r.product_id, r.order_id, r.quantity, r.reserved_at \
                           FROM {reservations} r JOIN unnest($1::text[], $2::text[]) AS k(product_id, order_id) \
                             ON r.product_id = k.product_id AND r.order_id = k.order_id"
                    ),
                    &[&res_products, &res_orders],
                )
                .await?;
            for r in rows {
                let current = Reservation { quantity: r.get(2), reserved_at: r.get(3) };
                fold.reservations
                    .insert((r.get(0), r.get(1)), ReservationState { stored: true, current: Some(current) });
            }
        }
        Ok(fold)
    }

    /// One event, with the checks of [`InventoryViews::apply`].
    fn apply(&mut self, threshold: i64, event: &RecordedEvent, e: InventoryEvent) -> Result<(), ApplyError> {
        let (at, version, position) = (event.created_at, event.version as i64, event.global_position as i64);
        let (product_id, deltas) = match e {
            InventoryEvent::Registered(e) => {
                if self.products.contains_key(&e.product_id) {
                    return Err(ApplyError::Event(format!("product {} is registered twice", e.product_id)));
                }
                let product = Product {
                    stored: false,
                    name: e.name,
                    available: 0,
                    reserved: 0,
                    shipped: 0,
                    updated_at: at,
                    stream_version: version,
                    last_position: position,
                    low_stock_threshold: threshold,
                };
                self.products.insert(e.product_id.clone(), product);
                self.touched.insert(e.product_id);
                return Ok(());
            }
            InventoryEvent::Replenished(e) => (e.product_id, (i64::from(e.quantity), 0, 0)),
            InventoryEvent::Reserved(e) => {
                let quantity = i64::from(e.quantity);
                let key = (e.product_id.clone(), e.order_id.clone());
                let state = self.reservations.entry(key).or_insert(ReservationState { stored: false, current: None });
                if state.current.is_some() {
                    return Err(ApplyError::Event(format!(
                        "order {} holds a reservation of {} already",
                        e.order_id, e.product_id
                    )));
                }
                state.current = Some(Reservation { quantity, reserved_at: at });
                (e.product_id, (-quantity, quantity, 0))
            }
            InventoryEvent::Released(e) => {
                self.remove_reservation(&e.product_id, &e.order_id)?;
                (e.product_id, (i64::from(e.quantity), -i64::from(e.quantity), 0))
            }
            InventoryEvent::Consumed(e) => {
                self.remove_reservation(&e.product_id, &e.order_id)?;
                (e.product_id, (0, -i64::from(e.quantity), i64::from(e.quantity)))
            }
        };
        let product = self
            .products
            .get_mut(&product_id)
            .ok_or_else(|| ApplyError::Event(format!("product {product_id} is not in the inventory views")))?;
        let add = |value: i64, delta: i64| {
            value
                .checked_add(delta)
                .ok_or_else(|| ApplyError::Event(format!("the stock of product {product_id} is out of range")))
        };
        product.available = add(product.available, deltas.0)?;
        product.reserved = add(product.reserved, deltas.1)?;
        product.shipped = add(product.shipped, deltas.2)?;
        product.updated_at = at;
        product.stream_version = version;
        product.last_position = position;
        self.touched.insert(product_id);
        Ok(())
    }
    fn remove_reservation(&mut self, product_id: &str, order_id: &str) -> Result<(), ApplyError> {
        let held = self
            .reservations
            .get_mut(&(product_id.to_owned(), order_id.to_owned()))
            .and_then(|state| state.current.take());
        match held {
            Some(_) => Ok(()),
            None => Err(ApplyError::Event(format!("order {order_id} holds no reservation of {product_id}"))),
        }
    }

    /// One `INSERT` of the registered products, one `UPDATE` of the stored
    /// ones, one `DELETE` of the stored reservations the batch changed and
    /// one `INSERT` of the reservations it leaves.
    async fn write(self, tx: &Transaction<'_>, views: &str, reservations: &str) -> Result<(), ApplyError> {
        let (mut inserts, mut updates) = (ProductColumns::default(), ProductColumns::default());
        for id in self.touched {
            if let Some(product) = self.products.get(&id) {
                if product.stored { updates.push(id, product) } else { inserts.push(id, product) }
            }
        }
        inserts.write(tx, views, false).await?;
        updates.write(tx, views, true).await?;
        let (mut gone_products, mut gone_orders) = (Vec::new(), Vec::new());
        let (mut products, mut orders, mut quantities, mut times) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((product_id, order_id), state) in self.reservations {
            // A stored reservation still there unchanged is in the map only
            // if the batch touched it: then it was removed (and maybe
            // made again).
            if state.stored {
                gone_products.push(product_id.clone());
                gone_orders.push(order_id.clone());
            }
            if let Some(reservation) = state.current {
                products.push(product_id);
                orders.push(order_id);
                quantities.push(reservation.quantity);
                times.push(reservation.reserved_at);
            }
        }
        if !gone_products.is_empty() {
            tx.execute(
                &format!(
                    "DELETE FROM {reservations} r USING unnest($1::text[], $2::text[]) AS k(product_id, order_id) \
                      WHERE r.product_id = k.product_id AND r.order_id = k.order_id"
                ),
                &[&gone_products, &gone_orders],
            )
            .await?;
        }
        if !products.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {reservations} (product_id, order_id, quantity, reserved_at) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[])"
                ),
                &[&products, &orders, &quantities, &times],
            )
            .await?;
        }
        Ok(())
    }
}

/// Product rows as column arrays, for one statement.
#[derive(Debug, Default)]
struct ProductColumns {
    product_id: Vec<String>,
    name: Vec<String>,
    available: Vec<i64>,
    reserved: Vec<i64>,
    shipped: Vec<i64>,
    updated_at: Vec<SystemTime>,
    stream_version: Vec<i64>,
    last_position: Vec<i64>,
    low_stock_threshold: Vec<i64>,
}

impl ProductColumns {
    fn push(&mut self, id: String, p: &Product) {
        self.product_id.push(id);
        self.name.push(p.name.clone());
        self.available.push(p.available);
        self.reserved.push(p.reserved);
        self.shipped.push(p.shipped);
        self.updated_at.push(p.updated_at);
        self.stream_version.push(p.stream_version);
        self.last_position.push(p.last_position);
        self.low_stock_threshold.push(p.low_stock_threshold);
    }

    async fn write(&self, tx: &Transaction<'_>, views: &str, update: bool) -> Result<(), ApplyError> {
        const COLUMNS: &str = "product_id, name, available, reserved, shipped, updated_at, stream_version, last_position, \
             low_stock_threshold";
        const UNNEST: &str = "unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], \
                              $6::timestamptz[], $7::int8[], $8::int8[], $9::int8[])";
        if self.product_id.is_empty() {
            return Ok(());
        }
        let sql = if update {
            format!(
                "UPDATE {views} t SET available = u.available, reserved = u.reserved, shipped = u.shipped, \
                        updated_at = u.updated_at, stream_version = u.stream_version, last_position = u.last_position \
                   FROM {UNNEST} AS u({COLUMNS}) WHERE t.product_id = u.product_id"
            )
        } else {
            format!("INSERT INTO {views} ({COLUMNS}) SELECT * FROM {UNNEST}")
        };
        let changed = tx
            .execute(
                &sql,
                &[
                    &self.product_id,
                    &self.name,
                    &self.available,
                    &self.reserved,
                    &self.shipped,
                    &self.updated_at,
                    &self.stream_version,
                    &self.last_position,
                    &self.low_stock_threshold,
                ],
            )
            .await?;
        if changed == self.product_id.len() as u64 {
            Ok(())
        } else {
            Err(ApplyError::Event(format!("{changed} of {} products written to {views}", self.product_id.len())))
        }
    }
}
