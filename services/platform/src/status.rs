//! AIP-193 statuses: every error answer carries one `ErrorInfo` with an
//! UPPER_SNAKE_CASE reason in eventfold's domain; invalid arguments add
//! `BadRequest` field violations. The one mapping of store errors lives
//! here so that every service answers the same failure the same way.

use std::{borrow::Borrow, collections::HashMap};

use eventfold_store::{Error, FieldViolation};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The error domain of every `ErrorInfo` eventfold returns.
pub const ERROR_DOMAIN: &str = "eventfold.dev";

/// A status with an `ErrorInfo{reason, domain, metadata}`.
pub fn error_info(code: Code, message: impl Into<String>, reason: &str, metadata: &[(&str, String)]) -> Status {
    let metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata))
}

/// How many field violations an answer carries, and how many its message
/// repeats: answers travel in HTTP/2 headers, which clients cap (16 KiB by
/// default), so what a hostile request makes us echo is bounded.
pub const MAX_VIOLATIONS: usize = 10;
const MAX_VIOLATIONS_IN_MESSAGE: usize = 3;
/// Bytes kept of a field path or a description (a field path may hold a
/// client's map key).
pub const MAX_VIOLATION_TEXT: usize = 128;

/// `text` cut to at most [`MAX_VIOLATION_TEXT`] bytes on a character
/// boundary, marked with `…` when cut.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_VIOLATION_TEXT {
        let mut end = MAX_VIOLATION_TEXT.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// `INVALID_ARGUMENT` with one `BadRequest` violation per `(field,
/// description)`: the first [`MAX_VIOLATIONS`], each text cut to
/// [`MAX_VIOLATION_TEXT`] bytes.
pub fn invalid_argument(violations: impl IntoIterator<Item = (String, String)>) -> Status {
    let mut all = violations.into_iter();
    let violations: Vec<(String, String)> =
        all.by_ref().take(MAX_VIOLATIONS).map(|(field, description)| (bounded(field), bounded(description))).collect();
    let more = all.count();
    let mut listed: Vec<String> =
        violations.iter().take(MAX_VIOLATIONS_IN_MESSAGE).map(|(f, d)| format!("{f}: {d}")).collect();
    let unlisted = violations.len().saturating_sub(MAX_VIOLATIONS_IN_MESSAGE).saturating_add(more);
    if unlisted > 0 {
        listed.push(format!("{unlisted} more"));
    }
    let message = format!("invalid argument: {}", listed.join("; "));
    let mut details = ErrorDetails::new();
    details.set_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, HashMap::new());
    for (field, description) in violations {
        details.add_bad_request_violation(field, description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// [`invalid_argument`] for store field violations.
pub fn invalid(violations: Vec<FieldViolation>) -> Status {
    invalid_argument(violations.into_iter().map(|v| (v.field, v.description)))
}

/// `UNAVAILABLE` for a dependency failure: the client learns only that it
/// may retry; the failure itself (driver text, addresses, SQL) goes to the
/// log under an error id that the answer carries.
pub fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Status {
    let id = uuid::Uuid::now_v7().to_string();
    tracing::warn!(error_id = %id, error = %error, "{what} unavailable");
    error_info(
        Code::Unavailable,
        format!("{what} is unavailable, retry later (error id {id})"),
        "STORAGE_UNAVAILABLE",
        &[("error_id", id)],
    )
}

/// `INTERNAL` with a generic message; the failure goes to the log under an
/// error id that the answer carries.
pub fn internal(error: &dyn std::fmt::Display) -> Status {
    internal_because("INTERNAL", error)
}

/// [`internal`] with a more precise reason (e.g. `CORRUPT_DATA`).
pub fn internal_because(reason: &str, error: &dyn std::fmt::Display) -> Status {
    let id = uuid::Uuid::now_v7().to_string();
    tracing::error!(error_id = %id, reason, error = %error, "internal error");
    error_info(Code::Internal, format!("internal error (error id {id})"), reason, &[("error_id", id)])
}

/// The one mapping of store errors to gRPC statuses (owned or borrowed).
pub fn from_store(error: impl Borrow<Error>) -> Status {
    let error = error.borrow();
    let message = error.to_string();
    match error {
        Error::WrongExpectedVersion { stream, expected, actual } => error_info(
            Code::Aborted,
            message,
            "WRONG_EXPECTED_VERSION",
            &[
                ("stream", stream.clone()),
                ("expected", expected.to_string()),
                ("actual", actual.map_or_else(|| "no stream".to_owned(), |v| v.to_string())),
            ],
        ),
        Error::StreamNotFound(stream) => {
            error_info(Code::NotFound, message, "STREAM_NOT_FOUND", &[("stream", stream.clone())])
        }
        Error::StreamDeleted(stream) => {
            error_info(Code::NotFound, message, "STREAM_DELETED", &[("stream", stream.clone())])
        }
        Error::StreamAlreadyExists(stream) => {
            error_info(Code::AlreadyExists, message, "STREAM_ALREADY_EXISTS", &[("stream", stream.clone())])
        }
        Error::DuplicateEventId { event_id } => {
            error_info(Code::AlreadyExists, message, "DUPLICATE_EVENT_ID", &[("event_ids", event_id.clone())])
        }
        Error::RequestIdReused { request_id } => {
            error_info(Code::AlreadyExists, message, "REQUEST_ID_REUSED", &[("request_id", request_id.clone())])
        }
        Error::InvalidArgument(violations) => {
            invalid_argument(violations.iter().map(|v| (v.field.clone(), v.description.clone())))
        }
        Error::Unavailable(detail) => unavailable("the event store", detail),
        Error::Internal(detail) => internal(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_invalid_argument_echoes_is_bounded() {
        let key = "ключ".repeat(1000);
        let violations = (0..50).map(|i| (format!("state.{key}{i}"), "numbers must be finite".to_owned()));
        let status = invalid_argument(violations);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS);
        for v in &bad.field_violations {
            assert!(v.field.len() <= MAX_VIOLATION_TEXT && v.field.ends_with('…'), "{}", v.field);
            assert!(v.field.starts_with("state.ключ"));
        }
        assert!(status.message().len() < 1024, "{}", status.message().len());
        assert!(status.message().ends_with("; 47 more"), "{}", status.message());
        assert!(status.details().len() < 4096, "{}", status.details().len());

        let few = invalid_argument([("stream_id".to_owned(), "must not be empty".to_owned())]);
        assert_eq!(few.message(), "invalid argument: stream_id: must not be empty");
    }
}
