//! `eventfold.sagas.v1.SagaService`: the stored sagas over gRPC, and the
//! operators' retry and abort.
//!
//! HOSTILE INPUT: beyond the proto comments, requests are held to these
//! bounds, each refused with `INVALID_ARGUMENT` and a `BadRequest`
//! violation naming the field: `saga_id` is 1 to 137 bytes of visible
//! ASCII (a 128-byte order or transfer id with its `fulfil-`/`transfer-`
//! prefix); `page_token` at most 1024 bytes, only as this service issued
//! it; `page_size` is lowered to 500. A client address holds at most
//! [`DEFAULT_MAX_WATCHERS_PER_PEER`] open `WatchSaga` streams (see
//! [`Sagas::with_max_watchers_per_peer`]); more are `RESOURCE_EXHAUSTED`
//! with the ErrorInfo reason `TOO_MANY_WATCHERS`.
//!
//! Watchers of the same saga share one channel; one follower for all
//! watched sagas reads, in one statement per wake-up, the versions of the
//! watched sagas and reads a saga (with its history) only when its version
//! moved.
//!
//! This is the edge of the crate: requests become domain calls here, and
//! every [`Error`] becomes its status through one `From<Error> for
//! Status`. Database failures never reach a client as text: `UNAVAILABLE`
//! and `INTERNAL` answers carry a generic message and an `error_id`
//! (ErrorInfo metadata) that the log line with the real error repeats.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use eventfold_platform::{
    page,
    runtime::CancellationToken,
    server::GrpcServer,
    status::{self, error_info, invalid_argument},
    watchers::Watchers,
};
use eventfold_proto::sagas::{
    self as pb,
    saga_service_server::{SagaService, SagaServiceServer},
};
use eventfold_store::Database;
use futures_util::StreamExt;
use tonic::{Code, Request, Response, Status};

use crate::{
    config::SagaConfig,
    error::Error,
    model::{SagaType, Status as SagaStatus},
    repo::Repository,
    store::{self, SagaRecord},
};

/// The gRPC names of the saga service, as health and reflection know them.
pub const SERVICE_NAMES: &[&str] = &["eventfold.sagas.v1.SagaService"];

/// How often the health of the service follows the saga store.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// How often a watch looks at its saga at most.
const WATCH_POLL: Duration = Duration::from_millis(25);

/// How often a watch woken by the event log (see [`Sagas::with_changes`])
/// looks at its saga all the same: a save that appends no lifecycle event
/// (an operator's retry back to RUNNING) wakes nobody.
const WATCH_FALLBACK: Duration = Duration::from_secs(1);

/// Open `WatchSaga` streams one client address may hold unless
/// [`Sagas::with_max_watchers_per_peer`] says otherwise.
pub const DEFAULT_MAX_WATCHERS_PER_PEER: usize = 100;

/// Longest saga id: a 128-byte order or transfer id and its prefix.
const MAX_SAGA_ID_BYTES: usize = 137;

/// Longest page token accepted (those this service issues are far shorter).
const MAX_PAGE_TOKEN_BYTES: usize = 1024;

/// What the watchers of a saga see: the saga, or why it cannot be read.
type Watched = Result<pb::Saga, Status>;

/// See the module documentation.
#[derive(Clone)]
pub struct Sagas {
    sagas: Repository,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    watchers: Arc<Watchers<Watched>>,
    /// Ends every `WatchSaga` stream when cancelled (the server stops).
    stop: CancellationToken,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").finish_non_exhaustive()
    }
}

impl Sagas {
    /// The service over the sagas of `database` (an operator's change
    /// holds a connection of its pool while it waits for the saga and
    /// saves it; reads hold one per statement).
    pub fn postgres(database: Database) -> Sagas {
        Sagas::new(Repository::postgres(database))
    }

    /// The service over the sagas of `sagas`.
    pub fn new(sagas: Repository) -> Sagas {
        Sagas {
            sagas,
            changes: None,
            watchers: Watchers::new(DEFAULT_MAX_WATCHERS_PER_PEER),
            stop: CancellationToken::new(),
        }
    }

    /// At most `max` open `WatchSaga` streams per client address.
    #[must_use]
    pub fn with_max_watchers_per_peer(mut self, max: usize) -> Sagas {
        self.watchers = Watchers::new(max);
        self
    }

    /// Watches look at their saga when `changes` moves (the event log's
    /// last position: every save with lifecycle events appends), not on
    /// every poll.
    #[must_use]
    pub fn with_changes(mut self, changes: tokio::sync::watch::Receiver<u64>) -> Sagas {
        self.changes = Some(changes);
        self
    }
}

/// Hosts the `SagaService` over `sagas` on `server`, with `config`'s limits
/// and a health check; its `WatchSaga` streams end when `token` is
/// cancelled, so that the server can drain.
pub fn host(server: &mut GrpcServer, config: &SagaConfig, sagas: Sagas, token: CancellationToken) {
    let sagas = Sagas { stop: token, ..config.service(sagas) };
    let probed = sagas.sagas.clone();
    server.add_service(eventfold_proto::FILE_DESCRIPTOR_SET, SagaServiceServer::new(sagas));
    server.health_check(SERVICE_NAMES, HEALTH_INTERVAL, move || {
        let sagas = probed.clone();
        async move { sagas.check().await.map_err(|e| e.to_string()) }
    });
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        // PostgreSQL's errors as the store tells them apart: worth a retry
        // (UNAVAILABLE) or not (INTERNAL).
        let error = match error {
            Error::Database(db) => Error::Store(eventfold_store::pg::db_error(db)),
            other => other,
        };
        let saga = |saga_id: &str| ("saga_id", saga_id.to_owned());
        match &error {
            Error::NotFound { saga_id } => {
                error_info(Code::NotFound, error.to_string(), "SAGA_NOT_FOUND", &[saga(saga_id)])
            }
            Error::NotRetryable { saga_id, status } => error_info(
                Code::FailedPrecondition,
                error.to_string(),
                "SAGA_NOT_RETRYABLE",
                &[saga(saga_id), ("status", status.as_str().to_owned())],
            ),
            Error::NotRunning { saga_id, status } => error_info(
                Code::FailedPrecondition,
                error.to_string(),
                "SAGA_NOT_RUNNING",
                &[saga(saga_id), ("status", status.as_str().to_owned())],
            ),
            Error::Conflict { saga_id, .. } => {
                error_info(Code::Aborted, "the saga changed meanwhile; try again", "SAGA_CHANGED", &[saga(saga_id)])
            }
            Error::Refused { reason } => error_info(
                Code::FailedPrecondition,
                error.to_string(),
                "SAGA_STEP_REFUSED",
                &[("reason", reason.clone())],
            ),
            // The driver's text only in the log (under the answer's error id).
            Error::Store(eventfold_store::Error::Unavailable(detail)) => status::unavailable("the saga store", detail),
            Error::Unavailable(_) => status::unavailable("a saga dependency", &error),
            Error::Corrupt { .. } => status::internal_because("CORRUPT_DATA", &error),
            Error::Database(_) | Error::Store(_) => status::internal(&error),
        }
    }
}

/// `INVALID_ARGUMENT` unless `saga_id` is 1 to [`MAX_SAGA_ID_BYTES`] of
/// visible ASCII (what the sagas' ids are made of).
fn require_id(saga_id: &str) -> Result<(), Status> {
    let why = if saga_id.is_empty() || saga_id.len() > MAX_SAGA_ID_BYTES {
        format!("must be 1 to {MAX_SAGA_ID_BYTES} bytes")
    } else if !saga_id.bytes().all(|b| b.is_ascii_graphic()) {
        "must be visible ASCII (no spaces or control characters)".to_owned()
    } else {
        return Ok(());
    };
    Err(invalid_argument([("saga_id".to_owned(), why)]))
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    t.into()
}

fn type_pb(t: SagaType) -> pb::SagaType {
    match t {
        SagaType::OrderFulfilment => pb::SagaType::OrderFulfilment,
        SagaType::MoneyTransfer => pb::SagaType::MoneyTransfer,
    }
}

fn status_pb(s: SagaStatus) -> pb::SagaStatus {
    match s {
        SagaStatus::Running => pb::SagaStatus::Running,
        SagaStatus::Compensating => pb::SagaStatus::Compensating,
        SagaStatus::Completed => pb::SagaStatus::Completed,
        SagaStatus::Failed => pb::SagaStatus::Failed,
    }
}

/// The proto form of `record` with `steps`.
fn saga_pb(record: &SagaRecord, steps: Vec<store::StepLog>) -> pb::Saga {
    let state = &record.state;
    pb::Saga {
        saga_id: record.saga_id.clone(),
        r#type: type_pb(state.saga_type).into(),
        correlation_id: record.correlation_id.clone(),
        status: status_pb(state.status).into(),
        current_step: state.step.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        failures: state.failures,
        reason: state.reason.clone().unwrap_or_default(),
        compensated: state.compensated(),
        compensation_errors: state.compensation_errors.clone(),
        steps: steps
            .into_iter()
            .map(|s| pb::SagaStep {
                step: s.step.as_str().to_owned(),
                outcome: s.outcome,
                detail: s.detail.unwrap_or_default(),
                started_at: Some(timestamp(s.started_at)),
                ended_at: Some(timestamp(s.ended_at)),
            })
            .collect(),
        due_at: (!state.status.is_final()).then(|| timestamp(record.due_at)),
        deadline_at: record.deadline_at.map(timestamp),
        version: record.version,
    }
}

/// A page cursor: (created_at in microseconds, saga id) of the last saga.
type PageCursor = (i64, String);

fn to_cursor(created_at: SystemTime, saga_id: &str) -> PageCursor {
    let micros = created_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    (i64::try_from(micros).unwrap_or(i64::MAX), saga_id.to_owned())
}

/// The cursor of a page token, which a client can forge: its time goes
/// through the same check as a request time (years 0001 to 9999), so that
/// it never overflows here nor leaves PostgreSQL's range.
fn from_cursor((micros, saga_id): PageCursor) -> Result<store::Cursor, Status> {
    let seconds = micros.div_euclid(1_000_000);
    let nanos = micros.rem_euclid(1_000_000).checked_mul(1000).and_then(|n| i32::try_from(n).ok());
    let mut violations = Vec::new();
    let at = nanos.and_then(|nanos| {
        eventfold_platform::input::system_time(prost_types::Timestamp { seconds, nanos }, "page_token", &mut violations)
    });
    match at {
        Some(at) if violations.is_empty() => Ok((at, saga_id)),
        _ => Err(invalid_argument([("page_token".to_owned(), "is not a token this service issued".to_owned())])),
    }
}

impl Sagas {
    /// Saga `saga_id` with its history.
    async fn saga(&self, saga_id: &str) -> Result<pb::Saga, Status> {
        let record = self.sagas.load(saga_id).await?.ok_or_else(|| Error::NotFound { saga_id: saga_id.to_owned() })?;
        let steps = self.sagas.steps(saga_id).await?;
        Ok(saga_pb(&record, steps))
    }

    /// Hands `saga` to the watchers of its id unless they have it or a
    /// later version already (the follower and a new watch's first read
    /// may race).
    fn publish(&self, saga_id: &str, saga: Watched) {
        self.watchers.update(saga_id, |current| {
            let newer = match (&*current, &saga) {
                (Some(Ok(current)), Ok(saga)) => saga.version > current.version,
                _ => true,
            };
            if newer {
                *current = Some(saga);
            }
            newer
        });
    }
}

type WatchStream = Pin<Box<dyn futures_util::Stream<Item = Result<pb::WatchSagaResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SagaService for Sagas {
    async fn get_saga(&self, request: Request<pb::GetSagaRequest>) -> Result<Response<pb::GetSagaResponse>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        Ok(Response::new(pb::GetSagaResponse { saga: Some(self.saga(&r.saga_id).await?) }))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let r = request.into_inner();
        let saga_type = match pb::SagaType::try_from(r.r#type) {
            Ok(pb::SagaType::Unspecified) => None,
            Ok(pb::SagaType::OrderFulfilment) => Some(SagaType::OrderFulfilment),
            Ok(pb::SagaType::MoneyTransfer) => Some(SagaType::MoneyTransfer),
            Err(_) => return Err(invalid_argument([("type".to_owned(), "unknown saga type".to_owned())])),
        };
        let status = match pb::SagaStatus::try_from(r.status) {
            Ok(pb::SagaStatus::Unspecified) => None,
            Ok(pb::SagaStatus::Running) => Some(SagaStatus::Running),
            Ok(pb::SagaStatus::Compensating) => Some(SagaStatus::Compensating),
            Ok(pb::SagaStatus::Completed) => Some(SagaStatus::Completed),
            Ok(pb::SagaStatus::Failed) => Some(SagaStatus::Failed),
            Err(_) => return Err(invalid_argument([("status".to_owned(), "unknown saga status".to_owned())])),
        };
        let size = page::size(r.page_size)?;
        if r.page_token.len() > MAX_PAGE_TOKEN_BYTES {
            return Err(invalid_argument([(
                "page_token".to_owned(),
                format!("must be at most {MAX_PAGE_TOKEN_BYTES} bytes"),
            )]));
        }
        let filters = format!("type={}&status={}", r.r#type, r.status);
        let after = page::cursor::<PageCursor>(&filters, &r.page_token)?.map(from_cursor).transpose()?;
        let limit = size.saturating_add(1);
        let mut rows = self.sagas.list(saga_type, status, after.as_ref(), limit).await?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match rows.last() {
            Some((record, created_at)) if more => page::token(&filters, &to_cursor(*created_at, &record.saga_id)),
            _ => String::new(),
        };
        let sagas = rows.iter().map(|(record, _)| saga_pb(record, Vec::new())).collect();
        Ok(Response::new(pb::ListSagasResponse { sagas, next_page_token }))
    }

    type WatchSagaStream = WatchStream;

    async fn watch_saga(&self, request: Request<pb::WatchSagaRequest>) -> Result<Response<WatchStream>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip());
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        let (subscription, start) = self.watchers.subscribe(&r.saga_id, peer)?;
        // Started before anything can fail: the registry counts on it.
        if start {
            tokio::spawn(follow_sagas(self.clone()));
        }
        // Read once per watch: an unknown saga is NOT_FOUND at once, and the
        // first answer never waits for the follower.
        let first = self.saga(&r.saga_id).await?;
        self.publish(&r.saga_id, Ok(first));
        let stream = subscription.into_stream(|saga: Watched| match saga {
            Ok(saga) => {
                let finished = matches!(
                    pb::SagaStatus::try_from(saga.status),
                    Ok(pb::SagaStatus::Completed | pb::SagaStatus::Failed)
                );
                (Ok(pb::WatchSagaResponse { saga: Some(saga) }), finished)
            }
            Err(status) => (Err(status), true),
        });
        Ok(Response::new(Box::pin(stream.take_until(self.stop.clone().cancelled_owned()))))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::RetrySagaResponse>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        self.sagas.retry(&r.saga_id).await?;
        let saga = self.saga(&r.saga_id).await?;
        Ok(Response::new(pb::RetrySagaResponse { saga: Some(saga) }))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::AbortSagaResponse>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        self.sagas.abort(&r.saga_id).await?;
        let saga = self.saga(&r.saga_id).await?;
        Ok(Response::new(pb::AbortSagaResponse { saga: Some(saga) }))
    }
}

/// The one follower of every watched saga: at each wake-up (the event log
/// moved, see [`Sagas::with_changes`], or a fallback poll), one statement
/// reads the versions of all watched sagas; only a saga whose version
/// moved is read (with its history) and handed to its watchers. Ends when
/// nothing is watched.
async fn follow_sagas(service: Sagas) {
    let mut changes = service.changes.clone();
    // The version at which a watched saga could not be read (its watchers
    // got the error): not read again until it moves.
    let mut failed: HashMap<String, i64> = HashMap::new();
    loop {
        if service.watchers.stop_if_idle() {
            return;
        }
        let ids = service.watchers.ids();
        let watched: HashSet<&String> = ids.iter().collect();
        failed.retain(|id, _| watched.contains(id));
        match service.sagas.versions(&ids).await {
            Ok(versions) => {
                for (saga_id, version) in versions {
                    // What the watchers have (a new watch's own first read
                    // included) is not read again.
                    let published = service.watchers.peek(&saga_id, |current| match current {
                        Some(Ok(saga)) => Some(saga.version),
                        _ => None,
                    });
                    if published.flatten() == Some(version) || failed.get(&saga_id) == Some(&version) {
                        continue;
                    }
                    match service.saga(&saga_id).await {
                        Ok(saga) => {
                            failed.remove(&saga_id);
                            service.publish(&saga_id, Ok(saga));
                        }
                        // Tried again at the next wake-up.
                        Err(status) if status.code() == Code::Unavailable => {}
                        Err(status) => {
                            failed.insert(saga_id.clone(), version);
                            service.publish(&saga_id, Err(status));
                        }
                    }
                }
            }
            // Logged with its error id (see `From<Error> for Status`);
            // tried again.
            Err(e) => drop(Status::from(e)),
        }
        tokio::select! {
            () = tokio::time::sleep(WATCH_POLL) => {}
            () = service.watchers.woken() => {}
        }
        if let Some(changes) = &mut changes {
            tokio::select! {
                // A log that is gone leaves the fallback.
                Ok(()) = changes.changed() => {}
                () = tokio::time::sleep(WATCH_FALLBACK) => {}
                () = service.watchers.woken() => {}
            }
        }
    }
}
