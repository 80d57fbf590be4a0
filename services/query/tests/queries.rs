//! The query side end to end on real PostgreSQL and Redis: the event store,
//! the command and the query services on one server (as `eventfold dev`
//! serves them), every projection running with the cache invalidator.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    account::{AccountCommand, DepositMoney, OpenAccount, WithdrawMoney},
    inventory::{InventoryCommand, RegisterProduct, ReplenishStock, ReserveStock},
    order::{CancelOrder, OrderCommand},
    user::{RecordLogin, RegisterUser, UserCommand},
};
use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_projector::{Projector, ProjectorOptions};
use eventfold_proto::{
    common::Money as MoneyPb,
    orders as orders_pb,
    query::{
        self as query_pb, OrderStatus, account_query_service_client::AccountQueryServiceClient,
        inventory_query_service_client::InventoryQueryServiceClient,
        order_query_service_client::OrderQueryServiceClient, user_query_service_client::UserQueryServiceClient,
    },
};
use eventfold_query::{BreakerState, CacheConfig, Query};
use eventfold_store::{Database, PostgresConfig, PostgresEventLog};
use eventfold_tests::redis::OwnRedis;
use tokio::net::TcpListener;
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;
use tower::ServiceExt;

use crate::common::{Stack, day_string, options};

fn cache_config(url: String, prefix: &str) -> CacheConfig {
    CacheConfig {
        url: Some(url),
        key_prefix: prefix.to_owned(),
        // Generous for a loaded test machine; the breaker still opens on
        // errors at once.
        timeout_ms: 500,
        slow_ms: 400,
        breaker_cool_down_ms: 300,
        ..CacheConfig::default()
    }
}

async fn stack(cache: Option<CacheConfig>) -> Stack {
    Stack::start(&eventfold_query::Config { cache: cache.unwrap_or_default(), ..eventfold_query::Config::default() })
        .await
}

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

fn create_request(order_id: &str, customer_id: &str, price: i64) -> orders_pb::CreateOrderRequest {
    orders_pb::CreateOrderRequest {
        request_id: format!("create-{order_id}"),
        order_id: order_id.to_owned(),
        customer_id: customer_id.to_owned(),
        currency: "EUR".into(),
        items: vec![orders_pb::OrderItem {
            product_id: "sku-1".into(),
            quantity: 2,
            unit_price: Some(MoneyPb { minor: price, currency: "EUR".into() }),
        }],
        payment_token: String::new(),
        carrier: String::new(),
    }
}

fn get(order_id: &str, min_position: u64) -> query_pb::GetOrderRequest {
    query_pb::GetOrderRequest { order_id: order_id.to_owned(), min_position }
}

impl Stack {
    async fn create(&self, order_id: &str, customer_id: &str, price: i64) -> u64 {
        let answer = self.orders.clone().create_order(create_request(order_id, customer_id, price)).await.unwrap();
        answer.into_inner().result.unwrap().global_position
    }

    async fn confirm(&self, order_id: &str) -> u64 {
        let request =
            orders_pb::ConfirmOrderRequest { request_id: format!("confirm-{order_id}"), order_id: order_id.to_owned() };
        self.orders.clone().confirm_order(request).await.unwrap().into_inner().result.unwrap().global_position
    }

    /// Waits until every projection has applied the whole log, and the
    /// invalidator has delivered what they observed.
    async fn settle(&self) {
        self.projected().await;
        if let Some(invalidator) = &self.invalidator {
            for _ in 0..300 {
                if invalidator.pending() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    async fn send(&self, command: Command) {
        let bus = eventfold_command::bus(self.log.clone(), eventfold_command::Config::default().bus_options());
        bus.oneshot(Envelope::new(command, test_meta())).await.expect("command");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_answer_position_makes_the_next_query_see_the_write_with_and_without_the_cache() {
    let redis = OwnRedis::start();
    for cache in [None, Some(cache_config(redis.url(), "ryw:"))] {
        let cached = cache.is_some();
        let stack = stack(cache).await;
        let mut queries = stack.queries.clone();
        for n in 0..25 {
            let id = format!("o-{n}");
            let position = stack.create(&id, "c-1", 100 + n).await;
            let order = queries.get_order(get(&id, position)).await.unwrap().into_inner().order.unwrap();
            assert_eq!(
                (order.order_id.as_str(), order.status()),
                (id.as_str(), OrderStatus::Created),
                "cached: {cached}"
            );
            assert_eq!(order.total.unwrap().minor, 2 * (100 + n));
            assert!(order.last_position >= position);
            // Cached now (if there is a cache); the next write must not be
            // hidden by it.
            queries.get_order(get(&id, 0)).await.unwrap();
            let position = stack.confirm(&id).await;
            let order = queries.get_order(get(&id, position)).await.unwrap().into_inner().order.unwrap();
            assert_eq!(order.status(), OrderStatus::Confirmed, "{id}, cached: {cached}");
        }
        if let Some(cache) = stack.query.cache() {
            assert!(cache.stats().hits > 0, "the cache answered some queries: {:?}", cache.stats());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_not_reached_in_time_answers_unavailable_with_the_current_position() {
    let stack = stack(None).await;
    let position = stack.create("o-1", "c-1", 100).await;
    stack.settle().await;
    // A position past the log's end: refused at once, no wait.
    let started = Instant::now();
    let status = stack.queries.clone().get_order(get("o-1", position + 1_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "no wait for what no write answered");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "MIN_POSITION_BEYOND_HEAD");
    assert_eq!(info.metadata["head"], position.to_string());

    // A write the projectors have not applied (they are stopped): the wait
    // ends with the call's deadline.
    stack.stop_projectors.cancel();
    let behind = stack.create("o-2", "c-1", 100).await;
    let mut request = Request::new(get("o-2", behind));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = stack.queries.clone().get_order(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "the call deadline bounds the wait");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PROJECTION_BEHIND");
    assert_eq!(info.metadata["projection"], "order_views");
    assert_eq!(info.metadata["position"], position.to_string());
    assert_eq!(info.metadata["min_position"], behind.to_string());

    let status = stack.queries.clone().get_order(get("nope", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.get_details_error_info().unwrap().reason, "ORDER_NOT_FOUND");
    let status = stack.queries.clone().get_order(get("", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_answers_its_queries() {
    let stack = stack(None).await;
    // Orders: 23 of three customers; every third cancelled.
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in 0..23 {
        let (id, customer) = (format!("o-{n:02}"), format!("c-{}", n % 3));
        stack.create(&id, &customer, 100).await;
        if n % 3 == 0 {
            let cancel = CancelOrder { reason: "changed mind".into() };
            stack.send(Command::Order { order_id: id.clone(), command: OrderCommand::from(cancel) }).await;
        }
        expected.entry(customer).or_default().push(id);
    }
    // Stock, accounts and a user.
    let product = |command: InventoryCommand| Command::Inventory { product_id: "sku-low".into(), command };
    stack.send(product(RegisterProduct { product_id: "sku-low".into(), name: "Low".into() }.into())).await;
    stack.send(product(ReplenishStock { quantity: 12 }.into())).await;
    stack.send(product(ReserveStock { order_id: "o-00".into(), quantity: 5 }.into())).await;
    let account = |command: AccountCommand| Command::Account { account_id: "a-1".into(), command };
    stack.send(account(OpenAccount { account_id: "a-1".into(), owner_id: "u-1".into(), currency: eur() }.into())).await;
    for (n, amount) in [500, 700].into_iter().enumerate() {
        let deposit = DepositMoney { transaction_id: format!("t-{n}"), amount: Money::new(amount, eur()) };
        stack.send(account(deposit.into())).await;
    }
    stack.send(account(WithdrawMoney { transaction_id: "t-9".into(), amount: Money::new(200, eur()) }.into())).await;
    let user = |command: UserCommand| Command::User { user_id: "c-1".into(), command };
    stack
        .send(user(
            RegisterUser { user_id: "c-1".into(), email: "c1@example.com".into(), display_name: "C One".into() }.into(),
        ))
        .await;
    stack.send(user(RecordLogin { source: "web".into() }.into())).await;
    stack.settle().await;

    // ListOrders: a customer's orders, 4 per page, newest first.
    let mut queries = stack.queries.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request = query_pb::ListOrdersRequest {
            page_size: 4,
            page_token: token.clone(),
            customer_id: "c-1".into(),
            ..Default::default()
        };
        let page = queries.list_orders(request).await.unwrap().into_inner();
        assert!(page.orders.len() <= 4);
        seen.extend(page.orders.iter().map(|o| o.order_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = expected["c-1"].clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "every order of c-1 once, newest first");
    // A token with other filters is refused.
    let first = queries
        .list_orders(query_pb::ListOrdersRequest { page_size: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let other = query_pb::ListOrdersRequest {
        page_size: 2,
        page_token: first.next_page_token,
        customer_id: "c-2".into(),
        ..Default::default()
    };
    assert_eq!(queries.list_orders(other).await.unwrap_err().code(), Code::InvalidArgument);

    // By status, and the customer's totals.
    let cancelled = queries
        .list_orders_by_status(query_pb::ListOrdersByStatusRequest {
            status: OrderStatus::Cancelled as i32,
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.orders.len(), 8, "o-00, o-03, …, o-21");
    assert!(cancelled.orders.iter().all(|o| o.status() == OrderStatus::Cancelled && o.cancel_reason == "changed mind"));
    let unspecified = query_pb::ListOrdersByStatusRequest::default();
    assert_eq!(queries.list_orders_by_status(unspecified).await.unwrap_err().code(), Code::InvalidArgument);
    let customer = queries
        .get_customer_orders(query_pb::GetCustomerOrdersRequest { customer_id: "c-0".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(customer.orders.len(), expected["c-0"].len());
    let totals = &customer.totals[0];
    assert_eq!((totals.currency.as_str(), totals.order_count), ("EUR", expected["c-0"].len() as i64));
    assert_eq!(totals.cancelled_count, expected["c-0"].len() as i64, "every order of c-0 (n % 3 == 0) was cancelled");

    // Sales of today (UTC).
    let today = {
        let days = SystemTimeDays::now();
        days.to_string()
    };
    let sales = queries
        .get_sales_analytics(query_pb::GetSalesAnalyticsRequest {
            start_day: today.clone(),
            end_day: today.clone(),
            top_products: 5,
            min_position: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sales.days.len(), 1, "{sales:?}");
    assert_eq!((sales.days[0].orders_created, sales.days[0].orders_cancelled), (23, 8));
    let per_status: i64 = sales.statuses.iter().map(|s| s.orders).sum();
    assert_eq!(per_status, 23);
    assert_eq!(sales.top_products.len(), 1);
    assert_eq!(sales.top_products[0].quantity, 2 * 15, "the 15 orders not cancelled, 2 each");
    let backwards = query_pb::GetSalesAnalyticsRequest {
        start_day: today.clone(),
        end_day: "2000-01-01".into(),
        top_products: 5,
        min_position: 0,
    };
    assert_eq!(queries.get_sales_analytics(backwards).await.unwrap_err().code(), Code::InvalidArgument);

    // Inventory.
    let mut inventory = InventoryQueryServiceClient::new(stack.channel.clone());
    let stock = inventory
        .get_inventory(query_pb::GetInventoryRequest { product_id: "sku-low".into(), min_position: 0 })
        .await
        .unwrap()
        .into_inner()
        .inventory
        .unwrap();
    assert_eq!((stock.available, stock.reserved, stock.low_stock), (7, 5, true));
    assert_eq!(stock.reservations.len(), 1);
    assert_eq!(stock.reservations[0].order_id, "o-00");
    let low = inventory.list_low_stock(query_pb::ListLowStockRequest::default()).await.unwrap().into_inner();
    assert_eq!(low.products.iter().map(|p| p.product_id.as_str()).collect::<Vec<_>>(), ["sku-low"]);

    // Accounts.
    let mut accounts = AccountQueryServiceClient::new(stack.channel.clone());
    let view = accounts
        .get_account(query_pb::GetAccountRequest { account_id: "a-1".into(), min_position: 0 })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(view.balance.unwrap().minor, 1_000);
    let history = accounts
        .list_account_transactions(query_pb::ListAccountTransactionsRequest {
            account_id: "a-1".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let balances: Vec<i64> = history.transactions.iter().map(|t| t.balance.clone().unwrap().minor).collect();
    assert_eq!(balances, [1_000, 1_200], "newest first, two per page");
    let rest = accounts
        .list_account_transactions(query_pb::ListAccountTransactionsRequest {
            account_id: "a-1".into(),
            page_size: 2,
            page_token: history.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.transactions.len(), 1);
    assert_eq!(rest.transactions[0].transaction_id, "t-0");
    assert!(rest.next_page_token.is_empty());

    // A user's timeline: their orders and their own events.
    let mut users = UserQueryServiceClient::new(stack.channel.clone());
    let activity = users
        .get_user_activity(query_pb::GetUserActivityRequest {
            user_id: "c-1".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activity.user.unwrap().logins, 1);
    let kinds: Vec<&str> = activity.activities.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "order_created").count(), expected["c-1"].len());
    assert_eq!(&kinds[..2], ["logged_in", "registered"], "newest first");
    let unknown = query_pb::GetUserActivityRequest { user_id: "nobody".into(), ..Default::default() };
    assert_eq!(users.get_user_activity(unknown).await.unwrap_err().code(), Code::NotFound);
}

/// Today's UTC day as `YYYY-MM-DD`, from the civil calendar.
struct SystemTimeDays(i64);

impl SystemTimeDays {
    fn now() -> Self {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        Self(secs.div_euclid(86_400))
    }
}

impl std::fmt::Display for SystemTimeDays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&day_string(self.0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_order_at_folds_the_past_and_watch_order_streams_each_change() {
    let stack = stack(None).await;
    let mut queries = stack.queries.clone();
    let mut watch =
        queries.watch_order(query_pb::WatchOrderRequest { order_id: "o-1".into() }).await.unwrap().into_inner();
    stack.create("o-1", "c-1", 100).await;
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.order.unwrap().status(), OrderStatus::Created, "the watch waited for the order");
    let created = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    stack.confirm("o-1").await;
    let second = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.order.unwrap().status(), OrderStatus::Confirmed);

    let at = |time: Option<std::time::SystemTime>, version: Option<u64>| query_pb::GetOrderAtRequest {
        order_id: "o-1".into(),
        time: time.map(Into::into),
        version,
    };
    let by_version = queries.get_order_at(at(None, Some(0))).await.unwrap().into_inner().order.unwrap();
    assert_eq!((by_version.status(), by_version.stream_version), (OrderStatus::Created, 0));
    let by_time = queries.get_order_at(at(Some(created), None)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(by_time.status(), OrderStatus::Created, "as of a time between the two events");
    let now = queries.get_order_at(at(Some(std::time::SystemTime::now()), None)).await.unwrap();
    assert_eq!(now.into_inner().order.unwrap().status(), OrderStatus::Confirmed);
    let before = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    assert_eq!(queries.get_order_at(at(Some(before), None)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(queries.get_order_at(at(None, None)).await.unwrap_err().code(), Code::InvalidArgument);
    let missing = query_pb::GetOrderAtRequest { order_id: "nope".into(), time: None, version: Some(0) };
    assert_eq!(queries.get_order_at(missing).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_is_never_undone_by_a_slower_fill() {
    let redis = OwnRedis::start();
    let stack = stack(Some(cache_config(redis.url(), "race:"))).await;
    stack.create("o-1", "c-1", 100).await;
    stack.settle().await;
    let cache = stack.query.cache().unwrap().clone();
    let version = stack.query.positions().get("order_views").unwrap().version;
    // A slow query read the created order from PostgreSQL …
    let old = stack.queries.clone().get_order(get("o-1", 0)).await.unwrap().into_inner().order.unwrap();
    // … then the order changed and the projector invalidated …
    stack.confirm("o-1").await;
    stack.settle().await;
    // … and only then does the slow query fill the cache with what it read.
    use prost::Message;
    cache.fill(eventfold_query::Kind::Order, version, "o-1", old.last_position, &old.encode_to_vec()).await;
    let fresh = stack.queries.clone().get_order(get("o-1", 0)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(fresh.status(), OrderStatus::Confirmed, "the stale fill was refused");
    let hits = cache.stats().hits;
    let again = stack.queries.clone().get_order(get("o-1", 0)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(again.status(), OrderStatus::Confirmed);
    assert_eq!(cache.stats().hits, hits + 1, "the fresh value is cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_to_postgres_and_the_cache_recovers() {
    let mut redis = OwnRedis::start();
    let stack = stack(Some(cache_config(redis.url(), "outage:"))).await;
    for n in 0..20 {
        stack.create(&format!("o-{n}"), "c-1", 100 + n).await;
    }
    stack.settle().await;
    let cache = stack.query.cache().unwrap().clone();
    let failures = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Each order is checked against its expected status: confirmed for the
    // ones confirmed before the check began.
    let confirmed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::<String>::new()));
    let mut load = Vec::new();
    for worker in 0..2u64 {
        let (mut queries, failures, answered, stop, confirmed) =
            (stack.queries.clone(), failures.clone(), answered.clone(), stop.clone(), confirmed.clone());
        load.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("o-{}", n % 20);
                n += 1;
                let must_be_confirmed = confirmed.lock().unwrap().contains(&id);
                match queries.get_order(get(&id, 0)).await {
                    Ok(answer) => {
                        let order = answer.into_inner().order.unwrap();
                        let right = order.order_id == id
                            && order.total.as_ref().map(|t| t.minor) == Some(2 * (100 + (n - 1) as i64 % 20))
                            && (!must_be_confirmed || order.status() == OrderStatus::Confirmed);
                        if !right {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) => {
                        eprintln!("query failed: {status:?}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cache.stats();
    assert!(before.hits > 0, "the cache serves before the outage: {before:?}");

    redis.stop();
    let down_at = answered.load(Ordering::SeqCst);
    // Writes during the outage: their invalidations cannot reach Redis.
    for n in 0..5 {
        let id = format!("o-{n}");
        let position = stack.confirm(&id).await;
        stack.query.positions().wait("order_views", position, Duration::from_secs(10)).await.unwrap();
        confirmed.lock().unwrap().insert(id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(cache.breaker_state(), BreakerState::Closed, "Redis is down: the breaker is open (or trying)");
    assert!(answered.load(Ordering::SeqCst) > down_at + 20, "queries kept answering from PostgreSQL");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no query failed or answered wrongly during the outage");

    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    while cache.breaker_state() != BreakerState::Closed || cache.stats().hits <= before.hits + 20 {
        assert!(Instant::now() < deadline, "the breaker closed and hits resumed: {:?}", cache.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no wrong answer before, during or after the outage");
    // The restarted Redis is empty, so no stale entry could show here: this
    // only proves that the retries reach the new server and stop. That an
    // invalidation missed during an outage is delivered later is
    // `a_redis_pause_keeps_invalidations_pending_and_every_change_reads_fresh_after_it`.
    assert_eq!(stack.invalidator.as_ref().unwrap().pending(), 0, "the retries reached the restarted Redis");
    stack.stop_projectors.cancel();
}

/// `GET key` on the Redis at `url` over a connection of its own (not the
/// cache's client): the raw entry, `None` if there is none.
async fn raw_get(url: &str, key: &str) -> Option<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let addr = url.strip_prefix("redis://").expect("a redis:// URL");
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to Redis");
        let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        stream.write_all(request.as_bytes()).await.expect("send GET");
        let mut reader = BufReader::new(stream);
        let mut header = String::new();
        reader.read_line(&mut header).await.expect("GET answer");
        let len: i64 = header.trim_end().strip_prefix('$').and_then(|l| l.parse().ok()).expect("a bulk string");
        let Ok(len) = usize::try_from(len) else { return None };
        let mut value = vec![0; len + 2];
        reader.read_exact(&mut value).await.expect("the value");
        value.truncate(len);
        Some(value)
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("Redis answers GET within 5 s")
}

/// The position of a raw cache entry (`"<position>|<view>"`) and whether it
/// holds a view (not a tombstone).
fn entry_position(entry: &[u8]) -> (u64, bool) {
    let bar = entry.iter().position(|b| *b == b'|').expect("an entry is <position>|<view>");
    let position = std::str::from_utf8(&entry[..bar]).unwrap().parse().unwrap();
    (position, entry.len() > bar + 1)
}

/// A Redis frozen mid-flight (SIGSTOP: connections open, nothing answered,
/// everything kept), unlike a restart, keeps the entries cached before it:
/// an invalidation missed during the pause would leave them stale after it.
/// Entries are cached and seen in Redis, Redis is paused, the breaker opens,
/// those orders change (the invalidator cannot reach Redis), queries answer
/// from PostgreSQL; after the pause the stale entries are checked to be
/// still there (the precondition), then every changed order must read
/// fresh through the cache once the pending invalidations are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_pause_keeps_invalidations_pending_and_every_change_reads_fresh_after_it() {
    let redis = OwnRedis::start();
    // A cool-down longer than the whole pause: once open, the breaker lets
    // no call through (no trial invalidation, no fill) until after the
    // pause, so nothing sent during it can reach Redis when it goes on and
    // hide a lost invalidation.
    let cool_down = Duration::from_secs(6);
    let config = CacheConfig {
        breaker_cool_down_ms: u64::try_from(cool_down.as_millis()).unwrap(),
        ..cache_config(redis.url(), "pause:")
    };
    let stack = stack(Some(config)).await;
    let changed: Vec<String> = (0..6).map(|n| format!("o-{n}")).collect();
    for (n, id) in changed.iter().enumerate() {
        stack.create(id, "c-1", 100 + n as i64).await;
    }
    stack.create("o-still", "c-1", 100).await;
    stack.settle().await;
    let cache = stack.query.cache().unwrap().clone();
    let invalidator = stack.invalidator.clone().unwrap();
    let version = stack.query.positions().get("order_views").unwrap().version;
    let key = |id: &str| format!("pause:order:v{version}:{id}");
    let mut queries = stack.queries.clone();

    // Cached through the query service: the second read is a hit, and the
    // entry is in Redis with the position of the created order.
    let mut cached_at = BTreeMap::new();
    for id in &changed {
        let order = queries.get_order(get(id, 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), OrderStatus::Created);
        let hits = cache.stats().hits;
        let again = queries.get_order(get(id, 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!((again.status(), cache.stats().hits), (OrderStatus::Created, hits + 1), "{id} is served from Redis");
        let entry = raw_get(&redis.url(), &key(id)).await.unwrap_or_else(|| panic!("{id} is cached in Redis"));
        assert_eq!(entry_position(&entry), (order.last_position, true), "{id}'s entry is its created view");
        cached_at.insert(id.clone(), order.last_position);
    }

    redis.pause();
    // Queries of an order that does not change wait for the Redis timeout,
    // answer from PostgreSQL, and open the breaker.
    let deadline = Instant::now() + Duration::from_secs(15);
    while cache.breaker_state() != BreakerState::Open {
        assert!(Instant::now() < deadline, "the breaker opens while Redis is paused: {:?}", cache.breaker_state());
        let order = queries.get_order(get("o-still", 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), OrderStatus::Created);
    }
    let opened = Instant::now();

    // The orders change: the projector's invalidator cannot reach Redis.
    let mut changed_at = BTreeMap::new();
    for id in &changed {
        changed_at.insert(id.clone(), stack.confirm(id).await);
    }
    let last = *changed_at.values().max().unwrap();
    stack.query.positions().wait("order_views", last, Duration::from_secs(10)).await.unwrap();
    // Queries go on answering, from PostgreSQL, with the change.
    for id in &changed {
        let order = queries.get_order(get(id, changed_at[id])).await.unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), OrderStatus::Confirmed, "{id} during the pause (from PostgreSQL)");
        let order = queries.get_order(get(id, 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), OrderStatus::Confirmed, "{id} during the pause, no position (from PostgreSQL)");
    }
    // What the invalidator holds back (0 if it dropped what failed).
    let pending_in_pause = invalidator.pending();
    assert_eq!(cache.breaker_state(), BreakerState::Open, "the breaker stayed open through the pause");
    assert!(opened.elapsed() < cool_down, "the pause ended within the cool-down: no call went out meanwhile");

    redis.unpause();
    // The precondition: the entries cached before the pause are still in
    // Redis, stale (nothing of the pause reached Redis; the breaker lets the
    // first retry through only after the cool-down).
    for id in &changed {
        let entry = raw_get(&redis.url(), &key(id)).await.unwrap_or_else(|| panic!("{id} is still in Redis"));
        assert_eq!(
            entry_position(&entry),
            (cached_at[id], true),
            "{id}: the stale entry is in Redis when the pause ends (else this test proves nothing)"
        );
        assert!(cached_at[id] < changed_at[id]);
    }

    // Recovery: the breaker closes (trial calls: the invalidator's retry or
    // a query) and what is pending drains.
    let deadline = Instant::now() + cool_down + Duration::from_secs(15);
    while cache.breaker_state() != BreakerState::Closed || invalidator.pending() > 0 {
        assert!(
            Instant::now() < deadline,
            "the cache recovers: breaker {:?}, {} pending",
            cache.breaker_state(),
            invalidator.pending()
        );
        queries.get_order(get("o-still", 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every changed order reads fresh through the cache path (the breaker
    // is closed: Redis is asked first), and the fresh view is cached.
    for id in &changed {
        let order = queries.get_order(get(id, 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!(order.status(), OrderStatus::Confirmed, "{id} reads fresh after the pause, not its stale entry");
        let hits = cache.stats().hits;
        let again = queries.get_order(get(id, 0)).await.unwrap().into_inner().order.unwrap();
        assert_eq!((again.status(), cache.stats().hits), (OrderStatus::Confirmed, hits + 1), "{id}: fresh and cached");
        let entry = raw_get(&redis.url(), &key(id)).await.unwrap();
        assert!(entry_position(&entry).0 >= changed_at[id], "{id}: Redis holds the change");
    }
    assert!(pending_in_pause > 0, "the invalidations of the pause were held pending, then delivered");
    assert_eq!(invalidator.pending(), 0);
    stack.stop_projectors.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_switches_under_query_load_without_errors_or_empty_answers() {
    let redis = OwnRedis::start();
    let stack = stack(Some(cache_config(redis.url(), "rebuild:"))).await;
    for n in 0..60 {
        stack.create(&format!("o-{n}"), &format!("c-{}", n % 4), 100).await;
    }
    stack.settle().await;
    let problems = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for worker in 0..2u64 {
        let (mut queries, problems, stop, answered) =
            (stack.queries.clone(), problems.clone(), stop.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let id = format!("o-{}", n % 60);
                match queries.get_order(get(&id, 0)).await {
                    Ok(a) => {
                        let order = a.into_inner().order.unwrap_or_default();
                        if order.order_id != id || order.items.is_empty() {
                            problems.lock().unwrap().push(format!("partial order {order:?}"));
                        }
                    }
                    Err(status) => problems.lock().unwrap().push(format!("GetOrder {id}: {status:?}")),
                }
                let list = query_pb::ListOrdersRequest { page_size: 10, ..Default::default() };
                match queries.list_orders(list).await {
                    Ok(a) if a.get_ref().orders.len() == 10 => {}
                    Ok(a) => problems.lock().unwrap().push(format!("short page: {}", a.get_ref().orders.len())),
                    Err(status) => problems.lock().unwrap().push(format!("ListOrders: {status:?}")),
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    while answered.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The rebuild, as `eventfold projections rebuild order_views` does it,
    // in small batches so that it takes a while.
    let invalidator = stack.invalidator.clone().unwrap();
    let small = ProjectorOptions { batch_size: 5, ..options() };
    let projection = Arc::new(eventfold_projector::OrderViews);
    let rebuild =
        Projector::new(stack.database.clone(), stack.log.clone(), projection, 2, small).with_observer(invalidator);
    let rebuild_started = answered.load(Ordering::SeqCst);
    rebuild.prepare().await.unwrap();
    let mut steps = 0;
    while rebuild.step().await.unwrap() > 0 {
        steps += 1;
        if steps == 1 {
            // Half built: queries answer meanwhile (on a loaded machine the
            // rebuild could otherwise finish before any query came back).
            let deadline = Instant::now() + Duration::from_secs(10);
            while answered.load(Ordering::SeqCst) < rebuild_started + 2 {
                assert!(Instant::now() < deadline, "queries answer while the rebuild builds");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let before_switch = answered.load(Ordering::SeqCst);
    assert!(before_switch > rebuild_started, "queries ran while the rebuild built");
    rebuild.activate().await.unwrap();
    let stop_v2 = CancellationToken::new();
    tokio::spawn(rebuild.run(stop_v2.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.query.positions().get("order_views").map(|a| a.version) != Some(2) {
        assert!(Instant::now() < deadline, "the query side follows the switch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Writes after the switch reach version 2 and its queries.
    let position = stack.create("o-new", "c-9", 100).await;
    let order = stack.queries.clone().get_order(get("o-new", position)).await.unwrap().into_inner().order.unwrap();
    assert_eq!(order.customer_id, "c-9");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    let answered = answered.load(Ordering::SeqCst);
    assert!(before_switch > 0 && answered > before_switch + 5, "queries ran before and after the switch");
    let problems = problems.lock().unwrap();
    assert!(problems.is_empty(), "{} problems, e.g. {:?}", problems.len(), problems.first());
    stack.stop_projectors.cancel();
}

/// The fields of the `BadRequest` violations of `status`.
fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts `status` is INVALID_ARGUMENT naming exactly `field`.
fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(bad_fields(status), [field], "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_times_positions_ids_and_tokens_are_invalid_arguments_never_panics_or_internal_errors() {
    let stack = stack(None).await;
    let mut queries = stack.queries.clone();
    stack.create("o-1", "c-1", 100).await;
    stack.settle().await;
    let at = |seconds: i64, nanos: i32| query_pb::GetOrderAtRequest {
        order_id: "o-1".into(),
        time: Some(prost_types::Timestamp { seconds, nanos }),
        version: None,
    };

    // Beyond what a SystemTime can take, beyond the year 9999, beyond
    // PostgreSQL's range, before the year 1, and nanos out of range.
    for (seconds, nanos) in [
        (i64::MAX, 999_999_999),
        (i64::MAX, 0),
        (i64::MIN, 0),
        (253_402_300_800, 0),
        (10_000_000_000_000, 0),
        (-62_135_596_801, 0),
        (0, -1),
    ] {
        let status = queries.get_order_at(at(seconds, nanos)).await.unwrap_err();
        assert_invalid(&status, "time");
    }
    // The last instant of 9999 is a time like any other.
    let latest = queries.get_order_at(at(253_402_300_799, 999_999_999)).await.unwrap().into_inner();
    assert_eq!(latest.order.unwrap().status(), OrderStatus::Created);
    let all_time = query_pb::ListOrdersRequest {
        create_time_start: Some(prost_types::Timestamp { seconds: -62_135_596_800, nanos: 0 }),
        create_time_end: Some(prost_types::Timestamp { seconds: 253_402_300_799, nanos: 999_999_999 }),
        ..Default::default()
    };
    assert_eq!(queries.list_orders(all_time).await.unwrap().into_inner().orders.len(), 1);
    let far = query_pb::ListOrdersRequest {
        create_time_end: Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }),
        ..Default::default()
    };
    assert_invalid(&queries.list_orders(far).await.unwrap_err(), "create_time_end");
    let by_status = query_pb::ListOrdersByStatusRequest {
        status: OrderStatus::Created as i32,
        start_time: Some(prost_types::Timestamp { seconds: i64::MIN, nanos: 0 }),
        ..Default::default()
    };
    assert_invalid(&queries.list_orders_by_status(by_status).await.unwrap_err(), "start_time");

    // Positions and versions beyond a bigint.
    let beyond = u64::try_from(i64::MAX).unwrap() + 1;
    for min_position in [beyond, u64::MAX] {
        let mut request = Request::new(get("o-1", min_position));
        // The old code waited for the position; the answer must be at once.
        request.set_timeout(Duration::from_secs(3));
        assert_invalid(&queries.get_order(request).await.unwrap_err(), "min_position");
        let list = query_pb::ListOrdersRequest { min_position, ..Default::default() };
        assert_invalid(&queries.list_orders(list).await.unwrap_err(), "min_position");
    }
    let version = query_pb::GetOrderAtRequest { order_id: "o-1".into(), time: None, version: Some(u64::MAX) };
    assert_invalid(&queries.get_order_at(version).await.unwrap_err(), "version");

    // Ids: visible ASCII, at most 128 bytes.
    for id in ["o 1".to_owned(), "o\u{7f}".to_owned(), "é".to_owned(), "x".repeat(129)] {
        assert_invalid(&queries.get_order(get(&id, 0)).await.unwrap_err(), "order_id");
    }
    assert!(queries.get_order(get(&"x".repeat(128), 0)).await.unwrap_err().code() == Code::NotFound);

    // A forged page token whose cursor time is out of range, and one too long.
    let forged = eventfold_platform::page::token("orders|None|None|None|None", &(i64::MAX, "o-1".to_owned()));
    let list = query_pb::ListOrdersRequest { page_token: forged, ..Default::default() };
    assert_invalid(&queries.list_orders(list).await.unwrap_err(), "page_token");
    let list = query_pb::ListOrdersRequest { page_token: "a".repeat(2000), ..Default::default() };
    assert_invalid(&queries.list_orders(list).await.unwrap_err(), "page_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_order_is_shared_by_its_watchers_and_capped_per_peer() {
    let stack = Stack::start(&eventfold_query::Config { max_watchers_per_peer: 3, ..Default::default() }).await;
    let watch = |id: &str| {
        let mut queries = stack.queries.clone();
        let request = query_pb::WatchOrderRequest { order_id: id.to_owned() };
        async move { queries.watch_order(request).await.map(tonic::Response::into_inner) }
    };
    let mut first = watch("o-1").await.unwrap();
    let mut second = watch("o-1").await.unwrap();
    let third = watch("o-2").await.unwrap();
    let refused = watch("o-3").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.get_details_error_info().expect("ErrorInfo").reason, "TOO_MANY_WATCHERS");

    // Both watchers of o-1 see each change.
    stack.create("o-1", "c-1", 100).await;
    for stream in [&mut first, &mut second] {
        let order = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(order.order.unwrap().status(), OrderStatus::Created);
    }
    stack.confirm("o-1").await;
    for stream in [&mut first, &mut second] {
        let order = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(order.order.unwrap().status(), OrderStatus::Confirmed);
    }

    // A closed watch frees its slot.
    drop(third);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match watch("o-3").await {
            Ok(stream) => break stream,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "the closed watch was let go");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stack.create("o-3", "c-1", 100).await;
    let order = tokio::time::timeout(Duration::from_secs(10), again.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(order.order.unwrap().order_id, "o-3");
}

/// Texts that must never reach a client: the driver's, the pool's, the
/// database's address.
fn assert_no_driver_text(status: &tonic::Status, port: u16) {
    if let Err(e) = eventfold_tests::hostile::check_no_internal_text(status, &[&port.to_string()]) {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_answers_unavailable_with_an_error_id_and_no_driver_text() {
    let url = eventfold_tests::unreachable_database_url();
    let port: u16 = url.rsplit(':').next().and_then(|p| p.split('/').next()).unwrap().parse().unwrap();
    let database = Database::open(
        &url,
        &eventfold_store::DatabaseOptions { connect_timeout: Duration::from_secs(1), ..Default::default() },
    )
    .expect("a PostgreSQL URL");
    let log = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.expect("connecting is lazy");
    let config = eventfold_query::Config::default();
    let query = Query::connect(&config, database, None, Arc::new(log)).await.expect("the pool connects lazily");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    eventfold_query::host(&mut server, &config, query, token.clone());
    tokio::spawn(server.serve(listener, token, Duration::from_secs(10)));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let (mut a, mut b, mut c) = (
        OrderQueryServiceClient::new(channel.clone()),
        OrderQueryServiceClient::new(channel.clone()),
        OrderQueryServiceClient::new(channel.clone()),
    );
    let mut accounts = AccountQueryServiceClient::new(channel);
    let at = query_pb::GetOrderAtRequest { order_id: "o-1".into(), time: None, version: Some(0) };
    let (order, list, history, account) = tokio::join!(
        a.get_order(get("o-1", 0)),
        b.list_orders(query_pb::ListOrdersRequest::default()),
        c.get_order_at(at),
        accounts.get_account(query_pb::GetAccountRequest { account_id: "a-1".into(), min_position: 0 }),
    );
    let statuses = [order.unwrap_err(), list.unwrap_err(), history.unwrap_err(), account.unwrap_err()];
    for status in &statuses {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_no_driver_text(status, port);
    }
}

/// Metadata of a command sent straight to the bus: a correlation id is
/// required (1 to 128 bytes of visible ASCII), like any caller's.
fn test_meta() -> Meta {
    Meta { correlation_id: "test".to_owned(), ..Meta::default() }
}
