//! The command line: what a user can ask of the `eventfold` binary, and the
//! configuration keys its flags override.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::bus_cli;

#[derive(Debug, Parser)]
#[command(name = "eventfold", version, about = "gRPC-first event store and CQRS platform")]
pub(crate) struct Cli {
    /// TOML configuration file (default: $EVENTFOLD_CONFIG, if set).
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment and
    /// flags merged) and exit.
    #[arg(long, global = true)]
    pub(crate) dump_config: bool,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Everything in one process (the default command), keeping its data
    /// under `./data`: on a private PostgreSQL cluster there when the
    /// PostgreSQL server binaries are installed (the whole platform, read
    /// side included), else on a file-system log (commands, sagas, the
    /// store; no read side). With a database URL, on that PostgreSQL; with
    /// `--ephemeral`, in memory.
    Dev {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL: store events there and run the read side too.
        #[arg(long)]
        database_url: Option<String>,
        /// Authenticate every call (off by default in dev): an admin API
        /// key is generated and printed once.
        #[arg(long)]
        auth: bool,
        /// Where to keep the data (default ./data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep nothing: the in-memory log, forgotten on exit.
        #[arg(long, conflicts_with_all = ["data_dir", "database_url"])]
        ephemeral: bool,
    },
    /// Run one service on PostgreSQL.
    Serve {
        #[command(subcommand)]
        service: Service,
    },
    /// Apply, revert or list the database migrations.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// List projections, or rebuild one beside the version that serves.
    Projections {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
        #[command(subcommand)]
        action: ProjectionsAction,
    },
    /// The Avro schemas of the events: generate, register, check.
    Schemas {
        #[command(subcommand)]
        action: bus_cli::SchemasAction,
    },
    /// Print the OpenAPI 3.1 document of the REST gateway (what it serves
    /// at /openapi.json).
    Openapi,
    /// Create, list or revoke API keys.
    Keys {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
        #[command(subcommand)]
        action: crate::keys::KeysAction,
    },
    /// Dead letters of the Kafka consumers.
    Dlq {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
        #[command(subcommand)]
        action: bus_cli::DlqAction,
    },
    /// Ask a process's admin listener whether it is ready (`/readyz`), or
    /// with `--live` alive (`/healthz`); exit 0 if so, else 1: a container
    /// health check that needs no curl in the image.
    Probe {
        /// The admin listener's address.
        #[arg(default_value = "127.0.0.1:9464")]
        admin: SocketAddr,
        /// Liveness (`/healthz`) instead of readiness.
        #[arg(long)]
        live: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Service {
    /// The EventStoreService.
    Eventstore {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The command services (orders, inventory, payments, shipping,
    /// accounts, users).
    Command {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The projectors: every read model's active version kept in step with
    /// the log (cache invalidation too, when a cache is configured).
    Projector {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The REST gateway alone, in front of gRPC servers elsewhere.
    Gateway {
        /// HTTP listen address (default 0.0.0.0:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The gRPC server of every service, e.g. http://eventfold:50051
        /// (per service: `[gateway.upstreams]`).
        #[arg(long)]
        upstream: Option<String>,
    },
    /// The outbox relay: every stored event to Kafka, Avro with the
    /// registry's schema ids.
    Relay {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The saga orchestrator (sandbox payment provider and carrier) and
    /// the SagaService; the sagas' intake runs with the projectors.
    Saga {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The query services over the read models.
    Query {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the latest migration, or every migration above `--to`.
    Down {
        /// Keep migrations up to this version (0: revert all).
        #[arg(long)]
        to: Option<i64>,
    },
    /// List known migrations and whether they are applied.
    Status,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionsAction {
    /// Every version of every projection: position, lag, parked events.
    List,
    /// The versions of one projection.
    Status {
        /// Projection name, e.g. order_views.
        name: String,
    },
    /// Build the next version from position 0 while the active one keeps
    /// serving, then switch to it.
    Rebuild {
        /// Projection name, e.g. order_views.
        name: String,
    },
    /// Stop applying events to a projection (its queries keep answering
    /// from what it has).
    Stop { name: String },
    /// Resume a stopped projection.
    Start { name: String },
    /// Empty the active version and apply the log again from position 0 in
    /// place (its queries see a partial model meanwhile; `rebuild` avoids
    /// that).
    Reset { name: String },
    /// The parked events of a projection's versions, with their errors.
    Parked { name: String },
    /// Apply the parked events of the active version again (after a fix).
    Replay { name: String },
}

/// What command line flags set; only present keys override.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Overrides {
    #[serde(skip_serializing_if = "DatabaseOverrides::is_empty")]
    database: DatabaseOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    eventstore: ListenOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    command: ListenOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    query: ListenOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    saga: ListenOverrides,
    #[serde(skip_serializing_if = "GatewayOverrides::is_empty")]
    gateway: GatewayOverrides,
    #[serde(skip_serializing_if = "AuthOverrides::is_empty")]
    auth: AuthOverrides,
    #[serde(skip_serializing_if = "DevOverrides::is_empty")]
    dev: DevOverrides,
}

#[derive(Debug, Default, Serialize)]
struct DevOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ephemeral: Option<bool>,
}

impl DevOverrides {
    fn is_empty(&self) -> bool {
        self.data_dir.is_none() && self.ephemeral.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
struct AuthOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
}

impl AuthOverrides {
    fn is_empty(&self) -> bool {
        self.enabled.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
struct GatewayOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
}

impl GatewayOverrides {
    fn is_empty(&self) -> bool {
        self.listen.is_none() && self.upstream.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
struct DatabaseOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

impl DatabaseOverrides {
    fn is_empty(&self) -> bool {
        self.url.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
struct ListenOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
}

impl ListenOverrides {
    fn is_empty(&self) -> bool {
        self.listen.is_none()
    }
}

pub(crate) fn overrides(command: Option<&Command>) -> Overrides {
    let mut o = Overrides::default();
    match command {
        Some(Command::Dev { listen, database_url, auth, data_dir, ephemeral }) => {
            o.eventstore.listen = *listen;
            o.database.url.clone_from(database_url);
            if *auth {
                o.auth.enabled = Some(true);
            }
            o.dev.data_dir.clone_from(data_dir);
            if *ephemeral {
                o.dev.ephemeral = Some(true);
            }
        }
        Some(Command::Serve { service: Service::Eventstore { listen, database_url } }) => {
            o.eventstore.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(Command::Serve { service: Service::Command { listen, database_url } }) => {
            o.command.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(Command::Serve { service: Service::Query { listen, database_url } }) => {
            o.query.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(Command::Serve { service: Service::Saga { listen, database_url } }) => {
            o.saga.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(
            Command::Migrate { database_url, .. }
            | Command::Projections { database_url, .. }
            | Command::Dlq { database_url, .. }
            | Command::Keys { database_url, .. }
            | Command::Serve { service: Service::Projector { database_url } | Service::Relay { database_url } },
        ) => {
            o.database.url.clone_from(database_url);
        }
        Some(Command::Serve { service: Service::Gateway { listen, upstream } }) => {
            o.gateway.listen = *listen;
            o.gateway.upstream.clone_from(upstream);
        }
        Some(Command::Schemas { .. } | Command::Openapi | Command::Probe { .. }) | None => {}
    }
    o
}
