//! The eventfold binary: parses the command line, loads the layered
//! configuration and wires storage to servers. No business logic lives here.

mod bench;
mod commands_bench;
mod projections;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use eventfold_platform::config::{self, DatabaseConfig, LogConfig};
use eventfold_store::{EventLog, MemoryEventLog, PostgresConfig, PostgresEventLog, Upcasting};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Exit code of a bad configuration or command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "eventfold", version, about = "gRPC-first event store and CQRS platform")]
struct Cli {
    /// TOML configuration file (default: $EVENTFOLD_CONFIG, if set).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment and
    /// flags merged) and exit.
    #[arg(long, global = true)]
    dump_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process on the in-memory store, no external service
    /// (the default command).
    Dev {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
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
    /// Measure against raw PostgreSQL doing the same work.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Service {
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
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
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
enum ProjectionsAction {
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
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Append throughput and latency beside raw INSERTs.
    Append(bench::AppendBenchArgs),
    /// CreateOrder over gRPC at fixed arrival rates beside raw INSERTs.
    Commands(commands_bench::CommandBenchArgs),
}

/// The whole configuration, one section per concern.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    log: LogConfig,
    database: DatabaseConfig,
    eventstore: eventfold_eventstore::Config,
    command: eventfold_command::Config,
}

impl Config {
    fn validate(&self) -> Result<(), eventfold_platform::Error> {
        self.database.validate()
    }
}

/// What command line flags set; only present keys override.
#[derive(Debug, Default, Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "DatabaseOverrides::is_empty")]
    database: DatabaseOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    eventstore: ListenOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    command: ListenOverrides,
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

fn overrides(command: Option<&Command>) -> Overrides {
    let mut o = Overrides::default();
    match command {
        Some(Command::Dev { listen }) => o.eventstore.listen = *listen,
        Some(Command::Serve { service: Service::Eventstore { listen, database_url } }) => {
            o.eventstore.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(Command::Serve { service: Service::Command { listen, database_url } }) => {
            o.command.listen = *listen;
            o.database.url.clone_from(database_url);
        }
        Some(Command::Migrate { database_url, .. } | Command::Projections { database_url, .. }) => {
            o.database.url.clone_from(database_url);
        }
        Some(Command::Bench { .. }) | None => {}
    }
    o
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.clone().or_else(config::config_file_from_env);
    let config: Config = match config::load(file.as_deref(), &overrides(cli.command.as_ref()))
        .and_then(|c: Config| c.validate().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eventfold: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.dump_config {
        match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("eventfold: cannot print the configuration: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = eventfold_platform::telemetry::init(&config.log) {
        eprintln!("eventfold: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("eventfold: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Dev { listen: None }), config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(config_error @ eventfold_platform::Error::Config(_)) =
                e.downcast_ref::<eventfold_platform::Error>()
            {
                eprintln!("eventfold: {config_error}");
                return ExitCode::from(EXIT_USAGE);
            }
            eprintln!("eventfold: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Dev { .. } => {
            let log = upcasting(Arc::new(MemoryEventLog::new()));
            let bus = eventfold_command::bus(log.clone(), config.command.bus_options());
            let extra = eventfold_eventstore::Extra {
                names: eventfold_command::SERVICE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
                add: Box::new(move |router| eventfold_command::add_services(router, bus)),
            };
            serve_eventstore(&config, log, "in-memory store, nothing is persisted", extra).await
        }
        Command::Serve { service: Service::Eventstore { .. } } => {
            let log = postgres(&config).await?;
            serve_eventstore(&config, log, "PostgreSQL", eventfold_eventstore::Extra::none()).await
        }
        Command::Serve { service: Service::Command { .. } } => {
            let log = postgres(&config).await?;
            let listener = bind(config.command.listen).await?;
            let addr = listener.local_addr()?;
            println!("eventfold: command services listening on {addr} (PostgreSQL)");
            tracing::info!(%addr, "serving");
            eventfold_command::run(
                config.command.clone(),
                log,
                listener,
                eventfold_platform::server::shutdown_signal(),
            )
            .await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Migrate { action, .. } => migrate(config.database.require_url()?, action).await,
        Command::Projections { action, .. } => projections::run(&config, action).await,
        Command::Bench { bench: Bench::Append(args) } => bench::append(args).await,
        Command::Bench { bench: Bench::Commands(args) } => commands_bench::commands(args).await,
    }
}

/// The log as every service reads it: old event versions upcast.
fn upcasting(log: Arc<dyn EventLog>) -> Arc<dyn EventLog> {
    Arc::new(Upcasting::new(log, eventfold_command::upcasters()))
}

async fn postgres(config: &Config) -> anyhow::Result<Arc<dyn EventLog>> {
    let url = config.database.require_url()?;
    let mut pg = PostgresConfig::new(url);
    pg.pool_size = config.database.pool_size;
    pg.writers = config.database.writers;
    Ok(upcasting(Arc::new(PostgresEventLog::connect(pg).await?)))
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

async fn serve_eventstore(
    config: &Config,
    log: Arc<dyn EventLog>,
    storage: &str,
    extra: eventfold_eventstore::Extra,
) -> anyhow::Result<()> {
    let listener = bind(config.eventstore.listen).await?;
    let addr = listener.local_addr()?;
    let commands = !extra.names.is_empty();
    println!(
        "eventfold: EventStoreService{} listening on {addr} ({storage})",
        if commands { " and the command services" } else { "" }
    );
    println!("  try: grpcurl -plaintext {addr} list");
    if commands {
        let order = r#"{"order_id":"o-1","customer_id":"c-1","currency":"EUR","items":[{"product_id":"sku-1","quantity":2,"unit_price":{"minor":1250,"currency":"EUR"}}]}"#;
        println!("       grpcurl -plaintext -d '{order}' {addr} eventfold.orders.v1.OrderCommandService/CreateOrder");
    }
    tracing::info!(%addr, storage, "serving");
    eventfold_eventstore::run_with(
        config.eventstore.clone(),
        log,
        listener,
        eventfold_platform::server::shutdown_signal(),
        extra,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn migrate(url: &str, action: MigrateAction) -> anyhow::Result<()> {
    let (mut client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.with_context(|| "cannot connect to PostgreSQL")?;
    let driver = tokio::spawn(connection);
    match action {
        MigrateAction::Up => {
            eventfold_migrations::up(&mut client).await?;
            println!("migrations applied");
        }
        MigrateAction::Down { to } => {
            eventfold_migrations::down(&mut client, to).await?;
            println!("migrations reverted");
        }
        MigrateAction::Status => {}
    }
    for m in eventfold_migrations::status(&client).await? {
        println!("{:04} {:<30} {}", m.version, m.name, if m.applied { "applied" } else { "pending" });
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}
