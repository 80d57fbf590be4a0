//! Saga orchestration for eventfold: the order fulfilment saga (reserve
//! inventory → authorize payment → create a shipping label → confirm the
//! order, compensated in reverse) and the money transfer saga (withdraw →
//! deposit, refunding the source on failure).
//!
//! OVERVIEW: [`model`] is each saga as a pure state machine (which step
//! next, retries with backoff and jitter, compensation in reverse, stable
//! idempotency keys per saga and step); [`ports`] is the payment provider
//! and the carrier behind traits, with sandbox adapters whose failures are
//! chosen by their input (`tok_decline`, `tok_timeout`, `tok_flaky`,
//! `fail_label`); [`store`] keeps saga instances in PostgreSQL, saved with
//! the version they were read at and found again by due time; [`intake`]
//! starts a fulfilment saga for every `OrderCreated` with a payment token
//! (a projection, so it runs on the log or on Kafka); [`steps`] is what
//! each step sends to the command side and the ports; [`orchestrator`]
//! runs the due steps, with their deadlines on record; [`grpc`] is the
//! `SagaService` (and the one mapping of [`Error`] to a gRPC status);
//! [`error`] is its one error type and [`config`] is `[saga]`. The process hosts the service on its gRPC
//! server ([`grpc::host`]) and runs the orchestrator (and, in memory, the
//! intake) under its supervisor, with its token.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

pub mod config;
pub mod error;
pub mod events;
pub mod grpc;
pub mod intake;
pub mod model;
pub mod orchestrator;
pub mod ports;
pub mod repo;
pub mod steps;
pub mod store;

pub use crate::{
    config::SagaConfig,
    error::{Error, Result},
    intake::SagaIntake,
    model::{Next, Outcome, RetryPolicy, SagaState, SagaType, Status, Step},
    orchestrator::{Orchestrator, OrchestratorConfig},
    ports::{Authorization, Carrier, Label, PaymentProvider, SandboxCarrier, SandboxConfig, SandboxPayments},
    repo::{Claim, MemorySagas, Repository},
    steps::{CommandSender, Fulfilment, FulfilmentData},
};

/// Describes the sagas' metrics (the `# HELP` lines of `/metrics`) and
/// registers the parked counter at zero.
pub fn describe_metrics() {
    metrics::describe_counter!("eventfold_sagas_started_total", "Sagas started, by type");
    metrics::describe_counter!(
        "eventfold_sagas_finished_total",
        "Sagas finished, by type and outcome (completed, compensated, failed)"
    );
    metrics::describe_histogram!("eventfold_saga_step_seconds", "Latency of saga steps, by step, in seconds");
    metrics::describe_counter!(
        "eventfold_saga_retries_total",
        "Saga steps retried after a transient failure or timeout"
    );
    metrics::describe_counter!("eventfold_saga_parked_total", "Sagas parked because their data could not be read");
    metrics::counter!("eventfold_saga_parked_total").increment(0);
}
