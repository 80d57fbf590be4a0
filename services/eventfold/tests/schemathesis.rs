//! The REST gateway against its own OpenAPI document, checked by tools
//! from outside the project (PyPI, pinned with hashes in
//! tests/api/requirements.txt, installed by tests/run):
//!
//! - openapi-spec-validator validates `docs/openapi.json` and the served
//!   `/openapi.json` as OpenAPI 3.1, and the document lists every HTTP
//!   binding of the descriptor set exactly once;
//! - schemathesis generates at least 1,000 requests from the served
//!   document against `eventfold dev --database-url …` and finds no 5xx
//!   answer and no answer that departs from the document.
//!
//! A missing tool fails the test (it never skips): run tests/run, or point
//! `EVENTFOLD_API_PYTHON` / `EVENTFOLD_SCHEMATHESIS` at the virtualenv.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{DevServer, drain, wait_timeout};
use serde_json::Value;

/// At least this many generated requests (issue 16).
const MIN_CASES: u64 = 1_000;
/// A fixed seed: the same requests on every run.
const SEED: &str = "16";
/// Test cases per operation and phase; with 53 operations and the coverage
/// phase's own cases this makes well over [`MIN_CASES`].
const MAX_EXAMPLES: &str = "25";
/// Per request, in seconds.
const REQUEST_TIMEOUT_SECS: &str = "10";
/// The whole schemathesis run.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// What every answer is checked for: no 5xx, and conformance to the
/// document (status code, content type, headers, body schema).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";
const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// A program of the API checker's virtualenv: `$env`, else the one
/// tests/run installs (`$EVENTFOLD_TOOLS_DIR/api-venv-<sha256 of the
/// requirements, 16 hex digits>/bin/<name>`).
fn api_tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env}={} is not a file: run tests/run (it installs the API checker)", path.display());
        return path;
    }
    let tools = std::env::var_os("EVENTFOLD_TOOLS_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/eventfold/tools")));
    let requirements = repo_root().join("tests/api/requirements.txt");
    let digest = Command::new("sha256sum")
        .arg(&requirements)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).chars().take(16).collect::<String>());
    if let (Some(tools), Some(digest)) = (tools, digest) {
        let path = tools.join(format!("api-venv-{digest}")).join("bin").join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "{name} not found: run tests/run (it installs tests/api/requirements.txt into a virtualenv, hashes \
         required, and sets {env}) or set {env}"
    );
}

/// GET `url` with curl: the body, which must be a 200.
fn fetch(url: &str) -> String {
    let output = Command::new("curl").args(["-sS", "--fail", "--max-time", "10", url]).output().expect("run curl");
    assert!(output.status.success(), "GET {url} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8 body")
}

/// `(path, method, operationId, streams)` of every operation of an OpenAPI
/// document; `streams` when an answer is `text/event-stream`.
fn operations(document: &Value) -> Vec<(String, String, String, bool)> {
    let paths = document["paths"].as_object().expect("paths");
    let mut out = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("a path item") {
            if !HTTP_METHODS.contains(&method.as_str()) {
                continue;
            }
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            let streams = operation["responses"]
                .as_object()
                .is_some_and(|responses| responses.values().any(|r| r["content"].get("text/event-stream").is_some()));
            out.push((path.clone(), method.clone(), id.to_owned(), streams));
        }
    }
    out
}

/// Validates the files with tests/api/check_openapi.py
/// (openapi-spec-validator, OpenAPI 3.1).
fn validate(files: &[&Path]) {
    let python = api_tool("EVENTFOLD_API_PYTHON", "python");
    let output = Command::new(&python)
        .arg(repo_root().join("tests/api/check_openapi.py"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "openapi-spec-validator refuses the document:\n{stdout}\n{stderr}");
}

/// The document names each binding of the descriptor set exactly once, by
/// its path, method and operationId, and streams exactly the server
/// streams.
fn assert_lists_every_binding_once(name: &str, document: &Value) {
    let pool = prost_reflect::DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let bindings = eventfold_gateway::rules::bindings(&pool).expect("the bindings");
    let operations = operations(document);
    assert_eq!(operations.len(), bindings.len(), "{name}: one operation per binding");

    let ids: BTreeSet<&str> = operations.iter().map(|(_, _, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), operations.len(), "{name}: operationIds are unique");

    let expected: BTreeSet<(String, String, String, bool)> = bindings
        .iter()
        .map(|b| {
            (b.template.openapi_path(), b.method.as_str().to_ascii_lowercase(), b.operation_id(), b.server_streaming())
        })
        .collect();
    assert_eq!(expected.len(), bindings.len(), "bindings are distinct");
    let listed: BTreeSet<(String, String, String, bool)> = operations.into_iter().collect();
    let missing: Vec<_> = expected.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{name}: missing bindings {missing:?}; not bindings {extra:?}");
}

#[test]
fn openapi_document_is_valid_and_lists_every_binding_once() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let served = fetch(&format!("http://{}/openapi.json", server.rest_addr()));
    let dir = tempfile::tempdir().expect("temp dir");
    let served_file = dir.path().join("served-openapi.json");
    std::fs::write(&served_file, &served).expect("write the served document");
    let checked_in = repo_root().join("docs/openapi.json");

    validate(&[&checked_in, &served_file]);

    let checked_in_text = std::fs::read_to_string(&checked_in).expect("docs/openapi.json");
    for (name, text) in [("docs/openapi.json", checked_in_text.as_str()), ("/openapi.json", served.as_str())] {
        let document: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(document["openapi"], "3.1.0", "{name}");
        assert_lists_every_binding_once(name, &document);
    }
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let schemathesis = api_tool("EVENTFOLD_SCHEMATHESIS", "schemathesis");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let rest = server.rest_addr();
    let schema_url = format!("http://{rest}/openapi.json");
    let document: Value = serde_json::from_str(&fetch(&schema_url)).expect("the served document");

    // Server streams never end: they are left out (the SSE tests cover them).
    let streams: Vec<String> =
        operations(&document).into_iter().filter(|(_, _, _, streams)| *streams).map(|(_, _, id, _)| id).collect();
    for known in ["EventStoreService_Subscribe", "OrderQueryService_WatchOrder", "SagaService_WatchSaga"] {
        assert!(streams.iter().any(|id| id == known), "{known} is not documented as text/event-stream: {streams:?}");
    }

    // In a scratch directory: schemathesis and hypothesis keep state (and
    // would read a config file) in the working directory.
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.json");
    let mut command = Command::new(&schemathesis);
    command
        .current_dir(dir.path())
        .args(["run", &schema_url, "--seed", SEED, "--max-examples", MAX_EXAMPLES, "--checks", CHECKS])
        .args(["--request-timeout", REQUEST_TIMEOUT_SECS, "--output-truncate", "false"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for id in &streams {
        command.args(["--exclude-operation-id", id]);
    }
    println!("running {command:?}");
    let started = Instant::now();
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", schemathesis.display()));
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let status = wait_timeout(&mut child, RUN_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // The pipes close with the process; give the readers a moment.
    std::thread::sleep(Duration::from_millis(200));
    let out = stdout.lock().unwrap().clone();
    let err = stderr.lock().unwrap().clone();
    println!("{out}");
    let status = status.unwrap_or_else(|| panic!("schemathesis ran longer than {RUN_TIMEOUT:?}:\n{out}\n{err}"));

    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(&report)
            .unwrap_or_else(|e| panic!("no report from schemathesis ({e}), exit {status}:\n{out}\n{err}")),
    )
    .expect("the JSON report");
    let generated = summary["test_cases"]["generated"].as_u64().expect("test_cases.generated");
    println!(
        "schemathesis: {generated} generated requests over {} operations in {:.0?} (seed {SEED})",
        summary["operations"]["tested"],
        started.elapsed()
    );
    assert_eq!(summary["complete"], true, "the run was cut short: {summary}");
    assert_eq!(summary["operations"]["errored"], 0, "operations errored:\n{out}");
    assert_eq!(
        summary["operations"]["tested"].as_u64(),
        Some(operations(&document).len().saturating_sub(streams.len()) as u64),
        "every operation but the streams is tested:\n{out}"
    );
    let failures = summary["failures"].as_array().map_or(0, Vec::len);
    let errors = summary["errors"].as_array().map_or(0, Vec::len);
    assert!(
        failures == 0 && errors == 0 && summary["test_cases"]["with_failures"] == 0,
        "schemathesis found {} failing requests ({}) and {errors} errors:\n{out}\n{err}",
        summary["test_cases"]["with_failures"],
        serde_json::to_string(&summary["failures"]).unwrap_or_default(),
    );
    assert!(generated >= MIN_CASES, "only {generated} requests generated, expected at least {MIN_CASES}:\n{out}");
    assert!(status.success(), "schemathesis exited with {status}:\n{out}\n{err}");
}
