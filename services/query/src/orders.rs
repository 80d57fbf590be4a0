//! OrderQueryService: order views (cached), lists, customer totals, sales
//! analytics, the order as of a time or version, and WatchOrder.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use eventfold_domain::{
    Aggregate, DomainEvent,
    order::{Order, OrderEvent, OrderItem, OrderStatus as DomainStatus},
};
use eventfold_platform::status::invalid;
use eventfold_proto::{
    common::Money,
    orders as order_pb,
    query::{
        CustomerTotals, DailySales, GetCustomerOrdersRequest, GetCustomerOrdersResponse, GetOrderAtRequest,
        GetOrderAtResponse, GetOrderRequest, GetOrderResponse, GetSalesAnalyticsRequest, GetSalesAnalyticsResponse,
        ListOrdersByStatusRequest, ListOrdersByStatusResponse, ListOrdersRequest, ListOrdersResponse, OrderStatus,
        OrderView, ProductSales, StatusCount, WatchOrderRequest, WatchOrderResponse,
        order_query_service_server::OrderQueryService,
    },
};
use eventfold_store::{StreamRead, bigint, check_bigint, from_bigint};
use futures_util::Stream;
use prost::Message;
use tokio_postgres::{Row, types::ToSql};
use tonic::{Code, Request, Response, Status};

use crate::{Active, Kind, Query, cached, cursor, db_status, has_more, money, not_found, page, page_len, require_id};

const ORDERS: &str = "order_views";
const ANALYTICS: &str = "order_analytics";
const COLUMNS: &str = "order_id, customer_id, status, currency, total_minor, items, payment_id, carrier, \
                       tracking_number, cancel_reason, created_at, updated_at, stream_version, last_position";

fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

fn status_name(status: OrderStatus) -> Option<&'static str> {
    Some(match status {
        OrderStatus::Unspecified => return None,
        OrderStatus::Created => "created",
        OrderStatus::Confirmed => "confirmed",
        OrderStatus::Paid => "paid",
        OrderStatus::Shipped => "shipped",
        OrderStatus::Cancelled => "cancelled",
    })
}

fn status_of(name: &str) -> OrderStatus {
    match name {
        "created" => OrderStatus::Created,
        "confirmed" => OrderStatus::Confirmed,
        "paid" => OrderStatus::Paid,
        "shipped" => OrderStatus::Shipped,
        "cancelled" => OrderStatus::Cancelled,
        _ => OrderStatus::Unspecified,
    }
}

fn items(domain: &[OrderItem]) -> Vec<order_pb::OrderItem> {
    domain
        .iter()
        .map(|i| order_pb::OrderItem {
            product_id: i.product_id.clone(),
            quantity: i.quantity,
            unit_price: money(i.unit_price.minor, i.unit_price.currency.as_str()),
        })
        .collect()
}

fn view(row: &Row) -> Result<OrderView, Status> {
    let stored: serde_json::Value = row.get(5);
    let domain: Vec<OrderItem> = serde_json::from_value(stored).map_err(|e| {
        let cause = format!("order {} has unreadable items: {e}", row.get::<_, String>(0));
        eventfold_platform::status::internal(&cause)
    })?;
    let currency: String = row.get(3);
    Ok(OrderView {
        order_id: row.get(0),
        customer_id: row.get(1),
        status: status_of(row.get(2)) as i32,
        items: items(&domain),
        total: money(row.get(4), &currency),
        payment_id: row.get::<_, Option<String>>(6).unwrap_or_default(),
        carrier: row.get::<_, Option<String>>(7).unwrap_or_default(),
        tracking_number: row.get::<_, Option<String>>(8).unwrap_or_default(),
        cancel_reason: row.get::<_, Option<String>>(9).unwrap_or_default(),
        create_time: timestamp(row.get(10)),
        update_time: timestamp(row.get(11)),
        stream_version: from_bigint(row.get(12)),
        last_position: from_bigint(row.get(13)),
    })
}

/// The time of request field `field`, if set: refused unless within the
/// years 0001 to 9999 (PostgreSQL and `SystemTime` arithmetic take those).
fn time_arg(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Status> {
    let Some(t) = t else { return Ok(None) };
    let mut violations = Vec::new();
    match eventfold_platform::input::system_time(t, field, &mut violations) {
        Some(time) if violations.is_empty() => Ok(Some(time)),
        _ => Err(invalid(violations)),
    }
}

/// [`time_arg`] as the bound of a range over stored times: rounded up to a
/// whole microsecond (what is stored; the driver would truncate), so that
/// "at or after" and "before" keep their meaning.
fn bound_arg(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Status> {
    Ok(time_arg(field, t)?.map(eventfold_store::ceil_micros))
}

/// A checked page request of an order list.
struct Page {
    size: i64,
    after: Option<OrderCursor>,
}

impl Page {
    /// Checked before anything waits or reads: a bad size or token is
    /// INVALID_ARGUMENT whatever else the request asks.
    fn of(filter: &OrderFilter, page_size: i32, page_token: &str) -> Result<Self, Status> {
        Ok(Self { size: page::size(page_size)?, after: cursor(&filter.fingerprint(), page_token)? })
    }
}

/// Keyset cursor of order lists: (created_at in µs since the epoch, id).
type OrderCursor = (i64, String);

/// µs since the epoch (negative before it), saturating.
fn micros(t: SystemTime) -> i64 {
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
struct OrderFilter {
    customer_id: Option<String>,
    status: Option<&'static str>,
    from: Option<SystemTime>,
    until: Option<SystemTime>,
}

impl OrderFilter {
    fn fingerprint(&self) -> String {
        format!(
            "orders|{:?}|{:?}|{:?}|{:?}",
            self.customer_id,
            self.status,
            self.from.map(micros),
            self.until.map(micros)
        )
    }
}

impl Query {
    /// The order's view from PostgreSQL.
    pub(crate) async fn load_order(&self, order_id: &str) -> Result<Option<OrderView>, Status> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(&format!("SELECT {COLUMNS} FROM read.order_views WHERE order_id = $1"), &[&order_id])
            .await
            .map_err(db_status)?;
        row.as_ref().map(view).transpose()
    }

    /// The order, from the cache when it can answer.
    pub(crate) async fn get_order(
        &self,
        order_id: &str,
        min_position: u64,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<OrderView, Status> {
        require_id("order_id", order_id)?;
        let load = || self.load_order(order_id);
        cached(self, Kind::Order, order_id, min_position, metadata, |v: &OrderView| v.last_position, load)
            .await?
            .ok_or_else(|| not_found("order", "ORDER_NOT_FOUND", order_id))
    }

    /// Caches the `count` most recently changed orders.
    pub(crate) async fn warm(&self, count: u32) {
        let Some(cache) = &self.cache else { return };
        // The positions follower needs a moment for its first read.
        for _ in 0..50 {
            if self.positions.get(ORDERS).is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let Some(active) = self.positions.get(ORDERS) else { return };
        let rows = match self.conn().await {
            Ok(conn) => conn
                .query(
                    &format!("SELECT {COLUMNS} FROM read.order_views ORDER BY updated_at DESC LIMIT $1"),
                    &[&i64::from(count)],
                )
                .await
                .map_err(db_status),
            Err(status) => Err(status),
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(status) => {
                tracing::warn!(%status, "cache warm-up skipped");
                return;
            }
        };
        let mut warmed: u64 = 0;
        for row in &rows {
            if let Ok(view) = view(row) {
                cache
                    .fill(Kind::Order, active.version, &view.order_id, view.last_position, &view.encode_to_vec())
                    .await;
                warmed = warmed.saturating_add(1);
            }
        }
        tracing::info!(orders = warmed, "cache warmed");
    }

    /// One page of orders matching `filter`, newest first.
    async fn list_orders(&self, filter: &OrderFilter, page: Page) -> Result<(Vec<OrderView>, String), Status> {
        let Page { size, after } = page;
        let fingerprint = filter.fingerprint();
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
            let at = from_micros(at).ok_or_else(|| {
                eventfold_platform::status::invalid_argument([(
                    "page_token".to_owned(),
                    "is not a token this service issued".to_owned(),
                )])
            })?;
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
        let rows = conn.query(&sql, &refs).await.map_err(db_status)?;
        let mut orders = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
        let more = has_more(orders.len(), size);
        orders.truncate(page_len(size));
        let next = match orders.last() {
            Some(last) if more => {
                let at = last.create_time.and_then(|t| SystemTime::try_from(t).ok()).map_or(0, micros);
                page::token(&fingerprint, &(at, last.order_id.clone()))
            }
            _ => String::new(),
        };
        Ok((orders, next))
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct OrderQueries {
    query: Arc<Query>,
}

impl OrderQueries {
    pub(crate) fn new(query: Arc<Query>) -> Self {
        Self { query }
    }
}

/// The order state as of the events folded, as a view.
fn view_at(events: &[eventfold_store::RecordedEvent]) -> Result<Option<OrderView>, Status> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else { return Ok(None) };
    let decoded = events
        .iter()
        .map(|e| {
            OrderEvent::from_data(&e.event_type, e.schema_version, e.data.clone()).map_err(|error| {
                let cause = format!("event {} of {} cannot be read: {error}", e.version, e.stream_id);
                eventfold_platform::status::internal(&cause)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let order = Order::default().fold(&decoded);
    let status = match order.status {
        DomainStatus::New => return Ok(None),
        DomainStatus::Created => OrderStatus::Created,
        DomainStatus::Confirmed => OrderStatus::Confirmed,
        DomainStatus::Paid => OrderStatus::Paid,
        DomainStatus::Shipped => OrderStatus::Shipped,
        DomainStatus::Cancelled => OrderStatus::Cancelled,
    };
    Ok(Some(OrderView {
        order_id: order.id.clone(),
        customer_id: order.customer_id.clone(),
        status: status as i32,
        items: items(&order.items),
        total: order.total.map(|t| Money { minor: t.minor, currency: t.currency.as_str().to_owned() }),
        payment_id: order.payment_id.clone().unwrap_or_default(),
        carrier: order.carrier.clone().unwrap_or_default(),
        tracking_number: order.tracking_number.clone().unwrap_or_default(),
        cancel_reason: order.cancel_reason.clone().unwrap_or_default(),
        create_time: timestamp(first.created_at),
        update_time: timestamp(last.created_at),
        stream_version: last.version,
        last_position: last.global_position,
    }))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OrderQueryService for OrderQueries {
    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let order = self.query.get_order(&r.order_id, r.min_position, &metadata).await?;
        Ok(Response::new(GetOrderResponse { order: Some(order) }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let status = OrderStatus::try_from(r.status).map_err(|_| {
            eventfold_platform::status::invalid_argument([("status".to_owned(), "is not an OrderStatus".to_owned())])
        })?;
        if !r.customer_id.is_empty() {
            require_id("customer_id", &r.customer_id)?;
        }
        let filter = OrderFilter {
            customer_id: (!r.customer_id.is_empty()).then(|| r.customer_id.clone()),
            status: status_name(status),
            from: bound_arg("create_time_start", r.create_time_start)?,
            until: bound_arg("create_time_end", r.create_time_end)?,
        };
        let page = Page::of(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, &metadata).await?;
        let (orders, next_page_token) = self.query.list_orders(&filter, page).await?;
        Ok(Response::new(ListOrdersResponse { orders, next_page_token }))
    }

    async fn get_customer_orders(
        &self,
        request: Request<GetCustomerOrdersRequest>,
    ) -> Result<Response<GetCustomerOrdersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("customer_id", &r.customer_id)?;
        let filter = OrderFilter { customer_id: Some(r.customer_id.clone()), ..OrderFilter::default() };
        let page = Page::of(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, &metadata).await?;
        self.query.ready(ANALYTICS, r.min_position, &metadata).await?;
        let totals = {
            let conn = self.query.conn().await?;
            conn.query(
                "SELECT currency, order_count, cancelled_count, total_spent_minor, last_order_id, last_order_at \
                   FROM read.customer_orders WHERE customer_id = $1 ORDER BY currency",
                &[&r.customer_id],
            )
            .await
            .map_err(db_status)?
            .iter()
            .map(|row| {
                let currency: String = row.get(0);
                CustomerTotals {
                    order_count: row.get(1),
                    cancelled_count: row.get(2),
                    total_spent: money(row.get(3), &currency),
                    last_order_id: row.get(4),
                    last_order_time: timestamp(row.get(5)),
                    currency,
                }
            })
            .collect::<Vec<_>>()
        };
        let (orders, next_page_token) = self.query.list_orders(&filter, page).await?;
        if totals.is_empty() && orders.is_empty() && r.page_token.is_empty() {
            return Err(not_found("customer", "CUSTOMER_NOT_FOUND", &r.customer_id));
        }
        Ok(Response::new(GetCustomerOrdersResponse { totals, orders, next_page_token }))
    }

    async fn list_orders_by_status(
        &self,
        request: Request<ListOrdersByStatusRequest>,
    ) -> Result<Response<ListOrdersByStatusResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let status = OrderStatus::try_from(r.status).ok().and_then(status_name).ok_or_else(|| {
            eventfold_platform::status::invalid_argument([(
                "status".to_owned(),
                "is required: one of ORDER_STATUS_CREATED, _CONFIRMED, _PAID, _SHIPPED, _CANCELLED".to_owned(),
            )])
        })?;
        let filter = OrderFilter {
            customer_id: None,
            status: Some(status),
            from: bound_arg("start_time", r.start_time)?,
            until: bound_arg("end_time", r.end_time)?,
        };
        if let (Some(from), Some(until)) = (filter.from, filter.until)
            && until < from
        {
            return Err(eventfold_platform::status::invalid_argument([(
                "end_time".to_owned(),
                "must not be before start_time".to_owned(),
            )]));
        }
        let page = Page::of(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, &metadata).await?;
        let (orders, next_page_token) = self.query.list_orders(&filter, page).await?;
        Ok(Response::new(ListOrdersByStatusResponse { orders, next_page_token }))
    }

    async fn get_sales_analytics(
        &self,
        request: Request<GetSalesAnalyticsRequest>,
    ) -> Result<Response<GetSalesAnalyticsResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let start = day_number("start_day", &r.start_day)?;
        let end = day_number("end_day", &r.end_day)?;
        let mut violations = Vec::new();
        if end < start {
            violations.push(("end_day".to_owned(), "must not be before start_day".to_owned()));
        } else if end.saturating_sub(start) > 366 {
            violations.push(("end_day".to_owned(), "must be at most 366 days after start_day".to_owned()));
        }
        if !(0..=100).contains(&r.top_products) {
            violations.push(("top_products".to_owned(), "must be between 0 and 100".to_owned()));
        }
        if !violations.is_empty() {
            return Err(eventfold_platform::status::invalid_argument(violations));
        }
        let top = i64::from(if r.top_products == 0 { 10 } else { r.top_products });
        self.query.ready(ANALYTICS, r.min_position, &metadata).await?;
        let conn = self.query.conn().await?;
        let (from, until) = (r.start_day.as_str(), r.end_day.as_str());
        let days = conn
            .query(
                "SELECT day::text, currency, orders_created, orders_cancelled, orders_paid, revenue_minor \
                   FROM read.daily_sales WHERE day BETWEEN $1::text::date AND $2::text::date ORDER BY day, currency",
                &[&from, &until],
            )
            .await
            .map_err(db_status)?
            .iter()
            .map(|row| {
                let currency: String = row.get(1);
                DailySales {
                    day: row.get(0),
                    orders_created: row.get(2),
                    orders_cancelled: row.get(3),
                    orders_paid: row.get(4),
                    revenue: money(row.get(5), &currency),
                    currency,
                }
            })
            .collect();
        let statuses = conn
            .query(
                "SELECT status, sum(orders)::bigint FROM read.daily_status \
                  WHERE day BETWEEN $1::text::date AND $2::text::date GROUP BY status HAVING sum(orders) > 0 \
                  ORDER BY status",
                &[&from, &until],
            )
            .await
            .map_err(db_status)?
            .iter()
            .map(|row| StatusCount { status: status_of(row.get(0)) as i32, orders: row.get(1) })
            .collect();
        let top_products = conn
            .query(
                "SELECT product_id, currency, sum(quantity)::bigint AS q, sum(revenue_minor)::bigint \
                   FROM read.product_sales WHERE day BETWEEN $1::text::date AND $2::text::date \
                  GROUP BY product_id, currency HAVING sum(quantity) > 0 \
                  ORDER BY q DESC, product_id, currency LIMIT $3",
                &[&from, &until, &top],
            )
            .await
            .map_err(db_status)?
            .iter()
            .map(|row| {
                let currency: String = row.get(1);
                ProductSales {
                    product_id: row.get(0),
                    quantity: row.get(2),
                    revenue: money(row.get(3), &currency),
                    currency,
                }
            })
            .collect();
        Ok(Response::new(GetSalesAnalyticsResponse { days, statuses, top_products }))
    }

    async fn get_order_at(&self, request: Request<GetOrderAtRequest>) -> Result<Response<GetOrderAtResponse>, Status> {
        let r = request.into_inner();
        require_id("order_id", &r.order_id)?;
        let time = time_arg("time", r.time)?;
        if let Some(version) = r.version {
            let mut violations = Vec::new();
            check_bigint("version", version, &mut violations);
            if !violations.is_empty() {
                return Err(invalid(violations));
            }
        }
        if time.is_none() && r.version.is_none() {
            return Err(eventfold_platform::status::invalid_argument([(
                "time".to_owned(),
                "one of time or version is required".to_owned(),
            )]));
        }
        let mut read = StreamRead::forwards(format!("order-{}", r.order_id), 10_000);
        // "At" a time includes the events recorded at that instant, and not
        // one a microsecond later.
        read.end_time = time.and_then(eventfold_store::end_at_or_before);
        read.max_version = if time.is_none() { r.version } else { None };
        let slice = match self.query.log.read_stream(read).await {
            Ok(slice) => slice,
            Err(eventfold_store::Error::StreamNotFound(_) | eventfold_store::Error::StreamDeleted(_)) => {
                return Err(not_found("order", "ORDER_NOT_FOUND", &r.order_id));
            }
            // Unavailable and internal failures: a generic answer, the detail logged.
            Err(e) => return Err(eventfold_platform::status::from_store(e)),
        };
        let order = view_at(&slice.events)?.ok_or_else(|| {
            eventfold_platform::status::error_info(
                Code::NotFound,
                format!("order {} did not exist at the time or version asked for", r.order_id),
                "ORDER_NOT_FOUND",
                &[("id", r.order_id.clone())],
            )
        })?;
        Ok(Response::new(GetOrderAtResponse { order: Some(order) }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(&self, request: Request<WatchOrderRequest>) -> Result<Response<WatchStream>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip());
        let r = request.into_inner();
        require_id("order_id", &r.order_id)?;
        let (subscription, start) = self.query.watchers.subscribe(&r.order_id, peer)?;
        if start {
            tokio::spawn(follow_orders(self.query.clone()));
        }
        let stream = subscription.into_stream(|order: Result<OrderView, Status>| {
            let end = order.is_err();
            (order.map(|order| WatchOrderResponse { order: Some(order) }), end)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The one follower of every watched order: when the order views move (or
/// an order comes to be watched), it reads in one statement the watched
/// orders changed since the position it last read at, and hands each
/// changed one to its watchers. Ends when nothing is watched.
async fn follow_orders(query: Arc<Query>) {
    let watchers = query.watchers.clone();
    let mut changes = query.positions.changes();
    // The projection's position when the last read began: rows changed
    // after it have a later `last_position`.
    let mut read_at: Option<Active> = None;
    let mut known: HashSet<String> = HashSet::new();
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut retry = false;
    loop {
        if watchers.stop_if_idle() {
            return;
        }
        let ids = watchers.ids();
        let watched: HashSet<&String> = ids.iter().collect();
        known.retain(|id| watched.contains(id));
        sent.retain(|id, _| watched.contains(id));
        let now = changes.borrow_and_update().get(ORDERS).copied();
        let fresh: Vec<String> = ids.iter().filter(|id| !known.contains(*id)).cloned().collect();
        if retry || now != read_at || !fresh.is_empty() {
            // A new version (a rebuild switched) or a reset: read them all.
            let everything = match (read_at, now) {
                (Some(at), Some(now)) => now.version != at.version || now.position < at.position,
                _ => true,
            };
            let (since, fresh) =
                if everything { (-1, ids.clone()) } else { (read_at.map_or(-1, |a| bigint(a.position)), fresh) };
            match query.changed_orders(&ids, since, &fresh).await {
                Ok(rows) => {
                    read_at = now;
                    known = ids.iter().cloned().collect();
                    // Without positions (not followed yet), poll.
                    retry = now.is_none();
                    for row in &rows {
                        let order_id: String = row.get(0);
                        let order = view(row);
                        if let Ok(order) = &order {
                            if sent.get(&order_id) == Some(&order.last_position) {
                                continue;
                            }
                            sent.insert(order_id.clone(), order.last_position);
                        } else {
                            sent.remove(&order_id);
                        }
                        watchers.update(&order_id, |current| {
                            *current = Some(order);
                            true
                        });
                    }
                }
                // Logged with its error id; watchers wait for the retry.
                Err(_) => retry = true,
            }
        }
        tokio::select! {
            // A follower that is gone disables this branch; the others remain.
            Ok(()) = changes.changed() => {}
            () = watchers.woken() => {}
            () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
}

impl Query {
    /// The rows of the orders of `ids` changed after position `since`, and
    /// those of `fresh` (a subset of `ids`) whatever their position.
    async fn changed_orders(&self, ids: &[String], since: i64, fresh: &[String]) -> Result<Vec<Row>, Status> {
        let conn = self.conn().await?;
        conn.query(
            &format!(
                "SELECT {COLUMNS} FROM read.order_views \
                  WHERE order_id = ANY($1) AND (last_position > $2 OR order_id = ANY($3))"
            ),
            &[&ids, &since, &fresh],
        )
        .await
        .map_err(db_status)
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` day, checked.
pub(crate) fn day_number(field: &str, day: &str) -> Result<i64, Status> {
    let invalid = || {
        eventfold_platform::status::invalid_argument([(field.to_owned(), "must be a day like 2026-11-23".to_owned())])
    };
    let parts: Vec<&str> = day.split('-').collect();
    let [y, m, d] = parts.as_slice() else { return Err(invalid()) };
    // Digits only: `i64::from_str` would take a sign ("+999"), which the
    // database's date cast refuses.
    if y.len() != 4 || m.len() != 2 || d.len() != 2 || !day.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(invalid());
    }
    let (y, m, d): (i64, i64, i64) =
        (y.parse().map_err(|_| invalid())?, m.parse().map_err(|_| invalid())?, d.parse().map_err(|_| invalid())?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(invalid()),
    };
    if !(1..=days_in_month).contains(&d) || y < 1 {
        return Err(invalid());
    }
    days_from_civil(y, m, d).ok_or_else(invalid)
}

/// Days from 1970-01-01 to the civil date `y`-`m`-`d` (proleptic
/// Gregorian); None on overflow (which a year of four digits cannot reach).
fn days_from_civil(y: i64, m: i64, d: i64) -> Option<i64> {
    let (y, m) = if m <= 2 { (y.checked_sub(1)?, m.checked_add(9)?) } else { (y, m.checked_sub(3)?) };
    let era = y.div_euclid(400);
    let yoe = y.checked_sub(era.checked_mul(400)?)?;
    let doy = m.checked_mul(153)?.checked_add(2)?.checked_div(5)?.checked_add(d)?.checked_sub(1)?;
    let doe = yoe.checked_mul(365)?.checked_add(yoe / 4)?.checked_sub(yoe / 100)?.checked_add(doy)?;
    era.checked_mul(146_097)?.checked_add(doe)?.checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_checked_and_counted() {
        assert_eq!(day_number("d", "1970-01-01").unwrap(), 0);
        assert_eq!(day_number("d", "2026-11-23").unwrap() - day_number("d", "2026-01-01").unwrap(), 326);
        assert_eq!(day_number("d", "2024-03-01").unwrap() - day_number("d", "2024-02-28").unwrap(), 2, "leap year");
        for bad in ["2026-02-29", "2026-13-01", "2026-1-01", "yesterday", "", "2026-11-31", "+999-01-01", "2026-+1-01"]
        {
            assert_eq!(day_number("d", bad).unwrap_err().code(), Code::InvalidArgument, "{bad}");
        }
    }
}
