//! The command bus: tower layers around the [`Handler`], outermost first:
//!
//! 1. tracing — a span per command with its name, request, correlation and
//!    causation ids (the ids also go into every event's metadata);
//! 2. metrics — `eventfold_commands_total{command, outcome}` and
//!    `eventfold_command_duration_seconds{command}`;
//! 3. authorization — an [`Authorizer`] hook sees the principal from the
//!    request metadata and the command;
//! 4. validation — the command's stateless checks, before anything loads;
//! 5. idempotency — the append stores the request id in the same
//!    transaction; a repeat whose decision now fails or changes nothing
//!    answers the first answer instead;
//! 6. retry — the whole command again (fresh load, fresh decision) on a
//!    concurrency conflict, a bounded number of times, waiting as the one
//!    retry policy ([`Backoff`]) says.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use eventfold_platform::runtime::Backoff;
use eventfold_store::EventLog;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tracing::Instrument;

use crate::{
    envelope::{Command, Envelope, Reply},
    error::{Error, Result},
    handler::{Handler, SnapshotPolicy, first_answer},
};

/// The assembled bus.
pub type Bus = BoxCloneSyncService<Envelope, Reply, Error>;

/// Who may send what. The policy arrives with the gateway; the default
/// allows everything.
pub trait Authorizer: Send + Sync + 'static {
    /// `Err(reason)` refuses the command.
    fn authorize(&self, principal: Option<&str>, command: &Command) -> std::result::Result<(), String>;
}

/// Allows every command.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: Option<&str>, _: &Command) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Settings of the bus.
#[derive(Clone)]
pub struct BusOptions {
    pub authorizer: Arc<dyn Authorizer>,
    pub snapshots: SnapshotPolicy,
    /// Attempts of a command that meets a concurrency conflict.
    pub max_attempts: u32,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self { authorizer: Arc::new(AllowAll), snapshots: SnapshotPolicy::default(), max_attempts: 10 }
    }
}

/// The bus over `log` (which should upcast: see [`crate::upcasters`]).
pub fn bus(log: Arc<dyn EventLog>, options: BusOptions) -> Bus {
    let handler = Handler::new(log.clone(), options.snapshots);
    let service = ServiceBuilder::new()
        .layer(Middle(Trace))
        .layer(Middle(Metrics))
        .layer(Middle(Authorize(options.authorizer)))
        .layer(Middle(Validate))
        .layer(Middle(Idempotency(log)))
        .layer(Middle(Retry(options.max_attempts.max(1))))
        .service(handler);
    BoxCloneSyncService::new(service)
}

/// One layer's behaviour around the rest of the bus.
trait Middleware: Clone + Send + Sync + 'static {
    fn around<S>(&self, next: S, envelope: Envelope) -> impl Future<Output = Result<Reply>> + Send
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send;
}

#[derive(Clone)]
struct Middle<M>(M);

impl<M: Middleware, S> Layer<S> for Middle<M> {
    type Service = Layered<M, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Layered { middleware: self.0.clone(), inner }
    }
}

#[derive(Clone)]
struct Layered<M, S> {
    middleware: M,
    inner: S,
}

impl<M, S> Service<Envelope> for Layered<M, S>
where
    M: Middleware,
    S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Reply;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Reply>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        // The ready service goes into the call; a fresh clone waits here.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let middleware = self.middleware.clone();
        Box::pin(async move { middleware.around(ready, envelope).await })
    }
}

#[derive(Clone)]
struct Trace;

impl Middleware for Trace {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let span = tracing::info_span!(
            "command",
            otel.name = envelope.command.name(),
            name = envelope.command.name(),
            request_id = envelope.meta.request_id.as_deref().unwrap_or(""),
            correlation_id = %envelope.meta.correlation_id,
            causation_id = envelope.meta.causation_id.as_deref().unwrap_or(""),
            principal = envelope.meta.principal.as_deref().unwrap_or(""),
        );
        async move {
            // The whole command: its sensitive values print as `<redacted>`
            // (eventfold_domain::Sensitive).
            tracing::debug!(command = ?envelope.command, "command received");
            let result = next.oneshot(envelope).await;
            match &result {
                Ok(reply) => tracing::debug!(
                    position = reply.writes.last().map_or(0, |w| w.global_position),
                    duplicate = reply.writes.iter().any(|w| w.duplicate),
                    "command done"
                ),
                Err(e @ (Error::Store(_) | Error::Corrupt(_))) => tracing::warn!(error = %e, "command failed"),
                Err(e) => tracing::debug!(error = %e, "command refused"),
            }
            result
        }
        .instrument(span)
        .await
    }
}

#[derive(Clone)]
struct Metrics;

impl Middleware for Metrics {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let name = envelope.command.name();
        let started = Instant::now();
        let result = next.oneshot(envelope).await;
        // `reason`: the business rule's reason of a rejection (a closed set).
        let (outcome, reason) = match &result {
            Ok(reply) if reply.writes.iter().any(|w| w.duplicate) => ("duplicate", ""),
            Ok(_) => ("ok", ""),
            Err(Error::Rejected { reason, .. }) => ("rejected", reason.as_str()),
            Err(e) => (e.kind(), ""),
        };
        metrics::counter!("eventfold_commands_total", "command" => name, "outcome" => outcome, "reason" => reason)
            .increment(1);
        metrics::histogram!("eventfold_command_duration_seconds", "command" => name)
            .record(started.elapsed().as_secs_f64());
        result
    }
}

#[derive(Clone)]
struct Authorize(Arc<dyn Authorizer>);

impl Middleware for Authorize {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        self.0.authorize(envelope.meta.principal.as_deref(), &envelope.command).map_err(Error::PermissionDenied)?;
        next.oneshot(envelope).await
    }
}

#[derive(Clone)]
struct Validate;

impl Middleware for Validate {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let mut violations = envelope.command.validate();
        let meta = &envelope.meta;
        let ids = [
            ("request_id", meta.request_id.as_deref()),
            (crate::grpc::PRINCIPAL_HEADER, meta.principal.as_deref()),
            (crate::grpc::CORRELATION_HEADER, Some(meta.correlation_id.as_str())),
            (crate::grpc::CAUSATION_HEADER, meta.causation_id.as_deref()),
        ];
        for (field, id) in ids {
            if let Some(id) = id {
                eventfold_domain::check_id(field, id, &mut violations);
            }
        }
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        next.oneshot(envelope).await
    }
}

#[derive(Clone)]
struct Idempotency(Arc<dyn EventLog>);

impl Middleware for Idempotency {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let key = envelope.request_key();
        let result = next.oneshot(envelope).await;
        // Appends with a known request id already answer the first answer;
        // what remains is a repeat whose decision now fails or is a no-op.
        let repeat_suspected = match &result {
            Err(Error::Rejected { .. }) => true,
            Ok(reply) => reply.changed_nothing(),
            Err(_) => false,
        };
        let Some(key) = key.filter(|_| repeat_suspected) else {
            return result;
        };
        // The id used before for another command: refused, not answered.
        match self.0.find_request(&key).await? {
            Some(outcome) => Ok(Reply::single(first_answer(self.0.as_ref(), outcome).await?)),
            None => result,
        }
    }
}

/// The waits between the attempts of a command that meets a conflict:
/// short (the other writer is done within milliseconds) and jittered, so
/// that writers that collided do not collide again: 2–4 ms, then twice
/// that each time, up to 64–128 ms.
const CONFLICT_BACKOFF: Backoff =
    Backoff { first: Duration::from_millis(4), max: Duration::from_millis(128), factor: 2, jitter: 0.5 };

#[derive(Clone)]
struct Retry(u32);

impl Middleware for Retry {
    async fn around<S>(&self, next: S, envelope: Envelope) -> Result<Reply>
    where
        S: Service<Envelope, Response = Reply, Error = Error> + Clone + Send + 'static,
        S::Future: Send,
    {
        let mut retries = CONFLICT_BACKOFF.start();
        loop {
            match next.clone().oneshot(envelope.clone()).await {
                Err(Error::Conflict { .. }) if retries.attempts().saturating_add(1) < self.0 => {
                    let pause = retries.next_delay();
                    tracing::debug!(attempt = retries.attempts(), ?pause, "concurrency conflict: retrying the command");
                    metrics::counter!("eventfold_command_retries_total", "command" => envelope.command.name())
                        .increment(1);
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}
