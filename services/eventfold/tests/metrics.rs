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

#[test]
fn a_workload_on_dev_exports_every_metric_family_with_values_that_agree() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
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
}

/// The family of a sample name (histograms add `_bucket`, `_sum`, `_count`).
fn family_of(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name)
}
