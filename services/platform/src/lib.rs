//! The runtime and plumbing every eventfold process shares: the resources
//! it holds (`runtime::Resources`: PostgreSQL pools built once, one per
//! purpose), its tasks and their stop (`runtime::Runtime`, `supervise`, one
//! `Backoff`), the one gRPC server builder (`server::GrpcServer`: health,
//! reflection and every hosted service), the admin HTTP listener, the
//! layered configuration loader (the only code that reads the environment),
//! logging, and the edge helpers (AIP-193 statuses, AIP-158 pages, request
//! guards).

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod guard;
pub mod input;
pub mod metrics;
pub mod page;
pub mod ratelimit;
pub mod readiness;
pub mod runtime;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod watchers;

/// Errors of the platform plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot set up logging: {0}")]
    Logging(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
