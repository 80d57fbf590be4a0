//! `/metrics` on the admin listener (issue 18): a short workload on
//! `eventfold dev --database-url` (with the query cache on Redis), then one
//! scrape that must hold every metric family the platform promises, with
//! values that agree with the workload: commands counted as sent, calls by
//! status code, appends timed once each, projections caught up, sagas
//! finished, pools sampled.

mod common;

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use common::DevServer;
use serde_json::json;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a scrape (the text format: `name{k="v",…} value`).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = BTreeMap::new();
                // Label values here hold no commas or quotes.
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                    labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        samples.push(Sample { name, labels, value });
    }
    samples
}

/// A scrape of `/metrics`.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn of(admin: &str) -> Scrape {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code} %{content_type}"])
            .arg(format!("http://{admin}/metrics"))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').expect("a status line");
        assert!(status.starts_with("200 text/plain"), "{status}\n{body}");
        Scrape { samples: parse(body), text: body.to_owned() }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
    }

    /// Panics unless a sample of `name` with `labels` exists.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> &Self {
        assert!(self.matching(name, labels).next().is_some(), "no {name} with {labels:?} in:\n{}", self.text);
        self
    }

    /// Whether `# TYPE name kind` is declared.
    fn typed(&self, name: &str, kind: &str) -> bool {
        self.text.lines().any(|l| l == format!("# TYPE {name} {kind}"))
    }
}

fn curl(args: &[&str]) -> String {
    let output = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Both workloads (dev, then the Kafka-fed processes), and every metric
/// name of the dashboard and the alert rules exported by one of them.
#[test]
fn a_workload_exports_every_metric_family_with_values_that_agree_and_all_the_dashboard_uses() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dev = dev_workload(&runtime);
    let (relay, projector) = kafka_workload(&runtime);
    let exported: std::collections::BTreeSet<&str> =
        [&dev, &relay, &projector].iter().flat_map(|s| s.samples.iter().map(|s| family_of(&s.name))).collect();
    let files = ["grafana-dashboard.json", "prometheus-alerts.yml"];
    let mut used = 0;
    for file in files {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../helm/eventfold/files").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for name in metric_names(&text) {
            used += 1;
            assert!(exported.contains(family_of(&name)), "{file} uses {name}, which no process exports");
        }
    }
    assert!(used >= 20, "the dashboard and rules use metrics: {used}");
}

/// Every `eventfold_…` token of `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("eventfold_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// `serve command`, `serve relay` and a Kafka-fed `serve projector` on one
/// database: orders relayed to the broker and projected from it; the
/// scrapes of the relay and the projector once both caught up.
fn kafka_workload(runtime: &tokio::runtime::Runtime) -> (Scrape, Scrape) {
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let broker = eventfold_tests::kafka::Broker::start();
    let registry = runtime.block_on(common::registry_with_catalog());
    let (brokers, registry_url) = (format!("[\"{}\"]", broker.bootstrap()), registry.url());
    let env = [
        ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_RELAY__BROKERS", brokers.as_str()),
        ("EVENTFOLD_REGISTRY__URL", registry_url.as_str()),
        ("EVENTFOLD_PROJECTOR__SOURCE", "kafka"),
        // Calls without credentials: authentication is tested elsewhere.
        ("EVENTFOLD_AUTH__ENABLED", "false"),
    ];
    let database = ["--database-url", db.url()];
    let command = DevServer::start_command(
        &["serve", "command", "--listen", "127.0.0.1:0"],
        &database,
        &env,
        "eventfold: command services listening on ",
    );
    let (relay, _) = common::spawn_process(&["serve", "relay"], &database, &env, "eventfold: relaying to ");
    let (projector, _) = common::spawn_process(&["serve", "projector"], &database, &env, "eventfold: ");
    for n in 0..3 {
        let order = json!({
            "orderId": format!("k-{n}"), "customerId": "c-1", "currency": "EUR",
            "items": [{"productId": "sku-k", "quantity": 1, "unitPrice": {"minor": "700", "currency": "EUR"}}],
        });
        command.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order);
    }
    let relay_admin = relay.printed_addr(&["eventfold: admin on http://"]);
    let projector_admin = projector.printed_addr(&["eventfold: admin on http://"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (relayed, projected) = loop {
        let (relayed, projected) = (Scrape::of(&relay_admin), Scrape::of(&projector_admin));
        let sent = relayed.sum("eventfold_relay_events_total", &[]);
        let applied = projected.sum("eventfold_projection_position", &[("projection", "order_views")]);
        let head = relayed.sum("eventfold_relay_position", &[]);
        if sent >= 3.0 && head > 0.0 && applied >= head {
            break (relayed, projected);
        }
        assert!(
            Instant::now() < deadline,
            "relayed {sent} (to {head}), order_views at {applied}:\n{}\n{}\nrelay:\n{}\nprojector:\n{}",
            relayed.text,
            projected.text,
            relay.stderr.lock().unwrap(),
            projector.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The relay: every event produced, caught up, produces timed, no error.
    assert_eq!(relayed.sum("eventfold_relay_lag_positions", &[]), 0.0, "{}", relayed.text);
    assert!(relayed.sum("eventfold_relay_produce_seconds_count", &[]) >= 1.0);
    assert_eq!(relayed.sum("eventfold_kafka_errors_total", &[]), 0.0);
    // The Kafka-fed projector: a lag per partition, back to 0; nothing
    // dead-lettered.
    let lags: Vec<&Sample> = projected.matching("eventfold_consumer_lag_messages", &[]).collect();
    assert!(!lags.is_empty(), "{}", projected.text);
    for lag in &lags {
        assert!(lag.labels.contains_key("topic") && lag.labels.contains_key("partition"), "{lag:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let projected = loop {
        let projected = Scrape::of(&projector_admin);
        if projected.sum("eventfold_consumer_lag_messages", &[]) == 0.0 {
            break projected;
        }
        assert!(Instant::now() < deadline, "consumer lag not back to 0:\n{}", projected.text);
        std::thread::sleep(Duration::from_millis(200));
    };
    projected.has("eventfold_consumer_dead_letters_total", &[]);
    assert_eq!(projected.sum("eventfold_consumer_dead_letters_total", &[]), 0.0);
    assert!(projected.sum("eventfold_projection_events_total", &[("projection", "order_views")]) >= 3.0);
    drop((command, relay, projector, broker, registry));
    (relayed, projected)
}

/// `eventfold dev --database-url` (query cache on Redis) after a short
/// workload; every family of the dev process checked against it.
fn dev_workload(runtime: &tokio::runtime::Runtime) -> Scrape {
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let redis = eventfold_tests::redis::TestRedis::create();
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &[
            ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_QUERY__CACHE__URL", redis.url()),
            ("EVENTFOLD_QUERY__CACHE__KEY_PREFIX", redis.prefix()),
        ],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let (admin, rest) = (server.admin_addr(), server.rest_addr());

    // The workload: stock, four orders over gRPC (one declined), one over
    // REST, a refused and an invalid command, reads, a subscription.
    let inventory = "eventfold.inventory.v1.InventoryCommandService";
    server.call(&format!("{inventory}/RegisterProduct"), &json!({"productId": "sku-m", "name": "Kettle"}));
    server.call(&format!("{inventory}/ReplenishStock"), &json!({"productId": "sku-m", "quantity": 50}));
    let order = |id: &str, token: &str| {
        json!({
            "orderId": id, "customerId": "c-1", "currency": "EUR", "paymentToken": token, "carrier": "DHL",
            "items": [{"productId": "sku-m", "quantity": 1, "unitPrice": {"minor": "1500", "currency": "EUR"}}],
        })
    };
    for (id, token) in [("m-0", "tok_visa"), ("m-1", "tok_visa"), ("m-2", "tok_visa"), ("m-3", "tok_decline")] {
        server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order(id, token));
    }
    let created = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &order("m-4", "tok_visa").to_string(),
        &format!("http://{rest}/v1/orders"),
    ]);
    assert!(created.contains("globalPosition"), "{created}");
    // Refused by a business rule: the product exists.
    let refused = server
        .grpcurl(&[
            "-d",
            &json!({"productId": "sku-m", "name": "Kettle"}).to_string(),
            &server.addr,
            &format!("{inventory}/RegisterProduct"),
        ])
        .output()
        .expect("run grpcurl");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FailedPrecondition"), "{refused:?}");
    // Invalid: no items.
    let invalid = server
        .grpcurl(&[
            "-d",
            &json!({"orderId": "m-x", "customerId": "c-1", "currency": "EUR"}).to_string(),
            &server.addr,
            "eventfold.orders.v1.OrderCommandService/CreateOrder",
        ])
        .output()
        .expect("run grpcurl");
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("InvalidArgument"), "{invalid:?}");
    // A path no service has, sent as gRPC: counted under `unknown`.
    let unknown = curl(&[
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-D",
        "-",
        &format!("http://{}/evil.Invented/Path", server.addr),
    ]);
    assert!(unknown.contains("grpc-status: 12"), "{unknown}");
    // A REST path with no operation.
    let missing = curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{rest}/v1/nothing-here")]);
    assert_eq!(missing, "404");
    // A subscription, ended by the client.
    let _ = server
        .grpcurl(&["-max-time", "1", "-d", "{}", &server.addr, "eventfold.eventstore.v1.EventStoreService/Subscribe"])
        .output()
        .expect("run grpcurl");

    // Wait for the sagas to finish and the projections to catch up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let scrape = loop {
        let scrape = Scrape::of(&admin);
        let finished = scrape.sum("eventfold_sagas_finished_total", &[]);
        let lag: f64 = scrape.sum("eventfold_projection_lag_positions", &[]);
        let lagging = scrape.matching("eventfold_projection_lag_positions", &[]).count();
        if finished >= 5.0 && lagging > 0 && lag == 0.0 {
            break scrape;
        }
        assert!(Instant::now() < deadline, "sagas finished {finished}, projection lag {lag}:\n{}", scrape.text);
        std::thread::sleep(Duration::from_millis(200));
    };
    // Reads through the cache: a miss, then a hit.
    for _ in 0..2 {
        let read = curl(&[&format!("http://{rest}/v1/orders/m-0")]);
        assert!(read.contains("\"orderId\":\"m-0\""), "{read}");
    }
    let scrape = {
        let after = Scrape::of(&admin);
        drop(scrape);
        after
    };

    // gRPC server: calls by service, method and code; unary latency.
    let create = [("service", "eventfold.orders.v1.OrderCommandService"), ("method", "CreateOrder")];
    let with_code = |code| [create[0], create[1], ("code", code)];
    assert_eq!(scrape.sum("eventfold_grpc_server_handled_total", &with_code("OK")), 5.0, "4 over gRPC, 1 over REST");
    assert_eq!(scrape.sum("eventfold_grpc_server_handled_total", &with_code("INVALID_ARGUMENT")), 1.0);
    assert_eq!(scrape.sum("eventfold_grpc_server_handling_seconds_count", &create), 6.0);
    assert!(scrape.typed("eventfold_grpc_server_handling_seconds", "histogram"), "{}", scrape.text);
    let unknown = [("service", "unknown"), ("method", "unknown"), ("code", "UNIMPLEMENTED")];
    assert_eq!(scrape.sum("eventfold_grpc_server_handled_total", &unknown), 1.0);
    assert!(!scrape.text.contains("evil.Invented"), "an invented path is not a label");
    let refused = [("method", "RegisterProduct"), ("code", "FAILED_PRECONDITION")];
    assert_eq!(scrape.sum("eventfold_grpc_server_handled_total", &refused), 1.0);

    // REST: by operation and status; unmatched paths under one label.
    let rest_create = [("operation", "OrderCommandService_CreateOrder"), ("status", "200")];
    assert_eq!(scrape.sum("eventfold_http_server_requests_total", &rest_create), 1.0);
    let get = [("operation", "OrderQueryService_GetOrder"), ("status", "200")];
    assert_eq!(scrape.sum("eventfold_http_server_requests_total", &get), 2.0);
    let unmatched = [("operation", "unmatched"), ("status", "404")];
    assert_eq!(scrape.sum("eventfold_http_server_requests_total", &unmatched), 1.0);
    assert!(scrape.sum("eventfold_http_server_request_duration_seconds_count", &[]) >= 4.0);

    // Commands: by type and outcome, a rejection with its reason.
    let ok = [("command", "CreateOrder"), ("outcome", "ok")];
    assert_eq!(scrape.sum("eventfold_commands_total", &ok), 5.0);
    let rejected = scrape
        .matching("eventfold_commands_total", &[("command", "RegisterProduct"), ("outcome", "rejected")])
        .next()
        .unwrap_or_else(|| panic!("no rejected RegisterProduct:\n{}", scrape.text));
    assert!(!rejected.labels["reason"].is_empty() && rejected.value == 1.0, "{rejected:?}");
    assert!(scrape.sum("eventfold_command_duration_seconds_count", &[("command", "CreateOrder")]) >= 5.0);
    scrape.has("eventfold_commands_total", &[("outcome", "invalid")]);

    // Event store: every append counted and timed once; group commits.
    let appends = scrape.sum("eventfold_store_appends_total", &[]);
    assert!(appends >= 8.0, "appends: {appends}");
    assert_eq!(scrape.sum("eventfold_store_append_seconds_count", &[]), appends);
    let events = scrape.sum("eventfold_store_events_appended_total", &[]);
    let head = scrape.sum("eventfold_projection_position", &[("projection", "order_views")]);
    // Each stored append holds at least one event.
    assert!(events >= scrape.sum("eventfold_store_appends_total", &[("outcome", "ok")]), "{}", scrape.text);
    assert!(events > 0.0 && events <= head, "events {events}, head {head}");
    let batches = scrape.sum("eventfold_store_group_commit_size_count", &[]);
    assert!(batches > 0.0 && scrape.sum("eventfold_store_group_commit_size_sum", &[]) >= batches);
    scrape.has("eventfold_store_subscribers", &[]).has("eventfold_store_subscribers_fell_behind_total", &[]);
    assert_eq!(scrape.sum("eventfold_store_subscribers", &[]), 0.0, "the subscription ended");

    // Projections: caught up, timed, nothing parked.
    for projection in eventfold_projector::all() {
        let name = [("projection", projection.name())];
        assert_eq!(scrape.sum("eventfold_projection_lag_positions", &name), 0.0, "{}", projection.name());
        scrape.has("eventfold_projection_lag_seconds", &name).has("eventfold_projection_position", &name);
        assert_eq!(scrape.sum("eventfold_projection_parked_total", &name), 0.0);
    }
    assert!(scrape.sum("eventfold_projection_batch_seconds_count", &[]) > 0.0);
    assert!(scrape.sum("eventfold_projection_events_total", &[("projection", "order_views")]) > 0.0);

    // Queries: the cache missed, then hit; Redis answered; breaker closed.
    assert!(scrape.sum("eventfold_cache_requests_total", &[("result", "hit")]) >= 1.0, "{}", scrape.text);
    assert!(scrape.sum("eventfold_cache_requests_total", &[("result", "miss")]) >= 1.0);
    assert_eq!(scrape.sum("eventfold_cache_errors_total", &[]), 0.0);
    scrape.has("eventfold_cache_breaker_state", &[]);
    let get_order = [("service", "eventfold.query.v1.OrderQueryService"), ("method", "GetOrder")];
    assert_eq!(scrape.sum("eventfold_grpc_server_handling_seconds_count", &get_order), 2.0);

    // Sagas: five started, four completed, the declined one not.
    assert_eq!(scrape.sum("eventfold_sagas_started_total", &[]), 5.0);
    assert_eq!(scrape.sum("eventfold_sagas_finished_total", &[("outcome", "completed")]), 4.0);
    assert_eq!(scrape.sum("eventfold_sagas_finished_total", &[]), 5.0);
    assert!(scrape.sum("eventfold_saga_step_seconds_count", &[]) >= 5.0);
    scrape.has("eventfold_saga_parked_total", &[]);

    // Pools: sampled at the scrape, for every pool.
    for pool in ["store", "queries", "workers", "main"] {
        let labels = [("pool", pool)];
        assert!(scrape.sum("eventfold_db_pool_max_connections", &labels) >= 1.0, "{pool}");
        scrape.has("eventfold_db_pool_connections", &labels).has("eventfold_db_pool_idle_connections", &labels);
        assert_eq!(scrape.sum("eventfold_db_pool_waiters", &labels), 0.0, "{pool}");
    }
    assert!(scrape.sum("eventfold_db_pool_acquires_total", &[("result", "direct")]) > 0.0);
    assert!(scrape.sum("eventfold_db_pool_acquire_seconds_count", &[]) > 0.0);

    // Every family is described (a # HELP line).
    for family in scrape.samples.iter().map(|s| family_of(&s.name)) {
        assert!(scrape.text.contains(&format!("# HELP {family} ")), "{family} has no HELP line");
    }
    drop(server);
    scrape
}

/// The family of a sample name (histograms add `_bucket`, `_sum`, `_count`).
fn family_of(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name)
}
