//! The gRPC edge of the query side: the four services, the checks of their
//! requests, records as proto messages, and the one mapping of [`Error`]
//! to a status.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use eventfold_domain::order::{OrderItem, OrderStatus as DomainStatus};
use eventfold_platform::{
    page,
    runtime::CancellationToken,
    server::GrpcServer,
    status::{self, error_info},
    watchers::Watchers,
};
use eventfold_proto::{
    FILE_DESCRIPTOR_SET,
    common::Money,
    orders as order_pb,
    query::{
        AccountStatus, AccountTransaction, AccountView, Activity, CustomerTotals, DailySales, GetAccountRequest,
        GetAccountResponse, GetCustomerOrdersRequest, GetCustomerOrdersResponse, GetInventoryRequest,
        GetInventoryResponse, GetOrderAtRequest, GetOrderAtResponse, GetOrderRequest, GetOrderResponse,
        GetSalesAnalyticsRequest, GetSalesAnalyticsResponse, GetUserActivityRequest, GetUserActivityResponse,
        InventoryView, ListAccountTransactionsRequest, ListAccountTransactionsResponse, ListLowStockRequest,
        ListLowStockResponse, ListOrdersByStatusRequest, ListOrdersByStatusResponse, ListOrdersRequest,
        ListOrdersResponse, OrderStatus, OrderView, ProductSales, Reservation, StatusCount, TransactionKind,
        UserProfile, WatchOrderRequest, WatchOrderResponse,
        account_query_service_server::{AccountQueryService, AccountQueryServiceServer},
        inventory_query_service_server::{InventoryQueryService, InventoryQueryServiceServer},
        order_query_service_server::{OrderQueryService, OrderQueryServiceServer},
        user_query_service_server::{UserQueryService, UserQueryServiceServer},
    },
};
use eventfold_store::{bigint, check_bigint, check_id};
use futures_util::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::{
    Active, Amount, Config, Error, Kind, Query, SERVICE_NAMES,
    accounts::{ACCOUNTS, AccountRecord, TransactionRecord},
    inventory::{INVENTORY, InventoryRecord},
    orders::{ANALYTICS, ORDERS, OrderCursor, OrderFilter, OrderRecord, micros},
    users::{ActivityRecord, USERS, UserRecord},
};

/// How often the health of the query services is probed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The four query services, for a process without the read side
/// (`eventfold dev` on the file-system log): every call answers
/// FAILED_PRECONDITION with `message` (what to install), reason
/// `READ_SIDE_UNAVAILABLE`.
pub fn host_unavailable(server: &mut GrpcServer, message: &str) {
    use eventfold_platform::server::ServiceName;
    macro_rules! refusing {
        ($($marker:ident => $server:ty),* $(,)?) => {$(
            struct $marker;
            impl ServiceName for $marker {
                const NAME: &'static str = <$server as tonic::server::NamedService>::NAME;
            }
            server.add_refusing::<$marker>(
                FILE_DESCRIPTOR_SET,
                error_info(tonic::Code::FailedPrecondition, message, "READ_SIDE_UNAVAILABLE", &[]),
            );
        )*};
    }
    refusing!(
        Orders => OrderQueryServiceServer<OrderQueries>,
        Inventory => InventoryQueryServiceServer<InventoryQueries>,
        Accounts => AccountQueryServiceServer<AccountQueries>,
        Users => UserQueryServiceServer<UserQueries>,
    );
}

/// Hosts the four query services on `server`, their health following the
/// read database (and the lag of their projections, when bounded). `WatchOrder` streams end when `token` is cancelled.
pub fn host(server: &mut GrpcServer, config: &Config, query: Arc<Query>, token: CancellationToken) {
    let watchers = Watchers::new(usize::try_from(config.max_watchers_per_peer).unwrap_or(usize::MAX));
    let orders = OrderQueries { query: query.clone(), watchers, token };
    server
        .add_service(FILE_DESCRIPTOR_SET, OrderQueryServiceServer::new(orders))
        .add_service(FILE_DESCRIPTOR_SET, InventoryQueryServiceServer::new(InventoryQueries { query: query.clone() }))
        .add_service(FILE_DESCRIPTOR_SET, AccountQueryServiceServer::new(AccountQueries { query: query.clone() }))
        .add_service(FILE_DESCRIPTOR_SET, UserQueryServiceServer::new(UserQueries { query: query.clone() }));
    // Each service follows the read database and, with `max_lag_events`,
    // how far behind the projections it reads are.
    let interval = if config.max_lag_events > 0 { LAG_INTERVAL } else { HEALTH_INTERVAL };
    for (service, projections) in SERVICE_NAMES.iter().zip(PROJECTIONS) {
        let (query, max_lag) = (query.clone(), config.max_lag_events);
        server.health_check(&[service], interval, move || {
            let query = query.clone();
            async move { query.check_serving(projections, max_lag).await }
        });
    }
}

/// The projections each of [`SERVICE_NAMES`] reads, in its order.
const PROJECTIONS: [&[&str]; 4] = [&[ORDERS, ANALYTICS], &[INVENTORY], &[ACCOUNTS], &[USERS]];

/// How often the lag of the projections is probed when it is bounded.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

// --- errors --------------------------------------------------------------------------

/// What an UNAVAILABLE answer says is unavailable when the read database
/// cannot be reached (see [`status::unavailable`]).
const READ_DATABASE: &str = "the read model's database";

/// The one mapping of the query side's errors to statuses (AIP-193): the
/// text of a database, cache or store failure goes to the log under an
/// error id, the answer carries only a generic message and that id.
impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Unavailable(detail) => status::unavailable(READ_DATABASE, &detail),
            Error::NotReady(detail) => {
                // Its own reason (not the shared STORAGE_UNAVAILABLE): the
                // database answers, the projection has not created its
                // table yet.
                let id = uuid::Uuid::now_v7().to_string();
                tracing::warn!(error_id = %id, error = %detail, "a read model is not built yet");
                error_info(
                    Code::Unavailable,
                    format!("a read model is not built yet, retry later (error id {id})"),
                    "READ_MODEL_NOT_READY",
                    &[("error_id", id)],
                )
            }
            Error::ProjectionBehind { ref projection, position, min_position, .. } => error_info(
                Code::Unavailable,
                error.to_string(),
                "PROJECTION_BEHIND",
                &[
                    ("projection", projection.clone()),
                    ("position", position.to_string()),
                    ("min_position", min_position.to_string()),
                ],
            ),
            Error::BeyondHead { min_position, head } => error_info(
                Code::OutOfRange,
                error.to_string(),
                "MIN_POSITION_BEYOND_HEAD",
                &[("min_position", min_position.to_string()), ("head", head.to_string())],
            ),
            Error::InvalidArgument(violations) => status::invalid(violations),
            Error::NotFound { reason, ref id, .. } => {
                error_info(Code::NotFound, error.to_string(), reason, &[("id", id.clone())])
            }
            Error::OrderNotFoundAt { ref id } => {
                error_info(Code::NotFound, error.to_string(), "ORDER_NOT_FOUND", &[("id", id.clone())])
            }
            Error::Store(error) => status::from_store(error),
            Error::Internal(detail) => status::internal(&detail),
        }
    }
}

fn not_found(what: &'static str, reason: &'static str, id: &str) -> Error {
    Error::NotFound { what, reason, id: id.to_owned() }
}

// --- requests ------------------------------------------------------------------------

/// The `grpc-timeout` of a call, if it has one.
fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `INVALID_ARGUMENT` unless `value` is a usable id: 1 to 128 bytes of
/// visible ASCII.
fn require_id(field: &str, value: &str) -> Result<(), Error> {
    let mut violations = Vec::new();
    check_id(field, value, &mut violations);
    Error::check(violations)
}

/// The time of request field `field`, if set: refused unless within the
/// years 0001 to 9999 (PostgreSQL and `SystemTime` arithmetic take those).
fn time_arg(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Error> {
    let Some(t) = t else { return Ok(None) };
    let mut violations = Vec::new();
    match eventfold_platform::input::system_time(t, field, &mut violations) {
        Some(time) if violations.is_empty() => Ok(Some(time)),
        _ => Err(Error::InvalidArgument(violations)),
    }
}

/// [`time_arg`] as the bound of a range over stored times: rounded up to a
/// whole microsecond (what is stored; the driver would truncate), so that
/// "at or after" and "before" keep their meaning.
fn bound_arg(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Error> {
    Ok(time_arg(field, t)?.map(eventfold_store::ceil_micros))
}

/// The longest page token accepted: tokens this service issues are far
/// shorter, longer ones are not worth decoding.
const MAX_PAGE_TOKEN_BYTES: usize = 1024;

/// [`page::cursor`] of a token of bounded length.
fn cursor<C: serde::de::DeserializeOwned>(filters: &str, token: &str) -> Result<Option<C>, Status> {
    if token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(Error::invalid("page_token", format!("must be at most {MAX_PAGE_TOKEN_BYTES} bytes")).into());
    }
    page::cursor(filters, token)
}

/// The size and cursor of a page of an order list. Checked before anything
/// waits or reads: a bad size or token is INVALID_ARGUMENT whatever else
/// the request asks.
fn order_page(filter: &OrderFilter, page_size: i32, page_token: &str) -> Result<(i64, Option<OrderCursor>), Status> {
    Ok((page::size(page_size)?, cursor(&filter.fingerprint(), page_token)?))
}

/// The stored name of a status filter (none for UNSPECIFIED).
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

/// Days since 1970-01-01 of a `YYYY-MM-DD` day, checked.
fn day_number(field: &str, day: &str) -> Result<i64, Error> {
    let invalid = || Error::invalid(field, "must be a day like 2026-11-23");
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

// --- records as messages -------------------------------------------------------------

fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

fn money(amount: &Amount) -> Option<Money> {
    Some(Money { minor: amount.minor, currency: amount.currency.clone() })
}

fn order_status(status: DomainStatus) -> OrderStatus {
    match status {
        DomainStatus::New => OrderStatus::Unspecified,
        DomainStatus::Created => OrderStatus::Created,
        DomainStatus::Confirmed => OrderStatus::Confirmed,
        DomainStatus::Paid => OrderStatus::Paid,
        DomainStatus::Shipped => OrderStatus::Shipped,
        DomainStatus::Cancelled => OrderStatus::Cancelled,
    }
}

fn items(domain: &[OrderItem]) -> Vec<order_pb::OrderItem> {
    domain
        .iter()
        .map(|i| order_pb::OrderItem {
            product_id: i.product_id.clone(),
            quantity: i.quantity,
            unit_price: Some(Money { minor: i.unit_price.minor, currency: i.unit_price.currency.as_str().to_owned() }),
        })
        .collect()
}

/// An order as its message (also what the cache holds).
pub(crate) fn order_view(r: &OrderRecord) -> OrderView {
    OrderView {
        order_id: r.order_id.clone(),
        customer_id: r.customer_id.clone(),
        status: order_status(r.status) as i32,
        items: items(&r.items),
        total: r.total.as_ref().and_then(money),
        payment_id: r.payment_id.clone().unwrap_or_default(),
        carrier: r.carrier.clone().unwrap_or_default(),
        tracking_number: r.tracking_number.clone().unwrap_or_default(),
        cancel_reason: r.cancel_reason.clone().unwrap_or_default(),
        create_time: timestamp(r.created_at),
        update_time: timestamp(r.updated_at),
        stream_version: r.stream_version,
        last_position: r.last_position,
    }
}

fn inventory_view(r: InventoryRecord) -> InventoryView {
    InventoryView {
        product_id: r.product_id,
        name: r.name,
        available: r.available,
        reserved: r.reserved,
        shipped: r.shipped,
        low_stock: r.low_stock,
        low_stock_threshold: r.low_stock_threshold,
        reservations: r
            .reservations
            .into_iter()
            .map(|r| Reservation { order_id: r.order_id, quantity: r.quantity, reserve_time: timestamp(r.reserved_at) })
            .collect(),
        update_time: timestamp(r.updated_at),
        stream_version: r.stream_version,
        last_position: r.last_position,
    }
}

fn account_view(r: AccountRecord) -> AccountView {
    AccountView {
        account_id: r.account_id,
        owner_id: r.owner_id,
        balance: money(&r.balance),
        status: match r.status.as_str() {
            "open" => AccountStatus::Open,
            "closed" => AccountStatus::Closed,
            _ => AccountStatus::Unspecified,
        } as i32,
        open_time: timestamp(r.opened_at),
        update_time: timestamp(r.updated_at),
        stream_version: r.stream_version,
        last_position: r.last_position,
    }
}

fn transaction(r: TransactionRecord) -> AccountTransaction {
    AccountTransaction {
        stream_version: r.stream_version,
        kind: match r.kind.as_str() {
            "deposit" => TransactionKind::Deposit,
            "withdrawal" => TransactionKind::Withdrawal,
            "transfer_sent" => TransactionKind::TransferSent,
            "transfer_received" => TransactionKind::TransferReceived,
            "transfer_refunded" => TransactionKind::TransferRefunded,
            _ => TransactionKind::Unspecified,
        } as i32,
        transaction_id: r.transaction_id,
        counterparty_account_id: r.counterparty_account_id.unwrap_or_default(),
        amount: money(&r.amount),
        balance: money(&r.balance),
        reason: r.reason.unwrap_or_default(),
        time: timestamp(r.occurred_at),
        global_position: r.global_position,
    }
}

fn user_profile(r: UserRecord) -> UserProfile {
    UserProfile {
        user_id: r.user_id,
        email: r.email.into_inner(),
        display_name: r.display_name,
        register_time: timestamp(r.registered_at),
        logins: r.logins,
        actions: r.actions,
        last_seen_time: timestamp(r.last_seen_at),
    }
}

fn activity(r: ActivityRecord) -> Activity {
    Activity {
        global_position: r.global_position,
        kind: r.kind,
        detail: r.detail.into_inner(),
        time: timestamp(r.occurred_at),
    }
}

// --- OrderQueryService ---------------------------------------------------------------

/// What the watchers of an order see: its view, or why it cannot be read
/// (which ends their streams).
type OrderWatchers = Watchers<Result<OrderView, Status>>;

#[derive(Debug, Clone)]
struct OrderQueries {
    query: Arc<Query>,
    watchers: Arc<OrderWatchers>,
    /// Ends the WatchOrder streams and their follower.
    token: CancellationToken,
}

impl OrderQueries {
    /// One page of orders matching `filter` and the token of the next.
    async fn list(
        &self,
        filter: &OrderFilter,
        (size, after): (i64, Option<OrderCursor>),
    ) -> Result<(Vec<OrderView>, String), Error> {
        let (orders, more) = self.query.list_orders(filter, size, after).await?;
        let next = match orders.last() {
            Some(last) if more => page::token(&filter.fingerprint(), &(micros(last.created_at), last.order_id.clone())),
            _ => String::new(),
        };
        Ok((orders.iter().map(order_view).collect(), next))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OrderQueryService for OrderQueries {
    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("order_id", &r.order_id)?;
        let load = || async { Ok(self.query.load_order(&r.order_id).await?.as_ref().map(order_view)) };
        let order = self
            .query
            .cached(
                Kind::Order,
                &r.order_id,
                r.min_position,
                deadline(&metadata),
                |v: &OrderView| v.last_position,
                load,
            )
            .await?
            .ok_or_else(|| not_found("order", "ORDER_NOT_FOUND", &r.order_id))?;
        Ok(Response::new(GetOrderResponse { order: Some(order) }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let status = OrderStatus::try_from(r.status).map_err(|_| Error::invalid("status", "is not an OrderStatus"))?;
        if !r.customer_id.is_empty() {
            require_id("customer_id", &r.customer_id)?;
        }
        let filter = OrderFilter {
            customer_id: (!r.customer_id.is_empty()).then(|| r.customer_id.clone()),
            status: status_name(status),
            from: bound_arg("create_time_start", r.create_time_start)?,
            until: bound_arg("create_time_end", r.create_time_end)?,
        };
        let page = order_page(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, deadline(&metadata)).await?;
        let (orders, next_page_token) = self.list(&filter, page).await?;
        Ok(Response::new(ListOrdersResponse { orders, next_page_token }))
    }

    async fn get_customer_orders(
        &self,
        request: Request<GetCustomerOrdersRequest>,
    ) -> Result<Response<GetCustomerOrdersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("customer_id", &r.customer_id)?;
        let filter = OrderFilter { customer_id: Some(r.customer_id.clone()), ..OrderFilter::default() };
        let page = order_page(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, deadline(&metadata)).await?;
        self.query.ready(ANALYTICS, r.min_position, deadline(&metadata)).await?;
        let totals: Vec<CustomerTotals> = self
            .query
            .customer_totals(&r.customer_id)
            .await?
            .into_iter()
            .map(|t| CustomerTotals {
                currency: t.total_spent.currency.clone(),
                order_count: t.order_count,
                cancelled_count: t.cancelled_count,
                total_spent: money(&t.total_spent),
                last_order_id: t.last_order_id,
                last_order_time: timestamp(t.last_order_at),
            })
            .collect();
        let (orders, next_page_token) = self.list(&filter, page).await?;
        if totals.is_empty() && orders.is_empty() && r.page_token.is_empty() {
            return Err(not_found("customer", "CUSTOMER_NOT_FOUND", &r.customer_id).into());
        }
        Ok(Response::new(GetCustomerOrdersResponse { totals, orders, next_page_token }))
    }

    async fn list_orders_by_status(
        &self,
        request: Request<ListOrdersByStatusRequest>,
    ) -> Result<Response<ListOrdersByStatusResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let status = OrderStatus::try_from(r.status).ok().and_then(status_name).ok_or_else(|| {
            Error::invalid(
                "status",
                "is required: one of ORDER_STATUS_CREATED, _CONFIRMED, _PAID, _SHIPPED, _CANCELLED",
            )
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
            return Err(Error::invalid("end_time", "must not be before start_time").into());
        }
        let page = order_page(&filter, r.page_size, &r.page_token)?;
        self.query.ready(ORDERS, r.min_position, deadline(&metadata)).await?;
        let (orders, next_page_token) = self.list(&filter, page).await?;
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
            violations.push(eventfold_store::FieldViolation::new("end_day", "must not be before start_day"));
        } else if end.saturating_sub(start) > 366 {
            violations
                .push(eventfold_store::FieldViolation::new("end_day", "must be at most 366 days after start_day"));
        }
        if !(0..=100).contains(&r.top_products) {
            violations.push(eventfold_store::FieldViolation::new("top_products", "must be between 0 and 100"));
        }
        Error::check(violations)?;
        let top = i64::from(if r.top_products == 0 { 10 } else { r.top_products });
        self.query.ready(ANALYTICS, r.min_position, deadline(&metadata)).await?;
        let sales = self.query.sales(&r.start_day, &r.end_day, top).await?;
        Ok(Response::new(GetSalesAnalyticsResponse {
            days: sales
                .days
                .into_iter()
                .map(|d| DailySales {
                    day: d.day,
                    currency: d.revenue.currency.clone(),
                    orders_created: d.orders_created,
                    orders_cancelled: d.orders_cancelled,
                    orders_paid: d.orders_paid,
                    revenue: money(&d.revenue),
                })
                .collect(),
            statuses: sales
                .statuses
                .into_iter()
                .map(|s| StatusCount { status: order_status(s.status) as i32, orders: s.orders })
                .collect(),
            top_products: sales
                .top_products
                .into_iter()
                .map(|p| ProductSales {
                    product_id: p.product_id,
                    currency: p.revenue.currency.clone(),
                    quantity: p.quantity,
                    revenue: money(&p.revenue),
                })
                .collect(),
        }))
    }

    async fn get_order_at(&self, request: Request<GetOrderAtRequest>) -> Result<Response<GetOrderAtResponse>, Status> {
        let r = request.into_inner();
        require_id("order_id", &r.order_id)?;
        let time = time_arg("time", r.time)?;
        if let Some(version) = r.version {
            let mut violations = Vec::new();
            check_bigint("version", version, &mut violations);
            Error::check(violations)?;
        }
        if time.is_none() && r.version.is_none() {
            return Err(Error::invalid("time", "one of time or version is required").into());
        }
        let order = self
            .query
            .order_at(&r.order_id, time, r.version)
            .await?
            .ok_or_else(|| Error::OrderNotFoundAt { id: r.order_id.clone() })?;
        Ok(Response::new(GetOrderAtResponse { order: Some(order_view(&order)) }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(&self, request: Request<WatchOrderRequest>) -> Result<Response<WatchStream>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip());
        let r = request.into_inner();
        require_id("order_id", &r.order_id)?;
        let (subscription, start) = self.watchers.subscribe(&r.order_id, peer)?;
        if start {
            tokio::spawn(follow_orders(self.query.clone(), self.watchers.clone(), self.token.clone()));
        }
        let stream = subscription.into_stream(|order: Result<OrderView, Status>| {
            let end = order.is_err();
            (order.map(|order| WatchOrderResponse { order: Some(order) }), end)
        });
        Ok(Response::new(Box::pin(stream.take_until(self.token.clone().cancelled_owned()))))
    }
}

/// The one follower of every watched order: when the order views move (or
/// an order comes to be watched), it reads in one statement the watched
/// orders changed since the position it last read at, and hands each
/// changed one to its watchers. Ends when nothing is watched, or when
/// `token` is cancelled.
async fn follow_orders(query: Arc<Query>, watchers: Arc<OrderWatchers>, token: CancellationToken) {
    let mut changes = query.positions().changes();
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
                Ok(orders) => {
                    read_at = now;
                    known = ids.iter().cloned().collect();
                    // Without positions (not followed yet), poll.
                    retry = now.is_none();
                    for (order_id, order) in orders {
                        let order = order.map(|o| order_view(&o)).map_err(Status::from);
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
                // Watchers wait for the retry.
                Err(error) => {
                    tracing::warn!(%error, "WatchOrder: the watched orders cannot be read; retrying");
                    retry = true;
                }
            }
        }
        tokio::select! {
            // A follower that is gone disables this branch; the others remain.
            Ok(()) = changes.changed() => {}
            () = watchers.woken() => {}
            () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            () = token.cancelled() => return,
        }
    }
}

// --- InventoryQueryService -----------------------------------------------------------

#[derive(Debug, Clone)]
struct InventoryQueries {
    query: Arc<Query>,
}

#[tonic::async_trait]
impl InventoryQueryService for InventoryQueries {
    async fn get_inventory(
        &self,
        request: Request<GetInventoryRequest>,
    ) -> Result<Response<GetInventoryResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("product_id", &r.product_id)?;
        let load = || async { Ok(self.query.inventory(&r.product_id).await?.map(inventory_view)) };
        let view = self
            .query
            .cached(Kind::Inventory, &r.product_id, r.min_position, deadline(&metadata), |v| v.last_position, load)
            .await?
            .ok_or_else(|| not_found("product", "PRODUCT_NOT_FOUND", &r.product_id))?;
        Ok(Response::new(GetInventoryResponse { inventory: Some(view) }))
    }

    async fn list_low_stock(
        &self,
        request: Request<ListLowStockRequest>,
    ) -> Result<Response<ListLowStockResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let size = page::size(r.page_size)?;
        let after: Option<String> = cursor("low_stock", &r.page_token)?;
        self.query.ready(INVENTORY, r.min_position, deadline(&metadata)).await?;
        let (products, more) = self.query.low_stock(size, &after.unwrap_or_default()).await?;
        let next_page_token = match products.last() {
            Some(last) if more => page::token("low_stock", &last.product_id),
            _ => String::new(),
        };
        let products = products.into_iter().map(inventory_view).collect();
        Ok(Response::new(ListLowStockResponse { products, next_page_token }))
    }
}

// --- AccountQueryService -------------------------------------------------------------

#[derive(Debug, Clone)]
struct AccountQueries {
    query: Arc<Query>,
}

#[tonic::async_trait]
impl AccountQueryService for AccountQueries {
    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("account_id", &r.account_id)?;
        let load = || async { Ok(self.query.account(&r.account_id).await?.map(account_view)) };
        let account = self
            .query
            .cached(Kind::Account, &r.account_id, r.min_position, deadline(&metadata), |v| v.last_position, load)
            .await?
            .ok_or_else(|| not_found("account", "ACCOUNT_NOT_FOUND", &r.account_id))?;
        Ok(Response::new(GetAccountResponse { account: Some(account) }))
    }

    async fn list_account_transactions(
        &self,
        request: Request<ListAccountTransactionsRequest>,
    ) -> Result<Response<ListAccountTransactionsResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("account_id", &r.account_id)?;
        let size = page::size(r.page_size)?;
        let filters = format!("transactions|{}", r.account_id);
        let before: Option<i64> = cursor(&filters, &r.page_token)?;
        self.query.ready(ACCOUNTS, r.min_position, deadline(&metadata)).await?;
        let (transactions, more) = self
            .query
            .transactions(&r.account_id, size, before)
            .await?
            .ok_or_else(|| not_found("account", "ACCOUNT_NOT_FOUND", &r.account_id))?;
        let next_page_token = match transactions.last() {
            Some(last) if more => page::token(&filters, &bigint(last.stream_version)),
            _ => String::new(),
        };
        let transactions = transactions.into_iter().map(transaction).collect();
        Ok(Response::new(ListAccountTransactionsResponse { transactions, next_page_token }))
    }
}

// --- UserQueryService ----------------------------------------------------------------

#[derive(Debug, Clone)]
struct UserQueries {
    query: Arc<Query>,
}

#[tonic::async_trait]
impl UserQueryService for UserQueries {
    async fn get_user_activity(
        &self,
        request: Request<GetUserActivityRequest>,
    ) -> Result<Response<GetUserActivityResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        require_id("user_id", &r.user_id)?;
        let size = page::size(r.page_size)?;
        let filters = format!("activity|{}", r.user_id);
        let before: Option<i64> = cursor(&filters, &r.page_token)?;
        self.query.ready(USERS, r.min_position, deadline(&metadata)).await?;
        let (user, activities, more) = self.query.user_activity(&r.user_id, size, before).await?;
        if user.is_none() && activities.is_empty() && before.is_none() {
            return Err(not_found("user", "USER_NOT_FOUND", &r.user_id).into());
        }
        let next_page_token = match activities.last() {
            Some(last) if more => page::token(&filters, &bigint(last.global_position)),
            _ => String::new(),
        };
        Ok(Response::new(GetUserActivityResponse {
            user: user.map(user_profile),
            activities: activities.into_iter().map(activity).collect(),
            next_page_token,
        }))
    }
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
            assert_eq!(Status::from(day_number("d", bad).unwrap_err()).code(), Code::InvalidArgument, "{bad}");
        }
    }
}
