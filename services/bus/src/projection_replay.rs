//! The dead letters of a Kafka-fed projection (consumer
//! `projection:NAME:vVERSION`), applied again after a fix (the schema
//! registered, the decoder repaired): each record is decoded as the
//! [`KafkaSource`](crate::KafkaSource) decodes it and applied in the
//! projection's version.

use std::sync::Arc;

use eventfold_projector::Projection;
use eventfold_store::{Database, bigint};
use tokio_postgres::Transaction;

use crate::{
    ConsumerConfig, Decoder, Error, HandleError, Message, MessageHandler, Result,
    dead_letters::{Replayed, replay_letters},
    offsets,
};

/// Applies a Kafka-fed projection's dead letters while holding its
/// checkpoint's lock (so no batch of a running projector interleaves). A
/// dead letter behind what the projection applied of its stream is
/// refused: applying it now would fold it out of order, and a rebuild from
/// the log is the way to include it.
pub struct ProjectionReplay {
    consumer: String,
    projection: Arc<dyn Projection>,
    version: u32,
    decoder: Arc<Decoder>,
}

impl std::fmt::Debug for ProjectionReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionReplay").field("consumer", &self.consumer).finish_non_exhaustive()
    }
}

impl ProjectionReplay {
    /// The replay of consumer `consumer`'s dead letters, if it is a
    /// projection's (`projection:NAME:vVERSION`, as the projector names
    /// its consumer).
    pub fn for_consumer(consumer: &str, decoder: Arc<Decoder>) -> Option<Self> {
        let rest = consumer.strip_prefix("projection:")?;
        let (name, version) = rest.rsplit_once(":v")?;
        Some(Self {
            consumer: consumer.to_owned(),
            projection: eventfold_projector::by_name(name)?,
            version: version.parse().ok()?,
            decoder,
        })
    }

    async fn apply(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        let event = self.decoder.decode(message).await.map_err(|e| HandleError::Message(e.reason))?;
        let name = self.projection.name();
        let version = i32::try_from(self.version).map_err(|_| HandleError::Message("version out of range".into()))?;
        // Not while a projector of the version applies a batch.
        eventfold_projector::lock_checkpoint(tx, name, version).await?;
        let held = tx
            .query_opt("SELECT 1 FROM projections.checkpoints WHERE name = $1 AND version = $2", &[&name, &version])
            .await?;
        if held.is_none() {
            return Err(HandleError::Message(format!(
                "{name} has no version {}: nothing to replay into",
                self.version
            )));
        }
        let applied = offsets::applied_version_for_update(tx, &self.consumer, &event.stream_id).await?;
        if bigint(event.version) <= applied {
            return Err(HandleError::Message(format!(
                "{} v{} is behind v{applied}, already applied from that stream: not folded out of order; \
                 `eventfold projections rebuild {name}` includes it",
                event.stream_id, event.version,
            )));
        }
        self.projection
            .apply(tx, self.version, &event)
            .await
            .map_err(|e| HandleError::Message(format!("{} v{}: {e}", event.stream_id, event.version)))?;
        offsets::set_version(tx, &self.consumer, &event.stream_id, bigint(event.version)).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl MessageHandler for ProjectionReplay {
    async fn handle(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        self.apply(tx, message).await
    }
}

/// Applies the dead letters of `topic` that the Kafka-fed projection
/// consumer `consumer` sent there and that were not replayed yet (see
/// [`ProjectionReplay`]), each once. [`Error::NotAProjection`] when
/// `consumer` is no projection's.
pub async fn replay_projection(
    config: &ConsumerConfig,
    database: &Database,
    topic: &str,
    consumer: &str,
    decoder: Arc<Decoder>,
) -> Result<Replayed> {
    let handler =
        ProjectionReplay::for_consumer(consumer, decoder).ok_or_else(|| Error::NotAProjection(consumer.to_owned()))?;
    replay_letters(config, database, topic, consumer, &handler).await
}
