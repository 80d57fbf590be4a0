//! Sensitive values never reach the logs or an error message (issue 17,
//! "Masking"), against the real binary: `eventfold dev --database-url …
//! --auth` (commands, read side, sagas and the REST gateway in one
//! process) with JSON logs at debug level. Through gRPC (grpcurl) and REST
//! (curl), the test places two orders with distinctive payment tokens (the
//! fulfilment saga authorizes them and completes), registers two users with
//! distinctive emails, registers one with an invalid email (refused), sends
//! a payment token as a JSON number (refused by the gateway), and calls
//! with a bogus API key and a bogus bearer token (refused; bearer tokens
//! are verified with an HS256 secret, itself never logged). Then:
//!
//! - no log line (stderr, every line JSON) and no other output line holds
//!   any of those values, nor the admin key (printed once on stdout by
//!   design: that one line is the exception); no error answer holds the
//!   value it refused;
//! - the logs are not trivially clean: the command bus logged every command
//!   at debug level with its content (`<redacted>` where a token or an
//!   email was), and the saga logged its steps with its data; so a value
//!   that escaped the masking would have been seen.

mod common;

use std::{
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::DevServer;
use serde_json::{Value, json};

/// The first line of `eventfold dev` on PostgreSQL.
const DEV_ON_POSTGRES: &str = "eventfold: EventStoreService and the command and query services listening on ";
/// What `eventfold dev --auth` prints before its admin key.
const ADMIN_KEY_LINE: &str = "eventfold: authentication on; admin API key (shown once): ";
const REDACTED: &str = "<redacted>";

/// A value nobody else uses: its unique part is what the logs are searched
/// for (it survives any quoting or escaping of the whole).
struct Secret {
    label: &'static str,
    value: String,
    unique: String,
}

impl Secret {
    fn new(label: &'static str, make: impl Fn(&str) -> String) -> Secret {
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        let value = make(&uuid);
        let unique = if value.contains(&uuid) { uuid } else { value.clone() };
        Secret { label, value, unique }
    }
}

/// The gRPC code of grpcurl's call (0: OK), from the status it prints as
/// JSON (`-format-error`) when the call failed; and all it printed.
fn outcome(output: &Output) -> (i64, String) {
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        return (0, printed);
    }
    let status = serde_json::Deserializer::from_slice(&output.stderr).into_iter::<Value>().map_while(Result::ok).last();
    let code =
        status.and_then(|s| s["code"].as_i64()).unwrap_or_else(|| panic!("grpcurl failed without a status: {printed}"));
    (code, printed)
}

/// gRPC codes.
const INVALID_ARGUMENT: i64 = 3;
const UNAUTHENTICATED: i64 = 16;

struct Platform {
    server: DevServer,
    rest: String,
    protoset: tempfile::NamedTempFile,
    admin: String,
}

impl Platform {
    /// A gRPC call with `credentials` (`-H` values): its code and what
    /// grpcurl printed (the answer, or the error as JSON).
    fn grpc_as(&self, credentials: &[String], rpc: &str, request: &Value) -> (i64, String) {
        let protoset = self.protoset.path().to_string_lossy().into_owned();
        let request = request.to_string();
        let mut args = vec!["-protoset", &protoset, "-format-error", "-max-time", "20"];
        for h in credentials {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["-d", &request, &self.server.addr, rpc]);
        outcome(&self.server.grpcurl(&args).output().expect("run grpcurl"))
    }

    fn grpc(&self, rpc: &str, request: &Value) -> (i64, String) {
        self.grpc_as(&[format!("x-api-key: {}", self.admin)], rpc, request)
    }

    /// A successful gRPC call's answer.
    fn call(&self, rpc: &str, request: &Value) -> Value {
        let (code, out) = self.grpc(rpc, request);
        assert_eq!(code, 0, "{rpc} failed: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{rpc} answered no JSON ({e}): {out}"))
    }

    /// A REST call with `credentials`; the HTTP status and the body.
    fn rest_as(&self, credentials: &[String], method: &str, target: &str, body: &str) -> (u16, String) {
        let mut command = Command::new("curl");
        command.args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
        command.arg(format!("http://{}{target}", self.rest));
        for h in credentials {
            command.args(["-H", h]);
        }
        command.args(["-H", "content-type: application/json", "--data-binary", body]);
        let output = command.stdin(Stdio::null()).output().expect("run curl");
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = out.rsplit_once('\n').unwrap_or_else(|| panic!("curl printed no status: {out}"));
        (status.trim().parse().unwrap_or_else(|_| panic!("curl status {status:?}")), body.to_owned())
    }

    fn rest(&self, method: &str, target: &str, body: &Value) -> (u16, String) {
        self.rest_as(&[format!("x-api-key: {}", self.admin)], method, target, &body.to_string())
    }

    /// Calls `rpc` until `done` holds for its answer (within 30 s).
    fn wait_for(&self, what: &str, rpc: &str, request: &Value, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, out) = self.grpc(rpc, request);
            let answer = if code == 0 { serde_json::from_str(&out).ok() } else { None };
            if let Some(answer) = answer.filter(|a| done(a)) {
                return answer;
            }
            assert!(Instant::now() < deadline, "no {what} within 30 s; last answer: {out}");
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The admin key `eventfold dev --auth` printed.
fn admin_key(server: &DevServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let printed = server.process.stdout.lock().unwrap().clone();
        if let Some(key) = printed.lines().find_map(|line| line.strip_prefix(ADMIN_KEY_LINE)) {
            return key.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no admin key line on stdout: {printed:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn order(order_id: &str, token: &Value) -> Value {
    json!({
        "order_id": order_id,
        "customer_id": "c-mask",
        "currency": "EUR",
        "items": [{"product_id": "sku-mask", "quantity": 1, "unit_price": {"minor": 1250, "currency": "EUR"}}],
        "payment_token": token,
        "carrier": "DHL",
    })
}

/// The log lines (JSON objects) whose `message` is `message` and whose
/// `field` holds every one of `needles`.
fn lines_with<'a>(logs: &'a [Value], message: &str, field: &str, needles: &[&str]) -> Vec<&'a Value> {
    logs.iter()
        .filter(|line| line["message"] == message)
        .filter(|line| line[field].as_str().is_some_and(|text| needles.iter().all(|n| text.contains(n))))
        .collect()
}

#[test]
fn tokens_emails_and_keys_never_reach_the_logs_or_error_messages() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    // Bearer tokens are verified (HS256), so the bogus one is parsed.
    let hs256 = Secret::new("HS256 secret", |u| format!("hs256-{u}"));
    let server = DevServer::start_env(
        &["--database-url", db.url(), "--auth"],
        &[
            ("EVENTFOLD_LOG__FORMAT", "json"),
            ("EVENTFOLD_LOG__FILTER", "debug"),
            ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
            ("EVENTFOLD_AUTH__JWT__HS256_SECRET", &hs256.value),
        ],
        DEV_ON_POSTGRES,
    );
    let platform =
        Platform { rest: server.rest_addr(), admin: admin_key(&server), protoset: common::protoset_file(), server };

    let token_grpc = Secret::new("payment token (gRPC)", |u| format!("tok_mask_{u}"));
    let token_rest = Secret::new("payment token (REST)", |u| format!("tok_mask_{u}"));
    // A card number sent where a token belongs: refused as not a string.
    let token_number = Secret::new("payment token as a JSON number", |u| {
        let digits: String = u.chars().filter(char::is_ascii_digit).chain("1234567890".chars()).take(15).collect();
        format!("9{digits}")
    });
    let email_grpc = Secret::new("email (gRPC)", |u| format!("mask.{u}@example.com"));
    let email_rest = Secret::new("email (REST)", |u| format!("mask.{u}@example.com"));
    let email_bad = Secret::new("invalid email", |u| format!("mask.{u} at example.com"));
    let api_key = Secret::new("bogus API key", |u| format!("efk_{u}{u}"));
    let jwt = Secret::new("bogus bearer token", |u| format!("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ{u}.c2ln{u}"));

    // Stock for the sagas' reservations, so they reach the payment.
    platform.call(
        "eventfold.inventory.v1.InventoryCommandService/RegisterProduct",
        &json!({"product_id": "sku-mask", "name": "Masked"}),
    );
    platform.call(
        "eventfold.inventory.v1.InventoryCommandService/ReplenishStock",
        &json!({"product_id": "sku-mask", "quantity": 10}),
    );

    // Orders with payment tokens, over gRPC and REST.
    platform.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &order("o-mask-1", &json!(token_grpc.value)));
    let (status, body) = platform.rest("POST", "/v1/orders", &order("o-mask-2", &json!(token_rest.value)));
    assert_eq!(status, 200, "REST CreateOrder: {body}");
    let number: u64 = token_number.value.parse().expect("digits");
    let (status, body) = platform.rest("POST", "/v1/orders", &order("o-mask-3", &json!(number)));
    assert_eq!(status, 400, "a number is no token: {body}");
    assert!(!body.contains(&token_number.value), "the refusal echoes the number: {body}");

    // Users with emails, over gRPC and REST; an invalid email on both.
    let register = |user_id: &str, email: &str| json!({"user_id": user_id, "email": email, "display_name": "Mask"});
    platform.call("eventfold.users.v1.UserCommandService/RegisterUser", &register("u-mask-1", &email_grpc.value));
    let (status, body) = platform.rest("POST", "/v1/users", &register("u-mask-2", &email_rest.value));
    assert_eq!(status, 200, "REST RegisterUser: {body}");
    let (code, out) =
        platform.grpc("eventfold.users.v1.UserCommandService/RegisterUser", &register("u-mask-3", &email_bad.value));
    assert!(code == INVALID_ARGUMENT && out.contains("email"), "an invalid email is refused: {out}");
    assert!(!out.contains(&email_bad.unique), "the refusal echoes the email: {out}");
    let (status, body) = platform.rest("POST", "/v1/users", &register("u-mask-4", &email_bad.value));
    assert!(status == 400 && body.contains("email"), "an invalid email is refused: {status} {body}");
    assert!(!body.contains(&email_bad.unique), "the refusal echoes the email: {body}");

    // Bogus credentials, over gRPC and REST.
    for credentials in [format!("x-api-key: {}", api_key.value), format!("authorization: Bearer {}", jwt.value)] {
        let (code, out) = platform.grpc_as(
            std::slice::from_ref(&credentials),
            "eventfold.query.v1.OrderQueryService/GetOrder",
            &json!({"order_id": "o-mask-1"}),
        );
        assert_eq!(code, UNAUTHENTICATED, "{credentials}: {out}");
        assert!(!out.contains(&api_key.unique) && !out.contains(&jwt.unique), "the refusal echoes it: {out}");
        let (status, body) = platform.rest_as(std::slice::from_ref(&credentials), "POST", "/v1/orders", "{}");
        assert_eq!(status, 401, "{credentials}: {body}");
        assert!(!body.contains(&api_key.unique) && !body.contains(&jwt.unique), "the refusal echoes it: {body}");
    }

    // The sagas authorize with the tokens and complete; the read side
    // shows the users (the projectors handled the events).
    for order_id in ["o-mask-1", "o-mask-2"] {
        platform.wait_for(
            &format!("completed saga of {order_id}"),
            "eventfold.sagas.v1.SagaService/GetSaga",
            &json!({"saga_id": format!("fulfil-{order_id}")}),
            |answer| answer["saga"]["status"] == "SAGA_STATUS_COMPLETED",
        );
    }
    for user_id in ["u-mask-1", "u-mask-2"] {
        platform.wait_for(
            &format!("profile of {user_id}"),
            "eventfold.query.v1.UserQueryService/GetUserActivity",
            &json!({"user_id": user_id}),
            |answer| answer["user"]["user_id"] == user_id || answer["user"]["userId"] == user_id,
        );
    }
    // The last lines of the read side and the sagas are written.
    thread::sleep(Duration::from_millis(500));

    let stderr = platform.server.process.stderr.lock().unwrap().clone();
    let stdout = platform.server.process.stdout.lock().unwrap().clone();
    let logs: Vec<Value> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}")))
        .collect();

    // Nothing sensitive anywhere: not in a log line, not on stdout but for
    // the one line that shows the admin key.
    let admin = Secret { label: "admin key", value: platform.admin.clone(), unique: platform.admin.clone() };
    let secrets =
        [&token_grpc, &token_rest, &token_number, &email_grpc, &email_rest, &email_bad, &api_key, &jwt, &admin, &hs256];
    let others: Vec<&str> = stdout.lines().filter(|line| !line.starts_with(ADMIN_KEY_LINE)).collect();
    for secret in secrets {
        for line in stderr.lines().chain(others.iter().copied()) {
            assert!(!line.contains(&secret.unique), "the {} {:?} is in the output: {line}", secret.label, secret.value);
        }
    }

    // The logs could have shown them: every command with its content, the
    // sensitive parts masked, and the saga steps with their data.
    let debug = logs.iter().filter(|line| line["level"] == "DEBUG").count();
    assert!(debug >= 20, "{debug} debug lines:\n{stderr}");
    for (what, needles, at_least) in [
        ("CreateOrder", ["Create(CreateOrder", "payment_token: Some(<redacted>)"], 2),
        ("RegisterUser", ["Register(RegisterUser", "email: <redacted>"], 3),
    ] {
        let found = lines_with(&logs, "command received", "command", &needles).len();
        assert!(found >= at_least, "{found} {what} commands logged with {needles:?}:\n{stderr}");
    }
    let refused = logs.iter().filter(|l| l["message"] == "command refused");
    let invalid = refused.filter(|l| l["error"].as_str().is_some_and(|e| e.contains("email: must be")));
    assert!(invalid.count() >= 2, "the refused registrations are logged with their error:\n{stderr}");
    for order_id in ["o-mask-1", "o-mask-2"] {
        let steps = lines_with(&logs, "saga step", "data", &[order_id, "payment_token: <redacted>"]);
        assert!(steps.len() >= 4, "{} steps of the saga of {order_id} logged with masked data:\n{stderr}", steps.len());
    }
    assert!(logs.iter().any(|l| l.to_string().contains(REDACTED)));
}
