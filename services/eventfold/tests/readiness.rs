//! Readiness per dependency (issue 18): each process's `/readyz` (and its
//! gRPC server's overall health) follows the dependencies it needs.
//! Stopping Redis, pausing the broker and stopping PostgreSQL each flip the
//! affected process to not ready, naming the dependency, and back once it
//! answers again.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{DevServer, Guard, spawn_process};

/// `/readyz` of the admin listener at `admin`: (status code, body).
fn readyz(admin: &str) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{admin}/readyz"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// Waits (up to 30 s) until `/readyz` answers `code` with `line` in its
/// body; the body.
fn wait_readyz(admin: &str, code: u16, line: &str, process: &Guard) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = readyz(admin);
        if got == code && body.lines().any(|l| l == line) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {code} with {line:?}; last {got}:\n{body}\nstderr:\n{}",
            process.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `eventfold probe ADMIN` (`--live` when `live`).
fn probe(admin: &str, live: bool) -> std::process::Output {
    let mut command = common::eventfold();
    command.args(["probe", admin]);
    if live {
        command.arg("--live");
    }
    command.output().expect("run eventfold probe")
}

/// The overall gRPC health (`""`) of the server at `addr`.
fn grpc_health(server: &DevServer) -> String {
    let output =
        server.grpcurl(&["-d", "{}", &server.addr, "grpc.health.v1.Health/Check"]).output().expect("run grpcurl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// `serve query` with the cache on Redis: not ready while Redis is away
/// (and its gRPC health NOT_SERVING), ready again once it is back; with
/// `redis` reported only, Redis away leaves it ready.
#[test]
fn stopping_redis_makes_the_query_server_not_ready_and_back() {
    let runtime = runtime();
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let mut redis = eventfold_tests::redis::OwnRedis::start();
    let url = redis.url();
    let env = [
        ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_QUERY__CACHE__URL", url.as_str()),
        ("EVENTFOLD_AUTH__ENABLED", "false"),
        ("EVENTFOLD_ADMIN__READINESS_INTERVAL_MS", "200"),
    ];
    let server = DevServer::start_command(
        &["serve", "query", "--listen", "127.0.0.1:0"],
        &["--database-url", db.url()],
        &env,
        "eventfold: query services listening on ",
    );
    let admin = server.admin_addr();
    let body = wait_readyz(&admin, 200, "redis: up", &server.process);
    assert!(body.starts_with("ready\n") && body.contains("postgresql: up"), "{body}");
    // The server's gRPC health follows readiness at its next probe (1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !grpc_health(&server).contains("\"SERVING\"") {
        assert!(Instant::now() < deadline, "gRPC health never SERVING: {}", grpc_health(&server));
        std::thread::sleep(Duration::from_millis(100));
    }

    assert!(probe(&admin, false).status.success(), "eventfold probe: ready");

    redis.stop();
    let body = wait_readyz(&admin, 503, "redis: down", &server.process);
    assert!(body.starts_with("not ready\n") && body.contains("postgresql: up"), "{body}");
    let probed = probe(&admin, false);
    assert!(!probed.status.success(), "eventfold probe: not ready");
    assert!(String::from_utf8_lossy(&probed.stderr).contains("/readyz at"), "{probed:?}");
    assert!(probe(&admin, true).status.success(), "eventfold probe --live: alive all along");
    assert!(!body.contains("127.0.0.1"), "no address or error text in the answer: {body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !grpc_health(&server).contains("NOT_SERVING") {
        assert!(Instant::now() < deadline, "gRPC health stayed SERVING: {}", grpc_health(&server));
        std::thread::sleep(Duration::from_millis(100));
    }

    redis.resume();
    wait_readyz(&admin, 200, "redis: up", &server.process);
    let deadline = Instant::now() + Duration::from_secs(10);
    while grpc_health(&server).contains("NOT_SERVING") {
        assert!(Instant::now() < deadline, "gRPC health stayed NOT_SERVING");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);

    // Reported only: Redis away, still ready.
    let mut env = env.to_vec();
    env.push(("EVENTFOLD_ADMIN__OPTIONAL", "[\"redis\"]"));
    let server = DevServer::start_command(
        &["serve", "query", "--listen", "127.0.0.1:0"],
        &["--database-url", db.url()],
        &env,
        "eventfold: query services listening on ",
    );
    let admin = server.admin_addr();
    wait_readyz(&admin, 200, "redis: up (reported only)", &server.process);
    redis.stop();
    let body = wait_readyz(&admin, 200, "redis: down (reported only)", &server.process);
    assert!(body.starts_with("ready\n"), "{body}");
}

/// `serve relay`: not ready while the broker is paused (it answers
/// nothing), ready again once it runs.
#[test]
fn pausing_the_broker_makes_the_relay_not_ready_and_back() {
    let runtime = runtime();
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let broker = eventfold_tests::kafka::Broker::start();
    let registry = runtime.block_on(eventfold_tests::registry::RegistryStandIn::start());
    let (brokers, registry_url) = (format!("[\"{}\"]", broker.bootstrap()), registry.url());
    let env = [
        ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_RELAY__BROKERS", brokers.as_str()),
        ("EVENTFOLD_RELAY__REQUEST_TIMEOUT_MS", "1000"),
        ("EVENTFOLD_REGISTRY__URL", registry_url.as_str()),
        ("EVENTFOLD_ADMIN__READINESS_INTERVAL_MS", "200"),
    ];
    let (relay, _) = spawn_process(&["serve", "relay"], &["--database-url", db.url()], &env, "eventfold: relaying to ");
    let admin = relay.printed_addr(&["eventfold: admin on http://"]);
    let body = wait_readyz(&admin, 200, "kafka: up", &relay);
    assert!(body.contains("registry: up") && body.contains("postgresql: up"), "{body}");

    broker.pause();
    let body = wait_readyz(&admin, 503, "kafka: down", &relay);
    assert!(body.contains("registry: up") && body.contains("postgresql: up"), "{body}");
    broker.resume();
    wait_readyz(&admin, 200, "kafka: up", &relay);

    drop(registry);
    wait_readyz(&admin, 503, "registry: down", &relay);
}

/// `serve projector` and `serve eventstore` on a PostgreSQL server of
/// their own: not ready (and NOT_SERVING) while it is stopped, ready again
/// once it is back.
#[test]
fn stopping_postgresql_makes_the_projector_and_a_server_not_ready_and_back() {
    let runtime = runtime();
    let postgres = eventfold_tests::OwnPostgres::start();
    let db = runtime.block_on(postgres.migrated());
    let env = [
        ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_AUTH__ENABLED", "false"),
        ("EVENTFOLD_ADMIN__READINESS_INTERVAL_MS", "200"),
        ("EVENTFOLD_DATABASE__CONNECT_TIMEOUT_MS", "1000"),
    ];
    let (projector, _) = spawn_process(&["serve", "projector"], &["--database-url", db.url()], &env, "eventfold: ");
    let projector_admin = projector.printed_addr(&["eventfold: admin on http://"]);
    let server = DevServer::start_command(
        &["serve", "eventstore", "--listen", "127.0.0.1:0"],
        &["--database-url", db.url()],
        &env,
        "eventfold: EventStoreService listening on ",
    );
    let server_admin = server.admin_addr();
    wait_readyz(&projector_admin, 200, "postgresql: up", &projector);
    wait_readyz(&server_admin, 200, "postgresql: up", &server.process);

    postgres.stop();
    wait_readyz(&projector_admin, 503, "postgresql: down", &projector);
    wait_readyz(&server_admin, 503, "postgresql: down", &server.process);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !grpc_health(&server).contains("NOT_SERVING") {
        assert!(Instant::now() < deadline, "gRPC health stayed SERVING: {}", grpc_health(&server));
        std::thread::sleep(Duration::from_millis(100));
    }

    postgres.start_again();
    wait_readyz(&projector_admin, 200, "postgresql: up", &projector);
    wait_readyz(&server_admin, 200, "postgresql: up", &server.process);
}

/// `[query] max_lag_events`: a query service whose projections are further
/// behind the log than the bound answers NOT_SERVING (its health), the
/// others keep serving; once a projector catches up, it serves again.
#[test]
fn a_query_service_whose_projection_lags_past_the_bound_is_not_serving() {
    let runtime = runtime();
    let db = runtime.block_on(eventfold_tests::TestDatabase::migrated());
    let env = [("EVENTFOLD_AUTH__ENABLED", "false"), ("EVENTFOLD_QUERY__MAX_LAG_EVENTS", "2")];
    let database = ["--database-url", db.url()];
    let command = DevServer::start_command(
        &["serve", "command", "--listen", "127.0.0.1:0"],
        &database,
        &env,
        "eventfold: command services listening on ",
    );
    for n in 0..3 {
        let order = serde_json::json!({
            "orderId": format!("l-{n}"), "customerId": "c-1", "currency": "EUR",
            "items": [{"productId": "sku-l", "quantity": 1, "unitPrice": {"minor": "100", "currency": "EUR"}}],
        });
        command.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order);
    }
    let query = DevServer::start_command(
        &["serve", "query", "--listen", "127.0.0.1:0"],
        &database,
        &env,
        "eventfold: query services listening on ",
    );
    // The same without a bound: serving however far behind.
    let unbounded = DevServer::start_command(
        &["serve", "query", "--listen", "127.0.0.1:0"],
        &database,
        &[("EVENTFOLD_AUTH__ENABLED", "false")],
        "eventfold: query services listening on ",
    );
    let health = |server: &DevServer, service: &str| {
        let output = server
            .grpcurl(&["-d", &format!("{{\"service\":\"{service}\"}}"), &server.addr, "grpc.health.v1.Health/Check"])
            .output()
            .expect("run grpcurl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let wait = |server: &DevServer, service: &str, status: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = health(server, service);
            if answer.contains(&format!("\"{status}\"")) {
                return;
            }
            assert!(Instant::now() < deadline, "{service} never {status}: {answer}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let orders = "eventfold.query.v1.OrderQueryService";
    // Three orders, no projector: order_views is 3 events behind.
    wait(&unbounded, orders, "SERVING");
    assert!(health(&query, orders).contains("\"NOT_SERVING\""), "{}", health(&query, orders));
    let (_projector, _) = spawn_process(&["serve", "projector"], &database, &env, "eventfold: ");
    wait(&query, orders, "SERVING");
    drop(command);
}
