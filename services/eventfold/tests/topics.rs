//! Topics over REST through the gateway, with the seed's routes: one topic
//! per adapter (memory, fs, postgres, blob on Azurite) created, published
//! to, read from an offset, read again after a restart, deleted; bad
//! configurations refused with their code and field, nothing created; no
//! secret of a connection in an answer or a log line.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{DevServer, wait_timeout};
use eventfold_tests::{TestDatabase, azurite::TestContainer};
use serde_json::{Value, json};

const PREFIX: &str = "eventfold: EventStoreService and the command and query services listening on ";

fn start(database_url: &str, fs_root: &Path) -> (DevServer, String) {
    let root = fs_root.to_str().expect("UTF-8");
    let server = DevServer::start_env(
        &["--database-url", database_url],
        &[
            ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_TOPICS__FS_ROOT", root),
        ],
        PREFIX,
    );
    let rest = server.rest_addr();
    (server, rest)
}

fn stop(server: &mut DevServer) {
    let pid = server.process.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = wait_timeout(&mut server.process.child, Duration::from_secs(30)).expect("exits within 30 s");
    assert!(status.success(), "exit 0 after SIGTERM: {status}");
}

/// curl: the HTTP status and the body (JSON, or the text as a string).
fn curl(method: &str, url: &str, body: Option<&Value>) -> (u16, Value, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-w", "\n%{http_code}", url]);
    let text;
    if let Some(body) = body {
        text = body.to_string();
        command.args(["-H", "content-type: application/json", "--data-binary", &text]);
    }
    let output = command.output().expect("run curl");
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').expect("a status line");
    let json = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(json!(body)) };
    (code.trim().parse().expect("an HTTP status"), json, body.to_owned())
}

fn field_violations(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("BadRequest")))
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|v| v["field"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn reason(body: &Value) -> String {
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("ErrorInfo")))
        .and_then(|d| d["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The four topics: (configuration, whether its events survive a restart).
fn topics(database_url: &str, container: &TestContainer) -> Vec<(Value, bool)> {
    vec![
        (json!({"name": "mem", "adapter": "memory"}), false),
        (json!({"name": "files", "adapter": "fs", "options": {"createDirIfNotExist": "true"}}), true),
        (
            json!({"name": "pg", "adapter": "postgres", "connection": database_url, "schema": "shop", "table": "orders"}),
            true,
        ),
        (
            json!({"name": "cloud", "adapter": "blob", "connection": container.connection_string(),
                   "options": {"container": container.name()}}),
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_per_adapter_is_created_published_read_and_kept_across_a_restart() {
    let platform = TestDatabase::create().await;
    // The postgres topic's own server database, with a password in its URL.
    let topic_db = TestDatabase::create().await;
    let topic_url = topic_db.url().to_owned();
    let container = TestContainer::create();
    let root = tempfile::tempdir().expect("a directory");
    let (mut server, rest) = start(platform.url(), root.path());

    let mut read_before = Vec::new();
    for (topic, _) in topics(&topic_url, &container) {
        let name = topic["name"].as_str().expect("name").to_owned();
        let (code, created, text) = curl("POST", &format!("http://{rest}/topics"), Some(&topic));
        assert_eq!(code, 200, "create {name}: {created}");
        assert_eq!(created["name"], name);
        assert!(created.get("connection").is_none_or(|c| c == ""), "the connection is never returned: {created}");
        assert!(!text.contains("AccountKey") && !text.contains("Eby8vdM02"), "no account key in the answer: {text}");
        let published = curl(
            "POST",
            &format!("http://{rest}/topics/{name}/events"),
            Some(&json!({
                "key": "k-1",
                "events": [
                    {"eventType": "Created", "data": {"n": 1}},
                    {"eventType": "Updated", "data": {"n": 2}, "metadata": {"source": "test"}},
                    {"eventType": "Updated", "data": {"n": 3}},
                ],
                "requestId": "publish-1",
            })),
        );
        assert_eq!(published.0, 200, "publish to {name}: {}", published.1);
        assert_eq!(published.1["offsets"], json!(["1", "2", "3"]), "{name}");
        let (code, page, _) = curl("GET", &format!("http://{rest}/topics/{name}/events?from=2"), None);
        assert_eq!(code, 200, "{page}");
        let offsets: Vec<&str> =
            page["events"].as_array().expect("events").iter().map(|e| e["offset"].as_str().expect("offset")).collect();
        assert_eq!(offsets, ["2", "3"], "{name}: from offset 2");
        assert_eq!(page["events"][0]["metadata"]["source"], "test");
        assert_eq!(page["events"][1]["data"]["n"], 3);
        read_before.push((name, page));
    }
    let (code, listed, _) = curl("GET", &format!("http://{rest}/topics"), None);
    assert_eq!(code, 200);
    assert_eq!(listed["topics"].as_array().expect("topics").len(), 4, "{listed}");
    let (code, health, _) = curl("GET", &format!("http://{rest}/health"), None);
    assert_eq!((code, health["status"].as_str()), (200, Some("SERVING")), "{health}");

    stop(&mut server);
    let log = server.process.stderr.lock().unwrap().clone();
    assert!(!log.contains("Eby8vdM02") && !log.contains(&topic_url), "no connection secret in the log");
    let (mut server, rest) = start(platform.url(), root.path());

    for ((name, before), (_, kept)) in read_before.iter().zip(topics(&topic_url, &container)) {
        let (code, after, _) = curl("GET", &format!("http://{rest}/topics/{name}/events?from=2"), None);
        assert_eq!(code, 200, "{name} after the restart: {after}");
        if kept {
            assert_eq!(&after, before, "{name}: the same events at the same offsets after the restart");
        } else {
            assert_eq!(
                after["events"].as_array().map_or(0, Vec::len),
                0,
                "a memory topic keeps its configuration, not its events: {after}"
            );
        }
        let (code, topic, _) = curl("GET", &format!("http://{rest}/topics/{name}"), None);
        assert_eq!(code, 200, "{topic}");
        let last = topic["lastOffset"].as_str().unwrap_or("0");
        assert_eq!(last, if kept { "3" } else { "0" }, "{name}: {topic}");
    }
    // A retry of the first publish gets its first answer: the request id
    // survived the restart with the events.
    let (code, retried, _) = curl(
        "POST",
        &format!("http://{rest}/topics/files/events"),
        Some(&json!({
            "key": "k-1",
            "events": [
                {"eventType": "Created", "data": {"n": 1}},
                {"eventType": "Updated", "data": {"n": 2}, "metadata": {"source": "test"}},
                {"eventType": "Updated", "data": {"n": 3}},
            ],
            "requestId": "publish-1",
        })),
    );
    assert_eq!(code, 200, "{retried}");
    assert_eq!((&retried["offsets"], &retried["duplicate"]), (&json!(["1", "2", "3"]), &json!(true)), "{retried}");
    for (name, _) in &read_before {
        let (code, _, _) = curl("DELETE", &format!("http://{rest}/topics/{name}"), None);
        assert_eq!(code, 200, "delete {name}");
        let (code, gone, _) = curl("GET", &format!("http://{rest}/topics/{name}"), None);
        assert_eq!((code, reason(&gone)), (404, "TOPIC_NOT_FOUND".to_owned()), "{gone}");
    }
    let (_, listed, _) = curl("GET", &format!("http://{rest}/topics"), None);
    assert_eq!(listed["topics"].as_array().map_or(0, Vec::len), 0, "{listed}");
    stop(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topic_configurations_are_refused_with_their_field_and_create_nothing() {
    let platform = TestDatabase::create().await;
    let topic_db = TestDatabase::create().await;
    let container = TestContainer::create();
    let root = tempfile::tempdir().expect("a directory");
    let (mut server, rest) = start(platform.url(), root.path());
    let create = |topic: Value| curl("POST", &format!("http://{rest}/topics"), Some(&topic));
    let nothing_listens = eventfold_tests::unreachable_database_url();
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"name": "a1", "adapter": "kafka"}), 400, "topic.adapter", "BAD_REQUEST"),
        (json!({"name": "Not A Name", "adapter": "memory"}), 400, "topic.name", "BAD_REQUEST"),
        (json!({"name": "a2", "adapter": "fs", "connection": "relative/dir"}), 400, "topic.connection", "BAD_REQUEST"),
        (
            json!({"name": "a3", "adapter": "fs", "connection": "/etc/eventfold-topic"}),
            400,
            "topic.connection",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a4", "adapter": "fs", "connection": format!("{}/../escape", root.path().display())}),
            400,
            "topic.connection",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a5", "adapter": "postgres", "connection": topic_db.url(), "schema": "Shop; DROP SCHEMA x"}),
            400,
            "topic.schema",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a6", "adapter": "postgres", "connection": topic_db.url(), "table": "orders-2024"}),
            400,
            "topic.table",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a7", "adapter": "postgres", "connection": "not a url"}),
            400,
            "topic.connection",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a8", "adapter": "blob", "connection": container.connection_string()}),
            400,
            "topic.options[container]",
            "BAD_REQUEST",
        ),
        (
            json!({"name": "a9", "adapter": "memory", "options": {"color": "blue"}}),
            400,
            "topic.options[color]",
            "BAD_REQUEST",
        ),
        // Storage that does not answer: FAILED_PRECONDITION, nothing created.
        (
            json!({"name": "b1", "adapter": "postgres", "connection": nothing_listens, "schema": "shop"}),
            400,
            "",
            "TOPIC_STORAGE_UNREACHABLE",
        ),
        (
            json!({"name": "b2", "adapter": "blob", "connection": container.connection_string(),
                   "options": {"container": "no-such-container"}}),
            400,
            "",
            "TOPIC_STORAGE_UNREACHABLE",
        ),
        (
            json!({"name": "b3", "adapter": "fs", "options": {"createDirIfNotExist": "false"}}),
            400,
            "",
            "TOPIC_STORAGE_UNREACHABLE",
        ),
    ];
    for (topic, status, field, expected_reason) in &cases {
        let (code, answer, text) = create(topic.clone());
        assert_eq!(code, *status, "{topic}: {answer}");
        if field.is_empty() {
            assert_eq!(reason(&answer), *expected_reason, "{topic}: {answer}");
        } else {
            assert_eq!(field_violations(&answer), [*field], "{topic}: {answer}");
        }
        assert!(!text.contains("Eby8vdM02"), "no account key in an error: {text}");
    }
    // A name taken: ALREADY_EXISTS.
    let (code, _, _) = create(json!({"name": "taken", "adapter": "memory"}));
    assert_eq!(code, 200);
    let (code, answer, _) = create(json!({"name": "taken", "adapter": "fs"}));
    assert_eq!((code, reason(&answer)), (409, "TOPIC_ALREADY_EXISTS".to_owned()), "{answer}");

    // Nothing of the refused topics exists: not listed, no directory, no
    // schema in the topic database.
    let (_, listed, _) = curl("GET", &format!("http://{rest}/topics"), None);
    let names: Vec<&str> =
        listed["topics"].as_array().expect("topics").iter().map(|t| t["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["taken"]);
    let entries: Vec<_> = std::fs::read_dir(root.path()).expect("the root").collect();
    assert!(entries.is_empty(), "no directory was created: {entries:?}");
    let (client, connection) = tokio_postgres::connect(topic_db.url(), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let schemas = client
        .query("SELECT schema_name FROM information_schema.schemata WHERE schema_name IN ('shop', 'topics')", &[])
        .await
        .expect("schemas");
    assert!(schemas.is_empty(), "no schema was created");
    stop(&mut server);
}
