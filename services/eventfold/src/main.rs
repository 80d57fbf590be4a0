//! The eventfold binary: parses the command line, loads the layered
//! configuration and wires storage to servers. No business logic lives here.

mod bench;
mod bus_bench;
mod bus_cli;
mod commands_bench;
mod projections;
mod queries_bench;

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
    /// Everything in one process (the default command): the store, the
    /// command services and the sagas on the in-memory store with no
    /// external service, or, with a database URL, on PostgreSQL with the
    /// projectors and the query services too.
    Dev {
        /// gRPC listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL: store events there and run the read side too.
        #[arg(long)]
        database_url: Option<String>,
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
    /// Dead letters of the Kafka consumers.
    Dlq {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
        #[command(subcommand)]
        action: bus_cli::DlqAction,
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
    /// The projectors: every read model's active version kept in step with
    /// the log (cache invalidation too, when a cache is configured).
    Projector {
        /// PostgreSQL URL.
        #[arg(long)]
        database_url: Option<String>,
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

#[derive(Debug, Subcommand)]
enum Bench {
    /// Append throughput and latency beside raw INSERTs.
    Append(bench::AppendBenchArgs),
    /// CreateOrder over gRPC at fixed arrival rates beside raw INSERTs.
    Commands(commands_bench::CommandBenchArgs),
    /// GetOrder over gRPC, cached and uncached, beside the raw SELECT.
    Queries(queries_bench::QueryBenchArgs),
    /// Append → read-model-visible lag at a fixed rate, and rebuild speed.
    ProjectionLag(queries_bench::LagBenchArgs),
    /// Relay throughput and append → Kafka → read model lag, beside the
    /// raw broker.
    Relay(bus_bench::RelayBenchArgs),
}

/// The whole configuration, one section per concern.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    log: LogConfig,
    database: DatabaseConfig,
    eventstore: eventfold_eventstore::Config,
    command: eventfold_command::Config,
    query: eventfold_query::Config,
    projector: ProjectorConfig,
    relay: eventfold_relay::Config,
    registry: RegistryConfig,
    saga: SagaConfig,
}

/// The sagas (`[saga]`): the intake runs with the projectors, the
/// orchestrator against the sandbox payment provider and carrier.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SagaConfig {
    enabled: bool,
    /// Where `eventfold serve saga` listens (`eventfold dev` serves the
    /// sagas on the event store's address).
    listen: SocketAddr,
    orchestrator: eventfold_saga::OrchestratorConfig,
    sandbox: eventfold_saga::SandboxConfig,
    /// WatchSaga streams one client address may hold open at once.
    max_watchers_per_peer: u32,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 50054)),
            orchestrator: eventfold_saga::OrchestratorConfig::default(),
            sandbox: eventfold_saga::SandboxConfig::default(),
            max_watchers_per_peer: 100,
        }
    }
}

impl SagaConfig {
    /// The saga service over `sagas`, with this configuration's limits.
    fn service(&self, sagas: eventfold_saga::grpc::Sagas) -> eventfold_saga::grpc::Sagas {
        sagas.with_max_watchers_per_peer(usize::try_from(self.max_watchers_per_peer).unwrap_or(usize::MAX))
    }
}

/// Where the Schema Registry is (`[registry]`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RegistryConfig {
    /// e.g. `http://localhost:8081`.
    url: Option<String>,
}

/// How the projectors work (`[projector]`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProjectorConfig {
    /// Most events in one transaction.
    batch_size: usize,
    /// Longest a batch keeps applying before it commits.
    batch_time_ms: u64,
    /// Attempts of an event before it is parked.
    max_attempts: u32,
    /// Where the events come from: `log` (the store, the default) or
    /// `kafka` (the relay's topics; needs relay.brokers and registry.url).
    source: SourceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SourceKind {
    Log,
    Kafka,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        let d = eventfold_projector::ProjectorOptions::default();
        Self {
            batch_size: d.batch_size,
            batch_time_ms: d.batch_time.as_millis() as u64,
            max_attempts: d.max_attempts,
            source: SourceKind::Log,
        }
    }
}

impl ProjectorConfig {
    fn options(&self) -> eventfold_projector::ProjectorOptions {
        eventfold_projector::ProjectorOptions {
            batch_size: self.batch_size.max(1),
            batch_time: std::time::Duration::from_millis(self.batch_time_ms),
            max_attempts: self.max_attempts.max(1),
            ..eventfold_projector::ProjectorOptions::default()
        }
    }
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
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    query: ListenOverrides,
    #[serde(skip_serializing_if = "ListenOverrides::is_empty")]
    saga: ListenOverrides,
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
        Some(Command::Dev { listen, database_url }) => {
            o.eventstore.listen = *listen;
            o.database.url.clone_from(database_url);
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
            | Command::Serve { service: Service::Projector { database_url } | Service::Relay { database_url } },
        ) => {
            o.database.url.clone_from(database_url);
        }
        Some(Command::Bench { .. } | Command::Schemas { .. }) | None => {}
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
    match runtime.block_on(run(cli.command.unwrap_or(Command::Dev { listen: None, database_url: None }), config)) {
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
        Command::Dev { .. } if config.database.url.is_some() => {
            let url = config.database.require_url()?.to_owned();
            let mut admin = bench::connect(&url).await?;
            eventfold_migrations::up(&mut admin).await.context("applying the migrations")?;
            drop(admin);
            let log = postgres(&config).await?;
            let (query, invalidator) = read_side(&config, &url, log.clone()).await?;
            let (_stop_projectors, stop) = tokio::sync::watch::channel(false);
            spawn_projectors(&config, &url, log.clone(), invalidator, stop.clone()).await?;
            let bus = eventfold_command::bus(log.clone(), config.command.bus_options());
            let sagas = if config.saga.enabled {
                spawn_orchestrator(&config, &url, bus.clone(), stop.clone()).await?;
                Some(
                    config.saga.service(eventfold_saga::grpc::Sagas::connect(&url).await?).with_changes(log.appended()),
                )
            } else {
                None
            };
            let extra = eventfold_eventstore::Extra {
                names: eventfold_command::SERVICE_NAMES
                    .iter()
                    .chain(eventfold_query::SERVICE_NAMES)
                    .chain(if sagas.is_some() { eventfold_saga::grpc::SERVICE_NAMES } else { &[] })
                    .map(|s| (*s).to_owned())
                    .collect(),
                add: Box::new(move |router| {
                    let router = eventfold_query::add_services(eventfold_command::add_services(router, bus), query);
                    match sagas {
                        Some(sagas) => eventfold_saga::grpc::add_services(router, sagas),
                        None => router,
                    }
                }),
            };
            serve_eventstore(&config, log, "PostgreSQL, with projectors and queries", extra).await
        }
        Command::Dev { .. } => {
            let retention =
                std::time::Duration::from_secs(config.database.request_retention_hours.saturating_mul(3600));
            let log = upcasting(Arc::new(MemoryEventLog::with_request_retention(retention)));
            let bus = eventfold_command::bus(log.clone(), config.command.bus_options());
            // The sagas live in memory beside the log: their intake reads the
            // log from its start, the orchestrator is woken by every start.
            let (_stop_sagas, stop) = tokio::sync::watch::channel(false);
            let sagas = if config.saga.enabled {
                let memory = eventfold_saga::MemorySagas::new(log.clone());
                tokio::spawn(eventfold_saga::intake::run_in_memory(log.clone(), memory.clone(), stop.clone()));
                let repository = eventfold_saga::Repository::Memory(memory.clone());
                let orchestrator = eventfold_saga::Orchestrator::over(
                    repository.clone(),
                    fulfilment(&config, bus.clone()),
                    config.saga.orchestrator.clone(),
                );
                tokio::spawn(orchestrator.run(memory.started(), stop));
                Some(config.saga.service(eventfold_saga::grpc::Sagas::new(repository)).with_changes(log.appended()))
            } else {
                None
            };
            let extra = eventfold_eventstore::Extra {
                names: eventfold_command::SERVICE_NAMES
                    .iter()
                    .chain(if sagas.is_some() { eventfold_saga::grpc::SERVICE_NAMES } else { &[] })
                    .map(|s| (*s).to_owned())
                    .collect(),
                add: Box::new(move |router| {
                    let router = eventfold_command::add_services(router, bus);
                    match sagas {
                        Some(sagas) => eventfold_saga::grpc::add_services(router, sagas),
                        None => router,
                    }
                }),
            };
            serve_eventstore(&config, log, "in-memory store, nothing is persisted", extra).await
        }
        Command::Serve { service: Service::Projector { .. } } => {
            let url = config.database.require_url()?.to_owned();
            let log = postgres(&config).await?;
            let invalidator = match &config.query.cache.url {
                Some(_) => Some(eventfold_query::Invalidator::new(
                    eventfold_query::Cache::connect(config.query.cache.clone()).await.map_err(anyhow::Error::msg)?,
                )),
                None => None,
            };
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            let tasks = spawn_projectors(&config, &url, log, invalidator, stop).await?;
            println!("eventfold: {} projectors running (PostgreSQL)", tasks.len());
            eventfold_platform::server::shutdown_signal().await;
            let _ = stop_tx.send(true);
            for task in tasks {
                let _ = task.await;
            }
            tracing::info!("stopped");
            Ok(())
        }
        Command::Serve { service: Service::Relay { .. } } => {
            let url = config.database.require_url()?.to_owned();
            let Some(registry_url) = config.registry.url.clone() else {
                return Err(eventfold_platform::Error::Config(
                    "registry.url is required to relay (EVENTFOLD_REGISTRY__URL)".to_owned(),
                )
                .into());
            };
            let log = postgres(&config).await?;
            let encoder = eventfold_relay::AvroEncoder::new(
                eventfold_schemas::Catalog::load()?,
                eventfold_schemas::Registry::new(&registry_url)?,
            );
            let relay = eventfold_relay::Relay::new(&url, log, Arc::new(encoder), config.relay.clone()).await?;
            println!("eventfold: relaying to {} (registry {registry_url})", config.relay.brokers.join(","));
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            let running = tokio::spawn(relay.run(stop));
            eventfold_platform::server::shutdown_signal().await;
            let _ = stop_tx.send(true);
            let _ = running.await;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Serve { service: Service::Query { .. } } => {
            let url = config.database.require_url()?.to_owned();
            let log = postgres(&config).await?;
            let (query, _) = read_side(&config, &url, log).await?;
            let listener = bind(config.query.listen).await?;
            let addr = listener.local_addr()?;
            println!("eventfold: query services listening on {addr} (PostgreSQL)");
            tracing::info!(%addr, "serving");
            eventfold_query::run(config.query.clone(), query, listener, eventfold_platform::server::shutdown_signal())
                .await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Serve { service: Service::Saga { .. } } => {
            let url = config.database.require_url()?.to_owned();
            let log = postgres(&config).await?;
            let changes = log.appended();
            let bus = eventfold_command::bus(log, config.command.bus_options());
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            let orchestrator = spawn_orchestrator(&config, &url, bus, stop).await?;
            let sagas = config.saga.service(eventfold_saga::grpc::Sagas::connect(&url).await?).with_changes(changes);
            let listener = bind(config.saga.listen).await?;
            let addr = listener.local_addr()?;
            println!("eventfold: saga orchestrator and SagaService listening on {addr} (PostgreSQL)");
            tracing::info!(%addr, "serving");
            let grace = std::time::Duration::from_secs(config.eventstore.shutdown_grace_secs);
            eventfold_saga::grpc::run(sagas, listener, eventfold_platform::server::shutdown_signal(), grace).await?;
            let _ = stop_tx.send(true);
            let _ = orchestrator.await;
            tracing::info!("stopped");
            Ok(())
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
        Command::Schemas { action } => bus_cli::schemas(config.registry.url.as_deref(), action).await,
        Command::Dlq { action, .. } => {
            let consumer =
                eventfold_bus::ConsumerConfig { brokers: config.relay.brokers.clone(), ..Default::default() };
            bus_cli::dlq(&consumer, config.database.require_url()?, config.registry.url.as_deref(), action).await
        }
        Command::Bench { bench: Bench::Append(args) } => bench::append(args).await,
        Command::Bench { bench: Bench::Commands(args) } => commands_bench::commands(args).await,
        Command::Bench { bench: Bench::Queries(args) } => queries_bench::queries(args).await,
        Command::Bench { bench: Bench::ProjectionLag(args) } => queries_bench::lag(args).await,
        Command::Bench { bench: Bench::Relay(args) } => bus_bench::relay(args).await,
    }
}

/// The query side over `url`, and the invalidator its projectors should
/// report to when a cache is configured.
async fn read_side(
    config: &Config,
    url: &str,
    log: Arc<dyn EventLog>,
) -> anyhow::Result<(Arc<eventfold_query::Query>, Option<Arc<eventfold_query::Invalidator>>)> {
    let query = eventfold_query::Query::connect(&config.query, url, log).await?;
    let invalidator = query.cache().map(|cache| eventfold_query::Invalidator::new(cache.clone()));
    Ok((query, invalidator))
}

/// One projector per projection, on its active version (version 1 for a
/// projection never built), following the switch of a rebuild.
async fn spawn_projectors(
    config: &Config,
    url: &str,
    log: Arc<dyn EventLog>,
    invalidator: Option<Arc<eventfold_query::Invalidator>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let observer = invalidator.map(|i| i as Arc<dyn eventfold_projector::CommitObserver>);
    let source: Option<Arc<dyn eventfold_store::EventSource>> = match config.projector.source {
        SourceKind::Log => None,
        SourceKind::Kafka => {
            let Some(registry_url) = &config.registry.url else {
                return Err(eventfold_platform::Error::Config(
                    "projector.source = \"kafka\" needs registry.url (EVENTFOLD_REGISTRY__URL)".to_owned(),
                )
                .into());
            };
            let source_config = eventfold_bus::KafkaSourceConfig {
                consumer: eventfold_bus::ConsumerConfig {
                    brokers: config.relay.brokers.clone(),
                    fetch_wait_ms: 1,
                    ..Default::default()
                },
                relay: config.relay.name.clone(),
                ..Default::default()
            };
            let catalog = eventfold_schemas::Catalog::load()?;
            let registry = eventfold_schemas::Registry::new(registry_url)?;
            Some(eventfold_bus::KafkaSource::new(source_config, catalog, registry))
        }
    };
    let mut projections = eventfold_projector::all();
    if config.saga.enabled {
        projections.push(Arc::new(eventfold_saga::SagaIntake));
    }
    Ok(projections
        .into_iter()
        .map(|projection| {
            tokio::spawn(eventfold_projector::run_active(
                url.to_owned(),
                log.clone(),
                projection,
                config.projector.options(),
                eventfold_projector::Attach { observer: observer.clone(), source: source.clone() },
                std::time::Duration::from_secs(1),
                stop.clone(),
            ))
        })
        .collect())
}

/// The saga orchestrator over `url`, sending commands through `bus`, with
/// the sandbox payment provider and carrier.
async fn spawn_orchestrator(
    config: &Config,
    url: &str,
    bus: eventfold_command::Bus,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let orchestrator =
        eventfold_saga::Orchestrator::new(url, fulfilment(config, bus), config.saga.orchestrator.clone()).await?;
    // It polls (saga.orchestrator.poll_ms); nothing wakes it sooner.
    let (_, wake) = tokio::sync::watch::channel(0u64);
    Ok(tokio::spawn(orchestrator.run(wake, stop)))
}

/// The fulfilment saga's steps: commands through `bus`, the sandbox
/// payment provider and carrier.
fn fulfilment(config: &Config, bus: eventfold_command::Bus) -> eventfold_saga::Fulfilment {
    let sandbox = config.saga.sandbox.clone();
    eventfold_saga::Fulfilment {
        commands: Arc::new(bus),
        payments: Arc::new(eventfold_saga::SandboxPayments::new(sandbox.clone())),
        carrier: Arc::new(eventfold_saga::SandboxCarrier::new(sandbox)),
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
    pg.request_retention = std::time::Duration::from_secs(config.database.request_retention_hours.saturating_mul(3600));
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
    let commands = extra.names.iter().any(|n| n.starts_with("eventfold.orders."));
    let queries = extra.names.iter().any(|n| n.starts_with("eventfold.query."));
    let services = match (commands, queries) {
        (true, true) => " and the command and query services",
        (true, false) => " and the command services",
        _ => "",
    };
    println!("eventfold: EventStoreService{services} listening on {addr} ({storage})");
    println!("  try: grpcurl -plaintext {addr} list");
    if commands {
        let order = r#"{"order_id":"o-1","customer_id":"c-1","currency":"EUR","items":[{"product_id":"sku-1","quantity":2,"unit_price":{"minor":1250,"currency":"EUR"}}]}"#;
        println!("       grpcurl -plaintext -d '{order}' {addr} eventfold.orders.v1.OrderCommandService/CreateOrder");
    }
    if queries {
        println!(
            "       grpcurl -plaintext -d '{{\"order_id\":\"o-1\"}}' {addr} eventfold.query.v1.OrderQueryService/GetOrder"
        );
    } else if commands {
        println!("  (read models and queries run with a database: eventfold dev --database-url postgresql://…)");
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
