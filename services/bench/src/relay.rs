//! `eventfold-bench relay`: the event bus beside the raw broker doing the
//! same work in the same run.
//!
//! - Throughput: the relay sends a log of `--events` order events (read
//!   gap-safely, Avro-encoded with registry ids, produced per partition,
//!   checkpointed), against rskafka producing the same events as the same
//!   records (the relay's encoder, key, header set and partitioner) in
//!   batches of the same size. Every side runs on a fresh broker of its
//!   own, in the order relay, raw, raw, relay, so that each order is
//!   measured; rates count the events acknowledged.
//! - Lag at `--rate` events/s: CreateOrder through the command bus, then
//!   until a Kafka-fed projection's checkpoint covers it (append → relay →
//!   Kafka → decode → read model), against the same kind of record
//!   (encoded as the relay does) produced and then fetched by a polling
//!   consumer. Each side on a fresh broker of its own.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use eventfold_domain::{
    Currency, Money,
    order::{CreateOrder, OrderItem},
};
use eventfold_relay::{AvroEncoder, ValueEncoder, partition_for};
use eventfold_store::{
    AllRead, AppendRequest, EventFilter, EventLog, EventMetadata, ExpectedVersion, NewEvent, PostgresConfig,
    PostgresEventLog, RecordedEvent, Upcasting,
};
use futures_util::StreamExt;
use rskafka::{
    client::{
        Client, ClientBuilder,
        partition::{Compression, PartitionClient, UnknownTopicHandling},
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
    /// The Kafka-protocol broker to start (tansu): every measured side gets
    /// a fresh one, with memory storage, on a free loopback port. Default:
    /// the pinned tansu that `tests/run` installs.
    #[arg(long, env = "EVENTFOLD_KAFKA_BIN")]
    broker_bin: Option<PathBuf>,
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

/// Partitions of the topics, on both sides (the relay's default).
const PARTITIONS: i32 = 3;

/// Events per batch (relay) and per chunk (raw).
const BATCH: usize = 1000;

/// A broker process of one measured side; killed on drop.
struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    /// Starts `bin` with memory storage on a free loopback port and waits
    /// until the port answers.
    async fn start(bin: &std::path::Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut broker = Broker { child, addr: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&broker.addr).await.is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!("the broker {} exited: {status}", bin.display());
            }
            if Instant::now() > deadline {
                bail!("the broker on port {port} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker_bin(args: &RelayBenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &args.broker_bin {
        return Ok(bin.clone());
    }
    let home = std::env::var_os("HOME").context("no --broker-bin and no HOME")?;
    let pinned = PathBuf::from(home).join(".cache/eventfold/tools/tansu-calfkit-0.1.2/tansu");
    if !pinned.is_file() {
        bail!("no --broker-bin (or EVENTFOLD_KAFKA_BIN) and no pinned tansu at {}", pinned.display());
    }
    Ok(pinned)
}

/// Creates `topics` with [`PARTITIONS`] partitions (before any clock
/// starts, on both sides).
async fn create_topics(client: &Client, topics: &BTreeSet<String>) -> anyhow::Result<()> {
    let controller = client.controller_client()?;
    for topic in topics {
        controller.create_topic(topic, PARTITIONS, 1, 5_000).await.with_context(|| format!("creating {topic}"))?;
    }
    Ok(())
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

fn encoder(args: &RelayBenchArgs) -> anyhow::Result<AvroEncoder> {
    Ok(AvroEncoder::new(eventfold_schemas::Catalog::load()?, eventfold_schemas::Registry::new(&args.registry_url)?))
}

/// Which side a throughput run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Relay,
    Raw,
}

/// One throughput run: events acknowledged by the broker, in seconds.
struct Run {
    side: Side,
    events: usize,
    seconds: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// The relay over the whole log, from position 0 (a checkpoint of its
/// own), on a fresh broker: the events it sent (counted), and the time.
async fn relay_run(
    args: &RelayBenchArgs,
    bin: &std::path::Path,
    workers: &eventfold_store::Database,
    log: &Arc<dyn EventLog>,
    name: String,
    topics: &BTreeSet<String>,
) -> anyhow::Result<Run> {
    let broker = Broker::start(bin).await?;
    create_topics(&ClientBuilder::new(vec![broker.addr.clone()]).build().await?, topics).await?;
    let config = eventfold_relay::Config {
        brokers: vec![broker.addr.clone()],
        partitions: PARTITIONS,
        batch_size: BATCH,
        name,
        ..eventfold_relay::Config::default()
    };
    let relay = eventfold_relay::Relay::new(workers.clone(), log.clone(), Arc::new(encoder(args)?), config).await?;
    let head = log.last_position().await?;
    let started = Instant::now();
    let mut events = 0;
    while relay.position().await? < head {
        events += relay.step().await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(broker);
    Ok(Run { side: Side::Relay, events, seconds })
}

/// rskafka producing `events` on a fresh broker as the relay does, minus
/// the log read and the checkpoint: chunks of [`BATCH`] one after another,
/// each event encoded by the relay's encoder (Avro, registry id) into the
/// relay's record (key = stream id, the same header set), partitioned by
/// the relay's partitioner, one produce request per partition at once.
async fn raw_run(args: &RelayBenchArgs, bin: &std::path::Path, events: &[RecordedEvent]) -> anyhow::Result<Run> {
    let broker = Broker::start(bin).await?;
    let client = ClientBuilder::new(vec![broker.addr.clone()]).build().await?;
    let encoder = encoder(args)?;
    let topics: BTreeSet<String> = events.iter().map(|e| encoder.topic(e)).collect();
    create_topics(&client, &topics).await?;
    let mut clients: BTreeMap<(String, i32), PartitionClient> = BTreeMap::new();
    for topic in &topics {
        for partition in 0..PARTITIONS {
            let partition_client = client.partition_client(topic, partition, UnknownTopicHandling::Retry).await?;
            clients.insert((topic.clone(), partition), partition_client);
        }
    }
    let started = Instant::now();
    let mut sent = 0;
    for chunk in events.chunks(BATCH) {
        let mut batches: BTreeMap<(String, i32), Vec<Record>> = BTreeMap::new();
        for event in chunk {
            let topic = encoder.topic(event);
            let value = encoder.encode(&topic, event).await.map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
            let partition = partition_for(event.stream_id.as_bytes(), PARTITIONS);
            batches.entry((topic, partition)).or_default().push(eventfold_relay::record(event, value));
        }
        let sends = batches.into_iter().map(|(key, records)| {
            let client = clients.get(&key);
            async move {
                let client = client.context("no partition client")?;
                anyhow::Ok(client.produce(records, Compression::NoCompression).await?.len())
            }
        });
        for acknowledged in futures_util::future::join_all(sends).await {
            sent += acknowledged?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(broker);
    Ok(Run { side: Side::Raw, events: sent, seconds })
}

/// Every event of the log (what the relay sends), read before any clock
/// starts: the raw side's input.
async fn read_log(log: &Arc<dyn EventLog>) -> anyhow::Result<Vec<RecordedEvent>> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let slice = log.read_all(AllRead { after, max_count: 2000, filter: EventFilter::default() }).await?;
        if slice.events.is_empty() {
            return Ok(events);
        }
        after = slice.next_position;
        events.extend(slice.events);
    }
}

pub(crate) async fn relay(args: RelayBenchArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rate == 0 {
        bail!("--events and --rate need values of at least 1");
    }
    let bin = broker_bin(&args)?;
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
    let events = read_log(&log).await?;
    let encoder_for_topics = encoder(&args)?;
    let topics: BTreeSet<String> = events.iter().map(|e| encoder_for_topics.topic(e)).collect();

    // Throughput: relay, raw, raw, relay, each on a fresh broker.
    let mut runs = Vec::new();
    for (n, side) in [Side::Relay, Side::Raw, Side::Raw, Side::Relay].into_iter().enumerate() {
        let run = match side {
            Side::Relay => relay_run(&args, &bin, &workers, &log, format!("{tag}-run{n}"), &topics).await?,
            Side::Raw => raw_run(&args, &bin, &events).await?,
        };
        runs.push(run);
    }

    // Lag: append → relay → Kafka → Kafka-fed projection checkpoint, then
    // the raw producer and consumer, each on a fresh broker.
    let ours_broker = Broker::start(&bin).await?;
    let (ours, relay_batches) = lag_ours(&args, &ours_broker.addr, &workers, &log, &tag).await?;
    drop(ours_broker);
    let raw_broker = Broker::start(&bin).await?;
    let (raw, raw_window) = lag_raw(&args, &raw_broker.addr, &tag, relay_batches).await?;
    drop(raw_broker);

    println!("{machine}");
    println!();
    println!(
        "Relay throughput: the whole log ({} events) in batches of {BATCH}, Avro + registry ids, key = stream id, \
         the relay's headers, {PARTITIONS} partitions by murmur2. Each run on a fresh broker, in the order relay, \
         raw, raw, relay; rates count the events the broker acknowledged.",
        events.len()
    );
    println!();
    println!("| run | system | events | seconds | events/s |");
    println!("|---:|---|---:|---:|---:|");
    for (n, run) in runs.iter().enumerate() {
        let system = match run.side {
            Side::Relay => "eventfold relay (read gap-safely, encode, produce, checkpoint)",
            Side::Raw => "raw rskafka produce of the same records (encode, produce)",
        };
        println!("| {} | {system} | {} | {:.2} | {} |", n + 1, run.events, run.seconds, thousands(run.rate()));
    }
    println!();
    println!("| order | relay events/s | raw events/s | relay ÷ raw |");
    println!("|---|---:|---:|---:|");
    let pair = |relay: &Run, raw: &Run| (relay.rate(), raw.rate(), relay.rate() / raw.rate());
    let mean = |side: Side| {
        let rates: Vec<f64> = runs.iter().filter(|r| r.side == side).map(Run::rate).collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    };
    for (order, (relay, raw)) in
        [("relay first (runs 1, 2)", (&runs[0], &runs[1])), ("raw first (runs 3, 4)", (&runs[3], &runs[2]))]
    {
        let (ours, theirs, ratio) = pair(relay, raw);
        println!("| {order} | {} | {} | {ratio:.2}x |", thousands(ours), thousands(theirs));
    }
    let (relay_mean, raw_mean) = (mean(Side::Relay), mean(Side::Raw));
    println!("| mean | {} | {} | {:.2}x |", thousands(relay_mean), thousands(raw_mean), relay_mean / raw_mean);
    println!();
    println!(
        "Append → read model via Kafka at {}/s for {}s, each side on a fresh broker (eventfold: CreateOrder, relay, \
         Kafka, Kafka-fed order views checkpoint; raw: produce one record encoded as the relay encodes it, until a \
         polling consumer fetched it). The relay sent {relay_batches} batches; the raw producer sent as many, one \
         per {:.1} ms, timed from the broker's acknowledgement.",
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
    Ok(())
}

/// The eventfold lag run on `broker` (fresh): the measurement and the
/// batches the relay sent during it.
async fn lag_ours(
    args: &RelayBenchArgs,
    broker: &str,
    workers: &eventfold_store::Database,
    log: &Arc<dyn EventLog>,
    tag: &str,
) -> anyhow::Result<(Measurement, u64)> {
    use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
    let relay_name = format!("{tag}-lag");
    let relay_config = eventfold_relay::Config {
        brokers: vec![broker.to_owned()],
        partitions: PARTITIONS,
        name: relay_name.clone(),
        idle_poll_ms: 5,
        ..eventfold_relay::Config::default()
    };
    // Start the relay at the head: the lag run measures new events only
    // (the broker is fresh; the source sees the relay's checkpoint and
    // catches up with the head at once).
    let head = log.last_position().await?;
    let admin = connect(&args.database_url).await?;
    admin
        .execute("INSERT INTO bus.relay_checkpoints (name, position) VALUES ($1, $2)", &[&relay_name, &(head as i64)])
        .await?;
    let relay =
        eventfold_relay::Relay::new(workers.clone(), log.clone(), Arc::new(encoder(args)?), relay_config).await?;
    let source_config = eventfold_bus::KafkaSourceConfig {
        consumer: eventfold_bus::ConsumerConfig {
            brokers: vec![broker.to_owned()],
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
    // A version of its own, far from the serving one; the measurement
    // begins once it caught up.
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
    Ok((ours, relay_batches))
}

/// An OrderCreated as the command bus stores it (a correlation id, no
/// causation id), for the raw lag run to encode as the relay would.
fn raw_event(tag: &str, i: usize) -> anyhow::Result<RecordedEvent> {
    let new = order_created(&format!("{tag}-raw"), i)?;
    Ok(RecordedEvent {
        event_id: new.event_id,
        stream_id: format!("order-{tag}-raw-{i}"),
        version: 0,
        global_position: i as u64 + 1,
        event_type: new.event_type,
        schema_version: new.schema_version,
        data: new.data,
        metadata: EventMetadata { correlation_id: Some(Uuid::now_v7().to_string()), ..EventMetadata::default() },
        created_at: SystemTime::now(),
        hash: [0; 32],
    })
}

/// The raw lag run on `broker` (fresh): produce one record per send,
/// encoded and keyed as the relay does (its encoder, record and
/// partitioner), fetch it with a polling consumer. As the relay did,
/// records go in one request per partition, in as many batches as the
/// relay sent (the broker's cost grows with the batches a partition
/// holds): each waits the relay's mean interval between batches. The
/// consumer starts at a marker record's offset (from the produce answer)
/// of each partition. Returns the measurement and the batching window.
async fn lag_raw(
    args: &RelayBenchArgs,
    broker: &str,
    tag: &str,
    relay_batches: u64,
) -> anyhow::Result<(anyhow::Result<Measurement>, Duration)> {
    let encoder = Arc::new(encoder(args)?);
    let topic = encoder.topic(&raw_event(tag, 0)?);
    let producer = Arc::new(ClientBuilder::new(vec![broker.to_owned()]).build().await?);
    create_topics(&producer, &BTreeSet::from([topic.clone()])).await?;
    let mut clients = Vec::new();
    let mut fetched = Vec::new();
    let mut from = Vec::new();
    for partition in 0..PARTITIONS {
        let client = Arc::new(producer.partition_client(&topic, partition, UnknownTopicHandling::Retry).await?);
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
                (0..PARTITIONS).map(|_| Default::default()).collect();
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
        let (queue, fetched, encoder, tag) = (queue.clone(), fetched.clone(), encoder.clone(), tag.to_owned());
        async move {
            let event = raw_event(&tag, i)?;
            let topic = encoder.topic(&event);
            let value = encoder.encode(&topic, &event).await.map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
            let partition = usize::try_from(partition_for(event.stream_id.as_bytes(), PARTITIONS))?;
            let (reply, offset) = tokio::sync::oneshot::channel();
            queue
                .send((partition, eventfold_relay::record(&event, value), reply))
                .map_err(|_| anyhow::anyhow!("the raw producer stopped"))?;
            let offset = offset.await.context("the raw produce failed")?;
            let acked = Instant::now();
            let mut seen = fetched[partition].subscribe();
            tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|o| *o >= offset))
                .await
                .with_context(|| format!("raw offset {offset} not fetched within 30 s"))??;
            Ok(acked.elapsed())
        }
    })
    .await;
    batcher.abort();
    poller.abort();
    Ok((raw, linger))
}

/// How often the lag run's Kafka source (and the raw consumer) look for
/// new records when idle.
const SOURCE_POLL: Duration = Duration::from_millis(2);

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
