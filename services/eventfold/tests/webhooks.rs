//! Callbacks (webhooks) as a receiver sees them: a local HTTP server that
//! fails the first deliveries and then answers slowly gets every event
//! from the requested offset, in order, each batch signed with the
//! callback's secret, and nothing once the callback is deleted; a callback
//! that keeps failing past its `dropAfter` is dropped.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::DevServer;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// What the receiver got: each request's signature header, body and the
/// status it answered.
#[derive(Debug, Clone)]
struct Delivery {
    signature: String,
    body: Vec<u8>,
    status: u16,
}

/// An HTTP receiver on a free port: answers 500 to the first `failures`
/// requests, then 200 after `delay`.
fn receiver(failures: usize, delay: Duration) -> (u16, Arc<Mutex<Vec<Delivery>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let deliveries = Arc::new(Mutex::new(Vec::new()));
    let seen = deliveries.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = seen.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                // Keep-alive: several requests per connection.
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut signature) = (0usize, String::new());
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            match name.trim().to_ascii_lowercase().as_str() {
                                "content-length" => length = value.trim().parse().unwrap_or(0),
                                "x-eventfold-signature" => signature = value.trim().to_owned(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let status = {
                        let mut seen = seen.lock().unwrap();
                        let status = if seen.len() < failures { 500 } else { 200 };
                        seen.push(Delivery { signature, body, status });
                        status
                    };
                    if status == 200 {
                        thread::sleep(delay);
                    }
                    let reason = if status == 200 { "OK" } else { "Internal Server Error" };
                    let answer = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n");
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, deliveries)
}

fn curl(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-w", "\n%{http_code}", url]);
    let text;
    if let Some(body) = body {
        text = body.to_string();
        command.args(["-H", "content-type: application/json", "--data-binary", &text]);
    }
    let output = command.output().expect("run curl");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').expect("a status line");
    let json = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(json!(body)) };
    (code.trim().parse().expect("an HTTP status"), json)
}

fn publish(rest: &str, topic: &str, from: u64, count: u64) {
    let events: Vec<Value> = (from..from + count).map(|n| json!({"eventType": "Tick", "data": {"n": n}})).collect();
    let (code, answer) =
        curl("POST", &format!("http://{rest}/topics/{topic}/events"), Some(&json!({"events": events})));
    assert_eq!(code, 200, "{answer}");
}

fn offsets(body: &[u8]) -> Vec<u64> {
    let batch: Value = serde_json::from_slice(body).expect("a JSON batch");
    batch["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["offset"].as_str().expect("offset").parse().expect("a number"))
        .collect()
}

fn signed(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn a_failing_then_slow_receiver_gets_every_event_in_order_signed_and_nothing_after_delete() {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let rest = server.rest_addr();
    let (code, answer) =
        curl("POST", &format!("http://{rest}/topics"), Some(&json!({"name": "hooks", "adapter": "memory"})));
    assert_eq!(code, 200, "{answer}");
    publish(&rest, "hooks", 1, 5);

    let (port, deliveries) = receiver(3, Duration::from_millis(300));
    let url = format!("http://127.0.0.1:{port}/hook?token=t0ken");
    let (code, callback) = curl(
        "POST",
        &format!("http://{rest}/topics/hooks/subscribe?from=3"),
        Some(&json!({"url": url, "maxBatch": 2})),
    );
    assert_eq!(code, 200, "{callback}");
    let id = callback["callbackId"].as_str().expect("an id").to_owned();
    let secret = callback["secret"].as_str().expect("the secret, once").to_owned();
    assert!(secret.len() >= 32, "a long secret");
    publish(&rest, "hooks", 6, 5);

    // Every event from offset 3 to 10 arrives in accepted batches.
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        let accepted: Vec<u64> =
            deliveries.lock().unwrap().iter().filter(|d| d.status == 200).flat_map(|d| offsets(&d.body)).collect();
        if accepted.last() == Some(&10) {
            break accepted;
        }
        assert!(Instant::now() < deadline, "not every event arrived within 60 s: {accepted:?}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(accepted, (3..=10).collect::<Vec<_>>(), "every event from offset 3, in order, once accepted");
    let all = deliveries.lock().unwrap().clone();
    assert_eq!(all.iter().filter(|d| d.status == 500).count(), 3, "the first three deliveries failed");
    assert_eq!(offsets(&all[0].body), offsets(&all[3].body), "a failed batch is delivered again");
    for delivery in &all {
        assert_eq!(delivery.signature, signed(&secret, &delivery.body), "every batch is signed with the secret");
        let batch: Value = serde_json::from_slice(&delivery.body).expect("JSON");
        assert_eq!((batch["topic"].as_str(), batch["callbackId"].as_str()), (Some("hooks"), Some(id.as_str())));
        assert!(offsets(&delivery.body).len() <= 2, "at most maxBatch events per POST");
    }

    // The cursor moves once the last batch's answer (which comes slowly)
    // is in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (code, listed) = curl("GET", &format!("http://{rest}/topics/hooks/callbacks"), None);
        assert_eq!(code, 200, "{listed}");
        if listed["callbacks"][0]["cursor"] == "10" {
            break listed;
        }
        assert!(Instant::now() < deadline, "the cursor reaches offset 10: {listed}");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(listed["callbacks"][0].get("secret").is_none_or(|s| s == ""), "the secret is shown once only: {listed}");

    let (code, _) = curl("DELETE", &format!("http://{rest}/topics/hooks/callbacks/{id}"), None);
    assert_eq!(code, 200);
    let after_delete = deliveries.lock().unwrap().len();
    publish(&rest, "hooks", 11, 3);
    thread::sleep(Duration::from_secs(2));
    assert_eq!(deliveries.lock().unwrap().len(), after_delete, "nothing is POSTed after DeleteCallback");
    let (code, gone) = curl("DELETE", &format!("http://{rest}/topics/hooks/callbacks/{id}"), None);
    assert_eq!(code, 404, "{gone}");

    // A callback whose URL never answers 2xx is dropped after dropAfter.
    let (port, _) = receiver(usize::MAX, Duration::ZERO);
    let (code, doomed) = curl(
        "POST",
        &format!("http://{rest}/topics/hooks/subscribe?from=1"),
        Some(&json!({"url": format!("http://127.0.0.1:{port}/"), "dropAfter": "1s"})),
    );
    assert_eq!(code, 200, "{doomed}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, listed) = curl("GET", &format!("http://{rest}/topics/hooks/callbacks"), None);
        if listed["callbacks"].as_array().map_or(0, Vec::len) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the failing callback was not dropped: {listed}");
        thread::sleep(Duration::from_millis(200));
    }
    let log = server.process.stderr.lock().unwrap().clone();
    assert!(log.contains("callback dropped"), "the drop is logged");
    assert!(!log.contains("t0ken"), "the callback URL (it may hold a token) is never logged");
}
