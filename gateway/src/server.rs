//! The gateway's router: one handler for every binding, chosen by method
//! and path template (most specific first), which transcodes the request,
//! calls the service and transcodes the answer.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage};
use tonic::{client::Grpc, metadata::MetadataValue};

use crate::{
    error::ApiError,
    rules::{Binding, RuleError, bindings},
    transcode,
    upstream::{DynamicCodec, Upstreams},
};

/// Request headers passed on to the service as gRPC metadata.
const FORWARDED: [&str; 6] =
    ["authorization", "x-api-key", "x-request-id", "traceparent", "tracestate", CLIENT_ADDRESS_HEADER];

/// The caller's address as the gateway saw it (its TCP peer), for the
/// upstreams' per-address limits; the value a client sent is replaced, so
/// it cannot pose as another address. Upstreams believe it only from
/// their `[rate_limit] trusted_proxies`.
pub const CLIENT_ADDRESS_HEADER: &str = "x-forwarded-for";
/// Server streams over WebSocket: the stream's own path under this prefix.
pub const WEBSOCKET: &str = "/ws";
/// Where Swagger UI is served.
pub const DOCS: &str = "/docs";
/// The header that sets a call's deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-timeout-ms";
/// The longest deadline a caller may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// How the gateway behaves.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Deadline of a unary call without `X-Timeout-Ms`.
    pub default_timeout: Duration,
    /// Origins allowed to call from a browser (`*`: any); empty: no CORS.
    pub cors_origins: Vec<String>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self { max_body_bytes: 4 * 1024 * 1024, default_timeout: Duration::from_secs(30), cors_origins: Vec::new() }
    }
}

/// The CORS layer of `origins`, if any.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods(Any)
        .allow_headers(Any)
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        return Some(layer.allow_origin(Any));
    }
    let listed: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    Some(layer.allow_origin(AllowOrigin::list(listed)))
}

/// A descriptor set that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the descriptor set does not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error(transparent)]
    Rule(#[from] RuleError),
}

/// The REST gateway over the services of a descriptor set.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bindings: Vec<Binding>,
    /// The OpenAPI document, served at `/openapi.json`.
    openapi: Bytes,
    upstreams: Upstreams,
    options: GatewayOptions,
}

impl Gateway {
    /// A gateway for every annotated RPC of `descriptor_set` (an encoded
    /// `FileDescriptorSet`, the one the servers use for reflection).
    ///
    /// # Errors
    ///
    /// The set does not decode, or a rule in it cannot be served.
    pub fn new(descriptor_set: &[u8], upstreams: Upstreams, options: GatewayOptions) -> Result<Self, GatewayError> {
        let pool = DescriptorPool::decode(descriptor_set)?;
        let bindings = bindings(&pool)?;
        let openapi = Bytes::from(document_text(&pool)?);
        Ok(Self { inner: Arc::new(Inner { bindings, openapi, upstreams, options }) })
    }

    /// The bindings served, most specific first.
    pub fn bindings(&self) -> &[Binding] {
        &self.inner.bindings
    }

    /// The router: `GET /openapi.json`, Swagger UI at `/docs` (its files
    /// embedded, no CDN), and every other request to the binding that
    /// matches it; CORS for the configured origins.
    pub fn router(&self) -> Router {
        let docs = swagger_ui_dist::ApiDefinition {
            uri_prefix: DOCS,
            api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
            title: Some("eventfold REST API"),
        };
        let router = Router::new()
            .route("/openapi.json", axum::routing::get(openapi))
            .route(&format!("{WEBSOCKET}/{{*path}}"), axum::routing::get(websocket))
            .fallback(handle)
            .with_state(self.clone())
            .merge(swagger_ui_dist::generate_routes(docs));
        match cors(&self.inner.options.cors_origins) {
            Some(layer) => router.layer(layer),
            None => router,
        }
    }
}

/// The OpenAPI 3.1 document of the gateway over `descriptor_set`, as
/// served at `/openapi.json` and printed by `eventfold openapi`.
///
/// # Errors
///
/// The set does not decode, or a rule in it cannot be served.
pub fn openapi_json(descriptor_set: &[u8]) -> Result<String, GatewayError> {
    document_text(&DescriptorPool::decode(descriptor_set)?)
}

fn document_text(pool: &DescriptorPool) -> Result<String, GatewayError> {
    let document = crate::openapi::document(pool, "eventfold", env!("CARGO_PKG_VERSION"))?;
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    Ok(text)
}

async fn openapi(State(gateway): State<Gateway>) -> Response {
    let mut response = Response::new(Body::from(gateway.inner.openapi.clone()));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Transcodes one REST call, counted in
/// `eventfold_http_server_requests_total{operation, status}` and timed (to
/// the response's head; a stream's length is the client's choice) in
/// `eventfold_http_server_request_duration_seconds{operation}`. `operation`
/// is the RPC's operation id, or `unmatched` for a path no RPC serves (a
/// bounded label whatever paths clients invent).
async fn handle(State(gateway): State<Gateway>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let mut operation = None;
    let response = match transcode_call(&gateway.inner, request, &mut operation).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let operation = operation.unwrap_or_else(|| "unmatched".to_owned());
    metrics::histogram!("eventfold_http_server_request_duration_seconds", "operation" => operation.clone())
        .record(started.elapsed());
    let status = response.status().as_u16().to_string();
    metrics::counter!("eventfold_http_server_requests_total", "operation" => operation, "status" => status)
        .increment(1);
    response
}

/// The fields a request path binds: (field path, value).
type Bound = Vec<(String, String)>;

/// The binding for `method` and `path`, with the path's bindings; 405 when
/// the path is served under another method, 404 when not at all.
fn route<'a>(inner: &'a Inner, method: &http::Method, path: &str) -> Result<(&'a Binding, Bound), ApiError> {
    let mut allowed = Vec::new();
    for binding in &inner.bindings {
        if let Some(bound) = binding.template.matches(path) {
            if binding.method == *method {
                return Ok((binding, bound));
            }
            allowed.push(binding.method.clone());
        }
    }
    if !allowed.is_empty() {
        return Err(ApiError::method_not_allowed(method, path, &allowed));
    }
    Err(ApiError::new(tonic::Code::NotFound, "NOT_FOUND", format!("no operation at {path}")))
}

/// A call of `binding` with `message`, ready to send: the client, the RPC
/// path, the codec, and the call with the forwarded headers.
struct Call {
    grpc: Grpc<tonic::transport::Channel>,
    path: http::uri::PathAndQuery,
    codec: DynamicCodec,
    request: tonic::Request<DynamicMessage>,
    timeout: Option<Duration>,
}

async fn prepare(
    inner: &Inner,
    binding: &Binding,
    message: DynamicMessage,
    headers: &HeaderMap,
) -> Result<Call, ApiError> {
    let service = binding.rpc.parent_service().full_name().to_owned();
    let channel = inner.upstreams.channel(&service).ok_or_else(|| {
        ApiError::new(tonic::Code::Unimplemented, "NO_UPSTREAM", format!("{service} is not served by this gateway"))
    })?;
    let mut request = tonic::Request::new(message);
    forward_headers(headers, request.metadata_mut());
    let timeout = requested_timeout(headers)?;
    let path = http::uri::PathAndQuery::try_from(transcode::rpc_path(binding))
        .map_err(|_| ApiError::new(tonic::Code::Internal, "BAD_RPC_PATH", "the RPC has no valid path"))?;
    let codec = DynamicCodec::new(binding.rpc.output());
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|_| ApiError::from_status(&tonic::Status::unavailable("the service is unavailable, retry later")))?;
    Ok(Call { grpc, path, codec, request, timeout })
}

/// Opens the server stream of `binding` (its deadline only if asked for).
async fn open_stream(
    inner: &Inner,
    binding: &Binding,
    message: DynamicMessage,
    headers: &HeaderMap,
) -> Result<tonic::Streaming<DynamicMessage>, ApiError> {
    let Call { mut grpc, path, codec, mut request, timeout } = prepare(inner, binding, message, headers).await?;
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let answer = grpc.server_streaming(request, path, codec).await.map_err(|s| ApiError::from_status(&s))?;
    Ok(answer.into_inner())
}

/// Replaces what the client sent as [`CLIENT_ADDRESS_HEADER`] with the
/// address of its connection (when served with connect info), or removes
/// it.
fn set_client_address(headers: &mut HeaderMap, extensions: &http::Extensions) {
    headers.remove(CLIENT_ADDRESS_HEADER);
    let peer = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|info| info.0.ip());
    if let Some(value) = peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()) {
        headers.insert(CLIENT_ADDRESS_HEADER, value);
    }
}

/// Transcodes `request`; `operation` is set to the operation id of the
/// RPC it calls once its route is found.
async fn transcode_call(inner: &Inner, request: Request, operation: &mut Option<String>) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    set_client_address(&mut parts.headers, &parts.extensions);
    let (binding, bound) = route(inner, &parts.method, parts.uri.path())?;
    *operation = Some(binding.operation_id());
    let limit = inner.options.max_body_bytes;
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(ApiError::payload_too_large(limit));
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::payload_too_large(limit))?;
    let mut message = transcode::request(binding, bound, parts.uri.query(), &body)?;
    if binding.server_streaming() {
        let resume = resume_after(&mut message, &parts.headers)?;
        let stream = open_stream(inner, binding, message, &parts.headers).await?;
        return Ok(stream_response(binding.clone(), resume, &parts.headers, stream));
    }
    let Call { mut grpc, path, codec, mut request, timeout } = prepare(inner, binding, message, &parts.headers).await?;
    request.set_timeout(timeout.unwrap_or(inner.options.default_timeout));
    let answer = grpc.unary(request, path, codec).await.map_err(|s| ApiError::from_status(&s))?;
    let json = transcode::response(binding, answer.get_ref());
    Ok(json_response(StatusCode::OK, &json))
}

fn json_response(status: StatusCode, json: &serde_json::Value) -> Response {
    let mut response = (status, json.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn forward_headers(headers: &HeaderMap, metadata: &mut tonic::metadata::MetadataMap) {
    for name in FORWARDED {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok())
            && let Ok(value) = MetadataValue::try_from(value)
        {
            metadata.insert(name, value);
        }
    }
}

fn requested_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let millis = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0 && u128::from(ms) <= MAX_TIMEOUT.as_millis())
        .ok_or_else(|| {
            ApiError::invalid_argument(
                "X-Timeout-Ms",
                format!("a whole number of milliseconds, 1 to {}", MAX_TIMEOUT.as_millis()),
            )
        })?;
    Ok(Some(Duration::from_millis(millis)))
}

/// A server stream over WebSocket (`GET /ws/<the stream's path>`): one
/// text message per stream message, in the JSON of the REST answer; a
/// failure of the stream is sent as one text message in the JSON error
/// shape, then the socket closes. Errors before the stream opens are
/// ordinary HTTP answers. `Last-Event-ID` resumes as for SSE.
async fn websocket(
    State(gateway): State<Gateway>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
    uri: http::Uri,
    extensions: http::Extensions,
    mut headers: HeaderMap,
) -> Response {
    set_client_address(&mut headers, &extensions);
    let inner = &gateway.inner;
    let path = uri.path().strip_prefix(WEBSOCKET).unwrap_or_default();
    let opened = async {
        let (binding, bound) = route(inner, &http::Method::GET, path)?;
        if !binding.server_streaming() {
            return Err(ApiError::new(
                tonic::Code::InvalidArgument,
                "NOT_A_STREAM",
                format!("{} answers once: call it without {WEBSOCKET}", binding.operation_id()),
            ));
        }
        let mut message = transcode::request(binding, bound, uri.query(), &[])?;
        resume_after(&mut message, &headers)?;
        let stream = open_stream(inner, binding, message, &headers).await?;
        Ok((binding.clone(), stream))
    };
    let (binding, mut stream) = match opened.await {
        Ok(opened) => opened,
        Err(error) => return error.into_response(),
    };
    upgrade.on_upgrade(move |mut socket| async move {
        use axum::extract::ws::Message;
        loop {
            tokio::select! {
                item = stream.next() => {
                    let text = match item {
                        Some(Ok(message)) => transcode::response(&binding, &message).to_string(),
                        Some(Err(status)) => {
                            let _ = socket.send(Message::Text(ApiError::from_status(&status).body().to_string().into())).await;
                            break;
                        }
                        None => break,
                    };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                received = socket.recv() => match received {
                    // The client left: stop the stream.
                    None | Some(Err(_) | Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = socket.send(Message::Close(None)).await;
    })
}

/// The header a reconnecting SSE client (`EventSource`) sends with the last
/// `id:` it received.
const LAST_EVENT_ID: &str = "last-event-id";

/// How a server stream is resumed after a reconnect: which number of its
/// messages is the SSE `id:`, and which request field `Last-Event-ID` sets.
/// The stream delivers what follows that number, so nothing comes twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The global log: `id:` is the message's global position (its own
    /// `globalPosition`/`position` or that of the message it wraps),
    /// `Last-Event-ID` sets `from_position`.
    Position,
    /// One stream (the request names it in `stream_id` and has
    /// `from_version`): `id:` is the event's `version`, `Last-Event-ID` sets
    /// `from_version`. Messages without a version (checkpoints, caught-up
    /// markers, which carry global positions) get no `id:`, so the client
    /// keeps the last version it saw.
    Version,
}

impl Resume {
    /// The resume rule of a stream opened with `request`, if it has one.
    fn of(request: &DynamicMessage) -> Option<Resume> {
        let descriptor = request.descriptor();
        let is_u64 = |field: &prost_reflect::FieldDescriptor| {
            matches!(field.kind(), prost_reflect::Kind::Uint64) && !field.is_list()
        };
        let one_stream = descriptor
            .get_field_by_name("stream_id")
            .is_some_and(|field| request.get_field(&field).as_str().is_some_and(|id| !id.is_empty()));
        if one_stream && descriptor.get_field_by_name("from_version").is_some_and(|f| is_u64(&f)) {
            return Some(Resume::Version);
        }
        descriptor.get_field_by_name("from_position").is_some_and(|f| is_u64(&f)).then_some(Resume::Position)
    }

    /// The request field `Last-Event-ID` sets.
    fn field(self) -> &'static str {
        match self {
            Resume::Position => "from_position",
            Resume::Version => "from_version",
        }
    }

    /// The `id:` of a stream message: its own number, or that of the
    /// message it wraps (an event, a checkpoint), as a decimal string. Read
    /// from the message, not its JSON, where a zero is left out.
    fn event_id(self, message: &DynamicMessage) -> Option<String> {
        let names: &[&str] = match self {
            Resume::Position => &["global_position", "position"],
            Resume::Version => &["version"],
        };
        let own = |message: &DynamicMessage| {
            let descriptor = message.descriptor();
            names.iter().find_map(|name| {
                let field = descriptor.get_field_by_name(name)?;
                if field.is_list() {
                    return None;
                }
                message.get_field(&field).as_u64().map(|n| n.to_string())
            })
        };
        own(message).or_else(|| {
            message.fields().find_map(|(_, value)| match value {
                prost_reflect::Value::Message(inner) => own(inner),
                _ => None,
            })
        })
    }
}

/// `Last-Event-ID: N` on a stream with a resume rule: resume after N.
fn resume_after(message: &mut DynamicMessage, headers: &HeaderMap) -> Result<Option<Resume>, ApiError> {
    let resume = Resume::of(message);
    let (Some(value), Some(resume)) = (headers.get(LAST_EVENT_ID), resume) else {
        return Ok(resume);
    };
    let number = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
        let what = match resume {
            Resume::Position => "a position (an unsigned integer)",
            Resume::Version => "a stream version (an unsigned integer)",
        };
        ApiError::invalid_argument("Last-Event-ID", what)
    })?;
    if let Some(field) = message.descriptor().get_field_by_name(resume.field()) {
        message.set_field(&field, prost_reflect::Value::U64(number));
    }
    Ok(Some(resume))
}

/// A server stream as Server-Sent Events (`Accept: text/event-stream`; a
/// message that carries a position has it as its `id:`) or
/// newline-delimited JSON; a failure ends it with an error frame in the
/// shape of the JSON error.
fn stream_response(
    binding: Binding,
    resume: Option<Resume>,
    headers: &HeaderMap,
    stream: tonic::Streaming<DynamicMessage>,
) -> Response {
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.split(',').any(|a| a.trim().starts_with("text/event-stream")));
    let frames = stream.map(move |item| {
        let frame = match item {
            Ok(message) => {
                let json = transcode::response(&binding, &message);
                // A stream without a resume field (a watch, which starts
                // with the current state) still tags positions.
                match (sse, resume.unwrap_or(Resume::Position).event_id(&message)) {
                    (true, Some(id)) => format!("id: {id}\ndata: {json}\n\n"),
                    (true, None) => format!("data: {json}\n\n"),
                    (false, _) => format!("{json}\n"),
                }
            }
            Err(status) => {
                let error = ApiError::from_status(&status).body();
                if sse { format!("event: error\ndata: {error}\n\n") } else { format!("{error}\n") }
            }
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(frame))
    });
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    let mut response = Response::new(Body::from_stream(frames));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
