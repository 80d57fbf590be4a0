//! Every annotated RPC of every service, walked through the REST gateway of
//! `eventfold dev --database-url …` and compared with the same call over
//! gRPC (issue 16, first "Done means").
//!
//! The walk is generated from the descriptors (`rules::bindings`): one loop
//! over the bindings, with data tables keyed by field name (the ids of the
//! path variables, [`IDS`]) and by operation id (valid requests,
//! [`requests`]), and a fallback from the field types alone (`{}`,
//! `walk-unknown-…`, [`fallback_id`]) so that an RPC annotated later is
//! walked too. Every binding is walked twice, with its known request and
//! with the fallback one (which shows that the fallback works, and
//! compares the errors: INVALID_ARGUMENT with its BadRequest, NOT_FOUND,
//! FAILED_PRECONDITION); the count of walked bindings is checked against
//! the descriptors.
//!
//! Two worlds of entities are set up, one for each side (ids ending
//! `-rest` and `-grpc`): every state-changing call runs once over REST in
//! the REST world and once over gRPC in the gRPC world, with request ids of
//! their own, so both succeed or fail alike; their answers are compared
//! with the world suffix taken out and the values that must differ
//! (positions, times, hashes, generated ids) masked, keys kept. Reads (and
//! server streams, their first message) come after the sagas have settled,
//! at the head of the log (`min_position`), on the gRPC world from both
//! sides, gRPC first, and their answers must be equal as they are. An error
//! must come with the HTTP status of the gRPC code's mapping, its name, the
//! same message and the same details.

mod common;

use std::{
    collections::BTreeMap,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::DevServer;
use eventfold_gateway::{
    error::{code_name, http_status},
    rules::{Binding, Body, field_path},
};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

/// The two worlds, and the suffix of their ids.
const REST: &str = "rest";
const GRPC: &str = "grpc";

/// The id a path variable takes, by the name of its (last) field; `{side}`
/// is the world. A field not listed gets one from its type
/// ([`fallback_id`]).
const IDS: &[(&str, &str)] = &[
    ("order_id", "walk-order-{side}"),
    ("product_id", "walk-product-{side}"),
    ("account_id", "walk-account-{side}"),
    ("from_account_id", "walk-account-{side}"),
    ("customer_id", "walk-customer-{side}"),
    ("user_id", "walk-user-{side}"),
    ("payment_id", "walk-payment-{side}"),
    ("shipment_id", "walk-shipment-{side}"),
    ("stream_id", "walk-stream-{side}"),
    ("source_stream_id", "walk-stream-{side}"),
    ("saga_id", "transfer-walk-transfer-{side}"),
    ("status", "ORDER_STATUS_CREATED"),
];
/// The fallback id of a string field (`walk-unknown-{side}`).
const UNKNOWN_ID: &str = "walk-unknown";

/// Money in the requests.
const EUR_25: &str = r#"{"minor": "2500", "currency": "EUR"}"#;

/// What each world holds before the walk, made over gRPC in order: the
/// entities the ids of [`IDS`] name. `{side}` is the world.
fn setup() -> Vec<(&'static str, String)> {
    vec![
        ("InventoryCommandService_RegisterProduct", r#"{"productId": "walk-product-{side}", "name": "Walk widget"}"#.into()),
        ("InventoryCommandService_ReplenishStock", r#"{"productId": "walk-product-{side}", "quantity": 100}"#.into()),
        (
            "OrderCommandService_CreateOrder",
            r#"{"orderId": "walk-order-{side}", "customerId": "walk-customer-{side}", "currency": "EUR",
                "items": [{"productId": "walk-product-{side}", "quantity": 2, "unitPrice": {"minor": "1250", "currency": "EUR"}}]}"#
                .into(),
        ),
        (
            "AccountCommandService_OpenAccount",
            r#"{"accountId": "walk-account-{side}", "ownerId": "walk-customer-{side}", "currency": "EUR"}"#.into(),
        ),
        (
            "AccountCommandService_DepositMoney",
            r#"{"accountId": "walk-account-{side}", "transactionId": "walk-deposit-{side}", "amount": {"minor": "10000", "currency": "EUR"}}"#
                .into(),
        ),
        (
            "AccountCommandService_OpenAccount",
            r#"{"accountId": "walk-account2-{side}", "ownerId": "walk-customer-{side}", "currency": "EUR"}"#.into(),
        ),
        (
            "AccountCommandService_OpenAccount",
            r#"{"accountId": "walk-account3-{side}", "ownerId": "walk-customer-{side}", "currency": "EUR"}"#.into(),
        ),
        (
            "AccountCommandService_RequestTransfer",
            r#"{"fromAccountId": "walk-account-{side}", "toAccountId": "walk-account2-{side}",
                "transferId": "walk-transfer-{side}", "amount": {"minor": "100", "currency": "EUR"}}"#
                .into(),
        ),
        (
            "UserCommandService_RegisterUser",
            r#"{"userId": "walk-user-{side}", "email": "walk-{side}@example.com", "displayName": "Walker"}"#.into(),
        ),
        (
            "PaymentCommandService_AuthorizePayment",
            format!(
                r#"{{"paymentId": "walk-payment-{{side}}", "orderId": "walk-order-{{side}}", "amount": {EUR_25}, "providerReference": "psp-{{side}}"}}"#
            ),
        ),
        (
            "ShippingCommandService_CreateShipment",
            r#"{"shipmentId": "walk-shipment-{side}", "orderId": "walk-order-{side}", "carrier": "DHL", "trackingNumber": "T-{side}"}"#
                .into(),
        ),
        (
            "EventStoreService_Append",
            r#"{"streamId": "walk-stream-{side}", "events": [
                {"eventType": "WalkStarted", "data": {"n": 1, "word": "hello", "nested": {"ok": true}}},
                {"eventType": "WalkGoing", "data": {"n": 2}, "metadata": {"correlationId": "walk-{side}"}}]}"#
                .into(),
        ),
        ("EventStoreService_Append", r#"{"streamId": "walk-doomed-{side}", "events": [{"eventType": "Doomed", "data": {}}]}"#.into()),
    ]
}

/// A valid request for the operations the test knows, by operation id,
/// without the path variables unless the operation needs other ids than
/// [`IDS`] gives. Any other operation is called with `{}` (and fails alike
/// on both sides).
fn requests() -> BTreeMap<&'static str, String> {
    [
        // Commands.
        (
            "OrderCommandService_CreateOrder",
            r#"{"orderId": "walk-order-new-{side}", "customerId": "walk-customer-{side}", "currency": "EUR",
                "items": [{"productId": "walk-product-{side}", "quantity": 1, "unitPrice": {"minor": "990", "currency": "EUR"}}]}"#
                .to_owned(),
        ),
        ("OrderCommandService_ConfirmOrder", "{}".to_owned()),
        ("OrderCommandService_ProcessPayment", format!(r#"{{"paymentId": "walk-payment-{{side}}", "amount": {EUR_25}}}"#)),
        ("OrderCommandService_ShipOrder", r#"{"carrier": "DHL", "trackingNumber": "T-{side}"}"#.to_owned()),
        ("OrderCommandService_CancelOrder", r#"{"reason": "walked"}"#.to_owned()),
        (
            "AccountCommandService_OpenAccount",
            r#"{"accountId": "walk-account-new-{side}", "ownerId": "walk-customer-{side}", "currency": "EUR"}"#.to_owned(),
        ),
        (
            "AccountCommandService_DepositMoney",
            r#"{"transactionId": "walk-tx1-{side}", "amount": {"minor": "500", "currency": "EUR"}}"#.to_owned(),
        ),
        (
            "AccountCommandService_WithdrawMoney",
            r#"{"transactionId": "walk-tx2-{side}", "amount": {"minor": "200", "currency": "EUR"}}"#.to_owned(),
        ),
        (
            "AccountCommandService_RequestTransfer",
            // From and to accounts the walk does not touch afterwards: the
            // saga it starts runs while the walk goes on.
            r#"{"fromAccountId": "walk-account2-{side}", "toAccountId": "walk-account3-{side}",
                "transferId": "walk-transfer2-{side}", "amount": {"minor": "50", "currency": "EUR"}}"#
                .to_owned(),
        ),
        ("AccountCommandService_CloseAccount", "{}".to_owned()),
        (
            "InventoryCommandService_RegisterProduct",
            r#"{"productId": "walk-product-new-{side}", "name": "New widget"}"#.to_owned(),
        ),
        ("InventoryCommandService_ReplenishStock", r#"{"quantity": 10}"#.to_owned()),
        ("InventoryCommandService_ReserveStock", r#"{"orderId": "walk-order-{side}", "quantity": 1}"#.to_owned()),
        ("InventoryCommandService_ReleaseReservation", r#"{"orderId": "walk-order-{side}", "reason": "walked"}"#.to_owned()),
        ("InventoryCommandService_ConsumeReservation", r#"{"orderId": "walk-order-{side}"}"#.to_owned()),
        (
            "PaymentCommandService_AuthorizePayment",
            r#"{"paymentId": "walk-payment-new-{side}", "orderId": "walk-order-new-{side}",
                "amount": {"minor": "990", "currency": "EUR"}, "providerReference": "psp-new-{side}"}"#
                .to_owned(),
        ),
        (
            "PaymentCommandService_DeclinePayment",
            format!(r#"{{"orderId": "walk-order-{{side}}", "amount": {EUR_25}, "reason": "walked"}}"#),
        ),
        ("PaymentCommandService_CapturePayment", format!(r#"{{"amount": {EUR_25}}}"#)),
        (
            "PaymentCommandService_RefundPayment",
            r#"{"amount": {"minor": "500", "currency": "EUR"}, "reason": "walked"}"#.to_owned(),
        ),
        ("PaymentCommandService_VoidPayment", r#"{"reason": "walked"}"#.to_owned()),
        (
            "ShippingCommandService_CreateShipment",
            r#"{"shipmentId": "walk-shipment-new-{side}", "orderId": "walk-order-new-{side}", "carrier": "DHL", "trackingNumber": "T-new-{side}"}"#
                .to_owned(),
        ),
        ("ShippingCommandService_CancelShipment", r#"{"reason": "walked"}"#.to_owned()),
        (
            "UserCommandService_RegisterUser",
            r#"{"userId": "walk-user-new-{side}", "email": "new-{side}@example.com", "displayName": "New walker"}"#
                .to_owned(),
        ),
        ("UserCommandService_RecordLogin", r#"{"source": "web"}"#.to_owned()),
        ("UserCommandService_RecordUserAction", r#"{"action": "view", "subject": "walk-product-{side}"}"#.to_owned()),
        (
            "EventStoreService_Append",
            r#"{"expectedVersion": "1", "events": [{"eventType": "WalkEnded", "data": {"n": 3, "list": [1, "two", null]}}]}"#
                .to_owned(),
        ),
        ("EventStoreService_BranchStream", r#"{"atVersion": "1", "branchStreamId": "walk-branch-{side}"}"#.to_owned()),
        ("EventStoreService_SaveSnapshot", r#"{"version": "1", "schemaVersion": 1, "state": {"count": 2}}"#.to_owned()),
        ("EventStoreService_DeleteStream", r#"{"streamId": "walk-doomed-{side}"}"#.to_owned()),
        // Reads (query parameters).
        ("EventStoreService_ReadStream", r#"{"maxCount": 10, "direction": "READ_DIRECTION_FORWARDS"}"#.to_owned()),
        ("EventStoreService_ReadStreamAt", r#"{"version": "1"}"#.to_owned()),
        ("EventStoreService_ReadAll", r#"{"maxCount": 5, "filter": {"streamPrefixes": ["walk-"]}}"#.to_owned()),
        ("EventStoreService_Subscribe", r#"{"filter": {"streamPrefixes": ["walk-stream-"]}}"#.to_owned()),
        ("EventStoreService_ListStreams", r#"{"pageSize": 5, "prefix": "walk-"}"#.to_owned()),
        ("EventStoreService_LoadSnapshot", r#"{"schemaVersion": 1}"#.to_owned()),
        ("OrderQueryService_ListOrders", r#"{"pageSize": 5}"#.to_owned()),
        ("OrderQueryService_GetCustomerOrders", r#"{"pageSize": 5}"#.to_owned()),
        ("OrderQueryService_ListOrdersByStatus", r#"{"pageSize": 5}"#.to_owned()),
        (
            "OrderQueryService_GetSalesAnalytics",
            r#"{"startDay": "{today}", "endDay": "{today}", "topProducts": 3}"#.to_owned(),
        ),
        ("OrderQueryService_GetOrderAt", r#"{"version": "1"}"#.to_owned()),
        ("InventoryQueryService_ListLowStock", r#"{"pageSize": 5}"#.to_owned()),
        ("AccountQueryService_ListAccountTransactions", r#"{"pageSize": 5}"#.to_owned()),
        ("UserQueryService_GetUserActivity", r#"{"pageSize": 5}"#.to_owned()),
        ("SagaService_ListSagas", r#"{"pageSize": 10}"#.to_owned()),
    ]
    .into_iter()
    .collect()
}

/// `{side}` replaced by `side` and `{today}` by today's date (UTC) in
/// every string of `template`.
fn fill(template: &str, side: &str) -> Value {
    let value: Value =
        serde_json::from_str(template).unwrap_or_else(|e| panic!("bad request template {template}: {e}"));
    let today = chrono::Utc::now().date_naive().to_string();
    map_strings(value, &|s| s.replace("{side}", side).replace("{today}", &today))
}

fn map_strings(value: Value, f: &dyn Fn(&str) -> String) -> Value {
    match value {
        Value::String(s) => Value::String(f(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| map_strings(v, f)).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, map_strings(v, f))).collect()),
        other => other,
    }
}

/// The JSON keys (proto name, JSON name) of each field along `path`
/// (`order.id`) in `input`.
fn keys(input: &MessageDescriptor, path: &str) -> Vec<(String, String)> {
    let mut message = Some(input.clone());
    path.split('.')
        .map(|part| {
            let field =
                message.as_ref().and_then(|m| m.get_field_by_name(part).or_else(|| m.get_field_by_json_name(part)));
            message = field.as_ref().and_then(|f| f.kind().as_message().cloned());
            field
                .map_or_else(|| (part.to_owned(), part.to_owned()), |f| (f.name().to_owned(), f.json_name().to_owned()))
        })
        .collect()
}

/// Takes the value at `path` (either name at each level) out of `json`.
fn take(json: &mut Value, path: &[(String, String)]) -> Option<Value> {
    let ((proto, camel), parents) = path.split_last()?;
    let mut object = json.as_object_mut()?;
    for (p, c) in parents {
        let key = if object.contains_key(c) { c } else { p };
        object = object.get_mut(key)?.as_object_mut()?;
    }
    object.remove(camel).or_else(|| object.remove(proto))
}

/// Sets the value at `path` (JSON names), making the objects on the way.
fn put(json: &mut Value, path: &[(String, String)], value: Value) {
    let mut current = json;
    for (_, camel) in path {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        current = current.as_object_mut().expect("an object").entry(camel.clone()).or_insert(Value::Null);
    }
    *current = value;
}

/// A path or query value as text.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `json` as query parameters: nested fields dotted, repeated ones
/// repeated.
fn query(prefix: &str, json: &Value, out: &mut Vec<String>) {
    match json {
        Value::Object(map) => {
            for (key, value) in map {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                query(&name, value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| query(prefix, item, out)),
        Value::Null => {}
        scalar => out.push(format!("{}={}", encode(prefix), encode(&text(scalar)))),
    }
}

/// Which requests a pass sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The request of [`requests`] (or `{}`), path variables from [`IDS`].
    Known,
    /// `{}`, and path variables no entity has, from the field's type alone:
    /// what an RPC the tables do not know gets, tried on every RPC so that
    /// the fallback is known to work before a new RPC needs it.
    Fallback,
}

/// A path variable's value from the field's type alone.
fn fallback_id(field: Option<&FieldDescriptor>, side: &str) -> Value {
    match field.map(FieldDescriptor::kind) {
        Some(Kind::Enum(values)) => {
            let value = values.values().find(|v| v.number() != 0).unwrap_or_else(|| values.default_value());
            json!(value.name())
        }
        Some(Kind::Bool) => json!(true),
        Some(Kind::String) | Some(Kind::Bytes) | Some(Kind::Message(_)) | None => json!(format!("{UNKNOWN_ID}-{side}")),
        Some(_) => json!(1),
    }
}

/// One call, as each side makes it.
struct Call {
    /// `Service/Method`, for grpcurl.
    rpc: String,
    /// The request message as JSON, for grpcurl.
    grpc: Value,
    http_method: String,
    /// Path and query.
    url: String,
    body: Option<Value>,
}

/// The request of `binding` in world `side`: the template of its operation
/// (or `{}`), the ids of its path variables, a request id of its own (`n`)
/// for a command and, for a read, `min_position` at `head`.
fn build(binding: &Binding, pass: Pass, side: &str, n: usize, head: Option<u64>) -> Call {
    let input = binding.rpc.input();
    let templates = requests();
    let template = match pass {
        Pass::Known => templates.get(binding.operation_id().as_str()).map_or("{}", String::as_str),
        Pass::Fallback => "{}",
    };
    let mut json = fill(template, side);
    let variables: Vec<String> = binding.template.variables().into_iter().map(str::to_owned).collect();
    for variable in &variables {
        let path = keys(&input, variable);
        if take(&mut json.clone(), &path).is_none() {
            let last = variable.rsplit('.').next().unwrap_or(variable);
            let known = IDS.iter().find(|(field, _)| *field == last && pass == Pass::Known);
            let value = match known {
                Some((_, id)) => json!(id.replace("{side}", side)),
                None => fallback_id(field_path(&input, variable).as_ref(), side),
            };
            put(&mut json, &path, value);
        }
    }
    let mut set_absent = |field: &str, value: Value| {
        if input.get_field_by_name(field).is_some() {
            let path = keys(&input, field);
            if take(&mut json.clone(), &path).is_none() {
                put(&mut json, &path, value);
            }
        }
    };
    match head {
        None => set_absent("request_id", json!(format!("walk-{n}-{side}"))),
        Some(head) => set_absent("min_position", json!(head.to_string())),
    }

    // REST: the path variables out of the JSON, into the path.
    let mut rest = json.clone();
    let mut url = binding.template.openapi_path();
    for variable in &variables {
        let value = take(&mut rest, &keys(&input, variable)).map(|v| text(&v)).unwrap_or_default();
        url = url.replace(&format!("{{{variable}}}"), &encode(&value));
    }
    // A wildcard outside a variable binds nothing: any segment does.
    url = url.split('/').map(|s| if s == "*" || s == "**" { "walk" } else { s }).collect::<Vec<_>>().join("/");
    let (body, rest_query) = match &binding.body {
        Body::All => (Some(rest), Value::Null),
        Body::Field(field) => {
            let value = take(&mut rest, &keys(&input, field.name()));
            (value, rest)
        }
        Body::None => (None, rest),
    };
    let mut pairs = Vec::new();
    query("", &rest_query, &mut pairs);
    if !pairs.is_empty() {
        url = format!("{url}?{}", pairs.join("&"));
    }
    Call {
        rpc: format!("{}/{}", binding.rpc.parent_service().full_name(), binding.rpc.name()),
        grpc: json,
        http_method: binding.method.as_str().to_owned(),
        url,
        body,
    }
}

/// What a call answered: a message (for a stream, its first one, or null
/// when none came before the cut), or a failure.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Answer(Value),
    Failed { code: tonic::Code, message: String, details: Value },
}

impl Outcome {
    fn map(self, f: &dyn Fn(Value) -> Value) -> Outcome {
        match self {
            Outcome::Answer(v) => Outcome::Answer(f(v)),
            Outcome::Failed { code, message, details } => {
                Outcome::Failed { code, message: text(&f(Value::String(message))), details: f(details) }
            }
        }
    }
}

/// How long a stream is read before the call is cut, in seconds.
const STREAM_SECONDS: &str = "2";

/// The two ends of the server, and the descriptors grpcurl reads.
struct Ends<'a> {
    server: &'a DevServer,
    /// `http://ADDR` of the gateway.
    base: String,
    /// The services' descriptor set with the `google.rpc` error details:
    /// what the server's reflection answers, without a reflection round
    /// trip per call (ten times faster).
    protoset: String,
}

impl Ends<'_> {
    /// grpcurl's call: JSON messages on stdout; with `-format-error` the
    /// status as JSON on stderr when the call failed.
    fn grpcurl(&self, call: &Call, streaming: bool) -> Command {
        let request = call.grpc.to_string();
        let mut args = vec!["-protoset", &self.protoset, "-format-error", "-d", &request];
        if streaming {
            args.extend(["-max-time", STREAM_SECONDS]);
        }
        args.extend([self.server.addr.as_str(), call.rpc.as_str()]);
        let mut command = self.server.grpcurl(&args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// curl's call, the answer's headers included (`-i`).
    fn curl(&self, call: &Call, streaming: bool) -> Command {
        let mut command = Command::new("curl");
        command.args(["-sS", "-i", "-X", &call.http_method, &format!("{}{}", self.base, call.url)]);
        if streaming {
            command.args(["-N", "--max-time", STREAM_SECONDS]);
        }
        if let Some(body) = &call.body {
            command.args(["-H", "content-type: application/json", "--data-binary", &body.to_string()]);
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// A gRPC call outside the walk (set-up, waits); panics unless grpcurl
    /// ran.
    fn grpc_call(&self, rpc: &str, request: &Value) -> Outcome {
        let call = Call {
            rpc: rpc.to_owned(),
            grpc: request.clone(),
            http_method: String::new(),
            url: String::new(),
            body: None,
        };
        grpc_outcome(&call, &Running::run(self.grpcurl(&call, false)).output()).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A process under way, or its output.
enum Running {
    Child(Child),
    Done(Output),
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        Running::Child(command.spawn().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}")))
    }

    fn run(mut command: Command) -> Running {
        Running::Done(command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}")))
    }

    fn output(self) -> Output {
        match self {
            Running::Child(child) => child.wait_with_output().expect("wait for a call"),
            Running::Done(output) => output,
        }
    }
}

fn code_of(number: i64) -> tonic::Code {
    tonic::Code::from_i32(i32::try_from(number).unwrap_or(2))
}

fn grpc_outcome(call: &Call, output: &Output) -> Result<Outcome, String> {
    let parse = |bytes: &[u8]| -> Vec<Value> {
        serde_json::Deserializer::from_slice(bytes).into_iter::<Value>().map_while(Result::ok).collect()
    };
    let messages = parse(&output.stdout);
    if !output.status.success() {
        let Some(status) = parse(&output.stderr).pop().filter(|v| v.get("code").is_some_and(Value::is_i64)) else {
            return Err(format!(
                "grpcurl {} {} failed without a status: {}\n{}",
                call.rpc,
                call.grpc,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        };
        let code = code_of(status["code"].as_i64().unwrap_or(2));
        // A stream cut by -max-time is no failure of the call.
        if code != tonic::Code::DeadlineExceeded {
            return Ok(Outcome::Failed {
                code,
                message: status["message"].as_str().unwrap_or_default().to_owned(),
                details: status.get("details").cloned().unwrap_or_else(|| json!([])),
            });
        }
    }
    Ok(Outcome::Answer(messages.into_iter().next().unwrap_or(Value::Null)))
}

/// The gateway's answer; `Err` for an answer that breaks the error
/// contract (an HTTP status that is not the mapping of the code, a status
/// name that is no code's).
fn rest_outcome(call: &Call, output: &Output) -> Result<Outcome, String> {
    let what = format!("{} {}", call.http_method, call.url);
    // 28: the time limit cut a stream, as intended.
    if !output.status.success() && output.status.code() != Some(28) {
        return Err(format!("curl {what} failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    let out = String::from_utf8_lossy(&output.stdout);
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| format!("{what}: no HTTP answer: {out:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what}: no HTTP status: {head:?}"))?;
    let first = match serde_json::Deserializer::from_str(body).into_iter::<Value>().next() {
        None => Value::Null,
        Some(Ok(value)) => value,
        Some(Err(e)) => return Err(format!("{what}: the answer is not JSON ({e}): {body:?}")),
    };
    // An error answer, or an error frame that ends a stream after its 200.
    let error = first.get("error").filter(|_| status != 200 || first.as_object().is_some_and(|o| o.len() == 1));
    let Some(error) = error else {
        return if status == 200 {
            Ok(Outcome::Answer(first))
        } else {
            Err(format!("{what}: HTTP {status} without an error: {body}"))
        };
    };
    let name = error["status"].as_str().unwrap_or_default();
    let code = (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == name)
        .ok_or_else(|| format!("{what}: error.status {name:?} is no gRPC code's name: {first}"))?;
    let mapped = http_status(code).as_u16();
    if (status != 200 && status != mapped) || error["code"].as_u64() != Some(u64::from(mapped)) {
        return Err(format!(
            "{what}: HTTP {status}, error.code {} for {name} (mapped: {mapped}): {first}",
            error["code"]
        ));
    }
    Ok(Outcome::Failed {
        code,
        message: error["message"].as_str().unwrap_or_default().to_owned(),
        details: error.get("details").cloned().unwrap_or_else(|| json!([])),
    })
}

/// Keys whose values differ between the worlds or between two calls.
fn volatile(key: &str) -> bool {
    key.contains("osition")
        || key.ends_with("Time")
        || key == "time"
        || key.ends_with("At")
        || key.to_ascii_lowercase().contains("hash")
        || key == "eventId"
}

/// A command's answer with the world suffix taken out of every string and
/// the volatile values masked (their keys stay: the key sets must match).
fn normalized(value: Value) -> Value {
    fn mask(value: Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| if volatile(&k) { (k, json!("<varies>")) } else { (k, mask(v)) })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.into_iter().map(mask).collect()),
            other => other,
        }
    }
    mask(map_strings(value, &|s| s.replace(&format!("-{REST}"), "-SIDE").replace(&format!("-{GRPC}"), "-SIDE")))
}

/// Waits until no saga is running or compensating (the walk's commands
/// start some), for at most 30 s.
fn sagas_settled(ends: &Ends<'_>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = ends.grpc_call("eventfold.sagas.v1.SagaService/ListSagas", &json!({"pageSize": 100}));
        let busy: Vec<Value> = match &listed {
            Outcome::Answer(answer) => answer["sagas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| matches!(s["status"].as_str(), Some("SAGA_STATUS_RUNNING" | "SAGA_STATUS_COMPENSATING")))
                .cloned()
                .collect(),
            Outcome::Failed { .. } => vec![json!(format!("{listed:?}"))],
        };
        if busy.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "sagas still busy after 30 s: {busy:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The position of the last event in the log.
fn head_position(ends: &Ends<'_>) -> u64 {
    let (mut from, mut head) = (0u64, 0u64);
    loop {
        let read = ends.grpc_call(
            "eventfold.eventstore.v1.EventStoreService/ReadAll",
            &json!({"fromPosition": from.to_string(), "maxCount": 500}),
        );
        let Outcome::Answer(read) = read else { panic!("ReadAll failed: {read:?}") };
        for event in read["events"].as_array().into_iter().flatten() {
            head = head.max(event["globalPosition"].as_str().and_then(|p| p.parse().ok()).unwrap_or(0));
        }
        let next = read["nextPosition"].as_str().and_then(|p| p.parse().ok()).unwrap_or(from);
        if read["endOfLog"].as_bool() == Some(true) || next <= from {
            return head;
        }
        from = next;
    }
}

/// One binding walked: the calls and what each side answered.
struct Walked<'a> {
    binding: &'a Binding,
    pass: Pass,
    read: bool,
    rest: Call,
    over_rest: Running,
    grpc: Call,
    over_grpc: Running,
}

#[test]
fn every_annotated_rpc_answers_over_rest_what_it_answers_over_grpc() {
    let started = Instant::now();
    let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
    let bindings = eventfold_gateway::rules::bindings(&pool).expect("the rules parse");
    assert!(!bindings.is_empty(), "no annotated RPC");
    for operation in requests().keys().chain(setup().iter().map(|(operation, _)| operation)) {
        assert!(bindings.iter().any(|b| b.operation_id() == *operation), "{operation} is no annotated RPC");
    }
    let protoset_file = common::protoset_file();

    let (_db, server) = DevServer::with_read_side();
    let ends = Ends {
        server: &server,
        base: format!("http://{}", server.rest_addr()),
        protoset: protoset_file.path().to_string_lossy().into_owned(),
    };

    for side in [REST, GRPC] {
        for (operation, template) in setup() {
            let binding = bindings.iter().find(|b| b.operation_id() == operation).expect("a setup operation");
            let rpc = format!("{}/{}", binding.rpc.parent_service().full_name(), binding.rpc.name());
            let answer = ends.grpc_call(&rpc, &fill(&template, side));
            assert!(matches!(answer, Outcome::Answer(_)), "setup {operation} ({side}): {answer:?}");
        }
    }
    sagas_settled(&ends);

    // The commands first, each world its own entities, the known requests
    // then the fallback ones; then the reads, on the gRPC world from both
    // sides, once the sagas the commands started have settled, at the head
    // of the log. A read is made over gRPC first, then over REST; the
    // streams run beside the other reads and are compared at the end.
    let is_read = |b: &Binding| b.method.as_str() == "GET";
    let commands = bindings.iter().filter(|b| !is_read(b));
    let reads = bindings.iter().filter(|b| is_read(b));
    let steps = [Pass::Known, Pass::Fallback]
        .into_iter()
        .flat_map(|pass| commands.clone().map(move |b| (b, pass)))
        .chain([Pass::Known, Pass::Fallback].into_iter().flat_map(|pass| reads.clone().map(move |b| (b, pass))));
    let mut walked: Vec<Walked<'_>> = Vec::new();
    let mut head = None;
    for (n, (binding, pass)) in steps.enumerate() {
        let read = is_read(binding);
        if read && head.is_none() {
            sagas_settled(&ends);
            head = Some(head_position(&ends));
        }
        let at = if read { head } else { None };
        let rest = build(binding, pass, if read { GRPC } else { REST }, n, at);
        let grpc = build(binding, pass, GRPC, n, at);
        let (over_grpc, over_rest) = if binding.server_streaming() {
            (Running::spawn(ends.grpcurl(&grpc, true)), Running::spawn(ends.curl(&rest, true)))
        } else {
            let over_grpc = Running::run(ends.grpcurl(&grpc, false));
            (over_grpc, Running::run(ends.curl(&rest, false)))
        };
        walked.push(Walked { binding, pass, read, rest, over_rest, grpc, over_grpc });
    }

    let mut mismatches: Vec<String> = Vec::new();
    let (mut answered, mut failed) = (0usize, 0usize);
    for pass in [Pass::Known, Pass::Fallback] {
        let count = walked.iter().filter(|w| w.pass == pass).count();
        assert_eq!(count, bindings.len(), "every binding is walked ({pass:?})");
    }
    for Walked { binding, pass, read, rest, over_rest, grpc, over_grpc } in walked {
        let operation = binding.operation_id();
        let outcomes = rest_outcome(&rest, &over_rest.output())
            .and_then(|r| grpc_outcome(&grpc, &over_grpc.output()).map(|g| (r, g)));
        let (over_rest, over_grpc) = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                mismatches.push(format!("{operation} ({pass:?}): {e}"));
                continue;
            }
        };
        // A command's answers differ by world and by the values that vary;
        // a read's must be equal as they are.
        let (over_rest, over_grpc) =
            if read { (over_rest, over_grpc) } else { (over_rest.map(&normalized), over_grpc.map(&normalized)) };
        let what = match &over_grpc {
            Outcome::Answer(_) => "answered",
            Outcome::Failed { code, .. } => code_name(*code),
        };
        println!("  {operation} ({pass:?}) {} {}: {what}", rest.http_method, rest.url);
        if over_rest != over_grpc {
            mismatches.push(format!(
                "{operation} ({pass:?}, {} {}): REST {over_rest:?} != gRPC {over_grpc:?}",
                rest.http_method, rest.url
            ));
        } else if matches!(over_grpc, Outcome::Answer(_)) {
            answered += 1;
        } else {
            failed += 1;
        }
    }
    println!(
        "rest_walk: {} bindings walked twice (known and fallback requests): {answered} calls answered alike, \
         {failed} failed alike, {} differ, {:.1} s",
        bindings.len(),
        mismatches.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(mismatches.is_empty(), "REST and gRPC differ:\n{}", mismatches.join("\n"));
}
