//! The one error type of the saga crate: what the store, the orchestrator,
//! the command side and the ports fail with. Business answers (a step
//! refused, a saga not found, an operator's change that does not apply)
//! are variants of their own, apart from technical failures; the
//! `SagaService` turns each into its gRPC status in [`crate::grpc`].

use crate::model::Status;

/// See the module documentation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement failed (the connection, or the SQL).
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// No connection in time, or the lifecycle events could not be
    /// appended (nothing was saved then).
    #[error(transparent)]
    Store(#[from] eventfold_store::Error),
    /// Someone else saved the saga since it was read.
    #[error("saga {saga_id} changed since version {expected}")]
    Conflict { saga_id: String, expected: i64 },
    /// A saga's stored state, data or history cannot be read or written.
    #[error("saga {saga_id}: {message}")]
    Corrupt { saga_id: String, message: String },
    #[error("no saga {saga_id}")]
    NotFound { saga_id: String },
    /// An operator's retry of a saga with no refused compensation.
    #[error("saga {saga_id} has no refused compensation to retry")]
    NotRetryable { saga_id: String, status: Status },
    /// An operator's abort of a saga that is not running.
    #[error("saga {saga_id} is not running")]
    NotRunning { saga_id: String, status: Status },
    /// The command side, the payment provider or the carrier refused for
    /// good; `reason` is an UPPER_SNAKE_CASE code.
    #[error("refused: {reason}")]
    Refused { reason: String },
    /// The command side, the payment provider or the carrier is away,
    /// overloaded, …: worth a retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
