//! The PostgreSQL adapter (tokio-postgres + bb8).
//!
//! - Appends go through a group commit (`writer.rs`): concurrent appends are
//!   queued and a few writer tasks, each with its own connection, take
//!   whatever is queued and run it as one batch (`append.rs`): one
//!   transaction of two pipelined round trips for many appends, with the
//!   checks and the hash chain computed here from the locked stream heads.
//!   Every append keeps its own expected-version check, so one append's
//!   conflict never fails another. The writers run supervised: one that crashes
//!   (panics) is started again, and the appends of its batch answer
//!   `Unavailable` (outcome unknown; a retry with the same request id gets
//!   the first answer). [`append_in`] runs the same call inside a caller's
//!   transaction.
//! - Reads of the global log are gap-safe (see [`xid`]): a position that is
//!   missing because its transaction has not committed yet is waited for,
//!   never skipped.
//! - Appends of this process wake its live subscriptions directly. A
//!   notifier task (`notify.rs`) then sends `NOTIFY eventstore_appended` from
//!   its own connection, after the writers' commits and coalesced: a NOTIFY
//!   inside the writers' transactions would hold a cluster-wide lock until
//!   their commits are flushed and serialise them. `LISTEN
//!   eventstore_appended` wakes live subscriptions when another process
//!   appends (a lost notification only delays them until their next poll).
//! - Request ids (AIP-155) are forgotten after their retention by a
//!   background task (`requests.rs`).
//!
//! This module holds the adapter itself and its [`EventLog`] queries;
//! `rows.rs` turns rows into the store's model and holds the SQL the reads
//! share.

mod append;
mod notify;
mod requests;
mod rows;
mod tables;
mod writer;
mod xid;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde_json::Value;
use tokio::{
    sync::{Mutex, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub use self::{
    notify::notify_appended,
    tables::{MAX_SCHEMA_LEN, MAX_TABLE_LEN, Tables, is_plain_identifier},
    writer::{append_all_in, append_in},
};
use self::{
    requests::{forget_requests, prune_requests},
    rows::{
        EVENT_COLUMNS, EVENT_SIZE, PAGED_COLUMNS, SCAN_SQL, STREAM_COLUMNS, event_from_row, fetch_stream, like_prefix,
        stream_from_row, to_hash,
    },
    writer::{Job, Writer},
    xid::{GapBook, PendingGap, XidSnapshot},
};
use crate::{
    backoff::Backoff,
    error::{Error, Result},
    log::EventLog,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, Direction, ExpectedVersion, ListStreams, MAX_PAGE_BYTES,
        RequestKey, Snapshot, SnapshotQuery, StreamInfo, StreamPage, StreamRead, StreamSlice, bigint, ceil_micros,
        check_stream_id, check_version, from_bigint,
    },
    pg::{Database, PgConnection, db_error},
    supervise::supervise,
};

/// Waits before a crashed group-commit writer starts again: short, since
/// appends queue meanwhile.
const WRITER_RESTART: Backoff =
    Backoff { first: Duration::from_millis(10), max: Duration::from_secs(1), factor: 2, jitter: 0.2 };

/// Settings of the PostgreSQL adapter.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Writer tasks of the group commit (each holds one connection).
    pub writers: usize,
    /// Most appends one group-commit transaction takes.
    pub max_batch_appends: usize,
    /// Most events one group-commit transaction takes (a larger single
    /// append still goes alone).
    pub max_batch_events: usize,
    /// How long a read of the global log waits for a missing position's
    /// transaction to finish before answering with what precedes it.
    pub gap_wait: Duration,
    /// Least time between two notifications of other processes' live
    /// subscriptions (their extra wake-up latency, at most).
    pub notify_interval: Duration,
    /// How long a group-commit call may take before its connection is
    /// dropped and its appends answer `Unavailable` (outcome unknown: retry
    /// with the same request id).
    pub append_timeout: Duration,
    /// How long request ids (AIP-155) are remembered; older ones are
    /// pruned about every `retention / 100` (at least a minute).
    pub request_retention: Duration,
    /// Where the tables are: the platform's event store, or a topic's own.
    pub tables: Tables,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            writers: 2,
            max_batch_appends: 1000,
            max_batch_events: 10_000,
            gap_wait: Duration::from_millis(250),
            notify_interval: Duration::from_millis(5),
            append_timeout: Duration::from_secs(30),
            request_retention: crate::memory::DEFAULT_REQUEST_RETENTION,
            tables: Tables::platform(),
        }
    }
}

/// The event log on PostgreSQL. Needs the schema of `eventfold migrate up`.
pub struct PostgresEventLog {
    database: Database,
    tables: Tables,
    jobs: mpsc::Sender<Job>,
    appended: watch::Sender<u64>,
    gap_wait: Duration,
    gaps: std::sync::Mutex<GapBook>,
    /// Stops the supervised writers (on drop).
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PostgresEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventLog").finish_non_exhaustive()
    }
}

impl Drop for PostgresEventLog {
    fn drop(&mut self) {
        self.token.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PostgresEventLog {
    /// Set up pool, writers and listener. Connections are made lazily, so
    /// this succeeds while PostgreSQL is down; calls then answer
    /// `Unavailable` until it is back.
    pub async fn connect(database: Database, config: PostgresConfig) -> Result<Self> {
        let (appended, _) = watch::channel(0);
        let (committed, committed_rx) = watch::channel(0);
        let (jobs, receiver) = mpsc::channel(config.max_batch_appends.max(1).saturating_mul(4));
        let receiver = Arc::new(Mutex::new(receiver));
        let mut tasks = Vec::new();
        let token = CancellationToken::new();
        let writer = Writer {
            database: database.clone(),
            tables: config.tables.clone(),
            append_timeout: config.append_timeout,
            jobs: receiver,
            heads: [appended.clone(), committed.clone()],
            max_appends: config.max_batch_appends.max(1),
            max_events: config.max_batch_events.max(1),
        };
        for _ in 0..config.writers.max(1) {
            // Supervised: a writer that panics (a crash of this component,
            // e.g. at failpoint `store::after_commit`) is started again
            // instead of leaving the queue without a writer.
            let writer = writer.clone();
            tasks.push(tokio::spawn(supervise("group commit writer", token.clone(), WRITER_RESTART, move |token| {
                writer::writer(writer.clone(), token)
            })));
        }
        tasks.push(tokio::spawn(notify::notifier(
            database.clone(),
            config.tables.clone(),
            config.notify_interval,
            committed_rx,
        )));
        tasks.push(tokio::spawn(notify::listener(database.clone(), config.tables.clone(), appended.clone())));
        tasks.push(tokio::spawn(prune_requests(database.clone(), config.tables.clone(), config.request_retention)));
        Ok(Self {
            database,
            tables: config.tables,
            jobs,
            appended,
            gap_wait: config.gap_wait,
            gaps: std::sync::Mutex::default(),
            token,
            tasks,
        })
    }

    /// Forgets now the request ids answered more than `age` ago (the
    /// background pruning does this with `request_retention`); how many.
    pub async fn forget_requests_older_than(&self, age: Duration) -> Result<u64> {
        forget_requests(&self.database, &self.tables, age).await
    }

    async fn conn(&self) -> Result<PgConnection<'_>> {
        self.database.get().await
    }

    /// The segments `(stream, first version, last version)` whose events
    /// make up `stream_id`: ancestors' shared history first.
    async fn segments(&self, client: &Client, stream_id: &str) -> Result<(StreamInfo, Vec<(String, i64, i64)>)> {
        let info = fetch_stream(client, &self.tables, stream_id)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream_id.to_owned()))?;
        if info.deleted_at.is_some() {
            return Err(Error::StreamDeleted(stream_id.to_owned()));
        }
        let own_start = info.parent.as_ref().map_or(0, |(_, at)| bigint(*at).saturating_add(1));
        let mut segments = vec![(stream_id.to_owned(), own_start, i64::MAX)];
        let mut parent = info.parent.clone();
        // An ancestor contributes up to the lowest fork point below it: a
        // branch of a branch at 1 holds its grandparent's versions 0 and 1
        // only, even where the parent forked later.
        let mut cap = i64::MAX;
        while let Some((id, at)) = parent {
            let row = fetch_stream(client, &self.tables, &id)
                .await?
                .ok_or_else(|| Error::Internal(format!("branch parent {id} of {stream_id} is missing")))?;
            let start = row.parent.as_ref().map_or(0, |(_, p)| bigint(*p).saturating_add(1));
            cap = cap.min(bigint(at));
            segments.insert(0, (id, start, cap));
            parent = row.parent;
        }
        Ok((info, segments))
    }
}

#[async_trait]
impl EventLog for PostgresEventLog {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        request.validate()?;
        let contents = writer::content_digests(&request);
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { key: request.request_key(), request, contents, reply })
            .await
            .map_err(|_| Error::Unavailable("the event log is shutting down".to_owned()))?;
        // A writer that crashed drops its batch's answers: the batch may have
        // committed or not.
        answer.await.map_err(|_| {
            Error::Unavailable(
                "the append writer stopped before answering, the outcome is unknown; retry with the same request id"
                    .to_owned(),
            )
        })?
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        read.validate()?;
        let client = self.conn().await?;
        let (info, segments) = self.segments(&client, &read.stream_id).await?;
        let ids: Vec<&str> = segments.iter().map(|s| s.0.as_str()).collect();
        let lows: Vec<i64> = segments.iter().map(|s| s.1).collect();
        let highs: Vec<i64> = segments.iter().map(|s| s.2).collect();
        // Versions were validated to fit a bigint (`StreamRead::validate`).
        // The driver sends whole microseconds (what is stored): a bound
        // between two is rounded up, which keeps "at or after" and "before"
        // exact for stored times.
        let (start_time, end_time) = (read.start_time.map(ceil_micros), read.end_time.map(ceil_micros));
        let (lo, hi, order) = match read.direction {
            Direction::Forwards => (read.from_version.map_or(0, bigint), i64::MAX, "ASC"),
            Direction::Backwards => (0, read.from_version.map_or(i64::MAX, bigint), "DESC"),
        };
        let hi = read.max_version.map_or(hi, |m| hi.min(bigint(m)));
        let limit = read.max_count.clamp(1, crate::model::MAX_READ_COUNT);
        let page_bytes = i64::try_from(MAX_PAGE_BYTES).unwrap_or(i64::MAX);
        // Payloads only up to the page's byte budget (the first event always):
        // the rows beyond it come without data, and the page ends before them.
        let rows = client
            .query(
                &*self.tables.sql(&format!(
                    "SELECT {PAGED_COLUMNS}, \
                            CASE WHEN x.run <= $9 OR x.run = x.size THEN x.data END AS data, \
                            CASE WHEN x.run <= $9 OR x.run = x.size THEN x.metadata END AS metadata \
                     FROM (SELECT y.*, sum(y.size) OVER (ORDER BY y.version {order} ROWS UNBOUNDED PRECEDING) AS run \
                           FROM (SELECT {EVENT_COLUMNS}, {EVENT_SIZE} AS size FROM eventstore.events e \
                                 JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS s (id, lo, hi) \
                                   ON e.stream_id = s.id AND e.version BETWEEN s.lo AND s.hi \
                                 WHERE e.version BETWEEN $4 AND $5 \
                                   AND ($6::timestamptz IS NULL OR e.created_at >= $6) \
                                   AND ($7::timestamptz IS NULL OR e.created_at < $7) \
                                 ORDER BY e.version {order} LIMIT $8) y) x \
                     ORDER BY x.version {order}"
                )),
                &[
                    &ids,
                    &lows,
                    &highs,
                    &lo,
                    &hi,
                    &start_time,
                    &end_time,
                    &i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
                    &page_bytes,
                ],
            )
            .await
            .map_err(db_error)?;
        let mut events = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            match event_from_row(row)? {
                Some(event) => events.push(event),
                None => break,
            }
        }
        let end_of_stream = events.len() == rows.len();
        Ok(StreamSlice { events, stream_version: info.version, end_of_stream })
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        read.validate()?;
        let client = self.conn().await?;
        let max_count = read.max_count.clamp(1, crate::model::MAX_READ_COUNT);
        let scan = if read.filter.is_empty() { max_count } else { max_count.saturating_mul(8).clamp(1000, 20_000) };
        let scan_rows = i64::try_from(scan).unwrap_or(i64::MAX);
        let max_rows = i64::try_from(max_count).unwrap_or(i64::MAX);
        let page_bytes = i64::try_from(MAX_PAGE_BYTES).unwrap_or(i64::MAX);
        let prefixes: Option<Vec<String>> = (!read.filter.stream_prefixes.is_empty())
            .then(|| read.filter.stream_prefixes.iter().map(|p| like_prefix(p)).collect());
        let types: Option<&Vec<String>> = (!read.filter.event_types.is_empty()).then_some(&read.filter.event_types);
        // Validated to fit a bigint (`AllRead::validate`).
        let after = bigint(read.after);
        let deadline = Instant::now().checked_add(self.gap_wait).unwrap_or_else(Instant::now);
        let gaps = || self.gaps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let rows = client
                .query(&*self.tables.sql(SCAN_SQL), &[&after, &prefixes, &types, &scan_rows, &page_bytes, &max_rows])
                .await
                .map_err(db_error)?;
            let Some(first) = rows.first() else {
                return Ok(AllSlice { events: Vec::new(), next_position: read.after, end_of_log: true });
            };
            let snapshot_text: String = first.get("snap");
            let snapshot = XidSnapshot::parse(&snapshot_text)
                .ok_or_else(|| Error::Internal(format!("unparsable snapshot {snapshot_text}")))?;
            let max_seen = rows.last().map_or(0, |r| from_bigint(r.get("global_position")));
            let resolved_upto = gaps().final_upto(&snapshot);

            let mut position = read.after;
            let mut events = Vec::new();
            let mut blocked = false;
            let mut full = false;
            let mut matched: usize = 0;
            let scanned = rows.len();
            // Each row is dropped once its event is made: a page of large
            // events is not held twice (as rows and as events) at once.
            for row in rows {
                let at = from_bigint(row.get("global_position"));
                if at != position.saturating_add(1) && at > resolved_upto {
                    blocked = true;
                    break;
                }
                if row.get::<_, bool>("matched") {
                    let Some(event) = event_from_row(&row)? else {
                        // Beyond the page's byte budget: the page ends here.
                        full = true;
                        break;
                    };
                    events.push(event);
                    matched = matched.saturating_add(1);
                }
                position = at;
                if matched == max_count {
                    break;
                }
            }
            if full {
                return Ok(AllSlice { events, next_position: position, end_of_log: false });
            }
            if !blocked {
                let end_of_log = scanned < scan && matched < max_count;
                return Ok(AllSlice { events, next_position: position, end_of_log });
            }
            if position > read.after || Instant::now() >= deadline {
                // Progress up to the missing position, or time is up: answer
                // what is safe; the caller continues from `position`.
                return Ok(AllSlice { events, next_position: position, end_of_log: false });
            }
            if !gaps().covers(position.saturating_add(1)) {
                // A transaction id of our own, taken after the scan's
                // snapshot, bounds every transaction that may hold a
                // missing position (see `xid`). Only new gaps cost an id.
                let bound: String =
                    client.query_one("SELECT pg_current_xact_id()::text", &[]).await.map_err(db_error)?.get(0);
                let bound = bound.parse().map_err(|_| Error::Internal(format!("unparsable transaction id {bound}")))?;
                gaps().add(PendingGap { upto: max_seen, bound });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn last_position(&self) -> Result<u64> {
        let client = self.conn().await?;
        let row = client
            .query_one(&*self.tables.sql("SELECT coalesce(max(global_position), 0) FROM eventstore.events"), &[])
            .await
            .map_err(db_error)?;
        Ok(from_bigint(row.get(0)))
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        let client = self.conn().await?;
        match fetch_stream(&client, &self.tables, stream_id).await? {
            None => Err(Error::StreamNotFound(stream_id.to_owned())),
            Some(info) if info.deleted_at.is_some() => Err(Error::StreamDeleted(stream_id.to_owned())),
            Some(info) => Ok(info),
        }
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        query.validate()?;
        let client = self.conn().await?;
        let limit = query.limit.clamp(1, 1000);
        let prefix = query.prefix.as_deref().map(like_prefix);
        let rows = client
            .query(
                &*self.tables.sql(&format!(
                    "SELECT {STREAM_COLUMNS} FROM eventstore.streams \
                     WHERE ($1::text IS NULL OR stream_id > $1) \
                       AND ($2::text IS NULL OR stream_id LIKE $2) \
                       AND ($3 OR deleted_at IS NULL) \
                       AND (version >= 0 OR parent_stream_id IS NOT NULL) \
                     ORDER BY stream_id LIMIT $4"
                )),
                &[
                    &query.after,
                    &prefix,
                    &query.show_deleted,
                    &i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(db_error)?;
        let mut streams: Vec<StreamInfo> = rows.iter().take(limit).map(stream_from_row).collect::<Result<_>>()?;
        let next_after = (rows.len() > limit).then(|| streams.last().map(|s| s.stream_id.clone())).flatten();
        streams.truncate(limit);
        Ok(StreamPage { streams, next_after })
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        check_version("expected_version", expected_version)?;
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let row = tx
            .query_opt(
                &*self.tables.sql(&format!(
                    "SELECT {STREAM_COLUMNS} FROM eventstore.streams \
                     WHERE stream_id = $1 AND (version >= 0 OR parent_stream_id IS NOT NULL) FOR UPDATE"
                )),
                &[&stream_id],
            )
            .await
            .map_err(db_error)?;
        let info = row.map(|r| stream_from_row(&r)).transpose()?;
        let info = match info {
            None => return Err(Error::StreamNotFound(stream_id.to_owned())),
            Some(i) if i.deleted_at.is_some() => return Err(Error::StreamDeleted(stream_id.to_owned())),
            Some(i) => i,
        };
        if let Some(expected) = expected_version
            && info.version != Some(expected)
        {
            return Err(Error::WrongExpectedVersion {
                stream: stream_id.to_owned(),
                expected: ExpectedVersion::Exact(expected),
                actual: info.version,
            });
        }
        let row = tx
            .query_one(
                &*self.tables.sql(&format!(
                    "UPDATE eventstore.streams SET deleted_at = clock_timestamp(), updated_at = clock_timestamp() \
                     WHERE stream_id = $1 RETURNING {STREAM_COLUMNS}"
                )),
                &[&stream_id],
            )
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        stream_from_row(&row)
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        check_stream_id("source_stream_id", source)?;
        check_stream_id("branch_stream_id", branch)?;
        check_version("at_version", Some(at_version))?;
        let mut client = self.conn().await?;
        let (info, segments) = self.segments(&client, source).await?;
        if info.version.is_none_or(|v| at_version > v) {
            return Err(Error::invalid(
                "at_version",
                format!("stream {source} has no version {at_version} (current: {:?})", info.version),
            ));
        }
        let (holder, _, _) = segments
            .iter()
            .find(|(_, lo, hi)| (*lo..=*hi).contains(&bigint(at_version)))
            .ok_or_else(|| Error::Internal(format!("no segment of {source} holds version {at_version}")))?;
        let tx = client.transaction().await.map_err(db_error)?;
        let head: Vec<u8> = tx
            .query_one(
                &*self.tables.sql("SELECT hash FROM eventstore.events WHERE stream_id = $1 AND version = $2"),
                &[holder, &bigint(at_version)],
            )
            .await
            .map_err(db_error)?
            .get(0);
        let row = tx
            .query_opt(
                &*self.tables.sql(&format!(
                    "INSERT INTO eventstore.streams (stream_id, version, head_hash, parent_stream_id, parent_version) \
                     VALUES ($1, $2, $3, $4, $2) ON CONFLICT (stream_id) DO NOTHING RETURNING {STREAM_COLUMNS}"
                )),
                &[&branch, &bigint(at_version), &head, &source],
            )
            .await
            .map_err(db_error)?;
        let Some(row) = row else {
            return Err(Error::StreamAlreadyExists(branch.to_owned()));
        };
        tx.commit().await.map_err(db_error)?;
        stream_from_row(&row)
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<Snapshot> {
        snapshot.validate()?;
        // The link is the stream's own, read here: what a caller passes is
        // ignored (a branch's shared history included, through `read_stream`).
        let mut at = StreamRead::forwards(&snapshot.stream_id, 1);
        at.from_version = Some(snapshot.version);
        let head = self.read_stream(at).await?.events.into_iter().next().filter(|e| e.version == snapshot.version);
        let Some(head) = head else {
            return Err(Error::invalid(
                "version",
                format!("stream {} has no version {}", snapshot.stream_id, snapshot.version),
            ));
        };
        snapshot.head_hash = head.hash;
        let client = self.conn().await?;
        let row = client
            .query_one(
                &*self.tables.sql("INSERT INTO eventstore.snapshots (stream_id, namespace, version, schema_version, state, head_hash) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (stream_id, namespace, version) DO UPDATE \
                   SET schema_version = EXCLUDED.schema_version, state = EXCLUDED.state, \
                       head_hash = EXCLUDED.head_hash, created_at = clock_timestamp() \
                 RETURNING created_at"),
                &[
                    &snapshot.stream_id,
                    &snapshot.namespace.as_str(),
                    &bigint(snapshot.version),
                    &i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX),
                    &snapshot.state,
                    &snapshot.head_hash.as_slice(),
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(Snapshot { created_at: row.get(0), ..snapshot })
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        query.validate()?;
        self.stream_info(&query.stream_id).await?;
        let client = self.conn().await?;
        let row = client
            .query_opt(
                &*self.tables.sql(
                    "SELECT version, schema_version, state, created_at, head_hash FROM eventstore.snapshots \
                 WHERE stream_id = $1 AND namespace = $2 AND ($3::bigint IS NULL OR version <= $3) \
                   AND ($4::integer IS NULL OR schema_version = $4) \
                 ORDER BY version DESC LIMIT 1",
                ),
                &[
                    &query.stream_id,
                    &query.namespace.as_str(),
                    &query.max_version.map(bigint),
                    &query.schema_version.map(|v| i32::try_from(v).unwrap_or(i32::MAX)),
                ],
            )
            .await
            .map_err(db_error)?;
        let Some(r) = row else { return Ok(None) };
        // A snapshot saved before links were recorded has none: it matches
        // no chain, and readers that check links ignore it.
        let head: Option<Vec<u8>> = r.get(4);
        Ok(Some(Snapshot {
            stream_id: query.stream_id.clone(),
            namespace: query.namespace,
            version: from_bigint(r.get(0)),
            schema_version: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
            state: r.get(2),
            created_at: r.get(3),
            head_hash: head.and_then(|h| to_hash(&h).ok()).unwrap_or([0; 32]),
        }))
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        let client = self.conn().await?;
        let row = client
            .query_opt(
                &*self.tables.sql(
                    "SELECT stream_id, result, fingerprint FROM eventstore.append_requests \
                 WHERE scope = $1 AND request_id = $2 AND result IS NOT NULL",
                ),
                &[&key.scope, &key.request_id],
            )
            .await
            .map_err(db_error)?;
        let Some(row) = row else { return Ok(None) };
        let fingerprint: Option<Vec<u8>> = row.get("fingerprint");
        if !key.matches(fingerprint.as_deref()) {
            return Err(Error::RequestIdReused { request_id: key.request_id.clone() });
        }
        let result: Value = row.get("result");
        let number =
            |v: &Value| v.as_u64().ok_or_else(|| Error::Internal(format!("malformed request result {result}")));
        Ok(Some(AppendOutcome {
            stream_id: row.get("stream_id"),
            first_version: number(&result["first_version"])?,
            last_version: number(&result["last_version"])?,
            positions: result["positions"]
                .as_array()
                .ok_or_else(|| Error::Internal(format!("malformed request result {result}")))?
                .iter()
                .map(number)
                .collect::<Result<_>>()?,
            duplicate: true,
        }))
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    async fn check_health(&self) -> Result<()> {
        let client = self.conn().await?;
        client.query(&*self.tables.sql("SELECT 1 FROM eventstore.streams LIMIT 1"), &[]).await.map_err(db_error)?;
        Ok(())
    }
}
