//! The event log of eventfold: one [`EventLog`] trait, its adapters
//! (in memory, in local files and in PostgreSQL), gap-safe subscriptions, upcasting of old
//! event versions and the per-stream SHA-256 hash chain. Every adapter passes the same conformance suite
//! (`tests/conformance.rs`).

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

pub mod backoff;
#[cfg(all(unix, feature = "blob"))]
pub mod blob;
pub mod error;
pub mod failpoint;
#[cfg(unix)]
pub mod fs;
pub mod hash;
mod log;
pub mod memory;
pub mod metered;
pub mod model;
pub mod pg;
pub mod postgres;
pub mod source;
pub mod subscription;
pub mod supervise;
pub mod upcast;

#[cfg(all(unix, feature = "blob"))]
pub use crate::blob::{BlobConfig, BlobEventLog};
#[cfg(unix)]
pub use crate::fs::{FsConfig, FsEventLog, Fsync, Recovery};
pub use crate::{
    backoff::Backoff,
    error::{Error, FieldViolation, Result},
    log::EventLog,
    memory::MemoryEventLog,
    metered::Metered,
    model::*,
    pg::{Database, DatabaseOptions, PgPool, TlsMode, install_crypto_provider},
    postgres::{PostgresConfig, PostgresEventLog, Tables},
    source::{EventSource, LogSource, Pulled, SourceError},
    subscription::{SubscriptionMessage, SubscriptionOptions, Subscriptions, Target},
    upcast::{Upcasters, Upcasting},
};
