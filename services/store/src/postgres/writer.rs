//! The group commit: appends queued by [`PostgresEventLog`](super::PostgresEventLog)
//! are taken by a few writer tasks and stored with one
//! `eventstore.append_batch(...)` call per batch; [`append_in`] makes the
//! same call inside a caller's transaction.

use std::{convert::Infallible, sync::Arc, time::Duration};

use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::{Client, Row, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[cfg(doc)]
use super::notify::notify_appended;
#[cfg(doc)]
use crate::log::EventLog;
use crate::{
    backoff::Backoff,
    error::{Error, Result},
    hash,
    model::{AppendOutcome, AppendRequest, ExpectedVersion, RequestKey, bigint, from_bigint},
    pg::{Database, db_error},
};

type Reply = oneshot::Sender<Result<AppendOutcome>>;

/// An append waiting for a writer, with the content digests of its events,
/// its request key and where to send its answer.
pub(super) struct Job {
    pub(super) request: AppendRequest,
    pub(super) contents: Vec<Vec<u8>>,
    pub(super) key: Option<RequestKey>,
    pub(super) reply: Reply,
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| db.code().code() == "23505")
}

fn is_retryable(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| matches!(db.code().code(), "40001" | "40P01" | "23505"))
}

/// Waits between the tries of a batch that met a serialization failure, a
/// deadlock or a unique violation (three retries at most).
const CONFLICT_BACKOFF: Backoff =
    Backoff { first: Duration::from_millis(2), max: Duration::from_millis(8), factor: 2, jitter: 0.2 };

const APPEND_SQL: &str = "SELECT idx, status, first_version, last_version, actual_version, positions, stored_stream \
                          FROM eventstore.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// What a writer of the group commit needs; cloned for each run of it.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) database: Database,
    pub(super) tables: super::tables::Tables,
    pub(super) append_timeout: Duration,
    /// The queue, shared by the writers; it outlives a writer that crashed,
    /// so that its restart takes what was queued meanwhile.
    pub(super) jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// `[appended, committed]`: the wake-up of local subscribers and the
    /// notifier's input.
    pub(super) heads: [watch::Sender<u64>; 2],
    pub(super) max_appends: usize,
    pub(super) max_events: usize,
}

/// A writer of the group commit: takes what is queued, appends it in one
/// call, answers each append, then moves the heads. It ends when the queue
/// closes (the log was dropped) or `token` is cancelled while it waits for
/// work. It runs under [`supervise`](crate::supervise::supervise): if it
/// panics, the appends of its batch answer `Unavailable` (their answer
/// channels drop with it; the outcome is unknown, a retry with the same
/// request id gets the first answer) and it is started again.
pub(super) async fn writer(writer: Writer, token: CancellationToken) -> std::result::Result<(), Infallible> {
    let Writer { database, tables, append_timeout, jobs, heads, max_appends, max_events } = writer;
    let mut connection: Option<(Client, Statement)> = None;
    loop {
        let batch = {
            let mut jobs = tokio::select! {
                jobs = jobs.lock() => jobs,
                () = token.cancelled() => return Ok(()),
            };
            let first = tokio::select! {
                first = jobs.recv() => first,
                () = token.cancelled() => return Ok(()),
            };
            let Some(first) = first else { return Ok(()) };
            let mut events = first.request.events.len();
            let mut batch = vec![first];
            while batch.len() < max_appends && events < max_events {
                match jobs.try_recv() {
                    Ok(job) => {
                        events = events.saturating_add(job.request.events.len());
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        metrics::histogram!("eventfold_store_group_commit_size").record(batch.len() as f64);

        let mut attempt: u64 = 0;
        let mut retries = CONFLICT_BACKOFF.start();
        let mut check_event_ids = false;
        let result = loop {
            attempt = attempt.saturating_add(1);
            if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                connection = match connect_prepared(&database, &tables.sql(APPEND_SQL)).await {
                    Ok(c) => Some(c),
                    Err(e) => break Err(e),
                };
            }
            let Some((client, statement)) = connection.as_ref() else { continue };
            let answer =
                match tokio::time::timeout(append_timeout, run_batch(client, statement, &batch, check_event_ids)).await
                {
                    Ok(answer) => answer,
                    Err(_) => {
                        // Dropping the connection aborts the call if it is still
                        // running; if it committed meanwhile, a retry with the
                        // same request id gets the first answer.
                        connection = None;
                        break Err(Error::Unavailable(format!(
                            "PostgreSQL did not answer the append within {:?}, the outcome is unknown; \
                         retry with the same request id",
                            append_timeout
                        )));
                    }
                };
            match answer {
                Ok(rows) => break Ok(rows),
                Err(e) if attempt < 4 && is_retryable(&e) => {
                    // A unique violation is almost always an event id stored
                    // before: repeat with the check that fails only that append.
                    check_event_ids |= is_unique_violation(&e);
                    tracing::debug!(error = %e, attempt, "group commit retried");
                    retries.wait().await;
                }
                Err(e) => {
                    let closed = e.is_closed() || e.as_db_error().is_none();
                    if closed {
                        connection = None;
                        break Err(Error::Unavailable(format!(
                            "PostgreSQL connection failed during the append, the outcome is unknown; \
                             retry with the same request id: {e}"
                        )));
                    }
                    break Err(db_error(e));
                }
            }
        };

        match result {
            Ok(rows) => {
                // Failpoint `store::after_commit`: the batch's transaction
                // committed (`append_batch` runs as one autocommit statement),
                // its appenders not yet answered. A crash here leaves stored
                // appends whose callers never heard of them: they must get an
                // error (not wait for good), and a retry with the same request
                // id must get the first answer.
                crate::failpoint!("store::after_commit");
                let mut head = 0;
                for (job, row) in batch.into_iter().zip(rows) {
                    let outcome = outcome_from_row(&job.request, &row);
                    if let Ok(o) = &outcome {
                        head = head.max(o.last_position());
                    }
                    let _ = job.reply.send(outcome);
                }
                if head > 0 {
                    for sender in &heads {
                        sender.send_modify(|h| *h = (*h).max(head));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, appends = batch.len(), "group commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(clone_error(&e)));
                }
            }
        }
    }
}

fn clone_error(error: &Error) -> Error {
    match error {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        other => Error::Internal(other.to_string()),
    }
}

/// A connection of its own (not pooled) preparing `sql`, for a task that
/// holds it for long.
pub(super) async fn connect_prepared(database: &Database, sql: &str) -> Result<(Client, Statement)> {
    let client = database.connect().await?;
    let statement = client.prepare(sql).await.map_err(db_error)?;
    Ok((client, statement))
}

/// Appends `request` inside the caller's transaction on `client` (a
/// connection to the event store's database), so that the events are
/// stored if and only if the caller's own writes commit: e.g. a saga's
/// lifecycle events beside its saved state. Nothing is appended until the
/// caller commits; then the caller should wake other processes' readers
/// with [`notify_appended`] (readers poll anyway). Same checks and answers
/// as [`EventLog::append`].
pub async fn append_in(client: &impl tokio_postgres::GenericClient, request: &AppendRequest) -> Result<AppendOutcome> {
    request.validate()?;
    let contents: Vec<Vec<u8>> = request
        .events
        .iter()
        .map(|e| hash::content_digest(&e.event_id, &e.event_type, e.schema_version, &e.data, &e.metadata).to_vec())
        .collect();
    let key = request.request_key();
    let rows = run_appends(client, APPEND_SQL, &[(request, &contents, key.as_ref())], false).await.map_err(db_error)?;
    let row = rows.first().ok_or_else(|| Error::Internal("append_batch answered no row".to_owned()))?;
    outcome_from_row(request, row)
}

async fn run_batch(
    client: &Client,
    statement: &Statement,
    batch: &[Job],
    check_event_ids: bool,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let appends: Vec<Appending<'_>> =
        batch.iter().map(|job| (&job.request, job.contents.as_slice(), job.key.as_ref())).collect();
    run_appends(client, statement, &appends, check_event_ids).await
}

/// An append as `append_batch` takes it: the request, the content digests
/// of its events, its request key.
type Appending<'a> = (&'a AppendRequest, &'a [Vec<u8>], Option<&'a RequestKey>);

/// One `append_batch` call for `batch` (each request with the content
/// digests of its events and its request key).
async fn run_appends<S>(
    client: &impl tokio_postgres::GenericClient,
    statement: &S,
    batch: &[Appending<'_>],
    check_event_ids: bool,
) -> Result<Vec<Row>, tokio_postgres::Error>
where
    S: tokio_postgres::ToStatement + ?Sized + Sync + Send,
{
    let events: usize = batch.iter().map(|(r, _, _)| r.events.len()).sum();
    let mut streams = Vec::with_capacity(batch.len());
    let mut expected = Vec::with_capacity(batch.len());
    let mut request_ids = Vec::with_capacity(batch.len());
    let mut scopes: Vec<Option<&str>> = Vec::with_capacity(batch.len());
    let mut fingerprints: Vec<Option<&[u8]>> = Vec::with_capacity(batch.len());
    let mut counts = Vec::with_capacity(batch.len());
    let mut ids: Vec<Uuid> = Vec::with_capacity(events);
    let mut types: Vec<&str> = Vec::with_capacity(events);
    let mut schema: Vec<i32> = Vec::with_capacity(events);
    let mut data: Vec<&Value> = Vec::with_capacity(events);
    let mut metadata: Vec<Value> = Vec::with_capacity(events);
    let mut contents: Vec<&[u8]> = Vec::with_capacity(events);
    for (r, job_contents, key) in batch {
        streams.push(r.stream_id.as_str());
        expected.push(match r.expected {
            ExpectedVersion::Any => -1i64,
            ExpectedVersion::NoStream => -2,
            ExpectedVersion::StreamExists => -3,
            // Validated to fit (`AppendRequest::validate`): never negative.
            ExpectedVersion::Exact(v) => bigint(v),
        });
        request_ids.push(key.map_or("", |k| k.request_id.as_str()));
        scopes.push(key.map(|k| k.scope.as_str()));
        fingerprints.push(key.map(|k| k.fingerprint.as_slice()));
        counts.push(i32::try_from(r.events.len()).unwrap_or(i32::MAX));
        for (event, content) in r.events.iter().zip(job_contents.iter()) {
            ids.push(event.event_id);
            types.push(&event.event_type);
            schema.push(i32::try_from(event.schema_version).unwrap_or(i32::MAX));
            data.push(&event.data);
            metadata.push(event.metadata.to_json());
            contents.push(content);
        }
    }
    let rows = client
        .query(
            statement,
            &[
                &streams,
                &expected,
                &request_ids,
                &counts,
                &ids,
                &types,
                &schema,
                &data,
                &metadata,
                &contents,
                &check_event_ids,
                &scopes,
                &fingerprints,
            ],
        )
        .await?;
    Ok(rows)
}

fn outcome_from_row(request: &AppendRequest, row: &Row) -> Result<AppendOutcome> {
    let status: &str = row.get("status");
    let first: Option<i64> = row.get("first_version");
    let last: Option<i64> = row.get("last_version");
    let positions: Option<Vec<i64>> = row.get("positions");
    match status {
        "ok" | "duplicate" => Ok(AppendOutcome {
            stream_id: row.get::<_, Option<String>>("stored_stream").unwrap_or_else(|| request.stream_id.clone()),
            first_version: first.map_or(0, from_bigint),
            last_version: last.map_or(0, from_bigint),
            positions: positions.unwrap_or_default().into_iter().map(from_bigint).collect(),
            duplicate: status == "duplicate",
        }),
        "request_reused" => Err(Error::RequestIdReused { request_id: request.request_id.clone().unwrap_or_default() }),
        "wrong_version" => Err(Error::WrongExpectedVersion {
            stream: request.stream_id.clone(),
            expected: request.expected,
            actual: row.get::<_, Option<i64>>("actual_version").and_then(|v| u64::try_from(v).ok()),
        }),
        "deleted" => Err(Error::StreamDeleted(request.stream_id.clone())),
        "duplicate_event_id" => Err(Error::DuplicateEventId {
            event_id: request.events.iter().map(|e| e.event_id.to_string()).collect::<Vec<_>>().join(", "),
        }),
        other => Err(Error::Internal(format!("append_batch answered unknown status {other}"))),
    }
}
