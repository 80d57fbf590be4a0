//! `eventfold schemas generate|register|check` and `eventfold dlq
//! list|replay`: the operator's side of the event bus.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, bail};
use eventfold_bus::{ConsumerConfig, Decoder};
use eventfold_schemas::{Catalog, Registry};
use eventfold_store::Database;

/// What `eventfold schemas` does.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SchemasAction {
    /// Write the Avro schema of every event type and version, generated
    /// from the proto descriptors, under schemas/avro (check them in).
    Generate {
        /// The repository root.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
    /// Register every Avro schema and every proto file with the Schema
    /// Registry (compatibility BACKWARD_TRANSITIVE).
    Register {
        /// e.g. http://localhost:8081 (default: `registry.url` of the
        /// configuration).
        #[arg(long)]
        registry_url: Option<String>,
    },
    /// Fail when a schema under schemas/avro was removed or changed in a
    /// way that is not FULL compatible (both directions: e.g. a field
    /// removed or added without a default) since a git revision.
    Check {
        /// The repository root.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The revision to compare with.
        #[arg(long, default_value = "HEAD")]
        against: String,
    },
}

pub(crate) async fn schemas(configured_registry: Option<&str>, action: SchemasAction) -> anyhow::Result<()> {
    match action {
        SchemasAction::Generate { repo } => {
            let files = eventfold_schemas::generate(eventfold_proto::FILE_DESCRIPTOR_SET)?;
            eventfold_schemas::write_tree(&repo, &files)?;
            println!("{} schemas written under {}", files.len(), repo.join(eventfold_schemas::AVRO_DIR).display());
        }
        SchemasAction::Register { registry_url } => {
            let Some(registry_url) = registry_url.or_else(|| configured_registry.map(str::to_owned)) else {
                bail!("no registry: pass --registry-url or set registry.url (EVENTFOLD_REGISTRY__URL)");
            };
            let registry = Registry::new(&registry_url)?;
            let catalog = Catalog::load()?;
            let ids = registry
                .register_catalog(&catalog, eventfold_proto::FILE_DESCRIPTOR_SET)
                .await
                .with_context(|| format!("registering the catalog with {registry_url}"))?;
            for ((event_type, version), registered) in &ids.events {
                println!(
                    "{:<6} {:<60} {event_type} v{version}",
                    registered.id,
                    format!("{} (version {})", registered.subject, registered.version)
                );
            }
            for (path, registered) in &ids.protos {
                println!("{:<6} {path} (version {})", registered.id, registered.version);
            }
            println!("{} Avro subjects, {} proto files registered", ids.events.len(), ids.protos.len());
        }
        SchemasAction::Check { repo, against } => {
            let level = eventfold_schemas::CompatibilityLevel::Full;
            let problems = eventfold_schemas::check_against_git(&repo, &against, level)?;
            if problems.is_empty() {
                println!("schemas/avro: compatible with {against}");
            } else {
                for problem in &problems {
                    eprintln!("{problem}");
                }
                bail!("{} incompatible schema change(s) since {against}", problems.len());
            }
        }
    }
    Ok(())
}

/// What `eventfold dlq` does.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqAction {
    /// The dead letters of a topic: origin, consumer, attempts, error.
    List {
        /// The topic (or its .dlq topic), e.g. eventfold.orders.v1
        topic: String,
    },
    /// Apply the dead letters of a topic again (after a fix: the schema
    /// registered, the decoder repaired), each once, in the consumer's
    /// read model. Kafka-fed projections (consumers
    /// `projection:NAME:vVERSION`) are replayed here; fails while any
    /// still fails.
    Replay {
        /// The topic (or its .dlq topic), e.g. eventfold.orders.v1
        topic: String,
        /// Only the dead letters of this consumer (default: every consumer
        /// with dead letters not yet replayed).
        #[arg(long)]
        consumer: Option<String>,
        /// Schema Registry URL (default: `registry.url` of the
        /// configuration).
        #[arg(long)]
        registry_url: Option<String>,
    },
}

pub(crate) async fn dlq(
    config: &ConsumerConfig,
    database: &Database,
    configured_registry: Option<&str>,
    action: DlqAction,
) -> anyhow::Result<()> {
    match action {
        DlqAction::Replay { topic, consumer, registry_url } => {
            let Some(registry_url) = registry_url.or_else(|| configured_registry.map(str::to_owned)) else {
                bail!("no registry: pass --registry-url or set registry.url (EVENTFOLD_REGISTRY__URL)");
            };
            let consumers: Vec<String> = match consumer {
                Some(consumer) => vec![consumer],
                None => eventfold_bus::pending_consumers(config, database, &topic).await?,
            };
            let decoder = Arc::new(Decoder::new(Catalog::load()?, Registry::new(&registry_url)?));
            let mut failing = 0;
            for consumer in consumers {
                let replayed =
                    eventfold_bus::replay_projection(config, database, &topic, &consumer, decoder.clone()).await?;
                for still in &replayed.failing {
                    let (topic, partition, offset) = &still.origin;
                    eprintln!("{topic}/{partition} offset {offset}: still fails: {}", still.error);
                }
                println!(
                    "{consumer}: {} dead letters applied, {} still failing",
                    replayed.applied,
                    replayed.failing.len()
                );
                failing += replayed.failing.len();
            }
            if failing > 0 {
                bail!("{failing} dead letters still fail: see the warnings above and `eventfold dlq list {topic}`");
            }
        }
        DlqAction::List { topic } => {
            let letters = eventfold_bus::dead_letters(config, database, &topic).await?;
            println!(
                "{:>8} {:<32} {:>9} {:>10} {:<24} {:<8} error",
                "offset", "origin", "partition", "at", "consumer", "replayed"
            );
            for letter in &letters {
                let (origin, partition, offset) = letter.origin();
                println!(
                    "{:>8} {:<32} {:>9} {:>10} {:<24} {:<8} {}",
                    letter.offset,
                    origin,
                    partition,
                    offset,
                    letter.consumer(),
                    if letter.replayed { "yes" } else { "no" },
                    letter.error()
                );
            }
            println!("{} dead letters", letters.len());
        }
    }
    Ok(())
}
