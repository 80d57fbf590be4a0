//! What can go wrong in a query, and the one way each failure is answered
//! (see `From<Error> for Status` in `grpc.rs`).

use std::time::Duration;

use eventfold_store::FieldViolation;

/// The errors of the query side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The read database cannot be reached, or sheds load, or shuts down:
    /// worth a retry.
    #[error("the read model's database is unavailable: {0}")]
    Unavailable(String),
    /// The database answers but a read model's table does not exist: its
    /// projection has not created it yet.
    #[error("a read model is not built yet: {0}")]
    NotReady(String),
    /// A read-your-writes wait ended before the projection reached the
    /// position asked for.
    #[error(
        "the {projection} read model is at position {position} and did not reach min_position {min_position} \
         within {waited:?}; retry later"
    )]
    ProjectionBehind { projection: String, position: u64, min_position: u64, waited: Duration },
    /// `min_position` lies past the end of the log: no write has answered
    /// it, so no wait could reach it.
    #[error("min_position {min_position} is past the end of the event log (position {head})")]
    BeyondHead { min_position: u64, head: u64 },
    /// Fields of the request that cannot be answered, each with why.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The entity asked for does not exist (`reason` is the ErrorInfo
    /// reason, e.g. `ORDER_NOT_FOUND`).
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, reason: &'static str, id: String },
    /// The order exists, but did not yet at the time or version asked for.
    #[error("order {id} did not exist at the time or version asked for")]
    OrderNotFoundAt { id: String },
    /// The event store failed (GetOrderAt reads it).
    #[error("event store: {0}")]
    Store(eventfold_store::Error),
    /// A failure that is a bug or bad data: an SQL error, a row or an event
    /// that does not decode.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl Error {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The violations found, if any.
    pub(crate) fn check(violations: Vec<FieldViolation>) -> Result<()> {
        if violations.is_empty() { Ok(()) } else { Err(Self::InvalidArgument(violations)) }
    }
}

/// A database failure: a read model not built yet, a lost connection and a
/// server that sheds load or shuts down are retryable, anything else is
/// internal. The driver's text (with the SQLSTATE) is kept for the log.
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let text = describe_db(&error);
        if error.code() == Some(&SqlState::UNDEFINED_TABLE) {
            return Self::NotReady(text);
        }
        // Classes 08 (connection), 53 (insufficient resources), 57P
        // (operator intervention: shutdown, crash recovery); no code: the
        // connection, not the statement, failed.
        let transient = error.code().is_none_or(|code| {
            let code = code.code();
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
        });
        if error.is_closed() || transient { Self::Unavailable(text) } else { Self::Internal(text) }
    }
}

/// The driver's whole account of `error` for the log: the server's
/// message with its SQLSTATE, or the error and its causes (the driver's
/// own `Display` says only "db error" or "error deserializing column 7").
pub(crate) fn describe_db(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
        for (label, value) in [("detail", db.detail()), ("hint", db.hint())] {
            if let Some(value) = value {
                text.push_str(&format!("; {label}: {value}"));
            }
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl From<eventfold_store::Error> for Error {
    fn from(error: eventfold_store::Error) -> Self {
        Self::Store(error)
    }
}
