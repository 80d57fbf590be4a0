use crate::model::ExpectedVersion;

/// A field of a request that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// Errors of the event log. Caller mistakes (conflicts, missing streams, bad
/// arguments) are distinct variants from technical failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wrong expected version on stream {stream}: expected {expected}, actual {}", display_version(*.actual))]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual: Option<u64> },
    #[error("stream {0} not found")]
    StreamNotFound(String),
    #[error("stream {0} is deleted")]
    StreamDeleted(String),
    #[error("stream {0} already exists")]
    StreamAlreadyExists(String),
    #[error("event id {event_id} is already stored")]
    DuplicateEventId { event_id: String },
    /// AIP-155: the request id was used before, in the same scope, for a
    /// different request; answering the first request's result would lie.
    #[error("request id {request_id} was already used for a different request")]
    RequestIdReused { request_id: String },
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage failure: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn display_version(version: Option<u64>) -> String {
    version.map_or_else(|| "no stream".to_owned(), |v| v.to_string())
}

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}
