//! The connection to the brokers that the relay, the consumers and the
//! Kafka source share: one rskafka client with the partition clients and
//! topic sizes it has looked up.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rskafka::client::{
    Client, ClientBuilder,
    partition::{PartitionClient, UnknownTopicHandling},
};

use crate::{ConsumerConfig, Error, Result, broker};

/// How the connections to the brokers are encrypted: not at all (the
/// default), or over TLS with a rustls client configuration (built from
/// `[tls]` when `[relay] tls = true`: its CAs, and its certificate for
/// brokers that require client certificates). Set at run time, never from
/// a configuration file.
#[derive(Clone, Default)]
pub struct BrokerTls(Option<Arc<rustls::ClientConfig>>);

impl BrokerTls {
    /// Over TLS with `config`.
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        Self(Some(config))
    }

    /// Whether the connections use TLS.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

impl PartialEq for BrokerTls {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for BrokerTls {}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_on() { "BrokerTls(on)" } else { "BrokerTls(off)" })
    }
}

/// A connection to the brokers, with the partition clients and the topic
/// sizes it has looked up: what the relay and the consumers share.
pub struct Kafka {
    pub(crate) client: Client,
    partitions: BTreeMap<(String, i32), Arc<PartitionClient>>,
    topics: BTreeMap<String, i32>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka").field("topics", &self.topics).finish_non_exhaustive()
    }
}

/// A connection to the brokers of `config`.
pub(crate) async fn connect_kafka(config: &ConsumerConfig) -> Result<Kafka> {
    Kafka::connect(
        &config.brokers,
        &config.tls,
        Duration::from_millis(config.request_timeout_ms.max(1)),
        Duration::from_millis(config.max_backoff_ms),
    )
    .await
}

/// Whether the brokers of `config` answer: a connection and a metadata
/// request, within the request timeout (readiness checks).
pub async fn check_brokers(config: &ConsumerConfig) -> Result<()> {
    let kafka = connect_kafka(config).await?;
    kafka.list_topics(config.timeout()).await.map(|_| ())
}

/// The connection in `slot`, made first if there is none.
pub(crate) async fn connected<'a>(slot: &'a mut Option<Kafka>, config: &ConsumerConfig) -> Result<&'a mut Kafka> {
    if slot.is_none() {
        *slot = Some(connect_kafka(config).await?);
    }
    Ok(slot.as_mut().expect("connected just above"))
}

impl Kafka {
    /// Connects to `brokers` (over TLS as `tls` says). Every broker call of
    /// rskafka retries with exponential backoff (up to `max_backoff`) until
    /// `timeout`.
    pub async fn connect(
        brokers: &[String],
        tls: &BrokerTls,
        timeout: Duration,
        max_backoff: Duration,
    ) -> Result<Kafka> {
        let backoff = rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: max_backoff.max(Duration::from_millis(50)),
            base: 2.0,
            deadline: Some(timeout),
        };
        let mut builder = ClientBuilder::new(brokers.to_vec()).backoff_config(backoff);
        if let Some(config) = &tls.0 {
            builder = builder.tls_config(config.clone());
        }
        let build = builder.build();
        let client = tokio::time::timeout(timeout, build)
            .await
            .map_err(|_| Error::Broker("no connection to the brokers".to_owned()))?
            .map_err(broker)?;
        Ok(Kafka { client, partitions: BTreeMap::new(), topics: BTreeMap::new() })
    }

    /// The client of `topic`/`partition` (looked up once).
    pub async fn partition(&mut self, topic: &str, partition: i32, timeout: Duration) -> Result<Arc<PartitionClient>> {
        let key = (topic.to_owned(), partition);
        if let Some(client) = self.partitions.get(&key) {
            return Ok(client.clone());
        }
        let client =
            tokio::time::timeout(timeout, self.client.partition_client(topic, partition, UnknownTopicHandling::Retry))
                .await
                .map_err(|_| Error::Broker(format!("no leader for {topic}/{partition}")))?
                .map_err(broker)?;
        let client = Arc::new(client);
        self.partitions.insert(key, client.clone());
        Ok(client)
    }

    /// The topics on the brokers.
    pub(crate) async fn list_topics(&self, timeout: Duration) -> Result<Vec<rskafka::topic::Topic>> {
        tokio::time::timeout(timeout, self.client.list_topics())
            .await
            .map_err(|_| Error::Broker("list_topics timed out".to_owned()))?
            .map_err(broker)
    }

    /// Creates `topic` with `partitions` unless it exists (someone else
    /// creating it meanwhile is fine); its partition count, looked up once.
    pub async fn ensure_topic(
        &mut self,
        topic: &str,
        partitions: i32,
        replication_factor: i16,
        timeout: Duration,
    ) -> Result<i32> {
        if let Some(n) = self.topics.get(topic) {
            return Ok(*n);
        }
        let count_of = |listed: &[rskafka::topic::Topic]| {
            listed.iter().find(|t| t.name == topic).map(|t| t.partitions.len() as i32)
        };
        let listed = self.list_topics(timeout).await?;
        let count = match count_of(&listed) {
            Some(count) => count,
            None => {
                let controller = self.client.controller_client().map_err(broker)?;
                let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
                let create = controller.create_topic(topic, partitions.max(1), replication_factor.max(1), ms);
                match tokio::time::timeout(timeout, create).await {
                    Ok(Ok(())) => tracing::info!(topic, partitions, "topic created"),
                    // Created meanwhile by someone else: counted below.
                    Ok(Err(e)) => tracing::debug!(topic, error = %e, "create_topic"),
                    Err(_) => return Err(Error::Broker(format!("creating {topic} timed out"))),
                }
                let listed = self.client.list_topics().await.map_err(broker)?;
                count_of(&listed)
                    .ok_or_else(|| Error::Broker(format!("topic {topic} does not exist after creating it")))?
            }
        };
        if count < 1 {
            return Err(Error::Broker(format!("topic {topic} has no partitions")));
        }
        self.topics.insert(topic.to_owned(), count);
        Ok(count)
    }
}
