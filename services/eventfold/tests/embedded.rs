//! `eventfold dev` with no flags keeps its data under `./data`: on a
//! private PostgreSQL cluster when the server binaries are installed (the
//! whole platform: an order, its saga and its read model survive a
//! restart), else on the file-system log, where the query services answer
//! FAILED_PRECONDITION with what to install.

mod common;

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{DevServer, SERVICE, spawn_process_in, wait_timeout};
use serde_json::{Value, json};

const PREFIX: &str = "eventfold: EventStoreService and the command";

/// `eventfold dev --listen 127.0.0.1:0` in `dir` with no storage flag.
fn start(dir: &Path, env: &[(&str, &str)]) -> (DevServer, String) {
    let mut env = env.to_vec();
    env.extend([("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")]);
    let (process, line) = spawn_process_in(Some(dir), &["dev", "--listen", "127.0.0.1:0"], &[], &env, PREFIX);
    let addr = line
        .split(" listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (DevServer { process, addr }, line)
}

/// SIGTERM, and the process exits 0 within 60 s.
fn stop(server: &mut DevServer) {
    let pid = server.process.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = wait_timeout(&mut server.process.child, Duration::from_secs(60)).expect("exits within 60 s");
    assert!(
        status.success(),
        "a SIGTERM'd eventfold dev exits 0: {status}; stderr:\n{}",
        server.process.stderr.lock().unwrap()
    );
}

/// A directory the `postgres` user can reach when the tests run as root
/// (the private cluster then runs as `postgres`).
fn data_home() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("eventfold-dev-").tempdir().expect("a directory");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    dir
}

fn place_order(server: &DevServer, order: &str, token: &str) -> Value {
    let inventory = "eventfold.inventory.v1.InventoryCommandService";
    let product = format!("sku-{order}");
    server.call(&format!("{inventory}/RegisterProduct"), &json!({"productId": product, "name": "Kettle"}));
    server.call(&format!("{inventory}/ReplenishStock"), &json!({"productId": product, "quantity": 5}));
    create_order(server, order, token)
}

fn create_order(server: &DevServer, order: &str, token: &str) -> Value {
    let product = format!("sku-{order}");
    server.call(
        "eventfold.orders.v1.OrderCommandService/CreateOrder",
        &json!({
            "orderId": order, "customerId": "c-1", "currency": "EUR", "paymentToken": token, "carrier": "DHL",
            "requestId": format!("req-{order}"),
            "items": [{ "productId": product, "quantity": 2, "unitPrice": { "minor": "1500", "currency": "EUR" } }],
        }),
    )
}

/// The saga of `order` once it finished (polled: it starts shortly after
/// the order).
fn finished_saga(server: &DevServer, order: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = server
            .grpcurl(&[
                "-d",
                &json!({"sagaId": format!("fulfil-{order}")}).to_string(),
                &server.addr,
                "eventfold.sagas.v1.SagaService/GetSaga",
            ])
            .output()
            .expect("grpcurl");
        if out.status.success() {
            let saga: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            let status = saga["saga"]["status"].as_str().unwrap_or_default().to_owned();
            if status.ends_with("COMPLETED") || status.ends_with("FAILED") || status.ends_with("COMPENSATED") {
                return saga;
            }
        }
        assert!(Instant::now() < deadline, "the saga of {order} did not finish within 60 s");
        thread::sleep(Duration::from_millis(100));
    }
}

fn events(server: &DevServer, stream: &str) -> Vec<Value> {
    let read = server.call(&format!("{SERVICE}/ReadStream"), &json!({"streamId": stream}));
    read["events"].as_array().cloned().unwrap_or_default()
}

#[test]
fn with_postgresql_binaries_the_whole_platform_runs_on_a_private_cluster_and_survives_a_restart() {
    let home = data_home();
    let (mut server, line) = start(home.path(), &[]);
    assert!(line.contains("command and query services"), "the read side is up: {line}");
    assert!(line.contains("private PostgreSQL"), "one line says where the data is: {line}");
    assert!(home.path().join("data/postgres/PG_VERSION").is_file(), "the cluster lives under ./data");

    let created = place_order(&server, "e-1", "tok_visa");
    let position = created["position"].as_str().unwrap_or("0").to_owned();
    let saga = finished_saga(&server, "e-1");
    assert_eq!(saga["saga"]["status"], "SAGA_STATUS_COMPLETED", "{saga}");
    let order = server
        .call("eventfold.query.v1.OrderQueryService/GetOrder", &json!({"orderId": "e-1", "minPosition": position}));
    assert_eq!(order["order"]["orderId"], "e-1", "{order}");
    let before = events(&server, "order-e-1");
    assert!(before.len() >= 2, "the order's events: {before:?}");
    // Wait for the read model to hold the saga's outcome too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let order = server.call("eventfold.query.v1.OrderQueryService/GetOrder", &json!({"orderId": "e-1"}));
        if order["order"]["status"] == "ORDER_STATUS_CONFIRMED" {
            break order;
        }
        assert!(Instant::now() < deadline, "the read model shows the confirmed order: {order}");
        thread::sleep(Duration::from_millis(100));
    };

    stop(&mut server);
    assert!(
        !home.path().join("data/postgres/postmaster.pid").exists(),
        "the private cluster stopped with eventfold dev"
    );

    let (server, line) = start(home.path(), &[]);
    assert!(line.contains("private PostgreSQL"), "{line}");
    let again = server.call("eventfold.query.v1.OrderQueryService/GetOrder", &json!({"orderId": "e-1"}));
    assert_eq!(again, view, "the same order after the restart");
    assert_eq!(events(&server, "order-e-1"), before, "the same events after the restart");
    let repeat = create_order(&server, "e-1", "tok_visa");
    assert_eq!(repeat, created, "the request id is remembered across the restart: the same answer");
}

#[test]
fn without_postgresql_binaries_it_runs_on_the_file_system_log_and_queries_say_what_to_install() {
    let home = data_home();
    let empty = home.path().join("empty-bin");
    std::fs::create_dir(&empty).expect("an empty PATH directory");
    let config = home.path().join("eventfold.toml");
    std::fs::write(&config, "[dev]\npostgres_search = []\n").expect("config");
    let path = empty.to_str().expect("UTF-8");
    let config = config.to_str().expect("UTF-8");
    let hidden = [("PATH", path), ("EVENTFOLD_CONFIG", config)];
    let (mut server, line) = start(home.path(), &hidden);
    assert!(line.contains("file-system log"), "one line says where the data is: {line}");
    assert!(line.contains("no PostgreSQL server binaries were found"), "{line}");
    assert!(!line.contains("query services listening"), "queries are not advertised as working: {line}");
    let health = server.run(&[
        "-d",
        r#"{"service":"eventfold.query.v1.OrderQueryService"}"#,
        &server.addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("NOT_SERVING"), "the query services' health says so: {health}");
    let printed = server.process.stdout.lock().unwrap().clone();
    assert!(!printed.contains("OrderQueryService/GetOrder"), "no query is offered as an example: {printed}");

    let out = server
        .grpcurl(&["-d", r#"{"orderId":"f-1"}"#, &server.addr, "eventfold.query.v1.OrderQueryService/GetOrder"])
        .output()
        .expect("grpcurl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Code: FailedPrecondition"), "{stderr}");
    assert!(stderr.contains("apt-get install postgresql"), "the install hint: {stderr}");
    assert!(stderr.contains("READ_SIDE_UNAVAILABLE"), "the reason: {stderr}");

    // Commands and the store work and are kept.
    let created = place_order(&server, "f-1", "tok_visa");
    let saga = finished_saga(&server, "f-1");
    assert_eq!(saga["saga"]["status"], "SAGA_STATUS_COMPLETED", "{saga}");
    let before = events(&server, "order-f-1");
    assert!(before.len() >= 2, "{before:?}");
    stop(&mut server);
    assert!(home.path().join("data/log/segments").is_dir(), "the log lives under ./data");

    let (server, _) = start(home.path(), &hidden);
    assert_eq!(events(&server, "order-f-1"), before, "the same events after the restart");
    assert_eq!(create_order(&server, "f-1", "tok_visa"), created, "the same answer to the same request id");
}
