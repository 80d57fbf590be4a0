//! The gRPC `EventStoreService`: streams, the `$all` log, subscriptions,
//! snapshots, verification, branching and temporal reads over any
//! [`EventLog`], with `grpc.health.v1` (NOT_SERVING while the storage does
//! not answer) and server reflection.
//!
//! OVERVIEW: [`host`] adds the service and its health check to a process's
//! one gRPC server (`eventfold_platform::server::GrpcServer`), which binds,
//! serves and drains; live subscriptions end when the process's token is
//! cancelled. `grpc.rs` converts between proto and store types and is the
//! only place that builds a `tonic::Status`.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

mod convert;
mod grpc;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use eventfold_platform::{
    runtime::CancellationToken,
    server::{GrpcServer, MAX_RESPONSE_BYTES},
};
use eventfold_proto::eventstore::event_store_service_server::EventStoreServiceServer;
use eventfold_store::{EventLog, SubscriptionOptions, Subscriptions};
use serde::{Deserialize, Serialize};

pub use crate::{
    convert::{json_to_struct, struct_to_json, timestamp},
    grpc::{ERROR_DOMAIN, EventStoreGrpc},
};

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

/// Hosts the event store over `log` on `server`: the service, with its
/// health following `log.check_health()` every
/// `config.health_interval_secs`. Starts the live tail of the log's
/// subscriptions (call it inside the Tokio runtime); Subscribe streams end
/// when `token` is cancelled, so that the server can drain.
pub fn host(server: &mut GrpcServer, config: &Config, log: Arc<dyn EventLog>, token: CancellationToken) {
    let subscriptions = Arc::new(Subscriptions::new(log.clone(), SubscriptionOptions::default()));
    let service = EventStoreGrpc::new(log.clone(), subscriptions, token);
    server.add_service(
        eventfold_proto::FILE_DESCRIPTOR_SET,
        EventStoreServiceServer::new(service).max_encoding_message_size(MAX_RESPONSE_BYTES),
    );
    server.health_check(&[SERVICE_NAME], Duration::from_secs(config.health_interval_secs.max(1)), move || {
        let log = log.clone();
        async move { log.check_health().await.map_err(|e| e.to_string()) }
    });
}
