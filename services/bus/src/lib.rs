//! Kafka consumption for eventfold on rskafka, which has no consumer
//! groups: a [`Consumer`] owns a configured set of partitions and keeps its
//! offsets in PostgreSQL (`bus.consumer_offsets`), committed in the same
//! transaction as whatever its [`MessageHandler`] writes. A crash therefore
//! neither loses nor double-applies a message's effect. The relay delivers
//! at least once, so the same event may also come again at a later offset:
//! the consumer remembers the event ids it handled (`bus.consumer_events`,
//! in the same transaction, for `dedupe_retention_hours`) and drops those.
//!
//! A message that keeps failing is sent to the dead-letter topic
//! `<topic>.dlq`, with headers saying why and where it came from, and the
//! consumer moves on. [`dead_letters`] lists them and [`replay`] applies
//! them again through a handler, once each, after a fix;
//! [`replay_projection`] does so for a Kafka-fed projection, decoding each
//! record as the [`KafkaSource`] does.
//!
//! OVERVIEW, by module: `kafka` (the broker connection the relay and the
//! consumers share), `consumer` (the [`Consumer`] and what its handler
//! sees), `offsets` (the consumers' rows in PostgreSQL: offsets, handled
//! event ids, applied stream versions), `dead_letters` (sending, listing
//! and replaying dead letters), `projection_replay` (a projection's dead
//! letters applied again), `source` (the [`KafkaSource`] of Kafka-fed
//! projections) and `outage` (the [`Outage`] a consumer and the relay log
//! their recovery with). A consumer's [`Consumer::run`] is one supervised
//! unit of work: it returns on cancellation or on the first failure, and
//! the process's supervisor runs it again after a
//! [`ConsumerConfig::backoff`] pause, from the stored offsets.

mod consumer;
mod dead_letters;
mod kafka;
mod offsets;
mod outage;
mod projection_replay;
mod source;

pub use crate::{
    consumer::{Consumer, ConsumerConfig, HandleError, Message, MessageHandler},
    dead_letters::{DLQ_SUFFIX, DeadLetter, Replayed, StillFailing, dead_letters, headers, pending_consumers, replay},
    kafka::{BrokerTls, Kafka, check_brokers},
    outage::Outage,
    projection_replay::{ProjectionReplay, replay_projection},
    source::{DecodeError, Decoder, KafkaSource, KafkaSourceConfig},
};

/// Errors of consuming.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// No connection from the pool (PostgreSQL away or saturated).
    #[error(transparent)]
    Store(#[from] eventfold_store::Error),
    #[error("broker: {0}")]
    Broker(String),
    /// Dead letters of a consumer that is no Kafka-fed projection: only
    /// its own handler can apply them again.
    #[error(
        "consumer {0:?} is not a Kafka-fed projection (projection:NAME:vVERSION): \
         replay its dead letters with its own handler (eventfold_bus::replay)"
    )]
    NotAProjection(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn broker(e: impl std::fmt::Display) -> Error {
    Error::Broker(e.to_string())
}

/// Describes the Kafka consumers' metrics (the `# HELP` lines of
/// `/metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!("eventfold_consumer_messages_total", "Messages handled, by consumer");
    metrics::describe_counter!(
        "eventfold_consumer_duplicates_total",
        "Messages skipped as handled before, by consumer"
    );
    metrics::describe_counter!("eventfold_consumer_dead_letters_total", "Messages dead-lettered, by consumer");
    metrics::describe_gauge!(
        "eventfold_consumer_lag_messages",
        "Messages on a partition not handled yet, by consumer, topic and partition"
    );
    metrics::describe_counter!(
        "eventfold_kafka_errors_total",
        "Failed Kafka requests, by client (relay, consumer) and operation"
    );
}
