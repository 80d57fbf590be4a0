//! The command side end to end: the command services and the event store
//! hosted on one real server (`GrpcServer`, as `eventfold dev` wires them)
//! over the in-memory log and PostgreSQL, driven by the generated clients.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use eventfold_command::{Authorizer, Bus, BusOptions, Command, Config, Envelope, Handler, Meta, Reply, SnapshotPolicy};
use eventfold_domain::{
    Aggregate,
    account::{AccountCommand, ReceiveTransfer, RefundTransfer, SendTransfer},
    inventory::Inventory,
};
use eventfold_platform::{
    auth::{AuthConfig, Secret},
    runtime::CancellationToken,
    server::GrpcServer,
};
use eventfold_proto::{
    accounts::{self as accounts_pb, account_command_service_client::AccountCommandServiceClient},
    common::{Money, WriteResult},
    eventstore::{self as store_pb, event_store_service_client::EventStoreServiceClient},
    inventory::{self as inventory_pb, inventory_command_service_client::InventoryCommandServiceClient},
    orders::{self as orders_pb, order_command_service_client::OrderCommandServiceClient},
};
use eventfold_store::{
    AppendRequest, EventLog, ExpectedVersion, NewEvent, Snapshot, SnapshotNamespace, SnapshotQuery, StreamRead,
    Upcasting,
};
use eventfold_tests::store::{Backend, memory, postgres};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::DropGuard;
use tonic::{Code, Request, Status, service::interceptor::InterceptedService, transport::Channel};
use tonic_types::StatusExt;
use tower::ServiceExt;

// --- harness -------------------------------------------------------------------

/// A channel whose calls carry an admin's token unless they bring their own.
type Authed = InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>;

/// The subject of the token every call carries by default.
const ADMIN: &str = "test-admin";

fn admin_token(mut request: Request<()>) -> Result<Request<()>, Status> {
    if !request.metadata().contains_key("authorization") {
        let token = eventfold_tests::auth::token(ADMIN, &["admin"]);
        request.metadata_mut().insert("authorization", eventfold_tests::auth::bearer(&token));
    }
    Ok(request)
}

/// `request` with the token of `subject` holding `roles`.
fn as_user<T>(mut request: Request<T>, subject: &str, roles: &[&str]) -> Request<T> {
    let token = eventfold_tests::auth::token(subject, roles);
    request.metadata_mut().insert("authorization", eventfold_tests::auth::bearer(&token));
    request
}

struct Server {
    orders: OrderCommandServiceClient<Authed>,
    inventory: InventoryCommandServiceClient<Authed>,
    accounts: AccountCommandServiceClient<Authed>,
    store: EventStoreServiceClient<Authed>,
    /// The bus the services use: the money transfer saga's commands go
    /// straight to it, as the saga sends them.
    bus: Bus,
    /// The upcasting log the services use.
    log: Arc<dyn EventLog>,
    /// The log as stored (no upcasting): for fixtures and white-box checks.
    backend: Backend,
    /// Stops the server when the test lets go of it.
    _shutdown: DropGuard,
}

impl Server {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Config::default().bus_options()).await
    }

    async fn start_with(backend: Backend, options: BusOptions) -> Self {
        let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(backend.log.clone(), eventfold_command::upcasters()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let bus = eventfold_command::bus(log.clone(), options);
        let token = CancellationToken::new();
        let mut server = GrpcServer::new();
        let config = eventfold_eventstore::Config::default();
        eventfold_eventstore::host(&mut server, &config, log.clone(), token.clone());
        eventfold_command::host(&mut server, &Config::default(), log.clone(), bus.clone());
        // Authenticated as a production server is: the principal comes
        // from the token, never from a header the client sets.
        let mut auth = AuthConfig { enabled: Some(true), ..AuthConfig::default() };
        auth.jwt.hs256_secret = Some(Secret::new(eventfold_tests::auth::HS256_SECRET));
        server.authenticate(&auth, true, None);
        let grace = Duration::from_secs(config.shutdown_grace_secs);
        tokio::spawn(server.serve(listener, token.clone(), grace));
        let channel = eventfold_tests::channel(addr).await;
        let authed = |channel: Channel| InterceptedService::new(channel, admin_token as fn(_) -> _);
        Server {
            orders: OrderCommandServiceClient::new(authed(channel.clone())),
            inventory: InventoryCommandServiceClient::new(authed(channel.clone())),
            accounts: AccountCommandServiceClient::new(authed(channel.clone())),
            store: EventStoreServiceClient::new(authed(channel)),
            bus,
            log,
            backend,
            _shutdown: token.drop_guard(),
        }
    }

    async fn events(&mut self, stream: &str) -> Vec<store_pb::RecordedEvent> {
        self.store
            .read_stream(store_pb::ReadStreamRequest { stream_id: stream.to_owned(), ..Default::default() })
            .await
            .unwrap_or_else(|s| panic!("read {stream}: {s:?}"))
            .into_inner()
            .events
    }

    async fn head(&self) -> u64 {
        self.log.last_position().await.expect("last position")
    }
}

eventfold_tests::backends!(
    order_lifecycle_and_rejections,
    invalid_commands_name_their_fields,
    retries_with_the_same_request_id_return_the_first_answer,
    v1_order_created_reads_as_v2_and_drives_the_aggregate,
    metadata_carries_correlation_causation_and_principal,
    transfers_are_recorded_on_both_sides_or_refunded,
    snapshots_are_written_used_and_rewritten_when_stale,
    forged_client_snapshots_never_reach_the_command_side,
    a_request_id_reused_for_another_command_is_refused,
);

// --- helpers --------------------------------------------------------------------

fn eur(minor: i64) -> Option<Money> {
    Some(Money { minor, currency: "EUR".into() })
}

fn eur_money(minor: i64) -> eventfold_domain::Money {
    eventfold_domain::Money::new(minor, "EUR".parse().expect("a currency"))
}

fn create_order(order_id: &str, request_id: &str, items: &[(&str, u32, i64)]) -> orders_pb::CreateOrderRequest {
    orders_pb::CreateOrderRequest {
        request_id: request_id.into(),
        order_id: order_id.into(),
        customer_id: "c-1".into(),
        currency: "EUR".into(),
        items: items
            .iter()
            .map(|(p, q, price)| orders_pb::OrderItem {
                product_id: (*p).into(),
                quantity: *q,
                unit_price: eur(*price),
            })
            .collect(),
        payment_token: String::new(),
        carrier: String::new(),
    }
}

/// The `ErrorInfo` reason of a status, checking its code and domain.
#[track_caller]
fn reason(status: &Status, code: Code) -> String {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "eventfold.dev");
    info.reason
}

#[track_caller]
fn rejected<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>, expected: &str) {
    let status = result.expect_err("the command must be refused");
    assert_eq!(reason(&status, Code::FailedPrecondition), expected, "{status:?}");
}

fn write(result: Option<WriteResult>) -> WriteResult {
    result.expect("a write result")
}

fn json_of(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match value.kind.as_ref() {
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(json_of).collect()),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}

fn struct_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), json_of(v))).collect())
}

// --- cases ----------------------------------------------------------------------

async fn order_lifecycle_and_rejections(mut s: Server) {
    let created = s.orders.create_order(create_order("o-1", "", &[("sku-1", 2, 1250), ("sku-2", 1, 500)])).await;
    let created = created.expect("create").into_inner();
    assert_eq!(created.total, eur(3000), "total computed from the items");
    let first = write(created.result);
    assert_eq!((first.stream_id.as_str(), first.stream_version), ("order-o-1", 0));
    assert!(first.global_position > 0);

    rejected(s.orders.create_order(create_order("o-1", "", &[("sku-1", 1, 1)])).await, "ORDER_ALREADY_EXISTS");
    let ship = || orders_pb::ShipOrderRequest {
        order_id: "o-1".into(),
        carrier: "DHL".into(),
        tracking_number: "T-1".into(),
        ..Default::default()
    };
    rejected(s.orders.ship_order(ship()).await, "ORDER_NOT_PAID");
    let pay = |minor| orders_pb::ProcessPaymentRequest {
        order_id: "o-1".into(),
        payment_id: "p-1".into(),
        amount: eur(minor),
        ..Default::default()
    };
    rejected(s.orders.process_payment(pay(3000)).await, "ORDER_NOT_CONFIRMED");

    let confirm = orders_pb::ConfirmOrderRequest { order_id: "o-1".into(), ..Default::default() };
    let confirmed = write(s.orders.confirm_order(confirm.clone()).await.expect("confirm").into_inner().result);
    assert_eq!(confirmed.stream_version, 1);
    assert!(confirmed.global_position > first.global_position);
    rejected(s.orders.confirm_order(confirm).await, "ORDER_ALREADY_CONFIRMED");
    rejected(s.orders.process_payment(pay(2999)).await, "PAYMENT_AMOUNT_MISMATCH");
    s.orders.process_payment(pay(3000)).await.expect("pay");
    let shipped = write(s.orders.ship_order(ship()).await.expect("ship").into_inner().result);
    assert_eq!(shipped.stream_version, 3);
    let cancel = orders_pb::CancelOrderRequest { order_id: "o-1".into(), reason: "late".into(), ..Default::default() };
    rejected(s.orders.cancel_order(cancel).await, "ORDER_ALREADY_SHIPPED");
    let missing = orders_pb::ConfirmOrderRequest { order_id: "o-404".into(), ..Default::default() };
    rejected(s.orders.confirm_order(missing).await, "ORDER_NOT_FOUND");

    let types: Vec<String> = s.events("order-o-1").await.into_iter().map(|e| e.event_type).collect();
    assert_eq!(types, ["OrderCreated", "OrderConfirmed", "PaymentProcessed", "OrderShipped"]);
}

async fn invalid_commands_name_their_fields(mut s: Server) {
    let before = s.head().await;
    let mut bad = create_order("o 1", "", &[("sku-1", 0, -1)]);
    bad.currency = "euro".into();
    let status = s.orders.create_order(bad).await.expect_err("invalid");
    assert_eq!(reason(&status, Code::InvalidArgument), "INVALID_ARGUMENT");
    let fields: Vec<String> =
        status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["currency"], "conversion problems are answered before the bus");

    let bad = create_order("o 1", "", &[("sku-1", 0, -1)]);
    let status = s.orders.create_order(bad).await.expect_err("invalid");
    let fields: Vec<String> =
        status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["order_id", "order_id", "items[0].quantity", "items[0].unit_price.minor"]);

    let status = s.orders.create_order(create_order("o-2", "", &[])).await.expect_err("no items");
    assert_eq!(reason(&status, Code::InvalidArgument), "INVALID_ARGUMENT");
    let replenish = inventory_pb::ReplenishStockRequest { product_id: "sku".into(), quantity: 0, ..Default::default() };
    let status = s.inventory.replenish_stock(replenish).await.expect_err("zero quantity");
    assert_eq!(status.get_details_bad_request().expect("BadRequest").field_violations[0].field, "quantity");
    assert_eq!(s.head().await, before, "invalid commands append nothing");
}

async fn retries_with_the_same_request_id_return_the_first_answer(mut s: Server) {
    let create = create_order("o-r", "req-create", &[("sku-1", 1, 100)]);
    let first = s.orders.create_order(create.clone()).await.expect("create").into_inner();
    let head = s.head().await;
    let again = s.orders.create_order(create).await.expect("the retry answers").into_inner();
    assert_eq!(again, first, "identical first answer");
    assert_eq!(s.head().await, head, "the retry appended nothing");

    let confirm = orders_pb::ConfirmOrderRequest { request_id: "req-confirm".into(), order_id: "o-r".into() };
    let first = s.orders.confirm_order(confirm.clone()).await.expect("confirm").into_inner();
    let head = s.head().await;
    assert_eq!(s.orders.confirm_order(confirm).await.expect("retry").into_inner(), first);
    assert_eq!(s.head().await, head);

    let register = inventory_pb::RegisterProductRequest {
        request_id: "req-register".into(),
        product_id: "sku-r".into(),
        name: "Widget".into(),
    };
    s.inventory.register_product(register).await.expect("register");
    let replenish = inventory_pb::ReplenishStockRequest {
        request_id: "req-replenish".into(),
        product_id: "sku-r".into(),
        quantity: 5,
    };
    let first = s.inventory.replenish_stock(replenish.clone()).await.expect("replenish").into_inner();
    let head = s.head().await;
    // Replenishing again would succeed and add stock: the request id says no.
    assert_eq!(s.inventory.replenish_stock(replenish).await.expect("retry").into_inner(), first);
    assert_eq!(s.head().await, head);
    assert_eq!(s.events("inventory-sku-r").await.len(), 2);

    let open = |id: &str| accounts_pb::OpenAccountRequest {
        request_id: format!("req-open-{id}"),
        account_id: id.into(),
        owner_id: "u-1".into(),
        currency: "EUR".into(),
    };
    s.accounts.open_account(open("a-1")).await.expect("open a-1");
    s.accounts.open_account(open("a-2")).await.expect("open a-2");
    let deposit = accounts_pb::DepositMoneyRequest {
        request_id: "req-deposit".into(),
        account_id: "a-1".into(),
        transaction_id: "x-1".into(),
        amount: eur(1000),
    };
    let first = s.accounts.deposit_money(deposit.clone()).await.expect("deposit").into_inner();
    assert_eq!(first.balance, eur(1000));
    assert_eq!(s.accounts.deposit_money(deposit).await.expect("retry").into_inner(), first);
    let transfer = accounts_pb::RequestTransferRequest {
        request_id: "req-transfer".into(),
        from_account_id: "a-1".into(),
        to_account_id: "a-2".into(),
        transfer_id: "t-1".into(),
        amount: eur(400),
    };
    let first = s.accounts.request_transfer(transfer.clone()).await.expect("transfer").into_inner();
    let head = s.head().await;
    assert_eq!(s.accounts.request_transfer(transfer).await.expect("retry").into_inner(), first);
    assert_eq!(s.head().await, head, "the transfer's retry appended nothing");
}

async fn v1_order_created_reads_as_v2_and_drives_the_aggregate(mut s: Server) {
    // A fixture writes OrderCreated as version 1 wrote it: decimal strings,
    // no currency.
    let mut v1 = NewEvent::new(
        "OrderCreated",
        json!({
            "order_id": "legacy",
            "customer_id": "c-9",
            "items": [{ "product_id": "sku-1", "quantity": 2, "unit_price": "12.50" }],
            "total": "25.00"
        }),
    );
    v1.schema_version = 1;
    s.backend.log.append(AppendRequest::new("order-legacy", ExpectedVersion::NoStream, vec![v1])).await.unwrap();

    let events = s.events("order-legacy").await;
    assert_eq!(events[0].schema_version, 2, "read back as v2");
    let data = struct_json(events[0].data.as_ref().expect("data"));
    assert_eq!(data["currency"], "USD");
    assert_eq!(data["total"], json!({ "minor": 2500.0, "currency": "USD" }));
    assert_eq!(data["items"][0]["unit_price"], json!({ "minor": 1250.0, "currency": "USD" }));

    // The Order aggregate folds it: the total it holds decides the payment.
    s.orders
        .confirm_order(orders_pb::ConfirmOrderRequest { order_id: "legacy".into(), ..Default::default() })
        .await
        .expect("confirm a legacy order");
    let pay = |minor| orders_pb::ProcessPaymentRequest {
        order_id: "legacy".into(),
        payment_id: "p".into(),
        amount: Some(Money { minor, currency: "USD".into() }),
        ..Default::default()
    };
    rejected(s.orders.process_payment(pay(25)).await, "PAYMENT_AMOUNT_MISMATCH");
    s.orders.process_payment(pay(2500)).await.expect("pay the upcast total");

    // A v1 body the upcaster cannot read stays v1, and the aggregate
    // refuses to fold it rather than guess.
    let mut bad = NewEvent::new("OrderCreated", json!({ "order_id": "bad", "total": 25 }));
    bad.schema_version = 1;
    s.backend.log.append(AppendRequest::new("order-bad", ExpectedVersion::NoStream, vec![bad])).await.unwrap();
    assert_eq!(s.events("order-bad").await[0].schema_version, 1);
    let status = s
        .orders
        .confirm_order(orders_pb::ConfirmOrderRequest { order_id: "bad".into(), ..Default::default() })
        .await
        .expect_err("an unreadable history");
    assert_eq!(reason(&status, Code::Internal), "CORRUPT_DATA");
    assert!(status.message().contains("error id") && !status.message().contains("order-bad"), "{status:?}");

    // Stored as written: the chain covers v1.
    let stored = s.backend.log.read_stream(StreamRead::forwards("order-legacy", 10)).await.unwrap();
    assert_eq!(stored.events[0].schema_version, 1);
    assert!(s.log.verify_stream("order-legacy").await.unwrap().first_broken.is_none());
}

async fn metadata_carries_correlation_causation_and_principal(mut s: Server) {
    let mut request = Request::new(create_order("o-m", "req-m", &[("sku-1", 1, 100)]));
    request.metadata_mut().insert("x-correlation-id", "corr-1".parse().unwrap());
    request.metadata_mut().insert("x-causation-id", "cause-1".parse().unwrap());
    s.orders.create_order(as_user(request, "alice", &["orders.write"])).await.expect("create");
    // A principal the client claims itself changes nothing: the token's
    // subject is recorded.
    let mut request =
        Request::new(orders_pb::ConfirmOrderRequest { order_id: "o-m".into(), request_id: "req-c".into() });
    request.metadata_mut().insert("x-correlation-id", "corr-1".parse().unwrap());
    request.metadata_mut().insert("x-eventfold-principal", "mallory".parse().unwrap());
    s.orders.confirm_order(request).await.expect("confirm");
    let metadata: Vec<store_pb::EventMetadata> =
        s.events("order-o-m").await.into_iter().map(|e| e.metadata.expect("metadata")).collect();
    assert_eq!(
        (metadata[0].correlation_id.as_str(), metadata[0].causation_id.as_str(), metadata[0].user_id.as_str()),
        ("corr-1", "cause-1", "alice")
    );
    assert_eq!(
        (metadata[1].correlation_id.as_str(), metadata[1].causation_id.as_str(), metadata[1].user_id.as_str()),
        ("corr-1", "req-c", ADMIN),
        "without a causation id the command's request id is the cause; the token's subject, not the header's"
    );
}

/// A step of the money transfer saga `transfer-{transfer_id}`: the command
/// it sends to the bus, with its idempotency key (`saga:{id}:{step}`),
/// answered as the edge answers.
async fn saga_step(
    bus: &Bus,
    transfer_id: &str,
    step: &str,
    account_id: &str,
    command: impl Into<AccountCommand>,
) -> Result<tonic::Response<Reply>, Status> {
    let meta = Meta {
        request_id: Some(format!("saga:transfer-{transfer_id}:{step}")),
        principal: Some("saga-orchestrator".into()),
        correlation_id: transfer_id.into(),
        causation_id: None,
    };
    let command = Command::Account { account_id: account_id.into(), command: command.into() };
    bus.clone().oneshot(Envelope::new(command, meta)).await.map(tonic::Response::new).map_err(Status::from)
}

/// A transfer has one path: `RequestTransfer` records it on the source
/// (moving nothing) and names the saga, and the money transfer saga moves
/// the money with the account commands sent here step by step, as it sends
/// them: withdraw from the source, deposit to the target, and refund the
/// source when the target refuses.
async fn transfers_are_recorded_on_both_sides_or_refunded(mut s: Server) {
    for id in ["a-1", "a-2"] {
        let open = accounts_pb::OpenAccountRequest {
            account_id: id.into(),
            owner_id: "u".into(),
            currency: "EUR".into(),
            ..Default::default()
        };
        s.accounts.open_account(open).await.expect("open");
    }
    let deposit = accounts_pb::DepositMoneyRequest {
        account_id: "a-1".into(),
        transaction_id: "x-1".into(),
        amount: eur(500),
        ..Default::default()
    };
    s.accounts.deposit_money(deposit).await.expect("deposit");
    let withdraw = |id: &str, minor| SendTransfer {
        transfer_id: id.into(),
        to_account_id: "a-2".into(),
        amount: eur_money(minor),
    };
    let deposit = |id: &str, minor| ReceiveTransfer {
        transfer_id: id.into(),
        from_account_id: "a-1".into(),
        amount: eur_money(minor),
    };
    let head = s.head().await;
    rejected(saga_step(&s.bus, "t-0", "withdraw", "a-1", withdraw("t-0", 501)).await, "INSUFFICIENT_FUNDS");
    assert_eq!(s.head().await, head, "a refused transfer appends nothing");

    let source = saga_step(&s.bus, "t-1", "withdraw", "a-1", withdraw("t-1", 200)).await.expect("withdraw");
    let target = saga_step(&s.bus, "t-1", "deposit", "a-2", deposit("t-1", 200)).await.expect("deposit");
    assert_eq!(source.into_inner().first().stream_id, "account-a-1");
    assert_eq!(target.into_inner().first().stream_id, "account-a-2");
    let received = s.events("account-a-2").await.pop().expect("an event");
    assert_eq!(received.event_type, "TransferReceived");

    // The target does not exist: the source is debited, then refunded.
    saga_step(&s.bus, "t-2", "withdraw", "a-1", withdraw("t-2", 100)).await.expect("withdraw");
    rejected(saga_step(&s.bus, "t-2", "deposit", "a-404", deposit("t-2", 100)).await, "ACCOUNT_NOT_FOUND");
    let refund = RefundTransfer { transfer_id: "t-2".into(), reason: "ACCOUNT_NOT_FOUND".into() };
    saga_step(&s.bus, "t-2", "refund_source", "a-1", refund).await.expect("refund");
    let types: Vec<String> = s.events("account-a-1").await.into_iter().map(|e| e.event_type).collect();
    assert_eq!(types, ["AccountOpened", "MoneyDeposited", "TransferSent", "TransferSent", "TransferRefunded"]);
    let withdraw = accounts_pb::WithdrawMoneyRequest {
        account_id: "a-1".into(),
        transaction_id: "x-2".into(),
        amount: eur(300),
        ..Default::default()
    };
    let left = s.accounts.withdraw_money(withdraw).await.expect("the refunded money is there").into_inner();
    assert_eq!(left.balance, eur(0));

    // The request: recorded once on the source, nothing moved, the saga named.
    let (before, target_before) = (s.events("account-a-2").await.len(), s.events("account-a-1").await.len());
    let request = accounts_pb::RequestTransferRequest {
        from_account_id: "a-2".into(),
        to_account_id: "a-1".into(),
        transfer_id: "t-3".into(),
        amount: eur(200),
        ..Default::default()
    };
    let accepted = s.accounts.request_transfer(request).await.expect("request").into_inner();
    assert_eq!(accepted.saga_id, "transfer-t-3");
    assert_eq!(write(accepted.result).stream_id, "account-a-2");
    let mut source = s.events("account-a-2").await;
    assert_eq!(source.len(), before + 1, "one event");
    assert_eq!(source.pop().expect("an event").event_type, "TransferRequested");
    assert_eq!(s.events("account-a-1").await.len(), target_before, "nothing reached the target");
}

async fn snapshots_are_written_used_and_rewritten_when_stale(s: Server) {
    let backend = s.backend;
    drop(s.log);
    let mut options = Config::default().bus_options();
    options.snapshots = SnapshotPolicy { every: 3, per_category: Default::default() };
    let mut s = Server::start_with(backend, options).await;
    let register = inventory_pb::RegisterProductRequest {
        product_id: "sku-s".into(),
        name: "Widget".into(),
        ..Default::default()
    };
    s.inventory.register_product(register).await.expect("register");
    for _ in 0..4 {
        let replenish =
            inventory_pb::ReplenishStockRequest { product_id: "sku-s".into(), quantity: 1, ..Default::default() };
        s.inventory.replenish_stock(replenish).await.expect("replenish");
    }
    let query = || SnapshotQuery {
        stream_id: "inventory-sku-s".into(),
        namespace: SnapshotNamespace::Aggregate,
        max_version: None,
        schema_version: None,
    };
    let snapshot = s.log.load_snapshot(query()).await.unwrap().expect("a snapshot after 3 events");
    assert_eq!((snapshot.version, snapshot.schema_version), (2, Inventory::SNAPSHOT_VERSION));
    assert_eq!(snapshot.state["available"], 2);

    // The loader starts from the snapshot: one that claims more stock than
    // the events hold shows through (a white-box check of its use).
    let mut forged = snapshot.clone();
    let loaded = Handler::new(s.log.clone(), SnapshotPolicy::default()).load::<Inventory>("inventory-sku-s").await;
    assert_eq!(loaded.unwrap().state.available, 4);
    forged.version = 4;
    forged.state["available"] = json!(1000);
    s.log.save_snapshot(forged).await.unwrap();
    let reserve = |order: &str, quantity| inventory_pb::ReserveStockRequest {
        product_id: "sku-s".into(),
        order_id: order.into(),
        quantity,
        ..Default::default()
    };
    s.inventory.reserve_stock(reserve("o-big", 500)).await.expect("the snapshot's stock is used");

    // A snapshot of another schema version is ignored (the events decide) and
    // rewritten in the current one.
    let register = inventory_pb::RegisterProductRequest {
        product_id: "sku-t".into(),
        name: "Gadget".into(),
        ..Default::default()
    };
    s.inventory.register_product(register).await.expect("register");
    for _ in 0..4 {
        let replenish =
            inventory_pb::ReplenishStockRequest { product_id: "sku-t".into(), quantity: 1, ..Default::default() };
        s.inventory.replenish_stock(replenish).await.expect("replenish");
    }
    let mut stale = Snapshot::new("inventory-sku-t", SnapshotNamespace::Aggregate, 4, json!({ "available": 1000 }));
    stale.schema_version = Inventory::SNAPSHOT_VERSION + 1;
    s.log.save_snapshot(stale).await.unwrap();
    let reserve_t = |order: &str, quantity| inventory_pb::ReserveStockRequest {
        product_id: "sku-t".into(),
        order_id: order.into(),
        quantity,
        ..Default::default()
    };
    rejected(s.inventory.reserve_stock(reserve_t("o-more", 5)).await, "INSUFFICIENT_STOCK");
    s.inventory.reserve_stock(reserve_t("o-ok", 4)).await.expect("the events' stock of 4");
    let query = || SnapshotQuery {
        stream_id: "inventory-sku-t".into(),
        namespace: SnapshotNamespace::Aggregate,
        max_version: None,
        schema_version: None,
    };
    let rewritten = s.log.load_snapshot(query()).await.unwrap().expect("a snapshot");
    assert_eq!((rewritten.version, rewritten.schema_version), (5, Inventory::SNAPSHOT_VERSION));
    assert_eq!(rewritten.state["available"], 0);
    assert_eq!(rewritten.state["reservations"], json!({ "o-ok": 4 }));
}

fn struct_of(json: serde_json::Value) -> prost_types::Struct {
    use prost_types::{Struct, Value, value::Kind};
    fn value(json: serde_json::Value) -> Value {
        let kind = match json {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(items) => {
                Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(value).collect() })
            }
            object @ serde_json::Value::Object(_) => Kind::StructValue(struct_of(object)),
        };
        Value { kind: Some(kind) }
    }
    match json {
        serde_json::Value::Object(map) => Struct { fields: map.into_iter().map(|(k, v)| (k, value(v))).collect() },
        other => panic!("not an object: {other}"),
    }
}

/// Issue 13: `SaveSnapshot` through the public API with a forged balance
/// let a withdrawal pass on an account that never received a deposit, and
/// `"balance": null` panicked the handler. Client snapshots now live apart:
/// the command side never folds them.
async fn forged_client_snapshots_never_reach_the_command_side(mut s: Server) {
    let open = accounts_pb::OpenAccountRequest {
        request_id: "req-open-forged".into(),
        account_id: "acct-forged".into(),
        owner_id: "u-1".into(),
        currency: "EUR".into(),
    };
    s.accounts.open_account(open).await.expect("open");
    let withdraw = |n: u32| accounts_pb::WithdrawMoneyRequest {
        request_id: format!("req-withdraw-{n}"),
        account_id: "acct-forged".into(),
        transaction_id: format!("w-{n}"),
        amount: eur(1_000),
    };
    for (n, balance) in [(1, json!({ "minor": 100_000_000_000i64, "currency": "EUR" })), (2, json!(null))] {
        // A state the account aggregate reads (the loader would otherwise
        // ignore it as unreadable, whatever its namespace).
        let state = json!({
            "id": "acct-forged", "owner_id": "u-1", "opened": true, "closed": false,
            "balance": balance, "movements": {},
        });
        serde_json::from_value::<eventfold_domain::account::Account>(state.clone()).expect("a readable state");
        let save = store_pb::SaveSnapshotRequest {
            stream_id: "account-acct-forged".into(),
            version: 0,
            schema_version: 1,
            state: Some(struct_of(state)),
        };
        s.store.save_snapshot(save).await.expect("a client may store its own snapshot");
        rejected(s.accounts.withdraw_money(withdraw(n)).await, "INSUFFICIENT_FUNDS");
    }
    assert_eq!(s.events("account-acct-forged").await.len(), 1, "only the opening is stored");
    let verify = store_pb::VerifyStreamRequest { stream_id: "account-acct-forged".into() };
    assert!(s.store.verify_stream(verify).await.expect("verify").into_inner().valid);
}

/// AIP-155 per service and principal: a request id used for one command
/// answers only that command; used for another it is refused
/// (`ALREADY_EXISTS`, `REQUEST_ID_REUSED`) and changes nothing, instead of
/// answering with the first command's result (or `NOT_FOUND`).
async fn a_request_id_reused_for_another_command_is_refused(mut s: Server) {
    let first = s.orders.create_order(create_order("o-r1", "req-r", &[("sku-1", 1, 100)])).await.expect("create");
    let head = s.head().await;
    let refused = |result: Result<tonic::Response<orders_pb::CreateOrderResponse>, Status>| {
        let status = result.expect_err("a reused request id must be refused");
        assert_eq!(reason(&status, Code::AlreadyExists), "REQUEST_ID_REUSED", "{status:?}");
    };
    refused(s.orders.create_order(create_order("o-r2", "req-r", &[("sku-1", 1, 100)])).await);
    refused(s.orders.create_order(create_order("o-r1", "req-r", &[("sku-2", 5, 100)])).await);
    assert_eq!(s.head().await, head, "nothing was appended");
    assert!(s.log.stream_info("order-o-r2").await.is_err(), "no order o-r2 was made");
    let again = s.orders.create_order(create_order("o-r1", "req-r", &[("sku-1", 1, 100)])).await.expect("repeat");
    assert_eq!(write(again.into_inner().result), write(first.into_inner().result));
    // Another principal has request ids of its own.
    let other = Request::new(create_order("o-r3", "req-r", &[("sku-1", 1, 100)]));
    let created =
        s.orders.create_order(as_user(other, "bob", &["orders.write"])).await.expect("another principal's own id");
    assert_eq!(write(created.into_inner().result).stream_id, "order-o-r3");
}

// --- PostgreSQL only --------------------------------------------------------------

/// Refuses every command of the principal `mallory`.
struct DenyMallory;

impl Authorizer for DenyMallory {
    fn authorize(&self, principal: Option<&str>, command: &Command) -> Result<(), String> {
        match principal {
            Some("mallory") => Err(format!("mallory may not {}", command.name())),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_hook_can_refuse() {
    let mut options = Config::default().bus_options();
    options.authorizer = Arc::new(DenyMallory);
    let mut s = Server::start_with(memory().await, options).await;
    let request = as_user(Request::new(create_order("o-a", "", &[("sku-1", 1, 1)])), "mallory", &["orders.write"]);
    let status = s.orders.create_order(request).await.expect_err("refused");
    assert_eq!(reason(&status, Code::PermissionDenied), "PERMISSION_DENIED");
    assert!(status.message().contains("CreateOrder"), "{status:?}");
    assert_eq!(s.head().await, 0, "nothing appended");
    // mallory claiming to be alice is still mallory.
    let mut request = as_user(Request::new(create_order("o-a", "", &[("sku-1", 1, 1)])), "mallory", &["orders.write"]);
    request.metadata_mut().insert("x-eventfold-principal", "alice".parse().unwrap());
    assert_eq!(
        reason(&s.orders.create_order(request).await.expect_err("still mallory"), Code::PermissionDenied),
        "PERMISSION_DENIED"
    );
    let request = as_user(Request::new(create_order("o-a", "", &[("sku-1", 1, 1)])), "alice", &["orders.write"]);
    s.orders.create_order(request).await.expect("alice may");
}

/// 1,000 orders race for the stock of 10 products: nothing is oversold,
/// every refused order holds nothing, and retries answer the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_orders_never_oversell() {
    const PRODUCTS: usize = 10;
    const STOCK: u32 = 60;
    const ORDERS: usize = 1000;
    let s = Server::start(postgres().await).await;
    let mut inventory = s.inventory.clone();
    for p in 0..PRODUCTS {
        let product_id = format!("sku-{p}");
        let register = inventory_pb::RegisterProductRequest {
            product_id: product_id.clone(),
            name: format!("Product {p}"),
            ..Default::default()
        };
        inventory.register_product(register).await.expect("register");
        let replenish = inventory_pb::ReplenishStockRequest { product_id, quantity: STOCK, ..Default::default() };
        inventory.replenish_stock(replenish).await.expect("replenish");
    }

    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for o in 0..ORDERS {
        let (mut orders, mut inventory, semaphore) = (s.orders.clone(), s.inventory.clone(), semaphore.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore");
            let order_id = format!("o-{o}");
            let product = format!("sku-{}", (o * 7) % PRODUCTS);
            let quantity = 1 + (o % 3) as u32;
            let create = create_order(&order_id, &format!("create-{o}"), &[(&product, quantity, 100)]);
            let created = orders.create_order(create.clone()).await.expect("create").into_inner();
            let again = orders.create_order(create).await.expect("create again").into_inner();
            assert_eq!(again, created, "retry of create-{o}");
            let reserve = inventory_pb::ReserveStockRequest {
                request_id: format!("reserve-{o}"),
                product_id: product.clone(),
                order_id: order_id.clone(),
                quantity,
            };
            let first = inventory.reserve_stock(reserve.clone()).await;
            {
                // A retry answers exactly what the first call answered.
                let again = inventory.reserve_stock(reserve).await;
                match (&first, &again) {
                    (Ok(a), Ok(b)) => assert_eq!(a.get_ref(), b.get_ref(), "retry of reserve-{o}"),
                    // A refusal is not remembered (AIP-155); stock only
                    // shrinks here, so the retry is refused for the same reason.
                    (Err(a), Err(b)) => {
                        assert_eq!(reason(a, Code::FailedPrecondition), reason(b, Code::FailedPrecondition))
                    }
                    _ => panic!("reserve-{o}: first {first:?}, retry {again:?}"),
                }
            }
            let reserved = match first {
                Ok(_) => true,
                Err(status) => {
                    assert_eq!(reason(&status, Code::FailedPrecondition), "INSUFFICIENT_STOCK");
                    false
                }
            };
            (order_id, product, quantity, reserved)
        }));
    }
    let mut granted: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut refused = Vec::new();
    for task in tasks {
        let (order_id, product, quantity, reserved) = task.await.expect("order task");
        if reserved {
            granted.entry(product).or_default().insert(order_id, quantity);
        } else {
            refused.push((order_id, product));
        }
    }
    assert!(!refused.is_empty(), "the stock was meant to run out");

    let handler = Handler::new(s.log.clone(), SnapshotPolicy::default());
    for p in 0..PRODUCTS {
        let product = format!("sku-{p}");
        let state = handler.load::<Inventory>(&format!("inventory-{product}")).await.expect("load").state;
        assert_eq!(state.available + state.reserved(), u64::from(STOCK), "{product}: available + reserved = stock");
        let expected = granted.remove(&product).unwrap_or_default();
        assert_eq!(state.reservations, expected, "{product}: exactly the granted reservations");
    }
    for (order_id, product) in refused {
        let state = handler.load::<Inventory>(&format!("inventory-{product}")).await.unwrap().state;
        assert!(!state.reservations.contains_key(&order_id), "{order_id} holds a reservation it was refused");
    }
    // The retries appended nothing: one event per order, and per product
    // its registration, its stock and one event per granted reservation.
    for o in 0..ORDERS {
        let order = handler.load::<eventfold_domain::order::Order>(&format!("order-o-{o}")).await.expect("load");
        assert_eq!(order.version, Some(0), "order o-{o} has exactly one event");
    }
    for p in 0..PRODUCTS {
        let loaded = handler.load::<Inventory>(&format!("inventory-sku-{p}")).await.expect("load");
        let events = loaded.version.map_or(0, |v| v + 1);
        assert_eq!(events, 2 + loaded.state.reservations.len() as u64, "sku-{p}: no event beyond the granted ones");
    }
}

/// A snapshot is used only while the stream's chain has, at the snapshot's
/// version, the link recorded with it: one whose link does not match (here
/// rewritten in the table, as a restore from another database or a copy
/// from another stream would leave it) is ignored, and the events decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_link_does_not_match_the_chain_is_ignored() {
    let backend = postgres().await;
    let url = backend.db.as_ref().expect("a database").url().to_owned();
    let mut s = Server::start(backend).await;
    let register =
        inventory_pb::RegisterProductRequest { product_id: "sku-l".into(), name: "Lamp".into(), ..Default::default() };
    s.inventory.register_product(register).await.expect("register");
    let replenish =
        inventory_pb::ReplenishStockRequest { product_id: "sku-l".into(), quantity: 2, ..Default::default() };
    s.inventory.replenish_stock(replenish).await.expect("replenish");
    // The command side's own snapshot, claiming more stock than the events.
    let forged = Snapshot::new(
        "inventory-sku-l",
        SnapshotNamespace::Aggregate,
        1,
        json!({
            "product_id": "sku-l", "name": "Lamp", "registered": true, "available": 1000,
            "reservations": {}, "closed": [], "consumed": 0,
        }),
    );
    let saved = s.log.save_snapshot(forged).await.expect("save");
    let reserve = |order: &str, quantity| inventory_pb::ReserveStockRequest {
        product_id: "sku-l".into(),
        order_id: order.into(),
        quantity,
        ..Default::default()
    };
    // While its link matches, the snapshot is trusted (it is the command
    // side's own namespace): the white-box proof that it is read at all.
    let loaded = Handler::new(s.log.clone(), SnapshotPolicy::default()).load::<Inventory>("inventory-sku-l").await;
    assert_eq!(loaded.unwrap().state.available, 1000);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let mut other = saved.head_hash;
    other[0] ^= 0xff;
    let changed = client
        .execute(
            "UPDATE eventstore.snapshots SET head_hash = $1 WHERE stream_id = 'inventory-sku-l'",
            &[&other.as_slice()],
        )
        .await
        .expect("rewrite the link");
    assert_eq!(changed, 1);
    rejected(s.inventory.reserve_stock(reserve("o-l1", 5)).await, "INSUFFICIENT_STOCK");
    s.inventory.reserve_stock(reserve("o-l2", 2)).await.expect("the events' stock of 2");
}
