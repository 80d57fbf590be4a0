//! Black-box test of the `eventfold` binary: start `eventfold dev` as a
//! child process and talk to it only through the pinned grpcurl, as a user
//! would (reflection, health, Append, ReadStream, Subscribe), then stop it
//! with SIGTERM.

mod common;

use std::{
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::*;

fn event_ids(messages: &[Value]) -> Vec<&str> {
    messages.iter().filter_map(|m| m["event"]["eventId"].as_str()).collect()
}

fn append(server: &DevServer, stream: &str, event_id: &str, n: u64) -> Value {
    server.call(
        &format!("{SERVICE}/Append"),
        &serde_json::json!({
            "streamId": stream,
            "events": [{
                "eventId": event_id,
                "eventType": "OrderCreated",
                "data": {"n": n, "customer": "ada"},
                "metadata": {"correlationId": "corr-1"},
            }],
        }),
    )
}

fn health(server: &DevServer, service: &str) -> String {
    let answer = server.call("grpc.health.v1.Health/Check", &serde_json::json!({ "service": service }));
    answer["status"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn orders_go_through_the_command_services() {
    let server = DevServer::start();
    let orders = "eventfold.orders.v1.OrderCommandService";
    let create = serde_json::json!({
        "requestId": "bb-create-1",
        "orderId": "bb-1",
        "customerId": "c-1",
        "currency": "EUR",
        "items": [{ "productId": "sku-1", "quantity": 2, "unitPrice": { "minor": "1250", "currency": "EUR" } }],
    });
    let created = server.call(&format!("{orders}/CreateOrder"), &create);
    assert_eq!(created["total"], serde_json::json!({ "minor": "2500", "currency": "EUR" }), "{created}");
    assert_eq!(created["result"]["streamId"], "order-bb-1", "{created}");
    assert_eq!(server.call(&format!("{orders}/CreateOrder"), &create), created, "a retry answers the first answer");

    let confirmed = server.call(&format!("{orders}/ConfirmOrder"), &serde_json::json!({ "orderId": "bb-1" }));
    assert_eq!(confirmed["result"]["streamVersion"], "1", "{confirmed}");

    let output = server
        .grpcurl(&["-d", r#"{"orderId": "bb-1"}"#, &server.addr, &format!("{orders}/ConfirmOrder")])
        .output()
        .expect("run grpcurl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("Code: FailedPrecondition"), "{stderr}");
    assert!(stderr.contains(r#""reason":"ORDER_ALREADY_CONFIRMED""#), "{stderr}");

    let read = server.call(&format!("{SERVICE}/ReadStream"), &serde_json::json!({ "streamId": "order-bb-1" }));
    let events = read["events"].as_array().unwrap_or_else(|| panic!("no events: {read}"));
    let types: Vec<&str> = events.iter().filter_map(|e| e["eventType"].as_str()).collect();
    assert_eq!(types, ["OrderCreated", "OrderConfirmed"], "{read}");
    assert_eq!(events[0]["schemaVersion"], 2, "{read}");
    assert_eq!(events[0]["data"]["total"], serde_json::json!({ "minor": 2500, "currency": "EUR" }), "{read}");
    assert_eq!(events[1]["globalPosition"], confirmed["result"]["globalPosition"], "{read}");
}

/// `eventfold dev --database-url`: the read side runs too; a query with a
/// command's position sees the command's write.
/// CreateOrder with a payment token on `eventfold dev` (PostgreSQL) starts
/// the fulfilment saga; WatchSaga streams its steps until it completed.
#[test]
fn watch_saga_streams_the_steps_of_a_saga_started_by_create_order() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    // Slow sandbox calls, so that the steps are seen one by one.
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &[("EVENTFOLD_SAGA__SANDBOX__LATENCY_MS", "300")],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    watch_a_fulfilment_saga(&server);
    let order = server.call("eventfold.query.v1.OrderQueryService/GetOrder", &serde_json::json!({"orderId": "w-1"}));
    assert_eq!(order["order"]["status"], "ORDER_STATUS_CONFIRMED", "{order}");
}

/// The same on the embedded default, plain `eventfold dev` (in memory, no
/// PostgreSQL): the sagas run there too.
#[test]
fn watch_saga_streams_the_steps_of_a_saga_on_the_in_memory_dev_server() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_SAGA__SANDBOX__LATENCY_MS", "300")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    watch_a_fulfilment_saga(&server);
    // No read side in memory: the order's own stream shows it confirmed.
    let read = serde_json::json!({"streamId": "order-w-1"});
    let order = server.call("eventfold.eventstore.v1.EventStoreService/ReadStream", &read);
    let types: Vec<&str> =
        order["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    assert_eq!(types.last(), Some(&"OrderConfirmed"), "{order}");
}

/// CreateOrder with a payment token on `server`; WatchSaga streams the
/// saga's steps until it completed, and its lifecycle events are in the
/// event store.
fn watch_a_fulfilment_saga(server: &DevServer) {
    let list = server.run(&[&server.addr, "list"]);
    assert!(list.lines().any(|l| l.trim() == "eventfold.sagas.v1.SagaService"), "{list}");
    let inventory = "eventfold.inventory.v1.InventoryCommandService";
    server.call(&format!("{inventory}/RegisterProduct"), &serde_json::json!({"productId": "sku-w", "name": "Kettle"}));
    server.call(&format!("{inventory}/ReplenishStock"), &serde_json::json!({"productId": "sku-w", "quantity": 5}));
    let create = serde_json::json!({
        "orderId": "w-1", "customerId": "c-1", "currency": "EUR", "paymentToken": "tok_visa", "carrier": "DHL",
        "items": [{ "productId": "sku-w", "quantity": 2, "unitPrice": { "minor": "1500", "currency": "EUR" } }],
    });
    server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &create);

    // The intake starts the saga shortly after the order: watch as soon as
    // it exists.
    let watch = serde_json::json!({"sagaId": "fulfil-w-1"}).to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let Output { status, stdout, stderr } = server
            .grpcurl(&["-d", &watch, &server.addr, "eventfold.sagas.v1.SagaService/WatchSaga"])
            .output()
            .expect("run grpcurl");
        if status.success() {
            break String::from_utf8_lossy(&stdout).into_owned();
        }
        let stderr = String::from_utf8_lossy(&stderr);
        assert!(stderr.contains("NotFound"), "WatchSaga failed other than NOT_FOUND: {stderr}");
        assert!(Instant::now() < deadline, "the saga was not started within 20 s");
        thread::sleep(Duration::from_millis(50));
    };
    let messages: Vec<Value> =
        serde_json::Deserializer::from_str(&out).into_iter::<Value>().map(|m| m.expect("JSON message")).collect();
    assert!(messages.len() >= 2, "the changes are streamed one by one: {out}");
    let last = &messages.last().unwrap()["saga"];
    assert_eq!(last["status"], "SAGA_STATUS_COMPLETED", "the stream ends with the finished saga: {out}");
    let steps: Vec<&str> = last["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["RESERVE_INVENTORY", "AUTHORIZE_PAYMENT", "CREATE_SHIPPING_LABEL", "CONFIRM_ORDER"]);
    let versions: Vec<i64> =
        messages.iter().map(|m| m["saga"]["version"].as_str().map_or(0, |v| v.parse().unwrap())).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "each message a newer state: {versions:?}");
    assert!(
        messages
            .iter()
            .any(|m| m["saga"]["currentStep"] == "CREATE_SHIPPING_LABEL"
                || m["saga"]["currentStep"] == "AUTHORIZE_PAYMENT"),
        "a step in progress was seen: {out}"
    );

    let got = server.call("eventfold.sagas.v1.SagaService/GetSaga", &serde_json::json!({"sagaId": "fulfil-w-1"}));
    assert_eq!(got["saga"]["correlationId"], "w-1");
    let listed = server.call(
        "eventfold.sagas.v1.SagaService/ListSagas",
        &serde_json::json!({"type": "SAGA_TYPE_ORDER_FULFILMENT", "status": "SAGA_STATUS_COMPLETED"}),
    );
    assert_eq!(listed["sagas"].as_array().map(Vec::len), Some(1), "{listed}");
    // An operator cannot abort what finished.
    let Output { status, stderr, .. } = server
        .grpcurl(&["-d", &watch, &server.addr, "eventfold.sagas.v1.SagaService/AbortSaga"])
        .output()
        .expect("run grpcurl");
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("FailedPrecondition") && stderr.contains("SAGA_NOT_RUNNING"), "{stderr}");
    let lifecycle = server.call(
        "eventfold.eventstore.v1.EventStoreService/ReadStream",
        &serde_json::json!({"streamId": "saga-fulfil-w-1"}),
    );
    let types: Vec<&str> =
        lifecycle["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    let ended = "SagaStepEnded";
    assert_eq!(types, ["SagaStarted", ended, ended, ended, ended, "SagaCompleted"], "{lifecycle}");
}

/// `eventfold serve saga`: the orchestrator and SagaService as a process of
/// their own, with health and reflection.
#[test]
fn serve_saga_answers_with_health_and_reflection() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let server = DevServer::start_command(
        &["serve", "saga", "--listen", "127.0.0.1:0"],
        &["--database-url", db.url()],
        // Not about authentication (tests/auth.rs is): switched off.
        &[("EVENTFOLD_AUTH__ENABLED", "false")],
        "eventfold: saga orchestrator and SagaService listening on ",
    );
    let list = server.run(&[&server.addr, "list"]);
    assert!(list.lines().any(|l| l.trim() == "eventfold.sagas.v1.SagaService"), "{list}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server, "eventfold.sagas.v1.SagaService") != "SERVING" {
        assert!(Instant::now() < deadline, "SagaService did not become SERVING");
        thread::sleep(Duration::from_millis(100));
    }
    let listed = server.call("eventfold.sagas.v1.SagaService/ListSagas", &serde_json::json!({}));
    assert!(listed.get("sagas").is_none(), "no sagas yet: {listed}");
    let Output { status, stderr, .. } = server
        .grpcurl(&["-d", r#"{"sagaId": "nope"}"#, &server.addr, "eventfold.sagas.v1.SagaService/GetSaga"])
        .output()
        .expect("run grpcurl");
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("NotFound") && stderr.contains("SAGA_NOT_FOUND"), "{stderr}");
}

#[test]
fn dev_on_postgres_answers_queries_with_read_your_writes() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let server = DevServer::start_with(
        &["--database-url", db.url()],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let list = server.run(&[&server.addr, "list"]);
    for service in ["eventfold.query.v1.OrderQueryService", "eventfold.query.v1.AccountQueryService"] {
        assert!(list.lines().any(|l| l.trim() == service), "list lacks {service}:\n{list}");
    }
    for n in 0..5 {
        let create = serde_json::json!({
            "orderId": format!("pg-{n}"),
            "customerId": "c-1",
            "currency": "EUR",
            "items": [{ "productId": "sku-1", "quantity": 1, "unitPrice": { "minor": "100", "currency": "EUR" } }],
        });
        let created = server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &create);
        let position = created["result"]["globalPosition"].as_str().unwrap_or_else(|| panic!("{created}")).to_owned();
        let got = server.call(
            "eventfold.query.v1.OrderQueryService/GetOrder",
            &serde_json::json!({ "orderId": format!("pg-{n}"), "minPosition": position }),
        );
        assert_eq!(got["order"]["status"], "ORDER_STATUS_CREATED", "{got}");
        assert_eq!(got["order"]["total"]["minor"], "100", "{got}");
    }
    let listed = server.call("eventfold.query.v1.OrderQueryService/ListOrders", &serde_json::json!({ "pageSize": 3 }));
    assert_eq!(listed["orders"].as_array().map(Vec::len), Some(3), "{listed}");
    assert!(listed["nextPageToken"].as_str().is_some_and(|t| !t.is_empty()), "{listed}");
    assert_eq!(health(&server, "eventfold.query.v1.OrderQueryService"), "SERVING");
}

#[test]
fn dev_server_speaks_grpc_to_grpcurl() {
    let server = DevServer::start();
    let addr = server.addr.clone();

    // Reflection.
    let list = server.run(&[&addr, "list"]);
    let services: Vec<&str> = list.lines().map(str::trim).collect();
    assert!(services.contains(&SERVICE), "list:\n{list}");
    assert!(services.contains(&"grpc.health.v1.Health"), "list:\n{list}");
    let described = server.run(&[&addr, "describe", SERVICE]);
    assert!(described.contains(&format!("{SERVICE} is a service")), "describe:\n{described}");
    for rpc in ["rpc Append", "rpc ReadStream", "rpc Subscribe", "returns ( stream "] {
        assert!(described.contains(rpc), "describe lacks {rpc:?}:\n{described}");
    }

    // Health: SERVING once the first probe has run.
    for service in ["", SERVICE] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = health(&server, service);
            if status == "SERVING" {
                break;
            }
            assert!(Instant::now() < deadline, "health of {service:?} is {status:?}, not SERVING");
            thread::sleep(Duration::from_millis(100));
        }
    }

    // Append, then read it back.
    let first_id = "0190a8f2-0000-7000-8000-000000000001";
    let appended = append(&server, "order-1", first_id, 1);
    assert_eq!(appended["streamId"], "order-1", "{appended}");
    assert_eq!(appended["positions"], serde_json::json!(["1"]), "{appended}");
    assert_eq!(appended["lastPosition"], "1", "{appended}");

    let read = server.call(&format!("{SERVICE}/ReadStream"), &serde_json::json!({ "streamId": "order-1" }));
    let events = read["events"].as_array().unwrap_or_else(|| panic!("no events: {read}"));
    assert_eq!(events.len(), 1, "{read}");
    assert_eq!(events[0]["eventId"], first_id);
    assert_eq!(events[0]["streamId"], "order-1");
    assert_eq!(events[0]["eventType"], "OrderCreated");
    assert_eq!(events[0]["data"], serde_json::json!({"n": 1, "customer": "ada"}));
    assert_eq!(events[0]["metadata"]["correlationId"], "corr-1");
    assert_eq!(events[0]["globalPosition"], "1");
    assert_eq!(read["endOfStream"], true, "{read}");

    // An error surfaces as a gRPC status with details.
    let output = server
        .grpcurl(&["-d", r#"{"streamId": ""}"#, &addr, &format!("{SERVICE}/ReadStream")])
        .output()
        .expect("run grpcurl");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(stderr.contains("google.rpc.BadRequest") && stderr.contains(r#""field":"stream_id""#), "{stderr}");

    // Subscribe from position 0: the history, caught up, then a live event.
    let subscriber = server.subscribe(&serde_json::json!({ "fromPosition": "0" }));
    subscriber.wait_for("history and caughtUp", |m| {
        event_ids(m) == [first_id] && m.iter().any(|m| m.get("caughtUp").is_some())
    });
    let second_id = "0190a8f2-0000-7000-8000-000000000002";
    let appended = append(&server, "order-2", second_id, 2);
    assert_eq!(appended["lastPosition"], "2", "{appended}");
    let messages = subscriber.wait_for("live event", |m| event_ids(m).contains(&second_id));
    assert_eq!(event_ids(&messages), [first_id, second_id]);
    let caught_up = messages.iter().position(|m| m.get("caughtUp").is_some()).expect("caughtUp");
    let live = messages.iter().position(|m| m["event"]["eventId"] == second_id).expect("live event");
    assert!(caught_up < live, "caughtUp comes before the live event: {messages:?}");
    drop(subscriber);

    // SIGTERM: a live subscription ends cleanly and the server exits 0.
    let open = server.subscribe(&serde_json::json!({ "streamId": "order-2" }));
    open.wait_for("the stream's event", |m| event_ids(m) == [second_id]);
    let DevServer { mut process, .. } = server;
    let pid = process.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(killed.success(), "kill -TERM {pid}: {killed}");
    let status = wait_timeout(&mut process.child, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("eventfold dev did not exit within 10 s of SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}; stderr:\n{}",
        process.stderr.lock().unwrap()
    );
    let mut open = open;
    let ended = wait_timeout(&mut open.process.child, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the subscription did not end with the server"));
    assert!(
        ended.success(),
        "the subscription ends with status OK on shutdown ({ended}); stderr:\n{}",
        open.process.stderr.lock().unwrap()
    );
}

#[test]
fn dump_config_prints_toml() {
    let output = eventfold().arg("--dump-config").output().expect("run eventfold --dump-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("[eventstore]"), "{stdout}");
    let config: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"));
    assert_eq!(config["eventstore"]["listen"].as_str(), Some("127.0.0.1:50051"), "{stdout}");
    assert!(config["database"].get("url").is_none(), "no database URL by default: {stdout}");

    // Flags and the environment are layered in.
    let output = eventfold()
        .args(["dev", "--listen", "127.0.0.1:6000", "--dump-config"])
        .env("EVENTFOLD_DATABASE__POOL_SIZE", "3")
        .output()
        .expect("run eventfold dev --dump-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}", output.status);
    let config: toml::Table = toml::from_str(&stdout).expect("TOML");
    assert_eq!(config["eventstore"]["listen"].as_str(), Some("127.0.0.1:6000"), "{stdout}");
    assert_eq!(config["database"]["pool_size"].as_integer(), Some(3), "{stdout}");
}

#[test]
fn serve_without_database_url_is_a_usage_error() {
    let output = eventfold().args(["serve", "eventstore"]).output().expect("run eventfold serve eventstore");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "exit status: {:?}; stderr:\n{stderr}", output.status);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&output.stdout));
}

/// A bad `[auth.jwt]` stops the process before it starts, in one line
/// that names the setting and not the secret.
#[test]
fn a_short_jwt_secret_is_a_usage_error_that_does_not_show_it() {
    let output = eventfold()
        .args(["serve", "eventstore", "--database-url", "postgresql://nobody@127.0.0.1:1/none"])
        .env("EVENTFOLD_AUTH__JWT__HS256_SECRET", "short-s3cret")
        .output()
        .expect("run eventfold serve eventstore");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "exit status: {:?}; stderr:\n{stderr}", output.status);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.contains("auth.jwt.hs256_secret") && !stderr.contains("short-s3cret"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&output.stdout));
}

/// The test-only variables share the `EVENTFOLD_` prefix; setting them must
/// not make the configuration invalid.
#[test]
fn test_only_variables_are_not_configuration() {
    let test_only: Vec<&str> = eventfold_platform::config::ENV_VARS
        .iter()
        .filter(|(_, what)| what.starts_with("tests only"))
        .map(|(name, _)| *name)
        .collect();
    assert!(test_only.len() >= 8, "{test_only:?}");
    let mut command = eventfold();
    for name in &test_only {
        command.env(name, "x");
    }
    let output = command.arg("--dump-config").output().expect("run eventfold --dump-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "with {test_only:?} set: {stderr}");
    let dumped = String::from_utf8_lossy(&output.stdout);
    assert!(dumped.contains("[command]") && dumped.contains("[eventstore]"), "{dumped}");
}

/// `eventfold projections rebuild` builds the next version beside the
/// active one and switches; `list` shows both.
#[test]
fn projections_rebuild_and_list() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let url = db.url().to_owned();
    // Three orders through the command bus: three events to project.
    runtime.block_on(async {
        use eventfold_domain::order::{CreateOrder, OrderItem};
        use tower::ServiceExt;
        let store = eventfold_store::PostgresEventLog::connect(
            eventfold_store::Database::from_url(&url).expect("a PostgreSQL URL"),
            eventfold_store::PostgresConfig::default(),
        )
        .await
        .unwrap();
        let bus = eventfold_command::bus(std::sync::Arc::new(store), eventfold_command::BusOptions::default());
        for o in 0..3 {
            let eur = "EUR".parse().unwrap();
            let items = vec![OrderItem {
                product_id: "sku".into(),
                quantity: 1,
                unit_price: eventfold_domain::Money::new(100, eur),
            }];
            let create = CreateOrder {
                order_id: format!("o-{o}"),
                customer_id: "c".into(),
                currency: eur,
                items,
                payment_token: None,
                carrier: None,
            };
            let command = eventfold_command::Command::Order { order_id: format!("o-{o}"), command: create.into() };
            let envelope = eventfold_command::Envelope::new(command, eventfold_command::Meta::default());
            bus.clone().oneshot(envelope).await.expect("create an order");
        }
    });
    let projections = |args: &[&str]| {
        let output = eventfold()
            .args(["projections", "--database-url", &url])
            .args(args)
            .env("EVENTFOLD_LOG__FILTER", "warn")
            .output()
            .expect("run eventfold projections");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(output.status.success(), "projections {args:?} failed:\n{stdout}\n{stderr}");
        (stdout, stderr)
    };
    let (out, progress) = projections(&["rebuild", "order_views"]);
    assert!(out.contains("order_views: version 1 built"), "{out}");
    assert!(progress.contains("order_views v1 ["), "a progress bar on stderr: {progress}");
    let (out, _) = projections(&["rebuild", "order_views"]);
    assert!(out.contains("order_views: version 2 built"), "{out}");
    let (list, _) = projections(&["list"]);
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!((rows[0][0], rows[0][1], rows[1][1], rows[1][2]), ("order_views", "1", "2", "yes"), "{list}");
    // position, applied, behind, parked, state of version 2: all three
    // orders.
    assert_eq!(&rows[1][3..], ["3", "3", "0", "0", "running"], "{list}");
    let (out, _) = projections(&["stop", "order_views"]);
    assert!(out.contains("order_views: stopped"), "{out}");
    let (list, _) = projections(&["list"]);
    assert!(list.lines().skip(1).all(|l| l.ends_with("stopped")), "{list}");
    projections(&["start", "order_views"]);
    let (list, _) = projections(&["list"]);
    assert!(list.lines().skip(1).all(|l| l.trim_end().ends_with("running")), "{list}");
    let (parked, _) = projections(&["parked", "order_views"]);
    assert_eq!(parked.lines().count(), 1, "a header, no parked event: {parked}");
    let output = eventfold()
        .args(["projections", "--database-url", &url, "status", "nope"])
        .output()
        .expect("run eventfold projections status");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no projection \"nope\""));
}

/// `eventfold schemas check`: removing a field without a default fails,
/// adding one with a default passes.
#[test]
fn schemas_check_fails_on_an_incompatible_change_and_passes_a_compatible_one() {
    let repo = tempfile::tempdir().expect("a temporary repository");
    let root = repo.path();
    let git = |args: &[&str]| {
        let status = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"])
            .args(args)
            .status()
            .expect("run git");
        assert!(status.success(), "git {args:?}");
    };
    let dir = root.join("schemas/avro/eventfold.orders.v1");
    std::fs::create_dir_all(&dir).unwrap();
    let schema = |fields: &str| {
        format!(
            r#"{{"type": "record", "name": "OrderShipped", "namespace": "eventfold.orders.v1", "fields": [{fields}]}}"#
        )
    };
    let base = r#"{"name": "order_id", "type": "string"}, {"name": "carrier", "type": "string"}"#;
    std::fs::write(dir.join("OrderShipped.v1.avsc"), schema(base)).unwrap();
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "schemas"]);
    let check = || {
        eventfold()
            .args(["schemas", "check", "--repo"])
            .arg(root)
            .args(["--against", "HEAD"])
            .output()
            .expect("run eventfold schemas check")
    };

    std::fs::write(dir.join("OrderShipped.v1.avsc"), schema(r#"{"name": "order_id", "type": "string"}"#)).unwrap();
    let removed = check();
    let stderr = String::from_utf8_lossy(&removed.stderr);
    assert!(!removed.status.success(), "removing carrier (no default) must fail");
    assert!(stderr.contains("OrderShipped.v1.avsc"), "names the file: {stderr}");

    let added = format!(r#"{base}, {{"name": "note", "type": "string", "default": ""}}"#);
    std::fs::write(dir.join("OrderShipped.v1.avsc"), schema(&added)).unwrap();
    let output = check();
    assert!(
        output.status.success(),
        "adding a field with a default passes: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
