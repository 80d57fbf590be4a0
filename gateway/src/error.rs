//! The gateway's error answers.
//!
//! Every error leaves the gateway in Google's JSON error shape:
//!
//! ```json
//! {"error": {"code": 400, "message": "...", "status": "INVALID_ARGUMENT", "details": [ ... ]}}
//! ```
//!
//! `code` is the HTTP status, `status` the name of the gRPC code and `details`
//! the `google.rpc.Status.details` of the upstream answer (read from the
//! `grpc-status-details-bin` trailer), each written as proto3 JSON with its
//! `"@type"`. The standard `google.rpc` detail messages are decoded with
//! `tonic_types`; any other detail is echoed as `{"@type", "value"}` with the
//! value in base64.
//!
//! The HTTP status follows the mapping in the comments of
//! `google/rpc/code.proto` (see [`http_status`]), except for two answers the
//! gateway makes itself and that have no exact gRPC counterpart:
//!
//! - [`ApiError::payload_too_large`]: HTTP 413, status `RESOURCE_EXHAUSTED`,
//!   reason `BODY_TOO_LARGE`;
//! - [`ApiError::method_not_allowed`]: HTTP 405, status `UNIMPLEMENTED`,
//!   reason `METHOD_NOT_ALLOWED`.
//!
//! What is echoed is bounded: at most [`MAX_DETAILS`] details, at most
//! [`MAX_ITEMS`] entries in each repeated field or map of a detail, and every
//! string (the message included) cut to at most [`MAX_STRING_BYTES`] bytes on
//! a char boundary. The bytes of an unknown detail are cut so that their
//! base64 text stays within [`MAX_STRING_BYTES`].

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{HeaderValue, StatusCode, header};
use prost::Message as _;
use serde_json::{Map, Value, json};
use tonic::Code;
use tonic_types::{ErrorDetail, RpcStatusExt as _};

/// The domain of the `ErrorInfo` details the gateway makes itself.
pub const DOMAIN: &str = "eventfold.dev";

/// At most this many details are echoed.
pub const MAX_DETAILS: usize = 20;

/// At most this many entries of a repeated field or a map inside one detail
/// are echoed.
pub const MAX_ITEMS: usize = 20;

/// Every echoed string is cut to at most this many bytes.
pub const MAX_STRING_BYTES: usize = 1024;

/// Raw bytes of an unknown detail echoed at most: their base64 text is then
/// at most [`MAX_STRING_BYTES`] long (4 characters for every 3 bytes).
const MAX_RAW_BYTES: usize = MAX_STRING_BYTES / 4 * 3;

/// An error answer of the gateway.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: Code,
    message: String,
    details: Vec<Value>,
    /// The HTTP status when it is not the one of `code` (413, 405).
    http_override: Option<StatusCode>,
    /// The delay of the first `RetryInfo` detail, for `Retry-After`.
    retry_delay: Option<Duration>,
    /// The methods a 405's path is served under, for `Allow`.
    allow: Option<HeaderValue>,
}

impl ApiError {
    /// `code`, `message` and `details`, with the HTTP status of `code`.
    fn plain(code: Code, message: String, details: Vec<Value>) -> ApiError {
        ApiError { code, message, details, http_override: None, retry_delay: None, allow: None }
    }

    /// From an upstream status: its code, its message and the details decoded
    /// from `grpc-status-details-bin` (`google.rpc.Status.details`), in their
    /// order. Details that cannot be read at all (the trailer is not a
    /// `google.rpc.Status`) are left out.
    ///
    /// A status the channel made from a transport failure (it carries the
    /// failure as its source: the connection was refused, reset, or closed
    /// by a TLS alert) is `UNAVAILABLE`, whatever code the channel gave it
    /// (a reset stream comes as `CANCELLED`, which would read as the caller's
    /// own doing), and its text stays out of the answer.
    pub fn from_status(status: &tonic::Status) -> ApiError {
        if std::error::Error::source(status).is_some()
            && matches!(status.code(), Code::Cancelled | Code::Unknown | Code::Internal)
        {
            return ApiError::plain(
                Code::Unavailable,
                "the service is unavailable, retry later".to_owned(),
                Vec::new(),
            );
        }
        let mut details = Vec::new();
        let mut retry_delay = None;
        if !status.details().is_empty()
            && let Ok(rpc) = tonic_types::Status::decode(status.details())
        {
            for any in rpc.details.into_iter().take(MAX_DETAILS) {
                let (value, delay) = detail_json(any);
                if retry_delay.is_none() {
                    retry_delay = delay;
                }
                details.push(value);
            }
        }
        ApiError { retry_delay, ..ApiError::plain(status.code(), truncate(status.message()), details) }
    }

    /// A 400 `INVALID_ARGUMENT` made by the gateway (bad JSON, unknown field,
    /// wrong type, missing path variable): message
    /// `invalid argument: {field}: {description}` (`invalid argument:
    /// {description}` when `field` is empty, for errors about the whole
    /// body), a `BadRequest` detail naming the field and an `ErrorInfo` with
    /// reason `INVALID_ARGUMENT` and domain `eventfold.dev`.
    pub fn invalid_argument(field: impl Into<String>, description: impl Into<String>) -> ApiError {
        let field = truncate(&field.into());
        let description = truncate(&description.into());
        let message = if field.is_empty() {
            format!("invalid argument: {description}")
        } else {
            format!("invalid argument: {field}: {description}")
        };
        let bad_request = json!({
            "@type": tonic_types::BadRequest::TYPE_URL,
            "fieldViolations": [{"field": field, "description": description}],
        });
        ApiError::plain(
            Code::InvalidArgument,
            truncate(&message),
            vec![bad_request, own_error_info("INVALID_ARGUMENT", Map::new())],
        )
    }

    /// Any code with a plain message and an `ErrorInfo` detail with `reason`
    /// and domain `eventfold.dev`, e.g.
    /// `ApiError::new(Code::NotFound, "NOT_FOUND", "no route for GET /x")`.
    pub fn new(code: Code, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError::plain(code, truncate(&message.into()), vec![own_error_info(reason, Map::new())])
    }

    /// HTTP 413: the request body is larger than `limit` bytes. The JSON
    /// `status` is `RESOURCE_EXHAUSTED` (the code whose meaning is closest,
    /// "some resource has been exhausted"), the `ErrorInfo` reason
    /// `BODY_TOO_LARGE` with the limit in its metadata (`"limit"`).
    pub fn payload_too_large(limit: usize) -> ApiError {
        let mut metadata = Map::new();
        metadata.insert("limit".to_owned(), Value::String(limit.to_string()));
        ApiError {
            http_override: Some(StatusCode::PAYLOAD_TOO_LARGE),
            ..ApiError::plain(
                Code::ResourceExhausted,
                format!("request body is larger than {limit} bytes"),
                vec![own_error_info("BODY_TOO_LARGE", metadata)],
            )
        }
    }

    /// HTTP 405: `path` exists, but not with `method`. The JSON `status` is
    /// `UNIMPLEMENTED`, the `ErrorInfo` reason `METHOD_NOT_ALLOWED` with the
    /// `allowed` methods in its metadata (`allow`) and in the `Allow` header.
    pub fn method_not_allowed(method: &http::Method, path: &str, allowed: &[http::Method]) -> ApiError {
        let mut names: Vec<&str> = allowed.iter().map(http::Method::as_str).collect();
        names.sort_unstable();
        names.dedup();
        let allow = names.join(", ");
        let mut metadata = Map::new();
        metadata.insert("allow".to_owned(), Value::String(allow.clone()));
        ApiError {
            http_override: Some(StatusCode::METHOD_NOT_ALLOWED),
            allow: HeaderValue::from_str(&allow).ok(),
            ..ApiError::plain(
                Code::Unimplemented,
                truncate(&format!("method {method} is not allowed for {path}")),
                vec![own_error_info("METHOD_NOT_ALLOWED", metadata)],
            )
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The HTTP status: the one of the code (see [`http_status`]), or 413 /
    /// 405 for [`ApiError::payload_too_large`] / [`ApiError::method_not_allowed`].
    pub fn http_status(&self) -> StatusCode {
        self.http_override.unwrap_or_else(|| http_status(self.code))
    }

    /// The JSON body value.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "code": self.http_status().as_u16(),
                "message": self.message,
                "status": code_name(self.code),
                "details": self.details,
            }
        })
    }

    /// The value of a `Retry-After` header: for `UNAVAILABLE` (503) and
    /// `RESOURCE_EXHAUSTED` (429, e.g. a rate limit) with a `RetryInfo`
    /// delay, its whole seconds rounded up.
    fn retry_after(&self) -> Option<u64> {
        if !matches!(self.code, Code::Unavailable | Code::ResourceExhausted) {
            return None;
        }
        let delay = self.retry_delay?;
        let seconds = delay.as_secs();
        Some(if delay.subsec_nanos() > 0 { seconds.saturating_add(1) } else { seconds })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match serde_json::to_vec(&self.body()) {
            Ok(bytes) => bytes,
            // A `Value` always serializes; keep a valid answer all the same.
            Err(_) => br#"{"error":{"code":500,"message":"","status":"INTERNAL","details":[]}}"#.to_vec(),
        };
        let mut response = (self.http_status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, allow);
        }
        response
    }
}

/// Google's mapping of gRPC codes to HTTP statuses (comments of
/// `google/rpc/code.proto`).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        // 499 "Client Closed Request" has no constant in `http`.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The name of a gRPC code as in `google/rpc/code.proto`: `"INVALID_ARGUMENT"` etc.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
    }
}

/// An `ErrorInfo` detail of the gateway itself.
fn own_error_info(reason: &str, metadata: Map<String, Value>) -> Value {
    let mut info = json!({
        "@type": tonic_types::ErrorInfo::TYPE_URL,
        "reason": truncate(reason),
        "domain": DOMAIN,
        "metadata": metadata,
    });
    omit_defaults(&mut info);
    info
}

/// Leaves out what proto3 JSON leaves out: empty strings, lists and maps,
/// zeros and `false` (as the gRPC side's JSON does, so that both read the
/// same).
fn omit_defaults(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(omit_defaults);
            map.retain(|_, v| match v {
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::Null => false,
            });
        }
        Value::Array(items) => items.iter_mut().for_each(omit_defaults),
        _ => {}
    }
}

/// One detail as JSON, with the delay when it is a `RetryInfo`.
///
/// The known types are decoded by `tonic_types` (one `Any` at a time, so that
/// the order is kept and an unknown or undecodable one falls back to base64
/// instead of dropping the others).
fn detail_json(any: prost_types::Any) -> (Value, Option<Duration>) {
    let single = tonic_types::Status { code: 0, message: String::new(), details: vec![any] };
    let decoded = single.check_error_details_vec().ok().and_then(|mut details| details.pop());
    match decoded.and_then(known_detail_json) {
        Some((mut known, delay)) => {
            omit_defaults(&mut known);
            (known, delay)
        }
        None => {
            let any = single.details.into_iter().next().unwrap_or_default();
            let raw = any.value.get(..MAX_RAW_BYTES).unwrap_or(&any.value);
            (json!({"@type": truncate(&any.type_url), "value": BASE64.encode(raw)}), None)
        }
    }
}

/// The proto3 JSON of a standard detail (defaults are left out afterwards,
/// by [`omit_defaults`]). `None` for a kind this code does
/// not know (the enum is non-exhaustive).
fn known_detail_json(detail: ErrorDetail) -> Option<(Value, Option<Duration>)> {
    let mut delay = None;
    let value = match detail {
        ErrorDetail::BadRequest(d) => {
            let violations: Vec<Value> = d
                .field_violations
                .iter()
                .take(MAX_ITEMS)
                .map(|v| {
                    let mut o = Map::new();
                    o.insert("field".to_owned(), text(&v.field));
                    o.insert("description".to_owned(), text(&v.description));
                    if !v.reason.is_empty() {
                        o.insert("reason".to_owned(), text(&v.reason));
                    }
                    if let Some(loc) = &v.localized_message {
                        o.insert(
                            "localizedMessage".to_owned(),
                            json!({"locale": text(&loc.locale), "message": text(&loc.message)}),
                        );
                    }
                    Value::Object(o)
                })
                .collect();
            json!({"@type": tonic_types::BadRequest::TYPE_URL, "fieldViolations": violations})
        }
        ErrorDetail::ErrorInfo(d) => json!({
            "@type": tonic_types::ErrorInfo::TYPE_URL,
            "reason": text(&d.reason),
            "domain": text(&d.domain),
            "metadata": string_map(&d.metadata),
        }),
        ErrorDetail::RetryInfo(d) => {
            let mut o = Map::new();
            o.insert("@type".to_owned(), Value::String(tonic_types::RetryInfo::TYPE_URL.to_owned()));
            if let Some(retry) = d.retry_delay {
                o.insert("retryDelay".to_owned(), Value::String(duration_json(retry)));
                delay = Some(retry);
            }
            Value::Object(o)
        }
        ErrorDetail::ResourceInfo(d) => json!({
            "@type": tonic_types::ResourceInfo::TYPE_URL,
            "resourceType": text(&d.resource_type),
            "resourceName": text(&d.resource_name),
            "owner": text(&d.owner),
            "description": text(&d.description),
        }),
        ErrorDetail::PreconditionFailure(d) => {
            let violations: Vec<Value> = d
                .violations
                .iter()
                .take(MAX_ITEMS)
                .map(|v| json!({"type": text(&v.r#type), "subject": text(&v.subject), "description": text(&v.description)}))
                .collect();
            json!({"@type": tonic_types::PreconditionFailure::TYPE_URL, "violations": violations})
        }
        ErrorDetail::QuotaFailure(d) => {
            let violations: Vec<Value> = d
                .violations
                .iter()
                .take(MAX_ITEMS)
                .map(|v| {
                    let mut o = Map::new();
                    o.insert("subject".to_owned(), text(&v.subject));
                    o.insert("description".to_owned(), text(&v.description));
                    if !v.api_service.is_empty() {
                        o.insert("apiService".to_owned(), text(&v.api_service));
                    }
                    if !v.quota_metric.is_empty() {
                        o.insert("quotaMetric".to_owned(), text(&v.quota_metric));
                    }
                    if !v.quota_id.is_empty() {
                        o.insert("quotaId".to_owned(), text(&v.quota_id));
                    }
                    if !v.quota_dimensions.is_empty() {
                        o.insert("quotaDimensions".to_owned(), string_map(&v.quota_dimensions));
                    }
                    // int64 is a JSON string in proto3 JSON.
                    if v.quota_value != 0 {
                        o.insert("quotaValue".to_owned(), Value::String(v.quota_value.to_string()));
                    }
                    if let Some(future) = v.futura_quota_value {
                        o.insert("futureQuotaValue".to_owned(), Value::String(future.to_string()));
                    }
                    Value::Object(o)
                })
                .collect();
            json!({"@type": tonic_types::QuotaFailure::TYPE_URL, "violations": violations})
        }
        ErrorDetail::Help(d) => {
            let links: Vec<Value> = d
                .links
                .iter()
                .take(MAX_ITEMS)
                .map(|l| json!({"description": text(&l.description), "url": text(&l.url)}))
                .collect();
            json!({"@type": tonic_types::Help::TYPE_URL, "links": links})
        }
        ErrorDetail::LocalizedMessage(d) => json!({
            "@type": tonic_types::LocalizedMessage::TYPE_URL,
            "locale": text(&d.locale),
            "message": text(&d.message),
        }),
        ErrorDetail::DebugInfo(d) => {
            let entries: Vec<Value> = d.stack_entries.iter().take(MAX_ITEMS).map(|e| text(e)).collect();
            json!({"@type": tonic_types::DebugInfo::TYPE_URL, "stackEntries": entries, "detail": text(&d.detail)})
        }
        ErrorDetail::RequestInfo(d) => json!({
            "@type": tonic_types::RequestInfo::TYPE_URL,
            "requestId": text(&d.request_id),
            "servingData": text(&d.serving_data),
        }),
        _ => return None,
    };
    Some((value, delay))
}

/// A map of strings, keys in order, at most [`MAX_ITEMS`] entries.
fn string_map(map: &std::collections::HashMap<String, String>) -> Value {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let object: Map<String, Value> =
        keys.into_iter().take(MAX_ITEMS).map(|k| (truncate(k), text(map.get(k).map_or("", String::as_str)))).collect();
    Value::Object(object)
}

/// A proto3 JSON `Duration`: seconds with 0, 3, 6 or 9 fraction digits, then `s`.
fn duration_json(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        format!("{seconds}s")
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{seconds}.{:03}s", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{seconds}.{:06}s", nanos / 1_000)
    } else {
        format!("{seconds}.{nanos:09}s")
    }
}

/// A bounded JSON string.
fn text(s: &str) -> Value {
    Value::String(truncate(s))
}

/// `s` cut to at most [`MAX_STRING_BYTES`] bytes, on a char boundary.
fn truncate(s: &str) -> String {
    if s.len() <= MAX_STRING_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_STRING_BYTES;
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tonic_types::{
        BadRequest, DebugInfo, ErrorDetails, ErrorInfo, Help, LocalizedMessage, PreconditionFailure, QuotaFailure,
        RequestInfo, ResourceInfo, RetryInfo, StatusExt as _,
    };

    const ALL: [(Code, u16, &str); 17] = [
        (Code::Ok, 200, "OK"),
        (Code::Cancelled, 499, "CANCELLED"),
        (Code::Unknown, 500, "UNKNOWN"),
        (Code::InvalidArgument, 400, "INVALID_ARGUMENT"),
        (Code::DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
        (Code::NotFound, 404, "NOT_FOUND"),
        (Code::AlreadyExists, 409, "ALREADY_EXISTS"),
        (Code::PermissionDenied, 403, "PERMISSION_DENIED"),
        (Code::ResourceExhausted, 429, "RESOURCE_EXHAUSTED"),
        (Code::FailedPrecondition, 400, "FAILED_PRECONDITION"),
        (Code::Aborted, 409, "ABORTED"),
        (Code::OutOfRange, 400, "OUT_OF_RANGE"),
        (Code::Unimplemented, 501, "UNIMPLEMENTED"),
        (Code::Internal, 500, "INTERNAL"),
        (Code::Unavailable, 503, "UNAVAILABLE"),
        (Code::DataLoss, 500, "DATA_LOSS"),
        (Code::Unauthenticated, 401, "UNAUTHENTICATED"),
    ];

    fn status_with_anys(code: Code, message: &str, details: Vec<prost_types::Any>) -> tonic::Status {
        let rpc = tonic_types::Status { code: code as i32, message: message.to_owned(), details };
        tonic::Status::with_details(code, message, Bytes::from(rpc.encode_to_vec()))
    }

    async fn response_parts(err: ApiError) -> (StatusCode, http::HeaderMap, Bytes) {
        let response = err.into_response();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, bytes)
    }

    #[test]
    fn every_code_maps_to_its_http_status_and_name() {
        for i in 0..=16 {
            // Every code tonic knows is in the table.
            assert!(ALL.iter().any(|(c, _, _)| *c == Code::from_i32(i)), "code {i}");
        }
        for (code, http, name) in ALL {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
            assert_eq!(code_name(code), name, "{code:?}");
            let err = ApiError::from_status(&tonic::Status::new(code, "m"));
            assert_eq!(err.code(), code);
            assert_eq!(err.http_status().as_u16(), http);
            assert_eq!(
                err.body(),
                json!({"error": {"code": http, "message": "m", "status": name, "details": []}}),
                "{code:?}"
            );
        }
    }

    #[test]
    fn status_with_bad_request_error_info_and_retry_info_gives_exact_body() {
        let mut details = ErrorDetails::with_bad_request(vec![
            tonic_types::FieldViolation::new("name", "must not be empty"),
            tonic_types::FieldViolation::new("items[0].qty", "must be positive"),
        ]);
        details.set_error_info(
            "STREAM_CONFLICT",
            "eventstore.eventfold.dev",
            [("stream".to_owned(), "order-1".to_owned())],
        );
        details.set_retry_info(Some(Duration::from_millis(1500)));
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad order", details);
        let err = ApiError::from_status(&status);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.http_status(), StatusCode::BAD_REQUEST);
        // ErrorDetails encodes in the order retry, ..., error info, ..., bad request.
        assert_eq!(
            err.body(),
            json!({"error": {
                "code": 400,
                "message": "bad order",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.500s"},
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "STREAM_CONFLICT",
                     "domain": "eventstore.eventfold.dev", "metadata": {"stream": "order-1"}},
                    {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                        {"field": "name", "description": "must not be empty"},
                        {"field": "items[0].qty", "description": "must be positive"},
                    ]},
                ],
            }})
        );
    }

    #[test]
    fn details_keep_their_order_from_a_vec() {
        let status = tonic::Status::with_error_details_vec(
            Code::NotFound,
            "gone",
            vec![
                ErrorDetail::from(BadRequest::with_violation("id", "unknown")),
                ErrorDetail::from(ErrorInfo::new("NOT_FOUND", "d", std::collections::HashMap::new())),
            ],
        );
        let body = ApiError::from_status(&status).body();
        let details = body["error"]["details"].as_array().unwrap();
        assert_eq!(details[0]["@type"], "type.googleapis.com/google.rpc.BadRequest");
        assert_eq!(details[1]["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
        assert!(details[1].get("metadata").is_none(), "empty maps are left out, as proto3 JSON does");
    }

    #[test]
    fn the_other_standard_details_are_decoded() {
        let status = tonic::Status::with_error_details_vec(
            Code::FailedPrecondition,
            "nope",
            vec![
                ResourceInfo::new("order", "orders/1", "tenant-a", "the order").into(),
                PreconditionFailure::with_violation("STATE", "orders/1", "order is closed").into(),
                QuotaFailure::with_violation("tenant:a", "too many streams").into(),
                Help::with_link("docs", "https://eventfold.dev/docs").into(),
                LocalizedMessage::new("fr-FR", "commande fermée").into(),
                DebugInfo::new(vec!["a.rs:1".to_owned(), "b.rs:2".to_owned()], "boom").into(),
                RequestInfo::new("req-1", "s").into(),
            ],
        );
        assert_eq!(
            ApiError::from_status(&status).body()["error"]["details"],
            json!([
                {"@type": "type.googleapis.com/google.rpc.ResourceInfo", "resourceType": "order",
                 "resourceName": "orders/1", "owner": "tenant-a", "description": "the order"},
                {"@type": "type.googleapis.com/google.rpc.PreconditionFailure", "violations": [
                    {"type": "STATE", "subject": "orders/1", "description": "order is closed"}]},
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"subject": "tenant:a", "description": "too many streams"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                    {"description": "docs", "url": "https://eventfold.dev/docs"}]},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "fr-FR",
                 "message": "commande fermée"},
                {"@type": "type.googleapis.com/google.rpc.DebugInfo", "stackEntries": ["a.rs:1", "b.rs:2"],
                 "detail": "boom"},
                {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "req-1", "servingData": "s"},
            ])
        );
    }

    #[test]
    fn quota_violation_extra_fields_when_set() {
        let mut v = tonic_types::QuotaViolation::new("s", "d");
        v.api_service = "api".to_owned();
        v.quota_metric = "m".to_owned();
        v.quota_id = "q".to_owned();
        v.quota_dimensions.insert("region".to_owned(), "eu".to_owned());
        v.quota_value = 10;
        v.futura_quota_value = Some(20);
        let status = tonic::Status::with_error_details_vec(
            Code::ResourceExhausted,
            "q",
            vec![QuotaFailure::new(vec![v]).into()],
        );
        assert_eq!(
            ApiError::from_status(&status).body()["error"]["details"][0]["violations"][0],
            json!({"subject": "s", "description": "d", "apiService": "api", "quotaMetric": "m", "quotaId": "q",
                   "quotaDimensions": {"region": "eu"}, "quotaValue": "10", "futureQuotaValue": "20"})
        );
    }

    #[test]
    fn unknown_any_detail_is_echoed_in_base64_in_order() {
        let unknown =
            prost_types::Any { type_url: "type.googleapis.com/acme.Thing".to_owned(), value: vec![0, 1, 2, 250, 255] };
        let info = prost_types::Any {
            type_url: tonic_types::ErrorInfo::TYPE_URL.to_owned(),
            value: tonic_types::pb::ErrorInfo {
                reason: "R".to_owned(),
                domain: "D".to_owned(),
                metadata: Default::default(),
            }
            .encode_to_vec(),
        };
        let status = status_with_anys(Code::Internal, "oops", vec![unknown, info]);
        assert_eq!(
            ApiError::from_status(&status).body(),
            json!({"error": {"code": 500, "message": "oops", "status": "INTERNAL", "details": [
                {"@type": "type.googleapis.com/acme.Thing", "value": "AAEC+v8="},
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "R", "domain": "D"},
            ]}})
        );
    }

    #[test]
    fn known_type_that_does_not_decode_falls_back_to_base64() {
        let broken =
            prost_types::Any { type_url: tonic_types::BadRequest::TYPE_URL.to_owned(), value: vec![0xff, 0xff] };
        let status = status_with_anys(Code::InvalidArgument, "x", vec![broken]);
        assert_eq!(
            ApiError::from_status(&status).body()["error"]["details"],
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest", "value": "//8="}])
        );
    }

    #[test]
    fn undecodable_details_trailer_gives_no_details() {
        let status = tonic::Status::with_details(Code::Aborted, "conflict", Bytes::from_static(&[0xff, 0x01]));
        let err = ApiError::from_status(&status);
        assert_eq!(
            err.body(),
            json!({"error": {"code": 409, "message": "conflict", "status": "ABORTED", "details": []}})
        );
    }

    #[test]
    fn details_and_strings_are_bounded() {
        let anys: Vec<prost_types::Any> = (0..30)
            .map(|i| prost_types::Any { type_url: format!("type.googleapis.com/x.T{i}"), value: vec![7; 2000] })
            .collect();
        // 1023 ASCII bytes then a 2-byte char: the cut falls inside it.
        let message = format!("{}é{}", "a".repeat(1023), "b".repeat(100));
        let status = status_with_anys(Code::Internal, &message, anys);
        let body = ApiError::from_status(&status).body();
        let details = body["error"]["details"].as_array().unwrap();
        assert_eq!(details.len(), MAX_DETAILS);
        assert_eq!(details[19]["@type"], "type.googleapis.com/x.T19");
        let value = details[0]["value"].as_str().unwrap();
        assert_eq!(value.len(), MAX_STRING_BYTES);
        assert_eq!(BASE64.decode(value).unwrap(), vec![7; MAX_RAW_BYTES]);
        assert_eq!(body["error"]["message"].as_str().unwrap(), "a".repeat(1023));

        let long = "é".repeat(600); // 1200 bytes
        let status = tonic::Status::with_error_details_vec(
            Code::InvalidArgument,
            "m",
            vec![
                BadRequest::new(
                    (0..25).map(|_| tonic_types::FieldViolation::new(long.clone(), "d")).collect::<Vec<_>>(),
                )
                .into(),
            ],
        );
        let body = ApiError::from_status(&status).body();
        let violations = body["error"]["details"][0]["fieldViolations"].as_array().unwrap();
        assert_eq!(violations.len(), MAX_ITEMS);
        assert_eq!(violations[0]["field"].as_str().unwrap(), "é".repeat(512));
    }

    #[test]
    fn duration_json_uses_proto3_fraction_widths() {
        assert_eq!(duration_json(Duration::from_secs(3)), "3s");
        assert_eq!(duration_json(Duration::from_millis(1500)), "1.500s");
        assert_eq!(duration_json(Duration::from_micros(2_000_001)), "2.000001s");
        assert_eq!(duration_json(Duration::from_nanos(1)), "0.000000001s");
    }

    #[test]
    fn invalid_argument_body() {
        let err = ApiError::invalid_argument("order.items", "expected an array, found a string");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            err.body(),
            json!({"error": {
                "code": 400,
                "message": "invalid argument: order.items: expected an array, found a string",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                        {"field": "order.items", "description": "expected an array, found a string"}]},
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT",
                     "domain": "eventfold.dev"},
                ],
            }})
        );
        let whole = ApiError::invalid_argument("", "body is not JSON");
        assert_eq!(whole.body()["error"]["message"], "invalid argument: body is not JSON");
        assert_eq!(whole.body()["error"]["details"][0]["fieldViolations"][0]["field"], "");
    }

    #[test]
    fn new_has_the_code_and_an_error_info() {
        let err = ApiError::new(Code::NotFound, "NOT_FOUND", "no route for GET /x");
        assert_eq!(err.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(
            err.body(),
            json!({"error": {"code": 404, "message": "no route for GET /x", "status": "NOT_FOUND", "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "NOT_FOUND",
                 "domain": "eventfold.dev"}]}})
        );
    }

    #[test]
    fn payload_too_large_is_413() {
        let err = ApiError::payload_too_large(1_048_576);
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            err.body(),
            json!({"error": {"code": 413, "message": "request body is larger than 1048576 bytes",
                "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "BODY_TOO_LARGE",
                 "domain": "eventfold.dev", "metadata": {"limit": "1048576"}}]}})
        );
    }

    #[tokio::test]
    async fn method_not_allowed_is_405_with_allow() {
        let allowed = [http::Method::POST, http::Method::GET, http::Method::POST];
        let err = ApiError::method_not_allowed(&http::Method::DELETE, "/v1/orders", &allowed);
        assert_eq!(err.code(), Code::Unimplemented);
        assert_eq!(err.http_status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            err.body(),
            json!({"error": {"code": 405, "message": "method DELETE is not allowed for /v1/orders",
                "status": "UNIMPLEMENTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "METHOD_NOT_ALLOWED",
                 "domain": "eventfold.dev", "metadata": {"allow": "GET, POST"}}]}})
        );
        let (status, headers, _) = response_parts(err).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET, POST");
    }

    #[tokio::test]
    async fn into_response_has_status_content_type_and_body() {
        let err = ApiError::new(Code::PermissionDenied, "DENIED", "no");
        let expected = serde_json::to_vec(&err.body()).unwrap();
        let (status, headers, bytes) = response_parts(err).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert_eq!(bytes.as_ref(), expected.as_slice());
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed["error"]["status"], "PERMISSION_DENIED");

        let (status, _, bytes) = response_parts(ApiError::payload_too_large(10)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap()["error"]["code"], 413);

        let (status, _, _) = response_parts(ApiError::from_status(&tonic::Status::cancelled("c"))).await;
        assert_eq!(status.as_u16(), 499);

        // The same code made by the channel from a broken connection: 503,
        // without the transport's text.
        let mut reset = tonic::Status::cancelled("operation was canceled");
        reset.set_source(std::sync::Arc::new(std::io::Error::other("tls: certificate required")));
        let (status, _, bytes) = response_parts(ApiError::from_status(&reset)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["status"], "UNAVAILABLE", "{body}");
        assert!(!body.to_string().contains("canceled") && !body.to_string().contains("tls"), "{body}");
    }

    #[tokio::test]
    async fn retry_after_for_unavailable_or_resource_exhausted_with_retry_info() {
        let unavailable = |delay: Duration| {
            tonic::Status::with_error_details_vec(Code::Unavailable, "later", vec![RetryInfo::new(Some(delay)).into()])
        };
        let (status, headers, _) =
            response_parts(ApiError::from_status(&unavailable(Duration::from_millis(1500)))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "2");
        let (_, headers, _) = response_parts(ApiError::from_status(&unavailable(Duration::from_secs(3)))).await;
        assert_eq!(headers[header::RETRY_AFTER], "3");

        // A rate limit: 429, and a delay under a second is still 1 s.
        let limited = tonic::Status::with_error_details_vec(
            Code::ResourceExhausted,
            "rate limit",
            vec![RetryInfo::new(Some(Duration::from_millis(250))).into()],
        );
        let (status, headers, _) = response_parts(ApiError::from_status(&limited)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[header::RETRY_AFTER], "1");

        // Neither: no header, though the detail is echoed.
        let busy = tonic::Status::with_error_details_vec(
            Code::Aborted,
            "retry",
            vec![RetryInfo::new(Some(Duration::from_secs(1))).into()],
        );
        let (_, headers, bytes) = response_parts(ApiError::from_status(&busy)).await;
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap()["error"]["details"][0]["retryDelay"], "1s");

        // UNAVAILABLE without a RetryInfo: no header.
        let (_, headers, _) = response_parts(ApiError::from_status(&tonic::Status::unavailable("down"))).await;
        assert!(headers.get(header::RETRY_AFTER).is_none());
    }
}
