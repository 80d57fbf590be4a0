//! The command side of eventfold: one gRPC command service per aggregate
//! (`OrderCommandService`, `InventoryCommandService`,
//! `PaymentCommandService`, `ShippingCommandService`,
//! `AccountCommandService`, `UserCommandService`) over a command bus of
//! tower layers.
//!
//! OVERVIEW: `grpc.rs` turns a request into an [`Envelope`]; the [`bus`]
//! traces, measures, authorizes and validates it, makes it idempotent by
//! request id and retries it on a concurrency conflict; the [`Handler`]
//! loads the aggregate (snapshot + later events, upcast), asks the pure
//! domain code to decide, and appends with the expected version. Every
//! answer carries the stream version and the global position of the last
//! event: the read-your-writes token. [`host`] adds the services, with
//! their health check, to a process's one gRPC server.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

mod bus;
mod envelope;
mod error;
mod grpc;
mod handler;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use eventfold_platform::server::GrpcServer;
use eventfold_proto::{
    accounts::account_command_service_server::AccountCommandServiceServer,
    inventory::inventory_command_service_server::InventoryCommandServiceServer,
    orders::order_command_service_server::OrderCommandServiceServer,
    payments::payment_command_service_server::PaymentCommandServiceServer,
    shipping::shipping_command_service_server::ShippingCommandServiceServer,
    users::user_command_service_server::UserCommandServiceServer,
};
use eventfold_store::{EventLog, Upcasters};
use serde::{Deserialize, Serialize};

pub use crate::{
    bus::{AllowAll, Authorizer, Bus, BusOptions, bus},
    envelope::{Command, Envelope, Meta, Reply, Write},
    error::{Error, Result},
    grpc::{
        AccountCommands, CAUSATION_HEADER, CORRELATION_HEADER, InventoryCommands, OrderCommands, PRINCIPAL_HEADER,
        PaymentCommands, ShippingCommands, UserCommands,
    },
    handler::{Handler, Loaded, SnapshotPolicy, new_events},
};

/// The gRPC names of the command services, as health and reflection know them.
pub const SERVICE_NAMES: &[&str] = &[
    "eventfold.orders.v1.OrderCommandService",
    "eventfold.inventory.v1.InventoryCommandService",
    "eventfold.payments.v1.PaymentCommandService",
    "eventfold.shipping.v1.ShippingCommandService",
    "eventfold.accounts.v1.AccountCommandService",
    "eventfold.users.v1.UserCommandService",
];

/// Settings of the command services.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where `eventfold serve command` listens (`eventfold dev` serves the
    /// command services on the event store's address).
    pub listen: SocketAddr,
    /// Seconds to drain calls after a shutdown request.
    pub shutdown_grace_secs: u64,
    /// Seconds between storage health probes.
    pub health_interval_secs: u64,
    /// A snapshot every this many events of an aggregate (0: never).
    pub snapshot_every: u64,
    /// Per aggregate category (`order`, `inventory`, `payment`,
    /// `shipment`, `account`, `user`), overriding `snapshot_every`.
    pub snapshot_every_by_category: std::collections::HashMap<String, u64>,
    /// Attempts of a command that meets a concurrency conflict.
    pub max_attempts: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            shutdown_grace_secs: 10,
            health_interval_secs: 2,
            snapshot_every: 100,
            snapshot_every_by_category: Default::default(),
            max_attempts: 10,
        }
    }
}

impl Config {
    pub fn bus_options(&self) -> BusOptions {
        BusOptions {
            authorizer: Arc::new(AllowAll),
            snapshots: SnapshotPolicy {
                every: self.snapshot_every,
                per_category: self.snapshot_every_by_category.clone(),
            },
            max_attempts: self.max_attempts.max(1),
        }
    }
}

/// The domain's upcasters, for wrapping the event log in
/// [`eventfold_store::Upcasting`]: aggregates, reads and subscriptions
/// then see current event versions only.
pub fn upcasters() -> Upcasters {
    let mut upcasters = Upcasters::new();
    for step in eventfold_domain::upcast::UPCASTERS {
        let apply = step.apply;
        upcasters.register(step.event_type, step.from_version, move |data| apply(data).map_err(|e| e.to_string()));
    }
    upcasters
}

/// Hosts the six command services over `bus` on `server`; their health
/// follows `log` (probed every `health_interval_secs`).
pub fn host(server: &mut GrpcServer, config: &Config, log: Arc<dyn EventLog>, bus: Bus) {
    let descriptors = eventfold_proto::FILE_DESCRIPTOR_SET;
    server
        .add_service(descriptors, OrderCommandServiceServer::new(OrderCommands::new(bus.clone())))
        .add_service(descriptors, InventoryCommandServiceServer::new(InventoryCommands::new(bus.clone())))
        .add_service(descriptors, PaymentCommandServiceServer::new(PaymentCommands::new(bus.clone())))
        .add_service(descriptors, ShippingCommandServiceServer::new(ShippingCommands::new(bus.clone())))
        .add_service(descriptors, AccountCommandServiceServer::new(AccountCommands::new(bus.clone())))
        .add_service(descriptors, UserCommandServiceServer::new(UserCommands::new(bus)))
        .health_check(SERVICE_NAMES, Duration::from_secs(config.health_interval_secs.max(1)), move || {
            let log = log.clone();
            async move { log.check_health().await.map_err(|e| e.to_string()) }
        });
}

/// Describes the command side's metrics (the `# HELP` lines of `/metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "eventfold_commands_total",
        "Commands handled, by command and outcome (ok, duplicate, rejected with its reason, conflict, invalid, …)"
    );
    metrics::describe_histogram!("eventfold_command_duration_seconds", "Latency of commands, in seconds");
    metrics::describe_counter!(
        "eventfold_command_retries_total",
        "Commands run again after a wrong expected version (a concurrent write to the stream)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_checked_names_are_the_hosted_services() {
        let log: Arc<dyn EventLog> = Arc::new(eventfold_store::MemoryEventLog::new());
        let mut server = GrpcServer::new();
        host(&mut server, &Config::default(), log.clone(), bus(log, BusOptions::default()));
        assert_eq!(server.service_names(), SERVICE_NAMES);
    }
}
