//! `eventfold.sagas.v1.SagaService`: the stored sagas over gRPC, and the
//! operators' retry and abort.

use std::{pin::Pin, time::Duration};

use eventfold_platform::{
    page,
    status::{error_info, invalid_argument},
};
use eventfold_proto::sagas::{
    self as pb,
    saga_service_server::{SagaService, SagaServiceServer},
};
use tonic::{Code, Request, Response, Status, transport::server::Router};

use crate::{
    model::{SagaType, Status as SagaStatus},
    repo::Repository,
    store::{self, SagaRecord, StoreError},
};

/// The gRPC names of the saga service, as health and reflection know them.
pub const SERVICE_NAMES: &[&str] = &["eventfold.sagas.v1.SagaService"];

/// How often a watch looks at its saga at most.
const WATCH_POLL: Duration = Duration::from_millis(25);

/// How often a watch woken by the event log (see [`Sagas::with_changes`])
/// looks at its saga all the same: a save that appends no lifecycle event
/// (an operator's retry back to RUNNING) wakes nobody.
const WATCH_FALLBACK: Duration = Duration::from_secs(1);

/// See the module documentation.
#[derive(Clone)]
pub struct Sagas {
    sagas: Repository,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").finish_non_exhaustive()
    }
}

impl Sagas {
    /// The service over the sagas of the database of `database_url`.
    pub async fn connect(database_url: &str) -> Result<Sagas, StoreError> {
        // An operator's change holds its saga only while it is saved.
        Ok(Sagas::new(Repository::postgres(database_url, 4).await?))
    }

    /// The service over the sagas of `sagas`.
    pub fn new(sagas: Repository) -> Sagas {
        Sagas { sagas, changes: None }
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

/// Adds the saga service to `router`.
pub fn add_services(router: Router, sagas: Sagas) -> Router {
    router.add_service(SagaServiceServer::new(sagas))
}

/// Serves the saga service on `listener` until `shutdown` (with health,
/// following the saga store, and reflection); calls drain for `grace`.
pub async fn run(
    sagas: Sagas,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), eventfold_platform::Error> {
    let (reporter, router) = eventfold_platform::server::router(&[eventfold_proto::FILE_DESCRIPTOR_SET])?;
    let probed = sagas.clone();
    let probe = eventfold_platform::server::spawn_health_probe(
        reporter,
        SERVICE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        Duration::from_secs(5),
        move || {
            let sagas = probed.clone();
            async move { sagas.sagas.check().await.map_err(|e| e.to_string()) }
        },
    )
    .await;
    let result = eventfold_platform::server::serve(add_services(router, sagas), listener, shutdown, grace).await;
    probe.abort();
    result
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    error_info(Code::Unavailable, format!("saga store: {e}"), "STORE_UNAVAILABLE", &[])
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Database(db) => unavailable(db),
        StoreError::Pool(e) => unavailable(e),
        StoreError::Log(e) => eventfold_platform::status::from_store(e),
        StoreError::Conflict { saga_id, .. } => {
            error_info(Code::Aborted, "the saga changed meanwhile; try again", "SAGA_CHANGED", &[("saga_id", saga_id)])
        }
        StoreError::Corrupt { saga_id, message } => {
            error_info(Code::Internal, message, "SAGA_CORRUPT", &[("saga_id", saga_id)])
        }
    }
}

fn not_found(saga_id: &str) -> Status {
    error_info(Code::NotFound, format!("no saga {saga_id}"), "SAGA_NOT_FOUND", &[("saga_id", saga_id.to_owned())])
}

fn require_id(saga_id: &str) -> Result<(), Status> {
    if saga_id.is_empty() || saga_id.len() > 200 {
        return Err(invalid_argument([("saga_id".to_owned(), "must be 1 to 200 bytes".to_owned())]));
    }
    Ok(())
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

fn to_cursor(created_at: std::time::SystemTime, saga_id: &str) -> PageCursor {
    let micros = created_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    (i64::try_from(micros).unwrap_or(i64::MAX), saga_id.to_owned())
}

fn from_cursor((micros, saga_id): PageCursor) -> store::Cursor {
    (std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0)), saga_id)
}

impl Sagas {
    async fn saga(&self, saga_id: &str) -> Result<pb::Saga, Status> {
        Ok(self.saga_if_changed(saga_id, None).await?.expect("no version given: always answered"))
    }

    /// Saga `saga_id` with its history, unless it is still at `version`
    /// (then the history is not read).
    async fn saga_if_changed(&self, saga_id: &str, version: Option<i64>) -> Result<Option<pb::Saga>, Status> {
        let record = self.sagas.load(saga_id).await.map_err(store_status)?.ok_or_else(|| not_found(saga_id))?;
        if Some(record.version) == version {
            return Ok(None);
        }
        let steps = self.sagas.steps(saga_id).await.map_err(store_status)?;
        Ok(Some(saga_pb(&record, steps)))
    }

    /// Applies an operator's change to saga `saga_id` under its lock.
    async fn change(
        &self,
        saga_id: &str,
        change: impl FnOnce(&mut SagaRecord) -> Result<(), Status>,
    ) -> Result<pb::Saga, Status> {
        let mut claim = self.sagas.lock(saga_id).await.map_err(store_status)?.ok_or_else(|| not_found(saga_id))?;
        change(&mut claim.record)?;
        claim.record.due_at = std::time::SystemTime::now();
        claim.record.deadline_at = None;
        claim.save(None).await.map_err(store_status)?;
        claim.release().await.map_err(store_status)?;
        self.saga(saga_id).await
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
        let filters = format!("type={}&status={}", r.r#type, r.status);
        let after = page::cursor::<PageCursor>(&filters, &r.page_token)?.map(from_cursor);
        let mut rows = self.sagas.list(saga_type, status, after.as_ref(), size + 1).await.map_err(store_status)?;
        let more = rows.len() as i64 > size;
        rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some((record, created_at)) if more => page::token(&filters, &to_cursor(*created_at, &record.saga_id)),
            _ => String::new(),
        };
        let sagas = rows.iter().map(|(record, _)| saga_pb(record, Vec::new())).collect();
        Ok(Response::new(pb::ListSagasResponse { sagas, next_page_token }))
    }

    type WatchSagaStream = WatchStream;

    async fn watch_saga(&self, request: Request<pb::WatchSagaRequest>) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        let first = self.saga(&r.saga_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let service = self.clone();
        let mut changes = self.changes.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(pb::WatchSagaResponse { saga: Some(last.clone()) })).await.is_err() {
                return;
            }
            let finished = |s: &pb::Saga| {
                matches!(pb::SagaStatus::try_from(s.status), Ok(pb::SagaStatus::Completed | pb::SagaStatus::Failed))
            };
            while !finished(&last) {
                tokio::select! {
                    () = tokio::time::sleep(WATCH_POLL) => {}
                    () = tx.closed() => return,
                }
                if let Some(changes) = &mut changes {
                    tokio::select! {
                        // A log that is gone leaves the fallback.
                        Ok(()) = changes.changed() => {}
                        () = tokio::time::sleep(WATCH_FALLBACK) => {}
                        () = tx.closed() => return,
                    }
                }
                // The step history only when the saga changed.
                match service.saga_if_changed(&r.saga_id, Some(last.version)).await {
                    Ok(Some(now)) => {
                        if tx.send(Ok(pb::WatchSagaResponse { saga: Some(now.clone()) })).await.is_err() {
                            return;
                        }
                        last = now;
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::RetrySagaResponse>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        let saga = self
            .change(&r.saga_id, |record| {
                record.state.retry().map(drop).ok_or_else(|| {
                    error_info(
                        Code::FailedPrecondition,
                        format!("saga {} has no refused compensation to retry", record.saga_id),
                        "SAGA_NOT_RETRYABLE",
                        &[("saga_id", record.saga_id.clone()), ("status", record.state.status.as_str().to_owned())],
                    )
                })
            })
            .await?;
        Ok(Response::new(pb::RetrySagaResponse { saga: Some(saga) }))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::AbortSagaResponse>, Status> {
        let r = request.into_inner();
        require_id(&r.saga_id)?;
        let saga = self
            .change(&r.saga_id, |record| {
                record.state.abort().map(drop).ok_or_else(|| {
                    error_info(
                        Code::FailedPrecondition,
                        format!("saga {} is not running", record.saga_id),
                        "SAGA_NOT_RUNNING",
                        &[("saga_id", record.saga_id.clone()), ("status", record.state.status.as_str().to_owned())],
                    )
                })
            })
            .await?;
        Ok(Response::new(pb::AbortSagaResponse { saga: Some(saga) }))
    }
}
