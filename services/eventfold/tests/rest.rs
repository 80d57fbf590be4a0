//! The REST gateway of `eventfold dev`, called with curl as a user would:
//! the answers match the same calls over gRPC, errors come in Google's JSON
//! shape with the mapped HTTP status, and a malformed request is refused
//! before it reaches a service.

mod common;

use std::process::Command;

use common::{DevServer, SERVICE};
use serde_json::{Value, json};

/// `eventfold dev` in memory, its gateway on a free port.
fn dev() -> (DevServer, String) {
    let server = DevServer::start_env(
        &[],
        &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let rest = server.rest_addr();
    (server, rest)
}

/// curl `method` `url` with an optional JSON body and extra headers: the
/// HTTP status and the body as JSON.
fn curl(method: &str, url: &str, body: Option<&str>, headers: &[&str]) -> (u16, Value) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-w", "\n%{http_code}", url]);
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "--data-binary", body]);
    }
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command.output().expect("run curl");
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    let json = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(json!(body)) };
    (code.trim().parse().expect("an HTTP status"), json)
}

fn append_body(event_id: &str) -> String {
    json!({
        "events": [{
            "eventId": event_id,
            "eventType": "OrderCreated",
            "data": {"n": 1, "customer": "ada"},
            "metadata": {"correlationId": "corr-1"},
        }],
        "requestId": format!("req-{event_id}"),
    })
    .to_string()
}

fn error_detail<'a>(body: &'a Value, kind: &str) -> &'a Value {
    body["error"]["details"]
        .as_array()
        .and_then(|details| details.iter().find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind))))
        .unwrap_or_else(|| panic!("no {kind} in {body}"))
}

#[test]
fn rest_calls_answer_what_grpc_answers() {
    let (server, rest) = dev();
    let base = format!("http://{rest}");

    // Append over REST: path variable + body "*".
    let id = "0190a6a0-0000-7000-8000-000000000001";
    let (status, appended) = curl("POST", &format!("{base}/v1/streams/order-r1:append"), Some(&append_body(id)), &[]);
    assert_eq!(status, 200, "{appended}");
    assert_eq!(appended["streamId"], "order-r1");
    assert_eq!(appended["positions"].as_array().map(Vec::len), Some(1), "{appended}");

    // The same stream read over REST (query parameters) and over gRPC.
    let (status, over_rest) = curl(
        "GET",
        &format!("{base}/v1/streams/order-r1/events?maxCount=10&direction=READ_DIRECTION_FORWARDS"),
        None,
        &[],
    );
    assert_eq!(status, 200, "{over_rest}");
    let over_grpc = server.call(
        &format!("{SERVICE}/ReadStream"),
        &json!({"streamId": "order-r1", "maxCount": 10, "direction": "READ_DIRECTION_FORWARDS"}),
    );
    assert_eq!(over_rest["events"], over_grpc["events"], "REST and gRPC read the same events");
    assert_eq!(over_rest["events"][0]["eventId"], id);
    assert_eq!(over_rest["events"][0]["data"], json!({"n": 1, "customer": "ada"}), "Struct data is plain JSON");

    // A retry with the same request id: the first answer.
    let (status, again) = curl("POST", &format!("{base}/v1/streams/order-r1:append"), Some(&append_body(id)), &[]);
    assert_eq!((status, &again["positions"]), (200, &appended["positions"]));

    // A conflict: 409 with status ABORTED and the ErrorInfo.
    let conflict = json!({"expectedVersion": "5", "events": [{"eventType": "X", "data": {}}]}).to_string();
    let (status, error) = curl("POST", &format!("{base}/v1/streams/order-r1:append"), Some(&conflict), &[]);
    assert_eq!(status, 409, "{error}");
    assert_eq!((error["error"]["code"].as_u64(), error["error"]["status"].as_str()), (Some(409), Some("ABORTED")));
    assert_eq!(error_detail(&error, "google.rpc.ErrorInfo")["reason"], "WRONG_EXPECTED_VERSION", "{error}");

    // A missing stream: 404.
    let (status, error) = curl("GET", &format!("{base}/v1/streams/nobody"), None, &[]);
    assert_eq!((status, error["error"]["status"].as_str()), (404, Some("NOT_FOUND")), "{error}");
}

/// Method, URL, body, the expected HTTP status and the field named.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, Option<&'a str>);

#[test]
fn the_openapi_document_is_served_and_printed_alike() {
    let (_server, rest) = dev();
    let (status, served) = curl("GET", &format!("http://{rest}/openapi.json"), None, &[]);
    assert_eq!(status, 200);
    let printed = common::eventfold().arg("openapi").output().expect("run eventfold openapi");
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let printed: Value = serde_json::from_slice(&printed.stdout).expect("eventfold openapi prints JSON");
    assert_eq!(served, printed);
    assert_eq!(served["openapi"], "3.1.0");
    let confirm = &served["paths"]["/v1/orders/{order_id}:confirm"]["post"];
    assert_eq!(confirm["operationId"], "OrderCommandService_ConfirmOrder", "{confirm}");
}

#[test]
fn malformed_requests_are_refused_by_the_gateway_with_the_field_named() {
    let (server, rest) = dev();
    let base = format!("http://{rest}");
    let append = format!("{base}/v1/streams/order-m1:append");

    let cases: [Case<'_>; 6] = [
        ("POST", &append, Some(r#"{"events": ["#), 400, Some("body")),
        ("POST", &append, Some(r#"{"colour": "red"}"#), 400, Some("colour")),
        ("POST", &append, Some(r#"{"expectedVersion": "many"}"#), 400, None),
        ("GET", &format!("{base}/v1/streams/order-m1/events?maxCount=lots"), None, 400, Some("maxCount")),
        ("GET", &format!("{base}/v1/streams/order-m1/events?nope=1"), None, 400, Some("nope")),
        ("GET", &format!("{base}/v1/no/such/thing"), None, 404, None),
    ];
    for (method, url, body, want, field) in cases {
        let (status, error) = curl(method, url, body, &[]);
        assert_eq!(status, want, "{method} {url} {body:?}: {error}");
        assert_eq!(error["error"]["code"].as_u64(), Some(u64::from(want)), "{error}");
        if let Some(field) = field {
            let violation = &error_detail(&error, "google.rpc.BadRequest")["fieldViolations"][0];
            assert_eq!(violation["field"], field, "{method} {url}: {error}");
        }
    }
    // A method the path does not have: 405, naming the one it has (the
    // `Allow` header carries the same list).
    let (status, error) = curl("PUT", &format!("{base}/v1/streams/order-m1/events"), None, &[]);
    assert_eq!(status, 405, "{error}");
    assert_eq!(error_detail(&error, "google.rpc.ErrorInfo")["metadata"]["allow"], "GET", "{error}");
    // A body over the limit: 413, before any service sees it.
    let big = format!(r#"{{"events": [{{"eventType": "X", "data": {{"pad": "{}"}}}}]}}"#, "x".repeat(5 * 1024 * 1024));
    let file = std::env::temp_dir().join(format!("eventfold-rest-{}.json", std::process::id()));
    std::fs::write(&file, big).unwrap();
    let (status, error) = curl("POST", &append, Some(&format!("@{}", file.display())), &[]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(status, 413, "{error}");
    // Nothing of the refused requests reached the event store.
    let (status, error) = curl("GET", &format!("{base}/v1/streams/order-m1"), None, &[]);
    assert_eq!(status, 404, "the stream was never created: {error}");
    drop(server);
}

/// curl a server stream for `seconds`, then cut: the lines it printed.
fn stream(url: &str, accept: Option<&str>, seconds: u32) -> Vec<String> {
    stream_with(url, accept, &[], seconds)
}

fn stream_with(url: &str, accept: Option<&str>, headers: &[&str], seconds: u32) -> Vec<String> {
    let mut command = Command::new("curl");
    command.args(["-sSN", "--max-time", &seconds.to_string(), url]);
    if let Some(accept) = accept {
        command.args(["-H", &format!("accept: {accept}")]);
    }
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command.output().expect("run curl");
    // 28: the time limit cut the stream, as intended.
    assert_eq!(output.status.code(), Some(28), "curl {url}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn server_streams_come_as_server_sent_events_or_json_lines() {
    let (_server, rest) = dev();
    let base = format!("http://{rest}");
    for (n, id) in ["0190a6a0-0000-7000-8000-0000000000a1", "0190a6a0-0000-7000-8000-0000000000a2"].iter().enumerate() {
        let (status, answer) =
            curl("POST", &format!("{base}/v1/streams/order-s{n}:append"), Some(&append_body(id)), &[]);
        assert_eq!(status, 200, "{answer}");
    }
    let url = format!("{base}/v1/events:subscribe?filter.streamPrefixes=order-s");

    let sse = stream(&url, Some("text/event-stream"), 2);
    let events: Vec<Value> = sse
        .iter()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("each data line is JSON"))
        .collect();
    let ids: Vec<&str> = events.iter().filter_map(|m| m["event"]["eventId"].as_str()).collect();
    assert_eq!(ids, ["0190a6a0-0000-7000-8000-0000000000a1", "0190a6a0-0000-7000-8000-0000000000a2"], "{sse:?}");
    assert!(events.iter().any(|m| m.get("caughtUp").is_some()), "the live point is sent too: {sse:?}");
    assert!(
        sse.iter().all(|line| line.is_empty() || line.starts_with("data: ") || line.starts_with("id: ")),
        "{sse:?}"
    );
    // Each event's `id:` is its global position; a client that reconnects
    // with the first one as Last-Event-ID gets what followed it, once.
    let positions: Vec<&str> = events.iter().filter_map(|m| m["event"]["globalPosition"].as_str()).collect();
    let first_id = format!("id: {}", positions[0]);
    assert!(sse.contains(&first_id), "{sse:?}");
    let resumed = stream_with(&url, Some("text/event-stream"), &[&format!("last-event-id: {}", positions[0])], 2);
    let resumed_ids: Vec<String> = resumed
        .iter()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|m| m["event"]["eventId"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(resumed_ids, ["0190a6a0-0000-7000-8000-0000000000a2"], "{resumed:?}");

    let lines = stream(&url, None, 2);
    let json: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).expect("one JSON value per line")).collect();
    assert_eq!(json.iter().filter(|m| m.get("event").is_some()).count(), 2, "{lines:?}");
}

#[test]
fn serve_gateway_fronts_grpc_servers_elsewhere() {
    let (server, _) = dev();
    let upstream = format!("http://{}", server.addr);
    let (_gateway, line) = common::spawn_process(
        &["serve", "gateway"],
        &["--listen", "127.0.0.1:0", "--upstream", &upstream],
        &[],
        "eventfold: REST on http://",
    );
    let rest = line.trim_start_matches("eventfold: REST on http://").split_whitespace().next().unwrap().to_owned();
    let id = "0190a6a0-0000-7000-8000-0000000000b1";
    let (status, appended) =
        curl("POST", &format!("http://{rest}/v1/streams/order-g1:append"), Some(&append_body(id)), &[]);
    assert_eq!(status, 200, "{appended}");
    let read = server.call(&format!("{SERVICE}/ReadStream"), &json!({"streamId": "order-g1"}));
    assert_eq!(read["events"][0]["eventId"], id, "the append went to the upstream");

    // One upstream per package: the event store's here, nothing for the
    // orders package.
    let (_split, line) = common::spawn_process(
        &["serve", "gateway"],
        &["--listen", "127.0.0.1:0"],
        &[("EVENTFOLD_GATEWAY__UPSTREAMS__EVENTSTORE", &upstream)],
        "eventfold: REST on http://",
    );
    let split = line.trim_start_matches("eventfold: REST on http://").split_whitespace().next().unwrap().to_owned();
    let (status, stream) = curl("GET", &format!("http://{split}/v1/streams/order-g1"), None, &[]);
    assert_eq!(status, 200, "{stream}");
    let (status, error) = curl("POST", &format!("http://{split}/v1/orders/o-1:confirm"), Some("{}"), &[]);
    assert_eq!((status, error_detail(&error, "ErrorInfo")["reason"].as_str()), (501, Some("NO_UPSTREAM")), "{error}");

    // Without an upstream it refuses to start, with a usage error.
    let output = common::eventfold().args(["serve", "gateway"]).output().expect("run eventfold serve gateway");
    assert_eq!(output.status.code(), Some(64), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("gateway.upstream"));
}

/// Headless Chromium (Debian's `chromium`; `tests/run` installs it).
fn chromium() -> Command {
    let found = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()));
    let name = found.unwrap_or_else(|| {
        panic!("chromium not found: install it with `apt-get install -y chromium` (tests/run does)")
    });
    let mut command = Command::new(name);
    command.args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]);
    command
}

#[test]
fn swagger_ui_lists_the_operations_in_a_real_browser() {
    let (_server, rest) = dev();
    let (status, document) = curl("GET", &format!("http://{rest}/openapi.json"), None, &[]);
    assert_eq!(status, 200);
    // The operations of OrderCommandService, by the document.
    let mut wanted: Vec<String> = Vec::new();
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for operation in operations.as_object().expect("operations").values() {
            if operation["tags"][0] == "OrderCommandService" {
                wanted.push(path.clone());
            }
        }
    }
    assert!(wanted.len() >= 5, "{wanted:?}");

    let output = chromium().arg("--dump-dom").arg(format!("http://{rest}/docs")).output().expect("run chromium");
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(dom.contains("eventfold REST API"), "the page loaded");
    for path in &wanted {
        assert!(dom.contains(&format!("data-path=\"{path}\"")), "Swagger UI renders {path}");
    }

    let screenshot = std::env::temp_dir().join(format!("eventfold-swagger-{}.png", std::process::id()));
    let output = chromium()
        .arg("--window-size=1280,2000")
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("http://{rest}/docs"))
        .output()
        .expect("run chromium");
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    let png = std::fs::read(&screenshot).expect("the screenshot");
    let _ = std::fs::remove_file(&screenshot);
    assert!(png.starts_with(b"\x89PNG") && png.len() > 50_000, "a real screenshot: {} bytes", png.len());
}

/// The response headers of curl `args` (lowercase names).
fn headers_of(args: &[&str]) -> String {
    let output = Command::new("curl").args(["-sS", "-D", "-", "-o", "/dev/null"]).args(args).output().expect("curl");
    assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).to_lowercase()
}

#[test]
fn cors_answers_only_the_configured_origins() {
    let server = DevServer::start_env(
        &[],
        &[
            ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_GATEWAY__CORS_ORIGINS", r#"["https://app.example"]"#),
        ],
        "eventfold: EventStoreService and the command services listening on ",
    );
    let url = format!("http://{}/v1/streams", server.rest_addr());
    let preflight = |origin: &str| {
        headers_of(&[
            "-X",
            "OPTIONS",
            "-H",
            &format!("origin: {origin}"),
            "-H",
            "access-control-request-method: GET",
            &url,
        ])
    };
    assert!(preflight("https://app.example").contains("access-control-allow-origin: https://app.example"));
    assert!(!preflight("https://evil.example").contains("access-control-allow-origin"));
    let get = headers_of(&["-H", "origin: https://app.example", &url]);
    assert!(get.contains("access-control-allow-origin: https://app.example"), "{get}");

    // Without the setting, no CORS headers at all.
    let (_plain, rest) = dev();
    let get = headers_of(&["-H", "origin: https://app.example", &format!("http://{rest}/v1/streams")]);
    assert!(get.starts_with("http/1.1 200"), "{get}");
    assert!(!get.contains("access-control-allow-origin"), "{get}");
}

/// A WebSocket client just big enough for the tests: the handshake, then
/// the server's text frames (unmasked, as servers send them).
struct WebSocket {
    socket: std::net::TcpStream,
    bytes: Vec<u8>,
}

impl WebSocket {
    fn connect(addr: &str, path: &str, headers: &[&str]) -> WebSocket {
        use std::io::Write;
        let mut socket = std::net::TcpStream::connect(addr).expect("connect to the gateway");
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: ZXZlbnRmb2xkLXRlc3Qta2V5\r\nSec-WebSocket-Version: 13\r\n"
        );
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).unwrap();
        socket.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
        WebSocket { socket, bytes: Vec::new() }
    }

    /// Reads until `done` holds for the text frames so far, the server
    /// closes, or `seconds` pass.
    fn read_until(&mut self, seconds: u64, done: impl Fn(&[String]) -> bool) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let mut chunk = [0u8; 65536];
        while std::time::Instant::now() < deadline && !done(&self.frames().1) {
            match self.socket.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.bytes.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The HTTP answer's head and the text frames received so far.
    fn frames(&self) -> (String, Vec<String>) {
        let Some(split) = self.bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4) else {
            return (String::new(), Vec::new());
        };
        let head = String::from_utf8_lossy(&self.bytes[..split]).into_owned();
        let mut frames = &self.bytes[split..];
        let mut texts = Vec::new();
        while frames.len() >= 2 {
            let opcode = frames[0] & 0x0f;
            let (len, start) = match frames[1] & 0x7f {
                126 if frames.len() >= 4 => (usize::from(u16::from_be_bytes([frames[2], frames[3]])), 4),
                127 if frames.len() >= 10 => {
                    (usize::try_from(u64::from_be_bytes(frames[2..10].try_into().unwrap())).unwrap(), 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if frames.len() < start + len {
                break;
            }
            if opcode == 1 {
                texts.push(String::from_utf8(frames[start..start + len].to_vec()).expect("UTF-8 text"));
            }
            frames = &frames[start + len..];
        }
        (head, texts)
    }
}

/// The head and text frames of a WebSocket at `path` over `seconds`.
fn websocket_texts(addr: &str, path: &str, headers: &[&str], seconds: u64) -> (String, Vec<String>) {
    let mut socket = WebSocket::connect(addr, path, headers);
    socket.read_until(seconds, |_| false);
    socket.frames()
}

/// The ids of the events among stream messages (JSON texts).
fn event_ids<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    texts
        .into_iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .filter_map(|m| m["event"]["eventId"].as_str().map(str::to_owned))
        .collect()
}

/// An SSE subscription held open by a curl child: what it printed so far.
struct EventSource {
    child: std::process::Child,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl EventSource {
    fn open(url: &str, headers: &[&str]) -> EventSource {
        let mut command = Command::new("curl");
        command.args(["-sSN", "-H", "accept: text/event-stream", url]);
        for header in headers {
            command.args(["-H", header]);
        }
        let mut child = command.stdout(std::process::Stdio::piped()).spawn().expect("run curl");
        let output = common::drain(child.stdout.take().unwrap());
        EventSource { child, output }
    }

    /// The (id, data) of each complete event so far.
    fn events(&self) -> Vec<(Option<String>, String)> {
        let text = self.output.lock().unwrap().clone();
        let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
        complete
            .split("\n\n")
            .filter(|block| !block.is_empty())
            .map(|block| {
                let id = block.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_owned);
                let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default().to_owned();
                (id, data)
            })
            .collect()
    }

    fn wait_until(&self, what: &str, done: impl Fn(&[(Option<String>, String)]) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done(&self.events()) {
            assert!(std::time::Instant::now() < deadline, "no {what} in {:?}", self.events());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for EventSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn live_subscriptions_deliver_what_follows_and_resume_after_last_event_id() {
    let (_server, rest) = dev();
    let event = |n: u32| format!("0190a6a0-0000-7000-8000-00000000d{n:03}");
    // One stream (SSE id: the event's version, Last-Event-ID sets
    // from_version) and the global log (id: the global position,
    // Last-Event-ID sets from_position).
    for (case, stream, query, key) in [
        (0, "order-live1", "streamId=order-live1", "version"),
        (1, "order-logl1", "filter.streamPrefixes=order-logl", "globalPosition"),
    ] {
        let append = |n: u32| {
            let (status, answer) =
                curl("POST", &format!("http://{rest}/v1/streams/{stream}:append"), Some(&append_body(&event(n))), &[]);
            assert_eq!(status, 200, "{answer}");
        };
        let url = format!("http://{rest}/v1/events:subscribe?{query}");
        let n = |k: u32| case * 10 + k;

        // Connected and live (caught up on the empty history), then two
        // appends: both arrive, in order, each with its id.
        let sse = EventSource::open(&url, &[]);
        sse.wait_until("caughtUp", |events| events.iter().any(|(_, data)| data.contains("caughtUp")));
        append(n(1));
        append(n(2));
        sse.wait_until("two events", |events| event_ids(events.iter().map(|(_, d)| d.as_str())).len() == 2);
        let events: Vec<(Option<String>, Value)> = sse
            .events()
            .into_iter()
            .map(|(id, data)| (id, serde_json::from_str::<Value>(&data).expect("each data line is JSON")))
            .filter(|(_, m)| m.get("event").is_some())
            .collect();
        let got: Vec<&str> = events.iter().filter_map(|(_, m)| m["event"]["eventId"].as_str()).collect();
        assert_eq!(got, [event(n(1)), event(n(2))], "{case}: {events:?}");
        for (id, message) in &events {
            assert_eq!(
                id.as_deref(),
                Some(message["event"][key].as_str().unwrap_or("0")),
                "{case}: the id is the event's {key}"
            );
        }
        let last_seen = events[1].0.clone().unwrap();
        drop(sse);

        // Missed while away; the reconnect with Last-Event-ID gets exactly those.
        append(n(3));
        append(n(4));
        let sse = EventSource::open(&url, &[&format!("last-event-id: {last_seen}")]);
        sse.wait_until("caughtUp", |events| events.iter().any(|(_, data)| data.contains("caughtUp")));
        let got = event_ids(sse.events().iter().map(|(_, d)| d.as_str()));
        assert_eq!(got, [event(n(3)), event(n(4))], "{case}: what was missed, once");
        let resumed_from = sse.events().iter().rev().find_map(|(id, _)| id.clone()).unwrap();
        drop(sse);

        // The same over WebSocket: live after the resumed history, then a
        // reconnect after the first live event gets the second only.
        let path = format!("/ws/v1/events:subscribe?{query}");
        let mut socket = WebSocket::connect(&rest, &path, &[&format!("Last-Event-ID: {resumed_from}")]);
        socket.read_until(20, |texts| texts.iter().any(|t| t.contains("caughtUp")));
        assert!(socket.frames().0.starts_with("HTTP/1.1 101"), "{:?}", socket.frames());
        append(n(5));
        append(n(6));
        socket.read_until(20, |texts| event_ids(texts.iter().map(String::as_str)).len() == 2);
        let (_, texts) = socket.frames();
        assert_eq!(event_ids(texts.iter().map(String::as_str)), [event(n(5)), event(n(6))], "{case}: {texts:?}");
        let fifth: Value = texts
            .iter()
            .filter_map(|t| serde_json::from_str::<Value>(t).ok())
            .find(|m| m["event"]["eventId"] == event(n(5)))
            .unwrap();
        let fifth = fifth["event"][key].as_str().unwrap().to_owned();
        let mut socket = WebSocket::connect(&rest, &path, &[&format!("Last-Event-ID: {fifth}")]);
        socket.read_until(20, |texts| texts.iter().any(|t| t.contains("caughtUp")));
        let (_, texts) = socket.frames();
        assert_eq!(event_ids(texts.iter().map(String::as_str)), [event(n(6))], "{case}: {texts:?}");
    }
}

#[test]
fn server_streams_come_over_websocket_and_resume_after_last_event_id() {
    let (_server, rest) = dev();
    let ids = ["0190a6a0-0000-7000-8000-0000000000c1", "0190a6a0-0000-7000-8000-0000000000c2"];
    for (n, id) in ids.iter().enumerate() {
        let (status, answer) =
            curl("POST", &format!("http://{rest}/v1/streams/order-w{n}:append"), Some(&append_body(id)), &[]);
        assert_eq!(status, 200, "{answer}");
    }
    let path = "/ws/v1/events:subscribe?filter.streamPrefixes=order-w";
    let (head, texts) = websocket_texts(&rest, path, &[], 2);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let messages: Vec<Value> = texts.iter().map(|t| serde_json::from_str(t).expect("JSON text")).collect();
    let events: Vec<&Value> = messages.iter().filter(|m| m.get("event").is_some()).collect();
    let got: Vec<&str> = events.iter().filter_map(|m| m["event"]["eventId"].as_str()).collect();
    assert_eq!(got, ids, "{texts:?}");

    let first = events[0]["event"]["globalPosition"].as_str().unwrap();
    let (_, resumed) = websocket_texts(&rest, path, &[&format!("Last-Event-ID: {first}")], 2);
    let got: Vec<String> = resumed
        .iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .filter_map(|m| m["event"]["eventId"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(got, [ids[1]], "what followed the last event, once: {resumed:?}");

    // A unary RPC is no stream: an HTTP error, no upgrade.
    let (head, _) = websocket_texts(&rest, "/ws/v1/streams/order-w0", &[], 1);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}
