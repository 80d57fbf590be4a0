//! The generated clients (tests/clients): each example runs the order flow
//! a new user would try against `eventfold dev --database-url` on a
//! throw-away PostgreSQL, and checks every answer itself; here its exit
//! status and the results it printed are checked too. tests/run generates
//! the three clients from proto/ and docs/openapi.json before the tests run
//! (`tests/clients/generate`), so a proto change that breaks a generated
//! client fails here: at `tsc` for TypeScript, at the call for Python.

mod common;

use std::{path::Path, process::Command};

use common::DevServer;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/clients");

/// Runs `tests/clients/example NAME ADDRESS`; what it printed, after
/// checking that it succeeded.
fn example(name: &str, address: &str) -> String {
    let generated = Path::new(CLIENTS).join(name).join("gen");
    assert!(
        generated.is_dir(),
        "no generated {name} client in {}: run tests/clients/generate (tests/run does)",
        generated.display()
    );
    let output = Command::new(Path::new(CLIENTS).join("example"))
        .args([name, address])
        .output()
        .unwrap_or_else(|e| panic!("run tests/clients/example {name}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the {name} example failed ({}):\n{stdout}\n{stderr}", output.status);
    stdout
}

/// The results every example must print, in this order.
fn assert_results(name: &str, out: &str, statuses: (&str, &str)) {
    let (completed, failed) = statuses;
    let expected = [
        "total 2500 EUR".to_owned(),
        "retry with the same request id: the identical answer".to_owned(),
        format!(": {completed}\n"),
        "read model (min".to_owned(),
        format!(": {failed} (PAYMENT_DECLINED)\n"),
        "reason INVALID_ARGUMENT, field items[0].quantity".to_owned(),
        format!("{name} example: every check passed"),
    ];
    let mut rest = out;
    for line in &expected {
        let at =
            rest.find(line.as_str()).unwrap_or_else(|| panic!("the {name} example did not print {line:?}:\n{out}"));
        rest = &rest[at + line.len()..];
    }
}

#[test]
fn the_python_client_runs_the_order_flow_over_grpc() {
    let (_db, server) = DevServer::with_read_side();
    let out = example("python", &server.addr);
    assert_results("python", &out, ("SAGA_STATUS_COMPLETED", "SAGA_STATUS_FAILED"));
}

#[test]
fn the_typescript_grpc_client_runs_the_order_flow_over_grpc() {
    let (_db, server) = DevServer::with_read_side();
    let out = example("typescript-grpc", &server.addr);
    assert_results("typescript-grpc", &out, ("COMPLETED", "FAILED"));
}

#[test]
fn the_typescript_rest_client_runs_the_order_flow_through_the_gateway() {
    let (_db, server) = DevServer::with_read_side();
    let out = example("typescript-rest", &format!("http://{}", server.rest_addr()));
    assert_results("typescript-rest", &out, ("SAGA_STATUS_COMPLETED", "SAGA_STATUS_FAILED"));
}
