//! The projection engine of eventfold: read models in PostgreSQL (schema
//! `read`), each kept in step with the global log by a [`Projector`].
//!
//! OVERVIEW: a [`Projection`] says which tables a version of it has and how
//! one event changes them. The [`Projector`] reads the log gap-safely after
//! its checkpoint, applies a batch in one transaction and moves the
//! checkpoint (`projections.checkpoints`) in that same transaction: a crash
//! at any point neither loses nor double-applies an event. An event that
//! keeps failing is parked (`projections.parked`) and the projection goes
//! on. Versions build side by side; the public views show the active one.
//! A process runs each projection's active version with [`run_active`]
//! under the platform's supervisor; [`admin`] is the operator's side.

mod accounts;
pub mod admin;
mod analytics;
mod config;
mod engine;
mod inventory;
mod orders;
mod users;

pub use crate::{
    accounts::AccountViews,
    admin::{Status, reset, set_stopped, status},
    analytics::OrderAnalytics,
    config::{ProjectorConfig, SourceKind},
    engine::{
        Attach, COMMIT_CHANNEL, Commit, CommitObserver, Projector, ProjectorOptions, lock_checkpoint, run_active,
    },
    inventory::{DEFAULT_LOW_STOCK_THRESHOLD, InventoryViews},
    orders::OrderViews,
    users::UserActivity,
};

use std::sync::Arc;

use async_trait::async_trait;
use eventfold_domain::DomainEvent;
use eventfold_store::{EventFilter, RecordedEvent};
use tokio_postgres::Transaction;

/// Every projection of eventfold, in its default configuration.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(OrderViews),
        Arc::new(InventoryViews::default()),
        Arc::new(OrderAnalytics),
        Arc::new(AccountViews),
        Arc::new(UserActivity),
    ]
}

/// The projection of [`all`] named `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Event(String),
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] eventfold_store::Error),
    #[error("event source: {0}")]
    Source(#[from] eventfold_store::SourceError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A read model: its tables per version and how an event changes them.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Unique name, e.g. `order_views`.
    fn name(&self) -> &'static str;

    /// DDL creating the tables of `version` (idempotent).
    fn create_sql(&self, version: u32) -> String;

    /// The tables of `version` (schema-qualified), emptied by a reset.
    fn tables(&self, version: u32) -> Vec<String>;

    /// DDL pointing the public views at the tables of `version`.
    fn activate_sql(&self, version: u32) -> String;

    /// The events it reads from the store's log: the read leaves the others
    /// out server-side (the checkpoint moves over them all the same), so a
    /// model of a few event types does not pay for the whole log. Every
    /// event left out must be one [`Projection::apply`] ignores. Default:
    /// every event.
    fn event_filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// Apply one event (in its current schema version) to the tables of
    /// `version`, inside the engine's transaction. Events the projection
    /// does not care about are ignored.
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        version: u32,
        event: &RecordedEvent,
    ) -> std::result::Result<(), ApplyError>;

    /// Apply a whole batch at once (set-based), with exactly the effect of
    /// [`Projection::apply`] on each event in order. `Ok(false)`: not
    /// supported, the engine applies event by event. On an error the
    /// engine undoes the attempt and goes event by event, so that only the
    /// failing event is retried and parked.
    async fn apply_batch(
        &self,
        _tx: &Transaction<'_>,
        _version: u32,
        _events: &[RecordedEvent],
    ) -> std::result::Result<bool, ApplyError> {
        Ok(false)
    }
}

/// The filter of a model that reads the events of `E` in streams starting
/// with `prefix`, for each `(prefix, E::TYPES)` of `reads` (types of one
/// part in another part's streams pass too: `apply` ignores them).
pub fn reads(reads: &[(&str, &[(&str, u32)])]) -> EventFilter {
    EventFilter {
        stream_prefixes: reads.iter().map(|(prefix, _)| (*prefix).to_owned()).collect(),
        event_types: reads.iter().flat_map(|(_, types)| types.iter().map(|(t, _)| (*t).to_owned())).collect(),
    }
}

/// [`reads`] of one event enum in one stream category.
pub fn reads_of<E: DomainEvent>(prefix: &str) -> EventFilter {
    reads(&[(prefix, E::TYPES)])
}

/// Describes the projectors' metrics (the `# HELP` lines of `/metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!("eventfold_projection_events_total", "Events applied, by projection");
    metrics::describe_histogram!("eventfold_projection_batch_seconds", "Latency of one applied batch, in seconds");
    metrics::describe_gauge!(
        "eventfold_projection_position",
        "Global position applied up to, by projection and version"
    );
    metrics::describe_gauge!("eventfold_projection_lag_positions", "Positions of the log not applied yet");
    metrics::describe_gauge!(
        "eventfold_projection_lag_seconds",
        "Age of the last applied event, in seconds (0 when caught up)"
    );
    metrics::describe_counter!(
        "eventfold_projection_parked_total",
        "Events parked after every retry failed, by projection"
    );
}
