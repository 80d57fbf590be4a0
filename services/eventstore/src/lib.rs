//! The gRPC `EventStoreService`: streams, the `$all` log, subscriptions,
//! snapshots, verification, branching and temporal reads over any
//! [`EventLog`], with `grpc.health.v1` (NOT_SERVING while the storage does
//! not answer) and server reflection.
//!
//! OVERVIEW: [`run`] binds nothing itself: it takes a bound listener, serves
//! until `shutdown` resolves, then ends live subscriptions and drains calls
//! within the grace period. `grpc.rs` converts between proto and store types
//! and is the only place that builds a `tonic::Status`.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

mod convert;
mod grpc;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use eventfold_platform::server::Router;
use eventfold_proto::eventstore::event_store_service_server::EventStoreServiceServer;
use eventfold_store::{EventLog, SubscriptionOptions, Subscriptions};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};

pub use crate::grpc::{ERROR_DOMAIN, EventStoreGrpc};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "eventfold.eventstore.v1.EventStoreService";

/// Settings of the event store server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// Seconds to drain calls after a shutdown request.
    pub shutdown_grace_secs: u64,
    /// Seconds between storage health probes.
    pub health_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 50051)), shutdown_grace_secs: 10, health_interval_secs: 2 }
    }
}

/// Errors of running the server.
pub type Error = eventfold_platform::Error;

/// Services served beside the event store by the same server (e.g. the
/// command services in `eventfold dev`), with their health names.
pub struct Extra {
    pub names: Vec<String>,
    pub add: Box<dyn FnOnce(Router) -> Router + Send>,
}

impl Extra {
    pub fn none() -> Self {
        Self { names: Vec::new(), add: Box::new(|router| router) }
    }
}

/// Serve the event store over `log` on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    log: Arc<dyn EventLog>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with(config, log, listener, shutdown, Extra::none()).await
}

/// [`run`], with more services on the same server; their health follows
/// the storage's like the event store's.
pub async fn run_with(
    config: Config,
    log: Arc<dyn EventLog>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extra: Extra,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscriptions = Arc::new(Subscriptions::new(log.clone(), SubscriptionOptions::default()));
    let service = EventStoreGrpc::new(log.clone(), subscriptions, stop_rx);
    let (reporter, router) = eventfold_platform::server::router(&[eventfold_proto::FILE_DESCRIPTOR_SET])?;
    let names = std::iter::once(SERVICE_NAME.to_owned()).chain(extra.names).collect();
    let probe_log = log.clone();
    let probe = eventfold_platform::server::spawn_health_probe(
        reporter,
        names,
        Duration::from_secs(config.health_interval_secs.max(1)),
        move || {
            let log = probe_log.clone();
            async move { log.check_health().await }
        },
    )
    .await;

    let router = (extra.add)(router.add_service(
        EventStoreServiceServer::new(service).max_encoding_message_size(eventfold_platform::server::MAX_RESPONSE_BYTES),
    ));
    let result = eventfold_platform::server::serve(
        router,
        listener,
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        },
        Duration::from_secs(config.shutdown_grace_secs),
    )
    .await;
    probe.abort();
    result
}
