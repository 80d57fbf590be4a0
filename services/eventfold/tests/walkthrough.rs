//! The README's curl walkthrough, run as written against `eventfold dev`:
//! each step's commands go to `bash` with only the address changed (the
//! gateway listens on a free port here), and each answer is checked. The
//! steps are matched by their comments, so a step added to or removed from
//! the README without this test (or the other way round) fails it.

mod common;

use std::process::Command;

use common::{DevServer, readme_steps};

/// Runs `script` with `localhost:8080` replaced by `rest`, in `dir`: what
/// it printed (stdout), after checking that it succeeded.
fn run(script: &str, rest: &str, dir: &std::path::Path) -> String {
    let script = script.replace("localhost:8080", rest);
    let output =
        Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(dir).output().expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // curl exits 28 when --max-time ends a stream, as the walkthrough means it to.
    let ended_by_time_limit = script.contains("--max-time") && output.status.code() == Some(28);
    assert!(output.status.success() || ended_by_time_limit, "{script}\nfailed: {stderr}\n{stdout}");
    stdout
}

/// The JSON values of the `data:` lines of an SSE answer.
fn sse_data(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("each data line is JSON"))
        .collect()
}

/// The event types of an SSE answer, in order.
fn sse_event_types(text: &str) -> Vec<String> {
    sse_data(text).iter().filter_map(|m| m["event"]["eventType"].as_str().map(str::to_owned)).collect()
}

#[test]
fn the_readme_curl_walkthrough_runs_as_written() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let rest = server.rest_addr();
    let dir = std::env::temp_dir().join(format!("eventfold-walkthrough-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    type Check = fn(&str);
    let checks: [(&str, Check); 6] = [
        ("create an order", |out| {
            let answer: serde_json::Value = serde_json::from_str(out).expect("a JSON answer");
            assert!(answer["result"]["globalPosition"].as_str().is_some(), "the position of the write: {answer}");
        }),
        ("read its stream", |out| {
            let answer: serde_json::Value = serde_json::from_str(out).expect("a JSON answer");
            let types: Vec<&str> =
                answer["events"].as_array().unwrap().iter().filter_map(|e| e["eventType"].as_str()).collect();
            assert_eq!(types, ["OrderCreated"], "{answer}");
        }),
        ("a conflict", |out| {
            assert!(out.starts_with("HTTP/1.1 409"), "{out}");
            let body = out.split("\r\n\r\n").nth(1).expect("a body");
            let error: serde_json::Value = serde_json::from_str(body).expect("the JSON error");
            assert_eq!(error["error"]["status"], "ABORTED", "{error}");
            let reasons: Vec<&str> =
                error["error"]["details"].as_array().unwrap().iter().filter_map(|d| d["reason"].as_str()).collect();
            assert_eq!(reasons, ["WRONG_EXPECTED_VERSION"], "{error}");
        }),
        ("subscribe to the order's stream", |out| {
            assert_eq!(sse_event_types(out), ["OrderCreated"], "{out}");
            assert!(sse_data(out).iter().any(|m| m.get("caughtUp").is_some()), "{out}");
            assert!(out.lines().any(|line| line == "id: 0"), "the event's id is its version: {out}");
        }),
        ("confirm the order", |out| {
            assert_eq!(sse_event_types(out), ["OrderConfirmed"], "only what followed id 0: {out}");
        }),
        ("the OpenAPI 3.1 document", |out| {
            assert_eq!(out.trim(), r#""openapi": "3.1.0","#, "{out}");
        }),
    ];
    let steps = readme_steps("A curl walkthrough");
    let comments: Vec<&str> = steps.iter().map(|s| s.comment.as_str()).collect();
    assert_eq!(steps.len(), checks.len(), "the README's steps and this test's checks differ: {comments:?}");
    for (step, (starts, check)) in steps.iter().zip(checks) {
        assert!(step.comment.starts_with(starts), "README step {:?} where the test expects {starts:?}", step.comment);
        let out = run(&step.script, &rest, &dir);
        check(&out);
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
}
