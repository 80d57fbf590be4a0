//! `eventfold-bench relay`: the event bus beside the raw broker doing the
//! same work in the same run.
//!
//! - Throughput: the relay sends a log of `--events` order events (read
//!   gap-safely, Avro-encoded with registry ids, produced per partition,
//!   checkpointed), against rskafka producing the same number of records of
//!   the same size in batches of the same size.
//! - Lag at `--rate` events/s: CreateOrder through the command bus, then
//!   until a Kafka-fed projection's checkpoint covers it (append → relay →
//!   Kafka → decode → read model), against a raw record produced and then
//!   fetched by a polling consumer.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_domain::{
    Currency, Money,
    order::{CreateOrder, OrderItem},
};
use eventfold_store::{
    AppendRequest, EventLog, ExpectedVersion, NewEvent, PostgresConfig, PostgresEventLog, Upcasting,
};
use futures_util::StreamExt;
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use uuid::Uuid;

use eventfold_platform::runtime::{Backoff, CancellationToken, supervise};

use crate::append::{Measurement, connect, migrated, ms, thousands};

/// Arguments of `eventfold-bench relay`.
#[derive(Debug, clap::Args)]
pub(crate) struct RelayBenchArgs {
    /// PostgreSQL URL of a throw-away database.
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,
    /// Kafka bootstrap broker, host:port.
    #[arg(long)]
    broker: String,
    /// Schema Registry URL (the catalog is registered first).
    #[arg(long)]
    registry_url: String,
    /// Events for the throughput run.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Appends per second for the lag run.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Measured seconds of the lag run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
}

fn eur() -> Currency {
    "EUR".parse().expect("EUR is a currency")
}

fn order_created(tag: &str, i: usize) -> anyhow::Result<NewEvent> {
    let price = Money::new(1250 + (i % 100) as i64, eur());
    let created = CreateOrder {
        order_id: format!("{tag}-{i}"),
        customer_id: format!("customer-{}", i % 1000),
        currency: eur(),
        items: vec![OrderItem { product_id: format!("sku-{}", i % 50), quantity: 2, unit_price: price }],
        payment_token: None,
        carrier: None,
    };
    let body = serde_json::json!({
        "order_id": created.order_id,
        "customer_id": created.customer_id,
        "currency": "EUR",
        "items": [{"product_id": created.items[0].product_id, "quantity": 2,
                   "unit_price": {"minor": price.minor, "currency": "EUR"}}],
        "total": {"minor": price.minor * 2, "currency": "EUR"},
    });
    let mut event = NewEvent::new("OrderCreated", body);
    event.schema_version = 2;
    Ok(event)
}

pub(crate) async fn relay(args: RelayBenchArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rate == 0 {
        bail!("--events and --rate need values of at least 1");
    }
    let (_admin, machine) = migrated(&args.database_url).await?;
    let registry = eventfold_schemas::Registry::new(&args.registry_url)?;
    registry
        .register_catalog(&eventfold_schemas::Catalog::load()?, eventfold_proto::FILE_DESCRIPTOR_SET)
        .await
        .context("registering the catalog")?;
    let database = eventfold_store::Database::from_url(&args.database_url)?;
    // The relay and the projectors write through sessions that do not wait
    // for the WAL flush, as `eventfold serve relay|projector` do.
    let workers = database.without_flush_wait(2);
    let store = PostgresEventLog::connect(database, PostgresConfig::default()).await?;
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let tag = format!("rbench-{}", &Uuid::new_v4().simple().to_string()[..8]);

    // The log to relay: one order stream per event, appended in batches.
    let indexes: Vec<usize> = (0..args.events).collect();
    let mut appends = futures_util::stream::iter(indexes.chunks(500).map(|chunk| {
        let log = log.clone();
        let requests: Vec<AppendRequest> = chunk
            .iter()
            .map(|i| {
                let event = order_created(&tag, *i).expect("event");
                AppendRequest::new(format!("order-{tag}-{i}"), ExpectedVersion::NoStream, vec![event])
            })
            .collect();
        async move {
            for request in requests {
                log.append(request).await?;
            }
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(8);
    while let Some(done) = appends.next().await {
        done?;
    }
    let head = log.last_position().await?;

    // eventfold: a fresh relay (its own checkpoint) over the whole log.
    let encoder = eventfold_relay::AvroEncoder::new(
        eventfold_schemas::Catalog::load()?,
        eventfold_schemas::Registry::new(&args.registry_url)?,
    );
    let config = eventfold_relay::Config {
        brokers: vec![args.broker.clone()],
        batch_size: 1000,
        name: tag.clone(),
        ..eventfold_relay::Config::default()
    };
    let relay = eventfold_relay::Relay::new(workers.clone(), log.clone(), Arc::new(encoder), config).await?;
    let started = Instant::now();
    while relay.position().await? < head {
        relay.step().await?;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    let relayed = head as f64;

    // raw: the same number of records of the same size, produced in
    // batches of 1000 to 3 partitions.
    let client = ClientBuilder::new(vec![args.broker.clone()]).build().await?;
    let raw_topic = format!("bench.raw.{tag}");
    client.controller_client()?.create_topic(&raw_topic, 3, 1, 5_000).await?;
    let sample = order_created(&tag, 0)?;
    let catalog = eventfold_schemas::Catalog::load()?;
    let value = eventfold_schemas::wire(1, &catalog.encode("OrderCreated", 2, &sample.data)?);
    let partitions = [
        client.partition_client(&raw_topic, 0, UnknownTopicHandling::Retry).await?,
        client.partition_client(&raw_topic, 1, UnknownTopicHandling::Retry).await?,
        client.partition_client(&raw_topic, 2, UnknownTopicHandling::Retry).await?,
    ];
    let record = |i: usize| Record {
        key: Some(format!("order-{tag}-{i}").into_bytes()),
        value: Some(value.clone()),
        headers: BTreeMap::from([("event_type".to_owned(), b"OrderCreated".to_vec())]),
        timestamp: chrono::Utc::now(),
    };
    let started = Instant::now();
    for chunk in (0..head as usize).collect::<Vec<_>>().chunks(1000) {
        let mut by_partition: [Vec<Record>; 3] = Default::default();
        for i in chunk {
            by_partition[i % 3].push(record(*i));
        }
        let sends =
            partitions.iter().zip(by_partition).map(|(p, records)| p.produce(records, Compression::NoCompression));
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
    }
    let raw_secs = started.elapsed().as_secs_f64();

    // Lag: append → relay → Kafka → Kafka-fed projection checkpoint.
    let LagRuns { ours, raw, relay_batches, raw_window } = lag(&args, &workers, &log, &tag, &partitions[0]).await?;

    println!("{machine}");
    println!();
    println!("Relay throughput: {head} events (whole log) in batches of 1,000, Avro + registry ids, 3 partitions.");
    println!();
    println!("| system | events/s | ratio |");
    println!("|---|---:|---:|");
    let (ours_rate, raw_rate) = (relayed / relay_secs, relayed / raw_secs);
    println!(
        "| eventfold relay (read, encode, produce, checkpoint) | {} | {:.2}x |",
        thousands(ours_rate),
        ours_rate / raw_rate
    );
    println!("| raw rskafka produce of the same records | {} | 1.00x |", thousands(raw_rate));
    println!();
    println!(
        "Append → read model via Kafka at {}/s for {}s (eventfold: CreateOrder, relay, Kafka, Kafka-fed order views \
         checkpoint; raw: produce one record, until a polling consumer fetched it). The relay sent {relay_batches} \
         batches; the raw producer sent as many, one per {:.1} ms, timed from the broker's acknowledgement.",
        args.rate,
        args.duration_secs,
        raw_window.as_secs_f64() * 1000.0
    );
    println!();
    println!("| system | done | p50 ms | p99 ms | max ms | p50 ÷ raw | p99 ÷ raw |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let raw_p = |p: f64| raw.as_ref().map_or(f64::NAN, |r| r.percentile_ms(p));
    let (raw_p50, raw_p99) = (raw_p(50.0), raw_p(99.0));
    let row = |name: &str, m: &Measurement| {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}x | {:.2}x |",
            m.latencies.len(),
            ms(m.percentile_ms(50.0)),
            ms(m.percentile_ms(99.0)),
            ms(m.latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)),
            m.percentile_ms(50.0) / raw_p50,
            m.percentile_ms(99.0) / raw_p99
        );
    };
    row("eventfold", &ours);
    match &raw {
        Ok(raw) => row("raw", raw),
        Err(e) => println!("| raw | failed: {e:#} | | | | | |"),
    }
    println!();
    println!("Slowest of each second's sends, ms (where the tail came from):");
    let seconds = |m: &Measurement| {
        m.worst_per_second.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(" ")
    };
    println!("- eventfold: {}", seconds(&ours));
    if let Ok(raw) = &raw {
        println!("- raw: {}", seconds(raw));
    }
    client.controller_client()?.delete_topic(&raw_topic, 5_000).await.ok();
    Ok(())
}

/// The two lag runs.
async fn lag(
    args: &RelayBenchArgs,
    workers: &eventfold_store::Database,
    log: &Arc<dyn EventLog>,
    tag: &str,
    raw_partition: &rskafka::client::partition::PartitionClient,
) -> anyhow::Result<LagRuns> {
    use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
    let encoder = eventfold_relay::AvroEncoder::new(
        eventfold_schemas::Catalog::load()?,
        eventfold_schemas::Registry::new(&args.registry_url)?,
    );
    let relay_name = format!("{tag}-lag");
    let relay_config = eventfold_relay::Config {
        brokers: vec![args.broker.clone()],
        name: relay_name.clone(),
        idle_poll_ms: 5,
        ..eventfold_relay::Config::default()
    };
    // Start the relay at the head: the lag run measures new events only.
    let head = log.last_position().await?;
    let admin = connect(&args.database_url).await?;
    admin
        .execute("INSERT INTO bus.relay_checkpoints (name, position) VALUES ($1, $2)", &[&relay_name, &(head as i64)])
        .await?;
    let relay = eventfold_relay::Relay::new(workers.clone(), log.clone(), Arc::new(encoder), relay_config).await?;
    let source_config = eventfold_bus::KafkaSourceConfig {
        consumer: eventfold_bus::ConsumerConfig {
            brokers: vec![args.broker.clone()],
            fetch_wait_ms: 1,
            ..Default::default()
        },
        relay: relay_name,
        poll_ms: SOURCE_POLL.as_millis() as u64,
        ..Default::default()
    };
    let source = eventfold_bus::KafkaSource::new(
        source_config,
        eventfold_schemas::Catalog::load()?,
        eventfold_schemas::Registry::new(&args.registry_url)?,
    );
    // A version of its own, far from the serving one. It reads every
    // partition from the start (tansu's high watermark is not reliable
    // enough to start from), and the measurement begins once it caught up.
    let version = 9000 + (Uuid::new_v4().as_u128() % 999) as u32;
    let options =
        ProjectorOptions { batch_size: 500, idle_poll: Duration::from_millis(2), ..ProjectorOptions::default() };
    let projector =
        Projector::new(workers.clone(), log.clone(), Arc::new(OrderViews), version, options).with_source(source);
    let (_listening, checkpoint) = checkpoint_watch(&args.database_url, version).await?;
    let stop = CancellationToken::new();
    let relay_stats = relay.stats();
    // Supervised, as in `eventfold serve relay|projector`: a failed step
    // restarts after the backoff.
    let relaying =
        tokio::spawn(supervise("relay", stop.clone(), Backoff::default(), move |token| relay.clone().run(token)));
    let projecting = tokio::spawn(supervise("projector", stop.clone(), Backoff::default(), move |token| {
        projector.clone().run(token)
    }));
    let mut caught_up = checkpoint.subscribe();
    tokio::time::timeout(Duration::from_secs(300), caught_up.wait_for(|p| *p >= head))
        .await
        .context("the Kafka-fed projection did not catch up with the log within 300 s")??;

    let bus = eventfold_command::bus(log.clone(), eventfold_command::Config::default().bus_options());
    let batches_before = relay_stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    let ours = crate::queries::open_loop_lag(args.rate, args.duration_secs, |i| {
        let (bus, checkpoint, tag) = (bus.clone(), checkpoint.clone(), tag.to_owned());
        async move {
            let position = crate::queries::create_order(bus, format!("{tag}-lag-{i}")).await?;
            let acked = Instant::now();
            let mut seen = checkpoint.subscribe();
            tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|p| *p >= position))
                .await
                .with_context(|| format!("position {position} not in the Kafka-fed read model within 30 s"))??;
            Ok(acked.elapsed())
        }
    })
    .await?;
    let relay_batches = relay_stats.batches.load(std::sync::atomic::Ordering::Relaxed) - batches_before;
    stop.cancel();
    let _ = relaying.await;
    let _ = projecting.await;

    // raw: produce one record, fetch it with a polling consumer. As the
    // relay did, records are spread over 3 partitions and go in one
    // request per partition, in as many batches as the relay sent (the
    // broker's cost grows with the batches a partition holds): each waits
    // the relay's mean interval between batches. The consumer starts at a
    // marker record's offset (from the produce answer) of each partition.
    // A topic of its own, holding only these records.
    let producer = Arc::new(ClientBuilder::new(vec![args.broker.clone()]).build().await?);
    let raw_topic = format!("{}.lag", raw_partition.topic());
    producer.controller_client()?.create_topic(&raw_topic, RAW_PARTITIONS as i32, 1, 5_000).await?;
    let mut clients = Vec::new();
    let mut fetched = Vec::new();
    let mut from = Vec::new();
    for partition in 0..RAW_PARTITIONS {
        let client =
            Arc::new(producer.partition_client(&raw_topic, partition as i32, UnknownTopicHandling::Retry).await?);
        let marker =
            Record { key: None, value: Some(vec![0; 64]), headers: BTreeMap::new(), timestamp: chrono::Utc::now() };
        let start_offset = client.produce(vec![marker], Compression::NoCompression).await?[0];
        clients.push(client);
        fetched.push(Arc::new(tokio::sync::watch::channel(start_offset).0));
        from.push(start_offset + 1);
    }
    let poller = tokio::spawn(poll(clients.clone(), from, fetched.clone(), SOURCE_POLL));
    let window = Duration::from_secs(args.duration_secs) / u32::try_from(relay_batches.max(1)).unwrap_or(u32::MAX);
    let linger = window.max(Duration::from_millis(eventfold_relay::Config::default().linger_ms));
    type Queued = (usize, Record, tokio::sync::oneshot::Sender<i64>);
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<Queued>();
    let batcher = tokio::spawn(async move {
        while let Some(first) = queued.recv().await {
            tokio::time::sleep(linger).await;
            let mut batches: Vec<(Vec<Record>, Vec<tokio::sync::oneshot::Sender<i64>>)> =
                (0..RAW_PARTITIONS).map(|_| Default::default()).collect();
            let mut next = Some(first);
            while let Some((partition, record, reply)) = next {
                batches[partition].0.push(record);
                batches[partition].1.push(reply);
                next = queued.try_recv().ok();
            }
            let sends = batches.into_iter().zip(&clients).filter(|((records, _), _)| !records.is_empty()).map(
                |((records, replies), client)| async move {
                    match client.produce(records, Compression::NoCompression).await {
                        Ok(offsets) => {
                            for (offset, reply) in offsets.into_iter().zip(replies) {
                                let _ = reply.send(offset);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "raw produce failed"),
                    }
                },
            );
            futures_util::future::join_all(sends).await;
        }
    });
    let raw = crate::queries::open_loop_lag(args.rate, args.duration_secs, |i| {
        let (queue, fetched) = (queue.clone(), fetched[i % RAW_PARTITIONS].clone());
        async move {
            let record = Record {
                key: Some(format!("raw-{i}").into_bytes()),
                value: Some(vec![0; 64]),
                headers: BTreeMap::new(),
                timestamp: chrono::Utc::now(),
            };
            let (reply, offset) = tokio::sync::oneshot::channel();
            queue.send((i % RAW_PARTITIONS, record, reply)).map_err(|_| anyhow::anyhow!("the raw producer stopped"))?;
            let offset = offset.await.context("the raw produce failed")?;
            let acked = Instant::now();
            let mut seen = fetched.subscribe();
            tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|o| *o >= offset))
                .await
                .with_context(|| format!("raw offset {offset} not fetched within 30 s"))??;
            Ok(acked.elapsed())
        }
    })
    .await;
    batcher.abort();
    poller.abort();
    Ok(LagRuns { ours, raw, relay_batches, raw_window: linger })
}

/// The two lag runs, and how the raw one batched.
struct LagRuns {
    ours: Measurement,
    raw: anyhow::Result<Measurement>,
    /// Batches the relay sent during ours.
    relay_batches: u64,
    /// The raw producer's batching window.
    raw_window: Duration,
}

/// How often the lag run's Kafka source (and the raw consumer) look for
/// new records when idle.
const SOURCE_POLL: Duration = Duration::from_millis(2);

/// Partitions of the raw lag run's topic: as many as the relay's topics.
const RAW_PARTITIONS: usize = 3;

/// The raw consumer, polling as the Kafka source does: every partition at
/// once, again at once while records come, else after `pause`; publishes
/// the last offset fetched per partition.
async fn poll(
    clients: Vec<Arc<rskafka::client::partition::PartitionClient>>,
    mut offsets: Vec<i64>,
    fetched: Vec<Arc<tokio::sync::watch::Sender<i64>>>,
    pause: Duration,
) {
    loop {
        let fetches =
            clients.iter().zip(&offsets).map(|(client, offset)| client.fetch_records(*offset, 1..1_000_000, 1));
        let mut progressed = false;
        for (i, answer) in futures_util::future::join_all(fetches).await.into_iter().enumerate() {
            match answer {
                Ok((records, _)) => {
                    if let Some(last) = records.iter().map(|r| r.offset).max().filter(|last| *last >= offsets[i]) {
                        offsets[i] = last + 1;
                        fetched[i].send_replace(last);
                        progressed = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "raw fetch failed; retrying"),
            }
        }
        if !progressed {
            tokio::time::sleep(pause).await;
        }
    }
}

/// The checkpoint of order_views `version`, from the commit notifications.
/// Keep the returned client: it is the listening session.
async fn checkpoint_watch(
    url: &str,
    version: u32,
) -> anyhow::Result<(tokio_postgres::Client, Arc<tokio::sync::watch::Sender<u64>>)> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let sender = Arc::new(tokio::sync::watch::channel(0u64).0);
    let tx = sender.clone();
    let prefix = format!("order_views:{version}:");
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message
                && let Some(position) = n.payload().strip_prefix(&prefix).and_then(|p| p.parse::<u64>().ok())
            {
                tx.send_modify(|p| *p = (*p).max(position));
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", eventfold_projector::COMMIT_CHANNEL)).await?;
    Ok((client, sender))
}
