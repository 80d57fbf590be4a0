//! Authentication and roles as a client meets them (issue 17, the first two
//! "Done means"), against the real binary, over gRPC (grpcurl) and over
//! REST (curl through the gateway of `eventfold dev`):
//!
//! - the authorization matrix, generated from the descriptors: every RPC
//!   that `(eventfold.auth.v1.access)` governs (`Policy::rules`) over gRPC,
//!   and every `google.api.http` binding over REST, called without
//!   credentials (UNAUTHENTICATED / 401), with a token lacking the RPC's
//!   roles (PERMISSION_DENIED / 403) and with a token holding its first
//!   role (no refusal for auth reasons); the count of RPCs covered is the
//!   policy's. Health checks and reflection need no credentials;
//! - JWT edge cases, one table over gRPC: each refused UNAUTHENTICATED with
//!   its ErrorInfo reason; the JWKS file is read again for an unknown
//!   `kid`, at most once per refresh interval;
//! - API keys: the admin key `eventfold dev --auth` prints, a created key's
//!   roles, an unknown key, and a revoked key refused by a second process
//!   within a second;
//! - the principal: an event carries the token's subject as `user_id`; a
//!   client's own `x-eventfold-principal` changes nothing, with
//!   authentication on or off.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::DevServer;
use eventfold_gateway::{
    error::code_name,
    rules::{Binding, Body, field_path},
};
use eventfold_platform::auth::policy::{Policy, Rule};
use eventfold_tests::auth::{HS256_SECRET, now, token, token_with};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind};
use serde_json::{Value, json};
use tonic::Code;

/// The first line of `eventfold dev` on PostgreSQL, and on memory.
const DEV_ON_POSTGRES: &str = "eventfold: EventStoreService and the command and query services listening on ";
const DEV_IN_MEMORY: &str = "eventfold: EventStoreService and the command services listening on ";
/// What `eventfold dev --auth` prints before its admin key.
const ADMIN_KEY_LINE: &str = "eventfold: authentication on; admin API key (shown once): ";
/// A role no RPC names.
const NO_SUCH_ROLE: &str = "no.such.role";
/// How long a server stream is read before the call is cut: its first
/// answer, or its headers, decide.
const STREAM_SECONDS: &str = "2";
/// A bound on a unary call (none should come near it).
const UNARY_SECONDS: &str = "20";
/// Calls (grpcurl or curl processes) run at once by the matrix.
const PARALLEL: usize = 8;
/// A revoked key is refused by every process within this.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

/// The claims the JWT edge cases are checked against.
const ISSUER: &str = "https://idp.eventfold.test";
const AUDIENCE: &str = "eventfold-api";
const ROLES_CLAIM: &str = "eventfold_roles";
const LEEWAY_SECS: u64 = 20;

/// A `name: value` header for grpcurl's `-H` and curl's `-H`.
fn header(name: &str, value: &str) -> String {
    format!("{name}: {value}")
}

fn bearer(token: &str) -> String {
    header("authorization", &format!("Bearer {token}"))
}

/// A server under test, with what its clients need.
struct Ends {
    server: DevServer,
    /// `http://ADDR` of its REST gateway, if it has one.
    rest: Option<String>,
    protoset: tempfile::NamedTempFile,
}

impl Ends {
    fn new(server: DevServer, with_rest: bool) -> Ends {
        let rest = with_rest.then(|| format!("http://{}", server.rest_addr()));
        Ends { server, rest, protoset: common::protoset_file() }
    }

    /// grpcurl's call of `rpc` (`Service/Method`) with `headers`: JSON
    /// messages on stdout, the status as JSON on stderr when it failed.
    fn grpcurl(&self, rpc: &str, request: &Value, headers: &[String], max_secs: &str) -> Command {
        let request = request.to_string();
        let protoset = self.protoset.path().to_string_lossy().into_owned();
        let mut args = vec!["-protoset", &protoset, "-format-error", "-max-time", max_secs];
        for h in headers {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["-d", &request, &self.server.addr, rpc]);
        let mut command = self.server.grpcurl(&args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// curl's call of `target` (path and query) through the gateway, the
    /// answer's headers included.
    fn curl(&self, method: &str, target: &str, body: Option<&Value>, headers: &[String], max_secs: &str) -> Command {
        let base = self.rest.as_deref().expect("a server with a REST gateway");
        let mut command = Command::new("curl");
        command.args(["-sS", "-i", "-N", "--max-time", max_secs, "-X", method, &format!("{base}{target}")]);
        for h in headers {
            command.args(["-H", h]);
        }
        if let Some(body) = body {
            command.args(["-H", "content-type: application/json", "--data-binary", &body.to_string()]);
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// A unary gRPC call, run to its end.
    fn grpc(&self, rpc: &str, request: &Value, headers: &[String]) -> Outcome {
        let output = self.grpcurl(rpc, request, headers, UNARY_SECONDS).output().expect("run grpcurl");
        grpc_outcome(&output).unwrap_or_else(|e| panic!("{rpc}: {e}"))
    }

    /// A unary gRPC call that must answer; its answer.
    fn grpc_ok(&self, rpc: &str, request: &Value, headers: &[String]) -> Value {
        let outcome = self.grpc(rpc, request, headers);
        assert_eq!(outcome.code, Code::Ok, "{rpc} {request}: {outcome:?}");
        outcome.body
    }

    /// A REST call, run to its end.
    fn rest(&self, method: &str, target: &str, body: Option<&Value>, headers: &[String]) -> Outcome {
        let output = self.curl(method, target, body, headers, UNARY_SECONDS).output().expect("run curl");
        rest_outcome(&output).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// The `user_id` in the metadata of the first event of `stream`.
    fn first_user_id(&self, stream: &str, credentials: &[String]) -> String {
        let read = self.grpc_ok(
            "eventfold.eventstore.v1.EventStoreService/ReadStream",
            &json!({"streamId": stream}),
            credentials,
        );
        let first = read["events"].get(0).unwrap_or_else(|| panic!("no event in {stream}: {read}"));
        first["metadata"]["userId"].as_str().unwrap_or_default().to_owned()
    }
}

/// `eventfold dev --auth` (on PostgreSQL when `database` is given) with the
/// tests' HS256 secret and `env`; the gateway and the admin listener on free
/// ports.
fn dev_with_auth(database: Option<&str>, env: &[(&str, &str)]) -> Ends {
    let mut args = vec!["--auth"];
    args.extend(database.map(|url| ["--database-url", url]).into_iter().flatten());
    let mut all_env = vec![
        ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_AUTH__JWT__HS256_SECRET", HS256_SECRET),
    ];
    all_env.extend_from_slice(env);
    let prefix = if database.is_some() { DEV_ON_POSTGRES } else { DEV_IN_MEMORY };
    Ends::new(DevServer::start_env(&args, &all_env, prefix), true)
}

/// The admin API key `eventfold dev --auth` printed (within 10 s).
fn admin_key(server: &DevServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let printed = server.process.stdout.lock().unwrap().clone();
        if let Some(key) = printed.lines().find_map(|line| line.strip_prefix(ADMIN_KEY_LINE)) {
            let key = key.trim().to_owned();
            assert!(key.starts_with("efk_dev_"), "{key}");
            return key;
        }
        assert!(Instant::now() < deadline, "no admin key line on stdout: {printed:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// How a call ended, on either side.
#[derive(Debug, Clone)]
struct Outcome {
    /// The gRPC code; over REST, the code named by the error's `status`
    /// (OK for an answer).
    code: Code,
    /// The reason of the error's `google.rpc.ErrorInfo`, if any.
    reason: String,
    /// The HTTP status (REST only).
    http: Option<u16>,
    /// The (first) answer, or the error.
    body: Value,
}

impl Outcome {
    /// Whether authentication or authorization refused the call.
    fn refused(&self) -> bool {
        matches!(self.code, Code::Unauthenticated | Code::PermissionDenied) || matches!(self.http, Some(401 | 403))
    }
}

/// The reason of the `google.rpc.ErrorInfo` among `details`.
fn reason_of(details: &Value) -> String {
    details
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("/google.rpc.ErrorInfo")))
        .and_then(|d| d["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn json_values(bytes: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(bytes).into_iter::<Value>().map_while(Result::ok).collect()
}

/// grpcurl's outcome; a stream cut by `-max-time` ends DEADLINE_EXCEEDED.
fn grpc_outcome(output: &Output) -> Result<Outcome, String> {
    let first = json_values(&output.stdout).into_iter().next().unwrap_or(Value::Null);
    if output.status.success() {
        return Ok(Outcome { code: Code::Ok, reason: String::new(), http: None, body: first });
    }
    let Some(status) = json_values(&output.stderr).pop().filter(|v| v["code"].is_i64()) else {
        return Err(format!(
            "grpcurl failed without a status: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    };
    let code = Code::from_i32(status["code"].as_i64().and_then(|c| i32::try_from(c).ok()).unwrap_or(2));
    Ok(Outcome { code, reason: reason_of(&status["details"]), http: None, body: status })
}

/// curl's outcome; a stream cut by `--max-time` (exit 28) is its headers
/// and first message.
fn rest_outcome(output: &Output) -> Result<Outcome, String> {
    if !output.status.success() && output.status.code() != Some(28) {
        return Err(format!("curl failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    let out = String::from_utf8_lossy(&output.stdout);
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP answer: {out:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status: {head:?}"))?;
    let first = json_values(body.as_bytes()).into_iter().next().unwrap_or(Value::Null);
    let Some(error) = first.get("error").filter(|_| status != 200 || first.as_object().is_some_and(|o| o.len() == 1))
    else {
        return Ok(Outcome { code: Code::Ok, reason: String::new(), http: Some(status), body: first });
    };
    let name = error["status"].as_str().unwrap_or_default();
    let code = (0..=16)
        .map(Code::from_i32)
        .find(|c| code_name(*c) == name)
        .ok_or_else(|| format!("HTTP {status}: error.status {name:?} is no gRPC code's name: {first}"))?;
    Ok(Outcome { code, reason: reason_of(&error["details"]), http: Some(status), body: first })
}

/// Runs `commands`, at most [`PARALLEL`] at once; their outputs in order.
fn run_all(commands: Vec<Command>) -> Vec<Output> {
    let mut running = VecDeque::new();
    let mut outputs = Vec::with_capacity(commands.len());
    for mut command in commands {
        if running.len() >= PARALLEL {
            let child: std::process::Child = running.pop_front().expect("a running call");
            outputs.push(child.wait_with_output().expect("wait for a call"));
        }
        running.push_back(command.spawn().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}")));
    }
    outputs.extend(running.into_iter().map(|child| child.wait_with_output().expect("wait for a call")));
    outputs
}

/// The caller of one cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    /// No credentials at all.
    Anonymous,
    /// A valid token with [`NO_SUCH_ROLE`] only.
    WithoutTheRole,
    /// A valid token with the RPC's first role only.
    WithTheRole,
}

const CALLERS: [Caller; 3] = [Caller::Anonymous, Caller::WithoutTheRole, Caller::WithTheRole];

impl Caller {
    fn headers(self, rule: &Rule) -> Vec<String> {
        match (self, rule) {
            (Caller::Anonymous, _) | (Caller::WithTheRole, Rule::Public) => Vec::new(),
            (Caller::WithoutTheRole, _) => vec![bearer(&token("matrix", &[NO_SUCH_ROLE]))],
            (Caller::WithTheRole, Rule::Roles(roles)) => vec![bearer(&token("matrix", &[roles[0].as_str()]))],
        }
    }

    /// The refusal this caller must get (code, reason, HTTP status); `None`:
    /// it must not be refused for auth reasons.
    fn refusal(self, rule: &Rule) -> Option<(Code, &'static str, u16)> {
        match (self, rule) {
            (_, Rule::Public) | (Caller::WithTheRole, _) => None,
            (Caller::Anonymous, Rule::Roles(_)) => Some((Code::Unauthenticated, "CREDENTIALS_MISSING", 401)),
            (Caller::WithoutTheRole, Rule::Roles(_)) => Some((Code::PermissionDenied, "MISSING_ROLE", 403)),
        }
    }
}

/// A path variable's value from its field's type alone (an enum's first
/// non-zero value, so that the gateway forwards the call).
fn path_value(field: Option<&FieldDescriptor>) -> String {
    match field.map(FieldDescriptor::kind) {
        Some(Kind::Enum(values)) => {
            values.values().find(|v| v.number() != 0).unwrap_or_else(|| values.default_value()).name().to_owned()
        }
        Some(Kind::Bool) => "true".to_owned(),
        Some(Kind::String | Kind::Bytes | Kind::Message(_)) | None => "auth-matrix".to_owned(),
        Some(_) => "1".to_owned(),
    }
}

/// The path of `binding` with every variable filled, and its body (`{}`).
fn rest_target(binding: &Binding) -> (String, Option<Value>) {
    let input = binding.rpc.input();
    let mut path = binding.template.openapi_path();
    for variable in binding.template.variables() {
        path = path.replace(&format!("{{{variable}}}"), &path_value(field_path(&input, variable).as_ref()));
    }
    // A wildcard outside a variable binds nothing: any segment does.
    path = path.split('/').map(|s| if s == "*" || s == "**" { "auth-matrix" } else { s }).collect::<Vec<_>>().join("/");
    let body = match &binding.body {
        Body::None => None,
        Body::All => Some(json!({})),
        Body::Field(field) if field.is_list() => Some(json!([])),
        Body::Field(_) => Some(json!({})),
    };
    (path, body)
}

/// The gRPC path (`/pkg.Service/Method`) of `binding`'s RPC.
fn grpc_path(binding: &Binding) -> String {
    format!("/{}/{}", binding.rpc.parent_service().full_name(), binding.rpc.name())
}

/// One call of the matrix.
struct Cell {
    rpc: String,
    caller: Caller,
    /// `None` over gRPC; `METHOD PATH` over REST.
    rest: Option<String>,
}

#[test]
fn every_governed_rpc_is_refused_without_credentials_or_role_and_admitted_with_its_role() {
    let started = Instant::now();
    let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
    let policy = Policy::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).expect("the policy builds");
    let rules: BTreeMap<String, Rule> = policy.rules().map(|(path, rule)| (path.to_owned(), rule.clone())).collect();
    let rpcs: BTreeMap<String, bool> = pool
        .services()
        .filter(|s| s.package_name().starts_with("eventfold."))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .map(|m| (format!("/{}/{}", m.parent_service().full_name(), m.name()), m.is_server_streaming()))
        .collect();
    assert_eq!(
        rules.keys().collect::<Vec<_>>(),
        rpcs.keys().collect::<Vec<_>>(),
        "the policy governs every eventfold RPC"
    );
    let bindings = eventfold_gateway::rules::bindings(&pool).expect("the HTTP rules parse");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let ends = dev_with_auth(Some(db.url()), &[]);

    // Health and reflection need no credentials (reflection: grpcurl
    // without the protoset).
    let health = ends.server.run(&["-d", "{}", &ends.server.addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let listed = ends.server.run(&[&ends.server.addr, "list"]);
    for service in
        ["grpc.health.v1.Health", "eventfold.orders.v1.OrderCommandService", "eventfold.admin.v1.ApiKeyService"]
    {
        assert!(listed.lines().any(|l| l.trim() == service), "{service} not listed:\n{listed}");
    }

    let mut cells = Vec::new();
    let mut commands = Vec::new();
    for (rpc, rule) in &rules {
        let max = if rpcs[rpc] { STREAM_SECONDS } else { UNARY_SECONDS };
        for caller in CALLERS {
            commands.push(ends.grpcurl(&rpc[1..], &json!({}), &caller.headers(rule), max));
            cells.push(Cell { rpc: rpc.clone(), caller, rest: None });
        }
    }
    for binding in &bindings {
        let rpc = grpc_path(binding);
        let rule = rules.get(&rpc).unwrap_or_else(|| panic!("{rpc} has an HTTP binding but no rule"));
        let (path, body) = rest_target(binding);
        let max = if binding.server_streaming() { STREAM_SECONDS } else { UNARY_SECONDS };
        let method = binding.method.as_str();
        for caller in CALLERS {
            commands.push(ends.curl(method, &path, body.as_ref(), &caller.headers(rule), max));
            cells.push(Cell { rpc: rpc.clone(), caller, rest: Some(format!("{method} {path}")) });
        }
    }
    let outputs = run_all(commands);

    let mut wrong = Vec::new();
    let (mut over_grpc, mut over_rest) = (BTreeSet::new(), BTreeSet::new());
    let mut admitted: BTreeMap<String, usize> = BTreeMap::new();
    for (cell, output) in cells.iter().zip(&outputs) {
        let rule = &rules[&cell.rpc];
        let side = cell.rest.as_deref().unwrap_or("gRPC");
        let outcome = match &cell.rest {
            None => grpc_outcome(output),
            Some(_) => rest_outcome(output),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                wrong.push(format!("{} {:?} ({side}): {e}", cell.rpc, cell.caller));
                continue;
            }
        };
        let ok = match cell.caller.refusal(rule) {
            Some((code, reason, http)) => {
                outcome.code == code
                    && outcome.reason == reason
                    && cell.rest.is_none() == outcome.http.is_none()
                    && outcome.http.is_none_or(|status| status == http)
            }
            None => {
                let name = match outcome.http {
                    Some(status) => format!("HTTP {status} {}", code_name(outcome.code)),
                    None => format!("gRPC {}", code_name(outcome.code)),
                };
                *admitted.entry(name).or_default() += 1;
                !outcome.refused()
            }
        };
        if !ok {
            wrong.push(format!("{} {:?} ({side}), rule {rule:?}: {outcome:?}", cell.rpc, cell.caller));
        }
        let covered = if cell.rest.is_some() { &mut over_rest } else { &mut over_grpc };
        covered.insert((cell.rpc.clone(), cell.caller));
    }
    assert!(wrong.is_empty(), "{} cells of the matrix are wrong:\n{}", wrong.len(), wrong.join("\n"));

    // Nothing skipped: every governed RPC, each caller, on each side.
    let everything: BTreeSet<(String, Caller)> =
        rules.keys().flat_map(|rpc| CALLERS.map(|caller| (rpc.clone(), caller))).collect();
    assert_eq!(over_grpc, everything, "every governed RPC is called over gRPC by each caller");
    assert_eq!(over_rest, everything, "every governed RPC is called over REST by each caller");
    assert_eq!(cells.len(), 3 * (rules.len() + bindings.len()), "every call is checked");
    println!(
        "auth matrix: {} governed RPCs over gRPC and {} bindings over REST, 3 callers each ({} calls); \
         admitted calls answered {admitted:?}; {:.1} s",
        rules.len(),
        bindings.len(),
        cells.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A P-256 key of a JWKS, as an identity provider would hold it.
struct EcKey {
    signing: EncodingKey,
    /// Its public JWK, with its `kid`.
    jwk: Value,
    /// Its public key in PEM (SPKI).
    public_pem: String,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl EcKey {
    fn generate(kid: &str) -> EcKey {
        let pair = rcgen::KeyPair::generate().expect("a P-256 key");
        let point = pair.public_key_raw();
        assert_eq!((point.len(), point[0]), (65, 4), "an uncompressed P-256 point");
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]),
                         "kid": kid, "alg": "ES256", "use": "sig"});
        let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("an EC PEM");
        EcKey { signing, jwk, public_pem: pair.public_key_pem() }
    }

    fn sign(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.signing).expect("an ES256 token")
    }
}

fn write_jwks(path: &Path, keys: &[&EcKey]) {
    let keys: Vec<&Value> = keys.iter().map(|k| &k.jwk).collect();
    std::fs::write(path, json!({ "keys": keys }).to_string()).expect("write the JWKS");
}

/// An HMAC token (`alg`, `kid`) signed with `secret`.
fn hmac(algorithm: Algorithm, kid: Option<&str>, claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("an HMAC token")
}

/// A token with `header` and `claims` as given, and `signature` (base64url
/// of it): what no library would make.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()), b64(signature))
}

/// What a JWT edge case must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The call is let through (GetStream answers the stream).
    Admitted,
    /// Refused with this code and reason.
    Refused(Code, &'static str),
}

/// One JWT edge case: the JWKS file rewritten first (`Some`), then a call.
struct Case {
    what: &'static str,
    jwks: Option<Vec<&'static str>>,
    authorization: String,
    expect: Expect,
}

#[test]
fn jwt_edge_cases_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let jwks = dir.path().join("jwks.json");
    let keys: BTreeMap<&str, EcKey> = ["k1", "k2", "k3"].into_iter().map(|kid| (kid, EcKey::generate(kid))).collect();
    write_jwks(&jwks, &[&keys["k1"]]);
    let leeway = LEEWAY_SECS.to_string();
    let ends = dev_with_auth(
        None,
        &[
            ("EVENTFOLD_AUTH__JWT__ISSUER", ISSUER),
            ("EVENTFOLD_AUTH__JWT__AUDIENCE", AUDIENCE),
            ("EVENTFOLD_AUTH__JWT__ROLES_CLAIM", ROLES_CLAIM),
            ("EVENTFOLD_AUTH__JWT__LEEWAY_SECS", &leeway),
            ("EVENTFOLD_AUTH__JWT__JWKS_FILE", &jwks.to_string_lossy()),
            ("EVENTFOLD_AUTH__JWT__JWKS_REFRESH_SECS", "3600"),
        ],
    );
    let admin = header("x-api-key", &admin_key(&ends.server));
    let stream = "jwt-edge-1";
    ends.grpc_ok(
        "eventfold.eventstore.v1.EventStoreService/Append",
        &json!({"streamId": stream, "events": [{"eventType": "Checked", "data": {}}]}),
        &[admin],
    );

    let now = now();
    let claims = |patch: Value| {
        let mut claims = json!({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600,
                                ROLES_CLAIM: ["eventstore.read"]});
        for (key, value) in patch.as_object().expect("an object") {
            match value {
                Value::Null => claims.as_object_mut().expect("an object").remove(key),
                value => claims.as_object_mut().expect("an object").insert(key.clone(), value.clone()),
            };
        }
        claims
    };
    let hs256 = |patch: Value| format!("Bearer {}", token_with(&claims(patch)));
    let es256 = |kid: &str| format!("Bearer {}", keys[kid].sign(&claims(json!({})), kid));
    let unauthenticated = |reason| Expect::Refused(Code::Unauthenticated, reason);
    let k1 = &keys["k1"];
    let case = |what, authorization: String, expect| Case { what, jwks: None, authorization, expect };

    let cases = vec![
        case("a valid HS256 token", hs256(json!({})), Expect::Admitted),
        case("a valid ES256 token of the JWKS", es256("k1"), Expect::Admitted),
        case(
            "expired beyond the leeway",
            hs256(json!({"exp": now - 2 * LEEWAY_SECS})),
            unauthenticated("TOKEN_EXPIRED"),
        ),
        case("expired within the leeway", hs256(json!({"exp": now - LEEWAY_SECS / 4})), Expect::Admitted),
        case("no exp", hs256(json!({"exp": null})), unauthenticated("TOKEN_MALFORMED")),
        case(
            "not yet valid beyond the leeway",
            hs256(json!({"nbf": now + 2 * LEEWAY_SECS})),
            unauthenticated("TOKEN_NOT_YET_VALID"),
        ),
        case("not yet valid within the leeway", hs256(json!({"nbf": now + LEEWAY_SECS / 4})), Expect::Admitted),
        case("a wrong issuer", hs256(json!({"iss": "https://evil.test"})), unauthenticated("TOKEN_ISSUER")),
        case("no issuer", hs256(json!({"iss": null})), unauthenticated("TOKEN_ISSUER")),
        case("an issuer that is no string", hs256(json!({"iss": 42})), unauthenticated("TOKEN_ISSUER")),
        case("a wrong audience", hs256(json!({"aud": "another-api"})), unauthenticated("TOKEN_AUDIENCE")),
        case("no audience", hs256(json!({"aud": null})), unauthenticated("TOKEN_AUDIENCE")),
        case("an audience that is no string", hs256(json!({"aud": 42})), unauthenticated("TOKEN_AUDIENCE")),
        case(
            "HS256 signed with another secret",
            format!(
                "Bearer {}",
                hmac(Algorithm::HS256, None, &claims(json!({})), b"another-secret-of-at-least-32-bytes!!")
            ),
            unauthenticated("TOKEN_SIGNATURE"),
        ),
        case(
            "ES256 signed by another key under a known kid",
            format!("Bearer {}", keys["k2"].sign(&claims(json!({})), "k1")),
            unauthenticated("TOKEN_SIGNATURE"),
        ),
        case(
            "alg none, unsigned",
            format!("Bearer {}", raw_token(&json!({"alg": "none", "typ": "JWT"}), &claims(json!({})), b"")),
            unauthenticated("TOKEN_MALFORMED"),
        ),
        case(
            "HS256 keyed with the public JWK of a JWKS key (HS/RS confusion)",
            format!("Bearer {}", hmac(Algorithm::HS256, Some("k1"), &claims(json!({})), k1.jwk.to_string().as_bytes())),
            unauthenticated("TOKEN_SIGNATURE"),
        ),
        case(
            "HS256 keyed with the public PEM of a JWKS key (HS/RS confusion)",
            format!("Bearer {}", hmac(Algorithm::HS256, Some("k1"), &claims(json!({})), k1.public_pem.as_bytes())),
            unauthenticated("TOKEN_SIGNATURE"),
        ),
        case(
            "RS256 claimed for the ES256 key's kid",
            format!(
                "Bearer {}",
                raw_token(&json!({"alg": "RS256", "kid": "k1", "typ": "JWT"}), &claims(json!({})), b"signature")
            ),
            unauthenticated("TOKEN_ALGORITHM"),
        ),
        case(
            "HS384 with the configured secret",
            format!("Bearer {}", hmac(Algorithm::HS384, None, &claims(json!({})), HS256_SECRET.as_bytes())),
            unauthenticated("TOKEN_ALGORITHM"),
        ),
        case("no sub", hs256(json!({"sub": null})), unauthenticated("TOKEN_SUBJECT")),
        case("roles not a list", hs256(json!({ROLES_CLAIM: "admin"})), unauthenticated("TOKEN_ROLES")),
        case(
            "roles under another claim than the configured one",
            hs256(json!({ROLES_CLAIM: null, "roles": ["admin"]})),
            Expect::Refused(Code::PermissionDenied, "MISSING_ROLE"),
        ),
        case("a token that is no JWT", "Bearer not-a-jwt".to_owned(), unauthenticated("TOKEN_MALFORMED")),
        case(
            "a JWT header that is no JSON",
            format!("Bearer {}.{}.{}", b64(b"not json"), b64(claims(json!({})).to_string().as_bytes()), b64(b"sig")),
            unauthenticated("TOKEN_MALFORMED"),
        ),
        case("an unknown scheme", "Token abc".to_owned(), unauthenticated("CREDENTIALS_MALFORMED")),
        case("a scheme without credentials", "Bearer".to_owned(), unauthenticated("CREDENTIALS_MALFORMED")),
        // Key rotation, in this order: the first unknown kid has the file
        // read again; another within the refresh interval does not.
        Case {
            what: "a new kid after the JWKS file gained its key (read again)",
            jwks: Some(vec!["k1", "k2"]),
            authorization: es256("k2"),
            expect: Expect::Admitted,
        },
        Case {
            what: "another new kid within the refresh interval (not read again)",
            jwks: Some(vec!["k1", "k2", "k3"]),
            authorization: es256("k3"),
            expect: unauthenticated("TOKEN_UNKNOWN_KEY"),
        },
        case(
            "a kid the JWKS file never had",
            format!("Bearer {}", keys["k3"].sign(&claims(json!({})), "k9")),
            unauthenticated("TOKEN_UNKNOWN_KEY"),
        ),
        case("the rotated-in key still works", es256("k2"), Expect::Admitted),
    ];

    let mut wrong = Vec::new();
    for Case { what, jwks: rewrite, authorization, expect } in &cases {
        if let Some(kids) = rewrite {
            let chosen: Vec<&EcKey> = kids.iter().map(|kid| &keys[kid]).collect();
            write_jwks(&jwks, &chosen);
        }
        let outcome = ends.grpc(
            "eventfold.eventstore.v1.EventStoreService/GetStream",
            &json!({"streamId": stream}),
            &[header("authorization", authorization)],
        );
        let as_expected = match expect {
            Expect::Admitted => outcome.code == Code::Ok,
            Expect::Refused(code, reason) => outcome.code == *code && outcome.reason == *reason,
        };
        if !as_expected {
            wrong.push(format!("{what}: want {expect:?}, got {outcome:?}"));
        }
        // No answer repeats the secret or the token.
        let text = outcome.body.to_string();
        let presented = authorization.rsplit(' ').next().unwrap_or_default();
        assert!(!text.contains(HS256_SECRET) && (presented.len() < 16 || !text.contains(presented)), "{what}: {text}");
    }
    assert!(wrong.is_empty(), "{} of {} JWT cases are wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    println!("jwt edge cases: {} cases", cases.len());
}

const CREATE_API_KEY: &str = "eventfold.admin.v1.ApiKeyService/CreateApiKey";
const LIST_API_KEYS: &str = "eventfold.admin.v1.ApiKeyService/ListApiKeys";
const REVOKE_API_KEY: &str = "eventfold.admin.v1.ApiKeyService/RevokeApiKey";
const CREATE_ORDER: &str = "eventfold.orders.v1.OrderCommandService/CreateOrder";
const READ_ALL: &str = "eventfold.eventstore.v1.EventStoreService/ReadAll";

/// The HTTP method and path of the operation `operation_id`, which binds
/// no path variable.
fn route(operation_id: &str) -> (String, String) {
    let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
    let bindings = eventfold_gateway::rules::bindings(&pool).expect("the HTTP rules parse");
    let binding = bindings
        .iter()
        .find(|b| b.operation_id() == operation_id && b.template.variables().is_empty())
        .unwrap_or_else(|| panic!("no binding of {operation_id} without path variables"));
    (binding.method.as_str().to_owned(), binding.template.openapi_path())
}

/// A CreateOrder request for order `id`.
fn order(id: &str) -> Value {
    json!({"orderId": id, "customerId": "c-1", "currency": "EUR",
           "items": [{"productId": "sku-1", "quantity": 1, "unitPrice": {"minor": "100", "currency": "EUR"}}]})
}

/// `eventfold keys create` on `database_url`: the key's id and the key.
fn cli_create_key(database_url: &str, name: &str, role: &str) -> (String, String) {
    let output = common::eventfold()
        .args(["keys", "--database-url", database_url, "create", "--name", name, "--role", role])
        .output()
        .expect("run eventfold keys create");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "eventfold keys create failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |label: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label} line in:\n{stdout}"))
    };
    (field("id:"), field("key:"))
}

fn cli_revoke_key(database_url: &str, id: &str) {
    let output = common::eventfold()
        .args(["keys", "--database-url", database_url, "revoke", id])
        .output()
        .expect("run eventfold keys revoke");
    assert!(output.status.success(), "eventfold keys revoke failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// ReadAll on `ends` with API key `key`.
fn read_all(ends: &Ends, key: &str) -> Outcome {
    ends.grpc(READ_ALL, &json!({"maxCount": 1}), &[header("x-api-key", key)])
}

fn is_invalid_key(outcome: &Outcome) -> bool {
    outcome.code == Code::Unauthenticated && outcome.reason == "API_KEY_INVALID"
}

/// Polls `ends` with `key` (revoked at `revoked`) until it is refused as
/// invalid; how long after the revoke. Fails once [`REVOCATION_BOUND`] has
/// passed.
fn refused_after(ends: &Ends, key: &str, revoked: Instant, what: &str) -> Duration {
    loop {
        let outcome = read_all(ends, key);
        let elapsed = revoked.elapsed();
        if is_invalid_key(&outcome) {
            assert!(elapsed <= REVOCATION_BOUND, "{what}: refused only {elapsed:?} after the revoke");
            return elapsed;
        }
        assert!(
            matches!(outcome.code, Code::Ok | Code::PermissionDenied),
            "{what}: neither accepted nor refused as revoked: {outcome:?}"
        );
        assert!(elapsed < REVOCATION_BOUND, "{what}: still accepted {elapsed:?} after the revoke: {outcome:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn api_keys_grant_their_roles_and_a_revoked_key_is_refused_by_every_process_within_a_second() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let ends = dev_with_auth(Some(db.url()), &[]);
    let admin = admin_key(&ends.server);
    let as_admin = vec![header("x-api-key", &admin)];

    // The printed admin key, in either header, over gRPC and REST.
    let (list_method, list_path) = route("ApiKeyService_ListApiKeys");
    for headers in [as_admin.clone(), vec![header("authorization", &format!("ApiKey {admin}"))]] {
        ends.grpc_ok(LIST_API_KEYS, &json!({}), &headers);
        let listed = ends.rest(&list_method, &list_path, None, &headers);
        assert_eq!((listed.http, listed.code), (Some(200), Code::Ok), "{headers:?}: {listed:?}");
    }

    // A key with orders.write, made with the admin key: it may create
    // orders (as `apikey:ID`), over gRPC and REST, but not read the log.
    let created = ends.grpc_ok(CREATE_API_KEY, &json!({"name": "orders writer", "roles": ["orders.write"]}), &as_admin);
    let writer_id = created["apiKey"]["id"].as_str().expect("the key's id").to_owned();
    let writer = created["key"].as_str().expect("the key").to_owned();
    let as_writer = vec![header("x-api-key", &writer)];
    ends.grpc_ok(CREATE_ORDER, &order("key-order-grpc"), &as_writer);
    let (create_method, create_path) = route("OrderCommandService_CreateOrder");
    let over_rest = ends.rest(
        &create_method,
        &create_path,
        Some(&order("key-order-rest")),
        &[header("authorization", &format!("ApiKey {writer}"))],
    );
    assert_eq!((over_rest.http, over_rest.code), (Some(200), Code::Ok), "{over_rest:?}");
    for stream in ["order-key-order-grpc", "order-key-order-rest"] {
        assert_eq!(ends.first_user_id(stream, &as_admin), format!("apikey:{writer_id}"), "{stream}");
    }
    let refused = read_all(&ends, &writer);
    assert_eq!((refused.code, refused.reason.as_str()), (Code::PermissionDenied, "MISSING_ROLE"), "{refused:?}");
    let (read_method, read_path) = route("EventStoreService_ReadAll");
    let refused = ends.rest(&read_method, &read_path, None, &as_writer);
    assert_eq!((refused.http, refused.reason.as_str()), (Some(403), "MISSING_ROLE"), "{refused:?}");

    // Unknown keys: one of the right format no one made, and garbage.
    let unknown = format!("efk_{}", "A".repeat(43));
    for key in [unknown.as_str(), "not-a-key"] {
        let outcome = read_all(&ends, key);
        assert!(is_invalid_key(&outcome), "{key}: {outcome:?}");
        let outcome = ends.rest(&list_method, &list_path, None, &[header("x-api-key", key)]);
        assert_eq!((outcome.http, outcome.reason.as_str()), (Some(401), "API_KEY_INVALID"), "{key}: {outcome:?}");
    }

    // A second process on the same database (authentication on by default
    // for `serve`), and a key made on the command line: both processes
    // accept both keys (the writer's is authenticated, its role lacking).
    let (reader_id, reader) = cli_create_key(db.url(), "log reader", "eventstore.read");
    let second = Ends::new(
        DevServer::start_command(
            &["serve", "eventstore"],
            &["--database-url", db.url(), "--listen", "127.0.0.1:0"],
            &[],
            "eventfold: EventStoreService listening on ",
        ),
        false,
    );
    for process in [&ends, &second] {
        assert_eq!(read_all(process, &reader).code, Code::Ok);
        let writer_there = read_all(process, &writer);
        assert_eq!((writer_there.code, writer_there.reason.as_str()), (Code::PermissionDenied, "MISSING_ROLE"));
    }

    // The writer revoked over gRPC by the dev process: refused there at once,
    // by the second process within a second.
    ends.grpc_ok(REVOKE_API_KEY, &json!({"id": writer_id}), &as_admin);
    let revoked = Instant::now();
    assert!(is_invalid_key(&read_all(&ends, &writer)), "the revoking process refuses the key at once");
    let writer_refused = refused_after(&second, &writer, revoked, "the writer on the second process");

    // The reader revoked on the command line (a third process): both
    // serving processes refuse it within a second.
    cli_revoke_key(db.url(), &reader_id);
    let revoked = Instant::now();
    let reader_refused = refused_after(&second, &reader, revoked, "the reader on the second process");
    let reader_refused_dev = refused_after(&ends, &reader, revoked, "the reader on the dev process");
    println!(
        "api keys: revoked keys refused after {writer_refused:?} (writer, second process), {reader_refused:?} \
         (reader, second process), {reader_refused_dev:?} (reader, dev process)"
    );
}

#[test]
fn events_carry_the_authenticated_subject_whatever_principal_the_client_claims() {
    let (create_method, create_path) = route("OrderCommandService_CreateOrder");
    let forged = header("x-eventfold-principal", "mallory");

    // Authentication on: the token's subject, over gRPC and REST.
    let on = dev_with_auth(None, &[]);
    let alice = bearer(&token("alice", &["orders.write"]));
    on.grpc_ok(CREATE_ORDER, &order("principal-grpc"), &[alice.clone(), forged.clone()]);
    let over_rest = on.rest(&create_method, &create_path, Some(&order("principal-rest")), &[alice, forged.clone()]);
    assert_eq!((over_rest.http, over_rest.code), (Some(200), Code::Ok), "{over_rest:?}");
    let auditor = [bearer(&token("auditor", &["eventstore.read"]))];
    for stream in ["order-principal-grpc", "order-principal-rest"] {
        assert_eq!(on.first_user_id(stream, &auditor), "alice", "{stream}: the token's subject, not the header's");
    }

    // Authentication off: nobody, whatever the header says.
    let off = Ends::new(
        DevServer::start_env(
            &[],
            &[("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
            DEV_IN_MEMORY,
        ),
        true,
    );
    off.grpc_ok(CREATE_ORDER, &order("principal-grpc"), std::slice::from_ref(&forged));
    let over_rest = off.rest(&create_method, &create_path, Some(&order("principal-rest")), &[forged]);
    assert_eq!((over_rest.http, over_rest.code), (Some(200), Code::Ok), "{over_rest:?}");
    for stream in ["order-principal-grpc", "order-principal-rest"] {
        assert_eq!(off.first_user_id(stream, &[]), "", "{stream}: a client cannot name the principal");
    }
}
