//! The group commit: appends queued by [`PostgresEventLog`](super::PostgresEventLog)
//! are taken by a few writer tasks and stored as one batch (`append.rs`: one
//! transaction, two pipelined round trips) per batch; [`append_in`] runs the
//! same batch inside a caller's transaction.

use std::{convert::Infallible, sync::Arc, time::Duration};

use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::append::{Appending, Failure, Statements};
#[cfg(doc)]
use super::notify::notify_appended;
#[cfg(doc)]
use crate::log::EventLog;
use crate::{
    backoff::Backoff,
    error::{Error, Result},
    hash,
    model::{AppendOutcome, AppendRequest, RequestKey},
    pg::{Database, db_error},
};

type Reply = oneshot::Sender<Result<AppendOutcome>>;

/// An append waiting for a writer, with the content digests of its events,
/// its request key and where to send its answer.
pub(super) struct Job {
    pub(super) request: AppendRequest,
    pub(super) contents: Vec<[u8; 32]>,
    pub(super) key: Option<RequestKey>,
    pub(super) reply: Reply,
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| db.code().code() == "23505")
}

fn is_retryable(failure: &Failure) -> bool {
    match failure {
        Failure::Database(error) => {
            error.as_db_error().is_some_and(|db| matches!(db.code().code(), "40001" | "40P01" | "23505"))
        }
        Failure::Unlocked(_) => true,
        Failure::Corrupt(_) => false,
    }
}

/// Waits between the tries of a batch that met a serialization failure, a
/// deadlock or a unique violation (three retries at most).
const CONFLICT_BACKOFF: Backoff =
    Backoff { first: Duration::from_millis(2), max: Duration::from_millis(8), factor: 2, jitter: 0.2 };

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
    let mut connection: Option<(Client, Statements)> = None;
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

        let started = std::time::Instant::now();
        let mut attempt: u64 = 0;
        let mut retries = CONFLICT_BACKOFF.start();
        let mut check_event_ids = false;
        let result = loop {
            attempt = attempt.saturating_add(1);
            if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                connection = match connect_statements(&database, &tables).await {
                    Ok(c) => Some(c),
                    Err(e) => break Err(e),
                };
            }
            let Some((client, statements)) = connection.as_ref() else { continue };
            let run = run_batch(client, statements, &batch, check_event_ids);
            let answer = match tokio::time::timeout(append_timeout, run).await {
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
                Ok(answers) => break Ok(answers),
                Err(e) if attempt < 4 && is_retryable(&e) => {
                    // A unique violation is almost always an event id stored
                    // before: repeat with the check that fails only that append.
                    check_event_ids |= matches!(&e, Failure::Database(e) if is_unique_violation(e));
                    tracing::debug!(error = ?e, attempt, "group commit retried");
                    retries.wait().await;
                }
                Err(e @ (Failure::Unlocked(_) | Failure::Corrupt(_))) => break Err(e.into_error()),
                Err(Failure::Database(e)) => {
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

        metrics::histogram!("eventfold_store_group_commit_seconds").record(started.elapsed());
        match result {
            Ok(answers) => {
                // Failpoint `store::after_commit`: the batch's transaction
                // committed, its appenders not yet answered. A crash here
                // leaves stored appends whose callers never heard of them:
                // they must get an error (not wait for good), and a retry with
                // the same request id must get the first answer.
                crate::failpoint!("store::after_commit");
                let mut head = 0;
                for (job, outcome) in batch.into_iter().zip(answers) {
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
/// as [`EventLog::append`]. Outside a transaction block it is refused
/// (`Internal`) and stores nothing.
pub async fn append_in(
    client: &(impl tokio_postgres::GenericClient + Sync),
    request: &AppendRequest,
) -> Result<AppendOutcome> {
    append_all_in(client, std::slice::from_ref(request))
        .await?
        .pop()
        .ok_or_else(|| Error::Internal("the append answered nothing".to_owned()))?
}

/// Appends `requests` as one batch inside the caller's transaction, as the
/// group commit does: in order, each checked on its own (one append's
/// refusal never fails another), each with its own answer. A failure of
/// the batch as a whole (`Err`) rolls back to where the batch began; the
/// caller's transaction stays usable. Outside a transaction block it is
/// refused (`Internal`) and stores nothing.
pub async fn append_all_in(
    client: &(impl tokio_postgres::GenericClient + Sync),
    requests: &[AppendRequest],
) -> Result<Vec<Result<AppendOutcome>>> {
    for request in requests {
        request.validate()?;
    }
    let contents: Vec<Vec<[u8; 32]>> = requests.iter().map(content_digests).collect();
    let keys: Vec<Option<RequestKey>> = requests.iter().map(AppendRequest::request_key).collect();
    let appending: Vec<Appending<'_>> = requests
        .iter()
        .zip(&contents)
        .zip(&keys)
        .map(|((request, contents), key)| Appending { request, contents, key: key.as_ref() })
        .collect();
    // As the writers do: a unique violation is almost always an event id
    // stored before, and the batch again with the check fails only its append.
    let statements = Statements::prepare(client, &super::tables::Tables::platform()).await.map_err(db_error)?;
    let answers = match super::append::run(client, &statements, &appending, false, false).await {
        Err(Failure::Database(e)) if is_unique_violation(&e) => {
            super::append::run(client, &statements, &appending, true, false).await
        }
        answers => answers,
    };
    answers.map_err(|e| match e {
        Failure::Database(e) if e.code() == Some(&tokio_postgres::error::SqlState::NO_ACTIVE_SQL_TRANSACTION) => {
            Error::Internal("append_in runs inside a transaction block only".to_owned())
        }
        e => e.into_error(),
    })
}

/// The content digests of `request`'s events, which the hash chain links.
pub(super) fn content_digests(request: &AppendRequest) -> Vec<[u8; 32]> {
    request
        .events
        .iter()
        .map(|e| hash::content_digest(&e.event_id, &e.event_type, e.schema_version, &e.data, &e.metadata))
        .collect()
}

/// A writer's connection with the batch's statements prepared on it.
async fn connect_statements(database: &Database, tables: &super::tables::Tables) -> Result<(Client, Statements)> {
    let client = database.connect().await?;
    let statements = Statements::prepare(&client, tables).await.map_err(db_error)?;
    Ok((client, statements))
}

async fn run_batch(
    client: &Client,
    statements: &Statements,
    batch: &[Job],
    check_event_ids: bool,
) -> std::result::Result<Vec<Result<AppendOutcome>>, Failure> {
    let appends: Vec<Appending<'_>> = batch
        .iter()
        .map(|job| Appending { request: &job.request, contents: &job.contents, key: job.key.as_ref() })
        .collect();
    super::append::run(client, statements, &appends, check_event_ids, true).await
}
