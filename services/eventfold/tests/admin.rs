//! `eventfold.admin.v1.AdminService` (issue 18) on `eventfold dev
//! --database-url`: projections listed with their lag, rebuilt beside the
//! serving version, stopped and started; an event no projection can apply
//! parked, listed and replayed; the platform's status; bad requests
//! refused with their field; the same projections as `eventfold
//! projections list` prints; REST through the gateway.

mod common;

use std::{
    process::Output,
    time::{Duration, Instant},
};

use common::DevServer;
use serde_json::{Value, json};

const ADMIN: &str = "eventfold.admin.v1.AdminService";

fn call(server: &DevServer, method: &str, request: &Value) -> Value {
    server.call(&format!("{ADMIN}/{method}"), request)
}

/// The error of a call that must fail (grpcurl `-format-error` JSON).
fn refused(server: &DevServer, method: &str, request: &Value) -> Value {
    let Output { status, stdout, stderr } = server
        .grpcurl(&["-format-error", "-d", &request.to_string(), &server.addr, &format!("{ADMIN}/{method}")])
        .output()
        .expect("run grpcurl");
    assert!(!status.success(), "{method} {request} should fail: {}", String::from_utf8_lossy(&stdout));
    serde_json::from_slice(&stdout)
        .or_else(|_| serde_json::from_slice(&stderr))
        .unwrap_or_else(|_| panic!("no JSON error: {}", String::from_utf8_lossy(&stderr)))
}

fn detail<'a>(error: &'a Value, kind: &str) -> &'a Value {
    error["details"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind))))
        .unwrap_or_else(|| panic!("no {kind} in {error}"))
}

/// The versions of `name` in a ListProjections answer.
fn versions<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list["projections"].as_array().map_or_else(Vec::new, |all| all.iter().filter(|p| p["name"] == name).collect())
}

fn number(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {value}")),
        Value::Number(n) => n.as_u64().unwrap_or_else(|| panic!("not a u64: {value}")),
        Value::Null => 0,
        other => panic!("not a number: {other}"),
    }
}

/// Waits until every active projection has caught up with the log.
fn caught_up(server: &DevServer) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = call(server, "ListProjections", &json!({}));
        let projections = list["projections"].as_array().cloned().unwrap_or_default();
        if !projections.is_empty() && projections.iter().all(|p| number(&p["lagEvents"]) == 0) {
            return list;
        }
        assert!(Instant::now() < deadline, "projections never caught up: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn projections_are_listed_rebuilt_stopped_and_their_parked_events_replayed() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &[("EVENTFOLD_PROJECTOR__MAX_ATTEMPTS", "1")],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    for n in 0..3 {
        let order = json!({
            "orderId": format!("a-{n}"), "customerId": "c-1", "currency": "EUR",
            "items": [{"productId": "sku-a", "quantity": 1, "unitPrice": {"minor": "500", "currency": "EUR"}}],
        });
        server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order);
    }
    // An OrderCreated no projection can read: parked.
    let append =
        json!({"streamId": "order-broken", "events": [{"eventType": "OrderCreated", "data": {"nonsense": true}}]});
    server.call("eventfold.eventstore.v1.EventStoreService/Append", &append);

    let list = caught_up(&server);
    let head = number(&list["headPosition"]);
    assert_eq!(head, 4, "three orders and the broken event: {list}");
    let orders = versions(&list, "order_views");
    assert_eq!(orders.len(), 1, "{list}");
    assert_eq!((orders[0]["version"].as_u64(), orders[0]["active"].as_bool()), (Some(1), Some(true)), "{list}");
    assert_eq!(number(&orders[0]["position"]), head);
    assert_eq!(number(&orders[0]["parkedEvents"]), 1, "the broken event is parked: {list}");

    // Parked events: listed, replayed (still failing: nothing fixed it).
    let parked = call(&server, "ListParkedEvents", &json!({"name": "order_views"}));
    let events = parked["parkedEvents"].as_array().unwrap_or_else(|| panic!("{parked}"));
    assert_eq!(events.len(), 1, "{parked}");
    assert_eq!(
        (events[0]["streamId"].as_str(), events[0]["eventType"].as_str()),
        (Some("order-broken"), Some("OrderCreated"))
    );
    assert_eq!(number(&events[0]["globalPosition"]), 4);
    assert!(!events[0]["error"].as_str().unwrap_or_default().is_empty(), "{parked}");
    let replayed = call(&server, "ReplayParkedEvents", &json!({"name": "order_views"}));
    assert_eq!(
        (replayed["version"].as_u64(), number(&replayed["applied"]), number(&replayed["stillParked"])),
        (Some(1), 0, 1),
        "{replayed}"
    );

    // A rebuild: version 2 built beside version 1, then active.
    let rebuilt = call(&server, "RebuildProjection", &json!({"name": "order_views"}));
    let projection = &rebuilt["projection"];
    assert_eq!((projection["version"].as_u64(), projection["active"].as_bool()), (Some(2), Some(true)), "{rebuilt}");
    assert_eq!(number(&projection["position"]), head, "{rebuilt}");
    assert_eq!(number(&projection["parkedEvents"]), 1, "the new version parks it too: {rebuilt}");
    assert!(rebuilt["elapsed"].as_str().is_some_and(|e| e.ends_with('s')), "{rebuilt}");
    let list = call(&server, "ListProjections", &json!({}));
    let active: Vec<u64> = versions(&list, "order_views")
        .iter()
        .filter(|p| p["active"] == true)
        .filter_map(|p| p["version"].as_u64())
        .collect();
    assert_eq!(active, [2], "{list}");
    let order = server.call("eventfold.query.v1.OrderQueryService/GetOrder", &json!({"orderId": "a-1"}));
    assert_eq!(order["order"]["orderId"], "a-1", "queries read the rebuilt version: {order}");

    // Stop and start.
    let stopped = call(&server, "StopProjection", &json!({"name": "order_views"}));
    assert!(
        stopped["projections"].as_array().is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["stopped"] == true)),
        "{stopped}"
    );
    let started = call(&server, "StartProjection", &json!({"name": "order_views"}));
    assert!(started["projections"].as_array().is_some_and(|p| p.iter().all(|p| p["stopped"] != true)), "{started}");

    // The platform's status: the head, the projections, this process's
    // dependencies.
    let status = call(&server, "GetPlatformStatus", &json!({}));
    assert_eq!(number(&status["headPosition"]), head, "{status}");
    assert_eq!(status["ready"], true, "{status}");
    let dependencies = status["dependencies"].as_array().unwrap_or_else(|| panic!("{status}"));
    assert!(dependencies.iter().any(|d| d["name"] == "postgresql" && d["up"] == true), "{status}");
    assert_eq!(status["projections"].as_array().map(Vec::len), list["projections"].as_array().map(Vec::len));

    // Bad requests: the field, or the projection unknown.
    let error = refused(&server, "RebuildProjection", &json!({"name": "Order Views"}));
    assert_eq!(error["code"], 3, "{error}");
    assert_eq!(detail(&error, "BadRequest")["fieldViolations"][0]["field"], "name", "{error}");
    let error = refused(&server, "ResetProjection", &json!({"name": "no_such_view"}));
    assert_eq!(error["code"], 5, "{error}");
    assert_eq!(detail(&error, "ErrorInfo")["reason"], "PROJECTION_NOT_FOUND", "{error}");
    let error = refused(&server, "ListDeadLetters", &json!({"topic": "a/b"}));
    assert_eq!(detail(&error, "BadRequest")["fieldViolations"][0]["field"], "topic", "{error}");
    // No bus in dev: no dead letters to list.
    let error = refused(&server, "ListDeadLetters", &json!({"topic": "eventfold.orders.v1"}));
    let reason = detail(&error, "ErrorInfo")["reason"].as_str();
    assert_eq!((error["code"].as_u64(), reason), (Some(9), Some("KAFKA_NOT_CONFIGURED")), "{error}");

    // The CLI lists the same versions, in its own unchanged table.
    let output = common::eventfold()
        .args(["projections", "--database-url", db.url(), "list"])
        .env("EVENTFOLD_LOG__FILTER", "warn")
        .output()
        .expect("run eventfold projections list");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("projection "), "{table}");
    let rows = table.lines().skip(1).count();
    assert_eq!(Some(rows), list["projections"].as_array().map(Vec::len), "{table}\n{list}");

    // Over REST through the gateway, as an operator's script would.
    let rest = server.rest_addr();
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{rest}/v1/admin/projections/order_views/parkedEvents")])
        .output()
        .expect("run curl");
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    // Every version's: version 1 and the rebuilt version 2 parked it.
    let parked_versions: Vec<u64> = answer["parkedEvents"]
        .as_array()
        .map(|p| p.iter().filter_map(|e| e["version"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(parked_versions, [1, 2], "{answer}");
}

/// `eventfold serve eventstore` with brokers: the dead letters of a topic
/// (none yet) listed and replayed over gRPC; without a registry a replay
/// is FAILED_PRECONDITION.
#[test]
fn dead_letters_are_listed_and_replayed_on_a_server_with_a_bus() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let broker = eventfold_tests::kafka::Broker::start();
    let registry = runtime.block_on(eventfold_tests::registry::RegistryStandIn::start());
    let (brokers, registry_url) = (format!("[\"{}\"]", broker.bootstrap()), registry.url());
    let start = |with_registry: bool| {
        let mut env = vec![("EVENTFOLD_AUTH__ENABLED", "false"), ("EVENTFOLD_RELAY__BROKERS", brokers.as_str())];
        if with_registry {
            env.push(("EVENTFOLD_REGISTRY__URL", registry_url.as_str()));
        }
        DevServer::start_command(
            &["serve", "eventstore", "--listen", "127.0.0.1:0"],
            &["--database-url", db.url()],
            &env,
            "eventfold: EventStoreService listening on ",
        )
    };
    let server = start(true);
    let listed = call(&server, "ListDeadLetters", &json!({"topic": "eventfold.orders.v1"}));
    assert_eq!(listed.get("deadLetters").and_then(Value::as_array).map_or(0, Vec::len), 0, "{listed}");
    let replayed = call(&server, "ReplayDeadLetters", &json!({"topic": "eventfold.orders.v1"}));
    assert_eq!(
        replayed.get("consumers").and_then(Value::as_array).map_or(0, Vec::len),
        0,
        "nothing pending: {replayed}"
    );
    drop(server);
    let server = start(false);
    let error = refused(&server, "ReplayDeadLetters", &json!({"topic": "eventfold.orders.v1"}));
    let reason = detail(&error, "ErrorInfo")["reason"].as_str();
    assert_eq!((error["code"].as_u64(), reason), (Some(9), Some("REGISTRY_NOT_CONFIGURED")), "{error}");
    drop((broker, registry));
}
