//! The consumers' rows in PostgreSQL: the next offset of each partition
//! (`bus.consumer_offsets`), the event ids a consumer handled
//! (`bus.consumer_events`) and the stream versions a Kafka-fed projection
//! applied (`bus.consumer_streams`). Each is written in the transaction of
//! what the consumer applied.

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Error, GenericClient, Transaction};

/// Takes the offsets of consumer `consumer` on `partition` (a topic and
/// partition; `None`: all of the consumer's) for the transaction `tx`. An
/// advisory lock, not the rows': a row lock would give the transaction an
/// id while it waits on the broker, and the gap-safe reads of the event
/// log wait for older transaction ids to finish.
pub(crate) async fn lock_offsets(
    tx: &Transaction<'_>,
    consumer: &str,
    partition: Option<(&str, i32)>,
) -> Result<(), Error> {
    let key = partition.map_or_else(String::new, |(topic, partition)| format!("{topic}/{partition}"));
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", &[&consumer, &key]).await?;
    Ok(())
}

/// The row of `consumer` on `topic`/`partition`, at offset 0 unless it
/// exists. Outside the consumer's transaction: an insert gives a
/// transaction an id.
pub(crate) async fn register(
    client: &impl GenericClient,
    consumer: &str,
    topic: &str,
    partition: i32,
) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO bus.consumer_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, 0) \
             ON CONFLICT DO NOTHING",
            &[&consumer, &topic, &partition],
        )
        .await?;
    Ok(())
}

/// The rows of `consumer` on every (topic, partition) of `topics` and
/// `partitions` (pairwise), at offset 0 unless they exist.
pub(crate) async fn register_all(
    tx: &Transaction<'_>,
    consumer: &str,
    topics: &[&str],
    partitions: &[i32],
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO bus.consumer_offsets (consumer, topic, partition, next_offset) \
         SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int4[]) AS u(t, p) ON CONFLICT DO NOTHING",
        &[&consumer, &topics, &partitions],
    )
    .await?;
    Ok(())
}

/// The next offset `consumer` reads of `topic`/`partition` (0 before the
/// first).
pub(crate) async fn next_offset(
    client: &impl GenericClient,
    consumer: &str,
    topic: &str,
    partition: i32,
) -> Result<i64, Error> {
    let row = client
        .query_opt(
            "SELECT next_offset FROM bus.consumer_offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
            &[&consumer, &topic, &partition],
        )
        .await?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// The next offset of every partition of `consumer`.
pub(crate) async fn next_offsets(tx: &Transaction<'_>, consumer: &str) -> Result<HashMap<(String, i32), i64>, Error> {
    Ok(tx
        .query(
            "SELECT topic, partition, next_offset FROM bus.consumer_offsets WHERE consumer = $1 \
              ORDER BY topic, partition",
            &[&consumer],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Moves `consumer` to offset `next` of `topic`/`partition`.
pub(crate) async fn advance(
    tx: &Transaction<'_>,
    consumer: &str,
    topic: &str,
    partition: i32,
    next: i64,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE bus.consumer_offsets SET next_offset = $4, updated_at = clock_timestamp() \
          WHERE consumer = $1 AND topic = $2 AND partition = $3",
        &[&consumer, &topic, &partition, &next],
    )
    .await?;
    Ok(())
}

/// Moves `consumer` on each (topic, partition, next offset) of `moved`.
pub(crate) async fn advance_all(tx: &Transaction<'_>, consumer: &str, moved: &[(&str, i32, i64)]) -> Result<(), Error> {
    let topics: Vec<&str> = moved.iter().map(|m| m.0).collect();
    let partitions: Vec<i32> = moved.iter().map(|m| m.1).collect();
    let offsets: Vec<i64> = moved.iter().map(|m| m.2).collect();
    tx.execute(
        "UPDATE bus.consumer_offsets o SET next_offset = u.n, updated_at = clock_timestamp() \
           FROM unnest($2::text[], $3::int4[], $4::int8[]) AS u(t, p, n) \
          WHERE o.consumer = $1 AND o.topic = u.t AND o.partition = u.p",
        &[&consumer, &topics, &partitions, &offsets],
    )
    .await?;
    Ok(())
}

/// Marks `ids` handled by `consumer`; the ones it had not handled before.
pub(crate) async fn remember_events(
    tx: &Transaction<'_>,
    consumer: &str,
    ids: &[uuid::Uuid],
) -> Result<HashSet<uuid::Uuid>, Error> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(tx
        .query(
            "INSERT INTO bus.consumer_events (consumer, event_id) SELECT $1, unnest($2::uuid[]) \
             ON CONFLICT DO NOTHING RETURNING event_id",
            &[&consumer, &ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Forgets the event ids `consumer` handled more than `hours` ago.
pub(crate) async fn forget_events(client: &impl GenericClient, consumer: &str, hours: i32) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM bus.consumer_events \
              WHERE consumer = $1 AND seen_at < clock_timestamp() - make_interval(hours => $2)",
            &[&consumer, &hours],
        )
        .await?;
    Ok(())
}

/// The last version `consumer` applied of each of `streams` it applied
/// any of.
pub(crate) async fn applied_versions(
    tx: &Transaction<'_>,
    consumer: &str,
    streams: &[String],
) -> Result<HashMap<String, i64>, Error> {
    Ok(tx
        .query(
            "SELECT stream_id, version FROM bus.consumer_streams WHERE consumer = $1 AND stream_id = ANY($2)",
            &[&consumer, &streams],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The last version `consumer` applied of `stream` (-1: none), its row
/// locked until the transaction ends.
pub(crate) async fn applied_version_for_update(
    tx: &Transaction<'_>,
    consumer: &str,
    stream: &str,
) -> Result<i64, Error> {
    Ok(tx
        .query_opt(
            "SELECT version FROM bus.consumer_streams WHERE consumer = $1 AND stream_id = $2 FOR UPDATE",
            &[&consumer, &stream],
        )
        .await?
        .map_or(-1, |r| r.get(0)))
}

/// Raises the versions `consumer` applied of `streams` to `versions`
/// (pairwise; a version never goes down).
pub(crate) async fn raise_versions(
    tx: &Transaction<'_>,
    consumer: &str,
    streams: &[&str],
    versions: &[i64],
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO bus.consumer_streams (consumer, stream_id, version) \
         SELECT $1, s, v FROM unnest($2::text[], $3::int8[]) AS u(s, v) \
         ON CONFLICT (consumer, stream_id) DO UPDATE \
            SET version = greatest(bus.consumer_streams.version, EXCLUDED.version)",
        &[&consumer, &streams, &versions],
    )
    .await?;
    Ok(())
}

/// Sets the version `consumer` applied of `stream` (a replayed dead
/// letter, checked to be ahead under [`applied_version_for_update`]'s lock).
pub(crate) async fn set_version(tx: &Transaction<'_>, consumer: &str, stream: &str, version: i64) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO bus.consumer_streams (consumer, stream_id, version) VALUES ($1, $2, $3) \
         ON CONFLICT (consumer, stream_id) DO UPDATE SET version = EXCLUDED.version",
        &[&consumer, &stream, &version],
    )
    .await?;
    Ok(())
}
