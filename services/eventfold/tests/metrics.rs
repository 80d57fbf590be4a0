//! `/metrics` on the admin listener of `eventfold dev` (issue 18, first
//! step): the process installs a Prometheus recorder, so what the code
//! records is exported, in the text format, after a command ran.

mod common;

use std::process::Command;

use common::DevServer;

#[test]
fn metrics_recorded_by_the_code_are_exported_at_slash_metrics() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let order = serde_json::json!({
        "orderId": "m-1", "customerId": "c-1", "currency": "EUR",
        "items": [{"productId": "sku-1", "quantity": 1, "unitPrice": {"minor": "100", "currency": "EUR"}}],
    });
    server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order);
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code} %{content_type}"])
        .arg(format!("http://{}/metrics", server.admin_addr()))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, status) = text.rsplit_once('\n').expect("a status line");
    assert!(status.starts_with("200 text/plain"), "{status}\n{body}");
    let line = body
        .lines()
        .find(|l| l.starts_with("eventfold_commands_total{") && l.contains("command=\"CreateOrder\""))
        .unwrap_or_else(|| panic!("no eventfold_commands_total for CreateOrder:\n{body}"));
    assert!(line.contains("outcome=\"ok\"") && line.ends_with(" 1"), "{line}");
    assert!(body.contains("# TYPE eventfold_commands_total counter"), "{body}");
    drop(server);
}
