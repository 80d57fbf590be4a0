//! A **stand-in** for Confluent Schema Registry, for tests only.
//!
//! Confluent Schema Registry cannot run here (it is in none of the reachable
//! package registries), so tests talk to this in-process server instead. It
//! implements the REST endpoints eventfold calls as Confluent's API
//! reference documents them: content type
//! `application/vnd.schemaregistry.v1+json`, errors as
//! `{"error_code": N, "message": "..."}` with the documented codes and HTTP
//! statuses, global schema ids (the same schema under another subject gets
//! the same id), versions per subject:
//!
//! - `POST /subjects/{subject}/versions` — register (`{schema, schemaType?,
//!   references?}` → `{id}`; the same schema again → same id, no new
//!   version; incompatible → 409 / 409; invalid schema, schema type or
//!   reference → 422 / 42201)
//! - `POST /subjects/{subject}` — lookup (`{subject, id, version, schema}`,
//!   or 404 with 40401 subject not found / 40403 schema not found)
//! - `GET /schemas/ids/{id}` — `{schema, schemaType?, references?}` or 40403
//! - `GET /subjects`, `GET /subjects/{subject}/versions` (40401),
//!   `GET /subjects/{subject}/versions/{version|latest|-1}` (40401 / 40402,
//!   42202 for a version that is not one)
//! - `GET`/`PUT /config` and `/config/{subject}` (`{"compatibility"}` in,
//!   `{"compatibilityLevel"}` out of GET; 42203 for an unknown level;
//!   GET of a subject without its own level: 40408, or the global level
//!   with `?defaultToGlobal=true`; 40401 for an unknown subject)
//! - `POST /compatibility/subjects/{subject}/versions[/{version}]` —
//!   `{is_compatible}` (plus `messages` with `?verbose=true`)
//!
//! Compatibility levels NONE, BACKWARD(_TRANSITIVE), FORWARD(_TRANSITIVE)
//! and FULL(_TRANSITIVE) are decided for AVRO schemas by apache-avro's own
//! schema compatibility check (through `eventfold_schemas`, the crate that
//! owns apache-avro). Differences from the real registry, on purpose:
//! PROTOBUF (and JSON) schemas are stored with their references but not
//! parsed and never compatibility-checked; AVRO schemas with references are
//! parsed with them but not compatibility-checked; two AVRO schemas are the
//! same when their JSON is equal (Confluent compares its normalized form);
//! schema texts are returned as registered; nothing is ever deleted;
//! nothing is persisted.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use eventfold_schemas::{CompatibilityLevel, Incompatibility, check_compatibility_level, validate_avro};
use serde_json::{Value, json};

/// The content type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A Schema Registry stand-in serving on a free loopback port until
/// dropped.
#[derive(Debug)]
pub struct RegistryStandIn {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryStandIn {
    /// Binds `127.0.0.1:0` and serves in a tokio task of the current
    /// runtime. Starts empty, with the global level BACKWARD (Confluent's
    /// default).
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start() -> RegistryStandIn {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("cannot bind a loopback port for the registry stand-in: {e}"));
        let addr = listener.local_addr().expect("a bound listener has an address");
        let state = Shared::default();
        let router = Router::new()
            .route("/subjects", get(list_subjects))
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions", get(list_versions).post(register))
            .route("/subjects/{subject}/versions/{version}", get(get_version))
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/config", get(get_global_config).put(put_global_config))
            .route("/config/{subject}", get(get_subject_config).put(put_subject_config))
            .route("/compatibility/subjects/{subject}/versions", post(compatible_with_all))
            .route("/compatibility/subjects/{subject}/versions/{version}", post(compatible_with_version))
            .fallback(|| async { error(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
            .method_not_allowed_fallback(|| async {
                error(StatusCode::METHOD_NOT_ALLOWED, 405, "HTTP 405 Method Not Allowed")
            })
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        RegistryStandIn { addr, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RegistryStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    name: String,
    subject: String,
    version: u32,
}

#[derive(Debug, Clone)]
struct Stored {
    schema_type: String,
    schema: String,
    references: Vec<Reference>,
    /// What makes two registrations the same schema.
    identity: String,
}

impl Stored {
    fn same_as(&self, other: &Stored) -> bool {
        self.schema_type == other.schema_type && self.identity == other.identity && self.references == other.references
    }
}

#[derive(Debug)]
struct Registry {
    /// Schema id `n` is `schemas[n - 1]`.
    schemas: Vec<Stored>,
    /// Subject → schema id of version `n` at `[n - 1]`.
    subjects: BTreeMap<String, Vec<u32>>,
    configs: BTreeMap<String, CompatibilityLevel>,
    global: CompatibilityLevel,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            schemas: Vec::new(),
            subjects: BTreeMap::new(),
            configs: BTreeMap::new(),
            global: CompatibilityLevel::Backward,
        }
    }
}

type Shared = Arc<Mutex<Registry>>;

fn lock(state: &Shared) -> MutexGuard<'_, Registry> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    fn schema(&self, id: u32) -> Option<&Stored> {
        id.checked_sub(1).and_then(|i| self.schemas.get(i as usize))
    }

    fn level(&self, subject: &str) -> CompatibilityLevel {
        self.configs.get(subject).copied().unwrap_or(self.global)
    }

    /// The version of `subject` that holds `candidate`, with its id.
    fn find(&self, subject: &str, candidate: &Stored) -> Option<(u32, u32)> {
        let ids = self.subjects.get(subject)?;
        ids.iter()
            .enumerate()
            .find_map(|(i, id)| self.schema(*id).filter(|s| s.same_as(candidate)).map(|_| (i as u32 + 1, *id)))
    }

    /// Parses and validates a schema request body.
    fn candidate(&self, body: &[u8]) -> Result<Stored, ApiError> {
        let invalid = |message: String| error(StatusCode::UNPROCESSABLE_ENTITY, 42201, &message);
        let request: Value = serde_json::from_slice(body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, 400, &format!("Unrecognized request body: {e}")))?;
        let schema = request
            .get("schema")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("Invalid schema: the request has no schema string".to_owned()))?;
        let schema_type = match request.get("schemaType") {
            None | Some(Value::Null) => "AVRO".to_owned(),
            Some(Value::String(t)) if ["AVRO", "PROTOBUF", "JSON"].contains(&t.to_uppercase().as_str()) => {
                t.to_uppercase()
            }
            Some(other) => return Err(invalid(format!("Invalid schema type {other}"))),
        };
        let mut references = Vec::new();
        let mut reference_texts = Vec::new();
        for r in request.get("references").and_then(Value::as_array).into_iter().flatten() {
            let reference = (|| {
                Some(Reference {
                    name: r.get("name")?.as_str()?.to_owned(),
                    subject: r.get("subject")?.as_str()?.to_owned(),
                    version: u32::try_from(r.get("version")?.as_u64()?).ok()?,
                })
            })()
            .ok_or_else(|| invalid(format!("Invalid schema reference {r}")))?;
            let text = self
                .subjects
                .get(&reference.subject)
                .and_then(|ids| ids.get((reference.version as usize).checked_sub(1)?))
                .and_then(|id| self.schema(*id))
                .map(|s| s.schema.clone())
                .ok_or_else(|| {
                    invalid(format!(
                        "Invalid schema: reference {} (subject {} version {}) not found",
                        reference.name, reference.subject, reference.version
                    ))
                })?;
            references.push(reference);
            reference_texts.push(text);
        }
        let identity = match schema_type.as_str() {
            "AVRO" => {
                let texts: Vec<&str> = reference_texts.iter().map(String::as_str).collect();
                validate_avro(schema, &texts).map_err(|e| invalid(format!("Invalid schema {schema}, details: {e}")))?;
                let json: Value = serde_json::from_str(schema).map_err(|e| invalid(format!("Invalid schema: {e}")))?;
                json.to_string()
            }
            "JSON" => {
                let json: Value = serde_json::from_str(schema).map_err(|e| invalid(format!("Invalid schema: {e}")))?;
                json.to_string()
            }
            _ if schema.trim().is_empty() => return Err(invalid("Invalid schema: empty".to_owned())),
            _ => schema.to_owned(),
        };
        Ok(Stored { schema_type, schema: schema.to_owned(), references, identity })
    }

    /// The subject's level applied to `candidate` against `previous`
    /// versions (oldest first).
    fn check(&self, level: CompatibilityLevel, previous: &[u32], candidate: &Stored) -> Result<(), String> {
        // Only AVRO without references is checked (see the module docs).
        if candidate.schema_type != "AVRO" || !candidate.references.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = previous
            .iter()
            .filter_map(|id| self.schema(*id))
            .filter(|s| s.schema_type == "AVRO" && s.references.is_empty())
            .map(|s| s.schema.as_str())
            .collect();
        check_compatibility_level(level, &texts, &candidate.schema).map_err(|e| match e {
            Incompatibility::Invalid { message, .. } | Incompatibility::Incompatible { message } => message,
        })
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

fn ok(body: Value) -> Response {
    reply(StatusCode::OK, body)
}

/// An error answer: `{"error_code": code, "message": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(self.status, json!({ "error_code": self.code, "message": self.message }))
    }
}

fn error(status: StatusCode, code: u32, message: &str) -> ApiError {
    ApiError { status, code, message: message.to_owned() }
}

fn subject_not_found(subject: &str) -> ApiError {
    error(StatusCode::NOT_FOUND, 40401, &format!("Subject '{subject}' not found."))
}

fn query_flag(query: &Option<String>, name: &str) -> bool {
    query.as_deref().unwrap_or_default().split('&').any(|pair| pair.eq_ignore_ascii_case(&format!("{name}=true")))
}

/// `latest`, `-1` or 1..=2^31-1.
enum Version {
    Latest,
    Number(u32),
}

fn parse_version(text: &str) -> Result<Version, ApiError> {
    match text {
        "latest" | "-1" => Ok(Version::Latest),
        _ => match text.parse::<u32>() {
            Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(Version::Number(n)),
            _ => Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                &format!(
                    "The specified version '{text}' is not a valid version id. Allowed values are between \
                     [1, 2^31-1] and the string \"latest\""
                ),
            )),
        },
    }
}

/// Version number and schema id of `version` of `subject`.
fn resolve_version(registry: &Registry, subject: &str, version: &str) -> Result<(u32, u32), ApiError> {
    let version = parse_version(version)?;
    let ids = registry.subjects.get(subject).ok_or_else(|| subject_not_found(subject))?;
    let index = match version {
        Version::Latest => ids.len(),
        Version::Number(n) => n as usize,
    };
    match index.checked_sub(1).and_then(|i| ids.get(i)) {
        Some(id) => Ok((index as u32, *id)),
        None => {
            let shown = match version {
                Version::Latest => "latest".to_owned(),
                Version::Number(n) => n.to_string(),
            };
            Err(error(StatusCode::NOT_FOUND, 40402, &format!("Version {shown} not found.")))
        }
    }
}

/// The JSON of a stored schema, `schemaType` and `references` only when
/// they are not the defaults (as Confluent answers).
fn describe(stored: &Stored, mut out: serde_json::Map<String, Value>) -> Value {
    out.insert("schema".to_owned(), json!(stored.schema));
    if stored.schema_type != "AVRO" {
        out.insert("schemaType".to_owned(), json!(stored.schema_type));
    }
    if !stored.references.is_empty() {
        let references: Vec<Value> = stored
            .references
            .iter()
            .map(|r| json!({ "name": r.name, "subject": r.subject, "version": r.version }))
            .collect();
        out.insert("references".to_owned(), Value::Array(references));
    }
    Value::Object(out)
}

fn subject_version(subject: &str, version: u32, id: u32, stored: &Stored) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("subject".to_owned(), json!(subject));
    out.insert("version".to_owned(), json!(version));
    out.insert("id".to_owned(), json!(id));
    describe(stored, out)
}

type Answer = Result<Response, ApiError>;

async fn list_subjects(State(state): State<Shared>) -> Answer {
    let registry = lock(&state);
    Ok(ok(json!(registry.subjects.keys().collect::<Vec<_>>())))
}

async fn register(State(state): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Answer {
    let mut registry = lock(&state);
    let candidate = registry.candidate(&body)?;
    if let Some((_, id)) = registry.find(&subject, &candidate) {
        return Ok(ok(json!({ "id": id })));
    }
    let previous = registry.subjects.get(&subject).cloned().unwrap_or_default();
    if let Err(details) = registry.check(registry.level(&subject), &previous, &candidate) {
        return Err(error(
            StatusCode::CONFLICT,
            409,
            &format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", \
                 details: [{details}]"
            ),
        ));
    }
    let id = match registry.schemas.iter().position(|s| s.same_as(&candidate)) {
        Some(index) => index as u32 + 1,
        None => {
            registry.schemas.push(candidate);
            registry.schemas.len() as u32
        }
    };
    registry.subjects.entry(subject).or_default().push(id);
    Ok(ok(json!({ "id": id })))
}

async fn lookup(State(state): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Answer {
    let registry = lock(&state);
    if !registry.subjects.contains_key(&subject) {
        return Err(subject_not_found(&subject));
    }
    let candidate = registry.candidate(&body)?;
    let (version, id) =
        registry.find(&subject, &candidate).ok_or_else(|| error(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
    Ok(ok(subject_version(&subject, version, id, &candidate)))
}

async fn schema_by_id(State(state): State<Shared>, Path(id): Path<String>) -> Answer {
    let registry = lock(&state);
    let stored = id
        .parse::<u32>()
        .ok()
        .and_then(|n| registry.schema(n))
        .ok_or_else(|| error(StatusCode::NOT_FOUND, 40403, &format!("Schema {id} not found")))?;
    Ok(ok(describe(stored, serde_json::Map::new())))
}

async fn list_versions(State(state): State<Shared>, Path(subject): Path<String>) -> Answer {
    let registry = lock(&state);
    let ids = registry.subjects.get(&subject).ok_or_else(|| subject_not_found(&subject))?;
    Ok(ok(json!((1..=ids.len() as u32).collect::<Vec<_>>())))
}

async fn get_version(State(state): State<Shared>, Path((subject, version)): Path<(String, String)>) -> Answer {
    let registry = lock(&state);
    let (version, id) = resolve_version(&registry, &subject, &version)?;
    let stored = registry.schema(id).expect("versions point at stored schemas");
    Ok(ok(subject_version(&subject, version, id, stored)))
}

fn parse_level(body: &[u8]) -> Result<CompatibilityLevel, ApiError> {
    let level = serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get("compatibility")?.as_str()?.parse().ok());
    level.ok_or_else(|| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, \
             backward_transitive, forward_transitive, and full_transitive",
        )
    })
}

async fn get_global_config(State(state): State<Shared>) -> Answer {
    Ok(ok(json!({ "compatibilityLevel": lock(&state).global.as_str() })))
}

async fn put_global_config(State(state): State<Shared>, body: Bytes) -> Answer {
    let level = parse_level(&body)?;
    lock(&state).global = level;
    Ok(ok(json!({ "compatibility": level.as_str() })))
}

async fn get_subject_config(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    RawQuery(query): RawQuery,
) -> Answer {
    let registry = lock(&state);
    if let Some(level) = registry.configs.get(&subject) {
        return Ok(ok(json!({ "compatibilityLevel": level.as_str() })));
    }
    if query_flag(&query, "defaultToGlobal") {
        return Ok(ok(json!({ "compatibilityLevel": registry.global.as_str() })));
    }
    if registry.subjects.contains_key(&subject) {
        return Err(error(
            StatusCode::NOT_FOUND,
            40408,
            &format!("Subject '{subject}' does not have subject-level compatibility configured"),
        ));
    }
    Err(subject_not_found(&subject))
}

async fn put_subject_config(State(state): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Answer {
    let level = parse_level(&body)?;
    lock(&state).configs.insert(subject, level);
    Ok(ok(json!({ "compatibility": level.as_str() })))
}

fn compatibility_answer(result: Result<(), String>, verbose: bool) -> Answer {
    let mut out = json!({ "is_compatible": result.is_ok() });
    if verbose {
        out["messages"] = json!(result.err().into_iter().collect::<Vec<_>>());
    }
    Ok(ok(out))
}

async fn compatible_with_all(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Answer {
    let registry = lock(&state);
    let candidate = registry.candidate(&body)?;
    let previous = registry.subjects.get(&subject).cloned().unwrap_or_default();
    let result = registry.check(registry.level(&subject), &previous, &candidate);
    compatibility_answer(result, query_flag(&query, "verbose"))
}

async fn compatible_with_version(
    State(state): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Answer {
    let registry = lock(&state);
    let (_, id) = resolve_version(&registry, &subject, &version)?;
    let candidate = registry.candidate(&body)?;
    // Against that one version: a transitive level means its plain form.
    let level = match registry.level(&subject) {
        CompatibilityLevel::BackwardTransitive => CompatibilityLevel::Backward,
        CompatibilityLevel::ForwardTransitive => CompatibilityLevel::Forward,
        CompatibilityLevel::FullTransitive => CompatibilityLevel::Full,
        other => other,
    };
    let result = registry.check(level, &[id], &candidate);
    compatibility_answer(result, query_flag(&query, "verbose"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// One raw HTTP/1.1 exchange: (status, content type, JSON body).
    async fn call(registry: &RegistryStandIn, method: &str, path: &str, body: Option<Value>) -> (u16, String, Value) {
        let mut stream = tokio::net::TcpStream::connect(registry.addr).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {CONTENT_TYPE}\r\nAccept: {CONTENT_TYPE}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            registry.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
        (status, content_type, json)
    }

    fn record(name: &str, fields: Value) -> String {
        json!({ "type": "record", "name": name, "namespace": "t.v1", "fields": fields }).to_string()
    }

    fn v1() -> String {
        record("Thing", json!([{ "name": "id", "type": "string" }]))
    }

    fn v2_with_default() -> String {
        record("Thing", json!([{ "name": "id", "type": "string" }, { "name": "n", "type": "long", "default": 0 }]))
    }

    fn v2_without_default() -> String {
        record("Thing", json!([{ "name": "id", "type": "string" }, { "name": "n", "type": "long" }]))
    }

    fn schema_body(schema: &str) -> Option<Value> {
        Some(json!({ "schema": schema }))
    }

    #[tokio::test]
    async fn registering_gives_global_ids_and_versions() {
        let sr = RegistryStandIn::start().await;
        let (status, content_type, body) =
            call(&sr, "POST", "/subjects/t-t.v1.Thing/versions", schema_body(&v1())).await;
        assert_eq!((status, content_type.as_str(), &body), (200, CONTENT_TYPE, &json!({ "id": 1 })));
        // Same schema, other whitespace: same id, no new version.
        let spaced = serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v1()).unwrap()).unwrap();
        let (_, _, body) = call(&sr, "POST", "/subjects/t-t.v1.Thing/versions", schema_body(&spaced)).await;
        assert_eq!(body, json!({ "id": 1 }));
        // Same schema under another subject: same global id.
        let (_, _, body) = call(&sr, "POST", "/subjects/other/versions", schema_body(&v1())).await;
        assert_eq!(body, json!({ "id": 1 }));
        let (_, _, body) = call(&sr, "POST", "/subjects/t-t.v1.Thing/versions", schema_body(&v2_with_default())).await;
        assert_eq!(body, json!({ "id": 2 }));

        let (status, _, body) = call(&sr, "GET", "/subjects", None).await;
        assert_eq!((status, body), (200, json!(["other", "t-t.v1.Thing"])));
        let (_, _, body) = call(&sr, "GET", "/subjects/t-t.v1.Thing/versions", None).await;
        assert_eq!(body, json!([1, 2]));
        let (_, _, body) = call(&sr, "GET", "/subjects/t-t.v1.Thing/versions/1", None).await;
        assert_eq!(body, json!({ "subject": "t-t.v1.Thing", "version": 1, "id": 1, "schema": v1() }));
        for latest in ["latest", "-1"] {
            let (_, _, body) = call(&sr, "GET", &format!("/subjects/t-t.v1.Thing/versions/{latest}"), None).await;
            assert_eq!(body["version"], 2);
            assert_eq!(body["id"], 2);
        }
        let (status, _, body) = call(&sr, "GET", "/schemas/ids/2", None).await;
        assert_eq!((status, body), (200, json!({ "schema": v2_with_default() })));
    }

    #[tokio::test]
    async fn lookups_find_registered_schemas_only() {
        let sr = RegistryStandIn::start().await;
        call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
        let (status, _, body) = call(&sr, "POST", "/subjects/s", schema_body(&v1())).await;
        assert_eq!((status, body), (200, json!({ "subject": "s", "id": 1, "version": 1, "schema": v1() })));
        let (status, _, body) = call(&sr, "POST", "/subjects/s", schema_body(&v2_with_default())).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40403)));
        let (status, _, body) = call(&sr, "POST", "/subjects/nope", schema_body(&v1())).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40401)));
        assert_eq!(body["message"], "Subject 'nope' not found.");
    }

    #[tokio::test]
    async fn missing_things_answer_the_documented_codes() {
        let sr = RegistryStandIn::start().await;
        call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
        for (method, path, status, code) in [
            ("GET", "/subjects/nope/versions", 404, 40401),
            ("GET", "/subjects/nope/versions/1", 404, 40401),
            ("GET", "/subjects/s/versions/2", 404, 40402),
            ("GET", "/subjects/s/versions/0", 422, 42202),
            ("GET", "/subjects/s/versions/first", 422, 42202),
            ("GET", "/schemas/ids/99", 404, 40403),
            ("GET", "/schemas/ids/x", 404, 40403),
            ("GET", "/no/such/path", 404, 404),
            ("DELETE", "/subjects", 405, 405),
        ] {
            let (got, content_type, body) = call(&sr, method, path, None).await;
            assert_eq!((got, body["error_code"].as_u64()), (status, Some(code)), "{method} {path}: {body}");
            assert!(body["message"].is_string(), "{method} {path}: {body}");
            assert_eq!(content_type, CONTENT_TYPE);
        }
    }

    #[tokio::test]
    async fn invalid_schemas_are_422_42201() {
        let sr = RegistryStandIn::start().await;
        for body in [
            json!({ "schema": "{\"type\": \"record\"}" }),
            json!({ "schema": "not json" }),
            json!({ "schema": "{}", "schemaType": "XML" }),
            json!({ "schemaType": "AVRO" }),
            json!({ "schema": v1(), "references": [{ "name": "x", "subject": "nope", "version": 1 }] }),
        ] {
            let (status, _, answer) = call(&sr, "POST", "/subjects/s/versions", Some(body.clone())).await;
            assert_eq!((status, answer["error_code"].clone()), (422, json!(42201)), "{body}: {answer}");
        }
        let (status, _, _) = call(&sr, "GET", "/subjects/s/versions", None).await;
        assert_eq!(status, 404, "nothing was registered");
    }

    #[tokio::test]
    async fn incompatible_schemas_are_409() {
        let sr = RegistryStandIn::start().await;
        call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
        let (status, _, body) = call(&sr, "POST", "/subjects/s/versions", schema_body(&v2_without_default())).await;
        assert_eq!((status, body["error_code"].clone()), (409, json!(409)), "{body}");
        assert!(body["message"].as_str().unwrap().contains("incompatible"), "{body}");
        let (_, _, versions) = call(&sr, "GET", "/subjects/s/versions", None).await;
        assert_eq!(versions, json!([1]));
        // NONE lets it in.
        call(&sr, "PUT", "/config/s", Some(json!({ "compatibility": "NONE" }))).await;
        let (status, _, body) = call(&sr, "POST", "/subjects/s/versions", schema_body(&v2_without_default())).await;
        assert_eq!((status, body), (200, json!({ "id": 2 })));
    }

    #[tokio::test]
    async fn every_level_decides_as_documented() {
        // v1 → removing `id` (no default): BACKWARD yes, FORWARD no.
        let removed = record("Thing", json!([]));
        // v1 → adding `n` without default: BACKWARD no, FORWARD yes.
        let added = v2_without_default();
        let cases = [
            ("NONE", &removed, true),
            ("NONE", &added, true),
            ("BACKWARD", &removed, true),
            ("BACKWARD", &added, false),
            ("BACKWARD_TRANSITIVE", &removed, true),
            ("BACKWARD_TRANSITIVE", &added, false),
            ("FORWARD", &removed, false),
            ("FORWARD", &added, true),
            ("FORWARD_TRANSITIVE", &removed, false),
            ("FORWARD_TRANSITIVE", &added, true),
            ("FULL", &removed, false),
            ("FULL", &added, false),
            ("FULL_TRANSITIVE", &removed, false),
            ("FULL_TRANSITIVE", &added, false),
        ];
        for (level, candidate, compatible) in cases {
            let sr = RegistryStandIn::start().await;
            call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
            let (status, _, body) = call(&sr, "PUT", "/config/s", Some(json!({ "compatibility": level }))).await;
            assert_eq!((status, body), (200, json!({ "compatibility": level })));
            let (_, _, answer) =
                call(&sr, "POST", "/compatibility/subjects/s/versions/latest", schema_body(candidate)).await;
            assert_eq!(answer, json!({ "is_compatible": compatible }), "{level} {candidate}");
            let (_, _, answer) = call(&sr, "POST", "/compatibility/subjects/s/versions", schema_body(candidate)).await;
            assert_eq!(answer, json!({ "is_compatible": compatible }), "{level} {candidate}");
            let (status, _, _) = call(&sr, "POST", "/subjects/s/versions", schema_body(candidate)).await;
            assert_eq!(status, if compatible { 200 } else { 409 }, "{level} {candidate}");
        }
    }

    #[tokio::test]
    async fn transitive_levels_check_every_version() {
        // v1 (id) → v2 (id, n default 0) → v3 (id, n without default):
        // v3 reads v2 data, not v1 data.
        let v3 = v2_without_default();
        for (level, compatible) in [("BACKWARD", true), ("BACKWARD_TRANSITIVE", false)] {
            let sr = RegistryStandIn::start().await;
            call(&sr, "PUT", "/config", Some(json!({ "compatibility": level }))).await;
            call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
            call(&sr, "POST", "/subjects/s/versions", schema_body(&v2_with_default())).await;
            let (_, _, answer) =
                call(&sr, "POST", "/compatibility/subjects/s/versions?verbose=true", schema_body(&v3)).await;
            assert_eq!(answer["is_compatible"], compatible, "{level}: {answer}");
            assert_eq!(answer["messages"].as_array().unwrap().is_empty(), compatible, "{answer}");
            // Against version 1 alone it is incompatible whatever the level.
            let (_, _, answer) = call(&sr, "POST", "/compatibility/subjects/s/versions/1", schema_body(&v3)).await;
            assert_eq!(answer, json!({ "is_compatible": false }));
        }
    }

    #[tokio::test]
    async fn compatibility_checks_of_missing_subjects_and_versions() {
        let sr = RegistryStandIn::start().await;
        let (status, _, body) =
            call(&sr, "POST", "/compatibility/subjects/nope/versions/latest", schema_body(&v1())).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40401)));
        let (status, _, body) = call(&sr, "POST", "/compatibility/subjects/nope/versions", schema_body(&v1())).await;
        assert_eq!((status, body), (200, json!({ "is_compatible": true })));
        call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
        let (status, _, body) = call(&sr, "POST", "/compatibility/subjects/s/versions/7", schema_body(&v1())).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40402)));
        let (status, _, body) = call(&sr, "POST", "/compatibility/subjects/s/versions/zero", schema_body(&v1())).await;
        assert_eq!((status, body["error_code"].clone()), (422, json!(42202)));
        let (status, _, body) = call(&sr, "POST", "/compatibility/subjects/s/versions/1", schema_body("{")).await;
        assert_eq!((status, body["error_code"].clone()), (422, json!(42201)));
    }

    #[tokio::test]
    async fn config_global_and_per_subject() {
        let sr = RegistryStandIn::start().await;
        let (status, _, body) = call(&sr, "GET", "/config", None).await;
        assert_eq!((status, body), (200, json!({ "compatibilityLevel": "BACKWARD" })));
        let (status, _, body) = call(&sr, "PUT", "/config", Some(json!({ "compatibility": "full_transitive" }))).await;
        assert_eq!((status, body), (200, json!({ "compatibility": "FULL_TRANSITIVE" })));
        let (_, _, body) = call(&sr, "GET", "/config", None).await;
        assert_eq!(body, json!({ "compatibilityLevel": "FULL_TRANSITIVE" }));
        let (status, _, body) = call(&sr, "PUT", "/config", Some(json!({ "compatibility": "SIDEWAYS" }))).await;
        assert_eq!((status, body["error_code"].clone()), (422, json!(42203)));
        let (status, _, body) = call(&sr, "PUT", "/config", Some(json!({}))).await;
        assert_eq!((status, body["error_code"].clone()), (422, json!(42203)));

        let (status, _, body) = call(&sr, "GET", "/config/s", None).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40401)));
        call(&sr, "POST", "/subjects/s/versions", schema_body(&v1())).await;
        let (status, _, body) = call(&sr, "GET", "/config/s", None).await;
        assert_eq!((status, body["error_code"].clone()), (404, json!(40408)));
        let (_, _, body) = call(&sr, "GET", "/config/s?defaultToGlobal=true", None).await;
        assert_eq!(body, json!({ "compatibilityLevel": "FULL_TRANSITIVE" }));
        let (status, _, body) = call(&sr, "PUT", "/config/s", Some(json!({ "compatibility": "NONE" }))).await;
        assert_eq!((status, body), (200, json!({ "compatibility": "NONE" })));
        let (_, _, body) = call(&sr, "GET", "/config/s", None).await;
        assert_eq!(body, json!({ "compatibilityLevel": "NONE" }));
    }

    #[tokio::test]
    async fn protobuf_schemas_keep_their_references() {
        let sr = RegistryStandIn::start().await;
        let common = "syntax = \"proto3\";\npackage c.v1;\nmessage Money { int64 minor = 1; }\n";
        let body = json!({ "schema": common, "schemaType": "PROTOBUF" });
        let (_, _, answer) = call(&sr, "POST", "/subjects/c%2Fv1%2Fcommon.proto/versions", Some(body)).await;
        assert_eq!(answer, json!({ "id": 1 }));
        let orders = "syntax = \"proto3\";\nimport \"c/v1/common.proto\";\nmessage O { c.v1.Money m = 1; }\n";
        let references = json!([{ "name": "c/v1/common.proto", "subject": "c/v1/common.proto", "version": 1 }]);
        let body = json!({ "schema": orders, "schemaType": "PROTOBUF", "references": references });
        let (_, _, answer) = call(&sr, "POST", "/subjects/o.proto/versions", Some(body.clone())).await;
        assert_eq!(answer, json!({ "id": 2 }));
        let (_, _, answer) = call(&sr, "GET", "/schemas/ids/2", None).await;
        assert_eq!(answer, json!({ "schema": orders, "schemaType": "PROTOBUF", "references": references }));
        let (_, _, answer) = call(&sr, "POST", "/subjects/o.proto", Some(body)).await;
        assert_eq!(answer["version"], 1);
        assert_eq!(answer["id"], 2);
        let (_, _, subjects) = call(&sr, "GET", "/subjects", None).await;
        assert_eq!(subjects, json!(["c/v1/common.proto", "o.proto"]));
        // Without the reference it is another schema.
        let body = json!({ "schema": orders, "schemaType": "PROTOBUF" });
        let (status, _, answer) = call(&sr, "POST", "/subjects/o.proto", Some(body)).await;
        assert_eq!((status, answer["error_code"].clone()), (404, json!(40403)));
    }

    #[tokio::test]
    async fn a_malformed_request_is_400() {
        let sr = RegistryStandIn::start().await;
        let mut stream = tokio::net::TcpStream::connect(sr.addr).await.unwrap();
        let request =
            "POST /subjects/s/versions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{{{";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
        assert!(raw.contains("\"error_code\":400"), "{raw}");
    }
}
