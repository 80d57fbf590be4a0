//! Why a command failed. Business rejections, invalid input, conflicts and
//! technical failures are different variants: each becomes a different
//! gRPC code at the edge, through the one `From<Error> for Status` below.

use std::sync::Arc;

use eventfold_domain::{Reason, Rejection, Violation};
use eventfold_platform::status::{error_info, from_store, internal_because, invalid_argument};
use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The command is malformed (`INVALID_ARGUMENT`).
    #[error("invalid command: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Violation>),
    /// A business rule refused it (`FAILED_PRECONDITION`).
    #[error("{reason}: {message}")]
    Rejected { reason: Reason, message: String },
    /// The stream kept moving under the command, even after its retries
    /// (`ABORTED`).
    #[error("concurrent change of {stream}: expected version {expected}, found {actual}")]
    Conflict { stream: String, expected: String, actual: String },
    /// The principal may not send this command (`PERMISSION_DENIED`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The store failed (mapped to a status like every store error; shared
    /// so that the bus can answer one error more than once).
    #[error("{0}")]
    Store(Arc<eventfold_store::Error>),
    /// A stored event or snapshot the code cannot read (`INTERNAL`).
    #[error("cannot read stored data: {0}")]
    Corrupt(String),
}

impl From<eventfold_store::Error> for Error {
    fn from(error: eventfold_store::Error) -> Self {
        match error {
            eventfold_store::Error::WrongExpectedVersion { stream, expected, actual } => Error::Conflict {
                stream,
                expected: expected.to_string(),
                actual: actual.map_or_else(|| "no stream".to_owned(), |v| v.to_string()),
            },
            other => Error::Store(Arc::new(other)),
        }
    }
}

impl From<Rejection> for Error {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::Invalid(violations) => Error::Invalid(violations),
            Rejection::Rule { reason, message } => Error::Rejected { reason, message },
        }
    }
}

/// The AIP-193 status of each error. `INTERNAL` and `UNAVAILABLE` carry a
/// generic message and an error id; what failed goes to the log under the
/// same id.
impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Invalid(violations) => invalid_argument(violations.into_iter().map(|v| (v.field, v.description))),
            Error::Rejected { reason, message } => error_info(Code::FailedPrecondition, message, reason.as_str(), &[]),
            Error::Conflict { stream, expected, actual } => error_info(
                Code::Aborted,
                message,
                "WRONG_EXPECTED_VERSION",
                &[("stream", stream), ("expected", expected), ("actual", actual)],
            ),
            Error::PermissionDenied(_) => error_info(Code::PermissionDenied, message, "PERMISSION_DENIED", &[]),
            Error::Store(e) => from_store(&*e),
            // Which event could not be read, and why, is for the log (under
            // the answer's error id), not for the client.
            Error::Corrupt(_) => internal_because("CORRUPT_DATA", &message),
        }
    }
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Rejected { .. } => "rejected",
            Error::Conflict { .. } => "conflict",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Store(e) if matches!(**e, eventfold_store::Error::Unavailable(_)) => "unavailable",
            Error::Store(_) => "store",
            Error::Corrupt(_) => "corrupt",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
