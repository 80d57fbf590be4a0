//! One trace per order (issue 18): a CreateOrder sent with a W3C
//! `traceparent` produces, in an OTLP collector running in this test, one
//! trace holding the call's server span, the command, the append, the
//! projections applying its events and the saga's steps with the commands
//! they send; in the Kafka-fed variant, the relay's publication and the
//! consumer's receipt too. Every span of the trace hangs off another one
//! of it (or off the caller's span).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use common::{DevServer, spawn_process};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use serde_json::json;

/// The caller's trace and span: every span of the order's trace descends
/// from this one.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Spans the collector received, by span id, until `done` holds for the
/// spans of [`TRACE_ID`] (or 60 s pass).
fn collect(
    runtime: &tokio::runtime::Runtime,
    collector: &mut FakeCollectorServer,
    done: impl Fn(&BTreeMap<String, ExportedSpan>) -> bool,
) -> BTreeMap<String, ExportedSpan> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spans = BTreeMap::new();
    loop {
        for span in runtime.block_on(collector.exported_spans(1, Duration::from_millis(500))) {
            if span.trace_id == TRACE_ID {
                spans.insert(span.span_id.clone(), span);
            }
        }
        if done(&spans) {
            return spans;
        }
        assert!(Instant::now() < deadline, "the trace never completed: {:#?}", names(&spans));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(spans: &BTreeMap<String, ExportedSpan>) -> Vec<String> {
    spans.values().map(|s| format!("{} ({})", s.name, s.kind)).collect()
}

fn count(spans: &BTreeMap<String, ExportedSpan>, name: impl Fn(&str) -> bool) -> usize {
    spans.values().filter(|s| name(&s.name)).count()
}

/// Every span's parent is a span of the trace or the caller's span: one
/// connected tree.
fn assert_connected(spans: &BTreeMap<String, ExportedSpan>) {
    for span in spans.values() {
        assert!(
            span.parent_span_id == CALLER_SPAN || spans.contains_key(&span.parent_span_id),
            "{} has a parent outside the trace ({}): {:#?}",
            span.name,
            span.parent_span_id,
            names(spans)
        );
    }
}

/// The parent chain of the first span named `name`, up to the caller.
fn ancestry(spans: &BTreeMap<String, ExportedSpan>, name: &str) -> Vec<String> {
    let mut chain = Vec::new();
    let mut current = spans.values().find(|s| s.name == name);
    while let Some(span) = current {
        chain.push(span.name.clone());
        current = spans.get(&span.parent_span_id);
    }
    chain
}

fn create_order(server: &DevServer, order_id: &str, token: Option<&str>) {
    let mut order = json!({
        "orderId": order_id, "customerId": "c-1", "currency": "EUR", "carrier": "DHL",
        "items": [{"productId": "sku-t", "quantity": 1, "unitPrice": {"minor": "900", "currency": "EUR"}}],
    });
    if let Some(token) = token {
        order["paymentToken"] = json!(token);
    }
    let traceparent = format!("traceparent: 00-{TRACE_ID}-{CALLER_SPAN}-01");
    server.run(&[
        "-H",
        &traceparent,
        "-d",
        &order.to_string(),
        &server.addr,
        "eventfold.orders.v1.OrderCommandService/CreateOrder",
    ]);
}

#[test]
fn one_trace_holds_the_call_the_append_the_projections_and_the_saga_steps() {
    let runtime = runtime();
    let mut collector = runtime.block_on(FakeCollectorServer::start()).expect("start the collector");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let endpoint = collector.endpoint();
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &[
            ("EVENTFOLD_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
            ("EVENTFOLD_SAGA__SANDBOX__LATENCY_MS", "10"),
            // Export every 200 ms instead of every 5 s (the SDK's setting).
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let inventory = "eventfold.inventory.v1.InventoryCommandService";
    server.call(&format!("{inventory}/RegisterProduct"), &json!({"productId": "sku-t", "name": "Kettle"}));
    server.call(&format!("{inventory}/ReplenishStock"), &json!({"productId": "sku-t", "quantity": 5}));
    create_order(&server, "t-1", Some("tok_visa"));

    let spans = collect(&runtime, &mut collector, |spans| {
        count(spans, |n| n.starts_with("saga step")) >= 4
            && count(spans, |n| n == "apply order_views") >= 2
            && count(spans, |n| n == "ConfirmOrder") >= 1
    });
    let server_span = spans
        .values()
        .find(|s| s.name == "eventfold.orders.v1.OrderCommandService/CreateOrder")
        .unwrap_or_else(|| panic!("no CreateOrder server span: {:#?}", names(&spans)));
    assert_eq!(server_span.parent_span_id, CALLER_SPAN, "the server span continues the caller's trace");
    assert!(server_span.kind.to_lowercase().contains("server"), "{}", server_span.kind);
    assert_eq!(
        ancestry(&spans, "CreateOrder"),
        ["CreateOrder", "eventfold.orders.v1.OrderCommandService/CreateOrder"],
        "the command inside the call"
    );
    let append = spans
        .values()
        .find(|s| s.name == "append" && spans.get(&s.parent_span_id).is_some_and(|p| p.name == "CreateOrder"))
        .unwrap_or_else(|| panic!("no append under CreateOrder: {:#?}", names(&spans)));
    // The collector keeps attribute values in their protobuf Debug form.
    assert!(append.attributes.get("stream").is_some_and(|v| v.contains("\"order-t-1\"")), "{:?}", append.attributes);
    // The projections applied the order's events in its trace, under the
    // command that appended them.
    let applied_under = |projection: &str, command: &str| {
        spans.values().any(|s| {
            s.name == format!("apply {projection}") && spans.get(&s.parent_span_id).is_some_and(|p| p.name == command)
        })
    };
    assert!(
        applied_under("order_views", "CreateOrder"),
        "OrderCreated applied under CreateOrder: {:#?}",
        names(&spans)
    );
    assert!(count(&spans, |n| n == "apply saga_intake") >= 1, "the saga intake applied OrderCreated");
    // The saga's steps, in the trace of the OrderCreated that started it,
    // and the commands they sent under them.
    let steps: BTreeSet<&str> =
        spans.values().filter(|s| s.name.starts_with("saga step")).map(|s| s.name.as_str()).collect();
    assert!(steps.len() >= 3, "several steps: {steps:?}");
    let step = spans.values().find(|s| s.name.starts_with("saga step")).expect("a step");
    assert_eq!(
        ancestry(&spans, &step.name)[1..],
        ["CreateOrder", "eventfold.orders.v1.OrderCommandService/CreateOrder"],
        "a step hangs off the command that appended OrderCreated"
    );
    let confirm = ancestry(&spans, "ConfirmOrder");
    assert!(confirm.get(1).is_some_and(|p| p.starts_with("saga step")), "ConfirmOrder sent by a step: {confirm:?}");
    assert_connected(&spans);
    drop(server);
}

#[test]
fn the_kafka_fed_variant_adds_the_relay_and_the_consumer_to_the_trace() {
    let runtime = runtime();
    let mut collector = runtime.block_on(FakeCollectorServer::start()).expect("start the collector");
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let broker = eventfold_tests::kafka::Broker::start();
    let registry = runtime.block_on(common::registry_with_catalog());
    let (brokers, registry_url, endpoint) =
        (format!("[\"{}\"]", broker.bootstrap()), registry.url(), collector.endpoint());
    let env = [
        ("EVENTFOLD_RELAY__BROKERS", brokers.as_str()),
        ("EVENTFOLD_REGISTRY__URL", registry_url.as_str()),
        ("EVENTFOLD_PROJECTOR__SOURCE", "kafka"),
        ("EVENTFOLD_AUTH__ENABLED", "false"),
        ("EVENTFOLD_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let database = ["--database-url", db.url()];
    let command = DevServer::start_command(
        &["serve", "command", "--listen", "127.0.0.1:0"],
        &database,
        &env,
        "eventfold: command services listening on ",
    );
    let (_relay, _) = spawn_process(&["serve", "relay"], &database, &env, "eventfold: relaying to ");
    let (_projector, _) = spawn_process(&["serve", "projector"], &database, &env, "eventfold: ");
    create_order(&command, "k-1", None);

    // Three processes export their spans in their own batches: wait for the
    // whole chain (the relay's `publish` may come after the projector's
    // `apply`), not for the first `apply`.
    let spans = collect(&runtime, &mut collector, |spans| ancestry(spans, "apply order_views").len() >= 5);
    let chain = ancestry(&spans, "apply order_views");
    assert_eq!(
        chain,
        [
            "apply order_views",
            "consume eventfold.orders.v1",
            "publish",
            "CreateOrder",
            "eventfold.orders.v1.OrderCommandService/CreateOrder"
        ],
        "call → command → relay → consumer → projection: {:#?}",
        names(&spans)
    );
    let publish = spans.values().find(|s| s.name == "publish").expect("publish");
    assert!(publish.kind.to_lowercase().contains("producer"), "{}", publish.kind);
    let consume = spans.values().find(|s| s.name.starts_with("consume")).expect("consume");
    assert!(consume.kind.to_lowercase().contains("consumer"), "{}", consume.kind);
    assert_connected(&spans);
    drop((command, broker, registry));
}

/// JSON log lines carry the service, the trace and span ids of the work
/// they belong to and its correlation id.
#[test]
fn json_logs_carry_the_service_the_trace_the_span_and_the_correlation_id() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_LOG__FORMAT", "json"), ("EVENTFOLD_LOG__FILTER", "info,eventfold_command=debug")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    server.call(
        "eventfold.inventory.v1.InventoryCommandService/RegisterProduct",
        &json!({"productId": "sku-j", "name": "Kettle"}),
    );
    let mut process = server.process;
    assert!(process.wait_for_stderr("command done", Duration::from_secs(10)), "no `command done` line");
    let stderr = process.stderr.lock().unwrap().clone();
    let line: serde_json::Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "command done")
        .unwrap_or_else(|| panic!("no JSON `command done` line:\n{stderr}"));
    assert_eq!(line["service"], "eventfold-dev", "{line}");
    assert_eq!(line["span"], "command", "{line}");
    let hex = |v: &serde_json::Value, len| {
        v.as_str().is_some_and(|s| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit()))
    };
    assert!(hex(&line["trace_id"], 32) && hex(&line["span_id"], 16), "{line}");
    assert!(line["correlation_id"].as_str().is_some_and(|c| !c.is_empty()), "{line}");
    // Every line is one JSON object.
    for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object()), "not JSON: {l}");
    }
}
