//! `eventfold schemas generate|register|check` and `eventfold dlq
//! list|replay`: the operator's side of the event bus.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, bail};
use eventfold_bus::{Decoder, HandleError, Message, MessageHandler};
use eventfold_projector::Projection;
use eventfold_schemas::{Catalog, Registry};
use tokio_postgres::Transaction;

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

/// A projection consumer's name: `projection:NAME:vVERSION` (see
/// `Projector`), as (projection, version).
fn projection_consumer(consumer: &str) -> Option<(Arc<dyn Projection>, u32)> {
    let rest = consumer.strip_prefix("projection:")?;
    let (name, version) = rest.rsplit_once(":v")?;
    Some((eventfold_projector::by_name(name)?, version.parse().ok()?))
}

/// Replays a Kafka-fed projection's dead letters: decodes each record as
/// the Kafka source does, and applies it in the projection's version while
/// holding its checkpoint row (so no batch of a running projector
/// interleaves). A dead letter behind what the projection applied of its
/// stream is refused: applying it now would fold it out of order, and a
/// rebuild from the log is the way to include it.
struct ProjectionReplay {
    consumer: String,
    projection: Arc<dyn Projection>,
    version: u32,
    decoder: Decoder,
}

#[async_trait::async_trait]
impl MessageHandler for ProjectionReplay {
    async fn handle(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        let result = self.apply(tx, message).await;
        if let Err(e) = &result {
            let (topic, partition, offset) = (&message.topic, message.partition, message.offset);
            eprintln!("{topic}/{partition} offset {offset}: still fails: {e}");
        }
        result
    }
}

impl ProjectionReplay {
    async fn apply(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        let event = self.decoder.decode(message).await.map_err(|e| HandleError::Message(e.reason))?;
        let version = i32::try_from(self.version).map_err(|_| HandleError::Message("version out of range".into()))?;
        // Not while a projector of the version applies a batch.
        eventfold_projector::lock_checkpoint(tx, self.projection.name(), version).await?;
        let held = tx
            .query_opt(
                "SELECT 1 FROM projections.checkpoints WHERE name = $1 AND version = $2",
                &[&self.projection.name(), &version],
            )
            .await?;
        if held.is_none() {
            return Err(HandleError::Message(format!(
                "{} has no version {}: nothing to replay into",
                self.projection.name(),
                self.version
            )));
        }
        let applied: i64 = tx
            .query_opt(
                "SELECT version FROM bus.consumer_streams WHERE consumer = $1 AND stream_id = $2 FOR UPDATE",
                &[&self.consumer, &event.stream_id],
            )
            .await?
            .map_or(-1, |r| r.get(0));
        if event.version as i64 <= applied {
            return Err(HandleError::Message(format!(
                "{} v{} is behind v{applied}, already applied from that stream: not folded out of order; \
                 `eventfold projections rebuild {}` includes it",
                event.stream_id,
                event.version,
                self.projection.name()
            )));
        }
        self.projection
            .apply(tx, self.version, &event)
            .await
            .map_err(|e| HandleError::Message(format!("{} v{}: {e}", event.stream_id, event.version)))?;
        tx.execute(
            "INSERT INTO bus.consumer_streams (consumer, stream_id, version) VALUES ($1, $2, $3) \
             ON CONFLICT (consumer, stream_id) DO UPDATE SET version = EXCLUDED.version",
            &[&self.consumer, &event.stream_id, &(event.version as i64)],
        )
        .await?;
        Ok(())
    }
}

pub(crate) async fn dlq(
    config: &eventfold_bus::ConsumerConfig,
    database_url: &str,
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
                None => {
                    let mut pending: Vec<String> = eventfold_bus::dead_letters(config, database_url, &topic)
                        .await?
                        .iter()
                        .filter(|l| !l.replayed)
                        .map(|l| l.consumer().to_owned())
                        .collect();
                    pending.sort();
                    pending.dedup();
                    pending
                }
            };
            let mut failing = 0;
            for consumer in consumers {
                let Some((projection, version)) = projection_consumer(&consumer) else {
                    bail!(
                        "consumer {consumer:?} is not a Kafka-fed projection (projection:NAME:vVERSION): \
                         replay its dead letters with its own handler (eventfold_bus::replay)"
                    );
                };
                let decoder = Decoder::new(Catalog::load()?, Registry::new(&registry_url)?);
                let handler = ProjectionReplay { consumer: consumer.clone(), projection, version, decoder };
                let (applied, still) = eventfold_bus::replay(config, database_url, &topic, &consumer, &handler).await?;
                println!("{consumer}: {applied} dead letters applied, {still} still failing");
                failing += still;
            }
            if failing > 0 {
                bail!("{failing} dead letters still fail: see the warnings above and `eventfold dlq list {topic}`");
            }
        }
        DlqAction::List { topic } => {
            let letters = eventfold_bus::dead_letters(config, database_url, &topic).await?;
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
