//! Rate limits of `eventfold dev`, called with curl (REST) and grpcurl as a
//! user would, with low limits set through the environment: a burst over
//! the limit gets 429 with `Retry-After` (and RESOURCE_EXHAUSTED over
//! gRPC), and passes again after the advertised delay; two processes share
//! one limit through Redis; with Redis stopped each process falls back to
//! its own buckets and nothing answers 5xx.

mod common;

use std::{
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use common::{DevServer, SERVICE};
use eventfold_tests::redis::OwnRedis;
use serde_json::{Value, json};

/// `eventfold dev` in memory with 1 write a second, 3 at once, and `env`;
/// the server and its REST address.
fn dev(env: &[(&str, &str)]) -> (DevServer, String) {
    let mut all = vec![
        ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_RATE_LIMIT__WRITES__PER_SECOND", "1"),
        ("EVENTFOLD_RATE_LIMIT__WRITES__BURST", "3"),
    ];
    all.extend_from_slice(env);
    let server = DevServer::start_env(&[], &all, "eventfold: EventStoreService and the command services listening on ");
    let rest = server.rest_addr();
    (server, rest)
}

/// An HTTP answer: status, headers (lowercase names), JSON body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Appends one event over REST with curl.
fn append(rest: &str) -> Answer {
    append_from(rest, None, &[])
}

/// [`append`] from the loopback address `from` (curl `--interface`), with
/// more `headers`.
fn append_from(rest: &str, from: Option<&str>, headers: &[&str]) -> Answer {
    static EVENTS: AtomicU64 = AtomicU64::new(1);
    let n = EVENTS.fetch_add(1, Ordering::Relaxed);
    let body =
        json!({"events": [{"eventId": format!("0190a6a0-0000-7000-8000-{n:012}"), "eventType": "Noted", "data": {}}]});
    let mut command = Command::new("curl");
    if let Some(from) = from {
        command.args(["--interface", from]);
    }
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command
        .args(["-sS", "-i", "-X", "POST", &format!("http://{rest}/v1/streams/limited-{n}:append")])
        .args(["-H", "content-type: application/json", "--data-binary", &body.to_string()])
        .output()
        .expect("run curl");
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or_else(|_| json!(body));
    Answer { status, headers, body }
}

/// The delay of a 429, after checking its shape.
fn too_many(answer: &Answer) -> Duration {
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.body["error"]["status"], "RESOURCE_EXHAUSTED", "{}", answer.body);
    let details = answer.body["error"]["details"].as_array().expect("details");
    let detail = |kind: &str| {
        details
            .iter()
            .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
            .unwrap_or_else(|| panic!("no {kind} in {}", answer.body))
    };
    assert_eq!(detail("google.rpc.ErrorInfo")["reason"], "RATE_LIMITED");
    assert_eq!(detail("google.rpc.ErrorInfo")["metadata"]["class"], "writes");
    assert!(detail("google.rpc.RetryInfo")["retryDelay"].is_string(), "{}", answer.body);
    let seconds: u64 = answer
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", answer.headers))
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&seconds), "Retry-After {seconds}");
    Duration::from_secs(seconds)
}

#[test]
fn a_burst_gets_429_with_retry_after_and_passes_after_the_delay() {
    let (server, rest) = dev(&[]);
    for n in 0..3 {
        let answer = append(&rest);
        assert_eq!(answer.status, 200, "write {n} of the burst: {}", answer.body);
    }
    let delay = too_many(&append(&rest));
    // gRPC from the same (anonymous) address: the same bucket, spent.
    let request = json!({"streamId": "limited-grpc", "events": [{"eventType": "Noted", "data": {}}]}).to_string();
    let output = server.grpcurl(&["-d", &request, &server.addr, &format!("{SERVICE}/Append")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("ResourceExhausted"), "grpcurl: {stderr}");
    // Reads are another class.
    let read = server.call(&format!("{SERVICE}/ListStreams"), &json!({}));
    assert!(read.is_object());
    std::thread::sleep(delay);
    let answer = append(&rest);
    assert_eq!(answer.status, 200, "after Retry-After: {}", answer.body);
}

#[test]
fn two_processes_share_one_limit_through_redis_and_fall_back_when_it_stops() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let env = [("EVENTFOLD_RATE_LIMIT__REDIS_URL", url.as_str()), ("EVENTFOLD_RATE_LIMIT__TIMEOUT_MS", "500")];
    let (_one, rest_one) = dev(&env);
    let (_two, rest_two) = dev(&env);
    // Three writes in all, across both: the fourth is refused by either.
    for (n, rest) in [&rest_one, &rest_two, &rest_one].into_iter().enumerate() {
        let answer = append(rest);
        assert_eq!(answer.status, 200, "write {n} of the shared burst: {}", answer.body);
    }
    too_many(&append(&rest_two));
    too_many(&append(&rest_one));

    // Redis stopped: each process limits on its own (a burst of 3 each),
    // and nothing answers 5xx.
    redis.stop();
    for rest in [&rest_one, &rest_two] {
        let statuses: Vec<u16> = (0..5).map(|_| append(rest).status).collect();
        assert_eq!(statuses, [200, 200, 200, 429, 429], "on {rest}");
    }
}

/// Anonymous REST callers count each for their own address (the gateway
/// names it in `x-forwarded-for`, which `eventfold dev` trusts from
/// loopback), not all for the gateway's; a caller cannot name another
/// address itself.
#[test]
fn anonymous_rest_callers_are_limited_each_by_their_own_address() {
    let (server, rest) = dev(&[]);
    for n in 0..3 {
        let answer = append_from(&rest, Some("127.0.0.2"), &[]);
        assert_eq!(answer.status, 200, "write {n} from 127.0.0.2: {}", answer.body);
    }
    too_many(&append_from(&rest, Some("127.0.0.2"), &[]));
    // Posing as another address changes nothing: the gateway replaces it.
    too_many(&append_from(&rest, Some("127.0.0.2"), &["X-Forwarded-For: 127.0.0.9"]));
    // Another caller of the same gateway has a bucket of its own.
    let other = append_from(&rest, Some("127.0.0.3"), &[]);
    assert_eq!(other.status, 200, "the first write from 127.0.0.3: {}", other.body);
    drop(server);
}
