//! The eventfold binary: parses the command line, loads the layered
//! configuration, builds the process's resources and starts the chosen
//! services (`process.rs`), and maps errors to exit codes. No business
//! logic and no SQL live here: each crate owns its part and its config.

mod bus_cli;
mod cli;
mod config;
mod embedded;
mod heap;
mod keys;
mod probe;
mod process;
mod projections;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use eventfold_platform::config as layered;

use crate::{
    cli::{Cli, Command, MigrateAction, Service},
    config::Config,
    process::Process,
};

/// Exit code of a bad configuration or command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // First, before any thread: freed large buffers must leave the process.
    heap::fix_mmap_threshold();
    // Every HTTP client of the process (registry, JWKS, blob storage,
    // callbacks) uses rustls with ring.
    eventfold_store::install_crypto_provider();
    let cli = Cli::parse();
    let file = cli.config.clone().or_else(layered::config_file_from_env);
    let config: Config = match layered::load(file.as_deref(), &cli::overrides(cli.command.as_ref()))
        .and_then(|c: Config| c.validate().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eventfold: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.dump_config {
        return match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("eventfold: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Only test builds have failpoints; FAILPOINTS set on any other build is
    // refused rather than silently ignored.
    if let Err(e) = eventfold_store::failpoint::init_from_env() {
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
    let command = cli.command.unwrap_or(Command::Dev {
        listen: None,
        database_url: None,
        auth: false,
        data_dir: None,
        ephemeral: false,
    });
    // Inside the runtime: the span exporter's connection runs on it.
    let telemetry = match runtime
        .block_on(async { eventfold_platform::telemetry::init(&config.log, &config.tracing, &service_name(&command)) })
    {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("eventfold: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(armed) = std::env::var_os(eventfold_store::failpoint::ENV).filter(|v| !v.is_empty()) {
        tracing::warn!(
            "test build: failpoints armed ({}={})",
            eventfold_store::failpoint::ENV,
            armed.to_string_lossy()
        );
    }
    let result = runtime.block_on(run(command, config));
    // The spans still buffered go out before the process ends.
    runtime.block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await.ok() });
    match result {
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
    if let Command::Probe { admin, live } = command {
        return probe::run(admin, live).await;
    }
    // Every metric the process records is kept for /metrics.
    eventfold_platform::telemetry::install_metrics()?;
    describe_metrics();
    // The query services and the projectors' invalidator use the cache.
    let caches = matches!(
        command,
        Command::Dev { .. } | Command::Serve { service: Service::Query { .. } | Service::Projector { .. } }
    );
    if let Command::Dev { .. } = command {
        return dev(config, caches).await;
    }
    let process = Process::new(config, caches)?;
    let config = process.config();
    match command {
        Command::Dev { .. } => unreachable!("answered above"),
        Command::Serve { service: Service::Eventstore { .. } } => process.eventstore().await,
        Command::Serve { service: Service::Command { .. } } => process.command().await,
        Command::Serve { service: Service::Query { .. } } => process.query().await,
        Command::Serve { service: Service::Saga { .. } } => process.saga().await,
        Command::Serve { service: Service::Projector { .. } } => process.projector().await,
        Command::Serve { service: Service::Relay { .. } } => process.relay().await,
        Command::Serve { service: Service::Gateway { .. } } => process.gateway_alone().await,
        Command::Migrate { action, .. } => migrate(&process.databases()?.main, action).await,
        Command::Projections { action, .. } => {
            let log = process.postgres_log().await?;
            let (saga, options) = (config.saga.enabled, config.projector.options());
            projections::run(&process.databases()?.workers, log, saga, options, action).await
        }
        Command::Openapi => {
            print!("{}", eventfold_gateway::openapi_json(eventfold_proto::FILE_DESCRIPTOR_SET)?);
            Ok(())
        }
        Command::Schemas { action } => bus_cli::schemas(config.registry.url.as_deref(), action).await,
        Command::Keys { action, .. } => keys::run(&process.databases()?.main, action).await,
        Command::Probe { .. } => unreachable!("answered above"),
        Command::Dlq { action, .. } => {
            let consumer = eventfold_bus::ConsumerConfig {
                brokers: config.relay.brokers.clone(),
                tls: process.broker_tls()?,
                ..Default::default()
            };
            bus_cli::dlq(&consumer, &process.databases()?.main, config.registry.url.as_deref(), action).await
        }
    }
}

/// `service.name` of the process's spans (and `service` of its JSON logs).
/// `eventfold dev`: on its data directory (a private PostgreSQL or the
/// file-system log), on the given database, or in memory.
async fn dev(mut config: Config, caches: bool) -> anyhow::Result<()> {
    let (dev, has_url) = (config.dev.clone(), config.database.url.is_some());
    let storage = tokio::task::spawn_blocking(move || embedded::choose(&dev, has_url)).await??;
    if let embedded::DevStorage::Postgres(Some(postgres)) = &storage {
        config.database.url = Some(postgres.url());
    }
    let result = match Process::new(config, caches) {
        Ok(process) => process.dev(&storage).await,
        Err(e) => Err(e),
    };
    if let embedded::DevStorage::Postgres(Some(postgres)) = storage {
        tokio::task::spawn_blocking(move || postgres.stop()).await?;
    }
    result
}

fn service_name(command: &Command) -> String {
    let name = match command {
        Command::Dev { .. } => "dev",
        Command::Serve { service } => match service {
            Service::Eventstore { .. } => "eventstore",
            Service::Command { .. } => "command",
            Service::Query { .. } => "query",
            Service::Saga { .. } => "saga",
            Service::Projector { .. } => "projector",
            Service::Relay { .. } => "relay",
            Service::Gateway { .. } => "gateway",
        },
        _ => "cli",
    };
    format!("eventfold-{name}")
}

/// The `# HELP` lines of every metric the crates record (whichever of them
/// this process runs).
fn describe_metrics() {
    eventfold_platform::metrics::describe();
    eventfold_platform::ratelimit::describe();
    eventfold_store::metered::describe();
    eventfold_command::describe_metrics();
    eventfold_projector::describe_metrics();
    eventfold_query::describe_metrics();
    eventfold_saga::describe_metrics();
    eventfold_relay::describe_metrics();
    eventfold_bus::describe_metrics();
    eventfold_gateway::describe_metrics();
}

async fn migrate(database: &eventfold_store::Database, action: MigrateAction) -> anyhow::Result<()> {
    let mut client = database.connect().await.context("cannot connect to PostgreSQL")?;
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
    Ok(())
}
