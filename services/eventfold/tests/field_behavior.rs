//! The `(google.api.field_behavior) = REQUIRED` annotations (AIP-203) are
//! exactly the fields the services refuse when empty (issue 16, "Field
//! behavior in proto").
//!
//! Generated from the descriptors, so that a new RPC cannot be left out:
//! every method of every eventfold service is probed over gRPC on
//! `eventfold dev --database-url …`. The probe starts from the request with
//! every field at its default and repeats until the validation lets the
//! request through (any answer but INVALID_ARGUMENT, or a stream that
//! runs): each round, every field the BadRequest names that is still empty
//! (`""`, 0, absent message, empty list) is recorded as "refused when
//! empty" and filled, a message with an empty one (`{}`), a list with one
//! empty element, so that the next round shows what the service asks of
//! their fields (`items[0].unit_price.currency`). Filling only what was
//! named copes with the bound of 10 violations per answer
//! (`eventfold_platform::status::MAX_VIOLATIONS`) and with the checks that
//! return at their first violation: what an answer left out comes in the
//! next round.
//!
//! The recorded paths must equal the REQUIRED ones (a REQUIRED message
//! field's REQUIRED fields included, a list's as `field[0].x`), apart from
//! the fields refused only under a condition, listed with the reason in
//! [`CONDITIONAL`]. A violation must name a field of the request, and a
//! value the probe filled in must not be refused.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Output, Stdio},
};

use common::DevServer;
use prost_reflect::{
    DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    Value as ProtoValue,
};
use serde_json::{Map, Value, json};

/// `google.api.FieldBehavior.REQUIRED`.
const REQUIRED: i32 = 2;
/// How long a server stream runs before the probe cuts it, in seconds: a
/// stream that started passed the validation.
const STREAM_SECONDS: &str = "2";
/// Rounds of one probe before it gives up: the deepest request takes 6.
const MAX_ROUNDS: usize = 20;
/// Nesting followed into REQUIRED message fields.
const MAX_DEPTH: usize = 8;

/// Why a positive amount is no REQUIRED field: `Money.minor` is shared, and
/// 0 is a valid amount elsewhere (a free item's `unit_price`, a balance).
const POSITIVE: &str = "these RPCs move money and refuse an amount of 0 (`must be positive`); \
                        `Money.minor` is shared, and 0 is a valid amount elsewhere (a free item, an empty balance)";

/// Fields refused when empty that are not REQUIRED, by RPC: the refusal
/// depends on other fields or on the RPC, not on the field alone. Each
/// entry must be seen refused by its probe (a stale entry fails).
const CONDITIONAL: &[(&str, &str, &str)] = &[
    ("eventfold.orders.v1.OrderCommandService/ProcessPayment", "amount.minor", POSITIVE),
    ("eventfold.payments.v1.PaymentCommandService/AuthorizePayment", "amount.minor", POSITIVE),
    ("eventfold.payments.v1.PaymentCommandService/DeclinePayment", "amount.minor", POSITIVE),
    ("eventfold.payments.v1.PaymentCommandService/CapturePayment", "amount.minor", POSITIVE),
    ("eventfold.payments.v1.PaymentCommandService/RefundPayment", "amount.minor", POSITIVE),
    ("eventfold.accounts.v1.AccountCommandService/DepositMoney", "amount.minor", POSITIVE),
    ("eventfold.accounts.v1.AccountCommandService/WithdrawMoney", "amount.minor", POSITIVE),
    ("eventfold.accounts.v1.AccountCommandService/RequestTransfer", "amount.minor", POSITIVE),
    (
        "eventfold.query.v1.OrderQueryService/GetOrderAt",
        "time",
        "one of `time` or `version` is required (`version` is `optional`: 0 is a version); the violation names `time`",
    ),
];

/// A string field's value in a probe, by field name, where an id-like
/// `fb-NAME` would be refused for its format.
const STRINGS: &[(&str, &str)] = &[
    ("currency", "EUR"),
    ("email", "fb@example.com"),
    ("start_day", "2024-01-01"),
    ("end_day", "2024-01-01"),
    // A well-formed projection name (no projection has it: NOT_FOUND).
    ("name", "fb_name"),
    // A topic's adapter and a callback's URL (nothing listens there).
    ("adapter", "memory"),
    ("url", "http://127.0.0.1:9/fb"),
];

/// The `google.api.field_behavior` extension.
struct Behaviors(ExtensionDescriptor);

impl Behaviors {
    /// Whether `field` is annotated REQUIRED.
    fn required(&self, field: &FieldDescriptor) -> bool {
        let extension = &self.0;
        let options = field.options();
        if !options.has_extension(extension) {
            return false;
        }
        match options.get_extension(extension).as_ref() {
            ProtoValue::List(values) => values.iter().any(|v| v.as_enum_number() == Some(REQUIRED)),
            ProtoValue::EnumNumber(n) => *n == REQUIRED,
            _ => false,
        }
    }
}

/// A message type the probe does not descend into.
fn well_known(message: &MessageDescriptor) -> bool {
    message.package_name() == "google.protobuf"
}

/// The REQUIRED field paths of `message`, through REQUIRED message fields
/// (`items[0].product_id` for a list).
fn required_paths(
    behaviors: &Behaviors,
    message: &MessageDescriptor,
    prefix: &str,
    depth: usize,
    out: &mut BTreeSet<String>,
) {
    for field in message.fields() {
        if !behaviors.required(&field) {
            continue;
        }
        let path = format!("{prefix}{}", field.name());
        out.insert(path.clone());
        if let Kind::Message(inner) = field.kind()
            && !well_known(&inner)
            && !field.is_map()
            && depth < MAX_DEPTH
        {
            let prefix = if field.is_list() { format!("{path}[0].") } else { format!("{path}.") };
            required_paths(behaviors, &inner, &prefix, depth + 1, out);
        }
    }
}

/// REQUIRED fields the probe never reaches: inside a message field that is
/// not REQUIRED itself (the probe fills only what the service asks for).
fn unreached(behaviors: &Behaviors, message: &MessageDescriptor, prefix: &str, depth: usize, out: &mut Vec<String>) {
    for field in message.fields() {
        let Kind::Message(inner) = field.kind() else { continue };
        if well_known(&inner) || field.is_map() || depth >= MAX_DEPTH {
            continue;
        }
        let path = format!("{prefix}{}", field.name());
        if behaviors.required(&field) {
            let prefix = if field.is_list() { format!("{path}[0].") } else { format!("{path}.") };
            unreached(behaviors, &inner, &prefix, depth + 1, out);
        } else {
            out.extend(inner.fields().filter(|f| behaviors.required(f)).map(|f| format!("{path}.{}", f.name())));
        }
    }
}

/// One step of a violation's field path: the field, and the element of a
/// list.
struct Step {
    field: FieldDescriptor,
    index: Option<usize>,
}

/// The fields along a violation's `path` (`items[0].unit_price`), proto
/// names; `None` when it names no field of `input`.
fn resolve(input: &MessageDescriptor, path: &str) -> Option<Vec<Step>> {
    let mut message = Some(input.clone());
    let mut steps = Vec::new();
    for segment in path.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, Some(rest.strip_suffix(']')?.parse::<usize>().ok()?)),
            None => (segment, None),
        };
        let field = message.as_ref()?.get_field_by_name(name)?;
        if index.is_some() && !field.is_list() {
            return None;
        }
        message = field.kind().as_message().cloned();
        steps.push(Step { field, index });
    }
    Some(steps)
}

/// The value at `steps` in the JSON request (JSON names), if any.
fn get<'a>(json: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let mut current = json;
    for step in steps {
        current = current.get(step.field.json_name())?;
        if let Some(index) = step.index {
            current = current.get(index)?;
        }
    }
    Some(current)
}

/// Sets the value at `steps`, making the objects and list elements on the
/// way.
fn put(json: &mut Value, steps: &[Step], value: Value) {
    let mut current = json;
    for step in steps {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        let Value::Object(object) = current else { unreachable!("made an object above") };
        current = object.entry(step.field.json_name().to_owned()).or_insert(Value::Null);
        if let Some(index) = step.index {
            if !current.is_array() {
                *current = Value::Array(Vec::new());
            }
            let Value::Array(items) = current else { unreachable!("made a list above") };
            while items.len() <= index {
                items.push(json!({}));
            }
            current = &mut items[index];
        }
    }
    *current = value;
}

/// Whether a request value is a field's default: absent, `""`, 0, false
/// or an empty list. A present message (`{}`) is not.
fn empty(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::Bool(b)) => !b,
        Some(Value::Array(items)) => items.is_empty(),
        Some(Value::Object(_)) => false,
    }
}

/// What the probe puts into an empty field the service refused: a valid
/// looking scalar, an empty message, a list of one such element.
fn filler(field: &FieldDescriptor) -> Value {
    let one = match field.kind() {
        Kind::Message(message) => match message.full_name() {
            "google.protobuf.Timestamp" => json!("2024-01-01T00:00:00Z"),
            _ => json!({}),
        },
        Kind::String => {
            let known = STRINGS.iter().find(|(name, _)| *name == field.name());
            json!(known.map_or_else(|| format!("fb-{}", field.name()), |(_, value)| (*value).to_owned()))
        }
        Kind::Bytes => json!("ZmI="),
        Kind::Bool => json!(true),
        Kind::Enum(values) => {
            json!(values.values().find(|v| v.number() != 0).map_or_else(String::new, |v| v.name().to_owned()))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => json!("1"),
        _ => json!(1),
    };
    if field.is_list() { json!([one]) } else { one }
}

/// How a call ended.
enum Answer {
    /// Through the validation: an answer, another error than
    /// INVALID_ARGUMENT, or a stream that ran until cut.
    Passed(String),
    /// INVALID_ARGUMENT with its field violations `(field, description)`.
    Refused(Vec<(String, String)>),
}

/// Calls `method` with `request` through grpcurl.
fn call(server: &DevServer, protoset: &str, method: &MethodDescriptor, request: &Value) -> Answer {
    let rpc = format!("{}/{}", method.parent_service().full_name(), method.name());
    let body = request.to_string();
    let mut args = vec!["-protoset", protoset, "-format-error", "-d", &body];
    if method.is_server_streaming() {
        args.extend(["-max-time", STREAM_SECONDS]);
    }
    args.extend([server.addr.as_str(), rpc.as_str()]);
    let mut command = server.grpcurl(&args);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let Output { status, stdout, stderr } = command.output().unwrap_or_else(|e| panic!("cannot run grpcurl: {e}"));
    if status.success() {
        return Answer::Passed("answered".to_owned());
    }
    let error: Option<Value> =
        serde_json::Deserializer::from_slice(&stderr).into_iter::<Value>().map_while(Result::ok).last();
    let Some(error) = error.filter(|e| e["code"].is_i64()) else {
        panic!(
            "grpcurl {rpc} {body} failed without a status:\n{}\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    let code = tonic::Code::from_i32(i32::try_from(error["code"].as_i64().unwrap_or(2)).unwrap_or(2));
    if code != tonic::Code::InvalidArgument {
        let message = error["message"].as_str().unwrap_or_default();
        return Answer::Passed(format!("{code:?}: {message}"));
    }
    let violations: Vec<(String, String)> = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("google.rpc.BadRequest")))
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|v| {
            (
                v["field"].as_str().unwrap_or_default().to_owned(),
                v["description"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(!violations.is_empty(), "{rpc} {body}: INVALID_ARGUMENT without field violations: {error}");
    Answer::Refused(violations)
}

/// What the probe of one RPC found.
struct Probe {
    /// The field paths refused while empty.
    refused: BTreeSet<String>,
    /// How the last round ended.
    end: String,
    /// Violations that name no field of the request, or a field the probe
    /// had filled.
    problems: Vec<String>,
}

/// Probes `method`: see the file comment.
fn probe(server: &DevServer, protoset: &str, method: &MethodDescriptor) -> Probe {
    let input = method.input();
    let mut request = json!({});
    let mut refused = BTreeSet::new();
    let mut problems = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let mut filled = false;
        let violations = match call(server, protoset, method, &request) {
            Answer::Passed(end) => return Probe { refused, end, problems },
            Answer::Refused(violations) => violations,
        };
        // A field may be named twice in one answer (the edge and the domain
        // both check an id).
        let mut named = BTreeSet::new();
        for (field, description) in violations {
            if !named.insert(field.clone()) {
                continue;
            }
            let Some(steps) = resolve(&input, &field) else {
                problems.push(format!("a violation names no field of {}: {field:?} ({description})", input.name()));
                continue;
            };
            if !empty(get(&request, &steps)) {
                problems.push(format!("the probe's value of {field} was refused: {description} (request {request})"));
                continue;
            }
            let last = steps.last().expect("a path has a field");
            let value = if last.index.is_some() { filler(&last.field)[0].clone() } else { filler(&last.field) };
            put(&mut request, &steps, value);
            refused.insert(field);
            filled = true;
        }
        if !filled {
            return Probe { refused, end: format!("stuck at {request}"), problems };
        }
    }
    problems.push(format!("still refused after {MAX_ROUNDS} rounds: {request}"));
    Probe { refused, end: "gave up".to_owned(), problems }
}

#[test]
fn the_required_fields_are_exactly_the_ones_refused_when_empty() {
    let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
    let extension = pool.get_extension_by_name("google.api.field_behavior");
    let behaviors = Behaviors(extension.expect("the descriptor set has the google.api.field_behavior extension"));
    let methods: Vec<MethodDescriptor> = pool
        .services()
        .filter(|s| s.package_name().starts_with("eventfold."))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .collect();
    assert!(!methods.is_empty(), "no eventfold RPC in the descriptor set");
    for (rpc, _, _) in CONDITIONAL {
        assert!(
            methods.iter().any(|m| format!("{}/{}", m.parent_service().full_name(), m.name()) == *rpc),
            "CONDITIONAL names no RPC: {rpc}"
        );
    }

    let protoset_file = common::protoset_file();
    let protoset = protoset_file.path().to_string_lossy().into_owned();
    let (_db, server) = DevServer::with_read_side();

    let mut mismatches = Vec::new();
    let mut conditional_seen = BTreeSet::new();
    let mut required_count = 0usize;
    for method in &methods {
        let rpc = format!("{}/{}", method.parent_service().full_name(), method.name());
        let input = method.input();
        let mut required = BTreeSet::new();
        required_paths(&behaviors, &input, "", 0, &mut required);
        required_count += required.len();
        let mut hidden = Vec::new();
        unreached(&behaviors, &input, "", 0, &mut hidden);
        if !hidden.is_empty() {
            mismatches.push(format!(
                "{rpc}: REQUIRED inside a field that is not REQUIRED, which the probe does not fill: {hidden:?}"
            ));
        }

        let Probe { refused, end, problems } = probe(&server, &protoset, method);
        mismatches.extend(problems.into_iter().map(|p| format!("{rpc}: {p}")));
        let conditional: BTreeMap<&str, &str> =
            CONDITIONAL.iter().filter(|(r, _, _)| *r == rpc).map(|(_, path, why)| (*path, *why)).collect();
        for path in conditional.keys() {
            if required.contains(*path) {
                mismatches.push(format!("{rpc}: {path} is REQUIRED and listed in CONDITIONAL"));
            }
            if refused.contains(*path) {
                conditional_seen.insert((rpc.clone(), (*path).to_owned()));
            } else {
                mismatches.push(format!("{rpc}: {path} is in CONDITIONAL but was not refused when empty"));
            }
        }
        let unconditional: BTreeSet<String> =
            refused.iter().filter(|p| !conditional.contains_key(p.as_str())).cloned().collect();
        let not_annotated: Vec<&String> = unconditional.difference(&required).collect();
        let not_refused: Vec<&String> = required.difference(&unconditional).collect();
        if !not_annotated.is_empty() {
            mismatches.push(format!("{rpc}: refused when empty but not REQUIRED: {not_annotated:?}"));
        }
        if !not_refused.is_empty() {
            mismatches.push(format!("{rpc}: REQUIRED but accepted when empty: {not_refused:?} (ended with {end})"));
        }
        println!("  {rpc}: REQUIRED {required:?}; refused when empty {refused:?}; then {end}");
        for (path, why) in &conditional {
            println!("    {path}: conditional, {why}");
        }
    }
    println!(
        "field_behavior: {} RPCs probed, {required_count} REQUIRED paths, {} conditional refusals, {} mismatches",
        methods.len(),
        conditional_seen.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "REQUIRED annotations and validation differ:\n{}", mismatches.join("\n"));
}
